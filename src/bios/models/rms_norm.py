"""The RMSNorm of Llama, Qwen2 and Qwen3 keeping only its input (and one float32 scale a row) for
the backward pass.

Their forward, for x of the model's dtype (bf16 say) and a weight w:

    x_f = float32(x);  r = (mean(x_f²) + ε)^(−1/2);  x̂ = x_f · r;  y = w · round(x̂)

where round(·) casts back to the model's dtype. Autograd of that expression keeps x_f (float32:
twice a bf16 x's bytes) and r, and in full fine-tuning round(x̂) for the weight's gradient;
`RMSNormFunction` keeps x and r only and recomputes x_f and x̂ in the backward:

    g  = float32(grad · w)                       (the product in the model's dtype)
    dx = g · r + (−½ · Σ(g · x_f) · r³ / h) · 2x_f  (Σ over the normalised dimension, of size h)
    dw = Σ grad · round(x̂)                       (over every dimension but the last)

(dx = r · (g − x̂ · mean(g · x̂)) rearranged; the terms are those autograd forms for the plain
expression, in its order: through x̂ = x_f · r directly, then through r.)

Measured on SmolLM2-135M's shapes in bf16 (2048 tokens × 576, one layer, no LoRA): the layer keeps
17,196 bytes a token instead of 21,803 (the two norms' float32 copies of x gone), and a norm's
forward + backward takes as long (4.8-5.1 ms either way, 2 threads). In a float32 model x_f is
x itself: nothing is saved there.

Passes over memory: for a 16-bit x the products with x_f read x in its own dtype, promoted
inside the kernel, and the results that end in x's dtype are written in it straight from the
float32 arithmetic (`torch.mul(..., out=)`, `torch.addcmul(..., out=)`), so neither x_f nor a
float32 result is written out and read back where it need not be: on a GPU, whose kernels cast
their operands as they load them, a bf16 norm's forward moves 28 bytes per entry of x instead of
36 and its backward 38 instead of 74 (for Llama-3.2-1B at 8 × 2048 tokens, 49 GB less a step,
by arithmetic about 4% of it). A CPU makes float32 temporaries of mixed-dtype operands itself,
so there it moves about as much as before and takes as long (measured within this machine's
noise).

Numerics: the forward is the class's own expression, so its values are the plain ones bit for
bit; the backward forms autograd's terms in autograd's order, so a norm's gradients are the ones
autograd computes for the plain expression, bit for bit, in float32 and bf16 (tested on the
CPU; a GPU may fuse the last product and sum of `addcmul` into one rounding). In a
float32 model autograd then adds the two terms to the residual stream's gradient one at a time,
where here they arrive already summed: one rounding of the sum may differ. With `create_graph`
(a double backward) r is recomputed from x inside the graph, so second derivatives flow through
it too. float64 inputs are normalised in float64 (the classes cast them to float32).

`fuse_rms_norms` installs this on a model's RMSNorm layers of those three classes (exactly those:
Gemma's scales by 1 + w), as an instance `forward` for the model's whole life, for the reason
`bios.models.swiglu` gives: gradient checkpointing recomputes a layer's forward in the backward.
Without gradients (decoding, evaluation) it is the class's own expression and keeps nothing.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from bios.models.instance_forward import install, runs

RMS_NORMS = (LlamaRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 where it is float64 (the classes cast that down to float32: a
    quirk not kept here, so that float64 checks of the derivatives run in float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _scale(wide: torch.Tensor, eps: float) -> torch.Tensor:
    """r = (mean(x_f²) + ε)^(−1/2) of x_f = `wide`, one float32 value per row."""
    return torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The plain expression of the three classes' forward (see the module docstring): one
    float32 copy of x, used twice, so that its autograd graph is theirs too."""
    wide = _wide(x)
    return weight * (wide * _scale(wide, eps)).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm keeping x and r for the backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        wide = _wide(x)
        scale = _scale(wide, eps)
        ctx.save_for_backward(x, weight, scale)
        ctx.eps = eps
        # x_f · r rounded once to x's dtype, as `(x_f · r).to(dtype)` rounds it, without the
        # float32 product in memory.
        normed = torch.mul(wide, scale, out=torch.empty_like(x))
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, scale = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: r as a function of x, inside the graph
            return _plain_backward(ctx, grad, x, weight, _scale(_wide(x), ctx.eps))
        if torch.promote_types(x.dtype, torch.float32) == x.dtype:
            # float32 (or float64): x_f is x itself, there is no copy to spare
            return _plain_backward(ctx, grad, x, weight, scale)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            # The terms autograd forms for the plain expression, in its order (through x̂ = x_f·r
            # directly, and through r = rsqrt(mean(x_f²) + ε)), so the values match its own;
            # x enters each in its own dtype, promoted on the fly (exact), never as a float32
            # copy, and the sum is written straight in x's dtype, rounded once.
            g = grad * weight  # the model dtype's product, as autograd rounds it
            grad_scale = torch.mul(_wide(g), x).sum(-1, keepdim=True)
            grad_mean = (-0.5 * grad_scale) * scale.pow(3)
            through_scale = (grad_mean / x.shape[-1]) * 2.0  # d(mean x_f²)/dx_f = 2x_f / h
            grad_x = torch.addcmul(torch.mul(g, scale), x, through_scale, out=torch.empty_like(x))
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_gradient(
                grad, torch.mul(x, scale, out=torch.empty_like(x)), weight
            )
        return grad_x, grad_weight, None


def _weight_gradient(
    grad: torch.Tensor, normed: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """dw = Σ grad · round(x̂) over every dimension but the last, in the weight's dtype."""
    product = grad * normed
    return product.sum(tuple(range(product.dim() - 1))).to(weight.dtype)


def _plain_backward(
    ctx, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """`RMSNormFunction`'s backward as autograd forms it for the plain expression, operation
    for operation: for a float32 x (whose float copy is x itself), and in differentiable
    operations for a double backward (with r recomputed from x inside the graph)."""
    wide = _wide(x)
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        g = _wide(grad * weight)
        grad_scale = (g * wide).sum(-1, keepdim=True)
        grad_mean = (-0.5 * grad_scale) * scale.pow(3)
        grad_x = (g * scale + (grad_mean / x.shape[-1]) * (2.0 * wide)).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_weight = _weight_gradient(grad, (wide * scale).to(x.dtype), weight)
    return grad_x, grad_weight, None


def _rms_norm_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Installed with `bios.models.instance_forward`: a deep copy of the model calls its own weight.
    weight, eps = module.weight, module.variance_epsilon
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm(x, weight, eps)


def is_fused(module: nn.Module) -> bool:
    """Whether `module` runs `_rms_norm_forward` on itself (installed by `fuse_rms_norms`)."""
    return runs(module, _rms_norm_forward)


def fuse_rms_norms(model: nn.Module) -> int:
    """Make every Llama, Qwen2 and Qwen3 RMSNorm of `model` run `RMSNormFunction`, for good;
    returns how many do. Installing twice is harmless."""
    count = 0
    for module in model.modules():
        if type(module) in RMS_NORMS:
            install(module, _rms_norm_forward)
            count += 1
    return count


def fused_norms(model: nn.Module) -> int:
    """How many of `model`'s RMSNorm layers run `RMSNormFunction`."""
    return sum(is_fused(module) for module in model.modules())
