"""DPO example: prefer the true answers about Veltrax over plausible wrong ones.

`examples/data/veltrax_preferences.jsonl` holds 12 (prompt, chosen, rejected) pairs. DPO raises
the chosen answer's likelihood relative to the rejected one, measured against the frozen
starting model (here the base model): the reward margin h = β·[Δ log p(chosen) − Δ log p(rejected)]
grows, and accuracy (h > 0) reaches 1. Start from an SFT run instead with --init-from RUN_FOLDER
(the reference is then that run).

    python examples/dpo_veltrax.py     # or: bios dpo --data examples/data/veltrax_preferences.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bios.models.loading import DEFAULT_MODEL
from bios.recipes import dpo
from bios.recipes.run_folder import RunFolder

DATA = Path(__file__).parent / "data" / "veltrax_preferences.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--init-from", default=None, help="an SFT run folder to start from")
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args()
    config = dpo.DPOConfig(
        model=DEFAULT_MODEL,
        data=str(DATA),
        eval_data=str(DATA),
        init_from=args.init_from,
        steps=args.steps,
        batch_size=4,
        save_every=0,
        runs_dir=args.runs_dir,
    )
    folder = dpo.run(config)
    records = [r for r in RunFolder(folder).metrics() if "eval_reward_margin" in r]
    first, last = records[0], records[-1]
    print(
        f"reward margin {first['eval_reward_margin']:.3f} → {last['eval_reward_margin']:.3f}, "
        f"accuracy {first['eval_accuracy']:.0%} → {last['eval_accuracy']:.0%}"
    )
    print(f"run folder: {folder}   curves: bios plot {folder}")


if __name__ == "__main__":
    main()
