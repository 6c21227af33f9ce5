"""A training run spread over the ranks: a replicated LoRA adapter, or FSDP2-sharded full weights.

LoRA (`ReplicatedRun`): every rank holds the whole adapter and its AdamW state. The initial
adapter is rank 0's (broadcast, so an unseeded run is the same everywhere); each rank's backward
leaves the gradient of its share of the batch, and `optim_step` sums them (one all-reduce of a
flat buffer) before the identical AdamW step on every rank. The replicas never drift apart:
they start equal and apply equal updates.

Full fine-tuning (`ShardedFullRun`): a private copy of the model is sharded with FSDP2
(`fully_shard` on every decoder layer, then the root), so parameters, gradients and AdamW moments
are split across the ranks (each holds 1/N). FSDP2 averages gradients by default; Bios's losses
are sums, so the reduce-scatter is set to a plain SUM (divide factor 1, sum-only collectives).
Every rank must run every forward and backward (they all-gather the layers' weights), so a rank
with no data runs a one-token forward whose loss is multiplied by zero.

Checkpoints are written by rank 0 in exactly the files one process writes (a PEFT adapter or
`model.safetensors`, plus `optimizer.safetensors`): FSDP2 state is gathered with
`torch.distributed.checkpoint.state_dict` (`full_state_dict=True, cpu_offload=True`), and loading
broadcasts rank 0's tensors and keeps each rank's shard. So checkpoints move freely between
jobs of any number of ranks, including one process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from bios.checkpoints.layout import FULL_WEIGHTS_FILE, OPTIMIZER_FILE, write_state
from bios.distributed.group import Group
from bios.engine.runs import TrainingRun
from bios.models.loading import load_model
from bios.models.lora import AdapterHost
from bios.types import AdamParams, LoraConfig, OptimStepResponse

_MOMENTS = ("exp_avg", "exp_avg_sq", "step")


class ReplicatedRun(TrainingRun):
    """A LoRA run with the same adapter and optimizer state on every rank."""

    lockstep = False  # a rank with no data may skip the forward pass

    def __init__(
        self, run_id: str, base_model: str, host: AdapterHost, lora: LoraConfig, group: Group
    ) -> None:
        super().__init__(run_id, base_model, host, lora)
        self.group = group
        params = list(self.parameters.values())
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        group.broadcast_tensor(flat, f"create_run {run_id}: sharing the initial adapter")
        with torch.no_grad():
            for param, piece in zip(params, flat.split([p.numel() for p in params]), strict=True):
                param.copy_(piece.view_as(param))

    def optim_step(self, params: AdamParams) -> OptimStepResponse:
        """Sum the ranks' gradients, then the same AdamW step as one process."""
        self.sum_gradients()
        return super().optim_step(params)

    def sum_gradients(self) -> None:
        what = f"optim_step {self.run_id}: summing gradients"
        params = list(self.parameters.values())
        # A parameter has a gradient if any rank's data reached it (as in one process, where
        # untouched parameters keep grad None and AdamW leaves them alone).
        has_grad = torch.tensor([float(p.grad is not None) for p in params])
        self.group.all_reduce_sum(has_grad, what)
        present = [p for p, flag in zip(params, has_grad.tolist(), strict=True) if flag > 0]
        if not present:
            return
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in present]
        )
        self.group.all_reduce_sum(flat, what)
        for param, piece in zip(present, flat.split([p.numel() for p in present]), strict=True):
            param.grad = piece.view_as(param).clone()


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one (transformers names them in
    `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


class ShardedFullRun(TrainingRun):
    """Full fine-tuning with parameters, gradients and AdamW state sharded by FSDP2."""

    lockstep = True  # every rank runs every forward and backward (FSDP2 collectives)

    def __init__(self, run_id: str, base_model: str, host: AdapterHost, group: Group) -> None:
        device = host.model.device  # this rank's device (cuda:LOCAL_RANK, or the CPU)
        model = load_model(base_model, torch.float32, device).model  # float32 master weights
        mesh = init_device_mesh(device.type, (group.world,))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # Sum, not average, the ranks' gradients: Bios's losses are sums over the batch.
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        self.group = group
        super().__init__(run_id, base_model, host, None, full_model=model)

    def optim_step(self, params: AdamParams) -> OptimStepResponse:
        """AdamW on the sharded gradients; the norm (and clipping) is over the whole model."""
        self.kept = None
        grads = [p.grad for p in self.parameters.values() if p.grad is not None]
        grad_norm = torch.tensor(0.0)
        if grads:
            local = torch.nn.utils.get_total_norm(grads)
            grad_norm = local.full_tensor() if isinstance(local, DTensor) else local
        if params.grad_clip_norm > 0 and grads:
            # As torch.nn.utils.clip_grads_with_norm_ does, on DTensor gradients.
            coefficient = torch.clamp(params.grad_clip_norm / (grad_norm + 1e-6), max=1.0)
            for grad in grads:
                grad.mul_(coefficient.item())
        return self.adam_update(params, grad_norm)

    def held_values(self, tensor: torch.Tensor) -> int:
        """This rank's shard only: FSDP2 keeps one shard of each parameter and gradient a rank
        (a DTensor's `numel` counts the whole tensor)."""
        return _local(tensor).numel()

    def fingerprint(self) -> str:
        """A hash of this rank's shards (the job's fingerprint combines every rank's)."""
        digest = hashlib.sha256()
        for name, param in self.parameters.items():
            digest.update(name.encode())
            digest.update(_local(param).detach().numpy().tobytes())
            if param.grad is not None:
                digest.update(_local(param.grad).numpy().tobytes())
            for key, value in sorted(self.optimizer.state.get(param, {}).items()):
                digest.update(key.encode())
                digest.update(_local(torch.as_tensor(value)).numpy().tobytes())
        digest.update(str(self.steps).encode())
        return digest.hexdigest()

    # ---- state: gathered on rank 0, broadcast from rank 0 ---------------------------------

    def gather_state(self, with_optimizer: bool) -> tuple[dict, dict] | None:
        """Every rank takes part; rank 0 gets the whole weights and moments under one process's
        names (tied weights once, as named_parameters gives them), the others None."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.full_model, options=options)
        moments = (
            get_optimizer_state_dict(self.full_model, self.optimizer, options=options)
            if with_optimizer
            else {}
        )
        if not self.group.is_leader:
            return None
        tensors = {name: weights[name].contiguous() for name in self.parameters}
        optimizer = {
            f"{name}.{moment}": torch.as_tensor(value).contiguous()
            for name, state in moments.get("state", {}).items()
            for moment, value in state.items()
            if moment in _MOMENTS
        }
        return tensors, optimizer

    def write(self, folder: Path, state: tuple[dict, dict], with_optimizer: bool) -> None:
        """Rank 0: the files one process writes (`TrainingRun.save`), from `gather_state`."""
        tensors, optimizer = state
        save_file(tensors, folder / FULL_WEIGHTS_FILE)
        if with_optimizer:
            save_file(optimizer, folder / OPTIMIZER_FILE)
        write_state(folder, self.describe())

    def optimizer_layout(
        self, optimizer_state: dict[str, dict[str, torch.Tensor]]
    ) -> list[tuple[str, str, tuple[int, ...], torch.dtype]]:
        """Rank 0: (name, moment, shape, dtype) of each saved moment, for the other ranks."""
        return [
            (name, moment, tuple(tensor.shape), tensor.dtype)
            for name, state in sorted(optimizer_state.items())
            for moment, tensor in sorted(state.items())
        ]

    def assign_everywhere(
        self,
        weights: dict[str, torch.Tensor] | None,
        optimizer_state: dict[str, dict[str, torch.Tensor]] | None,
        layout: list[tuple[str, str, tuple[int, ...], torch.dtype]],
        steps: int,
    ) -> None:
        """Rank 0's checked tensors (None on the other ranks) into every rank's shards."""
        what = f"load_state {self.run_id}: sharing the checkpoint"
        leader = self.group.is_leader
        with torch.no_grad():
            for name, param in self.parameters.items():
                full = weights[name] if leader and weights is not None else None
                param.copy_(self._shard_of(full, param, what))
                param.grad = None
            self.weights_version += 1
            self.optimizer.state.clear()
            for name, moment, shape, dtype in layout:
                param = self.parameters[name]
                full = optimizer_state[name][moment] if leader and optimizer_state else None
                if full is None:
                    full = torch.empty(shape, dtype=dtype, device=param.device)
                if moment == "step":
                    full = full.clone()
                    self.group.broadcast_tensor(full, what)
                    value = full
                else:
                    value = self._shard_of(full, param, what)
                self.optimizer.state.setdefault(param, {})[moment] = value
        self.steps = steps

    def _shard_of(self, full: torch.Tensor | None, param: DTensor, what: str) -> DTensor:
        """Rank 0's `full` tensor, broadcast, as a DTensor laid out like `param`."""
        if full is None:
            full = torch.empty(param.shape, dtype=param.dtype, device=param.device)
        full = full.to(param.device, param.dtype).contiguous().clone()
        self.group.broadcast_tensor(full, what)
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)

    def full_weights(self) -> nn.Module:
        """Every rank: a plain (unsharded, frozen) copy of the current weights, for sampling."""
        base = self._host.model
        model = load_model(self.base_model, base.dtype, base.device).model
        with torch.no_grad():
            plain = dict(model.named_parameters())
            for name, param in self.parameters.items():
                plain[name].copy_(param.full_tensor())
        return model.requires_grad_(False).eval()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
