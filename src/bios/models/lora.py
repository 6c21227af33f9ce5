"""LoRA adapters on a shared, frozen base model, saved and loaded in PEFT's format.

Many runs train adapters on one copy of the base weights. The base model is never modified:
`AdapterHost` installs one forward hook per target `nn.Linear`, and the hook adds the delta of
whichever adapter is active,

    y = W x + (α / r) · B (A x),    A: r×in (random),  B: out×r (zeros, so a new run = the base).

The product by B and the sum are one GEMM; with gradients on, the layer's backward is the
adapter's (`AdaptedLinear`), the input's two gradient terms summed inside a GEMM too.

Precision: A and B are float32 on the base model's device whatever the base dtype, so their AdamW
moments (and the gradients they receive) are float32 too. The hook computes the delta in the
layer's input dtype — on a bf16 model, with A and B cast to bf16 for the two products, as mixed
precision does — and adds it to the layer's output; on a float32 model that is exactly the formula
above, nothing is converted. (Computing it in float32 from bf16 inputs instead cost a copy of
every adapted layer's input and output: 1.38× slower a LoRA step on a bf16 CPU.) Inside an
autocast region (full fine-tuning's reference adapters) the delta is float32.

On disk an adapter is a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) that
`peft.PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from bios.types import LoraConfig

# PEFT's file names: what `peft.PeftModel.from_pretrained` reads.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "unembed": ("lm_head",),
}
DEFAULT_ALPHA = 32.0
_PEFT_PREFIX = "base_model.model."


def target_names(config: LoraConfig) -> tuple[str, ...]:
    """Short module names (as PEFT's `target_modules`) selected by the train_* flags."""
    groups = [("attn", config.train_attn), ("mlp", config.train_mlp)]
    groups.append(("unembed", config.train_unembed))
    return tuple(name for group, on in groups if on for name in TARGET_GROUPS[group])


def find_targets(model: nn.Module, short_names: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Full module names of the `nn.Linear` layers whose last name part is in `short_names`."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in short_names
    }


def _key(module_name: str) -> str:
    # ParameterDict keys cannot contain dots.
    return module_name.replace(".", "__")


class LoRAAdapter(nn.Module):
    """The trainable A and B matrices of one run, keyed by the base module they adapt."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        rank: int,
        alpha: float = DEFAULT_ALPHA,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank: expected a positive integer, got {rank}")
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.module_names = tuple(sorted(shapes))
        generator = torch.Generator().manual_seed(
            seed if seed is not None else torch.seed() % 2**63
        )
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in self.module_names:
            in_features, out_features = shapes[name]
            # PEFT's default: kaiming-uniform with a=√5, i.e. U(-1/√in, 1/√in).
            bound = 1.0 / math.sqrt(in_features)
            a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
            self.lora_A[_key(name)] = nn.Parameter(a)
            self.lora_B[_key(name)] = nn.Parameter(torch.zeros(out_features, rank))

    @classmethod
    def for_model(cls, model: nn.Module, config: LoraConfig) -> LoRAAdapter:
        targets = find_targets(model, target_names(config))
        if not targets:
            raise ValueError(
                "LoRA config selects no layers: enable train_attn, train_mlp or train_unembed"
            )
        shapes = {name: (m.in_features, m.out_features) for name, m in targets.items()}
        # Drawn on the CPU (the same factors for a seed on every device), then moved.
        device = next(iter(targets.values())).weight.device
        return cls(shapes, config.rank, seed=config.seed).to(device)

    @property
    def device(self) -> torch.device:
        return next(iter(self.lora_A.values())).device

    def delta(self, module_name: str, x: torch.Tensor) -> torch.Tensor | None:
        """(α/r) · B (A x) in `x`'s dtype (the float32 factors cast to it); float32 inside an
        autocast region."""
        key = _key(module_name)
        if key not in self.lora_A:
            return None
        a, b = self.lora_A[key], self.lora_B[key]
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != a.dtype and not autocast:
            # A bf16 layer: the products in bf16 (the casts of A and B are r·(in + out) values;
            # their backward hands float32 gradients to the factors).
            return F.linear(F.linear(x, a.to(x.dtype)) * self.scale, b.to(x.dtype))
        # float32 inside an autocast region (full fine-tuning's references).
        in_float32 = (
            torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext()
        )
        with in_float32:
            # Scaling the rank-r intermediate, not the full-width output, saves a pass over it.
            return F.linear(F.linear(x.to(a.dtype), a) * self.scale, b)

    def add_delta(
        self,
        module_name: str,
        x: torch.Tensor,
        output: torch.Tensor,
        frozen_weight: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """`output` + (α/r) · B (A x), the layer's output with the delta added (None: the layer
        is not adapted). The product by B and the sum are one GEMM (`torch.addmm`, β = 1): the
        full-width delta is never written out and read back, which made a projection's forward
        and backward 5-7% faster on the CPU in float32 (bit-equal: the GEMM adds `output` once
        its rank-r sum is done) and up to 4.5% in bf16, where the sum is now rounded once
        instead of twice. With `frozen_weight` — W of a plain linear layer whose weight and
        bias take no gradient, `output` = x Wᵀ (+ bias) — and gradients on, the backward is
        `AdaptedLinear`'s: x's whole gradient in one sum inside a GEMM. Inside an autocast
        region (full fine-tuning's references) the float32 delta is added to the output as
        before."""
        key = _key(module_name)
        if key not in self.lora_A:
            return None
        a, b = self.lora_A[key], self.lora_B[key]
        if torch.is_autocast_enabled(x.device.type) or output.dtype != x.dtype:
            delta = self.delta(module_name, x)
            return output.add_(delta)  # see AdapterHost: a linear layer never reads its output
        if x.dtype != a.dtype:  # a bf16 layer: the products in bf16 (see `delta`)
            a, b = a.to(x.dtype), b.to(x.dtype)
        if frozen_weight is not None and torch.is_grad_enabled():
            # The base layer's own backward is dropped with its graph (`output.detach()`).
            return AdaptedLinear.apply(x, output.detach(), frozen_weight, a, b, self.scale)
        return _with_delta(x, output, a, b, self.scale)[0]

    def merged_weight(self, module_name: str) -> torch.Tensor:
        """ΔW = (α/r) · B A, the update this adapter adds to the base weight."""
        key = _key(module_name)
        return (self.lora_B[key] @ self.lora_A[key]) * self.scale

    def named_factors(self) -> Iterator[tuple[str, str, nn.Parameter]]:
        """(module name, "lora_A" | "lora_B", parameter), in a stable order."""
        for name in self.module_names:
            yield name, "lora_A", self.lora_A[_key(name)]
            yield name, "lora_B", self.lora_B[_key(name)]

    # ---- PEFT format -------------------------------------------------------------------------

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The factors under PEFT's names, on the CPU (as they are, on a CPU adapter)."""
        return {
            f"{_PEFT_PREFIX}{name}.{factor}.weight": param.detach().cpu().contiguous()
            for name, factor, param in self.named_factors()
        }

    def peft_config(self, base_model: str) -> dict:
        short_names = sorted({name.rsplit(".", 1)[-1] for name in self.module_names})
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": short_names,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "modules_to_save": None,
            "inference_mode": True,
        }

    def save_peft(self, folder: Path, base_model: str) -> None:
        """Write `adapter_config.json` and `adapter_model.safetensors` into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ADAPTER_CONFIG_FILE).write_text(
            json.dumps(self.peft_config(base_model), indent=2)
        )
        save_file(self.peft_state_dict(), folder / ADAPTER_WEIGHTS_FILE)

    @classmethod
    def load_peft(cls, folder: Path, device: torch.device | str | None = None) -> LoRAAdapter:
        """Read a PEFT LoRA folder (as written by `save_peft` or by PEFT itself); the factors are
        float32 (whatever the file holds), on `device` (None: the CPU)."""
        config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{folder}: not a LoRA adapter (peft_type={config.get('peft_type')})")
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(folder / ADAPTER_WEIGHTS_FILE).items():
            name, factor = _split_peft_key(key)
            factors.setdefault(name, {})[factor] = tensor
        shapes = {name: (f["lora_A"].shape[1], f["lora_B"].shape[0]) for name, f in factors.items()}
        adapter = cls(shapes, int(config["r"]), float(config["lora_alpha"]), seed=0)
        with torch.no_grad():
            for name, factor, param in adapter.named_factors():
                param.copy_(factors[name][factor])
        return adapter if device is None else adapter.to(device)


def _with_delta(
    x: torch.Tensor, output: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`output` + s · (x Aᵀ) Bᵀ, the rank-r s · x Aᵀ): the product by B and the sum in one
    GEMM (`torch.addmm`, β = 1), the scale on the rank-r intermediate, not the full-width
    output (a pass over it saved). A, B in x's dtype."""
    scaled = F.linear(x.reshape(-1, x.shape[-1]), a) * scale
    result = torch.addmm(output.reshape(-1, b.shape[0]), scaled, b.t())
    # A 2-D output (lm_head's, chunk by chunk) stays a tensor of its own, not a view: the
    # chunked unembedding writes its gradient over it, and a view written to without gradients
    # would have autograd replay it as an as_strided copy in the backward.
    return (result if result.dim() == output.dim() else result.view(output.shape)), scaled


