"""LoRA SFT throughput and peak memory: Bios against a plain transformers + peft loop.

What is measured: LoRA rank 32, alpha 32 on attention, MLP and lm_head of the default model
(SmolLM2-135M-Instruct, float32), 8 sequences x 256 tokens per step, every target weighted 1,
AdamW (lr 1e-4, betas 0.9/0.95, eps 1e-12, no weight decay). The data is random token ids from a
fixed seed, identical on both sides.

  bios      `ServiceClient().create_lora_training_client(...)`; each step submits
            `forward_backward(data, "cross_entropy")` and waits on `optim_step(...)`.
  baseline  `from_pretrained` + `peft.get_peft_model` + `torch.optim.AdamW`; each step a forward,
            `F.cross_entropy(..., reduction="sum")` (the same summed token loss), backward,
            step, zero_grad.

How: each side runs in its own fresh subprocess, both started by this one invocation, so neither
sees the other's allocations and each has its own peak-RSS counter. A side loads its model and
primes it with a one-sequence no-grad forward (so the memory-mapped weights are paged in before
the "before training" RSS is read). The parent then drives both in lock-step: step i of one side,
then step i of the other, the first side alternating, so both meet the same background load (this
machine may be shared). The first `--warmup` steps are not counted. Each step is timed in the
child with `time.perf_counter` (wall) and `getrusage` (CPU seconds of all threads).

Reported per side: tokens/s over the timed steps, mean and median seconds/step, CPU seconds/step
(the work a step costs; less sensitive to other processes than wall time), CPU/wall (about the
thread count when nothing else competes), peak RSS of the process (`ru_maxrss`) and its increase
over the RSS before training. The first step's loss is printed for both: LoRA B starts at zero,
so both equal the base model's summed loss on the same data and must agree.

Both sides run with OMP_WAIT_POLICY=PASSIVE unless it is set already. With libgomp's default, a
thread waiting at a barrier spins up to 300,000 times first, unless the process manages more
OpenMP threads than there are CPUs, when it spins only 1,000 times. The baseline's process has one
OpenMP pool (2 threads on 2 cores: full spinning); Bios's has two (the main thread's, used while
loading, and the engine worker's: throttled). When other processes compete for the cores, the
spinning baseline then burns CPU its own descheduled partner thread needs: on this shared machine
that made the baseline 2.5-3.7x slower per step at the same work, an artefact of the runtime
setting, not of either training loop. PASSIVE puts both on the same footing.

Left out on purpose: real text (token ids do not change the arithmetic), gradient checkpointing,
bf16, and the HTTP transport (this measures the in-process engine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Both sides' threads sleep, rather than spin, while waiting at an OpenMP barrier (see the
# docstring). Read by libgomp when torch loads, so it must be set before the import below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from machine import cpu_name

SIDES = ("bios", "baseline")
BATCH, SEQ_LEN, RANK, ALPHA = 8, 256, 32, 32
VOCAB_SIZE = 49152  # SmolLM2's
LR, BETAS, EPS = 1e-4, (0.9, 0.95), 1e-12
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_MODULES.append("lm_head")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # child process only
    return parser.parse_args()


# ---- measurement helpers (used inside each side's process) ------------------------------------


def rss_mib() -> float:
    """Current resident set size (VmRSS) of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_sequences(seed: int, vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """BATCH random token sequences of SEQ_LEN + 1 ids: inputs are [:-1], targets [1:]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (BATCH, SEQ_LEN + 1), generator=generator)


def default_model_path() -> Path:
    from bios.models.loading import DEFAULT_MODEL, resolve_model_path

    return resolve_model_path(DEFAULT_MODEL)


# ---- the two training loops -------------------------------------------------------------------
# Each builder returns (prime, step): `prime()` runs one no-grad forward, `step()` one training
# step returning the summed loss.


def build_bios(sequences: torch.Tensor) -> tuple[Callable[[], None], Callable[[], float]]:
    import bios
    from bios.models.loading import DEFAULT_MODEL
    from bios.types import AdamParams, Datum, ModelInput

    training = bios.ServiceClient().create_lora_training_client(DEFAULT_MODEL, rank=RANK, seed=0)
    data = [
        Datum(
            model_input=ModelInput.from_ints(row[:-1].tolist()),
            loss_fn_inputs={"target_tokens": row[1:].tolist(), "weights": [1.0] * SEQ_LEN},
        )
        for row in sequences
    ]
    adam = AdamParams(learning_rate=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS)

    def prime() -> None:
        training.forward(data[:1], "cross_entropy").result()

    def step() -> float:
        forward_backward = training.forward_backward(data, "cross_entropy")
        training.optim_step(adam).result()
        return forward_backward.result().metrics["loss:sum"]

    return prime, step


def build_baseline(sequences: torch.Tensor) -> tuple[Callable[[], None], Callable[[], float]]:
    import peft
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGET_MODULES
    )
    model = peft.get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    inputs, targets = sequences[:, :-1], sequences[:, 1:]

    def prime() -> None:
        with torch.no_grad():
            model(input_ids=inputs[:1])

    def step() -> float:
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    return prime, step


def serve_side(side: str, args: argparse.Namespace) -> None:
    """Child process: build one side, then obey "step" / "finish" lines from the parent.

    Each request is answered with one JSON line on the original stdout; library output is sent
    to stderr so it cannot corrupt the protocol.
    """
    protocol, sys.stdout = sys.stdout, sys.stderr
    # Known and harmless here: peft notes that lm_head is tied to the embedding (Bios adapts the
    # same lm_head output), and a transformers deprecation inside peft.
    warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    prime, step = (build_bios if side == "bios" else build_baseline)(make_sequences(args.seed))
    prime()
    reply(protocol, {"rss_before_training_mib": rss_mib()})
    for command in sys.stdin:
        if command.strip() == "finish":
            reply(protocol, {"peak_rss_mib": peak_rss_mib()})
            return
        cpu_start, wall_start = cpu_seconds(), time.perf_counter()
        loss = step()
        wall = time.perf_counter() - wall_start
        reply(protocol, {"seconds": wall, "cpu_seconds": cpu_seconds() - cpu_start, "loss": loss})


def reply(protocol: TextIO, message: dict) -> None:
    protocol.write(json.dumps(message) + "\n")
    protocol.flush()


# ---- the coordinating process -----------------------------------------------------------------


def start_side(side: str, args: argparse.Namespace) -> subprocess.Popen:
    """This script, in a fresh Python process, serving one side."""
    command = [sys.executable, __file__, "--side", side, "--threads", str(args.threads)]
    command += ["--seed", str(args.seed)]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def read_reply(side: str, process: subprocess.Popen) -> dict:
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"{side} side exited with code {process.wait()} (its stderr is above)")
    return json.loads(line)


def request(side: str, process: subprocess.Popen, command: str) -> dict:
    process.stdin.write(command + "\n")
    process.stdin.flush()
    return read_reply(side, process)


def run_interleaved(args: argparse.Namespace) -> dict[str, dict]:
    """Warm up and time both sides in lock-step: step i of one side, then step i of the other.

    Interleaving exposes both sides to the same background load; the side that goes first
    alternates every step.
    """
    processes = {side: start_side(side, args) for side in SIDES}
    records: dict[str, dict] = {side: read_reply(side, p) for side, p in processes.items()}
    steps: dict[str, list[dict]] = {side: [] for side in SIDES}
    for index in range(args.warmup + args.steps):
        order = SIDES if index % 2 == 0 else SIDES[::-1]
        for side in order:
            steps[side].append(request(side, processes[side], "step"))
    for side, process in processes.items():
        records[side].update(request(side, process, "finish"))
        process.wait()
    return {side: summarise(records[side], steps[side], args.warmup) for side in SIDES}


def summarise(record: dict, steps: list[dict], warmup: int) -> dict:
    """Throughput over the timed steps and memory figures of one side."""
    timed = steps[warmup:]
    wall = sum(s["seconds"] for s in timed)
    cpu = sum(s["cpu_seconds"] for s in timed)
    median = statistics.median(s["seconds"] for s in timed)
    return {
        **record,
        "steps": len(timed),
        "seconds": wall,
        "seconds_per_step": wall / len(timed),
        "median_seconds_per_step": median,
        "cpu_seconds_per_step": cpu / len(timed),
        "tokens_per_second": BATCH * SEQ_LEN * len(timed) / wall,
        "median_tokens_per_second": BATCH * SEQ_LEN / median,
        "cpu_utilisation": cpu / wall,
        "peak_increase_mib": record["peak_rss_mib"] - record["rss_before_training_mib"],
        "step_seconds": [s["seconds"] for s in steps],
        "losses": [s["loss"] for s in steps],
    }


def machine_info(threads: int) -> dict:
    cpu = cpu_name()
    import peft
    import transformers

    return {
        "cpu": cpu,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Bios / baseline. tokens/s > 1: Bios faster; CPU s/step and memory < 1: Bios uses less.

    `paired_speed` is the median over timed steps i of baseline time_i / Bios time_i: steps i
    ran back to back, so a burst of background load mostly cancels out of it.
    """
    bios, base = results["bios"], results["baseline"]
    keys = ("tokens_per_second", "median_tokens_per_second", "cpu_seconds_per_step")
    keys += ("peak_rss_mib", "peak_increase_mib")
    ratio = {key: bios[key] / base[key] for key in keys}
    pairs = zip(base["step_seconds"], bios["step_seconds"], strict=True)
    timed_pairs = list(pairs)[-bios["steps"] :]
    ratio["paired_speed"] = statistics.median(b / o for b, o in timed_pairs)
    return ratio


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def print_report(machine: dict, results: dict[str, dict], ratio: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    console.print(
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), transformers {machine['transformers']}, "
        f"peft {machine['peft']}, Python {machine['python']}, "
        f"OMP_WAIT_POLICY={machine['omp_wait_policy']}; "
        f"load average before {machine['load_before']}, after {machine['load_after']}"
    )
    steps = results["bios"]["steps"]
    table = Table(
        title=f"LoRA r{RANK} SFT, SmolLM2-135M fp32, {BATCH}x{SEQ_LEN} tokens/step, "
        f"{steps} timed steps per side (interleaved)"
    )
    columns = ["side", "tokens/s", "s/step", "median s/step", "CPU s/step", "CPU/wall"]
    columns += ["peak RSS", "peak increase", "first loss"]
    for column in columns:
        table.add_column(column, justify="left" if column == "side" else "right")
    for side in SIDES:
        r = results[side]
        table.add_row(
            side,
            f"{r['tokens_per_second']:.0f}",
            f"{r['seconds_per_step']:.2f}",
            f"{r['median_seconds_per_step']:.2f}",
            f"{r['cpu_seconds_per_step']:.2f}",
            f"{r['cpu_utilisation']:.2f}",
            f"{r['peak_rss_mib']:.0f} MiB",
            f"{r['peak_increase_mib']:.0f} MiB",
            f"{r['losses'][0]:.2f}",
        )
    console.print(table)
    console.print(ratio_table(ratio))


def ratio_table(ratio: dict[str, float]):
    from rich.table import Table

    table = Table(title="Bios / baseline")
    for column in ("measure", "ratio", "reading"):
        table.add_column(column, justify="right" if column == "ratio" else "left")
    rows = [
        ("tokens/s (timed steps)", "tokens_per_second", "> 1: Bios faster"),
        ("tokens/s (median step)", "median_tokens_per_second", "> 1: Bios faster"),
        ("paired step speed", "paired_speed", "median of baseline s / Bios s, step by step"),
        ("CPU seconds per step", "cpu_seconds_per_step", "< 1: Bios does less work"),
        ("peak RSS", "peak_rss_mib", "< 1: Bios uses less memory"),
        ("peak RSS increase", "peak_increase_mib", "< 1: Bios uses less memory"),
    ]
    for label, key, reading in rows:
        table.add_row(label, f"{ratio[key]:.2f}x", reading)
    return table


def main() -> None:
    args = parse_args()
    if args.side is not None:  # a child process serving one side
        serve_side(args.side, args)
        return
    default_model_path()  # convert the default model once, before either side loads it
    load_before = load_average()
    results = run_interleaved(args)
    machine = machine_info(args.threads)
    machine.update(load_before=load_before, load_after=load_average())
    ratio = ratios(results)
    print_report(machine, results, ratio)
    if args.json is not None:
        args.json.write_text(
            json.dumps({"machine": machine, "results": results, "ratios": ratio}, indent=2)
        )


if __name__ == "__main__":
    main()
