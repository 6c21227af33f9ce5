"""The fused SwiGLU MLP (`bios.models.swiglu`): the same numbers as the plain MLP, one fewer
(tokens × intermediate) tensor kept per layer, and nothing changed on the MLPs it does not know.

References are the plain expression `F.silu(g) * u` under autograd and the tiny models as
transformers loads them, with no fused forward installed.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from bios.models.attention import register
from bios.models.loading import load_model
from bios.models.rms_norm import fuse_rms_norms
from bios.models.swiglu import SiLUMul, fuse_swiglu_mlps, fused_mlps, is_fused, silu_mul
from helpers import lora_step, saved_storages

FAMILIES = ("llama", "qwen2", "qwen3")


def operands(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate, up and an upstream gradient; gate spans SiLU's tails (|g| up to 100), where σ
    saturates and 1 − σ underflows."""
    generator = torch.Generator().manual_seed(seed)
    gate = torch.randn(64, 96, generator=generator, dtype=torch.float64) * 6
    gate[0, :6] = torch.tensor([100.0, -100.0, 40.0, -40.0, 0.0, 1e-8])
    up = torch.randn(64, 96, generator=generator, dtype=torch.float64)
    grad = torch.randn(64, 96, generator=generator, dtype=torch.float64)
    return gate.to(dtype), up.to(dtype), grad.to(dtype)


def gradients(fn, gate, up, grad) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = fn(gate, up)
    out.backward(grad)
    return out.detach(), gate.grad, up.grad


