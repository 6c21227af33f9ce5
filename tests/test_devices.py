"""Devices and precision: resolving names (and refusing what is not there, changing nothing), a
device honoured end to end, and bf16 base models (on the CPU here: torch runs bf16 on any CPU)
checked against float32.

The end-to-end tests run on every device this machine has (`available_devices()`: the CPU
here, the GPUs too on a GPU machine), so the same file checks the CUDA path where there is one.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bios.client.service import ServiceClient
from bios.distributed import process
from bios.engine import decoding, devices
from bios.engine.devices import (
    available_devices,
    choose_dtype,
    cpu_bf16_instructions,
    resolve_device,
    resolve_dtype,
    resolve_precision,
)
from bios.engine.engine import Engine
from bios.engine.packed import MIN_ROWS, PackedLinears, native_gemv, packable_dtypes
from bios.errors import InvalidInputError
from bios.models.loading import load_model
from bios.models.lora import AdapterHost, LoRAAdapter
from bios.recipes.config import TrainConfig, from_mapping
from bios.types import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams

CPU = torch.device("cpu")
ADAM = AdamParams(learning_rate=1e-2)


@pytest.fixture(autouse=True)
def no_env_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults under test, not a developer's `$BIOS_DEVICE` / `$BIOS_DTYPE`."""
    monkeypatch.delenv("BIOS_DEVICE", raising=False)
    monkeypatch.delenv("BIOS_DTYPE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.fixture
def no_process_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No process engine yet (the test's own is dropped after it), a private Bios home."""
    monkeypatch.setenv("BIOS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(process, "_engine", None)
    return tmp_path / "home"


def data(count: int = 4, lengths: tuple[int, ...] = (40, 64, 23, 100)) -> list[Datum]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for length in lengths[:count]:
        tokens = torch.randint(0, 384, (length + 1,), generator=generator)
        inputs = {"target_tokens": tokens[1:], "weights": torch.ones(length)}
        out.append(
            Datum(model_input=ModelInput.from_ints(tokens[:-1].tolist()), loss_fn_inputs=inputs)
        )
    return out


# ---- resolving a device ---------------------------------------------------------------------


def test_the_default_device_is_a_gpu_if_there_is_one_else_the_cpu():
    expected = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else CPU
    )
    assert resolve_device(None) == expected
    assert resolve_device("cpu") == resolve_device("CPU") == resolve_device(CPU) == CPU


def test_bios_device_chooses_when_no_name_is_given(monkeypatch):
    monkeypatch.setenv("BIOS_DEVICE", "cpu")
    assert resolve_device(None) == CPU
    monkeypatch.setenv("BIOS_DEVICE", "cuda:7")
    with pytest.raises(InvalidInputError) as error:
        resolve_device(None)
    assert error.value.field == "device"
    assert "cuda:7" in str(error.value) and "$BIOS_DEVICE" in str(error.value)
    assert resolve_device("cpu") == CPU  # a name given wins over the variable


MISSING = ["cuda:7", "garbage", "meta", "tpu:0"]
MISSING += [] if torch.cuda.is_available() else ["cuda", "cuda:0"]
MISSING += [] if torch.backends.mps.is_available() else ["mps"]


@pytest.mark.parametrize("name", MISSING)
def test_a_device_that_is_not_there_is_named_with_what_is(name):
    with pytest.raises(InvalidInputError) as error:
        resolve_device(name)
    message = str(error.value)
    assert error.value.field == "device" and repr(name) in message
    assert "cpu" in message.rsplit("has", 1)[-1]  # what this machine has: at least the CPU


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int = 2, native_bf16: bool = True) -> None:
    """torch.cuda as it looks on a machine with `count` GPUs (nothing is run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    capability = (9, 0) if native_bf16 else (7, 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(devices, "_cuda_native_bf16", lambda device: native_bf16)


def test_gpus_by_index_and_one_per_rank_under_torchrun(monkeypatch):
    fake_gpus(monkeypatch)
    assert resolve_device(None) == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(InvalidInputError, match=r"'cuda:2' is not there.*cuda:0, cuda:1"):
        resolve_device("cuda:2")
    # One rank of several: a plain "cuda" (or nothing) is this rank's own GPU.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(None) == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an index given is kept


# ---- resolving a dtype ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
        (torch.float32, torch.float32),
    ],
)
def test_dtype_names(name, dtype):
    assert resolve_dtype(name, CPU) == dtype
    assert choose_dtype(name, CPU) == (dtype, "asked for")


@pytest.mark.parametrize("name", ["fp16", "float16", "half", torch.float16])
def test_float16_is_refused_with_the_reason(name):
    with pytest.raises(InvalidInputError) as error:
        resolve_dtype(name, CPU)
    assert error.value.field == "dtype" and "loss scaling" in str(error.value)
    assert "bf16" in str(error.value)


@pytest.mark.parametrize("name", ["int8", "fp8", "", 16, torch.int64])
def test_a_dtype_bios_does_not_offer_is_named(name):
    with pytest.raises(InvalidInputError) as error:
        resolve_dtype(name, CPU)
    assert error.value.field == "dtype"


def test_cpu_default_follows_native_bf16_instructions(monkeypatch):
    found = cpu_bf16_instructions()
    assert set(found) <= set(devices.CPU_BF16_FLAGS)  # what this machine has (often nothing)
    monkeypatch.setattr(devices, "cpu_bf16_instructions", lambda: ("amx_bf16",))
    dtype, reason = choose_dtype(None, CPU)
    assert dtype == torch.bfloat16 and "amx_bf16" in reason
    assert choose_dtype("auto", CPU)[0] == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_bf16_instructions", lambda: ())
    dtype, reason = choose_dtype(None, CPU)
    assert dtype == torch.float32 and "no native bf16" in reason
    assert resolve_precision("cpu").describe().startswith("cpu, float32 (this CPU has no native")


def test_gpu_default_is_bf16_where_the_gpu_computes_it(monkeypatch):
    fake_gpus(monkeypatch, native_bf16=True)
    dtype, reason = choose_dtype(None, torch.device("cuda", 0))
    assert dtype == torch.bfloat16 and "H200" in reason
    fake_gpus(monkeypatch, native_bf16=False)
    dtype, reason = choose_dtype(None, torch.device("cuda", 0))
    assert dtype == torch.float32 and "7.0" in reason


def test_bios_dtype_chooses_when_no_dtype_is_given(monkeypatch):
    monkeypatch.setenv("BIOS_DTYPE", "bf16")
    assert choose_dtype(None, CPU) == (torch.bfloat16, "$BIOS_DTYPE=bf16")
    assert choose_dtype("fp32", CPU)[0] == torch.float32
    monkeypatch.setenv("BIOS_DTYPE", "fp16")
    with pytest.raises(InvalidInputError, match=r"from \$BIOS_DTYPE"):
        resolve_dtype(None, CPU)


# ---- refusals change nothing ------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("device", "cuda:7"), ("dtype", "fp16")])
def test_a_bad_device_or_dtype_creates_no_engine(field, value, no_process_engine, tmp_path):
    with pytest.raises(InvalidInputError) as error:
        ServiceClient(**{field: value})
    assert error.value.field == field and value in str(error.value)
    assert process._engine is None
    with pytest.raises(InvalidInputError):
        Engine(home=tmp_path, **{field: value})
    assert not no_process_engine.exists()  # nothing written either


@pytest.mark.parametrize(("field", "value"), [("device", "cpu"), ("dtype", "bf16")])
def test_a_server_chooses_its_own_device_and_dtype(field, value, no_process_engine):
    with pytest.raises(InvalidInputError) as error:
        ServiceClient(base_url="http://127.0.0.1:9", **{field: value})
    assert error.value.field == field and "bios serve --device/--dtype" in str(error.value)
    assert process._engine is None


def test_one_engine_per_process_refuses_another_precision(no_process_engine, tmp_path):
    first = ServiceClient(device="cpu", dtype="fp32")
    engine = process._engine
    assert engine is not None and (engine.device, engine.dtype) == (CPU, torch.float32)
    assert ServiceClient()._engine is engine
    assert ServiceClient(device="cpu", dtype="float32")._engine is first._engine
    with pytest.raises(InvalidInputError, match=r"dtype: 'bf16' \(bfloat16\) asked for, but .*"):
        ServiceClient(dtype="bf16")
    assert process._engine is engine
    with pytest.raises(InvalidInputError):
        ServiceClient(engine=engine, dtype="bf16")  # an engine given chooses for itself


def test_recipes_take_device_and_dtype_as_settings():
    config = from_mapping(TrainConfig, {"device": "cpu", "dtype": "bf16"})
    assert (config.device, config.dtype) == ("cpu", "bf16")
    with pytest.raises(ValueError, match="dtype: expected one of auto, bf16, fp32"):
        from_mapping(TrainConfig, {"dtype": "fp16"})


def test_serve_has_device_and_dtype_flags():
    from bios.cli import build_parser

    args = build_parser().parse_args(["serve", "--device", "cpu", "--dtype", "bf16"])
    assert (args.device, args.dtype) == ("cpu", "bf16")


# ---- loading ---------------------------------------------------------------------------------


def test_load_model_reads_straight_into_the_dtype_and_onto_the_device(llama, monkeypatch):
    loaded = load_model(llama, torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert {p.device for p in loaded.model.parameters()} == {CPU}
    # Off the CPU, from_pretrained places the weights itself, shard by shard (device_map).
    calls = []
    original = AutoModelForCausalLM.from_pretrained

    def recording(path, **options):
        calls.append(dict(options))
        options.pop("device_map", None)
        return original(path, **options)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    load_model(llama, torch.bfloat16, torch.device("cuda", 1))
    load_model(llama, torch.float32, CPU)
    assert calls[0]["device_map"] == {"": torch.device("cuda", 1)}
    assert calls[0]["dtype"] == torch.bfloat16
    assert "device_map" not in calls[1]  # the CPU path as it always was


# ---- a device honoured end to end --------------------------------------------------------------


@pytest.mark.parametrize("device", available_devices()[:2])
def test_service_client_device_end_to_end(device, llama, no_process_engine, monkeypatch):
    """A run's adapter, its AdamW moments and the sampler's tensors live on the chosen device,
    in float32; results come back as CPU tensors and lists."""
    place = torch.device(device)
    service = ServiceClient(device=device, dtype="float32")
    engine = process._engine
    assert (engine.device, engine.dtype) == (place, torch.float32)
    client = service.create_lora_training_client(llama, rank=4, seed=0)
    output = client.forward_backward(data(2), "cross_entropy").result()
    client.optim_step(ADAM).result()
    assert output.loss_fn_outputs[0]["logprobs"].to_torch().device == CPU

    worker = engine.worker(llama)
    assert {(p.device, p.dtype) for p in worker.loaded.model.parameters()} == {
        (place, torch.float32)
    }
    run = engine.run(client.model_id)
    assert {(p.device, p.dtype) for p in run.parameters.values()} == {(place, torch.float32)}
    moments = [
        value
        for state in run.optimizer.state.values()
        for key, value in state.items()
        if key != "step"
    ]
    assert moments and {(m.device, m.dtype) for m in moments} == {(place, torch.float32)}

    seen: dict[str, set] = {"cache": set(), "logits": set(), "mask": set()}
    batch_cache, choose_tokens = decoding.batch_cache, decoding.choose_tokens

    def recording_cache(caches, counts, steps, dtype=None, static=False):
        cache, mask = batch_cache(caches, counts, steps, dtype, static)
        seen["cache"].add(cache.layers[0].keys.device)
        seen["mask"].add(None if mask is None else mask.device)
        return cache, mask

    def recording_choice(logits, *args):
        seen["logits"].add((logits.device, logits.dtype))
        return choose_tokens(logits, *args)

    monkeypatch.setattr(decoding, "batch_cache", recording_cache)
    monkeypatch.setattr(decoding, "choose_tokens", recording_choice)
    sampler = client.save_weights_and_get_sampling_client()
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=1)
    prompts = [ModelInput.from_ints([5, 17, 42]), ModelInput.from_ints([7, 8])]
    responses = [sampler.sample(p, 2, params) for p in prompts]
    for response in responses:
        sequence = response.result().sequences[0]
        assert isinstance(sequence.tokens, list) and isinstance(sequence.logprobs[0], float)
    assert seen["cache"] == {place} and seen["logits"] == {(place, torch.float32)}
    assert seen["mask"] <= {place, None}


# ---- bf16 -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Engine]:
    """A float32 and a bf16 engine on the CPU, each with its own home."""
    return {
        name: Engine(home=tmp_path_factory.mktemp(f"home-{name}"), device="cpu", dtype=name)
        for name in ("fp32", "bf16")
    }


# bf16 keeps 8 significant bits: every weight and activation is rounded by up to 2^-9 of
# itself. Those roundings add up per token as a random walk (measured on the three tiny models,
# 4 sequences of 23-100 tokens: at most 0.085 nats on one token's logprob), and a sequence's sum
# averages their signs: measured at most 8.5e-4 relative. The bound for the sum is 2^-8 (one
# bf16 rounding of the sum itself): above it the error would be systematic (some float32 step
# done in bf16), not rounding. Per token, 0.25 nats (3x the measured worst case).
SUM_RELATIVE_BOUND = 2**-8
TOKEN_ABS_BOUND = 0.25


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_bf16_logprobs_are_within_rounding_of_float32(family, tiny_models, engines):
    batch = data()
    outputs = {}
    for name, engine in engines.items():
        client = ServiceClient(engine=engine).create_lora_training_client(
            tiny_models[family], rank=8, seed=0
        )
        result = client.forward(batch, "cross_entropy").result()
        outputs[name] = [o["logprobs"].to_torch() for o in result.loss_fn_outputs]
    assert engines["bf16"].worker(tiny_models[family]).dtype == torch.bfloat16
    for exact, rounded in zip(outputs["fp32"], outputs["bf16"], strict=True):
        assert rounded.dtype == torch.float32
        relative = float((rounded.sum() - exact.sum()).abs() / exact.sum().abs())
        assert relative < SUM_RELATIVE_BOUND, relative
        assert float((rounded - exact).abs().max()) < TOKEN_ABS_BOUND


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_lora_trains_in_float32_and_samples_greedily_as_generate(family, tiny_models, engines):
    engine = engines["bf16"]
    client = ServiceClient(engine=engine).create_lora_training_client(
        tiny_models[family], rank=8, seed=0
    )
    batch = data(3)
    first = client.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    for _ in range(4):
        client.forward_backward(batch, "cross_entropy")
        client.optim_step(ADAM)
    last = client.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    assert last < 0.7 * first

    run = engine.run(client.model_id)
    assert {p.dtype for p in run.parameters.values()} == {torch.float32}
    moments = {v.dtype for s in run.optimizer.state.values() for k, v in s.items() if k != "step"}
    assert moments == {torch.float32}
    assert engine.worker(tiny_models[family]).dtype == torch.bfloat16  # the base is untouched

    prompt = [5, 17, 42, 9]
    expected = client.generate(prompt, max_tokens=10).result()
    sampler = client.save_weights_and_get_sampling_client()
    params = SamplingParams(max_tokens=10, temperature=0.0)
    got = sampler.sample(ModelInput.from_ints(prompt), 1, params).result().sequences[0].tokens
    assert got == expected
    several = sampler.sample(ModelInput.from_ints(prompt), 4, SamplingParams(max_tokens=5, seed=2))
    assert all(len(s.tokens) >= 1 for s in several.result().sequences)


@pytest.mark.parametrize("samples", [1, MIN_ROWS + 1])
def test_bf16_decoding_keeps_a_float32_cache(samples, llama, engines, monkeypatch):
    """A bf16 model's decode on the CPU keeps its KV cache in float32 (`cache_dtype`: one query
    attends in float32), and a sample's logprobs at T = 1 (the model's own) stay within the bf16
    bounds above of the float32 model's logprobs of the same tokens, and of the bf16 model's
    own forward of them. A float32 model's cache is float32 as before."""
    caches: list[torch.dtype] = []
    batch_cache = decoding.batch_cache

    def recording_cache(caches_, counts, steps, dtype=None, static=False):
        cache, mask = batch_cache(caches_, counts, steps, dtype, static)
        caches.append(cache.layers[0].keys.dtype)
        return cache, mask

    monkeypatch.setattr(decoding, "batch_cache", recording_cache)
    prompt = [5, 17, 42, 9, 3, 11]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=4, stop=[])
    sampler = ServiceClient(engine=engines["bf16"]).create_sampling_client(base_model=llama)
    sequences = sampler.sample(ModelInput.from_ints(prompt), samples, params).result().sequences
    assert caches == [torch.float32]
    exact = ServiceClient(engine=engines["fp32"]).create_sampling_client(base_model=llama)
    for sequence in sequences:
        assert len(sequence.tokens) == 8
        tokens = ModelInput.from_ints(prompt + sequence.tokens)
        sampled = torch.tensor(sequence.logprobs)
        for reference in (exact, sampler):
            scored = torch.tensor(reference.compute_logprobs(tokens).result()[len(prompt) :])
            assert float((sampled - scored).abs().max()) < TOKEN_ABS_BOUND
            relative = float((sampled.sum() - scored.sum()).abs() / scored.sum().abs())
            assert relative < SUM_RELATIVE_BOUND, relative
    exact.sample(ModelInput.from_ints(prompt), samples, params).result()
    assert caches == [torch.float32, torch.float32]


