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

Start a job with `bios launch` / `bios serve --nproc-per-node N`, or plain `torchrun -m
bios.launch script.py` (docs/distributed.md).
"""

from __future__ import annotations

import sys

from bios.distributed.group import DistributedError, Group, env_world_size


def follow(group: Group) -> int:
    """Run rank 0's commands until it stops (a rank > 0's whole life); the exit status."""
    from bios.distributed import ops, sampling  # noqa: F401  (they register the ops)
    from bios.distributed.protocol import follow as follow_commands

    return follow_commands(group)


def leader_engine(group: Group, home=None):
    from bios.distributed.leader import DistributedEngine

    return DistributedEngine(home=home, group=group)


def engine_for_this_process(engine_class):
    """`Engine.default()`: a plain engine in one process; under torchrun with several ranks a
    DistributedEngine on rank 0, while every other rank follows rank 0 here and exits after."""
    if env_world_size() <= 1:
        return engine_class()
    group = Group()
    if group.is_leader:
        return leader_engine(group)
    sys.exit(follow(group))


__all__ = ["DistributedError", "Group", "engine_for_this_process", "follow", "leader_engine"]
