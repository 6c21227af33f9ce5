"""The server's limits hold for any request (issue 18, items 3, 4, 6 and 10): a body is bounded
as read and as unpacked whatever its headers say; every size a request names (samples, tokens,
tensor shapes, LoRA rank) is bounded before anything is allocated; `create_model` is validated
before it answers. Each refusal is a 4xx naming the field and the limit, and changes nothing."""

from __future__ import annotations

import json
import math
import struct

import httpx
import numpy as np
import pytest
import zstandard
from starlette.requests import Request

import bios
from bios.server.wire import encode_result
from bios.types import AdamParams, OptimStepResponse
from server_process import ServerProcess
from test_client_api import sft_data
from test_server_bad_input import JSON, PROTO, datum_json, fb_json, fb_proto, fb_sparse

MIB = 2**20
FLAGS = {"--max-body-mib": 1, "--max-samples": 8, "--max-tokens-per-request": 256}
FLAGS["--max-lora-rank"] = 64


@pytest.fixture(scope="module")
def limited(tiny_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("limits")
    flags = [str(part) for flag in FLAGS.items() for part in flag]
    server = ServerProcess(home, [tiny_models["llama"]], extra_args=flags)
    training = bios.ServiceClient(base_url=server.url).create_lora_training_client(
        tiny_models["llama"], rank=4, seed=0
    )
    training.forward_backward(sft_data(), "cross_entropy")
    training.optim_step(AdamParams(learning_rate=1e-2)).result()
    yield server, training.model_id, tiny_models["llama"]
    server.stop()


def state_of(server, model_id: str) -> tuple[str, int]:
    """The run's fingerprint (weights, moments, checkpoints) and how many runs there are."""
    fingerprint = httpx.get(f"{server.url}/api/v1/bios/runs/{model_id}/fingerprint", timeout=60)
    runs = httpx.get(f"{server.url}/api/v1/training_runs", timeout=60).json()
    return fingerprint.json()["fingerprint"], runs["cursor"]["total_count"]


def refused(server, model_id, route, status, *needles, **request) -> dict:
    before = state_of(server, model_id)
    response = httpx.post(f"{server.url}/api/v1/{route}", timeout=120, **request)
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    for needle in needles:
        assert needle in error, error
    assert state_of(server, model_id) == before
    assert httpx.get(f"{server.url}/api/v1/healthz", timeout=10).status_code == 200
    return response.json()


def padded(model_id: str, size: int) -> bytes:
    """A valid forward_backward JSON body, padded with whitespace to `size` bytes."""
    body = fb_json(model_id, datum_json())
    return body + b" " * (size - len(body))


# Item 3: the body limit holds for the bytes read and the bytes unpacked.


def test_chunked_body_over_the_limit_is_413(limited):
    server, model_id, _ = limited
    body = padded(model_id, 8 * MIB)
    chunks = (body[i : i + MIB] for i in range(0, len(body), MIB))  # no Content-Length
    refused(server, model_id, "forward_backward", 413, "1,048,576", content=chunks, headers=JSON)


def test_zstd_bomb_is_413(limited):
    server, model_id, _ = limited
    bomb = zstandard.ZstdCompressor(level=19).compress(padded(model_id, 64 * MIB))
    assert len(bomb) < 10_000
    headers = {**JSON, "content-encoding": "zstd"}
    refused(server, model_id, "forward_backward", 413, "1,048,576", content=bomb, headers=headers)


def test_zstd_bomb_without_a_declared_size_is_413(limited):
    server, model_id, _ = limited
    stream = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    bomb = stream.compress(padded(model_id, 64 * MIB)) + stream.flush()
    assert zstandard.frame_content_size(bomb) == -1
    headers = {**JSON, "content-encoding": "zstd"}
    refused(server, model_id, "forward_backward", 413, "1,048,576", content=bomb, headers=headers)


def test_zstd_frame_claiming_a_tebibyte_is_413(limited):
    server, model_id, _ = limited
    # Magic, a single-segment header with an 8-byte content size of 2**40, one empty last block.
    frame = struct.pack("<IBQ", 0xFD2FB528, 0xE0, 2**40) + b"\x01\x00\x00"
    assert zstandard.frame_content_size(frame) == 2**40
    headers = {**JSON, "content-encoding": "zstd"}
    refused(server, model_id, "forward_backward", 413, "1,048,576", content=frame, headers=headers)


def test_zstd_body_within_the_limit_still_works(limited):
    server, model_id, _ = limited
    body = zstandard.ZstdCompressor().compress(fb_proto(model_id, np.arange(1, 9), np.ones(8)))
    response = httpx.post(
        f"{server.url}/api/v1/forward",
        content=body,
        headers={**PROTO, "content-encoding": "zstd"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert "request_id" in response.json()


# Item 4: sizes a request names are bounded before anything is allocated.


def test_num_samples_over_the_limit_is_400(limited):
    server, model_id, base_model = limited
    body = {
        "base_model": base_model,
        "prompt": {"chunks": [{"tokens": [1, 2, 3]}]},
        "num_samples": 20_000,
        "sampling_params": {"max_tokens": 1},
    }
    reply = refused(server, model_id, "asample", 400, "20,000", "limit of 8", json=body)
    assert reply["field"] == "num_samples"


def test_sample_tokens_over_the_limit_is_400(limited):
    server, model_id, base_model = limited
    body = {
        "base_model": base_model,
        "prompt": {"chunks": [{"tokens": [1, 2, 3]}]},
        "num_samples": 4,
        "sampling_params": {"max_tokens": 100},
    }
    reply = refused(server, model_id, "asample", 400, "403 tokens", "limit of 256", json=body)
    assert reply["field"] == "sampling_params.max_tokens"


@pytest.mark.parametrize("encoding", ["json", "protobuf"])
def test_forward_backward_tokens_over_the_limit_are_400(limited, encoding):
    server, model_id, _ = limited
    tokens = np.arange(1, 301) % 300 + 1  # 300 tokens, within the model's context of 512
    if encoding == "json":
        datum = datum_json(tokens=tokens.tolist(), targets=tokens.tolist(), weights=[1.0] * 300)
        request = {"content": fb_json(model_id, datum), "headers": JSON}
    else:
        request = {"content": fb_proto(model_id, tokens, np.ones(300)), "headers": PROTO}
    reply = refused(server, model_id, "forward_backward", 400, "300 tokens", "256", **request)
    assert reply["field"] == "data"


def test_sparse_shape_over_the_limit_is_400_before_allocating(limited):
    server, model_id, _ = limited
    body = fb_sparse(model_id, [1, 4_000_000], crow=[0, 0])
    reply = refused(
        server,
        model_id,
        "forward_backward",
        400,
        "4,000,000 values",
        "over the limit",  # of 64 soft targets per position, before the tokens are counted
        content=body,
        headers=PROTO,
    )
    assert reply["field"] == "data[0].loss_fn_inputs['weights'].shape"


# Item 10: create_model is validated before it answers, naming the field.

CREATE_MODEL_CASES = {
    "rank 10**9": ({"rank": 10**9}, 400, "lora_config.rank", "limit of 64"),
    "seed 2**70": ({"rank": 4, "seed": 2**70}, 400, "lora_config.seed", "range"),
    "no layer": (
        {"rank": 4, "train_attn": False, "train_mlp": False, "train_unembed": False},
        400,
        "lora_config",
        "no layer",
    ),
    "rank as a string": ({"rank": "4"}, 422, None, "lora_config.rank"),
    "flag as a string": ({"rank": 4, "train_mlp": "false"}, 422, None, "lora_config.train_mlp"),
}


@pytest.mark.parametrize("case", list(CREATE_MODEL_CASES))
def test_create_model_is_validated_before_it_answers(limited, case):
    server, model_id, base_model = limited
    lora, status, field, needle = CREATE_MODEL_CASES[case]
    body = {"base_model": base_model, "lora_config": lora}
    reply = refused(server, model_id, "create_model", status, needle, json=body)
    if field is not None:
        assert reply["field"] == field


# Item 6: a result is never sent with a non-finite number in its JSON.


def test_a_result_json_cannot_carry_is_a_clear_error():
    request = Request({"type": "http", "headers": [], "method": "POST", "path": "/"})
    response = encode_result(OptimStepResponse(metrics={"grad_norm": math.inf}), request)
    reply = json.loads(response.body)
    assert "grad_norm" in reply["error"] and "not a finite number" in reply["error"]
    assert reply["category"] == "user"