def test_bf16_full_fine_tuning_keeps_float32_master_weights(llama, engines):
    engine = engines["bf16"]
    client = ServiceClient(engine=engine).create_full_training_client(llama)
    run = engine.run(client.model_id)
    assert {p.dtype for p in run.parameters.values()} == {torch.float32}
    batch = data(2)
    first = client.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    client.forward_backward(batch, "cross_entropy")
    client.optim_step(AdamParams(learning_rate=1e-3))
    assert client.forward(batch, "cross_entropy").result().metrics["loss:sum"] < first
    moments = {v.dtype for s in run.optimizer.state.values() for k, v in s.items() if k != "step"}
    assert moments == {torch.float32}
    sampler = client.save_weights_and_get_sampling_client()  # sampled in the base's dtype
    response = sampler.sample(
        ModelInput.from_ints([5, 17]), 2, SamplingParams(max_tokens=3, seed=0)
    )
    assert all(len(s.tokens) == 3 for s in response.result().sequences)


def test_bf16_full_fine_tuning_computes_under_autocast(llama, engines):
    engine = engines["bf16"]
    client = ServiceClient(engine=engine).create_full_training_client(llama)
    run = engine.run(client.model_id)
    seen = []
    layer = run.full_model.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    try:
        client.forward_backward(data(1), "cross_entropy").result()
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}


