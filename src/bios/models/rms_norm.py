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

Numerics: the forward is the class's own expression, so its values are the plain ones bit for
bit; the backward forms autograd's terms in autograd's order, so a norm's gradients are the ones
autograd computes for the plain expression, bit for bit, in float32 and bf16 (tested). In a
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
        return weight * (wide * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, scale = ctx.saved_tensors
        wide = _wide(x)
        if torch.is_grad_enabled():  # create_graph: r as a function of x, inside the graph
            scale = _scale(wide, ctx.eps)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            g = _wide(grad * weight)
            # The terms autograd forms for the plain expression, in its order (through x̂ = x_f·r
            # directly, and through r = rsqrt(mean(x_f²) + ε)), so the values match its own.
            grad_scale = (g * wide).sum(-1, keepdim=True)
            grad_mean = (-0.5 * grad_scale) * scale.pow(3)
            grad_x = g * scale + (grad_mean / x.shape[-1]) * (2.0 * wide)
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            product = grad * (wide * scale).to(x.dtype)
            grad_weight = product.sum(tuple(range(product.dim() - 1))).to(weight.dtype)
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
