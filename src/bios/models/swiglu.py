"""The SwiGLU MLP of Llama, Qwen2 and Qwen3 with two (tokens × intermediate) tensors kept for the
backward pass instead of four.

Their MLP is down(silu(g) · u) with g = gate(x), u = up(x), silu(g) = g · σ(g). Autograd of the
plain expression keeps g (SiLU's input), silu(g) and u (the product's operands), and down's LoRA
keeps the product: four (tokens × intermediate) tensors a layer. `SiLUMul` keeps g and u only
and recomputes the rest in the backward pass:

    y  = silu(g) · u
    du = grad · silu(g)
    dg = grad · u · σ(g) · (1 + g · (1 − σ(g)))      (silu'(g) = σ(g) + g · σ(g) · (1 − σ(g)))

The product itself is kept only for the down projection's LoRA factor (or, in full fine-tuning,
its weight): the gradient of A in B·A·p needs p. While `down_proj` runs, saved-tensor hooks keep
any view of the product autograd saves as a recipe (gate and up, which `SiLUMul` keeps anyway,
and the view's geometry) and recompute it, bit for bit, when the backward reads it: two
(tokens × intermediate) tensors a layer instead of four, for one more SiLU and product per layer
in the backward. The hooks hold no reference to the product: autograd keeps them in the graph
with what they packed, so a product they named would stay in memory until the backward all the
same, unseen by a count of saved tensors (until 2026-12-04 it did: one (tokens × intermediate)
tensor a layer, 4 GiB in a step of 8 × 2048 tokens on the Llama-3.2-1B shape in bf16: what the
peak measured on an H200 had above the memory planner's estimate). Checkpointed layers keep
the product (`products_kept`): a recipe would hold gate and up, which checkpointing drops, and
the recomputation must save what the forward saved.

Measured on SmolLM2-135M, float32, a LoRA r32 step of 8 × 256 tokens, with `SiLUMul` alone (the
product still kept): autograd saves 2040 MiB instead of 2400 (one 12 MiB tensor a layer, 30
layers), and the step's peak RSS falls by as much (3219 MiB instead of 3580, with glibc's mmap
threshold fixed; its default threshold makes the peak vary by a few hundred MiB from run to run).
The price is one SiLU pass over g per layer in the backward; the step took as long (29-31 s
either way, one thread). Recomputing the product removes one more such tensor a layer (in bf16,
6 MiB a layer of that step).

The backward writes dg over grad · u and du over its recomputed silu(g) (elementwise, each entry
read before it is written): three (tokens × intermediate) tensors at its peak — the incoming
gradient and the two results — where autograd's plain backward, and this one until 2026-12-06,
held five; a layer's MLP backward is the peak of a step whose MLP is wide beside its vocabulary
(on a CPU step with an MLP 32× the hidden width, the peak fell by 22%). Where the product is
recomputed for the down projection, that recomputation's silu(g) is handed to `SiLUMul`'s
backward, which runs right after it, so the backward takes one SiLU a layer, not two (on a GPU
4 bytes fewer per (token × intermediate) entry, about 0.7% of a Llama-3.2-1B step).

Numerics: the forward is `F.silu(g) * u` itself, so its values are the plain ones bit for bit.
The backward runs the kernels autograd runs for the plain expression: du recomputes silu(g) with
the same kernel (the very values autograd would have kept), and dg is `aten.silu_backward`, the
derivative autograd uses for `F.silu`, on grad · u. For bf16 or fp16 inputs that kernel already
evaluates σ and the formula in float32 registers and rounds once, so the gradients equal the
plain path's in every dtype; converting g to float32 here instead would allocate a float32 copy
(twice g's bytes) in the middle of the backward and round differently from the plain step. With
`create_graph` (a double backward) the formula is written out in differentiable operations, as
autograd does for SiLU then.

`fuse_swiglu_mlps` installs this on a model's MLPs of those three classes whose activation is
SiLU (other classes and activations are left as they are), as an instance `forward` for the
model's whole life: gradient checkpointing recomputes a layer's forward during the backward, so a
swap scoped to the forward call would not cover the recomputation. The projections are still
called as modules, so the forward hooks on them (the LoRA adapters of `AdapterHost`, prepacked
decoding) run as before. Without gradients it is the plain expression: nothing extra is paid
while decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

from bios.models.instance_forward import install, runs

# Exactly these classes: their forward is down(act(gate(x)) · up(x)); a subclass or another
# family's MLP may compute something else under the same attribute names.
SWIGLU_MLPS = (LlamaMLP, Qwen2MLP, Qwen3MLP)
_SILUS = (SiLUActivation, nn.SiLU)  # transformers' "silu" and "swish"


class SiLUMul(torch.autograd.Function):
    """silu(gate) · up, keeping only gate and up for the backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        # silu(gate) as the down projection's backward just recomputed it for the product
        # (`_Product.recompute`), if it did: the same kernel on the same gate, one pass fewer.
        silu, ctx.silu = getattr(ctx, "silu", None), None
        if torch.is_grad_enabled():  # create_graph: silu_backward has no derivative
            if ctx.needs_input_grad[0]:
                sigma = torch.sigmoid(gate)
                grad_gate = grad * up * sigma * (1 + gate * (1 - sigma))
            if ctx.needs_input_grad[1]:
                grad_up = grad * F.silu(gate)
            return grad_gate, grad_up
        # Each result is written over the temporary it is computed from (elementwise, each
        # entry read before it is written): three (tokens × intermediate) tensors at the peak,
        # the incoming gradient and the two results, not five.
        if ctx.needs_input_grad[0]:
            grad_silu = grad * up
            grad_gate = torch.ops.aten.silu_backward.grad_input(
                grad_silu, gate, grad_input=grad_silu
            )
        if ctx.needs_input_grad[1]:
            grad_up = (silu if silu is not None else F.silu(gate)).mul_(grad)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up: through `SiLUMul` when autograd would record it, else the plain product
    (no graph to keep: no_grad, inference_mode, or inputs that need no gradient)."""
    recorded = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
    if recorded and gate.shape == up.shape:  # the backward does not reduce broadcast dimensions
        return SiLUMul.apply(gate, up)
    return F.silu(gate) * up


class _Product:
    """What the graph keeps in place of (a view of) the product: its operands and the view, and
    the product's `SiLUMul` node, which is handed the silu(gate) a recomputation makes."""

    __slots__ = ("gate", "node", "offset", "size", "stride", "up")

    def __init__(
        self, gate: torch.Tensor, up: torch.Tensor, view: torch.Tensor, node: object
    ) -> None:
        self.gate, self.up, self.node = gate, up, node
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def recompute(self) -> torch.Tensor:
        # The forward's expression on the same operands: the same bytes, in the same layout.
        silu = F.silu(self.gate)
        if self.node is not None and not torch.is_grad_enabled():
            # The down projection's backward reads the product just before `SiLUMul`'s
            # backward runs, which needs silu(gate) again: it takes this one (and lets go of it).
            self.node.silu = silu
        return (silu * self.up).as_strided(self.size, self.stride, self.offset)


