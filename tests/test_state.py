"""Checkpoints: save -> load restores logits and optimizer moments; PEFT reads the adapter."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from bios.client.service import ServiceClient
from bios.engine.engine import Engine
from bios.errors import InvalidInputError, NotFoundError
from bios.types import AdamParams
from helpers import random_datum, reference_logprobs, state_fingerprint

ADAM = AdamParams(learning_rate=5e-3)


def trained_client(service: ServiceClient, model: str, steps: int = 2, **kwargs):
    client = service.create_lora_training_client(model, rank=4, seed=1, **kwargs)
    generator = torch.Generator().manual_seed(0)
    data = [random_datum(384, 10, "cross_entropy", generator) for _ in range(3)]
    for _ in range(steps):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(ADAM).result()
    return client, data


def logprobs(client, data) -> list[torch.Tensor]:
    out = client.forward(data, "cross_entropy").result()
    return [o["logprobs"].to_torch() for o in out.loss_fn_outputs]


def moments(engine: Engine, client) -> dict[str, torch.Tensor]:
    run = engine.run(client.model_id)
    return {
        f"{name}.{key}": torch.as_tensor(value).clone()
        for name, param in run.parameters.items()
        for key, value in run.optimizer.state[param].items()
    }


def test_save_and_load_state_restores_logits_and_moments(
    service: ServiceClient, session_engine: Engine, llama
):
    client, data = trained_client(service, llama)
    path = client.save_state("step2").result().path
    assert path == f"bios://{client.model_id}/weights/step2"
    expected_logprobs, expected_moments = logprobs(client, data), moments(session_engine, client)

    restored = service.create_training_client_from_state_with_optimizer(path)
    assert restored.model_id != client.model_id
    for got, want in zip(logprobs(restored, data), expected_logprobs, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    got_moments = moments(session_engine, restored)
    assert got_moments.keys() == expected_moments.keys() and len(got_moments) > 0
    for key, value in expected_moments.items():
        assert torch.equal(got_moments[key], value), key

    # The next step from the restored state equals the next step of the original run.
    for c in (client, restored):
        c.forward_backward(data, "cross_entropy")
        c.optim_step(ADAM).result()
    for got, want in zip(logprobs(restored, data), logprobs(client, data), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_load_state_without_optimizer_resets_moments(
    service: ServiceClient, session_engine: Engine, llama
):
    client, data = trained_client(service, llama)
    path = client.save_state("weights-only").result().path
    fresh = service.create_lora_training_client(llama, rank=4, seed=99)
    fresh.load_state(path).result()
    assert not session_engine.run(fresh.model_id).optimizer.state
    for got, want in zip(logprobs(fresh, data), logprobs(client, data), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    weights_only = service.create_training_client_from_state(path)
    assert not session_engine.run(weights_only.model_id).optimizer.state


def test_peft_loads_the_saved_adapter(service: ServiceClient, session_engine: Engine, tiny_models):
    client, data = trained_client(service, tiny_models["qwen3"])
    client.save_weights_for_sampler("for-peft").result()
    folder = session_engine.home / "runs" / client.model_id / "sampler_weights" / "for-peft"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 32 and config["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(tiny_models["qwen3"])
    model = PeftModel.from_pretrained(base, folder)
    for datum, got in zip(data, logprobs(client, data), strict=True):
        torch.testing.assert_close(
            got, reference_logprobs(model, datum).detach(), atol=1e-5, rtol=1e-5
        )


def test_full_finetune_state_round_trip(service: ServiceClient, session_engine: Engine, llama):
    client = service.create_full_training_client(llama)
    generator = torch.Generator().manual_seed(0)
    data = [random_datum(384, 8, "cross_entropy", generator)]
    client.forward_backward(data, "cross_entropy")
    client.optim_step(AdamParams(learning_rate=1e-3)).result()
    path = client.save_state("full").result().path
    restored = service.create_training_client_from_state_with_optimizer(path)
    assert restored.get_info().is_lora is False
    assert state_fingerprint(session_engine.run(restored.model_id)) == state_fingerprint(
        session_engine.run(client.model_id)
    )


def test_checkpoints_are_atomic_and_names_checked(
    service: ServiceClient, session_engine: Engine, llama
):
    client, _ = trained_client(service, llama, steps=1)
    client.save_state("once").result()
    run_folder = session_engine.home / "runs" / client.model_id / "weights"
    with pytest.raises(InvalidInputError, match="already exists"):
        client.save_state("once")
    client.save_state("once", overwrite=True).result()
    for bad in ["../escape", "a/b", "", "x" * 200, "bad\0name", ".hidden"]:
        with pytest.raises(InvalidInputError, match="name"):
            client.save_state(bad)
    assert sorted(p.name for p in run_folder.iterdir()) == ["once"]  # no temporary leftovers


def test_load_errors_change_nothing(
    service: ServiceClient, session_engine: Engine, llama, tiny_models
):
    client, _ = trained_client(service, llama)
    before = state_fingerprint(session_engine.run(client.model_id))
    with pytest.raises(NotFoundError):
        client.load_state(f"bios://{client.model_id}/weights/missing")
    with pytest.raises(InvalidInputError, match="path"):
        client.load_state("s3://elsewhere")
    other_rank = service.create_lora_training_client(llama, rank=8)
    path = other_rank.save_state("rank8").result().path
    with pytest.raises(InvalidInputError, match="rank 8"):
        client.load_state(path).result()
    other_model = service.create_lora_training_client(tiny_models["qwen2"], rank=4)
    path = other_model.save_state("qwen2").result().path
    with pytest.raises(InvalidInputError, match="base model"):
        client.load_state(path)
    sampler_path = client.save_weights_for_sampler("s").result().path
    with pytest.raises(InvalidInputError, match="optimizer"):
        client.load_state_with_optimizer(sampler_path)
    assert state_fingerprint(session_engine.run(client.model_id)) == before
