"""Codecs between Tinker's protobuf wire messages and Bios's types.

The official SDK (≥ 0.25) always sends `forward_backward` as a protobuf `ForwardBackwardRequest`
and only accepts `ForwardBackwardOutput` and `SampleResponse` results as protobuf. The message
schema is the SDK's own (`tinker.proto.tinker_public_pb2`, Apache-2.0), imported rather than
re-declared so the two can never drift apart. Byte layouts (little-endian, as numpy writes them):
token ids int32; dense tensors in their declared dtype; CSR indices int64; per-datum offsets of a
batched output in bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from bios.errors import InvalidInputError
from bios.types import (
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ModelInput,
    ProvenanceSpan,
    SampleResponse,
    TensorData,
    unsupported_chunk,
)

try:  # the SDK ships the compiled schema; `pip install 'bios[serve]'` brings it
    from tinker.proto import tinker_public_pb2 as pb
except ImportError:  # pragma: no cover - reported when the server starts
    pb = None

PROTOBUF = "application/x-protobuf"

_NUMPY = {1: np.float32, 2: np.int64, 3: np.int32}  # proto DType -> numpy
_WIRE_DTYPE = {1: "float32", 2: "int64", 3: "int64"}  # proto DType -> TensorData dtype


def require_schema() -> None:
    if pb is None:
        raise RuntimeError(
            "the Tinker wire schema is missing: install the server extra, "
            "`pip install 'bios[serve]'` (it brings the `tinker` package's protobuf schema)"
        )


@dataclass
class ForwardBackwardCall:
    model_id: str
    seq_id: int | None
    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float]
    forward_only: bool


def check_token_count(tokens: int, limit: int, field: str = "data") -> None:
    """The server's bound on the tokens of one request (forward(_backward), asample)."""
    if tokens > limit:
        raise InvalidInputError(
            field,
            f"{tokens:,} tokens in one request is over the limit of {limit:,} "
            "(--max-tokens-per-request); split the batch",
        )


# Soft targets (cross_entropy's (N, K) target_tokens / weights): at most this many per position.
MAX_SOFT_TARGETS = 64


def _check_shape(shape: list[int], max_elements: int, field: str) -> None:
    """A shape is checked before anything of its size is allocated: one value per token, or
    (N, K) with K ≤ `MAX_SOFT_TARGETS`."""
    if any(size < 0 for size in shape):
        raise InvalidInputError(f"{field}.shape", f"{shape} has a negative size")
    if len(shape) == 2 and shape[1] > MAX_SOFT_TARGETS:
        raise InvalidInputError(
            f"{field}.shape",
            f"{shape}: {shape[1]:,} values per position is over the limit of "
            f"{MAX_SOFT_TARGETS} (soft targets)",
        )
    per_position = shape[1] if len(shape) == 2 else 1
    elements = math.prod(shape)
    if elements > max_elements * per_position:
        raise InvalidInputError(
            f"{field}.shape",
            f"{shape} holds {elements:,} values, over the limit of {max_elements:,} "
            "(one per token: --max-tokens-per-request)",
        )


def _tensor_from_proto(message, field: str, max_elements: int) -> TensorData:
    if message.dtype not in _NUMPY:
        raise InvalidInputError(field, f"unsupported dtype enum {message.dtype}")
    numpy_dtype = np.dtype(_NUMPY[message.dtype])
    shape = list(message.shape)
    _check_shape(shape, max_elements, field)
    if message.HasField("sparse_csr"):
        values = _frombuffer(message.sparse_csr.values, numpy_dtype, field)
        crow = _frombuffer(message.sparse_csr.crow_indices, np.dtype(np.int64), field)
        cols = _frombuffer(message.sparse_csr.col_indices, np.dtype(np.int64), field)
        array = _dense_from_csr(values, crow, cols, shape, field)
    else:
        array = _frombuffer(message.dense, numpy_dtype, field)
        if shape and math.prod(shape) != array.size:
            raise InvalidInputError(field, f"shape {shape} does not match {array.size} values")
    return TensorData(
        data=array.reshape(-1).tolist(), dtype=_WIRE_DTYPE[message.dtype], shape=shape or None
    )