def plain(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_function_equals_the_plain_expression(dtype):
    """Forward bit-equal to `F.silu(g) * u`; gradients within 1e-6 relative of autograd's on it
    (measured: bit-equal, bf16 included, as the backward runs the same kernels)."""
    gate, up, grad = operands(dtype)
    out, grad_gate, grad_up = gradients(SiLUMul.apply, gate, up, grad)
    ref_out, ref_gate, ref_up = gradients(plain, gate, up, grad)
    assert torch.equal(out, ref_out)
    assert out.dtype == dtype and grad_gate.dtype == dtype and grad_up.dtype == dtype
    rtol = 1e-6 if dtype != torch.bfloat16 else 0.0  # bf16: 1e-6 is below its precision; equal
    torch.testing.assert_close(grad_gate, ref_gate, rtol=rtol, atol=0)
    torch.testing.assert_close(grad_up, ref_up, rtol=rtol, atol=0)
    assert torch.isfinite(grad_gate).all()


def test_gradcheck():
    generator = torch.Generator().manual_seed(1)
    gate = (torch.randn(6, 5, generator=generator, dtype=torch.float64) * 4).requires_grad_()
    up = torch.randn(6, 5, generator=generator, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(SiLUMul.apply, (gate, up))
    assert torch.autograd.gradgradcheck(SiLUMul.apply, (gate, up))  # create_graph path


def test_saves_only_gate_and_up_and_nothing_without_gradients():
    gate, up, _ = operands(torch.float32)
    gate.requires_grad_()
    up.requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        silu_mul(gate, up)
    assert [t.data_ptr() for t in saved] == [gate.data_ptr(), up.data_ptr()]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            out = silu_mul(gate, up)
        with torch.inference_mode():
            silu_mul(gate, up)
    assert saved == [] and out.grad_fn is None


# ---- on the tiny models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_pairs(tiny_models) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """family -> (plain model as transformers loads it, the same model through `load_model`);
    both with `load_model`'s RMSNorm (`bios.models.rms_norm`) and attention
    (`bios.models.attention`), so that only the MLPs differ."""
    pairs = {}
    for family in FAMILIES:
        reference = AutoModelForCausalLM.from_pretrained(
            tiny_models[family], attn_implementation=register(), dtype=torch.float32
        )
        fuse_rms_norms(reference)
        fused = load_model(tiny_models[family]).model
        pairs[family] = (reference.eval().requires_grad_(False), fused)
    return pairs


@pytest.fixture(scope="module")
def steps(model_pairs):
    """(family, fused, checkpoint_layers) -> `lora_step`'s results, each step run once."""
    cache: dict[tuple[str, bool, bool], tuple] = {}

    def step(family: str, fused: bool, checkpoint_layers: bool) -> tuple:
        key = (family, fused, checkpoint_layers)
        if key not in cache:
            cache[key] = lora_step(model_pairs[family][fused], checkpoint_layers)
        return cache[key]

    return step


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Within 1e-6 of the tensor's largest entry."""
    scale = max(float(expected.abs().max()), 1e-30)
    assert float((actual - expected).abs().max()) <= 1e-6 * scale, name


@pytest.mark.parametrize("checkpoint_layers", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_step_equals_the_plain_mlp(family, checkpoint_layers, model_pairs, steps):
    reference, fused = model_pairs[family]
    layers = reference.config.num_hidden_layers
    assert fused_mlps(fused) == layers and fused_mlps(reference) == 0
    ref_logprobs, ref_grads, _, _ = steps(family, False, checkpoint_layers)
    logprobs, grads, _, _ = steps(family, True, checkpoint_layers)
    assert_relatively_close(logprobs, ref_logprobs, "logprobs")
    assert ref_grads.keys() == grads.keys()
    assert all(g.abs().max() > 0 for g in ref_grads.values())
    for name, grad in ref_grads.items():
        assert_relatively_close(grads[name], grad, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_keeps_two_fewer_intermediate_tensors_per_layer(family, model_pairs, steps):
    """silu(g) and the product are not kept (the down projection's LoRA reads a recomputed
    product); with checkpointing the recomputed layer keeps the product (one fewer)."""
    _, _, plain_bytes, tokens = steps(family, False, False)
    _, _, fused_bytes, _ = steps(family, True, False)
    config = model_pairs[family][0].config
    one_tensor = tokens * config.intermediate_size * 4  # float32
    assert plain_bytes - fused_bytes >= 2 * config.num_hidden_layers * one_tensor


def mlp_gradients(mlp, x: torch.Tensor, grad: torch.Tensor) -> tuple[list, dict[int, int]]:
    """Gradients of x and of every weight (full fine-tuning), and what autograd saved."""
    x = x.clone().requires_grad_()
    with saved_storages([*mlp.parameters(), x]) as seen:
        out = mlp(x)
    weights = list(mlp.parameters())
    grads = torch.autograd.grad(out, [x, *weights], grad)
    return [out.detach(), *grads], dict(seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_fine_tuning_reads_a_recomputed_product(dtype):
    """With the weights trained, the down projection's weight gradient needs the product: it is
    recomputed from gate and up, bit for bit, so every gradient equals the plain MLP's exactly,
    and autograd keeps gate and up only (2 tensors of tokens × intermediate, not 4)."""
    config = tiny(LlamaConfig)
    plain = LlamaForCausalLM(config).model.layers[0].mlp.to(dtype)
    fused = copy.deepcopy(plain)
    fuse_swiglu_mlps(fused)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, config.hidden_size, generator=generator).to(dtype)
    grad = torch.randn(3, 7, config.hidden_size, generator=generator).to(dtype)
    expected, plain_saved = mlp_gradients(plain, x, grad)
    actual, fused_saved = mlp_gradients(fused, x, grad)
    for got, want in zip(actual, expected, strict=True):
        assert torch.equal(got, want)
    wide = 3 * 7 * config.intermediate_size * dtype.itemsize
    assert sorted(plain_saved.values()).count(wide) == 4
    assert sorted(fused_saved.values()).count(wide) == 2


def test_the_product_is_freed_when_the_mlp_returns():
    """Not saved is not enough: nothing may hold the product once the MLP has returned (the
    saved-tensor hooks outlive the forward, inside the graph), or it stays in memory until the
    backward after all, one (tokens × intermediate) tensor a layer more than planned."""
    config = tiny(LlamaConfig)
    mlp = LlamaForCausalLM(config).model.layers[0].mlp
    fuse_swiglu_mlps(mlp)
    products: list[weakref.ref] = []
    mlp.down_proj.register_forward_pre_hook(lambda _, args: products.append(weakref.ref(args[0])))
    x = torch.randn(2, 5, config.hidden_size, requires_grad=True)
    out = mlp(x)
    gc.collect()
    assert len(products) == 1 and products[0]() is None
    out.sum().backward()  # the recipe still gives the down projection's weight its gradient
    assert mlp.down_proj.weight.grad.abs().sum() > 0


def silu_calls(fn) -> int:
    """How many SiLU kernels (aten::silu, out of place) `fn()` ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        fn()
    return sum(event.count for event in profiler.key_averages() if event.key == "aten::silu")


def test_the_backward_takes_silu_from_the_products_recomputation():
    """The down projection's backward recomputes the product, silu(gate) · up, and `SiLUMul`'s
    backward then takes that silu(gate) instead of computing it again: one SiLU in the
    backward, not two (the plain MLP's backward, which kept silu(gate), runs none), with the
    gradients of the plain MLP bit for bit."""
    config = tiny(LlamaConfig)
    mlp = LlamaForCausalLM(config).model.layers[0].mlp
    reference = copy.deepcopy(mlp)
    fuse_swiglu_mlps(mlp)
    x = torch.randn(2, 5, config.hidden_size)
    grads = []
    for module, backward_silus in ((reference, 0), (mlp, 1)):
        xx = x.clone().requires_grad_()
        out = module(xx)
        assert silu_calls(lambda out=out: out.sum().backward()) == backward_silus
        grads.append([xx.grad, *(p.grad for p in module.parameters())])
    for got, want in zip(grads[1], grads[0], strict=True):
        assert torch.equal(got, want)


def test_the_recomputed_product_survives_a_double_backward():
    config = tiny(LlamaConfig)
    mlp = LlamaForCausalLM(config).model.layers[0].mlp.double()
    reference = copy.deepcopy(mlp)
    fuse_swiglu_mlps(mlp)
    x = torch.randn(2, 3, config.hidden_size, dtype=torch.float64)
    results = []
    for module in (reference, mlp):
        xx = x.clone().requires_grad_()
        (weight_grad,) = torch.autograd.grad(
            module(xx).pow(2).sum(), module.down_proj.weight, create_graph=True
        )
        results.append(torch.autograd.grad(weight_grad.sum(), xx)[0])
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-12)


def test_decoding_is_unchanged(model_pairs):
    """Without gradients (sampling) the fused forward is the class's own expression."""
    reference, fused = model_pairs["qwen3"]
    tokens = torch.randint(0, 384, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(fused(input_ids=tokens).logits, reference(input_ids=tokens).logits)


def test_a_deep_copy_runs_its_own_weights(model_pairs):
    """A full fine-tuning snapshot (`copy.deepcopy`) calls its own MLPs, not the original's."""
    _, fused = model_pairs["llama"]
    clone = copy.deepcopy(fused)
    mlps = [m for m in clone.modules() if is_fused(m)]
    assert len(mlps) == clone.config.num_hidden_layers
    assert all(m.forward.args[0] is m for m in mlps)
    with torch.no_grad():
        for mlp in mlps:
            mlp.down_proj.weight.mul_(2)
    x = torch.randn(2, 5, clone.config.hidden_size, generator=torch.Generator().manual_seed(3))
    original_mlp, clone_mlp = fused.model.layers[0].mlp, clone.model.layers[0].mlp
    with torch.enable_grad():
        x.requires_grad_()
        torch.testing.assert_close(clone_mlp(x), 2 * original_mlp(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            original_mlp(x), type(original_mlp).forward(original_mlp, x), rtol=0, atol=0
        )


def tiny(config_class, **overrides):
    return config_class(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        **overrides,
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: LlamaForCausalLM(tiny(LlamaConfig, hidden_act="gelu")),
        lambda: MistralForCausalLM(tiny(MistralConfig, hidden_act="silu")),
    ],
    ids=["llama-gelu", "mistral-mlp"],
)
def test_other_activations_and_classes_are_left_alone(build):
    model = build()
    assert fuse_swiglu_mlps(model) == 0
    assert fused_mlps(model) == 0
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_installing_twice_is_harmless():
    model = LlamaForCausalLM(tiny(LlamaConfig))
    assert fuse_swiglu_mlps(model) == 2 and fuse_swiglu_mlps(model) == 2
    assert fused_mlps(model) == 2
