"""Memory planned, not discovered: the estimates bound what autograd really keeps, and a step or
a run that does not fit is refused with the numbers, before anything changes."""

from __future__ import annotations

import functools

import pytest
import torch

from bios.client.service import ServiceClient
from bios.engine import memory
from bios.engine.batch import pack_batch, resolve_config, resolve_objective
from bios.engine.decoding import SampleRequest, SampleSettings, generate
from bios.engine.engine import Engine
from bios.errors import InvalidInputError
from bios.types import AdamParams
from helpers import peak_allocated, random_datum, saved_storages
from tiny_models import make_tiny_model

FAMILIES = ("llama", "qwen2", "qwen3")
LENGTHS = (60, 30, 90, 45)


def activation_bytes(run, model, batch, objective, config) -> int:
    """Bytes of the distinct storages autograd saves during a forward and backward, leaving out
    the weights (they are held anyway), measured with saved-tensor hooks on this thread."""
    with saved_storages([*model.parameters(), *run.parameters.values()]) as seen:
        run.forward_backward(batch, objective, config, True)
    return sum(seen.values())


@pytest.fixture(scope="module")
def bf16_engine(tmp_path_factory) -> Engine:
    return Engine(home=tmp_path_factory.mktemp("bf16-home"), device="cpu", dtype="bf16")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_step_estimate_bounds_the_peak_and_what_autograd_keeps(
    family, dtype, tiny_models, session_engine, request
):
    """The planned bytes are at least the most the step has allocated at once, as the allocator's
    own events measure it (what autograd keeps, and every transient of the forward and the
    backward), and without checkpointing at most 1.25× it (measured: 1.03-1.05×); and at least
    what autograd keeps, at most twice it. In bf16 too, where the attention on the CPU computes
    in float32 and keeps bf16 (`bios.models.attention`)."""
    engine = session_engine if dtype == "fp32" else request.getfixturevalue("bf16_engine")
    service = ServiceClient(engine=engine)
    client = service.create_lora_training_client(tiny_models[family], rank=4, seed=0)
    run = engine.run(client.model_id)
    model = engine.worker_of(client.model_id).loaded.model
    assert model.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    generator = torch.Generator().manual_seed(0)
    data = [random_datum(384, n, "cross_entropy", generator) for n in LENGTHS]
    objective = resolve_objective("cross_entropy")
    batch = pack_batch(data, objective, 384, 1 << 20)
    config = resolve_config(objective, {})
    shape = memory.Shape.of(model)
    for checkpointing in (False, True):
        run.checkpoint_layers = checkpointing
        planned = memory.step_bytes(shape, batch, checkpointing, 4)
        kept = activation_bytes(run, model, batch, objective, config)
        assert kept <= planned, (checkpointing, kept, planned)
        for param in run.parameters.values():  # as a first step: no gradients yet
            param.grad = None
        peak = peak_allocated(lambda: run.forward_backward(batch, objective, config, True))
        assert peak <= planned, (checkpointing, peak, planned)
        if not checkpointing:
            assert planned <= 2 * kept, (kept, planned)
            assert planned <= 1.25 * peak, (peak, planned)
    run.checkpoint_layers = False


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_mlp_heavy_steps_peak_is_its_mlp_backward_and_bounded(
    dtype, session_engine, request, tmp_path
):
    """With an MLP 32× as wide as the hidden states and a small vocabulary, a step's peak is a
    layer's MLP backward, not the unembedding: three (tokens × intermediate) tensors at once
    (the product's gradient and gate's and up's, each written over its temporary), which the
    planner counts. Planned ≥ the allocator's measured peak, and ≤ 1.1× it (measured 1.01×;
    five such tensors were the peak, and the estimate, until 2026-12-06)."""
    engine = session_engine if dtype == "fp32" else request.getfixturevalue("bf16_engine")
    folder = make_tiny_model("llama", tmp_path / "wide-mlp", intermediate_size=4096)
    service = ServiceClient(engine=engine)
    client = service.create_lora_training_client(str(folder), rank=4, seed=0)
    run = engine.run(client.model_id)
    model = engine.worker_of(client.model_id).loaded.model
    generator = torch.Generator().manual_seed(0)
    data = [random_datum(384, 256, "cross_entropy", generator) for _ in range(8)]
    objective = resolve_objective("cross_entropy")
    batch = pack_batch(data, objective, 384, 1 << 20)
    config = resolve_config(objective, {})
    shape = memory.Shape.of(model)
    planned = memory.step_bytes(shape, batch, False, 4)
    tokens, b = batch.input_ids.numel(), shape.dtype_bytes
    mlp_moment = tokens * b * (3 * shape.intermediate + 2 * shape.hidden)
    assert mlp_moment > tokens * shape.vocab * 4 * 3  # the MLP's moment is the larger one
    peak = peak_allocated(lambda: run.forward_backward(batch, objective, config, True))
    assert peak <= planned <= 1.1 * peak, (peak, planned)