def _frombuffer(raw: bytes, dtype: np.dtype, field: str) -> np.ndarray:
    if len(raw) % dtype.itemsize:
        raise InvalidInputError(field, f"{len(raw)} bytes is not a whole number of {dtype} values")
    return np.frombuffer(raw, dtype=dtype)


def _dense_from_csr(values, crow, cols, shape, field: str) -> np.ndarray:
    if len(shape) != 2 or len(crow) != shape[0] + 1 or len(cols) != len(values):
        raise InvalidInputError(field, "malformed sparse CSR tensor")
    dense = np.zeros(shape, dtype=values.dtype)
    for row in range(shape[0]):
        start, end = int(crow[row]), int(crow[row + 1])
        columns = cols[start:end]
        if not 0 <= start <= end <= len(cols) or ((columns < 0) | (columns >= shape[1])).any():
            raise InvalidInputError(field, "malformed sparse CSR tensor")
        dense[row, cols[start:end]] = values[start:end]
    return dense


def _spans_from_proto(messages, field: str) -> list[ProvenanceSpan] | None:
    """Repeated `ProvenanceSpan`s -> spans; none at all is no provenance (the SDK writes both
    lists or neither)."""
    spans = []
    for number, message in enumerate(messages):
        kind = message.WhichOneof("span")
        if kind is None:
            raise InvalidInputError(f"{field}[{number}]", "a span with neither arm set")
        arm = getattr(message, kind)
        try:
            spans.append(
                ProvenanceSpan(
                    type="prompt" if kind == "prompt_tokens" else "sampled",
                    sequence_id=arm.sequence_id,
                    offset=arm.offset,
                    length=arm.length,
                )
            )
        except ValidationError as error:
            problem = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in error.errors())
            raise InvalidInputError(f"{field}[{number}]", problem) from None
    return spans or None


def decode_forward_backward(body: bytes, max_tokens: int = 2**63) -> ForwardBackwardCall:
    """A protobuf `ForwardBackwardRequest` -> the call it asks for (errors name the field).

    Sizes are checked before they are allocated: at most `max_tokens` tokens in all, and no
    loss input of more values than that."""
    require_schema()
    message = pb.ForwardBackwardRequest()
    try:
        message.ParseFromString(body)
    except Exception as error:  # the protobuf runtime raises its own DecodeError
        raise InvalidInputError(
            "body", f"not a ForwardBackwardRequest protobuf ({error})"
        ) from None
    tokens = sum(
        len(chunk.encoded_text.tokens) // 4 for datum in message.data for chunk in datum.model_input
    )
    check_token_count(tokens, max_tokens)
    data = []
    for index, datum in enumerate(message.data):
        chunks = []
        for number, chunk in enumerate(datum.model_input):
            field = f"data[{index}].model_input[{number}]"
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise InvalidInputError(field, unsupported_chunk(kind))
            tokens = _frombuffer(chunk.encoded_text.tokens, np.dtype(np.int32), field)
            chunks.append(EncodedTextChunk(tokens=tokens.tolist()))
        inputs = {
            key: _tensor_from_proto(tensor, f"data[{index}].loss_fn_inputs[{key!r}]", max_tokens)
            for key, tensor in datum.loss_fn_inputs.items()
        }
        spans = {
            name: _spans_from_proto(getattr(datum, name), f"data[{index}].{name}")
            for name in ("model_input_spans", "loss_fn_input_spans")
        }
        data.append(
            Datum(
                model_input=ModelInput(chunks=chunks),
                loss_fn_inputs=inputs,
                model_input_spans=spans["model_input_spans"],
                loss_fn_input_spans=spans["loss_fn_input_spans"],
            )
        )
    config = {key: float(value) for key, value in message.loss_fn_config.items()}
    for key, value in message.loss_fn_config_v2.items():
        if value.WhichOneof("value") == "text":
            raise InvalidInputError(f"loss_fn_config[{key!r}]", "text values are not supported")
        config[key] = float(value.number)
    return ForwardBackwardCall(
        model_id=message.model_id,
        seq_id=message.seq_id or None,
        data=data,
        loss_fn=message.loss_fn,
        loss_fn_config=config,
        forward_only=message.forward_only,
    )


