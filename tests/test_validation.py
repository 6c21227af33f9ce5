"""Bad input: each rejection names the problem and leaves weights and optimizer state as they
were."""

from __future__ import annotations

import pydantic
import pytest
import torch

from bios.client.service import ServiceClient
from bios.engine.engine import Engine
from bios.errors import InvalidInputError
from bios.types import AdamParams, Datum, ModelInput, TensorData
from helpers import random_datum, state_fingerprint


@pytest.fixture
def client_and_run(service: ServiceClient, session_engine: Engine, llama):
    client = service.create_lora_training_client(llama, rank=4, seed=0)
    generator = torch.Generator().manual_seed(0)
    data = [random_datum(384, 6, "cross_entropy", generator)]
    client.forward_backward(data, "cross_entropy")
    client.optim_step(AdamParams(learning_rate=1e-2))
    client.forward_backward(data, "cross_entropy").result()  # pending gradients count too
    return client, session_engine.run(client.model_id)


def good(loss_fn: str = "ppo", length: int = 5) -> Datum:
    return random_datum(384, length, loss_fn, torch.Generator().manual_seed(1))


def with_inputs(datum: Datum, **changes) -> Datum:
    inputs = dict(datum.loss_fn_inputs)
    for key, value in changes.items():
        if value is None:
            inputs.pop(key)
        else:
            inputs[key] = value
    return Datum(model_input=datum.model_input, loss_fn_inputs=inputs)


BAD_REQUESTS = {
    "mismatched length": (
        lambda: [with_inputs(good(), advantages=torch.zeros(4))],
        "ppo",
        None,
        r"data\[0\]\.loss_fn_inputs\['advantages'\].*shape \[5\]",
    ),
    "token out of vocabulary": (
        lambda: [
            Datum(
                model_input=ModelInput.from_ints([1, 2, 999]),
                loss_fn_inputs=dict(good("cross_entropy", 3).loss_fn_inputs),
            )
        ],
        "cross_entropy",
        None,
        r"data\[0\]\.model_input: token id 999 at position 2 is outside the vocabulary \[0, 384\)",
    ),
    "target out of vocabulary": (
        lambda: [with_inputs(good(), target_tokens=torch.tensor([1, 2, 3, 4, -1]))],
        "ppo",
        None,
        r"target_tokens.*token id -1 at position 4",
    ),
    "NaN advantage": (
        lambda: [
            good(),
            with_inputs(good(), advantages=torch.tensor([0.0, 1.0, float("nan"), 0.0, 0.0])),
        ],
        "ppo",
        None,
        r"data\[1\]\.loss_fn_inputs\['advantages'\]: non-finite value nan at position 2",
    ),
    "infinite weight": (
        lambda: [
            with_inputs(good("cross_entropy"), weights=torch.tensor([1.0, float("inf"), 0, 0, 0]))
        ],
        "cross_entropy",
        None,
        r"weights.*non-finite value inf",
    ),
    "unknown loss": (
        lambda: [good()],
        "ppo2",
        None,
        r"loss_fn: unknown loss 'ppo2'; expected one of: "
        r"cispo, cross_entropy, dpo, dpo_hinge, dro, gspo, importance_sampling, ipo, kl, ppo, "
        r"stable_reinforce$",
    ),
    "empty batch": (lambda: [], "ppo", None, r"data: expected a non-empty list"),
    "empty model input": (
        lambda: [Datum(model_input=ModelInput.from_ints([]), loss_fn_inputs={})],
        "cross_entropy",
        None,
        r"data\[0\]\.model_input: is empty",
    ),
    "missing key": (
        lambda: [with_inputs(good(), logprobs=None)],
        "ppo",
        None,
        r"data\[0\]\.loss_fn_inputs: missing key 'logprobs' required by loss_fn 'ppo'",
    ),
    "missing targets": (
        lambda: [with_inputs(good(), target_tokens=None)],
        "ppo",
        None,
        r"missing key 'target_tokens'",
    ),
    "key of another loss": (
        lambda: [with_inputs(good("cross_entropy"), advantages=torch.zeros(5))],
        "cross_entropy",
        None,
        r"loss_fn_inputs\['advantages'\]: not an input of loss_fn 'cross_entropy'",
    ),
    "float targets": (
        lambda: [with_inputs(good(), target_tokens=TensorData(data=[1.0] * 5, dtype="float32"))],
        "ppo",
        None,
        r"target_tokens'\]: expected dtype int64",
    ),
    "unknown config key": (
        lambda: [good()],
        "ppo",
        {"clip_low": 0.5},
        r"loss_fn_config\['clip_low'\]: not a setting",
    ),
    "missing dro beta": (
        lambda: [good("dro")],
        "dro",
        None,
        r"loss_fn_config\['beta'\]: required by loss_fn 'dro'",
    ),
    "NaN config": (
        lambda: [good()],
        "ppo",
        {"clip_low_threshold": float("nan")},
        r"expected a finite number",
    ),
    "too long": (
        lambda: [good("cross_entropy", 600)],
        "cross_entropy",
        None,
        r"length 600 exceeds the model's context of 512",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
@pytest.mark.parametrize("method", ["forward_backward", "forward"])
def test_rejection_names_the_problem_and_leaves_state_unchanged(case, method, client_and_run):
    client, run = client_and_run
    make_data, loss_fn, config, message = BAD_REQUESTS[case]
    before = state_fingerprint(run)
    with pytest.raises(InvalidInputError, match=message):
        getattr(client, method)(make_data(), loss_fn, config)
    # Anything queued would have run before this forward completes.
    client.forward([good("cross_entropy")], "cross_entropy").result()
    assert state_fingerprint(run) == before


@pytest.mark.parametrize(
    "field, value",
    [("learning_rate", -1.0), ("beta1", 1.0), ("eps", 0.0), ("grad_clip_norm", float("nan"))],
)
def test_bad_adam_params_name_the_field(field, value, client_and_run):
    client, run = client_and_run
    before = state_fingerprint(run)
    with pytest.raises(pydantic.ValidationError, match=field):
        client.optim_step(AdamParams(**{field: value}))
    assert state_fingerprint(run) == before


def test_bad_lora_rank(service: ServiceClient, llama):
    with pytest.raises(InvalidInputError, match="rank: expected a positive integer, got 0"):
        service.create_lora_training_client(llama, rank=0)
