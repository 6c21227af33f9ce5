"""Batched sampling with a KV cache: the arithmetic of `SamplingClient.sample`.

One call of `generate` decodes a batch of requests (each a prompt and `num_samples`) together:

1. Prefill: each prompt runs through the model once, filling a `DynamicCache` of batch 1 (and,
   when asked for, giving the prompt's logprobs). Prompts are prefilled one by one so that each is
   computed exactly as it would be alone, with no padding.
2. The first token of every sample is chosen from the prompt's last logits. Only if a row is still
   running is the decode cache built: each prompt's keys and values, left-padded to the longest
   prompt of the batch and repeated once per sample (`bios.engine.kv_cache.batch_cache`). Padded
   positions are masked out, and every row has its own position ids, so padding changes nothing.
3. Decode: one forward of the batch's newest tokens per step (the cache appends in place, see
   `bios.engine.kv_cache`; on a GPU the cache is static and the step a CUDA graph,
   `bios.engine.decode_graph`; on the CPU batches of a few rows or more use prepacked weights,
   fewer rows of a 16-bit model torch's own matrix-vector kernels, `bios.engine.packed`;
   RMSNorm runs as one kernel, `bios.engine.fused_norms`). Rows stop on a stop token (the
   tokenizer's end-of-sequence tokens always count), a stop string or `max_tokens`; finished
   rows are dropped from the batch (and cache) once they are a quarter of it.
4. Turns: `Decoder.advance` runs the decode for a time budget and returns, keeping its state, so
   a long decode can share the worker with other work (`bios.engine.sampling_sessions`).

Token choice (`choose_tokens`) for logits z, temperature T, top-k k and top-p p:

    q = softmax(z / T);  keep the k most probable tokens (k = -1: all);  then keep the smallest
    set of the most probable remaining tokens whose renormalised mass reaches p (p = 1: all);
    π = q renormalised over the kept set;  draw a token from π;  report log π(token).

So the reported logprob is that of the distribution actually sampled from: with T = 1, k = -1,
p = 1 it is the model's own log p(token | context), the value `forward` computes. T = 0 is greedy
(argmax of z) and reports 0.0, the log-probability of a point mass; ask `compute_logprobs` for
the model's own logprobs of a greedy sequence. `topk_sample_logprobs = K` reports, at each
sampled position, the K most probable tokens of that same π with their log π; where π has fewer
than K tokens (truncated by k or p, or a point mass at T = 0) the list is shorter.

Randomness: each request owns a `torch.Generator` seeded with its seed and draws `num_samples`
uniforms per step (inverse-CDF sampling, one uniform per row), so a request's tokens depend on its
seed only, never on which other requests share its batch.

Device: every tensor of a decode (tokens, positions, masks, the KV cache, the token choice) lives
on the model's device. Only the uniforms are drawn on the CPU, from the request's CPU generator,
and then moved: the same seed gives the same random stream on every device. What comes back is
Python lists.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from bios.engine.decode_graph import StaticDecodeStep, graphs_enabled
from bios.engine.fused_norms import fused_rms_norms
from bios.engine.kv_cache import batch_cache
from bios.engine.packed import MIN_ROWS, PackedLinears, native_gemv, wants_native_gemv
from bios.models.attention import cache_dtype
from bios.types import SampledSequence, SampleResponse, StopReason


@dataclass(frozen=True)
class SampleSettings:
    """Validated sampling parameters of one request (`stop_ids` includes the EOS tokens)."""

    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()


@dataclass
class SampleRequest:
    """One validated `sample` call: a prompt, how many samples, and how to draw them."""

    prompt: list[int]
    num_samples: int
    settings: SampleSettings
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0  # the K most probable tokens of π at each sampled position
    # Prompt logprobs (and top-k) only for the last N positions; earlier entries None.
    prompt_logprobs_last_n: int | None = None
    # Called (on the worker thread, between decode turns) with the sequences so far: a stream.
    on_progress: Callable[[list[SampledSequence]], None] | None = field(default=None, repr=False)
    # A part of a larger request (several ranks share one): these are samples
    # [first_sample, first_sample + num_samples) of `total_samples`, drawn from the whole
    # request's random stream, so the parts together equal the request decoded at once.
    first_sample: int = 0
    total_samples: int | None = None


def sampling_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π over the columns kept for each row of `logits` (R, V), temperature > 0, and the
    vocabulary ids of those columns (None: the columns are the vocabulary itself).

    π is softmax(logits / temperature) truncated to the `top_k` most probable tokens, then to the
    smallest most-probable set whose mass reaches `top_p`, and renormalised (see the module
    docstring); a column outside the kept set has log π = -inf.
    """
    scores = logits.float() if temperature == 1.0 else logits.float() / temperature
    candidates = None  # the vocabulary ids of the columns of `scores`, once truncated or sorted
    if 0 < top_k < scores.shape[-1]:
        scores, candidates = scores.topk(top_k, dim=-1)  # sorted, most probable first
    if top_p < 1.0:
        if candidates is None:
            scores, candidates = scores.sort(dim=-1, descending=True)
        probs = scores.softmax(dim=-1)
        # A token is kept while the mass of the tokens before it is still short of top_p, so the
        # kept set is the smallest one reaching top_p and always holds the most probable token.
        scores = scores.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
    return scores.log_softmax(dim=-1), candidates


