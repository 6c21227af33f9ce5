"""The OpenAI API's request bodies as Bios reads them, and the sampling they ask for
(`routes_openai` serves them; `openai_replies` writes what goes back).

Bodies are strict (`extra="forbid"`, no coercion): a field Bios does not implement is refused
with a 400 naming it, never ignored. Fields the API defines but Bios cannot honour (`tools`,
`response_format`, penalties, `logit_bias`, `echo`, ...) are declared with `no_op(...)`: their
"off" values (what a client sends when it means nothing by them) pass, any other is refused with
the reason. `top_k` is accepted as an extension, as vLLM does. `user` is accepted and kept
nowhere (it names the caller's end user, for the caller's own records).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from bios.errors import InvalidInputError
from bios.server.wire import only
from bios.types import SamplingParams

MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat (its legacy completions allow 5)


def no_op(*allowed: Any, why: str) -> AfterValidator:
    """`wire.only`, the reason said as an OpenAI option Bios does not implement."""
    return only(*allowed, why=f"not implemented by Bios: {why}")


PENALTY = "Bios samples from the model's distribution as trained, with no penalties (send 0)"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


class StreamOptions(_Body):
    include_usage: bool | None = None


class SamplingFields(_Body):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str
    n: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension (vLLM's too): -1 or absent for no top-k
    seed: int | None = None
    stop: Any = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # the caller's name for its end user; Bios records none
    frequency_penalty: Annotated[float | None, no_op(None, 0.0, why=PENALTY)] = None
    presence_penalty: Annotated[float | None, no_op(None, 0.0, why=PENALTY)] = None
    logit_bias: Annotated[
        dict[str, Any] | None, no_op(None, {}, why="no logit biases (send {} or nothing)")
    ] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise PydanticCustomError("stop", "expected a string or a list of strings")


class CompletionBody(SamplingFields):
    prompt: Any
    logprobs: int | None = None  # how many top logprobs per token (0: the sampled token's only)
    echo: Annotated[bool | None, no_op(None, False, why="the prompt is not echoed")] = None
    suffix: Annotated[str | None, no_op(None, why="no insertion (suffix)")] = None
    best_of: int | None = None  # None, or equal to n (sampling n and returning n)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, list) and value and _is_ids(value)):
            return value
        if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
            return value
        if isinstance(value, list) and value and all(_is_ids(p) and p for p in value):
            return value
        raise PydanticCustomError(
            "prompt",
            "expected a string, a list of strings, a list of token ids, or a list of lists of "
            "token ids (none empty)",
        )


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any  # a string, or a list of text parts: read as the string they join to
    name: Annotated[str | None, no_op(None, why="message names (the chat template has none)")] = (
        None
    )

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> str:
        """Text parts are joined by newlines, as vLLM does."""
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise PydanticCustomError("content", "expected a string or a list of text parts")
        for index, part in enumerate(value):
            if not (
                isinstance(part, dict)
                and set(part) == {"type", "text"}
                and part["type"] == "text"
                and isinstance(part["text"], str)
            ):
                raise PydanticCustomError(
                    "content",
                    f"part {index}: expected {{'type': 'text', 'text': '...'}} (Bios's models "
                    "read text only)",
                )
        return "\n".join(part["text"] for part in value)


TOOLS = "tool and function calling (Bios samples text)"


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    tools: Annotated[list[Any] | None, no_op(None, [], why=TOOLS)] = None
    tool_choice: Annotated[Any, no_op(None, "none", why=TOOLS)] = None
    parallel_tool_calls: Annotated[bool | None, no_op(None, why=TOOLS)] = None
    functions: Annotated[list[Any] | None, no_op(None, [], why=TOOLS)] = None
    function_call: Annotated[Any, no_op(None, "none", why=TOOLS)] = None
    response_format: Annotated[
        dict[str, Any] | None,
        no_op(None, {"type": "text"}, why="structured output (response_format other than text)"),
    ] = None
    store: Annotated[bool | None, no_op(None, False, why="completions are not stored")] = None


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


# ---- what a request asks of the sampler -------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """A request's sampling, checked: `top_logprobs` None means no logprobs at all."""

    n: int
    params: SamplingParams
    top_logprobs: int | None
    stream: bool
    include_usage: bool


def sampling_of(
    body: SamplingFields,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int | None,
    top_field: str,
) -> Sampling:
    """The sampling a body asks for; raises InvalidInputError naming the first bad field."""
    n = 1 if body.n is None else body.n
    if n < 1:
        raise InvalidInputError("n", f"expected an integer ≥ 1, got {n}")
    if body.stream_options is not None and not body.stream:
        raise InvalidInputError("stream_options", "only with stream: true")
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidInputError(
            top_field, f"expected an integer in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}"
        )
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    params = SamplingParams(
        max_tokens=max_tokens,
        seed=body.seed,
        # No stop strings is None, never []: the sampler reads `stop=[]` as "not even EOS".
        stop=stop or None,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=-1 if body.top_k is None else body.top_k,
        top_p=1.0 if body.top_p is None else body.top_p,
    )
    options = body.stream_options
    return Sampling(
        n=n,
        params=params,
        top_logprobs=(top_logprobs or 0) if logprobs else None,
        stream=bool(body.stream),
        include_usage=bool(options and options.include_usage),
    )


def completion_sampling(body: CompletionBody) -> Sampling:
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise InvalidInputError("best_of", "not implemented by Bios: only best_of = n")
    # OpenAI's default for /v1/completions is 16 tokens (chat's is the rest of the context).
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    logprobs = body.logprobs is not None
    return sampling_of(body, max_tokens, logprobs, body.logprobs, "logprobs")


def chat_sampling(body: ChatBody) -> Sampling:
    given = [v for v in (body.max_tokens, body.max_completion_tokens) if v is not None]
    if len(set(given)) > 1:
        raise InvalidInputError("max_completion_tokens", "differs from max_tokens; send one")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidInputError("top_logprobs", "needs logprobs: true")
    max_tokens = given[0] if given else None
    return sampling_of(body, max_tokens, bool(body.logprobs), body.top_logprobs, "top_logprobs")


def chat_messages(body: ChatBody) -> list[dict[str, str]]:
    """The messages as a chat template takes them, `developer` (OpenAI's newer name for the
    system role) as `system`."""
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.content}
        for m in body.messages
    ]
