"""Test helpers: random data for each objective, reference logprobs, state fingerprints, a LoRA
step with what autograd saved."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import torch

from bios.engine.batch import pack_batch, resolve_objective
from bios.engine.forward import target_logprobs
from bios.engine.runs import TrainingRun
from bios.models.lora import AdapterHost, LoRAAdapter
from bios.types import Datum, LoraConfig, ModelInput


def random_datum(
    vocab: int, length: int, loss_fn: str, generator: torch.Generator, **extra: torch.Tensor
) -> Datum:
    """A datum of `length` random tokens with every input `loss_fn` needs."""
    tokens = torch.randint(0, vocab, (length + 1,), generator=generator)
    inputs: dict[str, torch.Tensor] = {"target_tokens": tokens[1:]}
    if loss_fn == "cross_entropy":
        inputs["weights"] = torch.rand(length, generator=generator)
    else:
        # Near a tiny random model's own logprobs (about -log 384), as a sampler's would be, so
        # ratios spread around 1 and both PPO clip bounds are exercised.
        inputs["logprobs"] = -6.0 + 0.3 * torch.randn(length, generator=generator)
        inputs["advantages"] = torch.randn(length, generator=generator)
    inputs.update(extra)
    return Datum(model_input=ModelInput.from_ints(tokens[:-1].tolist()), loss_fn_inputs=inputs)


def reference_logprobs(model: torch.nn.Module, datum: Datum) -> torch.Tensor:
    """log_softmax of a plain transformers forward of one datum, gathered at its targets."""
    input_ids = torch.tensor([datum.model_input.to_ints()])
    logits = model(input_ids=input_ids).logits[0].float()
    targets = datum.loss_fn_inputs["target_tokens"].to_torch()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]


def state_fingerprint(run: TrainingRun) -> str:
    """A hash of the run's weights, accumulated gradients and optimizer state."""
    return run.fingerprint()


def future_result(client, response) -> dict:
    """The result of an accepted request to an in-process server (FastAPI's TestClient):
    `retrieve_future` polled until it is done; a failure or an error answer fails the test."""
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = client.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
        if answer.get("type") != "try_again":
            assert "error" not in answer, answer
            return answer
    raise TimeoutError(request_id)


def peak_allocated(fn) -> int:
    """The most CPU memory in tensors that `fn()` had allocated at once, above what was allocated
    when it began: the allocator's own events, as torch.profiler records them (every tensor
    allocated and freed, saved for the backward or not)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative where a block is freed
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def saved_storages(held: Iterable[torch.Tensor]) -> Iterator[dict[int, int]]:
    """Inside the block, the distinct storages autograd saves for the backward (address ->
    bytes), leaving out those of `held` (the weights, which are held anyway)."""
    skip = {tensor.untyped_storage().data_ptr() for tensor in held}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield seen


def lora_step(
    model: torch.nn.Module,
    checkpoint_layers: bool = False,
    seed: int = 0,
    lengths: tuple[int, ...] = (60, 30, 90, 45),
) -> tuple:
    """A LoRA r4 forward + backward of packed random data (of a 384-token vocabulary): (logprobs,
    gradients by factor, bytes of the distinct storages autograd saved, tokens computed)."""
    host = AdapterHost(model)
    adapter = LoRAAdapter.for_model(model, LoraConfig(rank=4, seed=seed))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B: the adapters change every projection's output
        for _name, factor, param in adapter.named_factors():
            if factor == "lora_B":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    data = [random_datum(384, n, "cross_entropy", generator) for n in lengths]
    batch = pack_batch(data, resolve_objective("cross_entropy"), 384, 1 << 20)
    coefficients = torch.randn(batch.num_tokens, generator=generator)
    try:
        held = [*model.parameters(), *adapter.parameters()]
        with host.use(adapter), saved_storages(held) as seen:
            logprobs = target_logprobs(model, batch, checkpoint_layers=checkpoint_layers)
            (logprobs * coefficients).sum().backward()
    finally:
        host.remove()
    grads = {f"{name}.{factor}": param.grad for name, factor, param in adapter.named_factors()}
    return logprobs.detach(), grads, sum(seen.values()), batch.input_ids.numel()
