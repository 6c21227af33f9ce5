"""Record the metric streams `tests/test_diagnostics.py` checks `bios doctor` against: real SFT
runs, not synthetic curves. Re-run to regenerate (`cd tests && ../.venv/bin/python
data/record_health_streams.py`); each stream is the run's metrics.jsonl, copied as it was written.

    overfitting 100 chat conversations (task E of benchmarks/sft_tasks.py) with their 28 held-out
                ones, 100 steps at batch 8 (8 passes: the old 100-step floor) at ½ the chosen LR,
                early stop off (issue 16's run): the eval loss climbs from step 30, the train loss
                falls to 0.05
    memorising  32 of those conversations (4 steps a pass), 60 steps (15 passes) at the chosen
                LR, constant: the train loss reaches a few hundredths of a nat and wobbles there
                for 30 steps while the eval loss climbs — the stream where the raw-ratio health
                check said "divergence"
    diverging   the 100 conversations at 30× the chosen LR, 30 steps
    recipe      the same data at the defaults `bios sft` chooses (38 steps, 3 passes), early
                stop off: healthy, but its third pass lifts the eval loss 2.5% over its best
    half-lr     the same at ½ the chosen LR: healthy throughout

The last two are the runs `benchmarks/lr_regret.py` makes for task E at ×1 and ×½ (its sweep runs
every LR with early stop off, the same data, seed and settings), so the files there were copied
from its run folders; this script makes the same runs.

On the tiny Llama of tests/tiny_models.py (`--model tiny`, seconds) or the default model
(`--model default`, SmolLM2-135M-Instruct, minutes on a CPU): the files are named
<model>-<kind>.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent / "benchmarks")]

from sft_tasks import make_task, write_task  # noqa: E402

from bios.client.service import ServiceClient  # noqa: E402
from bios.hparams import DatasetStats, recommend  # noqa: E402
from bios.models.loading import DEFAULT_MODEL  # noqa: E402
from bios.recipes import sft  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

KINDS = {
    # kind: (training examples, LR multiplier, steps (None: the recipe's), schedule)
    "overfitting": (100, 0.5, 100, "linear"),
    "memorising": (32, 1.0, 60, "constant"),
    "diverging": (100, 30.0, 30, "linear"),
    "recipe": (100, 1.0, None, "linear"),
    "half-lr": (100, 0.5, None, "linear"),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("tiny", "default"), default="tiny")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bios-streams-"))
    os.environ["BIOS_HOME"] = str(work / "home")
    model = DEFAULT_MODEL if args.model == "default" else str(make_tiny_model("llama", work / "m"))
    full = make_task("chat", 0)
    service = ServiceClient()
    for kind in args.kinds:
        size, multiplier, steps, schedule = KINDS[kind]
        task = dataclasses.replace(full, name=f"chat{size}", train=full.train[:size])
        train, held_out = write_task(task, work / "tasks")
        # The LR `bios sft` picks for 100 examples (batch 8), times the factor (32 get batch 8 too).
        lr = recommend(model, DatasetStats(100, 1)).learning_rate * multiplier
        config = sft.SFTConfig(
            model=model,
            data=train,
            eval_data=held_out,
            learning_rate=lr,
            lr_schedule=schedule,
            steps=steps,
            early_stop=0,
            save_every=0,
            seed=0,
            progress=False,
            name=kind,
            runs_dir=str(work / "runs"),
        )
        folder = sft.run(config, service)
        target = HERE / f"{args.model}-{kind}.jsonl"
        shutil.copyfile(folder / "metrics.jsonl", target)
        print(f"{kind}: LR {lr:.4g} → {target}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
