"""`bios serve`'s OpenAI-compatible endpoint against the official `openai` client.

A real server process with API keys: alice trains a LoRA run a step and saves it; her requests
through the openai client must equal what the official `tinker` SDK's sampling client on the same
server returns for the same prompt and seed (tokens and logprobs, exactly), and the top logprobs
must be those of the distribution sampled from, recomputed here from a plain transformers forward.
Bob can reach none of alice's weights; bad requests get 4xx in OpenAI's error shape.
"""

from __future__ import annotations

import itertools
import os
import threading

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

import bios
from bios.server.app import create_app
from bios.server.config import ServerConfig
from bios.server.openai_replies import token_pieces
from bios.server.state import ServerState
from bios.types import AdamParams
from server_process import ServerProcess
from test_client_api import sft_data
from test_server_security import create_key
from tiny_models import make_tokenizer

os.environ.setdefault("TINKER_TELEMETRY", "0")
import tinker

PROMPT = [5, 17, 42, 8, 99]


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("openai")
    keys = {tenant: create_key(home, tenant) for tenant in ("alice", "bob")}
    model = tiny_models["llama"]
    server = ServerProcess(home, [model], extra_args=["--auth"])
    training = bios.ServiceClient(base_url=server.url, api_key=keys["alice"])
    run = training.create_lora_training_client(model, rank=4, seed=0)
    run.forward_backward(sft_data(), "cross_entropy")
    run.optim_step(AdamParams(learning_rate=5e-2)).result()
    path = run.save_weights_for_sampler("chat-v1").result().path
    sdk = tinker.ServiceClient(base_url=server.url, api_key=keys["alice"])
    yield {
        "server": server,
        "keys": keys,
        "model": model,
        "run": run.model_id,
        "path": path.replace("bios://", "tinker://"),
        "sdk": sdk,
        "tokenizer": AutoTokenizer.from_pretrained(model),
    }
    server.stop()


def client(served, tenant: str = "alice") -> openai.OpenAI:
    key = served["keys"][tenant]
    return openai.OpenAI(base_url=f"{served['server'].url}/v1", api_key=key, max_retries=0)


def sdk_sample(served, model_path: str, tokens: list[int], n: int, topk: int = 0, **params):
    sampler = served["sdk"].create_sampling_client(model_path=model_path).result()
    return sampler.sample(
        prompt=tinker.ModelInput.from_ints(tokens),
        num_samples=n,
        sampling_params=tinker.SamplingParams(**params),
        topk_sample_logprobs=topk,
    ).result()


def token_texts(tokenizer, tokens: list[int]) -> list[str]:
    return [tokenizer.decode([t]) for t in tokens]


def text_of(tokenizer, sequence) -> str:
    """OpenAI's text of a sampled sequence: without a final end-of-sequence token."""
    tokens = list(sequence.tokens)
    if sequence.stop_reason == "stop" and tokens and tokens[-1] == tokenizer.eos_token_id:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)


def test_models_lists_what_the_tenant_may_sample(served):
    alice = [m.id for m in client(served).models.list().data]
    assert alice == [served["model"], served["run"], served["path"]]
    assert [m.id for m in client(served, "bob").models.list().data] == [served["model"]]
    card = client(served).models.retrieve(served["run"])
    assert card.id == served["run"] and card.owned_by == "alice"


