"""Sampling sessions: immutable snapshots of weights, request checks, and request batching.

A session samples from fixed weights on a base model's worker:

- a LoRA snapshot holds a frozen copy of the run's adapter (A and B only) and applies it to the
  shared base model through the `AdapterHost` hooks, so snapshots of many runs share one copy of
  the base weights;
- a full fine-tuning snapshot holds a frozen copy of the run's whole model;
- a base-model session holds nothing of its own.

Requests are checked in the caller's thread (`InvalidInputError` naming the field, nothing
queued) and put on the session's queue; each also submits a drain task to the worker. The worker
runs tasks one at a time, so while it is busy requests pile up, and the next drain decodes every
pending request of the session in one batch (`bios.engine.decoding.Decoder`).

A decode runs in turns: one turn decodes for `turn_seconds` (at least one step), then gives the
worker back and queues its continuation first in the session's lane, so every other lane takes a
turn in between — a request of 2,000 samples × 200 tokens delays another tenant's forward by one
turn, not by its whole decode. The decoder's state (tokens so far, KV cache) carries over, so the
tokens are the same however the decode is cut; requests arriving meanwhile wait for the next batch.
A small batch (at most `whole_below` samples × max_tokens) decodes in one turn.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from bios.checkpoints.layout import FULL_WEIGHTS_FILE, has_adapter, has_full_weights, read_state
from bios.engine import memory
from bios.engine.decoding import (
    Decoder,
    SampleRequest,
    SampleSettings,
    generate,
    prompt_logprobs,
)
from bios.engine.runs import Run
from bios.engine.worker import ModelWorker
from bios.errors import InvalidInputError
from bios.models.attention import cache_dtype
from bios.models.loading import load_model
from bios.models.lora import LoRAAdapter, find_targets
from bios.types import ModelInput, SampledSequence, SampleResponse, SamplingParams

log = logging.getLogger(__name__)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A detached copy with no gradients, for a snapshot that later training cannot change."""
    clone = copy.deepcopy(module)
    for param in clone.parameters():
        param.grad = None
    return clone.requires_grad_(False).eval()


