"""What a transport must do: the interface the clients call, implemented twice.

    bios.engine.engine.Engine         in-process (the embedded default; `client/local.py`)
    bios.client.http.HttpTransport    over HTTP to `bios serve`

The clients (`service.py`, `sampling.py`) know only this interface, so a user of the HTTP
transport never loads the engine. Every call validates its arguments before anything is queued
(InvalidInputError naming the field, state unchanged) and returns a `Future` completed in the
order calls were made on the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from bios.objectives.custom import CustomLossFn
from bios.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoraConfig,
    ModelInput,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
)

LossFnSpec = str | Sequence[tuple[str, float]]


class SamplingSessionHandle(Protocol):
    """A sampling session as a client holds it: an immutable snapshot of weights."""

    session_id: str

    @property
    def base_model(self) -> str: ...

    @property
    def tokenizer(self) -> Any: ...


class Transport(Protocol):
    """The calls `ServiceClient`, `TrainingClient` and `SamplingClient` make."""

    # ---- runs ---------------------------------------------------------------------------------

    def create_run(
        self,
        base_model: str,
        lora: LoraConfig | None,
        *,
        user_metadata: Mapping[str, str] | None = None,
        gradient_checkpointing: bool = False,
    ) -> str:
        """A new LoRA run (`lora` given) or full fine-tuning run; its id."""
        ...

    def create_run_from_state(
        self,
        path: str,
        with_optimizer: bool,
        *,
        user_metadata: Mapping[str, str] | None = None,
    ) -> str:
        """A new run with a saved state's settings and weights (and AdamW moments)."""
        ...

    def get_info(self, run_id: str) -> GetInfoResponse: ...

    def tokenizer(self, run_id: str) -> Any: ...

    # ---- training -----------------------------------------------------------------------------

    def forward_backward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: LossFnSpec,
        loss_fn_config: Mapping[str, float] | None = None,
        backward: bool = True,
        reference: str | None = None,
    ) -> Future[ForwardBackwardOutput]: ...

    def forward_backward_custom(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: CustomLossFn,
        loss_type_input: str = "logprobs",
    ) -> Future[ForwardBackwardOutput]: ...

    def optim_step(self, run_id: str, adam_params: AdamParams) -> Future[OptimStepResponse]: ...

    def save_state(
        self, run_id: str, name: str, kind: str = "weights", overwrite: bool = False
    ) -> Future[str]:
        """Save weights (+ optimizer for kind "weights"); the future gives the `bios://` path."""
        ...

    def load_state(self, run_id: str, path: str, with_optimizer: bool) -> Future[str]: ...

    def generate(
        self, run_id: str, tokens: Sequence[int], max_tokens: int
    ) -> Future[list[int]]: ...

    # ---- sampling -----------------------------------------------------------------------------

    def create_sampling_session(
        self,
        run_id: str | None = None,
        model_path: str | None = None,
        base_model: str | None = None,
    ) -> SamplingSessionHandle: ...

    def sample(
        self,
        session_id: str,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        *,
        topk_sample_logprobs: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> Future[SampleResponse]: ...

    def compute_logprobs(
        self, session_id: str, prompt: ModelInput
    ) -> Future[list[float | None]]: ...
