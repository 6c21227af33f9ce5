"""LoRA SFT throughput and peak memory: Bios against plain transformers + peft loops (fp32, bf16).

What is measured: LoRA rank 32, alpha 32 on attention, MLP and lm_head of a model (default the
default model, SmolLM2-135M-Instruct), AdamW (lr 1e-4, betas 0.9/0.95, eps 1e-12, no weight decay),
on two workloads:

  a  8 sequences x 256 random token ids per step (a fixed seed; the same batch every step), every
     target weighted 1. No padding anywhere.
  b  natural-language chat data of variable length: the docs task of `sft_tasks.py` (docs-a train
     split: "what does NAME in Python's MODULE module do?" -> its docstring summary), rendered with
     the model's chat template by `bios.data.chat.conversation_to_datum` (weight 1 on the
     assistant's tokens only), 16 examples per step, the next 16 every step. The plain loops pad
     each batch to its longest example, as the usual collators do: labels -100 on padding and on
     non-assistant tokens, attention_mask 0 on padding.

and three sides:

  bios  `ServiceClient(device=..., dtype=...)` (each only when given: Bios's defaults otherwise),
        `create_lora_training_client(model, rank=32)`; each step submits
        `forward_backward(data, "cross_entropy")` and waits on `optim_step(...)`.
  fp32  `from_pretrained` in float32 + `peft.get_peft_model` + `torch.optim.AdamW`; each step a
        forward, `F.cross_entropy(..., reduction="sum")` (the same summed token loss), backward,
        step, zero_grad.
  bf16  the same loop with its forward under `torch.autocast(device_type, dtype=torch.bfloat16)`
        (float32 weights, bf16 matrix products: the usual mixed-precision loop); the loss on the
        float32 upcast of the logits.

Tokens/s counts real tokens only, the same on every side: the model-input tokens of the step's
examples, never padding (workload a has none). So a plain loop's padding is work it does and is not
credited for, which is exactly what packing saves.

How: each side of each workload runs in its own fresh subprocess, started by this one invocation,
so none sees another's allocations and each has its own peak-RSS counter (`ru_maxrss`). A side
loads its model and primes it with a one-sequence no-grad forward (so the memory-mapped weights are
paged in before the "before training" RSS is read). The parent then drives a workload's sides in
lock-step: step i of each side in turn, the first side rotating, so all meet the same background
load (this machine may be shared); `--sequential` runs one side after another instead (less memory
at once, no fairness under load). The first `--warmup` steps are not counted. Each step is timed in
the child with `time.perf_counter` (wall; after a CUDA synchronize on a GPU) and `getrusage` (CPU
seconds of all threads). On CUDA the peak of `torch.cuda.max_memory_allocated` is reported too.

Reported per side: tokens/s over the timed steps, mean and median seconds/step, CPU seconds/step,
CPU/wall, peak RSS and its increase over the RSS before training, the padding the plain loops
computed, and the first step's loss: LoRA B starts at zero, so every side equals the base model's
summed loss on the same data and must agree (bf16 to about a percent). Ratios are against the fp32
loop, with the issue's targets beside them.

Both sides run with OMP_WAIT_POLICY=PASSIVE unless it is set already. With libgomp's default, a
thread waiting at a barrier spins up to 300,000 times first, unless the process manages more
OpenMP threads than there are CPUs, when it spins only 1,000 times. A plain loop's process has one
OpenMP pool (2 threads on 2 cores: full spinning); Bios's has two (the main thread's, used while
loading, and the engine worker's: throttled). When other processes compete for the cores, the
spinning loop then burns CPU its own descheduled partner thread needs: on this shared machine that
made a plain loop 2.5-3.7x slower per step at the same work, an artefact of the runtime setting,
not of either training loop. PASSIVE puts all sides on the same footing.

Left out on purpose: gradient checkpointing, the HTTP transport (this measures the in-process
engine), and a packing collator for the plain loops (the usual loops pad).
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
# Every side's threads sleep, rather than spin, while waiting at an OpenMP barrier (see the
# docstring). Read by libgomp when torch loads, so it must be set before the import below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from machine import bios_precision, bios_service, cpu_name, load_average

SIDES = ("bios", "fp32", "bf16")
WORKLOADS = ("a", "b")
BATCH, SEQ_LEN = 8, 256  # workload a
CHAT_BATCH, CHAT_TASK = 16, "docs-a"  # workload b
RANK, ALPHA = 32, 32
LR, BETAS, EPS = 1e-4, (0.9, 0.95), 1e-12
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_MODULES.append("lm_head")
# The targets (bios / side, tokens/s; and peak RSS bios / fp32 at most).
SPEED_TARGETS = {("a", "fp32"): 1.5, ("a", "bf16"): 1.1, ("b", "fp32"): 2.5}
RSS_TARGET = 0.4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--model", help="model name or folder (default: Bios's default model)")
    parser.add_argument("--device", help="for Bios and the plain loops (default: Bios's choice)")
    parser.add_argument("--dtype", help="Bios's dtype: bf16, fp32 (default: Bios's choice)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--sequential", action="store_true", help="one side at a time")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # child process only
    parser.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)  # child only
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    args.sides = [side for side in SIDES if side in args.sides]
    args.workloads = [workload for workload in WORKLOADS if workload in args.workloads]
    return args


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


def model_name(args: argparse.Namespace) -> str:
    from bios.models.loading import DEFAULT_MODEL

    return args.model or DEFAULT_MODEL


def model_path(args: argparse.Namespace) -> Path:
    from bios.models.loading import resolve_model_path

    return resolve_model_path(model_name(args))


def plain_device(args: argparse.Namespace) -> torch.device:
    """The plain loops' device: the one named, else CUDA when there is one (Bios's default)."""
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ---- the two workloads: a list of steps, each a list of Datums --------------------------------


def random_steps(args: argparse.Namespace, count: int) -> list[list]:
    """Workload a: BATCH random sequences of SEQ_LEN + 1 ids (inputs [:-1], targets [1:]), the
    same batch every step."""
    from transformers import AutoConfig

    from bios.types import Datum, ModelInput

    vocab_size = AutoConfig.from_pretrained(model_path(args)).get_text_config().vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    rows = torch.randint(0, vocab_size, (BATCH, SEQ_LEN + 1), generator=generator)
    batch = [
        Datum(
            model_input=ModelInput.from_ints(row[:-1].tolist()),
            loss_fn_inputs={"target_tokens": row[1:], "weights": torch.ones(SEQ_LEN)},
        )
        for row in rows
    ]
    return [batch] * count


def chat_steps(args: argparse.Namespace, count: int) -> list[list]:
    """Workload b: CHAT_BATCH docs-task conversations a step, rendered with the chat template."""
    from sft_tasks import make_task

    from bios.data.chat import conversation_to_datum
    from bios.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_name(args))
    examples = make_task(CHAT_TASK, seed=args.seed).train
    steps = []
    for step in range(count):
        indices = [(step * CHAT_BATCH + i) % len(examples) for i in range(CHAT_BATCH)]
        steps.append([conversation_to_datum(tokenizer, examples[i]["messages"]) for i in indices])
    return steps


def real_tokens(batch: list) -> int:
    return sum(datum.model_input.length for datum in batch)


def padded_batch(batch: list, device: torch.device) -> dict[str, torch.Tensor]:
    """What a usual collator makes of a batch: right-padded input ids, an attention mask, and
    labels (the shifted targets) that are -100 on padding and on unweighted tokens."""
    longest = max(datum.model_input.length for datum in batch)
    input_ids = torch.zeros(len(batch), longest, dtype=torch.long)
    attention_mask = torch.zeros(len(batch), longest, dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    for row, datum in enumerate(batch):
        tokens = datum.model_input.to_ints()
        targets = datum.loss_fn_inputs["target_tokens"].to_torch().long()
        weights = datum.loss_fn_inputs["weights"].to_torch()
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention_mask[row, : len(tokens)] = 1
        labels[row, : len(tokens)] = torch.where(weights > 0, targets, -100)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
    }


# ---- the training loops ------------------------------------------------------------------------
# Each builder takes the workload's steps and returns (prime, step, placement): `prime()` runs one
# no-grad forward, `step(i)` training step i, returning the summed loss; `placement` says where
# and in which dtype the model computes.

Built = tuple[Callable[[], None], Callable[[int], float], str]


def build_bios(args: argparse.Namespace, steps: list[list]) -> Built:
    from bios.types import AdamParams

    service = bios_service(args.device, args.dtype)
    training = service.create_lora_training_client(model_name(args), rank=RANK, seed=0)
    adam = AdamParams(learning_rate=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS)

    def prime() -> None:
        training.forward(steps[0][:1], "cross_entropy").result()

    def step(index: int) -> float:
        forward_backward = training.forward_backward(steps[index], "cross_entropy")
        training.optim_step(adam).result()
        return forward_backward.result().metrics["loss:sum"]

    return prime, step, bios_precision(service)


def build_plain(args: argparse.Namespace, steps: list[list], autocast: bool) -> Built:
    import peft
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    device = plain_device(args)
    model = AutoModelForCausalLM.from_pretrained(
        model_path(args), dtype=torch.float32, attn_implementation="sdpa"
    ).to(device)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGET_MODULES
    )
    model = peft.get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    padded: dict[int, dict[str, torch.Tensor]] = {}  # workload a repeats one batch
    for batch in steps:
        if id(batch) not in padded:
            padded[id(batch)] = padded_batch(batch, device)
    batches = [padded[id(batch)] for batch in steps]

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not autocast:
            return model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits

    def prime() -> None:
        with torch.no_grad():
            model(input_ids=batches[0]["input_ids"][:1])

    def step(index: int) -> float:
        batch = batches[index]
        logits = forward(batch).float()
        loss = F.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum"
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    placement = f"{device}, " + ("bf16 autocast" if autocast else "float32")
    return prime, step, placement


def build_side(args: argparse.Namespace, steps: list[list]) -> Built:
    if args.side == "bios":
        return build_bios(args, steps)
    return build_plain(args, steps, autocast=args.side == "bf16")


def serve_side(args: argparse.Namespace) -> None:
    """Child process: build one side of one workload, then obey "step" / "finish" lines.

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
    count = args.warmup + args.steps
    steps = (random_steps if args.workload == "a" else chat_steps)(args, count)
    prime, step, placement = build_side(args, steps)
    prime()
    cuda = plain_device(args).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reply(protocol, {"rss_before_training_mib": rss_mib(), "placement": placement})
    index = 0
    for command in sys.stdin:
        if command.strip() == "finish":
            finish = {"peak_rss_mib": peak_rss_mib()}
            if cuda:
                finish["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
            reply(protocol, finish)
            return
        batch = steps[index]
        cpu_start, wall_start = cpu_seconds(), time.perf_counter()
        loss = step(index)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - wall_start
        longest = max(datum.model_input.length for datum in batch)
        reply(
            protocol,
            {
                "seconds": wall,
                "cpu_seconds": cpu_seconds() - cpu_start,
                "loss": loss,
                "tokens": real_tokens(batch),
                "padded_tokens": longest * len(batch),
            },
        )
        index += 1


def reply(protocol: TextIO, message: dict) -> None:
    protocol.write(json.dumps(message) + "\n")
    protocol.flush()


# ---- the coordinating process -----------------------------------------------------------------


def start_side(side: str, workload: str, args: argparse.Namespace) -> subprocess.Popen:
    """This script, in a fresh Python process, serving one side of one workload."""
    command = [sys.executable, __file__, "--side", side, "--workload", workload]
    command += ["--threads", str(args.threads), "--seed", str(args.seed)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    for flag in ("model", "device", "dtype"):
        if getattr(args, flag):
            command += [f"--{flag}", getattr(args, flag)]
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


def run_workload(workload: str, args: argparse.Namespace) -> dict[str, dict]:
    """Warm up and time every side of one workload, interleaved (or one after another)."""
    groups = [[side] for side in args.sides] if args.sequential else [args.sides]
    results: dict[str, dict] = {}
    for group in groups:
        processes = {side: start_side(side, workload, args) for side in group}
        records = {side: read_reply(side, p) for side, p in processes.items()}
        steps: dict[str, list[dict]] = {side: [] for side in group}
        for index in range(args.warmup + args.steps):
            shift = index % len(group)
            for side in group[shift:] + group[:shift]:  # the first side rotates
                steps[side].append(request(side, processes[side], "step"))
        for side, process in processes.items():
            records[side].update(request(side, process, "finish"))
            process.wait()
        results.update({side: summarise(records[side], steps[side], args.warmup) for side in group})
    return results


def summarise(record: dict, steps: list[dict], warmup: int) -> dict:
    """Throughput over the timed steps and memory figures of one side."""
    timed = steps[warmup:]
    wall = sum(s["seconds"] for s in timed)
    cpu = sum(s["cpu_seconds"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    median = statistics.median(s["seconds"] for s in timed)
    return {
        **record,
        "steps": len(timed),
        "seconds": wall,
        "seconds_per_step": wall / len(timed),
        "median_seconds_per_step": median,
        "cpu_seconds_per_step": cpu / len(timed),
        "tokens_per_step": tokens / len(timed),
        "tokens_per_second": tokens / wall,
        "padding_share": 1 - tokens / sum(s["padded_tokens"] for s in timed),
        "cpu_utilisation": cpu / wall,
        "peak_increase_mib": record["peak_rss_mib"] - record["rss_before_training_mib"],
        "step_seconds": [s["seconds"] for s in steps],
        "losses": [s["loss"] for s in steps],
    }


def machine_info(args: argparse.Namespace) -> dict:
    import peft
    import transformers

    return {
        "cpu": cpu_name(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "cores": os.cpu_count(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def ratios(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """For each side against the fp32 loop and Bios against the bf16 loop: tokens/s (> 1:
    faster), CPU s/step and memory (< 1: less), and `paired_speed`, the median over timed steps
    i of other time_i / this time_i: steps i ran back to back, so a burst of background load
    mostly cancels out of it."""
    pairs = [(side, "fp32") for side in ("bios", "bf16")] + [("bios", "bf16")]
    out: dict[str, dict[str, float]] = {}
    for side, other in pairs:
        if side not in results or other not in results:
            continue
        mine, theirs = results[side], results[other]
        keys = ("tokens_per_second", "cpu_seconds_per_step", "peak_rss_mib", "peak_increase_mib")
        ratio = {key: mine[key] / theirs[key] for key in keys}
        if "peak_gpu_mib" in mine and "peak_gpu_mib" in theirs:
            ratio["peak_gpu_mib"] = mine["peak_gpu_mib"] / theirs["peak_gpu_mib"]
        timed = list(zip(theirs["step_seconds"], mine["step_seconds"], strict=True))
        ratio["paired_speed"] = statistics.median(t / m for t, m in timed[-mine["steps"] :])
        out[f"{side}/{other}"] = ratio
    return out


# ---- the report --------------------------------------------------------------------------------


def print_report(args: argparse.Namespace, machine: dict, report: dict[str, dict]) -> None:
    from rich.console import Console

    console = Console(width=140)
    gpu = f", GPU {machine['gpu']}" if machine["gpu"] else ""
    console.print(
        f"Machine: {machine['cpu']}, {machine['cores']} cores{gpu}, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), transformers {machine['transformers']}, "
        f"peft {machine['peft']}, Python {machine['python']}, "
        f"OMP_WAIT_POLICY={machine['omp_wait_policy']}; "
        f"load average before {machine['load_before']}, after {machine['load_after']}"
    )
    console.print(
        f"Model {model_name(args)}, LoRA r{RANK} on attention, MLP and lm_head; "
        f"{'sides one after another' if args.sequential else 'sides interleaved step by step'}. "
        "tokens/s counts real tokens (model inputs, never padding) on every side alike."
    )
    for workload, entry in report.items():
        if "bios" in entry["results"]:
            console.print(f"Bios (workload {workload}): {entry['results']['bios']['placement']}")
        console.print(side_table(workload, entry["results"], args))
        console.print(ratio_table(workload, entry["ratios"]))


def side_table(workload: str, results: dict[str, dict], args: argparse.Namespace):
    from rich.table import Table

    first = next(iter(results.values()))
    what = (
        f"{BATCH}x{SEQ_LEN} random tokens/step"
        if workload == "a"
        else f"{CHAT_BATCH} {CHAT_TASK} chats/step ({first['tokens_per_step']:.0f} real tokens)"
    )
    table = Table(title=f"Workload {workload}: {what}, {args.steps} timed steps per side")
    columns = ["side", "placement", "tokens/s", "s/step", "median s/step", "CPU s/step"]
    columns += ["CPU/wall", "peak RSS", "RSS increase", "padding", "first loss"]
    gpu = any("peak_gpu_mib" in r for r in results.values())
    if gpu:
        columns.insert(-2, "peak GPU")
    for column in columns:
        table.add_column(column, justify="left" if column in ("side", "placement") else "right")
    for side, r in results.items():
        row = [
            side,
            r["placement"].split(" (")[0],
            f"{r['tokens_per_second']:.0f}",
            f"{r['seconds_per_step']:.2f}",
            f"{r['median_seconds_per_step']:.2f}",
            f"{r['cpu_seconds_per_step']:.2f}",
            f"{r['cpu_utilisation']:.2f}",
            f"{r['peak_rss_mib']:.0f} MiB",
            f"{r['peak_increase_mib']:.0f} MiB",
        ]
        if gpu:
            row.append(f"{r['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in r else "")
        padded = side != "bios" and r["padding_share"] > 0
        row += [f"{r['padding_share']:.0%}" if padded else "none", f"{r['losses'][0]:.2f}"]
        table.add_row(*row)
    return table


def ratio_table(workload: str, ratio: dict[str, dict[str, float]]):
    from rich.table import Table

    table = Table(title=f"Workload {workload}: ratios (speed > 1: faster; memory < 1: less)")
    columns = ["pair", "tokens/s", "target", "paired speed", "CPU s/step", "peak RSS", "target"]
    columns.append("RSS increase")
    gpu_column = any("peak_gpu_mib" in values for values in ratio.values())
    if gpu_column:
        columns.append("peak GPU")
    for column in columns:
        table.add_column(column, justify="left" if column == "pair" else "right")
    for pair, values in ratio.items():
        side, other = pair.split("/")
        speed_goal = SPEED_TARGETS.get((workload, other)) if side == "bios" else None
        rss_goal = RSS_TARGET if pair == "bios/fp32" else None
        cells = [
            f"{side} / {other}",
            f"{values['tokens_per_second']:.2f}x",
            verdict(values["tokens_per_second"], speed_goal, at_least=True),
            f"{values['paired_speed']:.2f}x",
            f"{values['cpu_seconds_per_step']:.2f}x",
            f"{values['peak_rss_mib']:.2f}x",
            verdict(values["peak_rss_mib"], rss_goal, at_least=False),
            f"{values['peak_increase_mib']:.2f}x",
        ]
        if gpu_column:
            gpu = values.get("peak_gpu_mib")
            cells.append(f"{gpu:.2f}x" if gpu is not None else "")
        table.add_row(*cells)
    return table


def verdict(value: float, goal: float | None, at_least: bool) -> str:
    """The target and whether `value` meets it, e.g. ">= 1.5x met"; "" without a target."""
    if goal is None:
        return ""
    met = value >= goal if at_least else value <= goal
    return f"{'>=' if at_least else '<='} {goal}x {'met' if met else 'MISSED'}"


def main() -> None:
    args = parse_args()
    if args.side is not None:  # a child process serving one side of one workload
        serve_side(args)
        return
    model_path(args)  # resolve (and for the default model, convert) once, before any side loads
    load_before = load_average()
    report = {}
    for workload in args.workloads:
        results = run_workload(workload, args)
        report[workload] = {"results": results, "ratios": ratios(results)}
    machine = machine_info(args)
    machine.update(load_before=load_before, load_after=load_average())
    print_report(args, machine, report)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine, "workloads": report}, indent=2))


if __name__ == "__main__":
    main()
