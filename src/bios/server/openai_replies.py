"""What the OpenAI-compatible API sends back: choices, completions, stream chunks, errors.

A choice's text is its sampled tokens decoded, without the stop sequence (OpenAI's rule: a final
end-of-sequence token, or the text from a stop string on, is cut). Its `logprobs` list every
sampled token, the stop token included, with log π(token) of the distribution it was drawn from
(`bios.engine.decoding`: temperature, top-k and top-p applied; 0.0 under greedy decoding), and
`top_logprobs` the most probable tokens of that same π with their log π (fewer where π has
fewer tokens), as the sampler reports them (`topk_sample_logprobs`).

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` (`described`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from bios.errors import InvalidInputError, NotFoundError
from bios.server.auth import Unauthorized
from bios.server.samplers import QuotaExceeded
from bios.server.wire import error_field
from bios.types import SampledSequence


@dataclass
class Choice:
    """One sampled sequence as the API shows it."""

    index: int
    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None  # per token: (id, log π), most probable first
    text: str
    pieces: list[str]  # the text each token adds: they join to `text`
    finish_reason: Literal["stop", "length"]


def choice_of(
    index: int,
    sequence: SampledSequence,
    tokenizer,
    stop_ids: tuple[int, ...],
    stop_strings: tuple[str, ...],
) -> Choice:
    stopped = sequence.stop_reason == "stop"
    text = output_text(tokenizer, sequence.tokens, stopped, stop_ids, stop_strings)
    return Choice(
        index=index,
        tokens=sequence.tokens,
        logprobs=list(sequence.logprobs or []),
        top=sequence.topk_logprobs,
        text=text,
        pieces=token_pieces(tokenizer, sequence.tokens, text),
        finish_reason="stop" if stopped else "length",
    )


def output_text(
    tokenizer,
    tokens: list[int],
    stopped: bool,
    stop_ids: tuple[int, ...],
    stop_strings: tuple[str, ...],
) -> str:
    """The sampled tokens as text without the stop sequence: a final stop token is left out, and
    the text is cut where the first stop string begins."""
    body = tokens[:-1] if stopped and tokens and tokens[-1] in stop_ids else tokens
    text = tokenizer.decode(body)
    if stopped:
        cuts = [text.find(s) for s in stop_strings if s in text]
        text = text[: min(cuts)] if cuts else text
    return text


def token_pieces(tokenizer, tokens: list[int], text: str) -> list[str]:
    """The text each token adds, for streaming: pieces that join to `text` exactly.

    Decoding is incremental over a short window (a token can complete a character an earlier one
    began, so a piece is held back while the window's text ends in an incomplete character,
    U+FFFD); each piece is then taken from `text` itself, so what a stop sequence cut never
    appears, and whatever is left at the end goes with the last token.
    """
    pieces: list[str] = []
    emitted = start = read = 0  # tokens[start:read] decode to the text most recently emitted
    for end in range(1, len(tokens) + 1):
        before = tokenizer.decode(tokens[start:read])
        after = tokenizer.decode(tokens[start:end])
        grew = len(after) > len(before) and after.startswith(before)
        if grew and not after.endswith("\ufffd"):
            size = len(after) - len(before)
            start, read = read, end
        else:
            size = 0
        pieces.append(text[emitted : emitted + size])
        emitted += len(pieces[-1])
    if pieces and emitted < len(text):
        pieces[-1] += text[emitted:]
    return pieces


class TokenText:
    """Token id -> its own text and UTF-8 bytes (None where the token is part of a character)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._known: dict[int, tuple[str, list[int] | None]] = {}

    def __call__(self, token: int) -> tuple[str, list[int] | None]:
        if token not in self._known:
            text = self.tokenizer.decode([token])
            self._known[token] = (text, None if "\ufffd" in text else list(text.encode()))
        return self._known[token]


# ---- response bodies --------------------------------------------------------------------------


