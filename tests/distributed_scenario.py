"""The same training session run in one process (in the test) and on 2 ranks (`bios launch`).

    python -m bios.launch tests/distributed_scenario.py MODEL OUT [CONTINUE_LORA CONTINUE_FULL]
    python -m bios.launch tests/distributed_scenario.py kill MODEL OUT READY GO

runs `scenario` against `ServiceClient()` — a DistributedEngine under N ranks — and writes its
results (losses, per-datum logprobs, metrics, samples, checkpoint paths) to OUT with torch.save.
With two more checkpoint paths it also continues each of them for one step (they were saved by
the other side: one process → N ranks). In `kill` mode it waits for the test to kill a rank.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from bios.client.service import ServiceClient
from bios.errors import InvalidInputError
from bios.types import AdamParams, Datum, ModelInput, SamplingParams

# A realistic fine-tuning step size: with much larger ones (1e-2), Adam's normalisation turns the
# float rounding of a batch computed in other shapes (whole, or split over ranks — or split into
# accumulated halves in one process) into weight differences above 1e-5 within 3 steps.
ADAM = AdamParams(learning_rate=1e-4, weight_decay=0.1, grad_clip_norm=150.0)
VOCAB = 384


def datum(length: int, seed: int, **extra: list[float]) -> Datum:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (length + 1,), generator=generator)
    inputs = {"target_tokens": tokens[1:], "weights": torch.rand(length, generator=generator)}
    inputs.update({k: torch.tensor(v) for k, v in extra.items()})
    return Datum(model_input=ModelInput.from_ints(tokens[:-1].tolist()), loss_fn_inputs=inputs)


# 5 data of different lengths: 2 ranks get uneven shares.
BATCH = [datum(5 + 4 * i, seed=i) for i in range(5)]
PAIRS = [datum(6 + i, seed=100 + i) for i in range(6)]  # 3 DPO pairs; one straddles the ranks


def _fb(result) -> dict:
    return {
        "loss": result.metrics["loss:sum"],
        "metrics": dict(result.metrics),
        "logprobs": [o["logprobs"].to_torch() for o in result.loss_fn_outputs],
    }


def coupled_loss(data, logprobs):
    """A custom loss that couples every datum (so a split batch must be joined to compute it)."""
    sums = torch.stack([lp.sum() for lp in logprobs])
    return -(sums.softmax(0) * sums).sum(), {"spread:mean": float(sums.detach().std())}


def rejected_custom_loss(service: ServiceClient, client) -> dict:
    """A custom loss that returns NaN is rejected (rank 0 tells the other ranks before anyone
    runs a backward pass): the error names it, and no rank's state changed."""
    run = service._engine.run(client.model_id)
    before = run.fingerprint()
    try:
        client.forward_backward_custom(
            BATCH, lambda data, lp: (lp[0].sum() * float("nan"), {})
        ).result()
        message = None
    except InvalidInputError as error:
        message = str(error)
    return {"message": message, "unchanged": run.fingerprint() == before}


def train(client, steps: int = 3) -> list[dict]:
    record = []
    for _ in range(steps):
        forward = client.forward_backward(BATCH, "cross_entropy")
        step = client.optim_step(ADAM)
        record.append({**_fb(forward.result()), "grad_norm": step.result().metrics["grad_norm"]})
    return record


