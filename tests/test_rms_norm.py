"""The RMSNorm that keeps only its input (`bios.models.rms_norm`): the class's own values, gradients
as accurate as autograd's of the plain expression (both against a float64 reference), one fewer
(tokens × hidden) float32 tensor kept per norm, and the installed forward survives decoding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from bios.engine.fused_norms import fused_rms_norms
from bios.models.loading import load_model
from bios.models.rms_norm import RMSNormFunction, fuse_rms_norms, fused_norms, is_fused, rms_norm
from helpers import lora_step

FAMILIES = ("llama", "qwen2", "qwen3")
EPS = 1e-6


def operands(width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (rows of very different scales, one near zero), a weight and an upstream gradient, all
    float64."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, width, generator=generator, dtype=torch.float64) * 3
    x[0] *= 1e-4
    x[1] *= 300
    weight = torch.rand(width, generator=generator, dtype=torch.float64) + 0.5
    grad = torch.randn(256, width, generator=generator, dtype=torch.float64)
    return x, weight, grad


def gradients(fn, x, weight, grad, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.to(dtype).requires_grad_()
    weight = weight.to(dtype).requires_grad_()
    out = fn(x, weight, EPS)
    grad_x, grad_weight = torch.autograd.grad(out, (x, weight), grad.to(dtype))
    return out.detach(), grad_x, grad_weight


@pytest.mark.parametrize("norm_class", [LlamaRMSNorm, Qwen3RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_the_class_expression_bit_for_bit(norm_class, dtype):
    x, weight, _ = operands(96)
    norm = norm_class(96, eps=EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    x = x.to(dtype)
    expected = norm(x)
    assert torch.equal(rms_norm(x, norm.weight, EPS), expected)
    assert torch.equal(RMSNormFunction.apply(x.requires_grad_(), norm.weight, EPS), expected)


@pytest.mark.parametrize("width", [128, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_autograds(dtype, width):
    """The gradients autograd computes for the plain expression, bit for bit, for x and for the
    weight (full fine-tuning); and as accurate against float64 (1.5e-7 of the largest entry in
    float32, 7e-3 in bf16, measured)."""
    x, weight, grad = operands(width)
    _, ref_x, ref_w = gradients(rms_norm, x, weight, grad, torch.float64)
    _, plain_x, plain_w = gradients(rms_norm, x, weight, grad, dtype)
    _, ours_x, ours_w = gradients(RMSNormFunction.apply, x, weight, grad, dtype)
    assert ours_x.dtype == dtype and ours_w.dtype == dtype

    def error(actual: torch.Tensor, reference: torch.Tensor) -> float:
        return float((actual.double() - reference).abs().max() / reference.abs().max())

    assert torch.equal(ours_x, plain_x) and torch.equal(ours_w, plain_w)
    bound = 3e-7 if dtype == torch.float32 else 2e-2
    assert error(ours_x, ref_x) <= bound and error(ours_w, ref_w) <= bound


def test_gradcheck():
    x, weight, _ = operands(7)
    x, weight = x[:5].requires_grad_(), weight.requires_grad_()
    function = lambda x, w: RMSNormFunction.apply(x, w, EPS)  # noqa: E731
    assert torch.autograd.gradcheck(function, (x, weight))
    assert torch.autograd.gradgradcheck(function, (x, weight))  # create_graph path


def test_keeps_its_input_and_one_scale_a_row():
    x, weight, _ = operands(64)
    x = x.float().requires_grad_()
    weight = weight.float()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        RMSNormFunction.apply(x, weight, EPS)
    assert [t.data_ptr() for t in saved[:2]] == [x.data_ptr(), weight.data_ptr()]
    assert len(saved) == 3 and saved[2].shape == (256, 1) and saved[2].dtype == torch.float32


# ---- on the tiny models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_pairs(tiny_models) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """family -> (the model through `load_model` with the class's own norms put back, the model
    through `load_model`): only the norms differ."""
    pairs = {}
    for family in FAMILIES:
        fused = load_model(tiny_models[family]).model
        plain = copy.deepcopy(fused)
        for module in plain.modules():
            if is_fused(module):
                del module.forward
        pairs[family] = (plain, fused)
    return pairs


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_step_equals_the_plain_norms(family, model_pairs):
    """Logprobs bit-equal (the forward is the same expression); LoRA gradients within 1e-6 of
    each tensor's largest entry (a norm's own gradient is autograd's bit for bit, above; in
    float32 autograd adds it to the residual's gradient in another order)."""
    plain, fused = model_pairs[family]
    per_layer = 4 if family == "qwen3" else 2  # Qwen3 also norms q and k per head
    assert fused_norms(fused) == per_layer * fused.config.num_hidden_layers + 1
    assert fused_norms(plain) == 0
    ref_logprobs, ref_grads, _, _ = lora_step(plain)
    logprobs, grads, _, _ = lora_step(fused)
    assert torch.equal(logprobs, ref_logprobs)
    assert ref_grads.keys() == grads.keys()
    for name, grad in ref_grads.items():
        scale = float(grad.abs().max())
        assert scale > 0
        assert float((grads[name] - grad).abs().max()) <= 1e-6 * scale, name


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_keeps_no_float32_copy_of_the_norms_inputs(family, model_pairs):
    """In bf16 the plain norm keeps x in float32 (4 bytes a value) where this one keeps x itself
    (2 bytes), both a float32 scale a row: at least 2·h bytes a token fewer for each of the 2L
    norms whose input needs a gradient (all but layer 0's first, and the final one)."""
    plain, fused = (copy.deepcopy(model).to(torch.bfloat16) for model in model_pairs[family])
    _, _, plain_bytes, tokens = lora_step(plain)
    _, _, fused_bytes, _ = lora_step(fused)
    config = fused.config
    norms = 2 * config.num_hidden_layers
    assert plain_bytes - fused_bytes >= norms * tokens * 2 * config.hidden_size


def test_installing_twice_is_harmless_and_decoding_keeps_it(model_pairs):
    _, fused = model_pairs["llama"]
    count = fused_norms(fused)
    assert fuse_rms_norms(fused) == count and fused_norms(fused) == count
    with fused_rms_norms(fused):  # the decode-time swap to `rms_norm` puts ours back after
        assert fused_norms(fused) == 0
    assert fused_norms(fused) == count


def test_without_gradients_nothing_is_kept(model_pairs):
    _, fused = model_pairs["qwen3"]
    tokens = torch.randint(0, 384, (2, 30), generator=torch.Generator().manual_seed(2))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            fused(input_ids=tokens)
    assert saved == []


def test_a_deep_copy_runs_its_own_weights(model_pairs, tiny_models):
    _, fused = model_pairs["llama"]
    clone = copy.deepcopy(fused)
    norm = clone.model.layers[0].input_layernorm
    assert is_fused(norm) and norm.forward.args[0] is norm
    with torch.no_grad():
        norm.weight.mul_(2)
    x = torch.randn(3, clone.config.hidden_size, generator=torch.Generator().manual_seed(3))
    original = fused.model.layers[0].input_layernorm
    torch.testing.assert_close(norm(x), 2 * original(x), rtol=0, atol=1e-6)
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    torch.testing.assert_close(
        original(x), reference.model.layers[0].input_layernorm(x), rtol=0, atol=0
    )