def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(len(c.tokens) for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def chat_logprobs(choice: Choice, names: TokenText, positions: range) -> dict:
    """OpenAI's chat `logprobs` object for the tokens at `positions` of a choice."""
    content = []
    for i in positions:
        token, raw = names(choice.tokens[i])
        top = []
        for alternative, logprob in choice.top[i] if choice.top is not None else []:
            text, alternative_raw = names(alternative)
            top.append({"token": text, "logprob": logprob, "bytes": alternative_raw})
        content.append(
            {"token": token, "logprob": choice.logprobs[i], "bytes": raw, "top_logprobs": top}
        )
    return {"content": content, "refusal": None}


def completion_logprobs(choice: Choice, names: TokenText, positions: range, offset: int) -> dict:
    """The legacy completions `logprobs` object; `offset` is where positions[0]'s text starts."""
    offsets = []
    for i in positions:
        offsets.append(offset)
        offset += len(choice.pieces[i])
    top = None
    if choice.top is not None:  # keyed by text: of tokens whose texts coincide, the likeliest
        top = [{} for _ in positions]
        for entry, i in zip(top, positions, strict=True):
            for token, logprob in choice.top[i]:
                entry.setdefault(names(token)[0], logprob)
    return {
        "tokens": [names(choice.tokens[i])[0] for i in positions],
        "token_logprobs": [choice.logprobs[i] for i in positions],
        "top_logprobs": top,
        "text_offset": offsets,
    }


@dataclass(frozen=True)
class Reply:
    """What every body of one response carries."""

    id: str
    created: int
    model: str
    logprobs: bool
    prompt_tokens: int
    include_usage: bool = False


def completion_body(reply: Reply, choices: list[Choice], names: TokenText) -> dict:
    return {
        "id": reply.id,
        "object": "text_completion",
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": completion_logprobs(c, names, range(len(c.tokens)), 0)
                if reply.logprobs
                else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage(reply.prompt_tokens, choices),
    }


def chat_body(reply: Reply, choices: list[Choice], names: TokenText) -> dict:
    return {
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": chat_logprobs(c, names, range(len(c.tokens)))
                if reply.logprobs
                else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage(reply.prompt_tokens, choices),
    }


def _chunk(reply: Reply, kind: str, choices: list[dict]) -> dict:
    chunk = {
        "id": reply.id,
        "object": kind,
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if reply.include_usage:
        chunk["usage"] = None  # OpenAI's rule: only the last chunk carries usage
    return chunk


def usage_chunk(reply: Reply, kind: str, choices: list[Choice]) -> dict:
    return {**_chunk(reply, kind, []), "usage": usage(reply.prompt_tokens, choices)}


def chat_role_chunk(reply: Reply, index: int) -> dict:
    """The first chunk of a streamed choice: who speaks (sent before any token is ready)."""
    delta = {"role": "assistant", "content": ""}
    return _chunk(
        reply,
        "chat.completion.chunk",
        [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}],
    )


def chat_token_chunk(reply: Reply, c: Choice, i: int, piece: str, names: TokenText) -> dict:
    """Token `i` of a streamed chat choice, adding `piece` to its text."""
    logprobs = chat_logprobs(c, names, range(i, i + 1)) if reply.logprobs else None
    delta = {"index": c.index, "delta": {"content": piece}, "logprobs": logprobs}
    return _chunk(reply, "chat.completion.chunk", [{**delta, "finish_reason": None}])


def completion_token_chunk(
    reply: Reply, c: Choice, i: int, piece: str, names: TokenText, offset: int
) -> dict:
    """Token `i` of a streamed completion, adding `piece` at text offset `offset`."""
    logprobs = None
    if reply.logprobs:
        logprobs = completion_logprobs(c, names, range(i, i + 1), offset)
    choice = {"index": c.index, "text": piece, "logprobs": logprobs, "finish_reason": None}
    return _chunk(reply, "text_completion", [choice])


def finish_chunk(reply: Reply, kind: str, c: Choice) -> dict:
    """A streamed choice's last chunk: its finish reason."""
    empty = {"delta": {}} if kind == "chat.completion.chunk" else {"text": ""}
    final = {"index": c.index, **empty, "logprobs": None, "finish_reason": c.finish_reason}
    return _chunk(reply, kind, [final])


class StreamedChoice:
    """What of one choice a stream has sent, as its decode goes.

    Between decode turns the tokens so far are shown as text (`emit`), except what could still
    change: the last token (a later one may complete its character, or it is a stop token) and
    the last (longest stop string − 1) characters, which may be the start of a stop string that
    the final text cuts away — a stop string that is complete ends the decode, so the text sent
    is always a prefix of the final one. `finish` sends the rest from the final choice.
    """

    def __init__(self, kind: str, stop_strings: tuple[str, ...]) -> None:
        self.kind = kind
        self.hold = max((len(s) for s in stop_strings), default=1) - 1
        self.sent_tokens = 0
        self.sent_text = ""

    def emit(self, reply: Reply, c: Choice, names: TokenText) -> list[dict]:
        """Chunks for the tokens of provisional choice `c` (uncut text) now safe to send."""
        safe = len(c.text) - self.hold
        chunks, end = [], len(self.sent_text)
        for i in range(self.sent_tokens, len(c.tokens) - 1):
            piece = c.pieces[i]
            if end + len(piece) > safe:
                break
            chunks.append(self._token_chunk(reply, c, i, piece, names))
            end += len(piece)
        return chunks

    def finish(self, reply: Reply, c: Choice, names: TokenText) -> list[dict]:
        """The rest of final choice `c`, then its finish chunk."""
        rest = c.text[len(self.sent_text) :] if c.text.startswith(self.sent_text) else ""
        pieces = c.pieces[self.sent_tokens :]
        if "".join(pieces) != rest:  # pieces cut differently than sent: the text still adds up
            pieces = [rest] + [""] * (len(pieces) - 1) if pieces else []
        first = self.sent_tokens
        chunks = [
            self._token_chunk(reply, c, first + j, piece, names) for j, piece in enumerate(pieces)
        ]
        return [*chunks, finish_chunk(reply, self.kind, c)]

    def _token_chunk(self, reply: Reply, c: Choice, i: int, piece: str, names) -> dict:
        offset = len(self.sent_text)
        self.sent_tokens, self.sent_text = i + 1, self.sent_text + piece
        if self.kind == "chat.completion.chunk":
            return chat_token_chunk(reply, c, i, piece, names)
        return completion_token_chunk(reply, c, i, piece, names, offset)


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict:
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def described(error: BaseException) -> tuple[int, dict]:
    """An exception as (status, OpenAI error body)."""
    if isinstance(error, InvalidInputError):
        refused = error.problem.startswith(("not implemented by Bios", "not a field Bios"))
        code = "unsupported_parameter" if refused else "invalid_value"
        return 400, error_body(str(error), "invalid_request_error", error.field, code)
    if isinstance(error, NotFoundError):
        message = str(error)
        is_model = message.startswith("model:")
        return 404, error_body(
            message,
            "invalid_request_error",
            "model" if is_model else None,
            "model_not_found" if is_model else None,
        )
    if isinstance(error, Unauthorized):
        return 401, error_body(str(error), "invalid_request_error", None, "invalid_api_key")
    if isinstance(error, QuotaExceeded):
        return 403, error_body(str(error), "insufficient_quota", None, "insufficient_quota")
    if isinstance(error, RequestValidationError):
        first = error.errors()[0]
        field = error_field(tuple(first["loc"][1:]))
        return 400, error_body(
            f"{field}: {first['msg']}", "invalid_request_error", field, "invalid_value"
        )
    if isinstance(error, HTTPException):
        message = getattr(error, "message", None) or str(error.detail)
        return error.status_code, error_body(message, "invalid_request_error", None, None)
    return 500, error_body(
        f"the server failed on this request ({type(error).__name__}: {error})",
        "server_error",
        None,
        None,
    )
