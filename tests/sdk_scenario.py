"""One training scenario, run either with the official `tinker` SDK against `bios serve` or with
Bios's own client, printing the numbers as JSON so the two runs can be compared.

    python sdk_scenario.py tinker BASE_URL MODEL     # the official SDK over HTTP
    python sdk_scenario.py bios   HOME     MODEL     # Bios's embedded engine

Data come from a fixed numpy seed, so both runs see the same tokens.
"""

from __future__ import annotations

import json
import sys
import urllib.request

import numpy as np

LOSSES = {
    "cross_entropy": None,
    "importance_sampling": None,
    "ppo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "cispo": None,
    "dro": {"beta": 0.1},
}


def make_data(types, vocab: int, loss_fn: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    data = []
    for length in (6, 9):
        tokens = rng.integers(0, vocab, length + 1)
        inputs = {"target_tokens": types.TensorData.from_numpy(tokens[1:].astype(np.int64))}
        if loss_fn == "cross_entropy":
            inputs["weights"] = types.TensorData.from_numpy(rng.random(length).astype(np.float32))
        else:
            sampler = (-6.0 + 0.3 * rng.standard_normal(length)).astype(np.float32)
            inputs["logprobs"] = types.TensorData.from_numpy(sampler)
            inputs["advantages"] = types.TensorData.from_numpy(
                rng.standard_normal(length).astype(np.float32)
            )
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1].tolist()), loss_fn_inputs=inputs
            )
        )
    return data


def custom_loss(data, logprobs_list):
    import torch

    loss = sum(
        -(lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum()
        for d, lp in zip(data, logprobs_list, strict=True)
    )
    return loss, {"custom:sum": 1.0}


def logprobs_of(output) -> list[list[float]]:
    return [[float(x) for x in out["logprobs"].data] for out in output.loss_fn_outputs]


def scenario(service, types, model: str, rest=None) -> dict:
    results: dict = {}
    training = service.create_lora_training_client(base_model=model, rank=4, seed=7)
    vocab = 384
    for loss_fn, config in LOSSES.items():
        out = training.forward(make_data(types, vocab, loss_fn), loss_fn, config).result()
        results[f"forward/{loss_fn}"] = {
            "loss": out.metrics["loss:sum"],
            "logprobs": logprobs_of(out),
        }
    adam = types.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)
    sft = make_data(types, vocab, "cross_entropy", seed=1)
    for step in range(2):
        fb = training.forward_backward(sft, "cross_entropy")
        opt = training.optim_step(adam)
        results[f"step{step}"] = {
            "loss": fb.result().metrics["loss:sum"],
            "grad_norm": opt.result().metrics.get("grad_norm"),
        }
    custom = training.forward_backward_custom(sft, custom_loss).result()
    results["custom"] = {"loss": custom.metrics["loss:sum"], "logprobs": logprobs_of(custom)}
    training.optim_step(adam).result()
    after = training.forward(sft, "cross_entropy").result()
    results["after_custom_step"] = logprobs_of(after)

    path = training.save_state("ckpt").result().path
    results["path_kind"] = path.split("/")[-2]
    restored = service.create_training_client_from_state_with_optimizer(path)
    results["restored"] = logprobs_of(restored.forward(sft, "cross_entropy").result())
    training.load_state(path).result()

    sampler = training.save_weights_and_get_sampling_client()
    if type(sampler).__name__ != "SamplingClient":  # SDK >= 0.38 returns a future of it
        sampler = sampler.result()
    prompt = types.ModelInput.from_ints([5, 17, 42, 9])
    greedy = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0)).result()
    results["greedy"] = [int(t) for t in greedy.sequences[0].tokens]
    seeded = sampler.sample(
        prompt, 2, types.SamplingParams(max_tokens=5, temperature=1.0, seed=3)
    ).result()
    results["sampled_logprobs"] = [[float(x) for x in s.logprobs] for s in seeded.sequences]
    results["sampled_tokens"] = [[int(t) for t in s.tokens] for s in seeded.sequences]
    results["compute_logprobs"] = [
        None if x is None else float(x) for x in sampler.compute_logprobs(prompt).result()
    ]
    if rest is not None:
        run_id = path.split("://", 1)[1].split("/")[0]
        listed = rest.list_checkpoints(run_id).result()
        results["checkpoints"] = sorted(c.checkpoint_id for c in listed.checkpoints)
        if hasattr(rest, "get_checkpoint_archive_url"):
            url = rest.get_checkpoint_archive_url(run_id, "weights/ckpt").result().url
            with urllib.request.urlopen(url) as response:
                results["archive_bytes"] = len(response.read())
    return results


def main() -> None:
    mode, where, model = sys.argv[1:4]
    if mode == "tinker":
        import tinker
        from tinker import types

        service = tinker.ServiceClient(base_url=where, api_key="tml-bios-conformance")
        results = scenario(service, types, model, rest=service.create_rest_client())
        results["sdk_version"] = tinker.__version__ if hasattr(tinker, "__version__") else "?"
    else:
        from pathlib import Path

        import bios
        from bios import types
        from bios.engine.engine import Engine

        service = bios.ServiceClient(engine=Engine(home=Path(where)))
        results = scenario(service, types, model)
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
