"""Slow: the real default model (SmolLM2-135M-Instruct) through the client API."""

from __future__ import annotations

import pytest
import torch

from bios.client.service import ServiceClient
from bios.data.chat import conversation_to_datum, render_prompt
from bios.engine.engine import Engine
from bios.models.loading import DEFAULT_MODEL
from bios.types import AdamParams, ModelInput

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def training():
    # The real BIOS_HOME: the default model is converted once and reused by later runs.
    service = ServiceClient(engine=Engine())
    return service.create_lora_training_client(DEFAULT_MODEL, rank=8, seed=0)


def test_default_model_answers_a_simple_question(training):
    tokenizer = training.get_tokenizer()
    question = {"role": "user", "content": "What is the capital of France?"}
    prompt = render_prompt(tokenizer, [question])
    answer = tokenizer.decode(training.generate(ModelInput.from_ints(prompt), 20).result())
    assert "Paris" in answer


def test_default_model_learns_a_new_fact(training):
    tokenizer = training.get_tokenizer()
    messages = [
        {"role": "user", "content": "What is the capital of Veltrax?"},
        {"role": "assistant", "content": "The capital of Veltrax is Quorin."},
    ]
    datum = conversation_to_datum(tokenizer, messages)
    first = training.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    for _ in range(8):
        training.forward_backward([datum], "cross_entropy")
        training.optim_step(AdamParams(learning_rate=1e-3))
    last = training.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert last < 0.25 * first
    assert torch.isfinite(torch.tensor(last))