def test_a_step_that_does_not_fit_is_refused_with_the_numbers(
    tiny_models, session_engine: Engine, monkeypatch
):
    service = ServiceClient(engine=session_engine)
    client = service.create_lora_training_client(tiny_models["llama"], rank=4, seed=1)
    run = session_engine.run(client.model_id)
    generator = torch.Generator().manual_seed(1)
    data = [random_datum(384, n, "cross_entropy", generator) for n in LENGTHS]
    before = run.fingerprint()
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1 << 20)  # 1 MiB free
    with pytest.raises(InvalidInputError) as raised:
        client.forward_backward(data, "cross_entropy")
    message = str(raised.value)
    assert message.startswith("data: this request needs about ")
    assert "but 0.00 GiB is free" in message and f"{sum(LENGTHS)} tokens" in message
    assert "tokens per request" in message and "gradient_checkpointing=True" in message
    assert run.fingerprint() == before
    # An evaluation forward keeps no activations: it is not refused.
    client.forward(data, "cross_entropy").result()
    assert run.fingerprint() == before


def test_a_step_counts_the_gradients_it_makes(tiny_models, session_engine, monkeypatch):
    """A request's backward makes a fresh set of gradients (`TrainingRun.request_gradients`),
    4 bytes a trainable value, counted when it arrives; gradients accumulated since the last
    optim_step are allocated already (so not free), and the refusal then says optim_step frees
    them. Here the device's free memory is what is left beside the accumulated gradients: with
    them held the step does not fit, after optim_step the same request does."""
    service = ServiceClient(engine=session_engine)
    client = service.create_lora_training_client(tiny_models["llama"], rank=4, seed=2)
    run = session_engine.run(client.model_id)
    model = session_engine.worker_of(client.model_id).loaded.model
    generator = torch.Generator().manual_seed(2)
    data = [random_datum(384, n, "cross_entropy", generator) for n in LENGTHS]
    gradients = 4 * sum(p.numel() for p in run.parameters.values())
    assert run.gradient_bytes() == gradients and run.pending_gradient_bytes() == 0
    client.forward_backward(data, "cross_entropy").result()
    assert run.pending_gradient_bytes() == gradients  # every factor has a gradient
    batch = session_engine.worker_of(client.model_id).pack(data, resolve_objective("cross_entropy"))
    step = memory.step_bytes(memory.Shape.of(model), batch, False, 4)
    device = int((step + gradients + gradients / 2) / memory.HEADROOM)
    monkeypatch.setattr(memory, "free_bytes", lambda _: device - run.pending_gradient_bytes())
    before = run.fingerprint()
    with pytest.raises(InvalidInputError) as raised:
        client.forward_backward(data, "cross_entropy")
    message = str(raised.value)
    assert f"{memory.gib(step + gradients)} on cpu for its forward and backward" in message
    assert f"{memory.gib(gradients)} of it the gradients it makes" in message
    assert "call optim_step before more forward_backward calls (it frees the " in message
    assert run.fingerprint() == before
    client.optim_step(AdamParams(learning_rate=1e-3)).result()
    assert run.pending_gradient_bytes() == 0
    client.forward_backward(data, "cross_entropy").result()