def test_completions_equal_the_sdk_sample_for_the_same_seed(served):
    params = dict(max_tokens=12, seed=1234, temperature=0.8, top_p=0.9)
    want = sdk_sample(served, served["path"], PROMPT, 3, topk=3, **params)
    got = client(served).completions.create(
        model=served["path"], prompt=PROMPT, n=3, logprobs=3, **params
    )
    tokenizer = served["tokenizer"]
    assert len(got.choices) == 3
    for choice, sequence in zip(got.choices, want.sequences, strict=True):
        assert choice.logprobs.token_logprobs == list(sequence.logprobs)
        assert choice.logprobs.tokens == token_texts(tokenizer, sequence.tokens)
        assert choice.text == text_of(tokenizer, sequence)
        assert choice.finish_reason == sequence.stop_reason
        for top, pairs in zip(choice.logprobs.top_logprobs, sequence.topk_logprobs, strict=True):
            # A dict keyed by token text: tokens whose texts coincide (broken UTF-8) merge.
            expected = {}
            for token, logprob in pairs:
                expected.setdefault(tokenizer.decode([token]), logprob)
            assert top == expected
    assert got.usage.prompt_tokens == len(PROMPT)
    assert got.usage.completion_tokens == sum(len(s.tokens) for s in want.sequences)
    # The samples of one request differ (each row draws its own uniforms).
    assert len({tuple(s.tokens) for s in want.sequences}) == 3