def encode_forward_backward_output(output: ForwardBackwardOutput) -> bytes:
    """`ForwardBackwardOutput` -> protobuf: one ArrayRecord with a BatchedTensor per field."""
    require_schema()
    message = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in output.metrics.items():
        message.metrics[key] = value
    record = message.loss_fn_outputs.add(
        type_tag="ArrayRecord", num_datums=len(output.loss_fn_outputs)
    )
    fields = sorted({key for out in output.loss_fn_outputs for key in out})
    for field in fields:
        arrays = [out[field].to_numpy() for out in output.loss_fn_outputs]
        dtype = np.float32 if arrays[0].dtype.kind == "f" else np.int64
        arrays = [np.ascontiguousarray(a, dtype=dtype) for a in arrays]
        sizes = np.cumsum([0] + [a.nbytes for a in arrays]).astype(np.int64)
        batched = record.fields[field]
        batched.data = b"".join(a.tobytes() for a in arrays)
        batched.offsets = sizes.tobytes()
        batched.dtype = 1 if dtype is np.float32 else 2
        batched.trailing_shape.extend(list(arrays[0].shape[1:]))
    return message.SerializeToString()


# The SDK's filler for a missing top-k entry (`tinker.types.topk_logprobs`): a row of it reads
# back as None (prompt position 0), a shorter row as fewer pairs.
TOPK_MISSING_ID, TOPK_MISSING_LOGPROB = 0, -99999.0


def _topk(rows: list[list[tuple[int, float]] | None]):
    """Top-k (token, logprob) rows -> TopkLogprobs, missing entries filled as the SDK reads."""
    k = max((len(row) for row in rows if row), default=0)
    ids = np.full((len(rows), k), TOPK_MISSING_ID, dtype=np.int32)
    logprobs = np.full((len(rows), k), TOPK_MISSING_LOGPROB, dtype=np.float32)
    for index, row in enumerate(rows):
        for rank, (token, logprob) in enumerate(row or []):
            ids[index, rank], logprobs[index, rank] = token, logprob
    return pb.TopkLogprobs(
        token_ids=ids.tobytes(), logprobs=logprobs.tobytes(), k=k, length=len(rows)
    )


def encode_sample_response(response: SampleResponse) -> bytes:
    """`SampleResponse` -> protobuf (tokens int32, logprobs float32, NaN where there is none)."""
    require_schema()
    message = pb.SampleResponse()
    for sequence in response.sequences:
        encoded = message.sequences.add(
            stop_reason=pb.STOP_REASON_STOP
            if sequence.stop_reason == "stop"
            else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(sequence.tokens, dtype=np.int32).tobytes(),
        )
        if sequence.logprobs is not None:
            encoded.logprobs = np.asarray(sequence.logprobs, dtype=np.float32).tobytes()
        if sequence.topk_logprobs is not None:
            encoded.topk_sampled_logprobs.CopyFrom(_topk(sequence.topk_logprobs))
    if response.prompt_logprobs is not None:
        values = [np.nan if v is None else v for v in response.prompt_logprobs]
        message.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    if response.topk_prompt_logprobs is not None:
        message.topk_prompt_logprobs.CopyFrom(_topk(response.topk_prompt_logprobs))
    return message.SerializeToString()
