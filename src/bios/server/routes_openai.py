"""The OpenAI-compatible API, mounted at `/v1`: `GET /v1/models` (and `/v1/models/{id}`),
`POST /v1/completions`, `POST /v1/chat/completions` (the prompt rendered by the tokenizer's chat
template). The request bodies are read by `openai_wire`; what goes back is written by
`openai_replies`.

`model` names a checkpoint, a run, a sampler or a base model, and every request goes through
the server's own samplers, batched with the SDK's (`openai_models`).

Keys: `Authorization: Bearer <key>` (what the openai client sends) or `X-API-Key`, for the same
tenants as the Tinker API; another tenant's run, checkpoint or sampler is not found (404).

Errors: this is an application of its own, so every error under /v1 — a bad key, an unreadable
body, an unknown route, a refused field, a full quota, a failure — is answered in OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, with the status Bios gives it on the
Tinker API (400 for bad input; OpenAI uses 400 there too). A stream that fails after it began
ends with a `data: {"error": …}` event, which the openai client raises.

Streaming: `stream: true` answers server-sent events in OpenAI's chunk format, one chunk per
token, ending with `data: [DONE]`. A streamed request decodes in turns (~50 ms each,
`SamplingSession.turn_seconds`), and after each turn the tokens so far go out, less what may
still change (`openai_replies.StreamedChoice`): the chunks join to exactly the final text.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from bios import __version__
from bios.errors import InvalidInputError, NotFoundError
from bios.server import openai_replies as replies
from bios.server import openai_wire as wire
from bios.server.auth import Unauthorized, hash_key
from bios.server.openai_models import HeldSamplers, model_cards, target_of
from bios.server.samplers import QuotaExceeded
from bios.server.state import ServerState
from bios.server.tinker_wire import check_token_count
from bios.server.wire import error_field, problem_of

PREFIX = "/v1"
log = logging.getLogger("bios.server.openai")
Body = TypeVar("Body", bound=BaseModel)


def create_app(state: ServerState) -> FastAPI:
    """The `/v1` application, with its own error handlers (OpenAI's shape for every error)."""
    app = FastAPI(title="Bios: OpenAI-compatible API", version=__version__)
    app.state.bios = state
    app.state.held = HeldSamplers()
    app.state.started = int(time.time())
    for error in (
        InvalidInputError,
        NotFoundError,
        Unauthorized,
        QuotaExceeded,
        RequestValidationError,
        HTTPException,
        Exception,
    ):
        app.add_exception_handler(error, answer_error)
    app.include_router(router)
    return app


def is_openai_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


# ---- errors -----------------------------------------------------------------------------------


async def answer_error(request: Request, error: Exception) -> JSONResponse:
    status, body = replies.described(error)
    if status >= 500:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
    return JSONResponse(body, status)


def error_response(status: int, message: str) -> JSONResponse:
    """An error raised outside this application (the server's body limit) in OpenAI's shape."""
    return JSONResponse(replies.error_body(message, "invalid_request_error", None, None), status)


# ---- who asks, and for what ----------------------------------------------------------------


def tenant_of(request: Request) -> str | None:
    """The caller's tenant: `Authorization: Bearer <key>`, or the Tinker SDK's `X-API-Key`."""
    state: ServerState = request.app.state.bios
    if not state.config.auth:
        return None
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    key = credentials.strip() if scheme.lower() == "bearer" else ""
    key = key or request.headers.get("x-api-key", "")
    tenant = state.store.tenant_of_key(hash_key(key)) if key else None
    if tenant is None:
        raise Unauthorized(
            "Authorization: missing, unknown or revoked API key (send `Authorization: Bearer "
            "<key>` with a key from `bios keys create`)"
        )
    return tenant


async def read_body(request: Request, model: type[Body]) -> Body:
    try:
        return model.model_validate_json(await request.body() or b"{}")
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            raise InvalidInputError("body", f"not valid JSON ({first['msg']})") from None
        field = error_field(tuple(first["loc"]))
        raise InvalidInputError(field, problem_of(first)) from None


# ---- a generation ---------------------------------------------------------------------------


@dataclass
class Generation:
    """The samples one request queued: one engine request per prompt, `n` samples each."""

    session: Any  # bios.engine.sampling_sessions.SamplingSession
    settings: Any  # its SampleSettings (the stop tokens and strings applied)
    futures: list[Future]
    reply: replies.Reply


@contextmanager
def renamed(fields: dict[str, str]) -> Iterator[None]:
    """The sampler's errors with this API's field names (`num_samples` is `n`, ...)."""
    try:
        yield
    except InvalidInputError as error:
        field = fields.get(error.field, error.field)
        if field == error.field:
            raise
        raise InvalidInputError(field, error.problem) from None


def field_names(prompt: str, max_tokens: str, top: str) -> dict[str, str]:
    return {
        "prompt": prompt,
        "num_samples": "n",
        "sampling_params.max_tokens": max_tokens,
        "sampling_params.temperature": "temperature",
        "sampling_params.top_p": "top_p",
        "sampling_params.top_k": "top_k",
        "sampling_params.seed": "seed",
        "sampling_params.stop": "stop",
        "topk_sample_logprobs": top,
        "model_path": "model",
        "base_model": "model",
    }


def start(
    state: ServerState,
    held: HeldSamplers,
    tenant: str | None,
    model: str,
    prompts_of: Callable[[Any], list[list[int]]],
    prompt_count: int,
    sampling: wire.Sampling,
    fields: dict[str, str],
    reply_kind: str,
    on_progress: Callable[[int, list], None] | None = None,
) -> Generation:
    """Check a request, then queue its samples (worker thread pool: it may load weights)."""
    samples = sampling.n * prompt_count
    limit = state.config.max_samples_per_request
    if samples > limit:
        raise InvalidInputError(
            "n", f"{samples:,} samples (n × prompts) is over the limit of {limit:,} (--max-samples)"
        )
    with renamed(fields):
        session, sampler_id = held.session(state, tenant, target_of(state, model, tenant))
        prompts = prompts_of(session.tokenizer)
        top = sampling.top_logprobs or 0
        requests = [
            session.check_request(p, sampling.n, sampling.params, topk_sample_logprobs=top)
            for p in prompts
        ]
        tokens = sum(len(r.prompt) + r.num_samples * r.settings.max_tokens for r in requests)
        check_token_count(
            tokens, state.config.max_tokens_per_request, fields["sampling_params.max_tokens"]
        )
        futures = [
            session.sample(
                p,
                sampling.n,
                sampling.params,
                topk_sample_logprobs=top,
                on_progress=None if on_progress is None else functools.partial(on_progress, i),
            )
            for i, p in enumerate(prompts)
        ]
    for future in futures:
        state.samplers.used(sampler_id, future)
    reply = replies.Reply(
        id=f"{reply_kind}-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        logprobs=sampling.top_logprobs is not None,
        prompt_tokens=sum(len(p) for p in prompts),
        include_usage=sampling.include_usage,
    )
    return Generation(session, requests[0].settings, futures, reply)


async def finish(generation: Generation) -> list[replies.Choice]:
    """The choices, in OpenAI's order: prompt by prompt, each prompt's `n` samples."""
    responses = [await asyncio.wrap_future(f) for f in generation.futures]
    settings, tokenizer = generation.settings, generation.session.tokenizer

    def choices() -> list[replies.Choice]:
        sequences = [s for response in responses for s in response.sequences]
        return [
            replies.choice_of(i, s, tokenizer, settings.stop_ids, settings.stop_strings)
            for i, s in enumerate(sequences)
        ]

    return await run_in_threadpool(choices)


class Progress:
    """The decode's partial sequences, handed from the worker thread to a stream's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, list]] = asyncio.Queue()

    def __call__(self, prompt: int, sequences: list) -> None:  # on the worker thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (prompt, sequences))


def streamed(
    generation: Generation, progress: Progress, kind: str, first: list[dict]
) -> StreamingResponse:
    """Server-sent events: `first` at once, then each choice's tokens as the decode makes them
    (`replies.StreamedChoice` says what is safe to send between turns), the rest and the finish
    reasons once it is done, the usage when asked, then [DONE]."""
    reply, tokenizer = generation.reply, generation.session.tokenizer
    stop_strings = generation.settings.stop_strings
    names = replies.TokenText(tokenizer)
    streams: dict[int, replies.StreamedChoice] = {}  # choice index -> what was sent of it

    def stream_of(index: int) -> replies.StreamedChoice:
        return streams.setdefault(index, replies.StreamedChoice(kind, stop_strings))

    def partial_chunks(prompt: int, sequences: list) -> list[dict]:
        chunks = []
        for sample, sequence in enumerate(sequences):
            index = prompt * len(sequences) + sample  # OpenAI's order: prompt by prompt
            provisional = replies.choice_of(index, sequence, tokenizer, (), ())  # text uncut
            chunks += stream_of(index).emit(reply, provisional, names)
        return chunks

    def final_chunks(choices: list[replies.Choice]) -> list[dict]:
        chunks = [chunk for c in choices for chunk in stream_of(c.index).finish(reply, c, names)]
        if reply.include_usage:
            chunks.append(replies.usage_chunk(reply, kind, choices))
        return chunks

    async def events():
        for chunk in first:
            yield sse(chunk)
        done = asyncio.ensure_future(finish(generation))
        try:
            while True:
                update = asyncio.ensure_future(progress.queue.get())
                await asyncio.wait({done, update}, return_when=asyncio.FIRST_COMPLETED)
                if not update.done():  # the decode is over: its last word is the response
                    update.cancel()
                    break
                for chunk in await run_in_threadpool(partial_chunks, *update.result()):
                    yield sse(chunk)
            chunks = await run_in_threadpool(final_chunks, await done)
        except Exception as error:  # the status is sent already: the error is the last event
            status, body = replies.described(error)
            if status >= 500:
                log.error("a streamed generation failed", exc_info=error)
            yield sse(body)
            return
        for chunk in chunks:
            yield sse(chunk)
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


# ---- routes -----------------------------------------------------------------------------------

router = APIRouter()


@router.post("/completions")
async def completions(request: Request) -> Response:
    tenant = tenant_of(request)
    body = await read_body(request, wire.CompletionBody)
    sampling = wire.completion_sampling(body)
    prompt = body.prompt
    many = isinstance(prompt, list) and not all(isinstance(t, int) for t in prompt)
    prompts = prompt if many else [prompt]

    def prompts_of(tokenizer) -> list[list[int]]:
        return [p if isinstance(p, list) else tokenizer.encode(p) for p in prompts]

    state = request.app.state.bios
    fields = field_names("prompt", "max_tokens", "logprobs")
    progress = Progress() if sampling.stream else None
    generation = await run_in_threadpool(
        start,
        state,
        request.app.state.held,
        tenant,
        body.model,
        prompts_of,
        len(prompts),
        sampling,
        fields,
        "cmpl",
        progress,
    )
    if progress is not None:
        return streamed(generation, progress, "text_completion", [])
    choices = await finish(generation)
    names = replies.TokenText(generation.session.tokenizer)
    return JSONResponse(
        await run_in_threadpool(replies.completion_body, generation.reply, choices, names)
    )


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    tenant = tenant_of(request)
    body = await read_body(request, wire.ChatBody)
    sampling = wire.chat_sampling(body)
    messages = wire.chat_messages(body)
    max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    fields = field_names("messages", max_field, "top_logprobs")
    progress = Progress() if sampling.stream else None
    generation = await run_in_threadpool(
        start,
        request.app.state.bios,
        request.app.state.held,
        tenant,
        body.model,
        lambda tokenizer: [chat_prompt(tokenizer, messages, body.model)],
        1,
        sampling,
        fields,
        "chatcmpl",
        progress,
    )
    if progress is not None:
        first = [replies.chat_role_chunk(generation.reply, i) for i in range(sampling.n)]
        return streamed(generation, progress, "chat.completion.chunk", first)
    choices = await finish(generation)
    names = replies.TokenText(generation.session.tokenizer)
    return JSONResponse(
        await run_in_threadpool(replies.chat_body, generation.reply, choices, names)
    )


def chat_prompt(tokenizer, messages: list[dict[str, str]], model: str) -> list[int]:
    """The conversation rendered by the tokenizer's chat template, with the assistant's turn
    opened; the template writes any special tokens itself, so none are added."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError(
            "model", f"{model!r} has no chat template; use /v1/completions with a prompt"
        )
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as error:
        raise InvalidInputError("messages", f"refused by the chat template: {error}") from None
    return tokenizer.encode(text, add_special_tokens=False)


@router.get("/models")
async def models(request: Request) -> dict:
    tenant = tenant_of(request)
    cards = await run_in_threadpool(
        model_cards, request.app.state.bios, tenant, request.app.state.started
    )
    return {"object": "list", "data": cards}


@router.get("/models/{model:path}")
async def model(model: str, request: Request) -> dict:
    tenant = tenant_of(request)
    cards = await run_in_threadpool(
        model_cards, request.app.state.bios, tenant, request.app.state.started
    )
    for card in cards:
        if card["id"] == model:
            return card
    await run_in_threadpool(target_of, request.app.state.bios, model, tenant)  # or not found
    return {"id": model, "object": "model", "created": started(request), "owned_by": ""}


def started(request: Request) -> int:
    """When this server started: the `created` time of its base models."""
    return request.app.state.started
