"""Data-parallel scaling: tokens/s of the same training step on 1 rank and on 2 ranks.

What is measured: SFT steps (`forward_backward(data, "cross_entropy")` then `optim_step`) on
the default model (SmolLM2-135M-Instruct, float32), with LoRA rank 32 on attention, MLP and
lm_head (`--kind lora`, replicated adapter, gradients all-reduced) or full fine-tuning (`--kind
full`, FSDP2-sharded). The total batch per step is the same in every configuration — `--batch`
random sequences of `--seq-len` tokens from a fixed seed — so 2 ranks each take half of it.

Configurations (threads per rank set with OMP_NUM_THREADS and torch.set_num_threads):

    1 rank  x 2 threads   one process using both cores of this machine
    1 rank  x 1 thread    one process, one core
    2 ranks x 1 thread    `bios launch --nproc-per-node 2` (gloo on loopback)

On a 2-core machine, 2 ranks x 1 thread against 1 rank x 2 threads is the fair comparison (the
same cores); against 1 rank x 1 thread it shows the scaling with cores. Each configuration runs
in fresh processes, one after the other, each loading the model, taking `--warmup` untimed steps
and then `--steps` timed ones: wall clock (`time.perf_counter` on rank 0) and CPU seconds — of
rank 0 (`getrusage`) and of all ranks together (read from /proc for the ranks torchrun started,
so Linux only). The machine may be shared: the load average is printed before and after. Wall
clock then depends on the competition (N processes get a larger share of contended cores than
one), while CPU seconds per step measure the work a step costs and are much steadier: the
extra CPU of 2 ranks over 1 is the cost of distributing (communication, duplicated work).
OMP_WAIT_POLICY=PASSIVE, as in train_throughput.py.

Printed: a table of tokens/s, seconds/step and CPU seconds/step (medians) and the largest peak
resident memory of one rank per configuration, and the ratios 2 ranks / 1 rank at 2 threads and
at 1 thread. The first step's loss of every
configuration is printed too: it must be the same (the same weights, the same batch).

Left out on purpose: several machines (the loopback numbers bound what a network gives), GPUs,
and the HTTP transport (`bios serve --nproc-per-node` runs the same engine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from machine import cpu_name

CONFIGS = ((1, 2), (1, 1), (2, 1))  # (ranks, threads per rank)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--kind", choices=["lora", "full"], default="lora")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (all ranks)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: write results here
    return parser.parse_args()


def child(args: argparse.Namespace) -> None:
    """One configuration's rank 0 (the other ranks, if any, follow it)."""
    import torch

    from bios.client.service import ServiceClient
    from bios.models.loading import resolve_model_path
    from bios.types import AdamParams, Datum, ModelInput

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    service = ServiceClient()
    model = str(resolve_model_path(args.model))
    if args.kind == "lora":
        client = service.create_lora_training_client(model, rank=32, seed=0)
    else:
        client = service.create_full_training_client(model)
    vocab = client.get_tokenizer().vocab_size
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(args.batch):
        tokens = torch.randint(0, vocab, (args.seq_len + 1,), generator=generator)
        inputs = {"target_tokens": tokens[1:], "weights": torch.ones(args.seq_len)}
        data.append(
            Datum(model_input=ModelInput.from_ints(tokens[:-1].tolist()), loss_fn_inputs=inputs)
        )
    adam = AdamParams(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12)
    seconds, cpu, job_cpu, losses = [], [], [], []
    for step in range(args.warmup + args.steps):
        wall, used, job = time.perf_counter(), _own_cpu(), _job_cpu()
        forward = client.forward_backward(data, "cross_entropy")
        client.optim_step(adam).result()
        losses.append(forward.result().metrics["loss:sum"])
        if step >= args.warmup:
            seconds.append(time.perf_counter() - wall)
            cpu.append(_own_cpu() - used)
            job_cpu.append(_job_cpu() - job)
    result = {"seconds": seconds, "cpu": cpu, "job_cpu": job_cpu, "loss": losses[0]}
    result["peak_mib"] = _peak_rss_mib()
    Path(args.child).write_text(json.dumps(result))


def _own_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def _ranks() -> list[str]:
    """The pids of this job's ranks on this machine: under torchrun, this process's parent's
    children (Linux /proc)."""
    parent = os.getppid()
    return Path(f"/proc/{parent}/task/{parent}/children").read_text().split()


def _peak_rss_mib() -> float:
    """The largest peak resident memory of one rank (VmHWM), MiB."""
    if "LOCAL_WORLD_SIZE" not in os.environ:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = []
    for pid in _ranks():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)


def _job_cpu() -> float:
    """CPU seconds of every rank of this job on this machine (Linux /proc): under torchrun the
    ranks are the children of this process's parent; in one process, this process."""
    if "LOCAL_WORLD_SIZE" not in os.environ:
        return _own_cpu()
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in _ranks():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def run_config(args: argparse.Namespace, ranks: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        own = [__file__, "--model", args.model, "--kind", args.kind, "--batch", str(args.batch)]
        own += ["--seq-len", str(args.seq_len), "--steps", str(args.steps)]
        own += ["--warmup", str(args.warmup), "--child", str(out)]
        if ranks == 1:
            command = [sys.executable, *own]
        else:
            command = [sys.executable, "-m", "bios.cli", "launch", "--nproc-per-node", str(ranks)]
            command += own
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BIOS_HOME": folder}
        subprocess.run(command, env=env, check=True)
        result = json.loads(out.read_text())
    step = statistics.median(result["seconds"])
    return {
        "ranks": ranks,
        "threads": threads,
        "tokens_per_s": args.batch * args.seq_len / step,
        "s_per_step": step,
        "cpu_s_per_step": statistics.median(result["cpu"]),
        "job_cpu_s_per_step": statistics.median(result["job_cpu"]),
        "loss": result["loss"],
        "peak_mib": result["peak_mib"],
    }


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, {args.model}")
    print(f"{args.kind}: {args.batch} x {args.seq_len} tokens per step (all ranks together)")
    print(f"load average before: {os.getloadavg()}")
    rows = [run_config(args, ranks, threads) for ranks, threads in CONFIGS]
    print(f"load average after:  {os.getloadavg()}\n")
    print(
        "| ranks x threads | tokens/s | s/step | CPU s/step, all ranks | rank 0 "
        "| peak RSS per rank, MiB | first loss |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['ranks']} x {row['threads']} | {row['tokens_per_s']:.0f} | "
            f"{row['s_per_step']:.2f} | {row['job_cpu_s_per_step']:.2f} | "
            f"{row['cpu_s_per_step']:.2f} | {row['peak_mib']:.0f} | {row['loss']:.4f} |"
        )
    by = {(r["ranks"], r["threads"]): r["tokens_per_s"] for r in rows}
    print(f"\n2 ranks x 1 thread / 1 rank x 2 threads: {by[(2, 1)] / by[(1, 2)]:.2f}")
    print(f"2 ranks x 1 thread / 1 rank x 1 thread:  {by[(2, 1)] / by[(1, 1)]:.2f}")
    cpu = {(r["ranks"], r["threads"]): r["job_cpu_s_per_step"] for r in rows}
    print(f"CPU s/step, 2 ranks x 1 thread / 1 rank x 1 thread: {cpu[(2, 1)] / cpu[(1, 1)]:.2f}")


if __name__ == "__main__":
    main()