# ---- the pieces: LoRA in bf16, the CPU-only prepacked path -----------------------------------


def test_lora_delta_is_computed_in_the_layers_dtype_from_float32_factors(llama):
    """On a bf16 layer the delta is (α/r)·B(A x) with A and B cast to bf16 (the hand formula,
    exactly), within bf16 rounding of the float32 delta; the adapted layer's output is the
    plain output plus it in one GEMM (`torch.addmm`), rounded once, so nearer the exact sum than
    the plain output plus the rounded delta; the factors and their gradients stay float32;
    inside autocast (full fine-tuning's references) the delta is float32."""
    model = load_model(llama, torch.bfloat16).model
    host = AdapterHost(model)
    adapter = LoRAAdapter.for_model(model, LoraConfig(rank=4, seed=0))
    assert {p.dtype for p in adapter.parameters()} == {torch.float32}
    name = "model.layers.0.self_attn.q_proj"
    key = name.replace(".", "__")
    layer = model.get_submodule(name)
    with torch.no_grad():
        adapter.lora_B[key].normal_()
    a, b = adapter.lora_A[key], adapter.lora_B[key]
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        delta = adapter.delta(name, x)
        by_hand = torch.nn.functional.linear(
            torch.nn.functional.linear(x, a.to(torch.bfloat16)) * adapter.scale,
            b.to(torch.bfloat16),
        )
        in_float32 = (x.float() @ a.T * adapter.scale) @ b.T
        with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 inside autocast
            assert adapter.delta(name, x).dtype == torch.float32
        with host.use(adapter):
            got = layer(x)
        plain = torch.nn.functional.linear(x, layer.weight)
    assert delta.dtype == torch.bfloat16 and torch.equal(delta, by_hand)
    relative = (delta.float() - in_float32).norm() / in_float32.norm()
    assert relative < 2**-7, relative
    scaled = torch.nn.functional.linear(x, a.to(torch.bfloat16)) * adapter.scale
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.addmm(plain, scaled, b.to(torch.bfloat16).T).detach())
    exact = plain.double() + scaled.double() @ b.to(torch.bfloat16).double().T
    twice_rounded = (plain + delta).double()
    assert (got.double() - exact).norm() < (twice_rounded - exact).norm()
    # The gradients reach the float32 factors as float32, close to the float32 computation's.
    adapter.delta(name, x).float().square().sum().backward()
    grads = [a.grad, b.grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    a.grad = b.grad = None
    ((x.float() @ a.T * adapter.scale) @ b.T).square().sum().backward()
    for got_grad, want in zip(grads, [a.grad, b.grad], strict=True):
        assert (got_grad - want).norm() / want.norm() < 2**-5
    host.remove()


def test_prepacked_decoding_takes_bf16_only_where_onednn_has_bf16_kernels(llama):
    """A bf16 model is prepacked where oneDNN has native bf16 kernels (`avx512_bf16`, AMX), and
    its packed products are `F.linear`'s (the same logits at 6 rows); elsewhere it is not packed
    (oneDNN refuses bf16 there) and decodes with the plain kernels."""
    model = load_model(llama, torch.bfloat16).model
    packed = PackedLinears._pack(model)
    if torch.bfloat16 not in packable_dtypes():
        assert packed is None
        return
    assert packed is not None
    tokens = torch.randint(0, 384, (6, 9), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        plain = model(input_ids=tokens).logits
        with packed.installed():
            prepacked = model(input_ids=tokens).logits
    assert prepacked.dtype == torch.bfloat16
    torch.testing.assert_close(prepacked, plain, rtol=2**-7, atol=2**-7)


def test_native_gemv_is_counted_and_restores_what_was_before():
    """The oneDNN switch is off while any `native_gemv` block runs (nested, or on two threads
    that overlap) and back to its earlier state, on or off, when the last one ends."""
    assert torch.backends.mkldnn.enabled
    inside, release = threading.Event(), threading.Event()

    def other_decode() -> None:
        with native_gemv():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other_decode)
    with native_gemv():
        assert not torch.backends.mkldnn.enabled
        thread.start()
        assert inside.wait(10)
        with native_gemv():
            assert not torch.backends.mkldnn.enabled
    assert not torch.backends.mkldnn.enabled  # the other thread's block still runs
    release.set()
    thread.join(10)
    assert torch.backends.mkldnn.enabled
    torch._C._set_mkldnn_enabled(False)
    try:
        with native_gemv():
            pass
        assert not torch.backends.mkldnn.enabled  # a caller's own choice stays
    finally:
        torch._C._set_mkldnn_enabled(True)


@pytest.mark.parametrize(
    ("dtype", "samples", "native"),
    [
        ("bf16", 1, True),
        ("bf16", MIN_ROWS - 1, True),
        ("bf16", MIN_ROWS, False),
        ("fp32", 1, False),
    ],
)
def test_few_bf16_rows_decode_on_torchs_own_kernels(dtype, samples, native, llama, engines):
    """Decode steps of fewer than `MIN_ROWS` rows of a bf16 model run with oneDNN off (torch's
    matrix-vector kernels); the prompt's prefill, larger batches and float32 models keep it on,
    and it is on again after the decode. torch's kernel gives one row's logits within bf16
    rounding of oneDNN's."""
    engine = engines[dtype]
    model = engine.worker(llama).loaded.model
    seen: dict[str, set[bool]] = {"prefill": set(), "decode": set()}

    def record(module, args, output) -> None:
        seen["decode" if args[0].shape[1] == 1 else "prefill"].add(torch.backends.mkldnn.enabled)

    handle = model.get_input_embeddings().register_forward_hook(record)  # args: (B, T) ids
    try:
        sampler = ServiceClient(engine=engine).create_sampling_client(base_model=llama)
        params = SamplingParams(max_tokens=6, seed=3, stop=[])
        response = sampler.sample(ModelInput.from_ints([5, 17, 42, 9]), samples, params).result()
    finally:
        handle.remove()
    assert all(len(sequence.tokens) == 6 for sequence in response.sequences)
    assert seen == {"prefill": {True}, "decode": {not native}}
    assert torch.backends.mkldnn.enabled
    if dtype == "bf16" and samples == 1:
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(1, model.config.hidden_size, generator=generator).bfloat16()
        with torch.inference_mode():
            with_onednn = torch.nn.functional.linear(x, model.lm_head.weight)
            with native_gemv():
                with_torch = torch.nn.functional.linear(x, model.lm_head.weight)
        torch.testing.assert_close(with_torch, with_onednn, rtol=2**-7, atol=2**-7)
