"""Distillation example: pass what a fine-tuned teacher knows about Veltrax to a fresh student.

The teacher is an SFT run on `examples/data/veltrax.jsonl` (trained here first unless you pass
--teacher RUN_FOLDER, e.g. the folder `make demo` printed). The student — the base model with a
new LoRA adapter — answers the questions of `examples/data/veltrax_questions.jsonl`, the teacher
scores every token it wrote, and the student moves toward what the teacher would have written:
the reverse KL to the teacher (`teacher_kl`) falls.

    python examples/distill_veltrax.py --teacher runs/demo-...   # or: bios distill --teacher ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bios.models.loading import DEFAULT_MODEL
from bios.recipes import distill, sft
from bios.recipes.run_folder import RunFolder

DATA = Path(__file__).parent / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="a run folder or bios:// path (default: train one)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--teacher-steps", type=int, default=24)
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args()
    teacher = args.teacher
    if teacher is None:
        print("Training the teacher (SFT on veltrax.jsonl) ...")
        teacher = str(
            sft.run(
                sft.SFTConfig(
                    model=DEFAULT_MODEL,
                    data=str(DATA / "veltrax.jsonl"),
                    steps=args.teacher_steps,
                    batch_size=8,
                    learning_rate=1e-3,
                    lr_schedule="constant",
                    save_every=0,
                    runs_dir=args.runs_dir,
                )
            )
        )
    config = distill.DistillConfig(
        model=DEFAULT_MODEL,
        teacher=teacher,
        data=str(DATA / "veltrax_questions.jsonl"),
        steps=args.steps,
        batch_size=4,
        group_size=4,
        max_tokens=24,
        save_every=0,
        runs_dir=args.runs_dir,
    )
    folder = distill.run(config)
    kl = [r["teacher_kl"] for r in RunFolder(folder).metrics() if "teacher_kl" in r]
    print(f"KL to the teacher per token: {kl[0]:.3f} (first step) → {kl[-1]:.3f} (last step)")
    print(f"run folder: {folder}   curves: bios plot {folder}")


if __name__ == "__main__":
    main()