def choose_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    uniforms: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of `logits` (R, V) and return (tokens, log π(token)), both (R,).

    π is `sampling_distribution`'s. `uniforms` (R,) in [0, 1) pick the token by inverse CDF: the
    first token whose cumulative probability exceeds u times the total. Temperature 0 is argmax,
    logprob 0.0.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1), logits.new_zeros(logits.shape[0], dtype=torch.float32)
    assert uniforms is not None
    logprobs, candidates = sampling_distribution(logits, temperature, top_k, top_p)
    column = inverse_cdf(logprobs.exp(), uniforms)[:, None]
    chosen = logprobs.gather(-1, column)[:, 0]
    tokens = column[:, 0] if candidates is None else candidates.gather(-1, column)[:, 0]
    return tokens, chosen


def top_of_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` most probable tokens of π for each row of `logits` (R, V), and their log π:
    (ids, logprobs), both (R, k), most probable first; log π = -inf past π's support.

    At temperature 0, π is the point mass at the argmax: (argmax, 0.0), then -inf.
    """
    rows, vocab = logits.shape
    k = min(k, vocab)
    if temperature == 0.0:
        ids = logits.topk(k, dim=-1).indices  # the argmax first (ties: as `argmax`, lowest id)
        ids[:, 0] = logits.argmax(dim=-1)
        values = torch.full((rows, k), float("-inf"), device=logits.device)
        values[:, 0] = 0.0
        return ids, values
    logprobs, candidates = sampling_distribution(logits, temperature, top_k, top_p)
    values, columns = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    ids = columns if candidates is None else candidates.gather(-1, columns)
    return ids, values


CDF_BLOCK = 256  # columns per block of `inverse_cdf`


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row of `probs` (R, V), the first column i with cdf[i] > u · total (u in [0, 1)).

    cdf is the running sum of the row in float64 (a float32 running sum over ~50k entries drifts
    by ~1e-5, a visible bias; Apple's MPS has no float64 and keeps float32). A column of
    probability 0 is never chosen: cdf[i] > x ≥ cdf[i-1] needs probs[i] > 0, and x is kept below
    the total.

    Two levels rather than one running sum over the whole vocabulary, which costs ~4 ms a step at
    16 rows × 49k columns (a quarter of it): the sums of blocks of `CDF_BLOCK` columns and their
    running sum find the block holding x, then a running sum inside that block finds the column.
    The two levels add in another order than one running sum, so they can differ from it only
    when x is within float64 rounding (~1e-16) of a boundary.
    """
    rows, columns = probs.shape
    wide = torch.float32 if probs.device.type == "mps" else torch.float64
    padding = (-columns) % CDF_BLOCK
    padded = torch.nn.functional.pad(probs, (0, padding)) if padding else probs  # pad copies
    blocks = padded.view(rows, -1, CDF_BLOCK)
    block_cdf = blocks.sum(dim=-1, dtype=wide).cumsum(dim=-1)
    total = block_cdf[:, -1:]
    target = torch.minimum(
        uniforms.to(probs.device, wide)[:, None] * total,
        torch.nextafter(total, torch.zeros_like(total)),
    )
    block = torch.searchsorted(block_cdf, target, right=True)  # block_cdf[block] > target
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)
    inside = blocks[torch.arange(rows, device=probs.device), block[:, 0]]  # (R, CDF_BLOCK)
    local_cdf = inside.cumsum(dim=-1, dtype=wide) + before
    column = torch.searchsorted(local_cdf, target, right=True)[:, 0]
    # The block's own running sum can end a rounding error below block_cdf[block]; a target in
    # that sliver falls past the block's end and belongs to its last column of positive mass
    # (any other column found has positive mass, so it is at or before that one).
    last_positive = CDF_BLOCK - 1 - (inside > 0).flip(-1).int().argmax(dim=-1)
    return block[:, 0] * CDF_BLOCK + torch.minimum(column, last_positive)


@dataclass
class _Prefill:
    cache: DynamicCache
    last_logits: torch.Tensor  # (V,)
    prompt_logprobs: list[float | None] | None = None
    topk: list[list[tuple[int, float]] | None] | None = None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's weights: where every tensor of a decode is made."""
    return next(model.parameters()).device


def _prefill(model: nn.Module, request: SampleRequest) -> _Prefill:
    """One forward over the prompt; the lm_head runs on the positions whose logprobs are due
    (prompt position i + 1 is scored from the logits at i: all of them, or with
    `prompt_logprobs_last_n` = N the last N), else on the last position only."""
    positions = len(request.prompt) - 1
    scored = 0
    if request.prompt_logprobs or request.topk_prompt_logprobs > 0:
        last_n = request.prompt_logprobs_last_n
        scored = positions if last_n is None else last_n
    device = model_device(model)
    cache = DynamicCache()
    logits = model(
        input_ids=torch.tensor([request.prompt], device=device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=scored + 1,
    ).logits[0]
    result = _Prefill(cache=cache, last_logits=logits[-1].float())
    if scored > 0:
        skipped = [None] * (1 + positions - scored)
        logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
        if request.prompt_logprobs:
            targets = torch.tensor(request.prompt[1 + positions - scored :], device=device)
            picked = logprobs.gather(-1, targets[:, None])[:, 0]
            result.prompt_logprobs = [*skipped, *picked.tolist()]
        if request.topk_prompt_logprobs > 0:
            values, ids = logprobs.topk(min(request.topk_prompt_logprobs, logprobs.shape[-1]))
            rows = zip(ids.tolist(), values.tolist(), strict=True)
            result.topk = [*skipped, *(list(zip(i, v, strict=True)) for i, v in rows)]
    else:  # nothing asked, or a one-token prompt: no position to score
        if request.prompt_logprobs:
            result.prompt_logprobs = [None]
        if request.topk_prompt_logprobs > 0:
            result.topk = [None]
    return result


@torch.inference_mode()
def prompt_logprobs(model: nn.Module, tokens: list[int]) -> list[float | None]:
    """log p(tokens[i] | tokens[:i]) for i ≥ 1, with None first: one forward, no cache."""
    device = model_device(model)
    ids = torch.tensor([tokens], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    picked = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])
    return [None, *picked[:, 0].tolist()]


@torch.inference_mode()
def generate(model: nn.Module, requests: list[SampleRequest], tokenizer) -> list[SampleResponse]:
    """Decode `requests` as one batch on `model`; one `SampleResponse` per request, in order.

    `tokenizer` decodes the tail of a sequence when a request has stop strings.
    """
    return Decoder(model, requests, tokenizer).run()


@dataclass
class _Segment:
    """The rows of one request inside the decode batch: contiguous, in sample order."""

    request: int
    rows: slice
    samples: torch.Tensor | None  # sample index of each of those rows; None when all are there


@dataclass
class _Batch:
    """The rows being decoded (by original row id), their state, and their KV cache."""

    ids: torch.Tensor  # (B,) grouped by request, in request order
    alive: torch.Tensor  # (B,) False once a row has finished, until it is dropped
    positions: torch.Tensor  # (B,) position id of the next token fed to the model
    segments: list[_Segment] = field(default_factory=list)
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # (B, longest prompt + steps) when prompt lengths differ


class Decoder:
    """The state of one `generate` call: per-row outputs indexed by original row id.

    `run` decodes at once; `advance` decodes in turns (see `SamplingSession`). `static_cache`:
    decode over a static KV cache, by CUDA graphs on a GPU (`bios.engine.decode_graph`); by
    default on a GPU only.
    """

    def __init__(
        self,
        model: nn.Module,
        requests: list[SampleRequest],
        tokenizer,
        static_cache: bool | None = None,
    ) -> None:
        self.model, self.requests, self.tokenizer = model, requests, tokenizer
        self.device = device = model_device(model)
        self.static_cache = device.type == "cuda" if static_cache is None else static_cache
        self.static_step: StaticDecodeStep | None = None  # made with the decode cache
        counts = torch.tensor([r.num_samples for r in requests], device=device)
        self.request_of = torch.repeat_interleave(
            torch.arange(len(requests), device=device), counts
        )
        self.first_row = (torch.cumsum(counts, 0) - counts).tolist()
        self.sample_of = torch.arange(len(self.request_of), device=device) - (
            torch.repeat_interleave(torch.tensor(self.first_row, device=device), counts)
        )
        # On the CPU whatever the device: a seed's stream is the same everywhere.
        self.generators = [torch.Generator().manual_seed(r.settings.seed) for r in requests]
        stop_ids = [r.settings.stop_ids for r in requests]
        width = max(1, *(len(ids) for ids in stop_ids))
        rows = [[*ids, *([-1] * (width - len(ids)))] for ids in stop_ids]
        table = torch.tensor(rows, device=device)
        self.stop_table = table[self.request_of]  # (rows, width), padded with -1
        limits = torch.tensor([r.settings.max_tokens for r in requests], device=device)
        self.limit = limits[self.request_of]
        # A stop string ending in the newest token lies within the last (its bytes + 1) tokens,
        # since every token adds at least one byte; decoding that window is enough.
        self.window = [
            1 + max((len(s.encode()) for s in r.settings.stop_strings), default=0) for r in requests
        ]
        self.any_strings = any(r.settings.stop_strings for r in requests)
        self.steps = max(r.settings.max_tokens for r in requests)
        rows = len(self.request_of)
        self.tokens = torch.zeros(rows, self.steps, dtype=torch.int64, device=device)
        self.logprobs = torch.zeros(rows, self.steps, device=device)
        # The top-K of π at each step, for the requests that ask (K = the most any asks).
        self.top_k = max(r.topk_sample_logprobs for r in requests)
        if self.top_k > 0:
            self.top_ids = torch.zeros(
                rows, self.steps, self.top_k, dtype=torch.int64, device=device
            )
            self.top_values = torch.full(
                (rows, self.steps, self.top_k), float("-inf"), device=device
            )
        self.lengths = torch.zeros(rows, dtype=torch.int64, device=device)
        self.stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        self.step = 0  # the next decode step
        self.prefills: list[_Prefill] | None = None  # set by the first `advance`
        self.batch: _Batch
        self.logits: torch.Tensor  # (B, V): the logits the next step chooses from
        self.packed: PackedLinears | None = None
        self.native_gemv = False  # set with the decode cache: `bios.engine.packed.native_gemv`

    def run(self) -> list[SampleResponse]:
        """The whole decode in one go."""
        while not self.advance(self.model, math.inf):
            pass
        return self.responses()

    @torch.inference_mode()
    def advance(self, model: nn.Module, seconds: float) -> bool:
        """Decode for about `seconds` (at least one step; the first call also prefills) on `model`
        (the same weights at every call); True once every row has finished.

        All state (tokens so far, the batch and its KV cache) lives here, so a decode can be cut
        into turns with other work on the model in between: the model's layers are patched (fused
        norms, packed weights) only inside a call, and each turn continues exactly where the last
        one stopped, so the tokens are the same however the decode is cut.
        """
        self.model = model
        if self.static_step is not None:
            self.static_step.model = model
        deadline = time.perf_counter() + seconds
        if self.prefills is None:
            self._start()
        batch = self.batch
        with ExitStack() as stack:
            if batch.cache is not None:
                self._patch(stack)
            while self.step < self.steps:
                step, self.step = self.step, self.step + 1
                tokens = self._choose(batch, self.logits, step)
                if not batch.alive.any():
                    self.step = self.steps
                    break
                if batch.cache is None:
                    # Built only now: a batch whose rows all stop at once (max_tokens=1) needs none.
                    tokens = self._keep_alive(batch, tokens)
                    self._build_cache(batch, self.prefills)
                    if len(tokens) >= MIN_ROWS and self.device.type == "cpu":
                        self.packed = PackedLinears.of(self.model)
                    elif len(tokens) < MIN_ROWS:
                        dtype = next(self.model.parameters()).dtype
                        self.native_gemv = wants_native_gemv(dtype, self.device)
                    self._patch(stack)
                elif int((~batch.alive).sum()) * 4 >= len(batch.ids):
                    tokens = self._keep_alive(batch, tokens)
                self.logits = self._forward(batch, tokens)
                if time.perf_counter() >= deadline:
                    break
        return self.step >= self.steps

    def partial(self, index: int) -> list[SampledSequence]:
        """Request `index`'s sequences so far (between turns): a running row's tokens chosen
        until now (its `stop_reason` reads "length" until it ends), a finished row's all."""
        return self._sequences(index)

    def responses(self) -> list[SampleResponse]:
        """One response per request, once `advance` has returned True."""
        assert self.prefills is not None and self.step >= self.steps
        return self._responses(self.prefills)

    def _start(self) -> None:
        self.prefills = [_prefill(self.model, r) for r in self.requests]
        self.logits = torch.cat(
            [
                p.last_logits.expand(r.num_samples, -1)
                for p, r in zip(self.prefills, self.requests, strict=True)
            ]
        )
        rows = len(self.request_of)
        prompt_lengths = torch.tensor([len(r.prompt) for r in self.requests], device=self.device)
        self.batch = _Batch(
            ids=torch.arange(rows, device=self.device),
            alive=torch.ones(rows, dtype=torch.bool, device=self.device),
            positions=prompt_lengths[self.request_of],
        )
        self.batch.segments = self._segments(self.batch.ids)

    def _patch(self, stack: ExitStack) -> None:
        """Fused norms, and the packed weights when the batch was built big enough for them, or
        torch's matrix-vector kernels when it was built of a few 16-bit rows."""
        stack.enter_context(fused_rms_norms(self.model))
        if self.packed is not None:
            stack.enter_context(self.packed.installed())
        if self.native_gemv:
            stack.enter_context(native_gemv())

    def _segments(self, ids: torch.Tensor) -> list[_Segment]:
        requests, counts = torch.unique_consecutive(self.request_of[ids], return_counts=True)
        segments, start = [], 0
        for request, count in zip(requests.tolist(), counts.tolist(), strict=True):
            rows = slice(start, start + count)
            whole = count == self.requests[request].num_samples
            segments.append(_Segment(request, rows, None if whole else self.sample_of[ids[rows]]))
            start += count
        return segments

    def _choose(self, batch: _Batch, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Choose a token for every row, record those of the live rows, mark finished rows."""
        tokens = torch.zeros(len(batch.ids), dtype=torch.int64, device=self.device)
        logprobs = torch.zeros(len(batch.ids), device=self.device)
        for segment in batch.segments:
            if not batch.alive[segment.rows].any():
                continue  # finished rows waiting to be dropped: any token will do
            request = self.requests[segment.request]
            s = request.settings
            uniforms = None
            if s.temperature > 0:
                # num_samples uniforms per step while the request runs, whatever the batch holds,
                # so the request's random stream depends on its seed alone.
                generator = self.generators[segment.request]
                draws = request.total_samples or request.num_samples
                uniforms = torch.rand(draws, generator=generator, dtype=torch.float64)
                if draws != request.num_samples:
                    uniforms = uniforms[request.first_sample :][: request.num_samples]
                uniforms = uniforms.to(self.device)
                if segment.samples is not None:
                    uniforms = uniforms[segment.samples]
            tokens[segment.rows], logprobs[segment.rows] = choose_tokens(
                logits[segment.rows], s.temperature, s.top_k, s.top_p, uniforms
            )
            if request.topk_sample_logprobs > 0:
                k = request.topk_sample_logprobs
                ids, values = top_of_distribution(
                    logits[segment.rows], s.temperature, s.top_k, s.top_p, k
                )
                rows = batch.ids[segment.rows]
                self.top_ids[rows, step, : ids.shape[1]] = ids
                self.top_values[rows, step, : ids.shape[1]] = values
        live = batch.alive.nonzero()[:, 0]
        ids = batch.ids[live]
        self.tokens[ids, step] = tokens[live]
        self.logprobs[ids, step] = logprobs[live]
        stop = (tokens[live, None] == self.stop_table[ids]).any(dim=-1)
        if self.any_strings:
            stop |= self._stop_strings(ids, step)
        done = stop | (step + 1 >= self.limit[ids])
        self.lengths[ids[done]] = step + 1
        self.stopped[ids[done]] = stop[done]
        batch.alive[live[done]] = False
        return tokens

    def _stop_strings(self, ids: torch.Tensor, step: int) -> torch.Tensor:
        hits = torch.zeros(len(ids), dtype=torch.bool)  # filled here, then moved
        for index, row in enumerate(ids.tolist()):
            request = int(self.request_of[row])
            strings = self.requests[request].settings.stop_strings
            if strings:
                start = max(0, step + 1 - self.window[request])
                text = self.tokenizer.decode(self.tokens[row, start : step + 1].tolist())
                hits[index] = any(s in text for s in strings)
        return hits.to(self.device)

    # ---- the batch and its cache ----------------------------------------------------------------

    def _keep_alive(self, batch: _Batch, tokens: torch.Tensor) -> torch.Tensor:
        """Drop finished rows from the batch (and its cache); returns the live rows' tokens."""
        keep = batch.alive.nonzero()[:, 0]
        batch.ids, batch.positions = batch.ids[keep], batch.positions[keep]
        batch.alive = torch.ones(len(keep), dtype=torch.bool, device=self.device)
        batch.segments = self._segments(batch.ids)
        if self.static_step is not None:
            self.static_step.select(keep)
        elif batch.cache is not None:
            batch.cache.batch_select_indices(keep)
        if batch.mask is not None:
            batch.mask = batch.mask[keep]
        return tokens[keep]

    def _build_cache(self, batch: _Batch, prefills: list[_Prefill]) -> None:
        caches = [prefills[s.request].cache for s in batch.segments]
        counts = [s.rows.stop - s.rows.start for s in batch.segments]
        dtype = cache_dtype(caches[0].layers[0].keys.dtype, self.device)
        batch.cache, batch.mask = batch_cache(
            caches, counts, self.steps, dtype, static=self.static_cache
        )
        if self.static_cache:  # the step keeps the mask, in its own form
            graphed = graphs_enabled(self.device)
            self.static_step = StaticDecodeStep(self.model, batch.cache, batch.mask, graphed)
            batch.mask = None
        for prefill in prefills:
            prefill.cache = None  # the batch cache holds copies now

    def _forward(self, batch: _Batch, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after feeding each row its newest token."""
        assert batch.cache is not None
        if self.static_step is not None:
            logits = self.static_step(tokens, batch.positions)  # float32 already
        else:
            mask = None
            if batch.mask is not None:
                mask = batch.mask[:, : batch.cache.get_seq_length() + 1]
            logits = self.model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=batch.positions[:, None],
                past_key_values=batch.cache,
                use_cache=True,
            ).logits[:, -1]
        batch.positions += 1
        return logits.float()

    def _responses(self, prefills: list[_Prefill]) -> list[SampleResponse]:
        return [
            SampleResponse(
                sequences=self._sequences(index),
                prompt_logprobs=prefill.prompt_logprobs,
                topk_prompt_logprobs=prefill.topk,
            )
            for index, prefill in enumerate(prefills)
        ]

    def _sequences(self, index: int) -> list[SampledSequence]:
        """Request `index`'s rows: each one's tokens, logprobs (and top-K) up to its length, or,
        for a row still running, up to the current step."""
        request, first = self.requests[index], self.first_row[index]
        rows, k = slice(first, first + request.num_samples), request.topk_sample_logprobs
        # One copy of the rows' outputs to the CPU (none on the CPU), then plain Python lists.
        lengths, stopped = self.lengths[rows].tolist(), self.stopped[rows].tolist()
        tokens = self.tokens[rows, : self.step].cpu()
        logprobs = self.logprobs[rows, : self.step].cpu()
        if k > 0:
            top_ids = self.top_ids[rows, : self.step, :k].cpu()
            top_values = self.top_values[rows, : self.step, :k].cpu()
        sequences = []
        for row, (length, stop) in enumerate(zip(lengths, stopped, strict=True)):
            length = length or self.step  # 0: still running
            reason: StopReason = "stop" if stop else "length"
            top = _top_lists(top_ids[row, :length], top_values[row, :length]) if k > 0 else None
            sequences.append(
                SampledSequence(
                    stop_reason=reason,
                    tokens=tokens[row, :length].tolist(),
                    logprobs=logprobs[row, :length].tolist(),
                    topk_logprobs=top,
                )
            )
        return sequences


def _top_lists(ids: torch.Tensor, values: torch.Tensor) -> list[list[tuple[int, float]]]:
    """(length, K) top-K ids and log π -> per position the (id, log π) pairs inside π's support."""
    return [
        [(i, v) for i, v in zip(row_ids, row_values, strict=True) if v != float("-inf")]
        for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
    ]