def scenario(service: ServiceClient, model: str) -> dict:
    out: dict = {}
    lora = service.create_lora_training_client(model, rank=8, seed=3)
    out["lora"] = train(lora)
    out["lora_path"] = lora.save_state("lora3").result().path
    # Fewer data than ranks: one rank idles.
    out["lora_one"] = _fb(lora.forward(BATCH[:1], "cross_entropy").result())
    out["dpo"] = _fb(lora.forward(PAIRS, "dpo").result())  # the base model as the reference
    combined = [("cross_entropy", 1.0), ("kl", 0.1)]
    out["combined"] = _fb(lora.forward_backward(BATCH, combined).result())
    out["rejected"] = rejected_custom_loss(service, lora)
    out["custom"] = _fb(lora.forward_backward_custom(BATCH, coupled_loss).result())
    out["after_custom"] = lora.optim_step(ADAM).result().metrics["grad_norm"]
    # A saved adapter as the reference: sent to every rank once.
    out["dpo_ref"] = _fb(lora.forward(PAIRS, "dpo", reference=out["lora_path"]).result())
    sampler = lora.save_weights_and_get_sampling_client("lora-sampler")
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=7)
    # Two requests queued together are decoded as one batch of 5 + 2 rows, split 4/3.
    first = sampler.sample(ModelInput.from_ints([1, 5, 9]), 5, params, include_prompt_logprobs=True)
    second = sampler.sample(ModelInput.from_ints([7, 3]), 2, params.model_copy(update={"seed": 8}))
    out["samples"] = [_samples(first.result()), _samples(second.result())]
    base = service.create_sampling_client(base_model=model)
    out["base_samples"] = _samples(base.sample(ModelInput.from_ints([4, 4]), 3, params).result())

    full = service.create_full_training_client(model)
    # What the memory check counts for a step's gradients: on several ranks, this rank's shards.
    full_run = service._engine.run(full.model_id)
    out["full_gradient_bytes"] = full_run.gradient_bytes()
    local = getattr(full_run, "local", full_run)  # rank 0's own run behind a LeaderRun
    out["full_shapes"] = [tuple(param.shape) for param in local.parameters.values()]
    out["full"] = train(full)
    out["full_path"] = full.save_state("full3").result().path
    out["full_one"] = _fb(full.forward_backward(BATCH[:1], "cross_entropy").result())
    out["full_generate"] = full.generate([1, 5, 9], 4).result()
    snapshot = full.save_weights_and_get_sampling_client("full-sampler")
    out["full_samples"] = _samples(
        snapshot.sample(ModelInput.from_ints([2, 4]), 3, params).result()
    )
    # A session on saved full weights: rank 0 reads them and sends them to the other ranks.
    path = full.save_weights_for_sampler("full-saved").result().path
    saved = service.create_sampling_client(model_path=path)
    out["saved_samples"] = _samples(saved.sample(ModelInput.from_ints([2, 4]), 3, params).result())
    return out


def _samples(response) -> dict:
    return {
        "sequences": [(s.tokens, s.logprobs) for s in response.sequences],
        "prompt_logprobs": response.prompt_logprobs,
    }


def train_in_shares(service: ServiceClient, model: str) -> dict:
    """One process doing what 2 ranks do: the two shares of BATCH (data[:3], data[3:]; see
    `bios.distributed.step.split_ranges`) accumulated, then the step; the saved paths."""
    paths = {}
    lora = service.create_lora_training_client(model, rank=8, seed=3)
    full = service.create_full_training_client(model)
    for kind, client in (("lora", lora), ("full", full)):
        for _ in range(3):
            client.forward_backward(BATCH[:3], "cross_entropy")
            client.forward_backward(BATCH[3:], "cross_entropy")
            client.optim_step(ADAM).result()
        paths[kind] = client.save_state(f"{kind}-shares").result().path
    return paths


def continue_from(service: ServiceClient, lora_path: str, full_path: str) -> dict:
    """Load each checkpoint with its optimizer state and train one more step."""
    out = {}
    for kind, path in (("lora", lora_path), ("full", full_path)):
        client = service.create_training_client_from_state_with_optimizer(path)
        out[kind] = train(client, steps=1)
        out[f"{kind}_path"] = client.save_state(f"{kind}-continued").result().path
    return out


def until_killed(service: ServiceClient, model: str, ready: str, go: str) -> dict:
    """Train a step, say so (`ready`), wait for the test to kill another rank (`go`), then
    send a request: it must fail with a clear error, soon."""
    client = service.create_lora_training_client(model, rank=4, seed=1)
    client.forward_backward(BATCH, "cross_entropy").result()
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.05)
    start = time.monotonic()
    try:
        client.forward_backward(BATCH, "cross_entropy").result()
        error = None
    except Exception as failure:
        error = f"{type(failure).__name__}: {failure}"
    return {"error": error, "seconds": time.monotonic() - start}


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "kill":
        _, model, target, ready, go = sys.argv[1:]
        torch.save(until_killed(ServiceClient(), model, ready, go), target)
        sys.exit(0)
    model, target, *continue_paths = sys.argv[1:]
    service = ServiceClient()
    results = {"scenario": scenario(service, model)}
    if continue_paths:
        results["continued"] = continue_from(service, *continue_paths)
    engine = service._engine
    if hasattr(engine, "replica_fingerprints"):
        lora_run = results["scenario"]["lora_path"].split("/")[2]
        results["replicas"] = engine.replica_fingerprints(lora_run)
    torch.save(results, target)
