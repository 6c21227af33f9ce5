"""The public clients: `ServiceClient` creates `TrainingClient`s; names follow Tinker's SDK.

Every training call returns an `APIFuture` at once and executes in submission order, so a
caller may submit `forward_backward` and `optim_step` back to back. Each call has an `_async`
twin that returns the same future from a coroutine (await it once to submit, once more for the
result), as Tinker's SDK does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from bios.client.futures import APIFuture
from bios.client.sampling import SamplingClient
from bios.client.transport import LossFnSpec, Transport
from bios.errors import InvalidInputError
from bios.models.loading import DEFAULT_MODEL
from bios.objectives.custom import CustomLossFn
from bios.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    LoraConfig,
    ModelInput,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
)


class ServiceClient:
    """Entry point. With no arguments the engine runs in this process (the embedded default)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        engine: Transport | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        """No arguments: the engine runs in this process. `base_url`: a `bios serve` server.

        `device` ("cpu", "cuda", "cuda:1"; default `$BIOS_DEVICE`, else CUDA when there is a GPU,
        else the CPU) and `dtype` ("bf16", "fp32"; default: bf16 on GPUs and on CPUs with native
        bf16, else fp32) place the in-process engine's base models; a device that is not there is
        an `InvalidInputError`. Every `ServiceClient()` of a process shares one engine, so a later
        one may name the same device and dtype or none. A server chooses its own
        (`bios serve --device --dtype`).

        The transport's module is imported only when it is used, so an HTTP client never loads
        the engine (nor torch's model code)."""
        self._engine: Transport
        placed = [(n, v) for n, v in (("device", device), ("dtype", dtype)) if v is not None]
        if placed and (base_url is not None or engine is not None):
            name, value = placed[0]
            chooser = "the server chooses: bios serve --device/--dtype"
            if base_url is None:
                chooser = "the engine given chooses (Engine(device=..., dtype=...))"
            raise InvalidInputError(name, f"{value!r} cannot be used here: {chooser}")
        if base_url is not None:
            from bios.client.http import HttpTransport

            self._engine = HttpTransport(base_url, api_key)
        elif engine is not None:
            self._engine = engine
        else:
            from bios.client.local import local_engine

            self._engine = local_engine(device, dtype)

    def create_lora_training_client(
        self,
        base_model: str = DEFAULT_MODEL,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        *,
        gradient_checkpointing: bool = False,
    ) -> TrainingClient:
        """A LoRA run (alpha 32, B = 0 so it starts equal to the base model).

        `gradient_checkpointing` (a Bios extension): keep each decoder layer's input only and
        recompute the layer in the backward pass — about a third more compute for the activation
        memory of one layer, for long sequences."""
        lora = LoraConfig(
            rank=rank,
            seed=seed,
            train_mlp=train_mlp,
            train_attn=train_attn,
            train_unembed=train_unembed,
        )
        run_id = self._engine.create_run(
            base_model,
            lora,
            user_metadata=user_metadata,
            gradient_checkpointing=gradient_checkpointing,
        )
        return TrainingClient(self._engine, run_id)

    def create_full_training_client(
        self,
        base_model: str = DEFAULT_MODEL,
        user_metadata: dict[str, str] | None = None,
        *,
        gradient_checkpointing: bool = False,
    ) -> TrainingClient:
        """A full fine-tuning run: every weight of its own copy of the model is trained."""
        run_id = self._engine.create_run(
            base_model,
            None,
            user_metadata=user_metadata,
            gradient_checkpointing=gradient_checkpointing,
        )
        return TrainingClient(self._engine, run_id)

    def create_training_client_from_state(
        self, path: str, user_metadata: dict[str, str] | None = None
    ) -> TrainingClient:
        """A new run with the weights saved at `path`; the optimizer starts fresh."""
        run_id = self._engine.create_run_from_state(path, False, user_metadata=user_metadata)
        return TrainingClient(self._engine, run_id)

    def create_training_client_from_state_with_optimizer(
        self, path: str, user_metadata: dict[str, str] | None = None
    ) -> TrainingClient:
        """A new run with the weights and the AdamW state saved at `path`."""
        run_id = self._engine.create_run_from_state(path, True, user_metadata=user_metadata)
        return TrainingClient(self._engine, run_id)

    async def create_lora_training_client_async(self, *args: Any, **kwargs: Any) -> TrainingClient:
        return await asyncio.to_thread(self.create_lora_training_client, *args, **kwargs)

    async def create_full_training_client_async(self, *args: Any, **kwargs: Any) -> TrainingClient:
        return await asyncio.to_thread(self.create_full_training_client, *args, **kwargs)

    async def create_training_client_from_state_async(
        self, path: str, user_metadata: dict[str, str] | None = None
    ) -> TrainingClient:
        return await asyncio.to_thread(self.create_training_client_from_state, path, user_metadata)

    async def create_training_client_from_state_with_optimizer_async(
        self, path: str, user_metadata: dict[str, str] | None = None
    ) -> TrainingClient:
        return await asyncio.to_thread(
            self.create_training_client_from_state_with_optimizer, path, user_metadata
        )

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any = None,
    ) -> SamplingClient:
        """A sampler on saved weights (`bios://<run>/sampler_weights/<name>` or `.../weights/...`)
        or, with `base_model` only, on the untouched base model."""
        session = self._engine.create_sampling_session(model_path=model_path, base_model=base_model)
        return SamplingClient(self._engine, session)

    async def create_sampling_client_async(self, *args: Any, **kwargs: Any) -> SamplingClient:
        return await asyncio.to_thread(self.create_sampling_client, *args, **kwargs)