def test_a_full_fine_tuning_step_counts_its_gradients(tiny_models, session_engine, monkeypatch):
    """A full fine-tuning run's first step makes gradients the size of its float32 weights:
    a step whose activations alone would fit is refused when they do not, with nothing
    changed; and the step's measured peak is within its activations and those gradients."""
    client = ServiceClient(engine=session_engine).create_full_training_client(tiny_models["qwen3"])
    run = session_engine.run(client.model_id)
    generator = torch.Generator().manual_seed(3)
    data = [random_datum(384, n, "cross_entropy", generator) for n in LENGTHS]
    objective = resolve_objective("cross_entropy")
    batch = session_engine.worker_of(client.model_id).pack(data, objective)
    step = memory.step_bytes(memory.Shape.of(run.full_model), batch, False, None)
    gradients = run.gradient_bytes()
    assert gradients == 4 * sum(p.numel() for p in run.full_model.parameters())
    peak = peak_allocated(lambda: run.forward_backward(batch, objective, {}, True))
    assert peak <= step + gradients, (peak, step, gradients)
    for param in run.parameters.values():
        param.grad = None
    before = run.fingerprint()
    free = int((step + gradients / 2) / memory.HEADROOM)  # the activations fit, not the rest
    monkeypatch.setattr(memory, "free_bytes", lambda _: free)
    with pytest.raises(InvalidInputError, match="of it the gradients it makes"):
        client.forward_backward(data, "cross_entropy")
    assert run.fingerprint() == before
    session_engine.drop_run(client.model_id)


def test_a_bf16_full_fine_tuning_step_counts_the_weights_bf16_copies(
    tiny_models, bf16_engine, monkeypatch
):
    """On a bf16 engine a full fine-tuning run computes under autocast from float32 weights,
    which keeps a bf16 copy of every linear layer's weight through the step: 2 bytes a weight,
    counted beside the step and its gradients. With them the estimate bounds the measured peak
    of a step of 8 tokens (all but copies and gradients) and of a larger one; without them the
    small step's peak is above it. A refusal names them, with nothing changed."""
    client = ServiceClient(engine=bf16_engine).create_full_training_client(tiny_models["llama"])
    run = bf16_engine.run(client.model_id)
    linear_weights = sum(
        m.weight.numel() for m in run.full_model.modules() if isinstance(m, torch.nn.Linear)
    )
    casts = memory.weight_cast_bytes(run.full_model, torch.bfloat16)
    assert casts == 2 * linear_weights > 0
    assert memory.weight_cast_bytes(run.full_model, torch.float32) == 0
    base = bf16_engine.worker_of(client.model_id).loaded.model  # bf16: a LoRA run casts nothing
    assert memory.weight_cast_bytes(base, torch.bfloat16) == 0
    objective = resolve_objective("cross_entropy")
    generator = torch.Generator().manual_seed(4)
    for count, length in ((1, 8), (8, 64)):
        data = [random_datum(384, length, "cross_entropy", generator) for _ in range(count)]
        batch = bf16_engine.worker_of(client.model_id).pack(data, objective)
        step = memory.step_bytes(memory.Shape.of(run.full_model), batch, False, None)
        for param in run.parameters.values():
            param.grad = None
        peak = peak_allocated(functools.partial(run.forward_backward, batch, objective, {}, True))
        assert peak <= step + run.gradient_bytes() + casts, (peak, step, casts)
        if count == 1:
            assert peak > step + run.gradient_bytes()  # the copies are what the peak has more
    for param in run.parameters.values():
        param.grad = None
    before = run.fingerprint()
    free = int((step + run.gradient_bytes() + casts / 2) / memory.HEADROOM)
    monkeypatch.setattr(memory, "free_bytes", lambda _: free)
    with pytest.raises(InvalidInputError, match="16-bit copies under autocast") as raised:
        client.forward_backward(data, "cross_entropy")
    assert "bfloat16" in str(raised.value) and "--dtype bf16" not in str(raised.value)
    assert run.fingerprint() == before
    bf16_engine.drop_run(client.model_id)


