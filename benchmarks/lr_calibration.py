"""Calibrate the SmolLM2 learning-rate exponent P with LR sweeps on the default model.

What is run: `bios sweep lr` (the module `bios.recipes.sweep`) on each calibration task of
`sft_tasks.py`, LoRA rank 8 and batch 8 on SmolLM2-135M-Instruct (what `bios sft` chooses for
these 400-example sets; the rank moves the best LR, see docs/hparams.md), the SFT recipe's
linear schedule without warmup, a fixed number of steps, seed 0. The value in `bios.hparams`
came from the defaults (task D half a: natural-language answers, 100 steps); `--tasks facts
reversal --steps 48 --eval-every 12 --ks 3 4 5 6 --max-widenings 1` is the earlier,
synthetic-task calibration that docs/hparams.md also records.

The grid: LR = anchor × √2^k, where the anchor is the LR `bios sft` chose at batch 8 before this
calibration (the Llama exponent 0.781: 1.32e-3 × √(8/128) = 3.30e-4), so every run of this script
lands on the same grid. Each task starts at k = --ks; when its lowest final eval loss is at an
edge, two more points are added beyond it (at most three times).

Which LR wins: the best LR differs between tasks, so the one chosen is the grid point with the
smallest worst-case ratio to each task's best (minimax over the points every task ran):

    k* = argmin_k max_task loss_task(k) / min_j loss_task(j)

From batch 8 to the reference batch: `recommend` (and `bios sft`) give get_lr(model) ×
√(batch/128), so the LR that `get_lr` must return — its value at the reference batch 128 — is the
chosen LR at batch 8 × √(128/8). Then P solves get_lr = 5e-5 × 10 × (2000/576)^P:

    P = log(lr_at_128 / 5e-4) / log(2000 / 576)

Each finished point is kept in --out/<task>.json (keyed by k, with the settings), so a run that is
stopped, or asked for more tasks or points, only runs what is missing. Runs with
OMP_WAIT_POLICY=PASSIVE unless set (see train_throughput.py for why). The run folders, each
sweep's csv/md/png and calibration.json go to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads: before the imports
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from machine import cpu_name
from sft_tasks import LABELS, TASKS, make_task, write_task

from bios.client.service import ServiceClient
from bios.hparams import (
    BASE_LR,
    LORA_LR_MULTIPLIER,
    LR_EXPONENTS,
    REFERENCE_BATCH,
    REFERENCE_HIDDEN,
)
from bios.models.catalog import lookup
from bios.models.loading import DEFAULT_MODEL
from bios.recipes.sft import SFTConfig
from bios.recipes.sweep import SweepConfig, run_sweep


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lr-calibration"))
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["docs-a"])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 5, 6])
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-scale", type=int, default=1, help="× the tasks' training sets (for larger batches)"
    )
    parser.add_argument("--max-widenings", type=int, default=3, help="0: only the --ks points")
    return parser.parse_args()


def anchor_lr(hidden: int, batch: int) -> float:
    """The grid's ×1: the LR `bios sft` chose at `batch` with the Llama exponent."""
    exponent = LR_EXPONENTS["llama"]
    at_reference = BASE_LR * LORA_LR_MULTIPLIER * (REFERENCE_HIDDEN / hidden) ** exponent
    return at_reference * math.sqrt(batch / REFERENCE_BATCH)


def settings_of(args: argparse.Namespace) -> dict:
    return {
        "batch": args.batch,
        "steps": args.steps,
        "rank": args.rank,
        "seed": args.seed,
        "data_scale": args.data_scale,
    }


def load_points(path: Path, settings: dict) -> dict[int, float]:
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if saved["settings"] != settings:
        raise SystemExit(f"{path}: made with other settings {saved['settings']}; use another --out")
    return {int(k): loss for k, loss in saved["final_eval_loss"].items()}