_products_recomputed: ContextVar[bool] = ContextVar("bios_products_recomputed", default=True)


@contextmanager
def products_kept() -> Iterator[None]:
    """Inside this block the down projection's input is kept, not recomputed: for checkpointed
    layers, where a kept recipe would hold gate and up, which checkpointing drops."""
    token = _products_recomputed.set(False)
    try:
        yield
    finally:
        _products_recomputed.reset(token)


def _product_recomputed(product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Saved-tensor hooks under which any view of `product` that autograd saves is kept as
    `_Product` (gate and up, which `SiLUMul` keeps anyway) and recomputed when read."""
    # The hooks outlive the forward (autograd keeps them with what they saved): they must not
    # hold the product itself, or it stays alive until the backward after all.
    storage, dtype = product.untyped_storage().data_ptr(), product.dtype
    node = product.grad_fn if isinstance(product.grad_fn, SiLUMul._backward_cls) else None

    def pack(tensor: torch.Tensor) -> torch.Tensor | _Product:
        if tensor.dtype == dtype and tensor.untyped_storage().data_ptr() == storage:
            return _Product(gate, up, tensor, node)
        return tensor

    def unpack(saved: torch.Tensor | _Product) -> torch.Tensor:
        return saved.recompute() if isinstance(saved, _Product) else saved

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _swiglu_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Installed with `bios.models.instance_forward`: a deep copy of the model calls its own MLP.
    # `fusable` admits SiLU activations only, so `silu_mul`'s plain product (its path without
    # gradients) is the class's own `act_fn(gate) * up`.
    gate, up = module.gate_proj(x), module.up_proj(x)
    product = silu_mul(gate, up)
    recompute = (
        product.requires_grad
        and gate.shape == up.shape
        and product.numel() > 0
        and _products_recomputed.get()
    )
    if not recompute:
        return module.down_proj(product)
    with _product_recomputed(product, gate, up):
        return module.down_proj(product)


def fusable(module: nn.Module) -> bool:
    """A Llama, Qwen2 or Qwen3 MLP (exactly those classes) whose activation is SiLU."""
    return type(module) in SWIGLU_MLPS and type(getattr(module, "act_fn", None)) in _SILUS


def is_fused(module: nn.Module) -> bool:
    """Whether `module` runs `_swiglu_forward` on itself (installed by `fuse_swiglu_mlps`)."""
    return runs(module, _swiglu_forward)


def fuse_swiglu_mlps(model: nn.Module) -> int:
    """Make every fusable MLP of `model` compute silu(g) · u with `SiLUMul`, for good; returns
    how many MLPs run it. Installing twice is harmless."""
    count = 0
    for module in model.modules():
        if fusable(module):
            install(module, _swiglu_forward)
            count += 1
    return count


def fused_mlps(model: nn.Module) -> int:
    """How many of `model`'s MLPs run `SiLUMul`."""
    return sum(is_fused(module) for module in model.modules())
