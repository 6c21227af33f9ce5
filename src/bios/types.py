"""Data types of the client API and the wire (pydantic v2).

Names and fields follow Tinker's SDK so that a training loop written for it ports by changing the
import. Tensors travel as `TensorData` (a flat list plus dtype and shape); `Datum` accepts torch
tensors, numpy arrays and plain lists for its `loss_fn_inputs` and converts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from bios.errors import InvalidInputError

__all__ = [
    "AdamParams",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "LoadWeightsResponse",
    "LoraConfig",
    "LossFnType",
    "ModelData",
    "ModelInput",
    "OptimStepResponse",
    "ProvenanceSpan",
    "SampleResponse",
    "SampledSequence",
    "SamplingParams",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "StopReason",
    "TensorData",
]

LossFnType = Literal[
    "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"
]

# dtype given to plain Python lists by key, as Tinker's SDK does.
_KEY_DTYPE: dict[str, str] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
    "sequence_ratio_mask": "float32",
}

_NUMPY_DTYPE = {"int64": np.int64, "float32": np.float32}
# The largest float32: what is computed in float32 (loss inputs, loss weights and settings,
# optimizer settings) must stay within it; finite in float64 (as JSON reads it) is not enough.
FLOAT32_MAX = float(np.finfo(np.float32).max)
_TORCH_DTYPE = {"int64": torch.int64, "float32": torch.float32}


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class EncodedTextChunk(_Base):
    """A run of token ids."""

    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


# Tinker's other chunk types, by their `type` tag: refused by name, as no vision or audio model
# is served yet (never dropped, never a 500).
UNSUPPORTED_CHUNKS = {
    "image": "ImageChunk",
    "image_asset_pointer": "ImageAssetPointerChunk",
    "dmel": "DmelChunk",
}


def unsupported_chunk(kind: str | None) -> str:
    """Why a model input chunk of type `kind` is refused."""
    if kind in UNSUPPORTED_CHUNKS:
        return (
            f"{UNSUPPORTED_CHUNKS[kind]} (type {kind!r}) is not supported: Bios serves text "
            "models only (no vision or audio model yet); send encoded_text chunks"
        )
    return f"chunk type {kind!r} is not supported; send encoded_text chunks"


class ModelInput(_Base):
    """The tokens a model reads, as a list of chunks (only text chunks in Bios today)."""

    chunks: list[EncodedTextChunk] = Field(default_factory=list)

    @field_validator("chunks", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        # "unsupported": the error type the server answers with a 400 naming the field.
        for index, chunk in enumerate(value if isinstance(value, list) else []):
            kind = chunk.get("type") if isinstance(chunk, dict) else getattr(chunk, "type", None)
            if kind in UNSUPPORTED_CHUNKS:
                raise PydanticCustomError(
                    "unsupported", f"chunks[{index}]: {unsupported_chunk(kind)}"
                )
        return value

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=[int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[int(token)]))


class TensorData(_Base):
    """A dense tensor as a flat list, a dtype (`int64` or `float32`) and a shape."""

    data: list[int] | list[float]
    dtype: Literal["int64", "float32"]
    shape: list[int] | None = None

    @field_validator("data", mode="before")
    @classmethod
    def _numbers_only(cls, value: Any) -> Any:
        """Numbers are numbers: `"1.0"` or `true` is refused, not coerced."""
        if isinstance(value, list | tuple):
            for position, item in enumerate(value):
                if isinstance(item, str | bytes | bool):
                    raise ValueError(f"expected a number at position {position}, got {item!r}")
        return value

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        if array.dtype.kind in "iub":
            dtype = "int64"
        elif array.dtype.kind == "f":
            dtype = "float32"
        else:
            raise TypeError(f"TensorData: unsupported numpy dtype {array.dtype}")
        array = np.asarray(array, dtype=_NUMPY_DTYPE[dtype])
        return cls(data=array.reshape(-1).tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        tensor = tensor.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16, torch.float64):
            tensor = tensor.float()
        return cls.from_numpy(tensor.numpy())

    def to_numpy(self) -> np.ndarray:
        array = np.asarray(self.data, dtype=_NUMPY_DTYPE[self.dtype])
        return array.reshape(self.shape) if self.shape is not None else array

    def to_torch(self) -> torch.Tensor:
        tensor = torch.tensor(self.data, dtype=_TORCH_DTYPE[self.dtype])
        return tensor.reshape(self.shape) if self.shape is not None else tensor

    def tolist(self) -> list[Any]:
        return self.to_numpy().tolist()


def _to_tensor_data(key: str, value: Any) -> Any:
    if isinstance(value, TensorData | dict):
        return value
    if isinstance(value, torch.Tensor):
        return TensorData.from_torch(value)
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if isinstance(value, list | tuple):
        array = np.asarray(value)
        if array.dtype.kind not in "iuf" and len(value) > 0:
            raise ValueError(f"loss_fn_inputs[{key!r}]: expected a list of numbers")
        dtype = _KEY_DTYPE.get(key, "int64" if array.dtype.kind in "iu" else "float32")
        return TensorData.from_numpy(array.astype(_NUMPY_DTYPE[dtype]))
    return value


class ProvenanceSpan(_Base):
    """A run of `length` consecutive positions of a datum field that are positions
    [offset, offset + length) of a sampled sequence's prompt (`type="prompt"`) or of its sampled
    tokens (`type="sampled"`), the sequence named by its `sequence_id` (Tinker's
    `PromptProvenanceSpan` / `SampledProvenanceSpan`). A field's spans tile it in order."""

    type: Literal["prompt", "sampled"]
    sequence_id: str = Field(min_length=1)
    offset: int = Field(default=0, ge=0)
    length: int = Field(ge=0)


