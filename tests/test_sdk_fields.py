"""Every field SDK 0.38 can send is honoured, with its effect checked, or refused with a 400 that
names it: nothing a client sends is silently ignored.

The official `tinker` SDK (the newest) drives a real `bios serve` process on a tiny Llama; the
numbers it gets back are checked against the model's own logits, computed here with
transformers from the same folder.
"""

from __future__ import annotations

import math
import time

import httpx
import pytest
import tinker
import torch
from tinker import types
from transformers import AutoModelForCausalLM

from bios.engine.decoding import top_of_distribution
from server_process import ServerProcess

PROMPT = [5, 17, 33, 2, 9, 41]


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("sdk-fields"), [tiny_models["llama"]])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def service(server):
    with tinker.ServiceClient(base_url=server.url, api_key="tml-sdk-fields") as client:
        yield client


@pytest.fixture(scope="module")
def base_sampler(service, tiny_models):
    return service.create_sampling_client(base_model=tiny_models["llama"]).result()


@pytest.fixture(scope="module")
def reference(tiny_models):
    """The base model's next-token logprobs after each prefix: log p(· | tokens[:i + 1])."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    model.eval()

    def logprobs(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
        return logits.log_softmax(dim=-1)

    return logprobs


def post(server, route: str, body: dict) -> httpx.Response:
    headers = {"X-API-Key": "tml-sdk-fields"}
    return httpx.post(f"{server.url}/api/v1/{route}", json=body, headers=headers, timeout=60)


def refused(response: httpx.Response, field: str) -> str:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"].startswith(f"{field}:"), body
    return body["error"]


# ---- honoured ------------------------------------------------------------------------------------


def test_topk_sample_logprobs_are_the_top_of_the_sampled_distribution(base_sampler, reference):
    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=11)
    response = base_sampler.sample(
        types.ModelInput.from_ints(PROMPT), 2, params, topk_sample_logprobs=3
    ).result()
    for sequence in response.sequences:
        tokens = sequence.tokens
        assert len(sequence.topk_logprobs) == len(tokens)
        logprobs = reference(PROMPT + tokens)
        for step, pairs in enumerate(sequence.topk_logprobs):
            expected = logprobs[len(PROMPT) - 1 + step].topk(3)
            assert [token for token, _ in pairs] == expected.indices.tolist()
            assert [value for _, value in pairs] == pytest.approx(
                expected.values.tolist(), abs=1e-4
            )
            if tokens[step] in expected.indices.tolist():  # the sampled token's own logprob
                assert dict(pairs)[tokens[step]] == pytest.approx(sequence.logprobs[step], abs=1e-4)


def test_topk_sample_logprobs_under_truncation_sum_to_one(base_sampler, reference):
    params = types.SamplingParams(max_tokens=3, temperature=0.7, top_k=2, seed=3)
    response = base_sampler.sample(
        types.ModelInput.from_ints(PROMPT), 1, params, topk_sample_logprobs=4
    ).result()
    (sequence,) = response.sequences
    logprobs = reference(PROMPT + sequence.tokens)
    for step, pairs in enumerate(sequence.topk_logprobs):
        assert len(pairs) == 2  # π holds the top_k = 2 tokens only
        assert math.fsum(math.exp(v) for _, v in pairs) == pytest.approx(1.0, abs=1e-5)
        # π over two tokens is softmax(z / T) renormalised: its log-odds are (z1 - z2) / T.
        row = logprobs[len(PROMPT) - 1 + step]
        (a, la), (b, lb) = pairs
        assert la - lb == pytest.approx(float(row[a] - row[b]) / 0.7, abs=1e-4)
        assert sequence.tokens[step] in (a, b)


def test_greedy_topk_is_the_point_mass():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5]])
    ids, values = top_of_distribution(logits, 0.0, -1, 1.0, 3)
    assert ids[0, 0] == 1 and values[0].tolist() == [0.0, -math.inf, -math.inf]


def test_prompt_logprobs_last_n_scores_only_the_tail(base_sampler, reference):
    prompt = types.ModelInput.from_ints(PROMPT)
    whole = base_sampler.compute_logprobs(prompt).result()
    tail = base_sampler.compute_logprobs(prompt, prompt_logprobs_last_n=2).result()
    assert tail[:-2] == [None] * (len(PROMPT) - 2)
    assert tail[-2:] == pytest.approx(whole[-2:], abs=1e-5)
    expected = reference(PROMPT)[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    assert whole[1:] == pytest.approx(expected.tolist(), abs=1e-4)
    response = base_sampler.sample(
        prompt,
        1,
        types.SamplingParams(max_tokens=1),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=2,
        prompt_logprobs_last_n=3,
    ).result()
    assert response.topk_prompt_logprobs[: len(PROMPT) - 3] == [None] * (len(PROMPT) - 3)
    for position in range(len(PROMPT) - 3, len(PROMPT)):
        top = reference(PROMPT)[position - 1].topk(2)
        assert [t for t, _ in response.topk_prompt_logprobs[position]] == top.indices.tolist()


def test_prompt_logprobs_last_n_out_of_range_is_refused(server, tiny_models):
    body = {
        "base_model": tiny_models["llama"],
        "prompt": {"chunks": [{"tokens": PROMPT, "type": "encoded_text"}]},
        "sampling_params": {"max_tokens": 1},
        "prompt_logprobs": True,
        "prompt_logprobs_last_n": len(PROMPT),
    }
    assert "prompt's length - 1" in refused(post(server, "asample", body), "prompt_logprobs_last_n")


def test_topk_prompt_logprobs_position_zero_reads_back_as_none(base_sampler):
    response = base_sampler.sample(
        types.ModelInput.from_ints(PROMPT),
        1,
        types.SamplingParams(max_tokens=1),
        topk_prompt_logprobs=2,
    ).result()
    assert response.topk_prompt_logprobs[0] is None
    assert all(len(pairs) == 2 for pairs in response.topk_prompt_logprobs[1:])


def test_an_empty_stop_list_turns_the_end_of_sequence_stop_off(service, tiny_models):
    sampler = service.create_sampling_client(base_model=tiny_models["llama"]).result()
    prompt = types.ModelInput.from_ints(PROMPT)
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
    tokens = sampler.sample(prompt, 1, greedy).result().sequences[0].tokens
    # The first greedy token as a stop token ends the decode there ...
    stopped = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0, stop=[tokens[0]])
    ).result()
    assert stopped.sequences[0].tokens == tokens[:1]
    assert stopped.sequences[0].stop_reason == "stop"
    # ... and `stop=[]` decodes to max_tokens, whatever the model emits.
    free = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    ).result()
    assert len(free.sequences[0].tokens) == 6 and free.sequences[0].stop_reason == "length"


def test_an_empty_stop_list_drops_the_eos_tokens_from_the_stops(session_engine, llama):
    session = session_engine.create_sampling_session(base_model=llama)
    eos = set(session.eos_ids)
    assert eos, "the tiny tokenizer has an end-of-sequence token"
    default = session.check_request(PROMPT, 1, {"max_tokens": 2})
    empty = session.check_request(PROMPT, 1, {"max_tokens": 2, "stop": []})
    assert eos <= set(default.settings.stop_ids) and empty.settings.stop_ids == ()


# ---- refused, naming the field ---------------------------------------------------------------


def test_unknown_fields_are_refused_naming_them(server, tiny_models):
    body = {
        "base_model": tiny_models["llama"],
        "prompt": {"chunks": [{"tokens": PROMPT, "type": "encoded_text"}]},
        "sampling_params": {"max_tokens": 1},
        "frobnicate": 3,
    }
    assert "refused, not ignored" in refused(post(server, "asample", body), "frobnicate")
    nested = {**body, "frobnicate": None}
    del nested["frobnicate"]
    nested["sampling_params"] = {"max_tokens": 1, "min_p": 0.1}
    refused(post(server, "asample", nested), "sampling_params.min_p")
    assert post(server, "create_session", {"tags": [], "colour": "red"}).status_code == 400


@pytest.mark.parametrize(
    ("field", "value"),
    [("prompt_alt_tokens_k", 2), ("target_prompt_logprobs", {"data": [1], "dtype": "int64"})],
)
def test_unimplemented_sample_fields_are_refused(server, tiny_models, field, value):
    body = {
        "base_model": tiny_models["llama"],
        "prompt": {"chunks": [{"tokens": PROMPT, "type": "encoded_text"}]},
        "sampling_params": {"max_tokens": 1},
        "prompt_logprobs": True,
        field: value,
    }
    assert "not implemented by Bios" in refused(post(server, "asample", body), field)


def test_the_sdk_gets_the_refusals(service, tiny_models):
    with pytest.raises(tinker.BadRequestError, match=r"optimizer_config\.type"):
        service.create_lora_training_client(
            tiny_models["llama"], rank=4, optimizer=types.DimuonOptimizerConfig()
        ).result()
    training = service.create_lora_training_client(tiny_models["llama"], rank=4).result()
    with pytest.raises(tinker.BadRequestError, match="kind: Bios serves snapshot samplers only"):
        training.save_weights_and_get_sampling_client(kind="inflight").result()
    with pytest.raises(tinker.BadRequestError, match="optimizer_params"):
        training.optim_step(types.DimuonParams(learning_rate=0.01)).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(PROMPT[:-1]),
        loss_fn_inputs={"target_tokens": PROMPT[1:], "weights": [1.0] * (len(PROMPT) - 1)},
    )
    with pytest.raises(tinker.BadRequestError, match=r"loss_fn_config\['mode'\]"):
        training.forward_backward([datum], "cross_entropy", {"mode": "text"}).result()
    # Each refusal took its turn, so the next request runs at once rather than after the
    # sequencer gives up on a gap (300 s); and nothing took effect.
    started = time.monotonic()
    output = training.forward_backward([datum], "cross_entropy").result()
    assert time.monotonic() - started < 60
    assert output.metrics["loss:sum"] > 0, output.metrics


def test_training_bodies_refuse_what_bios_cannot_honour(server, tiny_models):
    session = post(server, "create_session", {"tags": [], "sdk_version": "x"}).json()["session_id"]
    dimuon = post(
        server,
        "create_model",
        {
            "session_id": session,
            "model_seq_id": 0,
            "base_model": tiny_models["llama"],
            "optimizer_config": {"type": "dimuon", "version": 1},
        },
    )
    assert "AdamW" in refused(dimuon, "optimizer_config.type")
    token = post(
        server,
        "load_weights",
        {
            "model_id": "x",
            "path": "tinker://x/weights/y",
            "optimizer": False,
            "weights_access_token": "secret",
        },
    )
    refused(token, "weights_access_token")
