"""Regret of the whole default recipe: what `bios sft` keeps against the best an LR sweep reaches.

What is run, for each task of `sft_tasks.py` on the default model (SmolLM2-135M-Instruct):

    the default   `bios sft --data TRAIN --eval EVAL` and nothing else: the LR, batch, LoRA rank
                  and steps `bios sft` chooses, evals every ~1/10 of the run, early stop after 3
                  evals without improvement; its result is the kept checkpoint (lowest eval loss)
    the sweep     `bios sweep lr --multipliers ...` at the same defaults but `--early-stop 0`,
                  so every LR runs its whole schedule: its final eval losses are the baselines

    regret            = result eval loss of the default / min over the sweep of final eval loss − 1
    regret vs reached = result eval loss of the default / min over every eval of every run − 1

Target: regret ≤ 1%. The tasks (`--tasks`, default `chat explain`) were never seen by the LR
calibration (task D half a): E (chat: 100 short one- or two-turn answers about HTTP and errno
codes) and F (explain: 1,000 longer explanations from installed packages' docstrings); D half b
(docs-b, the calibration's held-out half) and the synthetic tasks can be added.

CPU budget: a task's runs can be cut to `--cap TASK=STEPS` steps (default `explain=24`: the recipe
would run 188, three passes over 1,000 examples, about an hour a run on 2 shared cores) and its
eval set to `--eval-cap TASK=N` examples (default `explain=32` of its 64); a capped task keeps
every other default, and the report says it was capped. Three multipliers (×½ ×1 ×2) by default,
not five, for the same reason. When the default run did not stop early it is the ×1 run of the
sweep — the same settings but early_stop, which never acted, and the same seed, on an engine that
computes the same numbers for the same inputs — so the sweep runs only the other multipliers
(`--rerun-default-lr` runs it anyway).

Runs with OMP_WAIT_POLICY=PASSIVE unless set (train_throughput.py has why). The run folders, each
sweep's csv/md/png and regret.json go to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from bios.hparams import get_lr
from bios.models.loading import DEFAULT_MODEL
from bios.recipes import sft
from bios.recipes.run_folder import RunFolder
from bios.recipes.sweep import SweepConfig, run_sweep
from bios.recipes.sweep_report import SweepResult

TARGET = 0.01
DEFAULT_CAPS = {"explain": 24}
DEFAULT_EVAL_CAPS = {"explain": 32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["chat", "explain"])
    parser.add_argument("--multipliers", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    parser.add_argument(
        "--cap",
        nargs="*",
        default=[f"{t}={s}" for t, s in DEFAULT_CAPS.items()],
        metavar="TASK=STEPS",
        help="run TASK for STEPS steps instead of the recipe's choice (CPU budget)",
    )
    parser.add_argument(
        "--eval-cap",
        nargs="*",
        default=[f"{t}={n}" for t, n in DEFAULT_EVAL_CAPS.items()],
        metavar="TASK=N",
        help="evaluate TASK on the first N of its eval examples (CPU budget)",
    )
    parser.add_argument("--rerun-default-lr", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/lr-regret"))
    args = parser.parse_args()
    args.caps = task_numbers(parser, "--cap", args.cap)
    args.eval_caps = task_numbers(parser, "--eval-cap", args.eval_cap)
    return args


def task_numbers(parser: argparse.ArgumentParser, flag: str, items: list[str]) -> dict[str, int]:
    numbers = {}
    for item in items:
        task, _, number = item.partition("=")
        if task not in TASKS or not number.isdigit() or int(number) < 1:
            parser.error(f"{flag}: expected TASK=N with a known task, got {item!r}")
        numbers[task] = int(number)
    return numbers


def run_summary(folder: Path) -> dict:
    """From a run folder: its settings, eval curve, final eval loss and kept result."""
    run = RunFolder(folder)
    config = run.saved_config() or {}
    evals = [(r["step"], r["eval_loss"]) for r in run.metrics() if "eval_loss" in r]
    best = run.best_checkpoint()
    last_step = max(r["step"] for r in run.metrics())
    return {
        "run": str(folder),
        "learning_rate": config["learning_rate"],
        "batch_size": config["batch_size"],
        "rank": config["rank"],
        "steps": config["steps"],
        "steps_run": last_step,
        "eval_every": config["eval_every"],
        "early_stop": config["early_stop"],
        "evals": evals,
        "final_eval_loss": evals[-1][1],
        "lowest_eval_loss": min(loss for step, loss in evals if step > 0),
        "result_step": best["step"] if best else None,
        "result_eval_loss": best.get("eval_loss") if best else None,
    }


def measure(task: str, args: argparse.Namespace, service: ServiceClient) -> dict:
    made = make_task(task, args.seed)
    if task in args.eval_caps:
        made = dataclasses.replace(made, eval=made.eval[: args.eval_caps[task]])
    train, held_out = write_task(made, args.out / "tasks")
    cap = args.caps.get(task)
    common = dict(
        model=DEFAULT_MODEL,
        data=train,
        eval_data=held_out,
        steps=cap,
        save_every=0,
        seed=args.seed,
        progress=False,
        runs_dir=str(args.out / task),
    )
    started = time.perf_counter()
    default = run_summary(sft.run(sft.SFTConfig(**common, name="default"), service))
    minutes_default = (time.perf_counter() - started) / 60
    sweep_config = sft.SFTConfig(**common, early_stop=0)
    reuse = default["steps_run"] == default["steps"] and not args.rerun_default_lr
    multipliers = [m for m in args.multipliers if not (reuse and m == 1.0)]
    sweep: SweepResult = run_sweep(
        SweepConfig(sweep_config, "lr", multipliers=multipliers, out=str(args.out / task)),
        service,
    )
    rows = []
    for row in sweep.rows:
        summary = run_summary(Path(row.run))
        rows.append({"multiplier": row.multiplier, **summary})
    if reuse and 1.0 in args.multipliers:
        rows.append({"multiplier": 1.0, **default, "the_default_run": True})
        rows.sort(key=lambda r: r["multiplier"])
    minutes = (time.perf_counter() - started) / 60
    best_final = min(r["final_eval_loss"] for r in rows if math.isfinite(r["final_eval_loss"]))
    reached = min([default["lowest_eval_loss"], *(r["lowest_eval_loss"] for r in rows)])
    result = default["result_eval_loss"]
    return {
        "task": task,
        "label": LABELS[task],
        "capped_steps": cap,
        "default": default,
        "sweep": rows,
        "best_final_eval_loss": best_final,
        "lowest_eval_loss_reached": reached,
        "regret": result / best_final - 1,
        "regret_vs_reached": result / reached - 1,
        "minutes": minutes,
        "minutes_default": minutes_default,
        "default_run_is_the_x1_run": reuse,
        "eval_examples": len(made.eval),
    }


def report(found: dict) -> None:
    d = found["default"]
    capped = f", CAPPED at {found['capped_steps']} steps" if found["capped_steps"] else ""
    capped += f", {found['eval_examples']} eval examples"
    print(
        f"\ntask {found['label']}: batch {d['batch_size']}, rank {d['rank']}, {d['steps']} "
        f"steps{capped}, eval every {d['eval_every']}, chosen LR {d['learning_rate']:.4g} "
        f"({found['minutes']:.1f} min)"
    )
    print(
        f"  default recipe: ran {d['steps_run']} of {d['steps']} steps (early stop "
        f"{d['early_stop']}); result = step {d['result_step']}, eval loss "
        f"{d['result_eval_loss']:.5f}"
    )
    print(f"{'multiplier':>10} {'LR':>10} {'final eval':>11} {'lowest eval (step)':>20}")
    if found["default_run_is_the_x1_run"]:
        print("  (no early stop: the default run is the sweep's ×1 run)")
    for row in found["sweep"]:
        lowest_step = min((s for s, v in row["evals"] if v == row["lowest_eval_loss"] and s > 0))
        print(
            f"{'×' + format(row['multiplier'], 'g'):>10} {row['learning_rate']:>10.3e} "
            f"{row['final_eval_loss']:>11.5f} {row['lowest_eval_loss']:>12.5f} ({lowest_step:>4})"
        )
    for name, key in (("regret", "regret"), ("regret vs lowest reached", "regret_vs_reached")):
        value = found[key]
        verdict = "meets" if value <= TARGET else "MISSES"
        print(f"{name} = {value:.2%} ({verdict} the {TARGET:.0%} target)")


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs")
    print(f"model: {DEFAULT_MODEL}, get_lr = {get_lr(DEFAULT_MODEL):.4g} (at batch 128)")
    print(f"multipliers: {' '.join(f'×{m:g}' for m in args.multipliers)}; caps: {args.caps}")
    service = ServiceClient()  # one engine for every run: the base model is loaded once
    results = []
    for task in args.tasks:
        found = measure(task, args, service)
        report(found)
        results.append(found)
        (args.out / "regret.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| task | steps | result (step) | best final of the sweep | regret | vs lowest |")
    print("|---|---|---|---|---|---|")
    for found in results:
        d = found["default"]
        steps = f"{d['steps_run']}/{d['steps']}" + (" (capped)" if found["capped_steps"] else "")
        print(
            f"| {found['label']} | {steps} | {d['result_eval_loss']:.4f} ({d['result_step']}) "
            f"| {found['best_final_eval_loss']:.4f} | {found['regret']:.2%} "
            f"| {found['regret_vs_reached']:.2%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
