"""What a custom objective costs compared with a built-in one, on the default model.

One LoRA rank-32 run on SmolLM2-135M-Instruct; the same batch (8 sequences x 256 tokens) goes
through, in turn:

  builtin    forward_backward(data, "cross_entropy")
  custom     forward_backward_custom(data, fn) with fn computing the same loss
  two-pass   the way a remote SDK has to do it: forward(), the loss and its gradient with respect
             to the logprobs on the client, then forward_backward with weights = -dL/dlogprobs
             (the 1.5x-FLOPs anchor the custom path is measured against)
  dpo        forward_backward(pairs, "dpo") on 4 (chosen, rejected) pairs of the same tokens,
             with the reference logprobs computed from the base model (one extra no-grad forward)

Each variant runs `--repeats` times, interleaved, after one warm-up; the table shows the median
seconds per call and the ratio to builtin. Gradients are cleared between calls (no optim_step, so
every call sees the same weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from machine import cpu_name

import bios
from bios.models.loading import DEFAULT_MODEL
from bios.objectives.custom import linearised
from bios.types import Datum, ModelInput


def make_batch(vocab: int, count: int, length: int, seed: int = 0) -> list[Datum]:
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (length + 1,), generator=generator)
        data.append(
            Datum(
                model_input=ModelInput.from_ints(tokens[:-1].tolist()),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": torch.ones(length)},
            )
        )
    return data


def custom_cross_entropy(data, logprobs_list):
    loss = sum(
        -(lp * d.loss_fn_inputs["weights"].to_torch()).sum()
        for d, lp in zip(data, logprobs_list, strict=True)
    )
    return loss, {}


def two_pass(training: bios.TrainingClient, data: list[Datum]) -> None:
    """Forward, client-side loss gradient, then a linearised forward_backward (SDK style)."""
    forward = training.forward(data, "cross_entropy").result()
    logprobs = [
        out["logprobs"].to_torch().clone().requires_grad_(True) for out in forward.loss_fn_outputs
    ]
    loss, _ = custom_cross_entropy(data, logprobs)
    loss.backward()
    training.forward_backward(linearised(data, logprobs), "cross_entropy").result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()

    training = bios.ServiceClient().create_lora_training_client(DEFAULT_MODEL, rank=32, seed=0)
    vocab = len(training.get_tokenizer())
    data = make_batch(vocab, args.batch, args.length)
    run = training._engine.run(training.model_id)

    variants = {
        "builtin": lambda: training.forward_backward(data, "cross_entropy").result(),
        "custom": lambda: training.forward_backward_custom(data, custom_cross_entropy).result(),
        "two-pass": lambda: two_pass(training, data),
        "dpo": lambda: training.forward_backward(data, "dpo").result(),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats + 1):
        for name, call in variants.items():
            started = time.perf_counter()
            call()
            elapsed = time.perf_counter() - started
            run.optimizer.zero_grad(set_to_none=True)
            if repeat > 0:  # the first round is a warm-up
                times[name].append(elapsed)

    cpu = cpu_name()
    print(
        f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"model: {DEFAULT_MODEL}, LoRA rank 32, batch {args.batch} x {args.length} tokens, "
        f"median of {args.repeats}"
    )
    builtin = statistics.median(times["builtin"])
    print(f"{'variant':10s} {'s/call':>8s} {'vs builtin':>11s}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:10s} {median:8.3f} {median / builtin:10.2f}x")


if __name__ == "__main__":
    main()
