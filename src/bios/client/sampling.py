"""`SamplingClient`: sampling and prompt logprobs from a fixed snapshot of weights (Tinker's API).

Created by `TrainingClient.save_weights_and_get_sampling_client()`,
`ServiceClient.create_sampling_client(model_path=...)` or `(base_model=...)`. The weights never
change under a client: train further and ask for a new one. `sample` and `compute_logprobs` return
an `APIFuture` at once; as in Tinker's SDK, `sample_async` and `compute_logprobs_async` are
coroutines giving the result itself. Concurrent `sample` calls on one client are decoded together
in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bios.client.futures import APIFuture
from bios.client.transport import SamplingSessionHandle, Transport
from bios.types import ModelInput, SampleResponse, SamplingParams


class SamplingClient:
    """Samples from an immutable snapshot of weights (a LoRA adapter, full weights, the base)."""

    def __init__(self, engine: Transport, session: SamplingSessionHandle) -> None:
        self._engine = engine
        self.sampling_session_id = session.session_id
        # The engine holds sessions weakly: this reference keeps the snapshot alive while the
        # client is, and lets its memory go with the client.
        self._session = session

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        *,
        topk_sample_logprobs: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> APIFuture[SampleResponse]:
        """`num_samples` continuations of `prompt`, each with the logprob of every sampled token
        under the distribution it was drawn from (after temperature, top-k and top-p).

        `include_prompt_logprobs` adds log p(prompt[i] | prompt[:i]) (None first);
        `topk_prompt_logprobs=k` the k most likely (token, logprob) pairs at each prompt position;
        `prompt_logprobs_last_n=n` scores only the last n prompt positions (the others None).
        `topk_sample_logprobs=k` adds, at each sampled position, the k most probable tokens of
        the distribution sampled from (`SampledSequence.topk_logprobs`).
        Bad input raises `InvalidInputError` here, before anything is queued.
        """
        return APIFuture(
            self._engine.sample(
                self.sampling_session_id,
                prompt,
                num_samples,
                sampling_params,
                include_prompt_logprobs,
                topk_prompt_logprobs,
                topk_sample_logprobs=topk_sample_logprobs,
                prompt_logprobs_last_n=prompt_logprobs_last_n,
            )
        )

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """log p(prompt[i] | prompt[:i]) for every position; the first entry is None."""
        return APIFuture(self._engine.compute_logprobs(self.sampling_session_id, prompt))

    async def sample_async(self, *args: Any, **kwargs: Any) -> SampleResponse:
        return await self.sample(*args, **kwargs)

    async def compute_logprobs_async(
        self, prompt: ModelInput | Sequence[int]
    ) -> list[float | None]:
        return await self.compute_logprobs(prompt)  # type: ignore[arg-type]

    def get_tokenizer(self):
        """The base model's Hugging Face tokenizer (shared: treat it as read-only)."""
        return self._session.tokenizer

    def get_base_model(self) -> str:
        return self._session.base_model

    async def get_base_model_async(self) -> str:
        return self.get_base_model()