class Datum(_Base):
    """One training example: the model input and the per-token inputs of the objective.

    `model_input_spans` / `loss_fn_input_spans` (both or neither): where each input token and
    each target row came from (`ProvenanceSpan`), for objectives that use what was recorded when
    the tokens were sampled (`stable_reinforce`)."""

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)
    model_input_spans: list[ProvenanceSpan] | None = None
    loss_fn_input_spans: list[ProvenanceSpan] | None = None

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _convert_arrays(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: _to_tensor_data(key, item) for key, item in value.items()}
        return value


def checked_data(data: object) -> list[Datum]:
    """A request's `data`: a non-empty list of `Datum` (InvalidInputError naming the item)."""
    if not isinstance(data, Sequence) or isinstance(data, str) or len(data) == 0:
        raise InvalidInputError("data", "expected a non-empty list of Datum")
    for index, datum in enumerate(data):
        if not isinstance(datum, Datum):
            raise InvalidInputError(
                f"data[{index}]", f"expected a Datum, got {type(datum).__name__}"
            )
    return list(data)


class AdamParams(_Base):
    """AdamW settings for one `optim_step` (weight decay is decoupled; clip 0 means off)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    learning_rate: float = Field(default=1e-4, ge=0.0, le=FLOAT32_MAX)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.95, ge=0.0, lt=1.0)
    eps: float = Field(default=1e-12, gt=0.0, le=FLOAT32_MAX)
    weight_decay: float = Field(default=0.0, ge=0.0, le=FLOAT32_MAX)
    grad_clip_norm: float = Field(default=0.0, ge=0.0, le=FLOAT32_MAX)


def checked_adam_params(adam_params: object) -> AdamParams:
    if not isinstance(adam_params, AdamParams):
        raise InvalidInputError("adam_params", f"expected AdamParams, got {adam_params!r}")
    return adam_params


class LoraConfig(_Base):
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class ForwardBackwardOutput(_Base):
    """Per-datum outputs (`logprobs` of the targets, fp32) and metrics named `name:reduction`."""

    loss_fn_output_type: str = "TensorData"
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float] = Field(default_factory=dict)


class OptimStepResponse(_Base):
    metrics: dict[str, float] = Field(default_factory=dict)


class ModelData(_Base):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(_Base):
    type: Literal["get_info"] = "get_info"
    model_data: ModelData
    model_id: str
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None


class SaveWeightsResponse(_Base):
    path: str
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsForSamplerResponse(_Base):
    path: str | None = None
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


class LoadWeightsResponse(_Base):
    path: str | None = None
    type: Literal["load_weights"] = "load_weights"


# ---- sampling ----------------------------------------------------------------------------------

StopReason = Literal["length", "stop"]


class SamplingParams(_Base):
    """How to sample; checked when `sample` is called, so a bad value raises there.

    `max_tokens` None means "until the model's context is full". `temperature` 0 is greedy.
    `top_k` -1 and `top_p` 1 switch truncation off. `stop` takes strings (matched in the decoded
    text, across token boundaries) or token ids; the tokenizer's end-of-sequence tokens stop
    too, except with `stop=[]`, which turns every stop off. The same `seed` gives the same tokens.
    """

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


class SampledSequence(_Base):
    """One sampled continuation: its tokens (the stop token or string included) and logprobs."""

    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    # Names this sequence in later requests (provenance spans); `<request id>:<index>`.
    sequence_id: str | None = None
    # With `topk_sample_logprobs = K`: at each sampled position, the K most probable
    # (token id, log π) pairs of the distribution sampled from (fewer where π has fewer tokens).
    topk_logprobs: list[list[tuple[int, float]]] | None = None


class SampleResponse(_Base):
    """The sequences of one `sample` call, and the prompt's logprobs when they were asked for.

    `prompt_logprobs[i]` is log p(prompt[i] | prompt[:i]) under the model (no temperature or
    truncation), None at position 0; `topk_prompt_logprobs[i]` the k most likely
    (token id, logprob) pairs at position i, None at position 0.
    """

    sequences: list[SampledSequence]
    type: Literal["sample"] = "sample"
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
