"""Training steps: accumulation, AdamW, ordering, shared base weights, seeds, get_info."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from bios.client.service import ServiceClient
from bios.engine.engine import Engine
from bios.types import AdamParams
from helpers import random_datum

ADAM = AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1)


def sft_batch(n: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [random_datum(384, 6 + 3 * i, "cross_entropy", generator) for i in range(n)]


def params_of(engine: Engine, client) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.run(client.model_id).parameters.items()}


def test_two_halves_equal_one_full_batch(service: ServiceClient, session_engine: Engine, llama):
    data = sft_batch(6)
    whole = service.create_lora_training_client(llama, rank=8, seed=11)
    halves = service.create_lora_training_client(llama, rank=8, seed=11)
    whole_run, halves_run = session_engine.run(whole.model_id), session_engine.run(halves.model_id)
    for _ in range(2):
        whole.forward_backward(data, "cross_entropy").result()
        halves.forward_backward(data[:3], "cross_entropy")
        halves.forward_backward(data[3:], "cross_entropy").result()
        for name, param in whole_run.parameters.items():
            torch.testing.assert_close(
                param.grad, halves_run.parameters[name].grad, atol=1e-5, rtol=1e-4
            )
        whole.optim_step(ADAM)
        halves.optim_step(ADAM).result()
    a, b = params_of(session_engine, whole), params_of(session_engine, halves)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)


def custom_cross_entropy(data, logprobs_list):
    loss = sum(
        -(lp * d.loss_fn_inputs["weights"].to_torch()).sum()
        for d, lp in zip(data, logprobs_list, strict=True)
    )
    return loss, {}


@pytest.mark.parametrize("custom", [False, True], ids=["built-in", "custom"])
def test_a_step_that_fails_part_way_leaves_the_gradients_as_they_were(
    custom, service: ServiceClient, session_engine: Engine, llama
):
    """A backward that raises part-way (as a GPU out of memory the planner did not foresee
    would) leaves the run exactly as it was: autograd would already have added the gradients
    of every layer after the failing one (and lm_head's), and the next optim_step would apply
    them. The failure is raised where the backward reaches layer 0's q_proj, the last layer it
    reaches. Then the run goes on as if the failed request had never been sent."""
    fingerprints = []
    for failing in (False, True):
        client = service.create_lora_training_client(llama, rank=8, seed=21)
        run = session_engine.run(client.model_id)
        client.forward_backward(sft_batch(3, seed=1), "cross_entropy").result()
        before = run.fingerprint()
        if failing:
            name = next(n for n in run.parameters if "layers.0.self_attn.q_proj.lora_B" in n)

            def fail(grad: torch.Tensor) -> torch.Tensor:
                raise RuntimeError("CUDA out of memory (raised by the test)")

            handle = run.parameters[name].register_hook(fail)
            data = sft_batch(4, seed=2)
            with pytest.raises(RuntimeError, match="raised by the test"):
                if custom:
                    client.forward_backward_custom(data, custom_cross_entropy).result()
                else:
                    client.forward_backward(data, "cross_entropy").result()
            handle.remove()
            assert run.fingerprint() == before
        client.forward_backward(sft_batch(2, seed=3), "cross_entropy").result()
        client.optim_step(ADAM).result()
        fingerprints.append(run.fingerprint())
    assert fingerprints[0] == fingerprints[1]


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_optim_step_equals_torch_adamw(clip, service: ServiceClient, session_engine: Engine, llama):
    client = service.create_lora_training_client(llama, rank=4, seed=2)
    run = session_engine.run(client.model_id)
    shadow = {k: v.detach().clone().requires_grad_(True) for k, v in run.parameters.items()}
    reference = torch.optim.AdamW(
        list(shadow.values()),
        lr=ADAM.learning_rate,
        betas=(ADAM.beta1, ADAM.beta2),
        eps=ADAM.eps,
        weight_decay=ADAM.weight_decay,
    )
    params = ADAM.model_copy(update={"grad_clip_norm": clip})
    for step in range(3):
        client.forward_backward(sft_batch(3, seed=step), "cross_entropy").result()
        grads = {k: v.grad.clone() for k, v in run.parameters.items()}
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
        metrics = client.optim_step(params).result().metrics
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert metrics["learning_rate"] == ADAM.learning_rate
        scale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        for name, tensor in shadow.items():
            tensor.grad = grads[name] * scale
        reference.step()
        for name, tensor in shadow.items():
            torch.testing.assert_close(
                run.parameters[name].detach(), tensor.detach(), atol=1e-7, rtol=1e-6
            )
    if clip > 0:
        assert norm > clip, "the test should exercise clipping"


def test_calls_run_in_submission_order(service: ServiceClient, session_engine: Engine, llama):
    """Submitting forward_backward, optim_step, forward without waiting equals doing it in steps."""
    data = sft_batch(2)
    eager = service.create_lora_training_client(llama, rank=4, seed=5)
    futures = [
        eager.forward_backward(data, "cross_entropy"),
        eager.optim_step(ADAM),
        eager.forward(data, "cross_entropy"),
    ]
    patient = service.create_lora_training_client(llama, rank=4, seed=5)
    patient.forward_backward(data, "cross_entropy").result()
    patient.optim_step(ADAM).result()
    expected = patient.forward(data, "cross_entropy").result().metrics["loss:sum"]
    assert futures[2].result().metrics["loss:sum"] == pytest.approx(expected, rel=1e-6)
    assert futures[0].result().metrics["loss:sum"] != pytest.approx(expected, rel=1e-3)


def test_async_variants(service: ServiceClient, llama):
    client = service.create_lora_training_client(llama, rank=4, seed=5)
    data = sft_batch(2)

    async def go():
        fb = await client.forward_backward_async(data, "cross_entropy")
        step = await client.optim_step_async(ADAM)
        return await fb, await step

    fb, step = asyncio.run(go())
    assert "loss:sum" in fb.metrics and step.metrics["grad_norm"] > 0


def test_training_reduces_loss(service: ServiceClient, llama):
    client = service.create_lora_training_client(llama, rank=8, seed=0)
    data = sft_batch(4)
    first = client.forward(data, "cross_entropy").result().metrics["loss:sum"]
    for _ in range(10):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(AdamParams(learning_rate=1e-2))
    last = client.forward(data, "cross_entropy").result().metrics["loss:sum"]
    assert last < 0.7 * first


def test_same_seed_same_adapter_and_new_run_equals_base(
    service: ServiceClient, session_engine: Engine, llama
):
    a = params_of(session_engine, service.create_lora_training_client(llama, rank=4, seed=7))
    b = params_of(session_engine, service.create_lora_training_client(llama, rank=4, seed=7))
    c = params_of(session_engine, service.create_lora_training_client(llama, rank=4, seed=8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("lora_A"))
    assert all(not v.any() for k, v in a.items() if k.endswith("lora_B"))

    client = service.create_lora_training_client(llama, rank=4, seed=7)
    datum = sft_batch(1)[0]
    got = client.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    base = AutoModelForCausalLM.from_pretrained(llama)
    logits = base(input_ids=torch.tensor([datum.model_input.to_ints()])).logits[0]
    targets = datum.loss_fn_inputs["target_tokens"].to_torch()
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(got.to_torch(), expected.detach(), atol=1e-5, rtol=1e-5)


def test_lora_flags_select_layers(service: ServiceClient, session_engine: Engine, llama):
    attn_only = service.create_lora_training_client(
        llama, rank=4, train_mlp=False, train_unembed=False
    )
    names = session_engine.run(attn_only.model_id).parameters
    kinds = {name.split(".")[-2] for name in names}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj"}
    everything = service.create_lora_training_client(llama, rank=4)
    kinds = {name.split(".")[-2] for name in session_engine.run(everything.model_id).parameters}
    assert kinds == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    }


def test_runs_share_one_copy_of_the_base_weights(
    service: ServiceClient, session_engine: Engine, llama
):
    first = service.create_lora_training_client(llama, rank=4)
    second = service.create_lora_training_client(llama, rank=4)
    worker = session_engine._run_workers[first.model_id]
    assert worker is session_engine._run_workers[second.model_id]
    base_storages = {p.untyped_storage().data_ptr() for p in worker.loaded.model.parameters()}
    for client in (first, second):
        run = session_engine.run(client.model_id)
        own = {p.untyped_storage().data_ptr() for p in run.parameters.values()}
        assert not own & base_storages
    # A run's own memory is its adapter (+ optimizer), a small fraction of the base model's.
    base_bytes = sum(p.numel() * p.element_size() for p in worker.loaded.model.parameters())
    adapter_bytes = sum(
        p.numel() * 4 for p in session_engine.run(first.model_id).parameters.values()
    )
    assert adapter_bytes < 0.2 * base_bytes


def test_get_info_and_tokenizer(service: ServiceClient, llama):
    client = service.create_lora_training_client(llama, rank=16)
    info = client.get_info()
    assert info.model_id == client.model_id and info.is_lora and info.lora_rank == 16
    assert info.model_data.arch == "llama" and info.model_name == llama
    tokenizer = client.get_tokenizer()
    assert tokenizer.decode(tokenizer.encode("Paris")) == "Paris"
    full = service.create_full_training_client(llama).get_info()
    assert full.is_lora is False and full.lora_rank is None


def test_generate_is_greedy(service: ServiceClient, llama):
    client = service.create_lora_training_client(llama, rank=4)
    prompt = [5, 17, 42, 9]
    got = client.generate(prompt, max_tokens=6).result()
    model = AutoModelForCausalLM.from_pretrained(llama)
    tokens = list(prompt)
    for _ in range(len(got)):
        logits = model(input_ids=torch.tensor([tokens])).logits[0, -1]
        tokens.append(int(logits.argmax()))
    assert got == tokens[len(prompt) :]