def sweep_task(args, task: str, anchor: float, service: ServiceClient) -> dict[int, float]:
    """Final eval loss per grid point k for one task, widening at the edges."""
    path = args.out / f"{task}.json"
    points = load_points(path, settings_of(args))
    train, held_out = write_task(make_task(task, args.seed, args.data_scale), args.out / "tasks")
    base = SFTConfig(
        model=DEFAULT_MODEL,
        data=train,
        eval_data=held_out,
        batch_size=args.batch,
        steps=args.steps,
        rank=args.rank,
        eval_every=args.eval_every,
        save_every=0,
        seed=args.seed,
        progress=False,
    )
    ks = sorted(set(args.ks))
    for round_ in range(args.max_widenings + 1):
        todo = [k for k in ks if k not in points]
        if todo:
            values = [anchor * 2 ** (k / 2) for k in todo]
            sweep = SweepConfig(base, "lr", values=values, out=str(args.out / f"{task}-{todo[0]}"))
            for k, row in zip(todo, run_sweep(sweep, service).rows, strict=True):
                points[k] = row.final_eval_loss
            path.write_text(
                json.dumps({"settings": settings_of(args), "final_eval_loss": points}, indent=2)
            )
        lowest = min(points, key=points.get)
        if lowest not in (min(points), max(points)):
            break
        if round_ == args.max_widenings:
            print(f"WARNING: task {task}: the best LR is still at the edge (k = {lowest})")
            break
        ks = [lowest - 2, lowest - 1] if lowest == min(points) else [lowest + 1, lowest + 2]
        print(f"task {task}: best at the edge (k = {lowest}), widening to k = {ks}", flush=True)
    return points


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hidden = lookup(DEFAULT_MODEL).hidden_size
    anchor = anchor_lr(hidden, args.batch)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs")
    print(
        f"tasks {', '.join(LABELS[t] for t in args.tasks)}: batch {args.batch}, {args.steps} "
        f"steps, rank {args.rank}, linear schedule, seed {args.seed}; grid {anchor:.4g} × √2^k"
    )
    service = ServiceClient()  # one engine: the base model is loaded once for every sweep
    started = time.perf_counter()
    losses = {task: sweep_task(args, task, anchor, service) for task in args.tasks}
    minutes = (time.perf_counter() - started) / 60

    best = {task: min(points.values()) for task, points in losses.items()}
    every_k = sorted(set().union(*losses.values()))
    shared = [k for k in every_k if all(k in points for points in losses.values())]
    worst = {k: max(losses[t][k] / best[t] for t in args.tasks) for k in shared}
    chosen_k = min(worst, key=worst.get)
    header = " | ".join(f"task {LABELS[t]}: eval loss (÷ best)" for t in args.tasks)
    print(f"\n| k | LR (batch {args.batch}) | {header} | worst ratio |")
    print("|---|---|" + "---|" * len(args.tasks) + "---|")
    for k in every_k:
        cells = []
        for task in args.tasks:
            loss = losses[task].get(k)
            cells.append("—" if loss is None else f"{loss:.4f} ({loss / best[task]:.3f})")
        mark = f"{worst[k]:.3f}" if k in worst else "—"
        mark += " **chosen**" if k == chosen_k else ""
        print(f"| {k} | {anchor * 2 ** (k / 2):.3e} | {' | '.join(cells)} | {mark} |")
    chosen = anchor * 2 ** (chosen_k / 2)
    at_reference = chosen * math.sqrt(REFERENCE_BATCH / args.batch)
    exponent = math.log(at_reference / (BASE_LR * LORA_LR_MULTIPLIER)) / math.log(
        REFERENCE_HIDDEN / hidden
    )
    print(f"\nchosen LR at batch {args.batch}: {chosen:.4g} (k = {chosen_k}, minimax over tasks)")
    print(f"at the reference batch 128: {chosen:.4g} × √(128/{args.batch}) = {at_reference:.4g}")
    print(f"P = log({at_reference:.4g} / 5e-4) / log(2000/{hidden}) = {exponent:.4f}")
    print(f"time: {minutes:.1f} min (points already in --out were not run again)")
    summary = {
        "machine": cpu_name(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **settings_of(args),
        "anchor_lr": anchor,
        "final_eval_loss": losses,
        "chosen_k": chosen_k,
        "chosen_lr_at_batch": chosen,
        "lr_at_reference": at_reference,
        "exponent": exponent,
    }
    (args.out / "calibration.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