class TrainingClient:
    """One training run: forward/backward, optimizer steps, checkpoints."""

    def __init__(self, engine: Transport, model_id: str) -> None:
        self._engine = engine
        self.model_id = model_id

    # ---- training ---------------------------------------------------------------------------

    def forward(
        self,
        data: Sequence[Datum],
        loss_fn: LossFnSpec,
        loss_fn_config: Mapping[str, float] | None = None,
        *,
        reference: str | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Logprobs and loss without gradients."""
        return APIFuture(
            self._engine.forward_backward(
                self.model_id, data, loss_fn, loss_fn_config, False, reference
            )
        )

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: LossFnSpec,
        loss_fn_config: Mapping[str, float] | None = None,
        *,
        reference: str | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Logprobs and loss; gradients accumulate until `optim_step`.

        `loss_fn` is a built-in name or a weighted list such as `[("ppo", 1.0), ("kl", 0.05)]`.
        Objectives against a reference policy (dpo, dpo_hinge, ipo, kl) read `ref_logprobs`
        from the data, or compute them from `reference`: None for the base model, or a
        `bios://` checkpoint path of a LoRA adapter on the same base.
        """
        return APIFuture(
            self._engine.forward_backward(
                self.model_id, data, loss_fn, loss_fn_config, True, reference
            )
        )

    def forward_backward_custom(
        self,
        data: Sequence[Datum],
        loss_fn: CustomLossFn,
        *,
        loss_type_input: str = "logprobs",
    ) -> APIFuture[ForwardBackwardOutput]:
        """Gradients of any differentiable `loss_fn(data, logprobs_list) -> (loss, metrics)`.

        In-process the function runs on the live autograd graph: one forward and one backward,
        the cost of a built-in objective. It may couple data (pairs, groups). With
        `loss_type_input="logits"` it gets each datum's (N, vocab) logits instead.
        """
        return APIFuture(
            self._engine.forward_backward_custom(self.model_id, data, loss_fn, loss_type_input)
        )

    def optim_step(self, adam_params: AdamParams) -> APIFuture[OptimStepResponse]:
        """One AdamW step on the accumulated gradients; metrics hold grad_norm, learning_rate."""
        return APIFuture(self._engine.optim_step(self.model_id, adam_params))

    # ---- state ------------------------------------------------------------------------------

    def save_state(self, name: str, overwrite: bool = False) -> APIFuture[SaveWeightsResponse]:
        """Weights and optimizer state at `bios://<run>/weights/<name>`."""
        future = self._engine.save_state(self.model_id, name, "weights", overwrite)
        return APIFuture.mapped(future, lambda path: SaveWeightsResponse(path=path))

    def save_weights_for_sampler(
        self, name: str, overwrite: bool = False
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Weights only, at `bios://<run>/sampler_weights/<name>`."""
        future = self._engine.save_state(self.model_id, name, "sampler_weights", overwrite)
        return APIFuture.mapped(future, lambda path: SaveWeightsForSamplerResponse(path=path))

    def load_state(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Load weights from `path`; the optimizer state is reset."""
        future = self._engine.load_state(self.model_id, path, with_optimizer=False)
        return APIFuture.mapped(future, lambda p: LoadWeightsResponse(path=p))

    def load_state_with_optimizer(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Load weights and AdamW state from `path`."""
        future = self._engine.load_state(self.model_id, path, with_optimizer=True)
        return APIFuture.mapped(future, lambda p: LoadWeightsResponse(path=p))

    # ---- sampling -----------------------------------------------------------------------------

    def save_weights_and_get_sampling_client(
        self, name: str | None = None, retry_config: Any = None
    ) -> SamplingClient:
        """A sampler on a snapshot of this run's weights as they are after every call submitted
        before this one. Without `name` the snapshot lives in memory only; with it the weights are
        also saved at `bios://<run>/sampler_weights/<name>`."""
        if name is not None:
            self.save_weights_for_sampler(name).result()
        session = self._engine.create_sampling_session(run_id=self.model_id)
        return SamplingClient(self._engine, session)

    def create_sampling_client(self, model_path: str, retry_config: Any = None) -> SamplingClient:
        """A sampler on weights saved at `model_path`."""
        session = self._engine.create_sampling_session(model_path=model_path)
        return SamplingClient(self._engine, session)

    async def save_weights_and_get_sampling_client_async(
        self, *args: Any, **kwargs: Any
    ) -> SamplingClient:
        return await asyncio.to_thread(self.save_weights_and_get_sampling_client, *args, **kwargs)

    async def create_sampling_client_async(self, *args: Any, **kwargs: Any) -> SamplingClient:
        return await asyncio.to_thread(self.create_sampling_client, *args, **kwargs)

    # ---- information and helpers --------------------------------------------------------------

    def get_info(self) -> GetInfoResponse:
        return self._engine.get_info(self.model_id)

    def get_tokenizer(self):
        """The base model's Hugging Face tokenizer."""
        return self._engine.tokenizer(self.model_id)

    def generate(
        self, prompt: ModelInput | Sequence[int], max_tokens: int = 64
    ) -> APIFuture[list[int]]:
        """Greedy continuation of `prompt` with the current weights (token ids, stop excluded
        only if the model never emitted it)."""
        tokens = prompt.to_ints() if isinstance(prompt, ModelInput) else list(prompt)
        return APIFuture(self._engine.generate(self.model_id, tokens, max_tokens))

    # ---- async twins --------------------------------------------------------------------------

    async def forward_async(self, *args: Any, **kwargs: Any) -> APIFuture[ForwardBackwardOutput]:
        return self.forward(*args, **kwargs)

    async def forward_backward_async(
        self, *args: Any, **kwargs: Any
    ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward(*args, **kwargs)

    async def forward_backward_custom_async(
        self, *args: Any, **kwargs: Any
    ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward_custom(*args, **kwargs)

    async def optim_step_async(self, adam_params: AdamParams) -> APIFuture[OptimStepResponse]:
        return self.optim_step(adam_params)

    async def save_state_async(self, *args: Any, **kwargs: Any) -> APIFuture[SaveWeightsResponse]:
        return self.save_state(*args, **kwargs)

    async def save_weights_for_sampler_async(
        self, *args: Any, **kwargs: Any
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        return self.save_weights_for_sampler(*args, **kwargs)

    async def load_state_async(self, *args: Any, **kwargs: Any) -> APIFuture[LoadWeightsResponse]:
        return self.load_state(*args, **kwargs)

    async def load_state_with_optimizer_async(
        self, *args: Any, **kwargs: Any
    ) -> APIFuture[LoadWeightsResponse]:
        return self.load_state_with_optimizer(*args, **kwargs)

    async def get_info_async(self) -> GetInfoResponse:
        return self.get_info()

    async def generate_async(self, *args: Any, **kwargs: Any) -> APIFuture[list[int]]:
        return self.generate(*args, **kwargs)
