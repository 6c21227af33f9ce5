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

How: each side runs in its own fresh subprocess (started by this one invocation, one after the
other), so neither sees the other's allocations. A side loads its model, primes it with a
one-sequence no-grad forward (so the memory-mapped weights are paged in before the baseline RSS
is taken), runs the warm-up steps, then times `--steps` steps with `time.perf_counter`. Reported:
tokens/s, seconds/step, CPU time / wall time (a check that both sides use the same threads), the
process's peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) and the peak increase during training
(peak RSS minus the RSS after priming). The loss of the first step is printed for both: LoRA B
starts at zero, so both equal the base model's loss on the same data and should agree.

Left out on purpose: real text (token ids do not change the arithmetic), gradient checkpointing,
bf16, and the HTTP transport (this measures the in-process engine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

SIDES = ("bios", "baseline")
BATCH, SEQ_LEN, RANK, ALPHA = 8, 256, 32, 32
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
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
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


def make_sequences(seed: int, vocab_size: int) -> torch.Tensor:
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


def run_side(side: str, args: argparse.Namespace) -> dict:
    """Build one side, prime, warm up, time; returns the measurements of this process."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sequences = make_sequences(args.seed, vocab_size=49152)
    prime, step = (build_bios if side == "bios" else build_baseline)(sequences)
    prime()
    rss_before = rss_mib()
    losses = [step() for _ in range(args.warmup)]
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    wall = time.perf_counter() - wall_start
    cpu = cpu_seconds() - cpu_start
    peak = peak_rss_mib()
    return {
        "side": side,
        "steps": args.steps,
        "seconds": wall,
        "seconds_per_step": wall / args.steps,
        "tokens_per_second": BATCH * SEQ_LEN * args.steps / wall,
        "cpu_utilisation": cpu / wall,
        "rss_before_training_mib": rss_before,
        "peak_rss_mib": peak,
        "peak_increase_mib": peak - rss_before,
        "losses": losses,
    }


# ---- the coordinating process -----------------------------------------------------------------


def run_in_subprocess(side: str, args: argparse.Namespace) -> dict:
    """Run this script for one side in a fresh Python process and read back its results."""
    with tempfile.TemporaryDirectory() as folder:
        result_file = Path(folder) / f"{side}.json"
        command = [sys.executable, __file__, "--side", side, "--result-file", str(result_file)]
        command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        command += ["--threads", str(args.threads), "--seed", str(args.seed)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"{side} side failed with exit code {done.returncode}")
        return json.loads(result_file.read_text())


def machine_info(threads: int) -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    import peft
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Bios / baseline; tokens/s > 1 means Bios is faster, memory < 1 means Bios uses less."""
    bios, base = results["bios"], results["baseline"]
    return {
        "tokens_per_second": bios["tokens_per_second"] / base["tokens_per_second"],
        "peak_rss": bios["peak_rss_mib"] / base["peak_rss_mib"],
        "peak_increase": bios["peak_increase_mib"] / base["peak_increase_mib"],
    }


def print_report(machine: dict, results: dict[str, dict], ratio: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), transformers {machine['transformers']}, "
        f"peft {machine['peft']}, Python {machine['python']}"
    )
    steps = results["bios"]["steps"]
    title = (
        f"LoRA r{RANK} SFT, SmolLM2-135M fp32, {BATCH}x{SEQ_LEN} tokens/step, {steps} timed steps"
    )
    table = Table(title=title)
    for column in ("side", "tokens/s", "s/step", "CPU/wall", "peak RSS", "peak increase"):
        table.add_column(column, justify="left" if column == "side" else "right")
    table.add_column("first loss", justify="right")
    for side in SIDES:
        r = results[side]
        table.add_row(
            side,
            f"{r['tokens_per_second']:.0f}",
            f"{r['seconds_per_step']:.2f}",
            f"{r['cpu_utilisation']:.2f}",
            f"{r['peak_rss_mib']:.0f} MiB",
            f"{r['peak_increase_mib']:.0f} MiB",
            f"{r['losses'][0]:.1f}",
        )
    table.add_row(
        "bios/baseline",
        f"{ratio['tokens_per_second']:.2f}x",
        "",
        "",
        f"{ratio['peak_rss']:.2f}x",
        f"{ratio['peak_increase']:.2f}x",
        "",
        style="bold",
    )
    console.print(table)
    console.print("tokens/s ratio > 1: Bios faster; memory ratio < 1: Bios uses less.")


def main() -> None:
    args = parse_args()
    if args.side is not None:  # a child process: measure one side and hand back the numbers
        args.result_file.write_text(json.dumps(run_side(args.side, args)))
        return
    default_model_path()  # convert the default model once, before either side is timed
    results = {side: run_in_subprocess(side, args) for side in SIDES}
    machine = machine_info(args.threads)
    ratio = ratios(results)
    print_report(machine, results, ratio)
    if args.json is not None:
        args.json.write_text(
            json.dumps({"machine": machine, "results": results, "ratios": ratio}, indent=2)
        )


if __name__ == "__main__":
    main()
