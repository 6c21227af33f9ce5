"""JSON request bodies as the Tinker SDK sends them, and result encoding.

Request bodies are strict: every field an SDK (0.25 to 0.38) sends is declared, and a field
Bios does not know is refused with a 400 naming it, never dropped. A field Bios knows but
cannot honour (`prompt_alt_tokens_k`, a non-AdamW optimizer, ...) is declared with `only(...)`:
its default passes, any other value is refused, naming the field and why. Results go back as
JSON, except `ForwardBackwardOutput` and `SampleResponse`, which go back as protobuf when the
client asks for it (SDK ≥ 0.25 accepts nothing else for them).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from bios.errors import InvalidInputError, NotFoundError
from bios.server import tinker_wire
from bios.types import AdamParams, Datum, ForwardBackwardOutput, LoraConfig, SampleResponse

UNSUPPORTED = "unsupported"  # the pydantic error type of a value Bios cannot honour


def only(*allowed: Any, why: str) -> AfterValidator:
    """A field accepted at its "off" values `allowed` alone (equal and of the same type): any
    other value is refused with `why`."""

    def check(value: Any) -> Any:
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise PydanticCustomError(UNSUPPORTED, why)
        return value

    return AfterValidator(check)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    type: str | None = None  # the SDK's request tag ("create_model", "sample", ...)


def error_field(location: tuple) -> str:
    """A pydantic error location as a dotted field name (`data.0.loss_fn` -> `data[0].loss_fn`)."""
    name = ""
    for part in location:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def problem_of(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "not a field Bios implements (an unknown field is refused, not ignored)"
    return error["msg"]


def invalid_input(error: ValidationError, prefix: tuple = ()) -> InvalidInputError:
    """A failed `model_validate` as Bios's error: its first problem, the field named."""
    first = error.errors()[0]
    return InvalidInputError(error_field((*prefix, *first["loc"])), problem_of(first))


