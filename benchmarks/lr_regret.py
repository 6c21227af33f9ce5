"""LR regret: final eval loss with the learning rate Bios chooses against ×¼ … ×4 of it.

What is run: for each task of `sft_tasks.py`, `bios sweep lr` (the module
`bios.recipes.sweep`) on the default model, SmolLM2-135M-Instruct. Every setting except the
steps is what `bios sft` chooses when the user leaves it out — the LR (`get_lr` × √(batch/128),
through `recommend`), the batch and the LoRA rank for the data, the linear schedule — and the
sweep runs that LR times ×¼, ×½, ×1, ×2, ×4. The steps are fixed (--steps, default 100, the
recipe's minimum) so that the benchmark fits a CPU budget; the recipe would choose 150 (three
passes) for these 400-example sets.

    regret = final eval loss at ×1 / the lowest final eval loss of the five − 1     target ≤ 1%

The test is task D half b (docs-b: what a standard-library function does, answered with its
docstring's summary), held out from the calibration: the SmolLM2 exponent was calibrated by
`lr_calibration.py` on half a, whose modules and functions half b never shares. The synthetic
tasks (`--tasks facts reversal sums`) report how the same LR does on memorisation and
arithmetic, where the loss falls close to 0 (docs/hparams.md has those figures too).

Runs with OMP_WAIT_POLICY=PASSIVE unless set: with libgomp's default a waiting thread spins, and
on a shared 2-core machine the spinning takes CPU the other thread needs (train_throughput.py has
the measurements). The run folders and each sweep's csv/md/png go to --out.
"""

from __future__ import annotations

import argparse
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
from bios.hparams import get_lr
from bios.models.loading import DEFAULT_MODEL
from bios.recipes.sft import SFTConfig
from bios.recipes.sweep import SweepConfig, run_sweep
from bios.recipes.sweep_report import SweepResult

TARGET = 0.01


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["docs-b"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/lr-regret"))
    return parser.parse_args()


def regret(result: SweepResult) -> float:
    chosen = next(row for row in result.rows if row.default)
    return chosen.final_eval_loss / min(row.final_eval_loss for row in result.rows) - 1


def report(task: str, result: SweepResult, minutes: float) -> None:
    first = result.rows[0]
    print(
        f"\ntask {LABELS[task]}: batch {first.batch_size}, rank {first.rank}, {first.steps} steps, "
        f"chosen LR {result.default_value:.4g} ({minutes:.1f} min)"
    )
    print(f"{'multiplier':>10} {'LR':>10} {'final eval loss':>16} {'ratio to best':>14}")
    best = min(row.final_eval_loss for row in result.rows)
    for row in result.rows:
        mark = "  <- chosen" if row.default else ""
        mark += "  <- best" if row.final_eval_loss == best else ""
        print(
            f"{'×' + format(row.multiplier, 'g'):>10} {row.learning_rate:>10.3e} "
            f"{row.final_eval_loss:>16.5f} {row.final_eval_loss / best:>14.4f}{mark}"
        )
    value = regret(result)
    verdict = "meets" if value <= TARGET else "MISSES"
    print(f"regret = {value:.2%} ({verdict} the {TARGET:.0%} target)")


def main() -> int:
    args = parse_args()
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs")
    print(f"model: {DEFAULT_MODEL}, get_lr = {get_lr(DEFAULT_MODEL):.4g} (at batch 128)")
    service = ServiceClient()  # one engine for every run: the base model is loaded once
    regrets = {}
    for task in args.tasks:
        train, held_out = write_task(make_task(task, args.seed), args.out / "tasks")
        base = SFTConfig(
            model=DEFAULT_MODEL,
            data=train,
            eval_data=held_out,
            steps=args.steps,
            eval_every=args.eval_every,
            save_every=0,
            seed=args.seed,
            progress=False,
        )
        started = time.perf_counter()
        result = run_sweep(SweepConfig(base, "lr", out=str(args.out / task)), service)
        report(task, result, (time.perf_counter() - started) / 60)
        regrets[task] = regret(result)
    print(
        "\n"
        + ", ".join(f"task {LABELS[t].split(' (')[0]}: regret {r:.2%}" for t, r in regrets.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