class AdaptedLinear(torch.autograd.Function):
    """y = o + s · (x Aᵀ) Bᵀ for o = x Wᵀ (+ bias), the output of a layer whose W and bias are
    frozen, with a backward that gives x its whole gradient in one sum:

        ∂L/∂x = s · (g B) A + g W        ∂L/∂A = s · (g B)ᵀ x        ∂L/∂B = gᵀ (s · x Aᵀ)

    (g = ∂L/∂y). Autograd of the layer plus its delta computes g W (the base layer's backward)
    and s · (g B) A (the delta's) as two (tokens × in) tensors, then adds them: five passes over
    (tokens × in) values, where this backward writes the rank-r product first and the base GEMM
    adds its own into it (β = 1, the sum inside the GEMM): three. Per decoder layer of
    Llama-3.2-1B at 8 × 2048 tokens that is 7 adds fewer, of 16,384 × 2,048 or × 8,192 values
    (as many as the forward's `addmm` saved); on a GPU, where such passes cost the bytes they
    move, about 2% of the step. The arithmetic is autograd's but for that sum's rounding: in
    float32 within a few units of the last place, in bf16 rounded once instead of twice.

    A, B (and W) arrive in x's dtype: their casts stay outside, so autograd hands A and B their
    gradients as float32, as for any cast. x is kept as it came (the down projection's input
    may be kept as a recipe by `bios.models.swiglu`), the rank-r s · x Aᵀ beside it."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        output: torch.Tensor,
        weight: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        result, scaled = _with_delta(x, output, a, b, scale)
        ctx.save_for_backward(x, scaled, weight, a, b)
        ctx.scale = scale
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scaled, weight, a, b = ctx.saved_tensors
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_scaled = flat_grad @ b  # ∂L/∂(s · x Aᵀ), rank r
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[4]:
            grad_b = flat_grad.t() @ scaled
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            grad_xa = grad_scaled * ctx.scale  # ∂L/∂(x Aᵀ)
            if ctx.needs_input_grad[3]:
                grad_a = grad_xa.t() @ x.reshape(-1, x.shape[-1])
            if ctx.needs_input_grad[0]:
                grad_x = (grad_xa @ a).addmm_(flat_grad, weight).view(x.shape)
        return grad_x, None, None, grad_a, grad_b, None


def frozen_linear_weight(module: nn.Module) -> torch.Tensor | None:
    """W of a plain `nn.Linear` whose weight and bias take no gradient (its output is
    x Wᵀ + bias, and nothing of it is trained: `AdaptedLinear` may take its backward whole),
    else None."""
    if type(module) is not nn.Linear or type(module.weight) is not nn.Parameter:
        return None
    trained = module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad)
    return None if trained else module.weight


def _split_peft_key(key: str) -> tuple[str, str]:
    """`base_model.model.<module>.lora_A[.default].weight` -> (module, "lora_A")."""
    body = key.removeprefix(_PEFT_PREFIX).removesuffix(".weight").removesuffix(".default")
    name, factor = body.rsplit(".", 1)
    if factor not in ("lora_A", "lora_B"):
        raise ValueError(f"unexpected tensor {key!r} in adapter file")
    return name, factor


class AdapterHost:
    """Hooks on a shared base model that add the active adapter's delta to each target layer."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.active: LoRAAdapter | None = None
        self._handles = self._hook_targets()

    def _hook_targets(self) -> list:
        all_targets = tuple(name for group in TARGET_GROUPS.values() for name in group)
        return [
            module.register_forward_hook(self._make_hook(name))
            for name, module in find_targets(self.model, all_targets).items()
        ]

    def _make_hook(self, module_name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            adapter = self.active
            if adapter is None:
                return None
            # None where the layer is not adapted. Under autocast the delta is added in place:
            # a linear layer's backward never reads its output. A bf16 output takes the float32
            # delta rounded once (output + delta, in float32).
            return adapter.add_delta(module_name, args[0], output, frozen_linear_weight(module))

        return hook

    @contextmanager
    def use(self, adapter: LoRAAdapter | None) -> Iterator[nn.Module]:
        """Run the base model with `adapter` applied (None: the plain base model)."""
        previous, self.active = self.active, adapter
        try:
            yield self.model
        finally:
            self.active = previous

    @contextmanager
    def unhooked(self) -> Iterator[nn.Module]:
        """The plain base model with the hooks taken off: `use(None)` without calling a no-op
        hook per layer (~2% of a one-row decode step). Only for the thread that owns the model."""
        self.remove()
        try:
            yield self.model
        finally:
            self._handles = self._hook_targets()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