class BodyTooLarge(HTTPException):
    """A request body (as sent, or unpacked) over the server's limit: answered with 413.

    An `HTTPException`, so FastAPI passes it on from wherever the body is read."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)
        self.message = message


def too_large(what: str, limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"{what} is over the limit of {limit:,} bytes (--max-body-mib)")


class SessionBody(Body):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class HeartbeatBody(Body):
    session_id: str


class LoraConfigBody(LoraConfig):  # LoraConfig's fields and defaults
    # Strict: `"rank": "8"` or `"train_mlp": "false"` is refused, not coerced.
    model_config = ConfigDict(**Body.model_config, strict=True)


class OptimizerConfigBody(Body):
    """SDK 0.38's `optimizer_config`: Bios's optimizer is AdamW (decoupled weight decay)."""

    type: Annotated[
        str, only("adamw", why="Bios implements the AdamW optimizer only (type 'adamw')")
    ] = "adamw"
    version: int | None = None  # DimuonOptimizerConfig's; refused with its type


class CreateModelBody(Body):
    model_config = ConfigDict(**Body.model_config, strict=True)

    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str
    lora_config: LoraConfigBody | None = None
    user_metadata: dict[str, Any] | None = None
    optimizer_config: OptimizerConfigBody | None = None
    full_finetune: bool = False  # Bios extension: train every weight instead of an adapter
    gradient_checkpointing: bool = False  # Bios extension: recompute layers in the backward


class ModelBody(Body):
    model_id: str


class ForwardBackwardInputBody(Body):
    data: list[Datum]
    loss_fn: str | list[tuple[str, float]]
    # SDK 0.38 types values as `float | str`; no objective of Bios's takes a text value, so one
    # is refused naming its key (as in the protobuf body, `tinker_wire`).
    loss_fn_config: dict[str, float | str] | None = None
    reference: str | None = None  # Bios extension


class ForwardBackwardBody(Body):
    model_id: str
    seq_id: int | None = None
    forward_backward_input: ForwardBackwardInputBody | None = None
    forward_input: ForwardBackwardInputBody | None = None  # SDK <= 0.24 `/forward`
    forward_only: bool = False
    # Bios extension: keep a forward-only request's autograd graph for a `forward_backward` on
    # the same tokens that follows (a custom objective's first pass; `engine/kept_graph.py`).
    # Off by default, so an evaluation forward builds no graph; Tinker's SDK never sets it.
    keep_graph: bool = False


class OptimStepBody(Body):
    model_id: str
    seq_id: int | None = None
    # SDK 0.38 sends AdamW's settings as `adam_params`, any other optimizer's (Dimuon's) as
    # `optimizer_params`, which Bios refuses: it has AdamW only. (Declared first, so that it is
    # the error reported, not the missing `adam_params`.)
    optimizer_params: Annotated[
        dict[str, Any] | None,
        only(None, why="Bios implements the AdamW optimizer only: send adam_params"),
    ] = None
    adam_params: AdamParams


class SaveWeightsBody(Body):
    model_id: str
    seq_id: int | None = None
    path: str | None = None
    overwrite: bool = False
    ttl_seconds: int | None = None
    sampling_session_seq_id: int | None = None
    user_metadata: dict[str, str] | None = None
    # SDK 0.38's `kind="inflight"` asks for a sampler that follows the run's weights; Bios's
    # samplers are snapshots of the weights at the save.
    kind: Annotated[
        Literal["snapshot", "inflight"],
        only(
            "snapshot",
            why="Bios serves snapshot samplers only (kind 'snapshot'): save again for newer "
            "weights",
        ),
    ] = "snapshot"


class LoadWeightsBody(Body):
    model_id: str | None = None  # a load into an existing run ...
    seq_id: int | None = None
    session_id: str | None = None  # ... or a new run created by the load (SDK ≥ 0.38)
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    path: str
    optimizer: bool = False
    optimizer_config: OptimizerConfigBody | None = None
    weights_access_token: Annotated[
        str | None,
        only(
            None,
            why="Bios has no weight access tokens: a tenant loads its own "
            "checkpoints and published ones",
        ),
    ] = None


class WeightsInfoBody(Body):
    tinker_path: str


class FutureBody(Body):
    request_id: str
    allow_metadata_only: bool = False


def error_category(error: BaseException) -> str:
    return "user" if isinstance(error, InvalidInputError | NotFoundError) else "server"


def wants_protobuf(request: Request) -> bool:
    return tinker_wire.PROTOBUF in request.headers.get("accept", "")


def non_finite(value: Any, where: str = "result") -> str | None:
    """Where `value` (a JSON-ready tree) holds a NaN or infinity, which JSON cannot carry."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} = {value}"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = non_finite(item, f"{where}[{key!r}]" if isinstance(key, str) else f"{where}[{key}]")
        if found is not None:
            return found
    return None


def json_result(payload: Any) -> JSONResponse:
    """`payload` as JSON; one holding a non-finite number (JSON has none) is answered as a
    failed request naming where, instead of failing to encode (a 500)."""
    where = non_finite(payload)
    if where is None:
        return JSONResponse(payload)
    message = (
        f"the result cannot be sent as JSON: {where} is not a finite number "
        "(the computation overflowed float32; lower the learning rate or the loss inputs)"
    )
    return JSONResponse({"error": message, "category": "user"})


def encode_result(result: Any, request: Request) -> Response:
    """A finished future's result, as protobuf where the SDK requires it, else JSON (never with
    a non-finite number: see `json_result`)."""
    if isinstance(result, ForwardBackwardOutput):
        if wants_protobuf(request):
            return Response(
                tinker_wire.encode_forward_backward_output(result), media_type=tinker_wire.PROTOBUF
            )
        return json_result(result.model_dump(mode="json"))
    if isinstance(result, SampleResponse):
        if wants_protobuf(request):
            return Response(
                tinker_wire.encode_sample_response(result), media_type=tinker_wire.PROTOBUF
            )
        return json_result(result.model_dump(mode="json"))
    if isinstance(result, BaseModel):
        return json_result(result.model_dump(mode="json", exclude_none=True))
    return json_result(result)