def test_a_run_that_does_not_fit_is_refused(tiny_models, session_engine, monkeypatch):
    service = ServiceClient(engine=session_engine)
    service.create_lora_training_client(tiny_models["qwen3"], rank=4)  # the model is loaded
    runs_before = set(session_engine._run_workers)
    model = session_engine.worker(tiny_models["qwen3"]).loaded.model
    needed = memory.run_bytes(memory.trainable_parameters(model, None), 0)
    monkeypatch.setattr(memory, "free_bytes", lambda device: needed)  # LoRA fits, full does not
    service.create_lora_training_client(tiny_models["qwen3"], rank=2)
    with pytest.raises(InvalidInputError, match=r"model: a new run needs about .* is free"):
        service.create_full_training_client(tiny_models["qwen3"])
    assert len(set(session_engine._run_workers) - runs_before) == 1


def test_trainable_parameters_count_the_adapter(tiny_models, session_engine):
    service = ServiceClient(engine=session_engine)
    client = service.create_lora_training_client(tiny_models["qwen2"], rank=4, train_mlp=False)
    run = session_engine.run(client.model_id)
    model = session_engine.worker_of(client.model_id).loaded.model
    counted = sum(p.numel() for p in run.parameters.values())
    assert memory.trainable_parameters(model, run.lora) == counted


# ---- sampling ---------------------------------------------------------------------------------


