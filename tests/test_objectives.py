"""Each built-in objective: loss, per-token logprobs and parameter gradients equal a reference
computed here from a plain transformers (or PEFT) forward and the hand formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from bios.client.service import ServiceClient
from bios.engine.engine import Engine
from helpers import random_datum, reference_logprobs

LOSSES = ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo"]
CONFIGS = {
    "ppo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "dro": {"beta": 0.3},
    "gspo": {"clip_low_threshold": 0.98, "clip_high_threshold": 1.02},
}


def hand_loss(loss_fn: str, lp: torch.Tensor, inputs: dict, config: dict) -> torch.Tensor:
    """The formulas of DESIGN.md, written out independently of bios.objectives."""
    if loss_fn == "cross_entropy":
        return -(lp * inputs["weights"]).sum()
    q, adv = inputs["logprobs"], inputs["advantages"]
    ratio = torch.exp(lp - q)
    lo = config.get("clip_low_threshold", 0.8)
    hi = config.get("clip_high_threshold", 1.2)
    if loss_fn == "importance_sampling":
        return -(ratio * adv).sum()
    if loss_fn == "ppo":
        return -torch.min(ratio * adv, ratio.clamp(lo, hi) * adv).sum()
    if loss_fn == "cispo":
        return -(ratio.clamp(lo, hi).detach() * lp * adv).sum()
    if loss_fn == "dro":
        return -(lp * adv - 0.5 * config["beta"] * (lp - q) ** 2).sum()
    if loss_fn == "gspo":  # one datum: one sequence ratio over its masked tokens
        masked = inputs["sequence_ratio_mask"] != 0
        s = torch.exp((lp.detach() - q)[masked].mean() + lp - lp.detach())
        return -torch.min(s * adv, s.clamp(lo, hi) * adv).sum()
    raise AssertionError(loss_fn)


def make_batch(loss_fn: str, vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    if loss_fn == "gspo":  # the sequence ratio over all but each datum's first token
        return [
            random_datum(
                vocab, n, loss_fn, generator, sequence_ratio_mask=(torch.arange(n) > 0).float()
            )
            for n in (7, 12, 3)
        ]
    return [random_datum(vocab, n, loss_fn, generator) for n in (7, 12, 3)]


def perturb_adapter(engine: Engine, run_id: str, seed: int = 1) -> None:
    """Give B non-zero values so gradients reach both factors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in engine.run(run_id).parameters.items():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def check_against_reference(engine, run_id, reference_model, param_map, loss_fn):
    run = engine.run(run_id)
    data = make_batch(loss_fn, reference_model.config.vocab_size)
    config = CONFIGS.get(loss_fn, {})
    output = engine.forward_backward(run_id, data, loss_fn, config).result()

    reference_loss = torch.zeros(())
    loss_of_returned_logprobs = 0.0
    for index, datum in enumerate(data):
        lp = reference_logprobs(reference_model, datum)
        inputs = {k: v.to_torch() for k, v in datum.loss_fn_inputs.items()}
        reference_loss = reference_loss + hand_loss(loss_fn, lp, inputs, config)
        got = output.loss_fn_outputs[index]["logprobs"].to_torch()
        torch.testing.assert_close(got, lp.detach(), atol=1e-5, rtol=1e-5)
        loss_of_returned_logprobs += hand_loss(loss_fn, got.double(), inputs, config).item()
    reference_loss.backward()
    # The objective's arithmetic is exact on the logprobs Bios returned ...
    assert output.metrics["loss:sum"] == pytest.approx(
        loss_of_returned_logprobs, rel=1e-6, abs=1e-6
    )
    # ... and those logprobs equal the reference's to fp32 accuracy, so the losses agree too.
    assert output.metrics["loss:sum"] == pytest.approx(reference_loss.item(), rel=1e-4, abs=1e-4)

    checked = 0
    for bios_name, reference_param in param_map.items():
        got = run.parameters[bios_name].grad
        assert got is not None, bios_name
        # fp32 sums in another order (batched and padded vs one datum at a time).
        scale = max(1.0, reference_param.grad.abs().max().item())
        torch.testing.assert_close(got, reference_param.grad, atol=1e-5 * scale, rtol=1e-4)
        checked += 1
    assert checked == len(run.parameters)
    run.optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("loss_fn", LOSSES)
def test_lora_objective_matches_peft_reference(
    family, loss_fn, tiny_models, session_engine: Engine, tmp_path: Path
):
    service = ServiceClient(engine=session_engine)
    client = service.create_lora_training_client(tiny_models[family], rank=4, seed=3)
    perturb_adapter(session_engine, client.model_id)
    saved = client.save_weights_for_sampler("ref").result().path
    folder = session_engine.home / "runs" / client.model_id / "sampler_weights" / "ref"
    assert saved.endswith("/sampler_weights/ref")

    base = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, folder, is_trainable=True)
    param_map = {}
    for name, param in reference.named_parameters():
        if "lora_" in name:
            bios_name = name.removeprefix("base_model.model.").replace(".default.weight", "")
            param_map[bios_name] = param
    check_against_reference(session_engine, client.model_id, reference, param_map, loss_fn)


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_full_finetune_objective_matches_transformers_reference(
    loss_fn, tiny_models, session_engine: Engine
):
    service = ServiceClient(engine=session_engine)
    client = service.create_full_training_client(tiny_models["qwen3"])
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["qwen3"], dtype=torch.float32)
    param_map = dict(reference.named_parameters())
    check_against_reference(session_engine, client.model_id, reference, param_map, loss_fn)


def test_per_token_clip_thresholds_override_config(tiny_models, session_engine: Engine):
    """`clip_low_threshold` / `clip_high_threshold` may come per token in loss_fn_inputs."""
    service = ServiceClient(engine=session_engine)
    client = service.create_lora_training_client(tiny_models["llama"], rank=4, seed=0)
    perturb_adapter(session_engine, client.model_id)
    generator = torch.Generator().manual_seed(5)
    n = 9
    lo = torch.full((n,), 0.95)
    hi = torch.full((n,), 1.05)
    datum = random_datum(384, n, "ppo", generator, clip_low_threshold=lo, clip_high_threshold=hi)
    got = client.forward([datum], "ppo").result().metrics["loss:sum"]
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    folder = session_engine.home / "runs" / client.model_id / "sampler_weights" / "clip"
    client.save_weights_for_sampler("clip").result()
    reference = PeftModel.from_pretrained(base, folder)
    lp = reference_logprobs(reference, datum)
    inputs = {k: v.to_torch() for k, v in datum.loss_fn_inputs.items()}
    expected = hand_loss(
        "ppo", lp, inputs, {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}
    )
    assert got == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)
