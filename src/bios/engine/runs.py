"""A training run: trainable weights (a LoRA adapter or a full copy) and their AdamW state.

The run does the arithmetic of one request; ordering, validation and file paths live in the
worker and the engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from bios.engine.batch import PackedBatch
from bios.errors import InvalidInputError
from bios.models.lora import AdapterHost, LoRAAdapter
from bios.objectives import Objective
from bios.types import AdamParams, ForwardBackwardOutput, LoraConfig, OptimStepResponse, TensorData

STATE_FILE = "bios_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FULL_WEIGHTS_FILE = "model.safetensors"
_MOMENTS = ("exp_avg", "exp_avg_sq", "step")


def target_logprobs(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """log p(target_t | tokens_≤t) for every real token of the batch, flattened in datum order."""
    logits = model(input_ids=batch.input_ids, use_cache=False).logits
    token_nll = F.cross_entropy(
        logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none"
    )
    return -token_nll.view_as(batch.targets)[batch.mask]


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
        self._host = host
        self.adapter = LoRAAdapter.for_model(host.model, lora) if lora is not None else None
        self.full_model = full_model
        if self.full_model is not None:
            self.full_model.requires_grad_(True)
        self.parameters = self._trainable()
        self.optimizer = torch.optim.AdamW(list(self.parameters.values()), lr=0.0, foreach=True)
        self.steps = 0

    @property
    def is_lora(self) -> bool:
        return self.adapter is not None

    def _trainable(self) -> dict[str, nn.Parameter]:
        if self.adapter is not None:
            return {f"{m}.{f}": p for m, f, p in self.adapter.named_factors()}
        assert self.full_model is not None
        return dict(self.full_model.named_parameters())  # tied weights appear once

    @contextmanager
    def model(self) -> Iterator[nn.Module]:
        """The model with this run's weights in effect."""
        if self.adapter is None:
            yield self.full_model
        else:
            with self._host.use(self.adapter) as model:
                yield model

    # ---- steps --------------------------------------------------------------------------------

    def forward_backward(
        self,
        batch: PackedBatch,
        objective: Objective,
        config: dict[str, float],
        backward: bool,
    ) -> ForwardBackwardOutput:
        """Per-token logprobs and the objective; with `backward`, gradients are accumulated."""
        with torch.set_grad_enabled(backward), self.model() as model:
            logprobs = target_logprobs(model, batch)
            loss, metrics = objective.fn(logprobs, batch.inputs, config)
            if backward:
                loss.backward()
        outputs = [{"logprobs": TensorData.from_torch(p)} for p in batch.split(logprobs.detach())]
        return ForwardBackwardOutput(
            loss_fn_outputs=outputs, metrics={"loss:sum": float(loss.detach()), **metrics}
        )

    def optim_step(self, params: AdamParams) -> OptimStepResponse:
        """One AdamW step on the accumulated gradients, which are then cleared.

        The gradient norm is always measured; with `grad_clip_norm` > 0 the gradients are first
        scaled down to that norm, as `torch.nn.utils.clip_grad_norm_` does.
        """
        grads = [p.grad for p in self.parameters.values() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        if params.grad_clip_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(
                self.parameters.values(), params.grad_clip_norm, grad_norm
            )
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
        return OptimStepResponse(
            metrics={"grad_norm": float(grad_norm), "learning_rate": params.learning_rate}
        )

    # ---- state on disk ------------------------------------------------------------------------

    def describe(self) -> dict:
        return {
            "format": 1,
            "run_id": self.run_id,
            "base_model": self.base_model,
            "lora": self.lora.model_dump() if self.lora is not None else None,
            "steps": self.steps,
        }

    def save(self, folder: Path, with_optimizer: bool) -> None:
        """Write the weights (PEFT folder or full safetensors) and optionally the optimizer."""
        if self.adapter is not None:
            self.adapter.save_peft(folder, self.base_model)
        else:
            tensors = {n: p.detach().contiguous() for n, p in self.parameters.items()}
            save_file(tensors, folder / FULL_WEIGHTS_FILE)
        if with_optimizer:
            save_file(self._optimizer_tensors(), folder / OPTIMIZER_FILE)
        (folder / STATE_FILE).write_text(json.dumps(self.describe(), indent=2))

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
        weights = self._read_weights(folder)
        optimizer_state = self._read_optimizer(folder) if with_optimizer else {}
        with torch.no_grad():
            for name, tensor in weights.items():
                self.parameters[name].copy_(tensor)
                self.parameters[name].grad = None
        self.optimizer.state.clear()
        for name, state in optimizer_state.items():
            self.optimizer.state[self.parameters[name]] = state
        saved = (
            json.loads((folder / STATE_FILE).read_text()) if (folder / STATE_FILE).exists() else {}
        )
        self.steps = int(saved.get("steps", 0)) if with_optimizer else 0

    def _read_weights(self, folder: Path) -> dict[str, torch.Tensor]:
        if self.adapter is not None:
            if not (folder / "adapter_config.json").exists():
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
            if not (folder / FULL_WEIGHTS_FILE).exists():
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
                torch.tensor([tokens]),
                attention_mask=torch.ones(1, len(tokens), dtype=torch.int64),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=stop_ids or None,
                pad_token_id=stop_ids[0] if stop_ids else 0,
            )
        return output[0, len(tokens) :].tolist()