def test_streamed_completion_equals_the_whole_one(served):
    params = dict(model=served["model"], prompt="The capital of", max_tokens=10, seed=7, n=2)
    whole = client(served).completions.create(**params, logprobs=1)
    chunks = list(
        client(served).completions.create(
            **params, logprobs=1, stream=True, stream_options={"include_usage": True}
        )
    )
    texts, logprobs, finish = ["", ""], [[], []], [None, None]
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.logprobs is not None:
                logprobs[choice.index] += choice.logprobs.token_logprobs
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert texts == [c.text for c in whole.choices]
    assert logprobs == [c.logprobs.token_logprobs for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # The string prompt is tokenized as the tokenizer does, with its special tokens.
    assert whole.usage.prompt_tokens == len(served["tokenizer"].encode("The capital of"))


def test_chat_uses_the_chat_template_and_a_runs_latest_weights(served):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is two plus two?"}]},
    ]
    tokenizer = served["tokenizer"]
    rendered = tokenizer.apply_chat_template(
        [messages[0], {"role": "user", "content": "What is two plus two?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    tokens = tokenizer.encode(rendered, add_special_tokens=False)
    params = dict(max_tokens=9, seed=99, temperature=1.0)
    want = sdk_sample(served, served["path"], tokens, 2, **params)
    # The run's id stands for its newest checkpoint, the one saved above.
    got = client(served).chat.completions.create(
        model=served["run"], messages=messages, n=2, logprobs=True, **params
    )
    assert got.usage.prompt_tokens == len(tokens)
    for choice, sequence in zip(got.choices, want.sequences, strict=True):
        assert [t.logprob for t in choice.logprobs.content] == list(sequence.logprobs)
        assert [t.token for t in choice.logprobs.content] == token_texts(tokenizer, sequence.tokens)
        assert choice.message.role == "assistant"
        assert choice.message.content == text_of(tokenizer, sequence)

    stream = client(served).chat.completions.create(
        model=served["run"], messages=messages, n=2, logprobs=True, stream=True, **params
    )
    contents, logprobs, roles = ["", ""], [[], []], [None, None]
    for chunk in stream:
        for choice in chunk.choices:
            contents[choice.index] += choice.delta.content or ""
            roles[choice.index] = roles[choice.index] or choice.delta.role
            if choice.logprobs is not None:
                logprobs[choice.index] += [t.logprob for t in choice.logprobs.content]
    assert contents == [c.message.content for c in got.choices]
    assert logprobs == [list(s.logprobs) for s in want.sequences]
    assert roles == ["assistant", "assistant"]


def test_top_logprobs_are_those_of_the_distribution_sampled_from(served):
    """π = softmax(z / T) truncated to the smallest top set of mass ≥ top_p, renormalised
    (bios.engine.decoding), recomputed from the base model's logits by hand."""
    temperature, top_p, top = 0.7, 0.8, 5
    params = dict(max_tokens=6, seed=5, temperature=temperature, top_p=top_p)
    sampled = sdk_sample_base(served, PROMPT, **params)
    answer = client(served).completions.create(
        model=served["model"], prompt=PROMPT, logprobs=top, **params
    )
    choice = answer.choices[0]
    assert choice.logprobs.token_logprobs == list(sampled.logprobs)
    model = AutoModelForCausalLM.from_pretrained(served["model"], torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + sampled.tokens[:-1]])).logits[0, len(PROMPT) - 1 :]
    tokenizer = served["tokenizer"]
    for position, token in enumerate(sampled.tokens):
        probs = torch.softmax(logits[position].double() / temperature, dim=-1)
        ordered, ids = probs.sort(descending=True)
        kept = (ordered.cumsum(0) - ordered) < top_p
        pi = ordered[kept] / ordered[kept].sum()
        log_pi = dict(zip(ids[kept].tolist(), pi.log().tolist(), strict=True))
        assert choice.logprobs.token_logprobs[position] == pytest.approx(log_pi[token], abs=1e-4)
        expected = {}
        for token_id in ids[kept][:top].tolist():
            expected.setdefault(tokenizer.decode([token_id]), log_pi[token_id])
        got_top = choice.logprobs.top_logprobs[position]
        assert got_top.keys() == expected.keys()
        for text, logprob in expected.items():
            assert got_top[text] == pytest.approx(logprob, abs=1e-4)


def sdk_sample_base(served, tokens: list[int], **params):
    sampler = served["sdk"].create_sampling_client(base_model=served["model"]).result()
    response = sampler.sample(
        prompt=tinker.ModelInput.from_ints(tokens),
        num_samples=1,
        sampling_params=tinker.SamplingParams(**params),
    ).result()
    return response.sequences[0]


def test_stop_strings_end_the_text_before_them(served):
    params = dict(model=served["model"], prompt=PROMPT, max_tokens=16, seed=11)
    free = client(served).completions.create(**params).choices[0].text
    stop = free[3:5]
    assert len(stop) == 2 and stop in free
    cut = client(served).completions.create(**params, stop=[stop]).choices[0]
    assert cut.text == free[: free.index(stop)]
    assert cut.finish_reason == "stop"


def test_another_tenants_weights_are_not_found(served):
    bob = client(served, "bob")
    for model in (served["path"], served["run"], served["path"].replace("tinker", "bios")):
        with pytest.raises(openai.NotFoundError) as caught:
            bob.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        error = caught.value.body
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "model_not_found" and error["param"] == "model"
    # A sampling session alice made through the Tinker API is hers alone as well.
    sampler = httpx.post(
        f"{served['server'].url}/api/v1/create_sampling_session",
        json={"model_path": served["path"]},
        headers={"X-API-Key": served["keys"]["alice"]},
        timeout=60,
    ).json()["sampling_session_id"]
    with pytest.raises(openai.NotFoundError):
        bob.completions.create(model=sampler, prompt=PROMPT, max_tokens=2)
    mine = client(served).completions.create(model=sampler, prompt=PROMPT, max_tokens=2, seed=4)
    by_path = client(served).completions.create(
        model=served["path"], prompt=PROMPT, max_tokens=2, seed=4
    )
    assert mine.choices[0].text == by_path.choices[0].text


def test_requests_without_a_valid_key_get_401(served):
    for key in ("tml-bios-not-a-key", served["keys"]["alice"][:-2]):
        denied = openai.OpenAI(base_url=f"{served['server'].url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            denied.models.list()
        assert caught.value.body["code"] == "invalid_api_key"


CHAT = {"messages": [{"role": "user", "content": "hi"}]}
BAD_REQUESTS = {
    "tools": ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
    "response_format": ("chat", {"response_format": {"type": "json_object"}}),
    "logit_bias": ("completions", {"logit_bias": {"5": 10}}),
    "presence_penalty": ("chat", {"presence_penalty": 0.5}),
    "frequency_penalty": ("completions", {"frequency_penalty": -1.0}),
    "echo": ("completions", {"echo": True}),
    "best_of": ("completions", {"best_of": 3}),
    "reasoning_effort": ("chat", {"reasoning_effort": "high"}),
    "n": ("chat", {"n": 0}),
    "max_tokens": ("completions", {"max_tokens": 100_000}),
    "temperature": ("chat", {"temperature": -1.0}),
    "top_p": ("completions", {"top_p": 0.0}),
    "messages[0].role": ("chat", {"messages": [{"role": "tool", "content": "x"}]}),
    "messages[0].content": (
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    ),
    "top_logprobs": ("chat", {"top_logprobs": 3}),
    "logprobs": ("completions", {"logprobs": 21}),
    "prompt": ("completions", {"prompt": [5, 100_000]}),
    "stream_options": ("chat", {"stream_options": {"include_usage": True}}),
    "stop": ("completions", {"stop": [""]}),
    "seed": ("completions", {"seed": "1"}),
}


@pytest.mark.parametrize("field", list(BAD_REQUESTS))
def test_bad_requests_get_400_in_openai_shape(served, field):
    route, extra = BAD_REQUESTS[field]
    body = {"model": served["model"], **(CHAT if route == "chat" else {"prompt": PROMPT}), **extra}
    path = "chat/completions" if route == "chat" else "completions"
    response = httpx.post(
        f"{served['server'].url}/v1/{path}",
        json=body,
        headers={"Authorization": f"Bearer {served['keys']['alice']}"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == field and error["message"].startswith(f"{field}:")
    assert error["type"] == "invalid_request_error"


def test_the_openai_client_raises_the_error(served):
    with pytest.raises(openai.BadRequestError) as caught:
        client(served).chat.completions.create(
            model=served["model"], **CHAT, response_format={"type": "json_object"}
        )
    assert "response_format" in caught.value.message
    with pytest.raises(openai.NotFoundError) as caught:
        client(served).completions.create(model="no-such-model", prompt="x")
    assert caught.value.body["code"] == "model_not_found"
    # Routes under /v1 that do not exist, and unreadable bodies, answer in the same shape.
    headers = {"Authorization": f"Bearer {served['keys']['alice']}"}
    url = served["server"].url
    missing = httpx.get(f"{url}/v1/engines", headers=headers)
    assert missing.status_code == 404 and set(missing.json()["error"]) >= {"message", "type"}
    garbled = httpx.post(f"{url}/v1/completions", content=b"{not json", headers=headers)
    assert garbled.status_code == 400 and garbled.json()["error"]["param"] == "body"


def test_concurrent_requests_share_one_held_sampler(served):
    """Requests on one model go to one session (so they batch together), held once."""
    headers = {"X-API-Key": served["keys"]["alice"]}
    metrics = f"{served['server'].url}/api/v1/bios/metrics"
    client(served).completions.create(model=served["path"], prompt=PROMPT, max_tokens=1)
    before = httpx.get(metrics, headers=headers).json()["tenant"]["samplers"]
    results: list = [None] * 6
    errors: list[BaseException] = []

    def ask(index: int) -> None:
        try:
            results[index] = client(served).completions.create(
                model=served["path"], prompt=PROMPT, max_tokens=8, seed=index, logprobs=0
            )
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    after = httpx.get(metrics, headers=headers).json()["tenant"]["samplers"]
    assert after == before  # no sampler more: all six went to the one held already
    alone = client(served).completions.create(
        model=served["path"], prompt=PROMPT, max_tokens=8, seed=3, logprobs=0
    )
    # A batch's tokens are those of each request alone; its logprobs, up to float rounding (the
    # decode batch's shapes differ).
    together = results[3].choices[0]
    assert together.text == alone.choices[0].text
    assert together.logprobs.token_logprobs == pytest.approx(
        alone.choices[0].logprobs.token_logprobs, abs=1e-5
    )


def test_an_oversize_body_gets_413_in_openai_shape(tmp_path):
    """The server's body limit (a middleware outside the /v1 app) answers /v1 in its shape."""
    state = ServerState(ServerConfig(home=tmp_path, max_body_bytes=1000))
    with TestClient(create_app(state)) as http:
        body = {"model": "m", "prompt": "x" * 2000}
        refused = http.post("/v1/completions", json=body)
        assert refused.status_code == 413
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        assert "over the limit" in refused.json()["error"]["message"]
        elsewhere = http.post("/api/v1/create_session", json={"tags": ["x" * 2000]})
        assert elsewhere.status_code == 413 and "category" in elsewhere.json()


def test_stream_pieces_hold_back_split_characters():
    """Byte-level tokens split a multi-byte character: no piece shows half of one, and the
    pieces join to the text."""
    tokenizer = make_tokenizer()
    text = "Paris é€😀 Rome"
    tokens = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in tokens)  # the case under test
    pieces = token_pieces(tokenizer, tokens, text)
    assert "".join(pieces) == text and len(pieces) == len(tokens)
    assert not any("\ufffd" in piece for piece in pieces)
    # A stop string cut the text: the pieces stop where it does, the earlier ones unchanged.
    cut = token_pieces(tokenizer, tokens, "Paris é")
    assert "".join(cut) == "Paris é"
    kept = next(i for i in range(len(pieces)) if len("".join(pieces[: i + 1])) >= len("Paris é"))
    assert cut[:kept] == pieces[:kept] and not any(cut[kept + 1 :])


def test_a_stream_sends_only_text_that_stays(tiny_models):
    """Between turns a stream sends the tokens so far less what may still change: what it has
    sent is always a prefix of the final text (a stop string's beginning is held back), and the
    rest completes it exactly."""
    from bios.server.openai_replies import Reply, StreamedChoice, TokenText, choice_of
    from bios.types import SampledSequence

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    tokens = tokenizer.encode("Paris is the capital of France. Rome", add_special_tokens=False)
    stop = ("of France",)
    final = choice_of(
        0,
        SampledSequence(stop_reason="stop", tokens=tokens, logprobs=[0.0] * len(tokens)),
        tokenizer,
        (),
        stop,
    )
    assert final.text == "Paris is the capital "
    reply = Reply(id="x", created=0, model="m", logprobs=False, prompt_tokens=1)
    names, stream = TokenText(tokenizer), StreamedChoice("text_completion", stop)
    sent = []
    # The decode's turns, one token each, until the stop string is complete (that ends it).
    for n in itertools.takewhile(
        lambda n: stop[0] not in tokenizer.decode(tokens[:n]), itertools.count(1)
    ):
        partial = SampledSequence(stop_reason="length", tokens=tokens[:n], logprobs=[0.0] * n)
        for chunk in stream.emit(reply, choice_of(0, partial, tokenizer, (), ()), names):
            sent.append(chunk["choices"][0]["text"])
            assert final.text.startswith("".join(sent))
    assert sent and len("".join(sent)) < len(final.text)  # some went early, some waited
    rest = stream.finish(reply, final, names)
    assert "".join(sent) + "".join(c["choices"][0]["text"] for c in rest) == final.text
    assert rest[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_long_stream_arrives_in_pieces(served):
    """A stream whose decode takes several turns delivers its first tokens before the last
    ones exist: chunks arrive in bursts, one a turn, not all at once at the end."""
    import time

    params = dict(model=served["model"], prompt="The capital of", max_tokens=400, seed=3, n=8)
    whole = client(served).completions.create(**params)
    arrivals, texts = [], [""] * 8
    for chunk in client(served).completions.create(**params, stream=True):
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.monotonic())
            texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [c.text for c in whole.choices]
    # Delivered in more than one burst: ~50 ms turns over 8 samples' decode (~2 s here).
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert max(gaps) > 0.01 and arrivals[-1] - arrivals[0] > 0.05, gaps[:10]