class SamplingSession:
    """Fixed weights to sample from, and the queue of requests waiting for the worker."""

    max_batch_rows = 64  # rows (samples) decoded together at most; bounds the KV cache
    turn_seconds = 0.05  # decode time per worker turn (at least one step) before others go
    whole_below = 1024  # a batch of at most this many samples × max_tokens decodes in one turn

    def __init__(
        self,
        worker: ModelWorker,
        base_model: str,
        adapter: LoRAAdapter | None = None,
        full_model: nn.Module | None = None,
    ) -> None:
        self.session_id = uuid.uuid4().hex[:16]
        # Its own worker lane: each sampler takes fair turns with each run and other samplers.
        self.lane = f"sampling:{self.session_id}"
        self.worker = worker
        self.base_model = base_model
        self._adapter = adapter
        self._full_model = full_model
        self.eos_ids = worker.loaded.eos_token_ids()
        self._pending: list[tuple[SampleRequest, Future]] = []
        self._lock = threading.Lock()
        self.batch_sizes: deque[int] = deque(maxlen=256)  # requests per decode batch, latest last
        # What a decode's memory depends on (`bios.engine.memory.sample_bytes`).
        self._shape = memory.Shape.of(full_model if full_model is not None else worker.loaded.model)
        self._cache_bytes = cache_dtype(worker.dtype, worker.device).itemsize

    @classmethod
    def of_run(cls, worker: ModelWorker, run: Run) -> SamplingSession:
        """A snapshot of a run's current weights; call it on the worker thread, in request order."""
        if run.adapter is not None:
            return cls(worker, run.base_model, adapter=frozen_copy(run.adapter))
        assert run.full_model is not None
        # The float32 master weights, sampled from in the base model's dtype.
        full_model = frozen_copy(run.full_model).to(worker.dtype)
        return cls(worker, run.base_model, full_model=full_model)

    @classmethod
    def of_checkpoint(
        cls, folder: Path, worker_of: Callable[[str], ModelWorker], field: str = "model_path"
    ) -> SamplingSession:
        """A session on the weights saved in `folder` (a LoRA adapter or full weights)."""
        base_model = read_state(folder, field).base_model
        worker = worker_of(base_model)
        if has_adapter(folder):
            adapter = LoRAAdapter.load_peft(folder, worker.device).requires_grad_(False)
            _check_adapter_fits(adapter, worker.loaded.model, field)
            return cls(worker, base_model, adapter=adapter)
        if has_full_weights(folder):
            model = load_model(base_model, worker.dtype, worker.device).model
            result = model.load_state_dict(load_file(folder / FULL_WEIGHTS_FILE), strict=False)
            if result.unexpected_keys:
                raise InvalidInputError(
                    field, f"weights not in {base_model}: {result.unexpected_keys[:3]}"
                )
            return cls(worker, base_model, full_model=model.requires_grad_(False).eval())
        raise InvalidInputError(field, f"{folder.name}: holds neither an adapter nor full weights")

    @property
    def weight_bytes(self) -> int:
        """Memory this session's own weights hold (0 for a base model: it shares the worker's)."""
        own = self._full_model if self._full_model is not None else self._adapter
        if own is None:
            return 0
        tensors = [*own.parameters(), *own.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def tokenizer(self):
        """The base model's tokenizer (shared: treat it as read-only)."""
        return self.worker.loaded.tokenizer

    @contextmanager
    def model(self) -> Iterator[nn.Module]:
        """The model with this session's weights in effect (worker thread only)."""
        if self._full_model is not None:
            yield self._full_model
        elif self._adapter is None:
            with self.worker.host.unhooked() as model:
                yield model
        else:
            with self.worker.host.use(self._adapter) as model:
                yield model

    # ---- requests ---------------------------------------------------------------------------

    def sample(
        self,
        prompt: ModelInput | Sequence[int],
        num_samples: int,
        sampling_params: SamplingParams | dict[str, Any],
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        *,
        topk_sample_logprobs: int = 0,
        prompt_logprobs_last_n: int | None = None,
        on_progress: Callable[[list[SampledSequence]], None] | None = None,
    ) -> Future[SampleResponse]:
        """Check and queue a request; it is decoded with all requests pending at its turn.

        `on_progress` (a stream) is called on the worker thread after every decode turn with
        the sequences so far; the request then decodes in turns, however small it is."""
        request = self.check_request(
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            topk_sample_logprobs=topk_sample_logprobs,
            prompt_logprobs_last_n=prompt_logprobs_last_n,
        )
        request.on_progress = on_progress
        future: Future[SampleResponse] = Future()
        with self._lock:
            self._pending.append((request, future))
        self.worker.submit(self._drain, lane=self.lane)
        return future

    def compute_logprobs(self, prompt: ModelInput | Sequence[int]) -> Future[list[float | None]]:
        """log p(prompt[i] | prompt[:i]) under this session's weights; None at position 0."""
        tokens = self._check_prompt(prompt)
        settings = SampleSettings(max_tokens=1, temperature=1.0, top_k=-1, top_p=1.0, seed=0)
        scoring = SampleRequest(tokens, 1, settings, prompt_logprobs=True)
        memory.check_sample_fits(
            self._shape, scoring, self._cache_bytes, self.worker.device, scoring_only=True
        )

        def run() -> list[float | None]:
            device = self.worker.device
            free = memory.free_bytes(device)
            check = memory.check_sample_fits
            check(self._shape, scoring, self._cache_bytes, device, free, scoring_only=True)
            with self.model() as model:
                return prompt_logprobs(model, tokens)

        return self.worker.submit(run, lane=self.lane)

    def _drain(self) -> None:
        """Start decoding the pending requests (up to `max_batch_rows` rows, and what fits in
        the memory free now) as one batch."""
        free = memory.free_bytes(self.worker.device)  # read once, outside the lock
        with self._lock:
            taken, rows = 0, 0
            while taken < len(self._pending):
                count = self._pending[taken][0].num_samples
                too_many = rows + count > self.max_batch_rows
                if taken > 0 and (too_many or not self._fits(taken + 1, free)):
                    break
                taken, rows = taken + 1, rows + count
            batch, self._pending = self._pending[:taken], self._pending[taken:]
        batch = [
            (r, f)
            for r, f in batch
            if f.set_running_or_notify_cancel() and self._fits_now(r, f, free)
        ]
        if not batch:
            return  # an earlier drain took them, or none fits the memory free now
        self.batch_sizes.append(len(batch))
        self._turn(self._decode_turns([r for r, _ in batch]), batch)

    def _fits_now(self, request: SampleRequest, future: Future, free: int) -> bool:
        """Whether `request` fits in the `free` bytes; if not, its future fails saying so."""
        try:
            memory.check_sample_fits(
                self._shape, request, self._cache_bytes, self.worker.device, free
            )
        except InvalidInputError as error:
            future.set_exception(error)
            return False
        return True

    def _fits(self, count: int, free: int) -> bool:
        """Whether the first `count` pending requests fit in `free` bytes decoded as one batch."""
        requests = [request for request, _ in self._pending[:count]]
        return memory.sample_batch_fits(self._shape, requests, self._cache_bytes, free)

    def _turn(
        self,
        turns: Iterator[list[SampleResponse] | None],
        batch: list[tuple[SampleRequest, Future]],
    ) -> None:
        """One turn of a batch's decode; queues the next first in this lane until it is done."""
        try:
            responses = next(turns)
        except BaseException as error:
            for _, future in batch:
                future.set_exception(error)
            return
        if responses is None:
            self.worker.submit(self._turn, turns, batch, lane=self.lane, first=True)
            return
        turns.close()
        for (_, future), response in zip(batch, responses, strict=True):
            future.set_result(response)

    def _decode_turns(self, requests: list[SampleRequest]) -> Iterator[list[SampleResponse] | None]:
        """Decode `requests` in turns: None after each unfinished turn, then the responses."""
        work = sum(r.num_samples * r.settings.max_tokens for r in requests)
        streams = [(i, r.on_progress) for i, r in enumerate(requests) if r.on_progress]
        seconds = self.turn_seconds if work > self.whole_below or streams else math.inf
        decoder: Decoder | None = None
        while True:
            with self.model() as model, torch.inference_mode():
                if decoder is None:
                    decoder = Decoder(model, requests, self.worker.loaded.tokenizer)
                done = decoder.advance(model, seconds)
            if done:
                break
            for index, on_progress in streams:
                try:
                    on_progress(decoder.partial(index))
                except Exception:  # a listener's failure is not the decode's
                    log.exception("a sampling progress listener failed")
            yield None
        responses = decoder.responses()
        del decoder, model  # the decode's KV cache and patched weights go now, not at exit
        yield responses

    def _decode(self, requests: list[SampleRequest]) -> list[SampleResponse]:
        """One response per request, decoded as one batch (worker thread only)."""
        with self.model() as model:
            return generate(model, requests, self.worker.loaded.tokenizer)

    # ---- checks -----------------------------------------------------------------------------

    def _check_prompt(self, prompt: ModelInput | Sequence[int], field: str = "prompt") -> list[int]:
        if isinstance(prompt, ModelInput):
            tokens = prompt.to_ints()
        elif isinstance(prompt, Sequence) and not isinstance(prompt, str):
            tokens = list(prompt)
        else:
            raise InvalidInputError(field, f"expected a ModelInput, got {type(prompt).__name__}")
        if not tokens:
            raise InvalidInputError(field, "is empty")
        vocab = self.worker.vocab_size
        for position, token in enumerate(tokens):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise InvalidInputError(
                    field,
                    f"token id {token!r} at position {position} is outside the vocabulary "
                    f"[0, {vocab})",
                )
        if len(tokens) > self.worker.max_length:
            raise InvalidInputError(
                field,
                f"length {len(tokens)} exceeds the model's context of {self.worker.max_length}",
            )
        return tokens

    def check_request(
        self,
        prompt: ModelInput | Sequence[int],
        num_samples: int,
        sampling_params: SamplingParams | dict[str, Any],
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        *,
        topk_sample_logprobs: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> SampleRequest:
        """A validated request; raises InvalidInputError naming the first bad field."""
        tokens = self._check_prompt(prompt)
        if not _is_int(num_samples) or num_samples < 1:
            raise InvalidInputError("num_samples", f"expected an integer ≥ 1, got {num_samples!r}")
        if not isinstance(include_prompt_logprobs, bool):
            raise InvalidInputError(
                "include_prompt_logprobs", f"expected a bool, got {include_prompt_logprobs!r}"
            )
        vocab = self.worker.vocab_size
        if not _is_int(topk_prompt_logprobs) or not 0 <= topk_prompt_logprobs <= vocab:
            raise InvalidInputError(
                "topk_prompt_logprobs",
                f"expected an integer in [0, {vocab}], got {topk_prompt_logprobs!r}",
            )
        if not _is_int(topk_sample_logprobs) or not 0 <= topk_sample_logprobs <= vocab:
            raise InvalidInputError(
                "topk_sample_logprobs",
                f"expected an integer in [0, {vocab}], got {topk_sample_logprobs!r}",
            )
        if prompt_logprobs_last_n is not None:
            # As Tinker defines it: a count of prompt positions to score, which needs logprobs.
            if not (include_prompt_logprobs or topk_prompt_logprobs > 0):
                raise InvalidInputError(
                    "prompt_logprobs_last_n", "needs prompt_logprobs or topk_prompt_logprobs"
                )
            if not _is_int(prompt_logprobs_last_n) or not (
                1 <= prompt_logprobs_last_n <= len(tokens) - 1
            ):
                raise InvalidInputError(
                    "prompt_logprobs_last_n",
                    f"expected an integer in [1, {len(tokens) - 1}] (the prompt's length - 1), "
                    f"got {prompt_logprobs_last_n!r}",
                )
        settings = self._check_params(sampling_params, len(tokens))
        request = SampleRequest(
            tokens,
            num_samples,
            settings,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            topk_sample_logprobs=topk_sample_logprobs,
            prompt_logprobs_last_n=prompt_logprobs_last_n,
        )
        memory.check_sample_fits(self._shape, request, self._cache_bytes, self.worker.device)
        return request

    def _check_params(
        self, params: SamplingParams | dict[str, Any], prompt_length: int
    ) -> SampleSettings:
        if isinstance(params, dict):
            try:
                params = SamplingParams(**params)
            except ValidationError as error:
                where = ".".join(str(p) for p in error.errors()[0]["loc"])
                raise InvalidInputError(
                    f"sampling_params.{where}", error.errors()[0]["msg"]
                ) from None
        if not isinstance(params, SamplingParams):
            raise InvalidInputError(
                "sampling_params", f"expected SamplingParams, got {type(params).__name__}"
            )
        context = self.worker.max_length
        room = context - prompt_length
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if not _is_int(max_tokens) or max_tokens < 1:
            raise InvalidInputError(
                "sampling_params.max_tokens", f"expected an integer ≥ 1, got {max_tokens!r}"
            )
        if max_tokens > room:
            raise InvalidInputError(
                "sampling_params.max_tokens",
                f"prompt ({prompt_length} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                f"context of {context}",
            )
        temperature = params.temperature
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidInputError(
                "sampling_params.temperature", f"expected a finite number ≥ 0, got {temperature}"
            )
        if not _is_int(params.top_k) or not (params.top_k == -1 or params.top_k >= 1):
            raise InvalidInputError(
                "sampling_params.top_k", f"expected -1 (off) or an integer ≥ 1, got {params.top_k}"
            )
        if not math.isfinite(params.top_p) or not 0 < params.top_p <= 1:
            raise InvalidInputError(
                "sampling_params.top_p", f"expected a number in (0, 1], got {params.top_p}"
            )
        strings, ids = self._check_stop(params.stop)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        if not _is_int(seed):
            raise InvalidInputError("sampling_params.seed", f"expected an integer, got {seed!r}")
        return SampleSettings(
            max_tokens=max_tokens,
            temperature=float(temperature),
            top_k=params.top_k,
            top_p=float(params.top_p),
            seed=seed % 2**64,  # the range torch.Generator.manual_seed takes
            # `stop=[]` turns every stop off, the end-of-sequence tokens too (Tinker's rule).
            stop_ids=tuple(sorted({*ids, *self.eos_ids})) if params.stop != [] else (),
            stop_strings=strings,
        )

    def _check_stop(self, stop: object) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(stop strings, stop token ids) from `stop`: a string, a list of strings or of ids."""
        if stop is None:
            return (), ()
        items = [stop] if isinstance(stop, str) else list(stop)  # type: ignore[call-overload]
        if all(isinstance(s, str) for s in items):
            if any(s == "" for s in items):
                raise InvalidInputError("sampling_params.stop", "stop strings must not be empty")
            return tuple(items), ()
        vocab = self.worker.vocab_size
        for token in items:
            if not _is_int(token) or not 0 <= token < vocab:
                raise InvalidInputError(
                    "sampling_params.stop",
                    f"expected strings or token ids in [0, {vocab}), got {token!r}",
                )
        return (), tuple(items)


def _check_adapter_fits(adapter: LoRAAdapter, model: nn.Module, field: str) -> None:
    """Every adapted layer exists in `model` with the adapter's shapes."""
    short_names = tuple({name.rsplit(".", 1)[-1] for name in adapter.module_names})
    targets = find_targets(model, short_names)
    for name, factor, param in adapter.named_factors():
        layer = targets.get(name)
        if layer is None:
            raise InvalidInputError(field, f"adapter layer {name} is not in the base model")
        expected = layer.in_features if factor == "lora_A" else layer.out_features
        if param.shape[1 if factor == "lora_A" else 0] != expected:
            raise InvalidInputError(
                field, f"adapter layer {name}.{factor} has shape {list(param.shape)}"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
