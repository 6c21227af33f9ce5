"""The client API, the same tests through both transports: in-process and over HTTP.

References are independent of Bios: a plain transformers forward for logprobs, a second run
with the built-in loss for a custom one, the training client's own greedy decoding for sampling.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

import bios
from bios.engine.engine import Engine
from bios.errors import InvalidInputError
from bios.types import AdamParams, Datum, ModelInput, SamplingParams
from helpers import random_datum, reference_logprobs
from server_process import ServerProcess

ADAM = AdamParams(learning_rate=1e-2)


@pytest.fixture(scope="module")
def http_server(tiny_models, tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("api-server"), [tiny_models["llama"]])
    yield process
    process.stop()


@pytest.fixture(params=["local", "http"])
def service(request, session_engine: Engine) -> bios.ServiceClient:
    if request.param == "local":
        return bios.ServiceClient(engine=session_engine)
    return bios.ServiceClient(
        base_url=request.getfixturevalue("http_server").url, api_key="tml-test"
    )


def sft_data(n: int = 3, seed: int = 0) -> list[Datum]:
    generator = torch.Generator().manual_seed(seed)
    return [random_datum(384, 5 + 2 * i, "cross_entropy", generator) for i in range(n)]


def logprobs(output) -> list[list[float]]:
    return [out["logprobs"].tolist() for out in output.loss_fn_outputs]


def test_forward_matches_transformers(service, llama):
    client = service.create_lora_training_client(llama, rank=4, seed=0)
    data = sft_data()
    out = client.forward(data, "cross_entropy").result()
    model = AutoModelForCausalLM.from_pretrained(llama)
    for datum, got in zip(data, logprobs(out), strict=True):
        assert got == pytest.approx(reference_logprobs(model, datum).tolist(), abs=1e-5)
    info = client.get_info()
    assert info.is_lora and info.lora_rank == 4 and info.model_id == client.model_id
    tokenizer = client.get_tokenizer()
    assert tokenizer.decode(tokenizer.encode("hello there")) == "hello there"


def test_training_in_submission_order(service, llama):
    client = service.create_lora_training_client(llama, rank=4, seed=0)
    data = sft_data()
    first = client.forward(data, "cross_entropy")
    steps = []
    for _ in range(5):
        client.forward_backward(data, "cross_entropy")
        steps.append(client.optim_step(ADAM))
    last = client.forward(data, "cross_entropy")
    assert all(s.result().metrics["grad_norm"] > 0 for s in steps)
    assert last.result().metrics["loss:sum"] < 0.8 * first.result().metrics["loss:sum"]


def test_custom_loss_equals_builtin(service, llama):
    data = sft_data()

    def custom(batch, lps):
        return sum(
            -(lp * d.loss_fn_inputs["weights"].to_torch()).sum()
            for d, lp in zip(batch, lps, strict=True)
        ), {}

    results = []
    for use_custom in (True, False):
        client = service.create_lora_training_client(llama, rank=4, seed=1)
        if use_custom:
            out = client.forward_backward_custom(data, custom).result()
        else:
            out = client.forward_backward(data, "cross_entropy").result()
        client.optim_step(ADAM).result()
        results.append(
            (out.metrics["loss:sum"], logprobs(client.forward(data, "cross_entropy").result()))
        )
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_save_load_and_restore(service, llama):
    client = service.create_lora_training_client(llama, rank=4, seed=2)
    data = sft_data()
    client.forward_backward(data, "cross_entropy")
    client.optim_step(ADAM)
    path = client.save_state("api").result().path
    assert path.startswith("bios://") and path.endswith("/weights/api")
    expected = logprobs(client.forward(data, "cross_entropy").result())
    restored = service.create_training_client_from_state_with_optimizer(path)
    assert logprobs(restored.forward(data, "cross_entropy").result()) == expected
    # One more identical step on both: equal again only if the AdamW moments were restored.
    for c in (client, restored):
        c.forward_backward(data, "cross_entropy")
        c.optim_step(ADAM).result()
    after = [logprobs(c.forward(data, "cross_entropy").result()) for c in (client, restored)]
    for a, b in zip(*after, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    fresh = service.create_lora_training_client(llama, rank=4, seed=9)
    fresh.load_state(path).result()
    assert logprobs(fresh.forward(data, "cross_entropy").result()) == expected


def test_sampling_from_the_trained_weights(service, llama):
    client = service.create_lora_training_client(llama, rank=4, seed=3)
    data = sft_data()
    for _ in range(3):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(ADAM)
    sampler = client.save_weights_and_get_sampling_client()
    prompt = ModelInput.from_ints([5, 17, 42, 9])
    greedy = sampler.sample(prompt, 1, SamplingParams(max_tokens=6, temperature=0.0)).result()
    assert greedy.sequences[0].tokens == client.generate(prompt, max_tokens=6).result()
    sampled = sampler.sample(prompt, 3, SamplingParams(max_tokens=5, seed=11)).result()
    assert len(sampled.sequences) == 3 and all(
        len(s.logprobs) == len(s.tokens) for s in sampled.sequences
    )
    # The sampled tokens' logprobs (temperature 1) are the trainer's logprobs of the same tokens.
    sequence = sampled.sequences[0]
    tokens = prompt.to_ints() + sequence.tokens
    datum = Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    trainer = (
        client.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    )
    assert sequence.logprobs == pytest.approx(trainer[-len(sequence.tokens) :], abs=1e-4)
    prompt_lps = sampler.compute_logprobs(prompt).result()
    assert prompt_lps[0] is None and prompt_lps[1:] == pytest.approx(
        trainer[: len(prompt_lps) - 1], abs=1e-4
    )


def test_preference_objective(service, llama):
    client = service.create_lora_training_client(llama, rank=4, seed=4)
    chosen, rejected = sft_data(2, seed=5)
    out = client.forward([chosen, rejected], "dpo", {"beta": 0.5}).result()
    assert out.metrics["reward_margin:mean"] == pytest.approx(0.0, abs=1e-6)  # policy = reference


@pytest.mark.parametrize(
    "case, call, message",
    [
        (
            "unknown loss",
            lambda c, d: c.forward_backward(d, "ppo2"),
            r"loss_fn: unknown loss 'ppo2'",
        ),
        (
            "missing key",
            lambda c, d: c.forward_backward(d, "ppo"),
            r"weights'\]: not an input of loss_fn 'ppo'",
        ),
        (
            "empty batch",
            lambda c, d: c.forward_backward([], "cross_entropy"),
            r"data: expected a non-empty",
        ),
        ("bad name", lambda c, d: c.save_state("../x"), r"name: expected 1-128"),
    ],
)
def test_bad_input_raises_at_call_time(case, call, message, service, llama):
    client = service.create_lora_training_client(llama, rank=4, seed=0)
    data = sft_data(1)
    before = logprobs(client.forward(data, "cross_entropy").result())
    with pytest.raises(InvalidInputError, match=message):
        call(client, data)
    client.optim_step(ADAM).result()  # nothing was accumulated, so this step changes nothing
    assert logprobs(client.forward(data, "cross_entropy").result()) == before


def test_full_finetuning(service, llama):
    client = service.create_full_training_client(llama)
    assert client.get_info().is_lora is False
    data = sft_data()
    first = client.forward(data, "cross_entropy").result().metrics["loss:sum"]
    client.forward_backward(data, "cross_entropy")
    client.optim_step(AdamParams(learning_rate=1e-3)).result()
    assert client.forward(data, "cross_entropy").result().metrics["loss:sum"] < first


HTTP_ONLY = """
import sys
import bios
from bios.types import Datum, ModelInput
service = bios.ServiceClient(base_url=sys.argv[1], api_key="tml-test")
training = service.create_lora_training_client(sys.argv[2], rank=2)
datum = Datum(
    model_input=ModelInput.from_ints([1, 2, 3]),
    loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
)
output = training.forward([datum], "cross_entropy").result()
assert len(output.loss_fn_outputs) == 1
loaded = sorted(m for m in sys.modules if m == "bios.engine" or m.startswith("bios.engine."))
print("engine modules:", loaded)
sys.exit(1 if loaded else 0)
"""


def test_http_user_never_loads_the_engine(http_server, llama):
    """`import bios` and a training call over HTTP, in a fresh interpreter: no bios.engine."""
    done = subprocess.run(
        [sys.executable, "-c", HTTP_ONLY, http_server.url, llama],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "engine modules: []" in done.stdout


def test_user_metadata_reaches_the_run(request, service, llama, session_engine):
    """`user_metadata` given to any creating call is kept with the run, through both transports:
    on the engine's run in-process, in the server's record of the run over HTTP."""
    metadata = {"renderer": "role_colon", "owner": "tests"}
    client = service.create_lora_training_client(llama, rank=2, user_metadata=metadata)
    path = client.save_state("meta").result().path
    restored = service.create_training_client_from_state(path, user_metadata={"from": "state"})
    expected = {client.model_id: metadata, restored.model_id: {"from": "state"}}
    for model_id, wanted in expected.items():
        if isinstance(service._engine, Engine):
            assert session_engine.run(model_id).user_metadata == wanted
        else:
            server = request.getfixturevalue("http_server")
            response = httpx.get(
                f"{server.url}/api/v1/training_runs/{model_id}",
                headers={"X-API-Key": "tml-test"},
            )
            assert response.status_code == 200
            assert response.json()["user_metadata"] == wanted
