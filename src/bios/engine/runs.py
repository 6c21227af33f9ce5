"""A training run: trainable weights (a LoRA adapter or a full copy) and their AdamW state.

The run does the arithmetic of one request; ordering, validation and file paths live in the
worker and the engine.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bios.checkpoints.layout import (
    FULL_WEIGHTS_FILE,
    OPTIMIZER_FILE,
    describe_state,
    has_adapter,
    has_full_weights,
    is_checkpoint,
    read_state,
    write_state,
)
from bios.engine.batch import PackedBatch
from bios.engine.forward import (
    batch_logits,
    gather_logprobs,
    layer_checkpointing,
    target_logprobs,
)
from bios.engine.kept_graph import KeptForward
from bios.errors import InvalidInputError
from bios.models.lora import AdapterHost, LoRAAdapter
from bios.objectives import REF_LOGPROBS, Objective, linear_coefficients
from bios.objectives.custom import CustomLossFn, checked_custom_result
from bios.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LoraConfig,
    OptimStepResponse,
    TensorData,
)

_MOMENTS = ("exp_avg", "exp_avg_sq", "step")


class Run(Protocol):
    """What the engine, its workers and sampling sessions ask of a run: `TrainingRun` in one
    process, `bios.distributed.leader.LeaderRun` (rank 0's handle on a run every rank holds).

    Every method runs on the base model's worker thread, in the run's request order.
    """

    run_id: str
    base_model: str
    lora: LoraConfig | None
    user_metadata: dict[str, str]
    checkpoint_layers: bool  # gradient checkpointing of the decoder layers

    @property
    def is_lora(self) -> bool: ...

    @property
    def adapter(self) -> LoRAAdapter | None:
        """The trainable adapter (LoRA runs), or None."""
        ...

    @property
    def full_model(self) -> nn.Module | None:
        """The run's own copy of the model (full fine-tuning), or None."""
        ...

    @property
    def steps(self) -> int: ...

    def pending_gradient_bytes(self) -> int: ...

    def gradient_bytes(self) -> int: ...

    def forward_backward(
        self,
        batch: PackedBatch,
        objective: Objective,
        config: dict[str, float],
        backward: bool,
        reference: LoRAAdapter | None = None,
        keep_graph: bool = False,
    ) -> ForwardBackwardOutput: ...

    def forward_backward_custom(
        self, batch: PackedBatch, data: Sequence[Datum], loss_fn: CustomLossFn, input_type: str
    ) -> ForwardBackwardOutput: ...

    def drop_expired_graph(self) -> None: ...

    def optim_step(self, params: AdamParams) -> OptimStepResponse: ...

    def save(self, folder: Path, with_optimizer: bool) -> None: ...

    def load(self, folder: Path, with_optimizer: bool) -> None: ...

    def fingerprint(self) -> str: ...

    def generate(self, tokens: list[int], max_tokens: int, stop_ids: list[int]) -> list[int]: ...


class TrainingRun:
    """One run's trainable weights and optimizer on a base model shared with other runs."""

    def __init__(
        self,
        run_id: str,
        base_model: str,
        host: AdapterHost,
        lora: LoraConfig | None,
        full_model: nn.Module | None = None,
    ) -> None:
        self.run_id = run_id
        self.base_model = base_model
        self.lora = lora
        self.user_metadata: dict[str, str] = {}  # the creator's labels, kept with the run
        self.checkpoint_layers = False  # recompute each decoder layer in the backward pass
        self._host = host
        self.adapter = LoRAAdapter.for_model(host.model, lora) if lora is not None else None
        self.full_model = full_model
        if self.full_model is not None:
            self.full_model.requires_grad_(True)
        # Where the weights are: every batch is moved here, every result comes back to the CPU.
        weights = full_model if full_model is not None else host.model
        self.device = next(weights.parameters()).device
        # The base model's dtype: a full fine-tuning run's float32 master weights compute in it
        # under autocast (`autocast`); a LoRA run's base is in it already.
        self.compute_dtype = host.model.dtype
        self.parameters = self._trainable()
        self.optimizer = torch.optim.AdamW(list(self.parameters.values()), lr=0.0, fused=True)
        self.steps = 0
        self.weights_version = 0  # changes whenever the weights do; a kept graph must match it
        self.kept: KeptForward | None = None

    @property
    def is_lora(self) -> bool:
        return self.adapter is not None

    def _trainable(self) -> dict[str, nn.Parameter]:
        if self.adapter is not None:
            return {f"{m}.{f}": p for m, f, p in self.adapter.named_factors()}
        assert self.full_model is not None
        return dict(self.full_model.named_parameters())  # tied weights appear once

    def autocast(self) -> torch.autocast:
        """Full fine-tuning on a bf16 engine: matrix products in bf16 from the float32 master
        weights (gradients reach them in float32). A no-op for LoRA runs and float32 engines."""
        enabled = self.full_model is not None and self.compute_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=enabled)

    @contextmanager
    def model(self) -> Iterator[nn.Module]:
        """The model with this run's weights in effect."""
        if self.adapter is None:
            yield self.full_model
        else:
            with self._host.use(self.adapter) as model:
                yield model

    @contextmanager
    def request_gradients(self, backward: bool = True) -> Iterator[None]:
        """One request's gradients, added to those accumulated since the last `optim_step` only
        if the request completes. Inside the block the parameters start without gradients. On
        success the accumulated ones are added to the request's (old + new: autograd's order,
        except that several contributions to one parameter in one backward join the old as one
        sum, a float32 rounding apart). On any failure part-way (a GPU out of memory that the
        planner did not foresee, a backward that raises) the accumulated ones are put back as
        they were: without this, autograd would already have added part of the failed request's
        gradients, and the next `optim_step` would apply them. The request's own set is new
        memory every time (`gradient_bytes`, which the memory check counts); the accumulated
        set (`pending_gradient_bytes`) is held beside it until the request ends."""
        if not backward:
            yield
            return
        accumulated = {name: param.grad for name, param in self.parameters.items()}
        for param in self.parameters.values():
            param.grad = None
        try:
            yield
        except BaseException:
            for name, param in self.parameters.items():
                param.grad = accumulated[name]
            raise
        for name, param in self.parameters.items():
            before = accumulated[name]
            if before is not None:
                param.grad = before if param.grad is None else before.add_(param.grad)

    def held_values(self, tensor: torch.Tensor) -> int:
        """How many of `tensor`'s values this process holds: all of them here (a sharded run
        holds its shard only)."""
        return tensor.numel()

    def gradient_bytes(self) -> int:
        """Bytes of one set of gradients, 4 a trainable value (float32): what a request's
        backward makes (`request_gradients`)."""
        return sum(4 * self.held_values(param) for param in self.parameters.values())

    def pending_gradient_bytes(self) -> int:
        """Bytes of the gradients accumulated since the last `optim_step`, held beside a
        request's own until it ends (`request_gradients`)."""
        return sum(
            self.held_values(param.grad) * param.grad.element_size()
            for param in self.parameters.values()
            if param.grad is not None
        )

    # ---- steps --------------------------------------------------------------------------------

    def forward_backward(
        self,
        batch: PackedBatch,
        objective: Objective,
        config: dict[str, float],
        backward: bool,
        reference: LoRAAdapter | None = None,
        keep_graph: bool = False,
    ) -> ForwardBackwardOutput:
        """Per-token logprobs and the objective; with `backward`, gradients are accumulated.

        Objectives that compare with a reference policy get `ref_logprobs` from the data, or
        else from `reference` (an adapter on the shared base; None is the base model itself).
        `keep_graph` keeps a forward's graph for a backward on the same tokens that follows it
        (see `kept_graph.py`); such a backward then skips its forward pass.
        """
        kept, self.kept = self.kept, None
        here = batch.to(self.device)
        inputs = here.inputs
        if objective.needs_reference and REF_LOGPROBS not in inputs:
            inputs = {**inputs, REF_LOGPROBS: self.reference_logprobs(here, reference)}
        grad_mode = torch.set_grad_enabled(backward or keep_graph)
        with self.request_gradients(backward), grad_mode, self.model() as model, self.autocast():
            if backward and kept is not None and kept.serves(batch, self.weights_version):
                logprobs = kept.logprobs
            else:
                known = None
                if backward and objective.linear and self.adapter is not None:
                    # ∂L/∂logprobs before the forward: the unembedding's backward runs in it.
                    known = linear_coefficients(objective, inputs, config, here.flat_targets())
                logprobs = target_logprobs(
                    model, here, checkpoint_layers=self.checkpoint_layers, logprob_grads=known
                )
            loss, metrics = objective.fn(logprobs, inputs, config)
            if backward:
                loss.backward()
        if keep_graph and not backward:
            self.kept = KeptForward.of(batch, logprobs, self.weights_version)
        return forward_output(batch, logprobs, loss, metrics)

    def drop_expired_graph(self) -> None:
        if self.kept is not None and time.monotonic() >= self.kept.expires:
            self.kept = None

    def forward_backward_custom(
        self, batch: PackedBatch, data: Sequence[Datum], loss_fn: CustomLossFn, input_type: str
    ) -> ForwardBackwardOutput:
        """Run a user's loss on the live autograd graph: one forward, one backward.

        `loss_fn(data, per_datum)` gets, per datum, the target logprobs (N,) or, with
        `input_type="logits"`, the logits (N, V) at each position. Its result is checked before
        the backward pass, so a bad loss leaves the gradients as they were.
        """
        self.kept = None
        here = batch.to(self.device)
        with self.request_gradients(), torch.enable_grad(), self.model() as model, self.autocast():
            if input_type == "logprobs":  # over chunks: no full logits held
                logprobs = target_logprobs(model, here, checkpoint_layers=self.checkpoint_layers)
                given = here.split(logprobs)
            else:
                with layer_checkpointing(model, self.checkpoint_layers):
                    logits = batch_logits(model, here)
                logprobs = gather_logprobs(logits, here)
                given = here.split(logits[here.mask])
                del logits  # (R, L, vocab): only the real tokens' rows are held from here
            loss, metrics = checked_custom_result(loss_fn(list(data), given))
            loss.backward()
        return forward_output(batch, logprobs, loss, metrics)

    @torch.no_grad()
    def reference_logprobs(self, batch: PackedBatch, adapter: LoRAAdapter | None) -> torch.Tensor:
        """Target logprobs under a frozen reference that shares the base weights."""
        with self._host.use(adapter) as model:
            return target_logprobs(model, batch.to(self.device))

    def optim_step(self, params: AdamParams) -> OptimStepResponse:
        """One AdamW step on the accumulated gradients, which are then cleared.

        The gradient norm is always measured; with `grad_clip_norm` > 0 the gradients are first
        scaled down to that norm, as `torch.nn.utils.clip_grad_norm_` does.
        """
        self.kept = None
        grads = [p.grad for p in self.parameters.values() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        if params.grad_clip_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(
                self.parameters.values(), params.grad_clip_norm, grad_norm
            )
        return self.adam_update(params, grad_norm)

    def adam_update(self, params: AdamParams, grad_norm: torch.Tensor) -> OptimStepResponse:
        """The AdamW step itself, on gradients already measured (and clipped); clears them."""
        for group in self.optimizer.param_groups:
            group.update(
                lr=params.learning_rate,
                betas=(params.beta1, params.beta2),
                eps=params.eps,
                weight_decay=params.weight_decay,
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.weights_version += 1
        return OptimStepResponse(
            metrics={"grad_norm": float(grad_norm), "learning_rate": params.learning_rate}
        )

    # ---- state on disk ------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """SHA-256 of the weights, pending gradients, optimizer state and step count: equal
        fingerprints mean a request changed nothing."""
        digest = hashlib.sha256()
        for name, param in self.parameters.items():
            digest.update(name.encode())
            digest.update(param.detach().cpu().numpy().tobytes())
            if param.grad is not None:
                digest.update(param.grad.cpu().numpy().tobytes())
            for key, value in sorted(self.optimizer.state.get(param, {}).items()):
                digest.update(key.encode())
                digest.update(torch.as_tensor(value).cpu().numpy().tobytes())
        digest.update(str(self.steps).encode())
        return digest.hexdigest()

    def describe(self) -> dict:
        return describe_state(self.run_id, self.base_model, self.lora, self.steps)

    def save(self, folder: Path, with_optimizer: bool) -> None:
        """Write the weights (PEFT folder or full safetensors) and optionally the optimizer."""
        if self.adapter is not None:
            self.adapter.save_peft(folder, self.base_model)
        else:
            tensors = {n: p.detach().contiguous() for n, p in self.parameters.items()}
            save_file(tensors, folder / FULL_WEIGHTS_FILE)
        if with_optimizer:
            save_file(self._optimizer_tensors(), folder / OPTIMIZER_FILE)
        write_state(folder, self.describe())

    def _optimizer_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, param in self.parameters.items():
            state = self.optimizer.state.get(param, {})
            for moment in _MOMENTS:
                if moment in state:
                    tensors[f"{name}.{moment}"] = torch.as_tensor(state[moment]).contiguous()
        return tensors

    def load(self, folder: Path, with_optimizer: bool) -> None:
        """Replace weights (and optionally the optimizer state) with a saved state.

        Everything is read and checked before anything is assigned, so a mismatched checkpoint
        leaves the run as it was.
        """
        self.assign(*self.read_state(folder, with_optimizer))

    def read_state(
        self, folder: Path, with_optimizer: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], int]:
        """A saved state's weights, optimizer moments and step count, checked against this run
        (InvalidInputError if they do not fit); without the optimizer, no moments and step 0."""
        weights = self._read_weights(folder)
        optimizer_state = self._read_optimizer(folder) if with_optimizer else {}
        steps = read_state(folder).steps if with_optimizer and is_checkpoint(folder) else 0
        return weights, optimizer_state, steps

    def assign(
        self,
        weights: dict[str, torch.Tensor],
        optimizer_state: dict[str, dict[str, torch.Tensor]],
        steps: int,
    ) -> None:
        """Put checked weights, optimizer moments (may be empty) and a step count in place."""
        with torch.no_grad():
            for name, tensor in weights.items():
                self.parameters[name].copy_(tensor)
                self.parameters[name].grad = None
        self.weights_version += 1
        self.optimizer.state.clear()
        for name, state in optimizer_state.items():
            param = self.parameters[name]
            # Fused AdamW wants every moment (`step` too) on its parameter's device.
            self.optimizer.state[param] = {k: v.to(param.device) for k, v in state.items()}
        self.steps = steps

    def _read_weights(self, folder: Path) -> dict[str, torch.Tensor]:
        if self.adapter is not None:
            if not has_adapter(folder):
                raise InvalidInputError("path", f"{folder.name}: holds no LoRA adapter")
            loaded = LoRAAdapter.load_peft(folder)
            weights = {f"{m}.{f}": p.detach() for m, f, p in loaded.named_factors()}
            if loaded.rank != self.adapter.rank or loaded.alpha != self.adapter.alpha:
                raise InvalidInputError(
                    "path",
                    f"checkpoint has LoRA rank {loaded.rank} alpha {loaded.alpha}; this run has "
                    f"rank {self.adapter.rank} alpha {self.adapter.alpha}",
                )
        else:
            if not has_full_weights(folder):
                raise InvalidInputError("path", f"{folder.name}: holds no full-model weights")
            weights = load_file(folder / FULL_WEIGHTS_FILE)
        if set(weights) != set(self.parameters):
            missing = sorted(set(self.parameters) - set(weights))[:3]
            extra = sorted(set(weights) - set(self.parameters))[:3]
            raise InvalidInputError(
                "path", f"checkpoint layers differ from this run (missing {missing}, extra {extra})"
            )
        for name, tensor in weights.items():
            if tensor.shape != self.parameters[name].shape:
                raise InvalidInputError(
                    "path",
                    f"{name}: shape {list(tensor.shape)} in checkpoint, "
                    f"{list(self.parameters[name].shape)} in this run",
                )
        return weights

    def _read_optimizer(self, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
        if not (folder / OPTIMIZER_FILE).exists():
            raise InvalidInputError("path", f"{folder.name}: holds no optimizer state")
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(folder / OPTIMIZER_FILE).items():
            name, moment = key.rsplit(".", 1)
            if name not in self.parameters or moment not in _MOMENTS:
                raise InvalidInputError("path", f"optimizer state has unknown entry {key!r}")
            state.setdefault(name, {})[moment] = tensor
        return state

    # ---- helpers ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, tokens: list[int], max_tokens: int, stop_ids: list[int]) -> list[int]:
        """Greedy decoding with a KV cache (a small helper; the sampler does the real work)."""
        with self.model() as model:
            output = model.generate(
                torch.tensor([tokens], device=self.device),
                attention_mask=torch.ones(1, len(tokens), dtype=torch.int64, device=self.device),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=stop_ids or None,
                pad_token_id=stop_ids[0] if stop_ids else 0,
            )
        return output[0, len(tokens) :].tolist()


def forward_output(
    batch: PackedBatch, logprobs: torch.Tensor, loss: torch.Tensor, metrics: dict[str, float]
) -> ForwardBackwardOutput:
    """A forward's result: each datum's target logprobs (float32, on the CPU) and the metrics,
    `loss:sum` first."""
    on_cpu = logprobs.detach().to("cpu", torch.float32)
    outputs = [{"logprobs": TensorData.from_torch(p)} for p in batch.split(on_cpu)]
    return ForwardBackwardOutput(
        loss_fn_outputs=outputs, metrics={"loss:sum": float(loss.detach()), **metrics}
    )
