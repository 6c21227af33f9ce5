"""The sampler against independent references: `transformers` greedy `generate` (base, PEFT-loaded
LoRA and full weights), the trainer's `forward` logprobs, exact next-token distributions computed
here (chi-square on sample frequencies, support and logprobs of truncated sampling), stop rules,
seeds, batching, and bad input."""

from __future__ import annotations

import asyncio
import gc
import math
import threading

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from bios.client.service import ServiceClient, TrainingClient
from bios.engine.engine import Engine
from bios.errors import InvalidInputError, NotFoundError
from bios.types import Datum, ModelInput, SampleResponse, SamplingParams
from helpers import state_fingerprint

PROMPTS = [[5, 17, 42, 9], [100, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15]]


def perturb(engine: Engine, run_id: str, seed: int, scale: float = 0.3) -> None:
    """Non-zero LoRA B (or a nudge to every full weight) so the run differs from the base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in engine.run(run_id).parameters.items():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            elif "lora_" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)


def eos_ids(folder: str) -> list[int]:
    model_eos = AutoModelForCausalLM.from_pretrained(folder).generation_config.eos_token_id
    ids = {model_eos} if isinstance(model_eos, int) else set(model_eos)
    return sorted(ids | {AutoTokenizer.from_pretrained(folder).eos_token_id})


def hf_greedy(model, prompt: list[int], max_tokens: int, stop: list[int]) -> list[int]:
    """`generate(do_sample=False)`, cut after the first stop token (which Bios keeps)."""
    output = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=stop,
        pad_token_id=stop[0],
    )[0, len(prompt) :].tolist()
    ends = [i for i, token in enumerate(output) if token in stop]
    return output[: ends[0] + 1] if ends else output


def greedy(sampler, prompt: list[int], max_tokens: int = 16) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return sampler.sample(ModelInput.from_ints(prompt), 1, params).result().sequences[0].tokens


# ---- greedy against transformers -----------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_transformers_generate(family, tiny_models, service: ServiceClient):
    folder = tiny_models[family]
    stop = eos_ids(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    sampler = service.create_sampling_client(base_model=folder)
    base_outputs = []
    for prompt in PROMPTS:
        expected = hf_greedy(base, prompt, 16, stop)
        assert greedy(sampler, prompt) == expected
        base_outputs.append(expected)

    # A LoRA snapshot, against PEFT loading the sampler weights saved with it.
    training = service.create_lora_training_client(folder, rank=4, seed=3)
    perturb(service._engine, training.model_id, seed=1)
    snapshot = training.save_weights_and_get_sampling_client("snap")
    path = f"bios://{training.model_id}/sampler_weights/snap"
    folder_of_snapshot = service._engine.home / "runs" / training.model_id / "sampler_weights"
    peft = PeftModel.from_pretrained(base, folder_of_snapshot / "snap")
    from_path = service.create_sampling_client(model_path=path)
    lora_outputs = []
    for prompt in PROMPTS:
        expected = hf_greedy(peft, prompt, 16, stop)
        assert greedy(snapshot, prompt) == expected
        assert greedy(from_path, prompt) == expected
        lora_outputs.append(expected)
    assert lora_outputs != base_outputs  # the adapter matters, so the comparison means something

    # Snapshots are immutable: training on changes the run, not the sampler taken before.
    perturb(service._engine, training.model_id, seed=2)
    assert [greedy(snapshot, p) for p in PROMPTS] == lora_outputs
    newer = training.save_weights_and_get_sampling_client()
    assert [greedy(newer, p) for p in PROMPTS] != lora_outputs


def test_long_greedy_generation_grows_the_cache(tiny_models, service: ServiceClient):
    """Past the 256 decode positions allocated up front, the cache buffers grow by doubling."""
    folder = tiny_models["qwen3"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    sampler = service.create_sampling_client(base_model=folder)
    prompt = PROMPTS[1]
    got = greedy(sampler, prompt, 264)
    assert len(got) == 264  # no EOS on the way, so the growth is exercised
    assert got == hf_greedy(model, prompt, 264, eos_ids(folder))


def test_full_finetune_snapshot(tiny_models, service: ServiceClient, session_engine: Engine):
    folder = tiny_models["qwen2"]
    stop = eos_ids(folder)
    training = service.create_full_training_client(folder)
    perturb(session_engine, training.model_id, seed=4)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference.load_state_dict(session_engine.run(training.model_id).full_model.state_dict())
    expected = [hf_greedy(reference, p, 12, stop) for p in PROMPTS]

    snapshot = training.save_weights_and_get_sampling_client("full")
    from_path = service.create_sampling_client(
        model_path=f"bios://{training.model_id}/sampler_weights/full"
    )
    perturb(session_engine, training.model_id, seed=5)  # after the snapshot: must not show
    assert [greedy(snapshot, p, 12) for p in PROMPTS] == expected
    assert [greedy(from_path, p, 12) for p in PROMPTS] == expected
    base = service.create_sampling_client(base_model=folder)
    assert [greedy(base, p, 12) for p in PROMPTS] != expected


# ---- logprobs ------------------------------------------------------------------------------------


def test_temperature_one_logprobs_equal_forward(tiny_models, service: ServiceClient):
    training = service.create_lora_training_client(tiny_models["qwen3"], rank=4, seed=0)
    perturb(service._engine, training.model_id, seed=7)
    sampler = training.save_weights_and_get_sampling_client()
    prompt = PROMPTS[0]
    params = SamplingParams(max_tokens=12, seed=11)
    response = sampler.sample(ModelInput.from_ints(prompt), 4, params).result()
    data, lengths = [], []
    for sequence in response.sequences:
        full = prompt + sequence.tokens
        data.append(
            Datum(
                model_input=ModelInput.from_ints(full[:-1]),
                loss_fn_inputs={"target_tokens": full[1:], "weights": [0.0] * (len(full) - 1)},
            )
        )
        lengths.append(len(sequence.tokens))
    output = training.forward(data, "cross_entropy").result()
    for sequence, result, n in zip(
        response.sequences, output.loss_fn_outputs, lengths, strict=True
    ):
        trainer = result["logprobs"].to_torch()[-n:]
        torch.testing.assert_close(torch.tensor(sequence.logprobs), trainer, atol=1e-4, rtol=0)


def test_prompt_logprobs_and_compute_logprobs(tiny_models, service: ServiceClient):
    folder = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompt = PROMPTS[2]
    logits = model(input_ids=torch.tensor([prompt])).logits[0, :-1]
    reference = torch.log_softmax(logits, dim=-1)
    expected = reference.gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]

    sampler = service.create_sampling_client(base_model=folder)
    got = sampler.compute_logprobs(ModelInput.from_ints(prompt)).result()
    assert got[0] is None and len(got) == len(prompt)
    torch.testing.assert_close(torch.tensor(got[1:]), expected, atol=1e-5, rtol=0)

    params = SamplingParams(max_tokens=1, temperature=0.0)
    response = sampler.sample(
        ModelInput.from_ints(prompt),
        1,
        params,
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
    ).result()
    assert response.prompt_logprobs[0] is None
    torch.testing.assert_close(
        torch.tensor(response.prompt_logprobs[1:]), expected, atol=1e-5, rtol=0
    )
    assert response.topk_prompt_logprobs[0] is None
    values, ids = reference.topk(3)
    for position, pairs in enumerate(response.topk_prompt_logprobs[1:]):
        assert [t for t, _ in pairs] == ids[position].tolist()
        torch.testing.assert_close(
            torch.tensor([v for _, v in pairs]), values[position], atol=1e-5, rtol=0
        )
    # Greedy: the argmax of the last position, reported with logprob 0 (a point mass).
    last = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    assert response.sequences[0].tokens == [int(last.argmax())]
    assert response.sequences[0].logprobs == [0.0]


# ---- the distribution sampled from ---------------------------------------------------------------


def expected_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float):
    """π of the README, computed here in float64: softmax(z/T), top-k, then top-p, renormalised."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    keep[order[: top_k if top_k > 0 else len(p)]] = True
    p = np.where(keep, p, 0.0)
    p /= p.sum()
    if top_p < 1.0:
        sorted_p = p[order]
        # The smallest prefix of the most probable tokens whose mass reaches top_p.
        count = int(np.searchsorted(np.cumsum(sorted_p), top_p)) + 1
        keep = np.zeros_like(keep)
        keep[order[:count]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def chi_square_critical(df: int, z: float = 3.090232) -> float:
    """Upper 0.1% point of chi-square with `df` degrees of freedom, by the Wilson-Hilferty
    approximation (z = Φ⁻¹(0.999)); within ~0.5% of the exact value for df ≥ 10."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [
        (1.0, -1, 1.0),
        (0.5, -1, 1.0),
        (2.0, -1, 1.0),
        (1.0, 12, 1.0),
        (1.0, -1, 0.5),
        (0.8, 40, 0.7),
    ],
)
def test_sample_frequencies_follow_the_distribution(
    temperature, top_k, top_p, tiny_models, service: ServiceClient
):
    folder = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompt = PROMPTS[0]
    logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].detach().double().numpy()
    pi = expected_distribution(logits, temperature, top_k, top_p)

    sampler = service.create_sampling_client(base_model=folder)
    n = 20_000
    params = SamplingParams(
        max_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, seed=123
    )
    response = sampler.sample(ModelInput.from_ints(prompt), n, params).result()
    tokens = np.array([s.tokens[0] for s in response.sequences])
    logprobs = np.array([s.logprobs[0] for s in response.sequences])

    # Outside the kept set nothing appears; every logprob is log π(token) of the truncated π.
    assert np.all(pi[tokens] > 0)
    np.testing.assert_allclose(logprobs, np.log(pi[tokens]), atol=2e-5, rtol=0)
    if top_k > 0 or top_p < 1:
        assert (pi > 0).sum() < len(pi)  # the truncation did cut something

    # Chi-square over tokens expected ≥ 5 times, the rest of the kept set pooled into one bin.
    counts = np.bincount(tokens, minlength=len(pi)).astype(float)
    expected = n * pi
    big = expected >= 5
    observed_bins = [*counts[big], counts[~big & (pi > 0)].sum()]
    expected_bins = [*expected[big], expected[~big & (pi > 0)].sum()]
    if expected_bins[-1] < 5:  # too small to test on its own: fold it into the largest bin
        observed_bins[0] += observed_bins.pop()
        expected_bins[0] += expected_bins.pop()
    observed_bins, expected_bins = np.array(observed_bins), np.array(expected_bins)
    statistic = float(((observed_bins - expected_bins) ** 2 / expected_bins).sum())
    df = len(expected_bins) - 1
    assert df >= 5
    assert statistic < chi_square_critical(df), (statistic, df)


# ---- stopping ------------------------------------------------------------------------------------


def test_stop_strings_across_tokens_stop_ids_and_reasons(tiny_models, service: ServiceClient):
    folder = tiny_models["llama"]
    sampler = service.create_sampling_client(base_model=folder)
    tokenizer = sampler.get_tokenizer()
    prompt = ModelInput.from_ints(PROMPTS[0])
    greedy_params = {"max_tokens": 24, "temperature": 0.0}
    free = sampler.sample(prompt, 1, SamplingParams(**greedy_params)).result().sequences[0]
    assert free.stop_reason == "length" and len(free.tokens) == 24
    text = tokenizer.decode(free.tokens)

    # A stop string made of the last character of token i and the first of token i+1, at its
    # first occurrence in the text: it is caught when token i+1 arrives, and that token is kept.
    found = None
    for i in range(len(free.tokens) - 1):
        end_of_i = len(tokenizer.decode(free.tokens[: i + 1]))
        stop = text[end_of_i - 1 : end_of_i + 1]
        if len(stop) == 2 and text.find(stop) == end_of_i - 1:
            found = i, stop
            break
    assert found is not None
    i, stop = found
    for stop_param in (stop, [stop, "\x00never"]):
        params = SamplingParams(**greedy_params, stop=stop_param)
        sequence = sampler.sample(prompt, 1, params).result().sequences[0]
        assert sequence.tokens == free.tokens[: i + 2] and sequence.stop_reason == "stop"

    token = free.tokens[5]
    params = SamplingParams(**greedy_params, stop=[token])
    sequence = sampler.sample(prompt, 1, params).result().sequences[0]
    assert sequence.tokens == free.tokens[: free.tokens.index(token) + 1]
    assert sequence.stop_reason == "stop"

    # Reaching max_tokens on a stop token is a stop; a string not present changes nothing.
    params = SamplingParams(max_tokens=6, temperature=0.0, stop=[token])
    assert sampler.sample(prompt, 1, params).result().sequences[0].stop_reason == "stop"
    params = SamplingParams(**greedy_params, stop=["\x00never"])
    assert sampler.sample(prompt, 1, params).result().sequences[0] == free


def test_end_of_sequence_always_stops(tiny_models, service: ServiceClient):
    folder = tiny_models["llama"]
    eos = set(eos_ids(folder))
    sampler = service.create_sampling_client(base_model=folder)
    # Temperature 50 makes the 384 tokens almost equally likely, so EOS turns up now and then.
    params = SamplingParams(max_tokens=48, temperature=50.0, seed=3)
    response = sampler.sample(ModelInput.from_ints(PROMPTS[1]), 64, params).result()
    stopped = 0
    for sequence in response.sequences:
        hits = [i for i, t in enumerate(sequence.tokens) if t in eos]
        if hits:
            assert hits == [len(sequence.tokens) - 1] and sequence.stop_reason == "stop"
            stopped += 1
        else:
            assert len(sequence.tokens) == 48 and sequence.stop_reason == "length"
    assert stopped >= 3


# ---- seeds and batching --------------------------------------------------------------------------


def test_seeds_reproduce_and_differ(tiny_models, service: ServiceClient):
    sampler = service.create_sampling_client(base_model=tiny_models["qwen2"])
    prompt = ModelInput.from_ints(PROMPTS[0])

    def draw(seed):
        params = SamplingParams(max_tokens=10, seed=seed, top_p=0.9)
        return [s.tokens for s in sampler.sample(prompt, 3, params).result().sequences]

    first = draw(1)
    assert draw(1) == first
    assert draw(2) != first
    assert len({tuple(tokens) for tokens in first}) == 3  # the samples of one call differ too
    assert draw(None) != draw(None)


def test_concurrent_requests_are_batched_and_equal_one_at_a_time(
    tiny_models, service: ServiceClient, session_engine: Engine
):
    folder = tiny_models["llama"]
    training = service.create_lora_training_client(folder, rank=4, seed=1)
    perturb(session_engine, training.model_id, seed=9)
    sampler = training.save_weights_and_get_sampling_client()
    tokenizer = sampler.get_tokenizer()
    stop_text = tokenizer.decode([40, 41])
    requests = [
        (PROMPTS[0], 3, SamplingParams(max_tokens=20, seed=1)),
        (PROMPTS[1], 2, SamplingParams(max_tokens=5, seed=2, top_k=20)),
        (PROMPTS[2], 1, SamplingParams(max_tokens=12, temperature=0.0)),
        (PROMPTS[0][:1], 4, SamplingParams(max_tokens=16, seed=3, top_p=0.6, temperature=0.7)),
        (PROMPTS[2], 2, SamplingParams(max_tokens=30, seed=4, stop=[stop_text, "e"])),
        (PROMPTS[1], 3, SamplingParams(max_tokens=25, seed=5, stop=list(range(100, 140)))),
    ]

    def submit(prompt, n, params):
        return sampler.sample(ModelInput.from_ints(prompt), n, params, include_prompt_logprobs=True)

    alone = [submit(*request).result() for request in requests]
    assert set(list(sampler._session.batch_sizes)[-len(requests) :]) == {1}

    # Hold the worker so that every request is queued before the first drain runs.
    gate = threading.Event()
    session_engine.worker(folder).submit(gate.wait)
    futures = [submit(*request) for request in requests]
    gate.set()
    together = [future.result() for future in futures]
    assert sampler._session.batch_sizes[-1] == len(requests)

    lengths = {len(s.tokens) for response in together for s in response.sequences}
    assert len(lengths) > 3  # rows finished at different steps, so rows were dropped mid-batch
    for one, batched in zip(alone, together, strict=True):
        assert [s.tokens for s in batched.sequences] == [s.tokens for s in one.sequences]
        assert [s.stop_reason for s in batched.sequences] == [s.stop_reason for s in one.sequences]
        for a, b in zip(one.sequences, batched.sequences, strict=True):
            # fp32 sums in another order (batch rows, padding), as between forward and sample.
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(one.prompt_logprobs[1:], batched.prompt_logprobs[1:], atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_prepacked_weights_change_nothing(family, tiny_models, service: ServiceClient, monkeypatch):
    """Batches of MIN_ROWS or more decode with prepacked linear weights, q/k/v and gate/up fused
    (and the LoRA hooks still apply to each projection): the same tokens as the plain `F.linear`
    path, logprobs to fp32 rounding. Qwen2 has q/k/v biases, Qwen3 normalises q and k."""
    import bios.engine.decoding as decoding_module
    from bios.engine.packed import MIN_ROWS, PackedLinears

    training = service.create_lora_training_client(tiny_models[family], rank=4, seed=2)
    perturb(service._engine, training.model_id, seed=12)
    sampler = training.save_weights_and_get_sampling_client()
    with sampler._session.model() as model:
        packed_linears = PackedLinears.of(model)
        if packed_linears is None:
            pytest.skip("no oneDNN on this machine: the plain path is the only one")
        layers = model.config.num_hidden_layers
        assert len(packed_linears._groups) == 2 * layers  # q/k/v and gate/up of every layer
    prompt, params = ModelInput.from_ints(PROMPTS[2]), SamplingParams(max_tokens=16, seed=8)
    packed = sampler.sample(prompt, MIN_ROWS + 2, params).result()
    monkeypatch.setattr(decoding_module, "MIN_ROWS", 10**9)
    plain = sampler.sample(prompt, MIN_ROWS + 2, params).result()
    assert [s.tokens for s in packed.sequences] == [s.tokens for s in plain.sequences]
    for a, b in zip(packed.sequences, plain.sequences, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4, rtol=0)


def test_async_twins_and_session_lifetime(tiny_models, service: ServiceClient):
    folder = tiny_models["qwen3"]

    async def main():
        sampler = await service.create_sampling_client_async(base_model=folder)
        params = SamplingParams(max_tokens=4, seed=0)
        response = await sampler.sample_async(ModelInput.from_ints(PROMPTS[0]), 2, params)
        logprobs = await sampler.compute_logprobs_async(ModelInput.from_ints(PROMPTS[0]))
        return sampler, response, logprobs

    sampler, response, logprobs = asyncio.run(main())
    assert isinstance(response, SampleResponse) and len(response.sequences) == 2
    assert logprobs[0] is None and len(logprobs) == len(PROMPTS[0])
    assert sampler.get_base_model() == folder
    session_id = sampler.sampling_session_id
    del sampler
    gc.collect()
    with pytest.raises(NotFoundError):  # a dropped client's snapshot is freed
        service._engine.sampling_session(session_id)


# ---- bad input -----------------------------------------------------------------------------------


def _params(**changes) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 4, **changes})


BAD_SAMPLES = {
    "empty prompt": (ModelInput.empty(), 1, _params(), {}, r"^prompt: is empty"),
    "token out of vocabulary": (
        ModelInput.from_ints([1, 384]),
        1,
        _params(),
        {},
        r"^prompt: token id 384 at position 1 is outside the vocabulary \[0, 384\)",
    ),
    "negative token": (ModelInput.from_ints([-1]), 1, _params(), {}, r"^prompt: token id -1"),
    "prompt longer than context": (
        ModelInput.from_ints([1] * 513),
        1,
        _params(),
        {},
        r"^prompt: length 513 exceeds the model's context of 512",
    ),
    "prompt + max_tokens beyond context": (
        ModelInput.from_ints([1] * 500),
        1,
        _params(max_tokens=13),
        {},
        r"^sampling_params\.max_tokens: prompt \(500 tokens\) \+ max_tokens \(13\) exceeds",
    ),
    "prompt fills the context": (
        ModelInput.from_ints([1] * 512),
        1,
        SamplingParams(),
        {},
        r"^sampling_params\.max_tokens: expected an integer ≥ 1, got 0",
    ),
    "max_tokens 0": (PROMPTS[0], 1, _params(max_tokens=0), {}, r"^sampling_params\.max_tokens"),
    "max_tokens negative": (PROMPTS[0], 1, _params(max_tokens=-3), {}, r"max_tokens.*-3"),
    "negative temperature": (
        PROMPTS[0],
        1,
        _params(temperature=-0.5),
        {},
        r"^sampling_params\.temperature: expected a finite number ≥ 0, got -0\.5",
    ),
    "nan temperature": (PROMPTS[0], 1, _params(temperature=math.nan), {}, r"temperature.*nan"),
    "top_p 0": (PROMPTS[0], 1, _params(top_p=0.0), {}, r"^sampling_params\.top_p: .*\(0, 1\]"),
    "top_p above 1": (PROMPTS[0], 1, _params(top_p=1.5), {}, r"^sampling_params\.top_p"),
    "top_k 0": (PROMPTS[0], 1, _params(top_k=0), {}, r"^sampling_params\.top_k: expected -1"),
    "top_k -2": (PROMPTS[0], 1, _params(top_k=-2), {}, r"^sampling_params\.top_k"),
    "empty stop string": (PROMPTS[0], 1, _params(stop=[""]), {}, r"^sampling_params\.stop"),
    "stop id outside vocab": (PROMPTS[0], 1, _params(stop=[999]), {}, r"^sampling_params\.stop"),
    "num_samples 0": (PROMPTS[0], 0, _params(), {}, r"^num_samples: expected an integer ≥ 1"),
    "topk_prompt_logprobs negative": (
        PROMPTS[0],
        1,
        _params(),
        {"topk_prompt_logprobs": -1},
        r"^topk_prompt_logprobs",
    ),
    "params not SamplingParams": (PROMPTS[0], 1, 4, {}, r"^sampling_params: expected"),
    "unknown params key": (PROMPTS[0], 1, {"max_tokenz": 3}, {}, r"^sampling_params\.max_tokenz"),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_bad_sample_requests_are_rejected_and_change_nothing(
    case, service: ServiceClient, session_engine: Engine, llama
):
    training = service.create_lora_training_client(llama, rank=4, seed=0)
    perturb(session_engine, training.model_id, seed=3)
    sampler = training.save_weights_and_get_sampling_client()
    run = session_engine.run(training.model_id)
    before = state_fingerprint(run)
    batches = len(sampler._session.batch_sizes)
    prompt, n, params, extra, message = BAD_SAMPLES[case]
    prompt = prompt if isinstance(prompt, ModelInput) else ModelInput.from_ints(prompt)
    with pytest.raises(InvalidInputError, match=message):
        sampler.sample(prompt, n, params, **extra)
    assert state_fingerprint(run) == before
    assert sampler._session._pending == [] and len(sampler._session.batch_sizes) == batches
    # The sampler still works.
    assert len(greedy(sampler, PROMPTS[0], 3)) == 3


def test_bad_sampling_clients_and_logprob_requests(service: ServiceClient, llama):
    with pytest.raises(InvalidInputError, match=r"^model_path: give model_path or base_model"):
        service.create_sampling_client()
    with pytest.raises(InvalidInputError, match=r"^model_path: no checkpoint at bios://"):
        service.create_sampling_client(model_path="bios://0123abcd/sampler_weights/missing")
    with pytest.raises(InvalidInputError, match=r"^model_path: expected bios://"):
        service.create_sampling_client(model_path="not-a-path")
    training: TrainingClient = service.create_lora_training_client(llama, rank=4, seed=0)
    with pytest.raises(InvalidInputError, match=r"^model_path"):
        training.create_sampling_client(f"bios://{training.model_id}/weights/never-saved")
    sampler = service.create_sampling_client(base_model=llama)
    with pytest.raises(InvalidInputError, match=r"^prompt: is empty"):
        sampler.compute_logprobs(ModelInput.empty())
    with pytest.raises(InvalidInputError, match=r"^prompt: token id 500"):
        sampler.compute_logprobs(ModelInput.from_ints([3, 500]))


# ---- the inverse CDF -----------------------------------------------------------------------------


def test_inverse_cdf_equals_one_running_sum():
    """The two-level search picks the token a single float64 running sum (numpy) picks, on rows
    with zeros (truncated sampling), widths that are not a multiple of the block, and u near 1."""
    from bios.engine.decoding import CDF_BLOCK, inverse_cdf

    generator = torch.Generator().manual_seed(0)
    for width in (7, CDF_BLOCK, 3 * CDF_BLOCK + 41, 49_152):
        logits = torch.randn(64, width, generator=generator) * 4
        logits[:32] = logits[:32].masked_fill(
            torch.rand(32, width, generator=generator) < 0.7, -1e9
        )
        probs = logits.softmax(dim=-1)
        uniforms = torch.rand(64, generator=generator, dtype=torch.float64)
        uniforms[-4:] = torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0))
        chosen = inverse_cdf(probs, uniforms)
        cdf = np.cumsum(probs.double().numpy(), axis=-1)
        for row in range(64):
            target = uniforms[row].item() * cdf[row, -1]
            expected = int(np.searchsorted(cdf[row], target, side="right"))
            expected = min(expected, int(np.flatnonzero(probs[row] > 0)[-1]))
            assert chosen[row].item() == expected, (width, row)
            assert probs[row, chosen[row]] > 0


def test_fused_projections_fall_back_when_not_called_as_siblings():
    """A sibling projection called with another input than the group's first computes alone."""
    from bios.engine.packed import PackedLinears

    torch.manual_seed(0)
    block = torch.nn.Module()
    block.q_proj, block.k_proj, block.v_proj = (torch.nn.Linear(8, n) for n in (8, 4, 4))
    block.o_proj = torch.nn.Linear(8, 8)
    packed = PackedLinears.of(block)
    if packed is None:
        pytest.skip("no oneDNN on this machine")
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    expected = [layer(x) for layer in (block.q_proj, block.k_proj, block.v_proj)]
    with torch.no_grad(), packed.installed():
        q, k_other = block.q_proj(x), block.k_proj(y)
        v = block.v_proj(x)
        k_alone = block.k_proj(x)  # the group is done: computes alone
    torch.testing.assert_close(q, expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        k_other, torch.nn.functional.linear(y, block.k_proj.weight, block.k_proj.bias)
    )
    torch.testing.assert_close(v, expected[2], rtol=0, atol=1e-5)
    torch.testing.assert_close(k_alone, expected[1], rtol=0, atol=1e-5)


def test_fused_rms_norms_equal_the_model_classes():
    """`rms_norm` in one call gives what the Llama / Qwen2 / Qwen3 RMSNorm forwards compute."""
    from bios.engine.fused_norms import RMS_NORMS, fused_rms_norms

    torch.manual_seed(0)
    for norm_class in RMS_NORMS:
        holder = torch.nn.Sequential(norm_class(24, eps=1e-5))
        with torch.no_grad():
            holder[0].weight.uniform_(0.5, 1.5)
        x = torch.randn(4, 3, 24) * 3
        expected = holder(x)
        with fused_rms_norms(holder):
            assert "forward" in vars(holder[0])  # swapped on the instance
            fused = holder(x)
        assert "forward" not in vars(holder[0])  # and restored
        torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)


