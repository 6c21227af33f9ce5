"""Bios on N ranks (`torch.distributed`): one training run spread over processes and machines.

Rank 0 runs the ordinary engine — the embedded client or `bios serve` talk to it as always —
and sends every request to all ranks, which execute it in step on their share of the batch:

    group.py     process groups (gloo on CPU, nccl for CUDA tensors), deadlines, failures
    protocol.py  the command loop: rank 0 sends, every rank runs the same op
    step.py      forward_backward: shares of the batch, the objective on rank 0, gradients back
    runs.py      LoRA replicated on every rank; full fine-tuning sharded with FSDP2
    ops.py       the ops (runs, steps, state, sessions)
    sampling.py  samples split across ranks and merged in order
    leader.py    DistributedEngine and LeaderRun, rank 0's side
    process.py   process_engine(): this process's engine, decided once (which rank am I)

Start a job with `bios launch` / `bios serve --nproc-per-node N`, or plain `torchrun -m
bios.launch script.py` (docs/distributed.md).
"""

from __future__ import annotations

from bios.distributed.group import DistributedError, Group, env_world_size
from bios.distributed.process import process_engine, shutdown_process_engine, spans_ranks

__all__ = [
    "DistributedError",
    "Group",
    "env_world_size",
    "process_engine",
    "shutdown_process_engine",
    "spans_ranks",
]
