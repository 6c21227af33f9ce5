"""The adapted layer's backward (`AdaptedLinear`): the gradients of x, A and B against autograd of
the plain expression in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bios.models.lora import AdapterHost, LoRAAdapter, frozen_linear_weight


class OneLayer(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.q_proj = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x)


def adapted(dtype: torch.dtype, bias: bool = True, seed: int = 0):
    """A frozen layer of `dtype` with a LoRA adapter whose B is not zero."""
    torch.manual_seed(seed)
    model = OneLayer(48, 40, bias).to(dtype)
    model.requires_grad_(False)
    adapter = LoRAAdapter({"q_proj": (48, 40)}, rank=4, alpha=8.0, seed=seed)
    with torch.no_grad():
        adapter.lora_B["q_proj"].normal_()
    return model, AdapterHost(model), adapter


def exact_gradients(model, adapter, x, weights, dtype):
    """∂/∂(x, A, B) of Σ weights · (x Wᵀ + b + s (x Aᵀ) Bᵀ), in float64 from the values the
    layer computes with (A and B rounded to its dtype)."""
    layer = model.q_proj
    x64 = x.detach().double().requires_grad_()
    a64 = adapter.lora_A["q_proj"].detach().to(dtype).double().requires_grad_()
    b64 = adapter.lora_B["q_proj"].detach().to(dtype).double().requires_grad_()
    out = x64 @ layer.weight.double().T + adapter.scale * (x64 @ a64.T) @ b64.T
    if layer.bias is not None:
        out = out + layer.bias.double()
    (out * weights.double()).sum().backward()
    return out.detach(), x64.grad, a64.grad, b64.grad


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want).norm() / want.norm())


@pytest.mark.parametrize(
    ("dtype", "bound"), [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)], ids=["fp32", "bf16"]
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_the_adapted_layers_backward_is_the_exact_gradient(dtype, bound, bias):
    """Through `AdaptedLinear` (its node is the output's), x, A and B get the gradients of the
    plain expression within float32 rounding (1e-6 norm-wise) or bf16's (2⁻⁷); A and B's are
    float32, as their casts' backward hands them on."""
    model, host, adapter = adapted(dtype, bias)
    x = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True)
    weights = torch.randn(3, 5, 40, dtype=dtype)
    with host.use(adapter):
        y = model(x)
    assert type(y.grad_fn).__name__ == "AdaptedLinearBackward"
    (y * weights).sum().backward()
    want_y, want_x, want_a, want_b = exact_gradients(model, adapter, x, weights, dtype)
    a, b = adapter.lora_A["q_proj"], adapter.lora_B["q_proj"]
    assert a.grad.dtype == b.grad.dtype == torch.float32
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    for got, want in [(y, want_y), (x.grad, want_x), (a.grad, want_a), (b.grad, want_b)]:
        assert relative(got, want) < bound


def test_an_input_without_gradient_still_trains_the_factors():
    """The first layer's input (frozen embeddings, normed) takes no gradient: A and B get theirs,
    and nothing is computed for x."""
    model, host, adapter = adapted(torch.float32)
    x = torch.randn(7, 48)
    weights = torch.randn(7, 40)
    with host.use(adapter):
        (model(x) * weights).sum().backward()
    _, _, want_a, want_b = exact_gradients(model, adapter, x, weights, torch.float32)
    assert relative(adapter.lora_A["q_proj"].grad, want_a) < 1e-6
    assert relative(adapter.lora_B["q_proj"].grad, want_b) < 1e-6


def test_a_trained_base_layer_keeps_autograds_backward():
    """A weight or a bias that takes a gradient (full fine-tuning) is not frozen: the layer's own
    backward runs and hands it its gradient."""
    model, host, adapter = adapted(torch.float32)
    layer = model.q_proj
    assert frozen_linear_weight(layer) is layer.weight
    layer.bias.requires_grad_(True)
    assert frozen_linear_weight(layer) is None
    x = torch.randn(7, 48, requires_grad=True)
    with host.use(adapter):
        y = model(x)
    assert type(y.grad_fn).__name__ != "AdaptedLinearBackward"
    y.sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((40,), 7.0))
    layer.weight.requires_grad_(True)
    assert frozen_linear_weight(layer) is None
    assert frozen_linear_weight(nn.Conv1d(2, 2, 1)) is None


def test_without_gradients_the_delta_is_one_gemm_as_before():
    """No graph, no `AdaptedLinear`: the output is the plain one plus the delta in one addmm."""
    model, host, adapter = adapted(torch.float32)
    x = torch.randn(7, 48)
    a, b = adapter.lora_A["q_proj"], adapter.lora_B["q_proj"]
    with torch.no_grad(), host.use(adapter):
        y = model(x)
        plain = model.q_proj.weight @ x.T
        want = torch.addmm(plain.T + model.q_proj.bias, x @ a.T * adapter.scale, b.T)
    assert y.grad_fn is None
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)