# ---- the static cache of CUDA graphs, run eagerly ----------------------------------------------


def test_decode_windows():
    from bios.engine.decode_graph import MIN_WINDOW, graphs_enabled, window_for

    assert window_for(1, 10_000) == MIN_WINDOW
    assert window_for(MIN_WINDOW, 10_000) == MIN_WINDOW
    assert window_for(MIN_WINDOW + 1, 10_000) == 2 * MIN_WINDOW
    assert window_for(5 * MIN_WINDOW, 10_000) == 8 * MIN_WINDOW
    assert window_for(5 * MIN_WINDOW, 6 * MIN_WINDOW) == 6 * MIN_WINDOW  # the buffer's end
    assert not graphs_enabled(torch.device("cpu"))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_static_cache_decodes_as_the_dynamic_cache(
    family, tiny_models, service: ServiceClient, monkeypatch
):
    """The decode a GPU replays as CUDA graphs (a static cache written at a device-held position,
    attention over a fixed window under a mask, `bios.engine.decode_graph`), run eagerly here:
    the same tokens and, to float32 rounding, the same logprobs as the dynamic cache, with
    prompts of three lengths (padding), a LoRA adapter, a greedy and a truncated request, rows
    dropped when they finish (smaller batches) and two windows; and the same responses when the
    decode is cut into one-step turns."""
    import bios.engine.decode_graph as decode_graph
    from bios.engine.decoding import Decoder, SampleRequest, SampleSettings

    monkeypatch.setattr(decode_graph, "MIN_WINDOW", 4)
    windows: list[int] = []
    window_for = decode_graph.window_for

    def recording_window(positions: int, room: int) -> int:
        windows.append(window_for(positions, room))
        return windows[-1]

    monkeypatch.setattr(decode_graph, "window_for", recording_window)
    training = service.create_lora_training_client(tiny_models[family], rank=4, seed=3)
    perturb(service._engine, training.model_id, seed=13)
    sampler = training.save_weights_and_get_sampling_client()

    def settings(max_tokens: int, seed: int, **changes) -> SampleSettings:
        values = dict(temperature=1.0, top_k=-1, top_p=1.0) | changes
        return SampleSettings(max_tokens=max_tokens, seed=seed, **values)

    requests = [
        SampleRequest(PROMPTS[0], 3, settings(20, 1)),
        SampleRequest(PROMPTS[1], 2, settings(3, 2)),  # its rows end first: the batch shrinks
        SampleRequest(PROMPTS[2], 2, settings(14, 3, temperature=0.0)),
        SampleRequest(PROMPTS[2], 1, settings(20, 4, temperature=0.7, top_k=20, top_p=0.9)),
    ]
    outputs = {}
    with sampler._session.model() as model, torch.inference_mode():
        for static in (False, True):
            decoder = Decoder(model, requests, tokenizer=None, static_cache=static)
            outputs[static] = decoder.run()
            assert (decoder.static_step is not None) == static
        turns = Decoder(model, requests, tokenizer=None, static_cache=True)
        while not turns.advance(model, 0.0):  # one step a turn, as a long decode is cut
            pass
    for whole, cut in zip(outputs[True], turns.responses(), strict=True):
        assert whole == cut
    assert decoder.static_step.room == len(PROMPTS[2]) + 20
    # 8 rows; less the second request's 2 after 3 tokens, the greedy request's 2 after 14.
    assert len(decoder.static_step.layers[0].buffers[0]) == 4
    assert sorted(set(windows)) == [16, 29]  # 10 positions -> 16; 17 -> 29, the buffer's end
    for dynamic, static in zip(outputs[False], outputs[True], strict=True):
        for a, b in zip(dynamic.sequences, static.sequences, strict=True):
            assert a.tokens == b.tokens and a.stop_reason == b.stop_reason
            # fp32 sums in another order (the masked window), as between batched and alone.
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
    assert [len(s.tokens) for s in outputs[True][1].sequences] == [3, 3]
    assert [len(s.tokens) for s in outputs[True][2].sequences] == [14, 14]