def kv_cache_by_hand(config, rows: int, positions: int, element_bytes: int) -> int:
    """Keys and values of every layer: layers × 2 × kv heads × head dim × rows × positions."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_key_value_heads * head_dim
    return config.num_hidden_layers * 2 * width * rows * positions * element_bytes


@pytest.mark.parametrize("family", FAMILIES)
def test_a_decode_cache_grows_to_what_the_estimate_counts(
    family, tiny_models, session_engine, monkeypatch
):
    """A decode that runs every row to max_tokens ends with KV buffers of exactly rows × (prompt
    + max_tokens) positions — they double from a small start but never past that — which is the
    cache term of `sample_bytes`; the whole estimate bounds it."""
    import bios.engine.decoding as decoding
    import bios.engine.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "INITIAL_ROOM", 4)  # grow 9 -> 18 -> 25, not 36
    caches = []
    batch_cache = decoding.batch_cache

    def recording(*args, **options):
        cache, mask = batch_cache(*args, **options)
        caches.append(cache)
        return cache, mask

    monkeypatch.setattr(decoding, "batch_cache", recording)
    sampler = ServiceClient(engine=session_engine).create_sampling_client(
        base_model=tiny_models[family]
    )
    prompt, rows, steps = [5, 17, 42, 9, 3], 3, 20
    params = {"max_tokens": steps, "seed": 2, "stop": []}
    response = sampler.sample(prompt, rows, params).result()
    assert all(len(sequence.tokens) == steps for sequence in response.sequences)
    (cache,) = caches
    allocated = sum(b.numel() * b.element_size() for layer in cache.layers for b in layer._buffers)
    config = session_engine.worker(tiny_models[family]).loaded.model.config
    assert allocated == kv_cache_by_hand(config, rows, len(prompt) + steps, 4)  # float32
    session = sampler._session
    request = session.check_request(prompt, rows, params)
    shape = memory.Shape.of(session_engine.worker(tiny_models[family]).loaded.model)
    assert memory.cache_bytes(shape, rows, len(prompt) + steps, 4) == allocated
    assert memory.sample_bytes(shape, [request], 4) > allocated


@pytest.mark.parametrize("prompt_logprobs", [False, True], ids=["plain", "prompt logprobs"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_decode_estimate_bounds_its_peak(family, prompt_logprobs, tiny_models, session_engine):
    """`sample_bytes` is at least the most a decode had allocated at once (the allocator's own
    events: prefill, KV cache growth, every step's logits and token choice), with and without
    the prompt's logprobs, and at most twice it (the peak measured 0.59-0.62 of it here, 0.68-0.84
    on SmolLM2's shape)."""
    loaded = session_engine.worker(tiny_models[family]).loaded
    settings = SampleSettings(max_tokens=24, temperature=1.0, top_k=-1, top_p=1.0, seed=0)
    request = SampleRequest(list(range(3, 40)), 6, settings, prompt_logprobs=prompt_logprobs)
    generate(loaded.model, [request], loaded.tokenizer)  # first: any one-off allocation
    # On this thread while the model's worker is idle: the profiler sees this thread's own.
    peak = peak_allocated(lambda: generate(loaded.model, [request], loaded.tokenizer))
    planned = memory.sample_bytes(memory.Shape.of(loaded.model), [request], 4)  # float32 cache
    assert peak <= planned <= 2 * peak, (peak, planned)


@pytest.mark.parametrize("when", ["arriving", "decoding"])
def test_a_sample_that_does_not_fit_is_refused_and_nothing_is_decoded(
    when, tiny_models, session_engine, monkeypatch
):
    """A request that cannot fit in all of the device's memory is refused when it arrives; one
    that cannot fit in what is free when the worker gets to it fails then, through its future,
    with nothing decoded. Either way the error names the numbers and what to ask for instead."""
    llama = tiny_models["llama"]
    sampler = ServiceClient(engine=session_engine).create_sampling_client(base_model=llama)
    session = sampler._session
    batches = len(session.batch_sizes)
    config = session_engine.worker(llama).loaded.model.config
    prompt, rows, steps = list(range(3, 40)), 512, 200
    name = "total_bytes" if when == "arriving" else "free_bytes"
    monkeypatch.setattr(memory, name, lambda device: 64 << 20)  # 64 MiB
    with pytest.raises(InvalidInputError) as raised:
        sampler.sample(prompt, rows, {"max_tokens": steps}, include_prompt_logprobs=True).result()
    message = str(raised.value)
    cache = kv_cache_by_hand(config, rows, len(prompt) + steps, 4)
    assert message.startswith("num_samples: this request needs about ")
    assert f"{rows} samples × ({len(prompt)} prompt + {steps} new tokens)" in message
    assert f"{cache / 2**30:.2f} GiB of KV cache" in message
    has = "cpu has 0.06 GiB in all" if when == "arriving" else "0.06 GiB is free"
    assert f"but {has}; ask for fewer samples" in message
    assert "sampling_params.max_tokens" in message and "prompt_logprobs_last_n" in message
    assert session._pending == [] and len(session.batch_sizes) == batches
    # Scoring a prompt keeps (tokens × vocabulary) logits: with 1 MiB, 37 tokens of this
    # 384-token vocabulary fit (37 · 384 · 12 bytes), 500 do not.
    monkeypatch.setattr(memory, name, lambda device: 1 << 20)
    with pytest.raises(InvalidInputError, match=r"^prompt: scoring 500 tokens needs about"):
        sampler.compute_logprobs([5] * 500).result()
    assert sampler.compute_logprobs(prompt).result()[0] is None
    # A small one fits that 1 MiB and runs.
    assert len(sampler.sample(prompt, 2, {"max_tokens": 3}).result().sequences) == 2


def test_requests_share_a_batch_only_while_it_fits(tiny_models, session_engine, monkeypatch):
    """Two requests queued together decode as one batch when the pair fits in the free memory,
    and one after the other when only each alone does: the same tokens either way."""
    import threading

    llama = tiny_models["llama"]
    sampler = ServiceClient(engine=session_engine).create_sampling_client(base_model=llama)
    session = sampler._session
    shape = memory.Shape.of(session_engine.worker(llama).loaded.model)
    requests = [
        ([5, 17, 42], 3, {"max_tokens": 6, "seed": 1}),
        ([7, 8], 2, {"max_tokens": 9, "seed": 2}),
    ]
    checked = [session.check_request(*request) for request in requests]
    alone = max(memory.sample_bytes(shape, [request], 4) for request in checked)
    pair = memory.sample_bytes(shape, checked, 4)
    assert pair > alone
    results = {}
    for name, free in (("together", 2 * pair), ("apart", (alone + pair) // 2 / memory.HEADROOM)):
        monkeypatch.setattr(memory, "free_bytes", lambda device, free=free: int(free))
        gate = threading.Event()
        session_engine.worker(llama).submit(gate.wait)  # hold the worker: both get queued
        futures = [sampler.sample(*request) for request in requests]
        gate.set()
        results[name] = [[s.tokens for s in f.result().sequences] for f in futures]
        sizes = list(session.batch_sizes)
        assert (sizes[-1:] == [2]) if name == "together" else (sizes[-2:] == [1, 1])
    assert results["together"] == results["apart"]
