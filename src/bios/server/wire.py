"""JSON request bodies as the Tinker SDK sends them (extra fields tolerated), and result encoding.

Request models ignore fields they do not know (`type`, telemetry hints, newer SDK additions), so
older and newer SDKs both parse. Results go back as JSON, except `ForwardBackwardOutput` and
`SampleResponse`, which go back as protobuf when the client asks for it (SDK ≥ 0.25 accepts
nothing else for them).
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from bios.errors import InvalidInputError, NotFoundError
from bios.server import tinker_wire
from bios.types import AdamParams, Datum, ForwardBackwardOutput, LoraConfig, SampleResponse


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


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


class HeartbeatBody(Body):
    session_id: str


class LoraConfigBody(LoraConfig):  # LoraConfig's fields and defaults, tolerating unknown ones
    # Strict: `"rank": "8"` or `"train_mlp": "false"` is refused, not coerced.
    model_config = ConfigDict(**Body.model_config, strict=True)


class CreateModelBody(Body):
    model_config = ConfigDict(**Body.model_config, strict=True)

    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str
    lora_config: LoraConfigBody | None = None
    user_metadata: dict[str, Any] | None = None
    full_finetune: bool = False  # Bios extension: train every weight instead of an adapter
    gradient_checkpointing: bool = False  # Bios extension: recompute layers in the backward


class ModelBody(Body):
    model_id: str


class ForwardBackwardInputBody(Body):
    data: list[Datum]
    loss_fn: str | list[tuple[str, float]]
    loss_fn_config: dict[str, float] | None = None
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
    adam_params: AdamParams


class SaveWeightsBody(Body):
    model_id: str
    seq_id: int | None = None
    path: str | None = None
    overwrite: bool = False
    ttl_seconds: int | None = None
    sampling_session_seq_id: int | None = None


class LoadWeightsBody(Body):
    model_id: str | None = None  # a load into an existing run ...
    seq_id: int | None = None
    session_id: str | None = None  # ... or a new run created by the load (SDK ≥ 0.38)
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    path: str
    optimizer: bool = False


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
