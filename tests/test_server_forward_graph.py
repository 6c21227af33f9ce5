"""An HTTP forward keeps its autograd graph only when the request asks (`"keep_graph": true`).

A custom objective's first pass asks, so the `forward_backward` that follows skips its forward
(`engine/kept_graph.py`); an evaluation forward — and every forward of Tinker's SDK, which never
sets the flag — builds no graph. The app runs in-process (FastAPI's TestClient) on the test
engine, so the run's kept forward can be inspected after each request.
"""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from tinker.proto import tinker_public_pb2 as pb

from bios.engine.engine import Engine
from bios.server.app import create_app
from bios.server.state import ServerConfig, ServerState
from helpers import future_result as result
from test_kept_graph import count_forwards

TOKENS = [5, 9, 17, 33, 65, 129, 7]


def datum_json(weights: float = 1.0) -> dict:
    return {
        "model_input": {"chunks": [{"tokens": TOKENS[:-1]}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": TOKENS[1:], "dtype": "int64"},
            "weights": {"data": [weights] * (len(TOKENS) - 1), "dtype": "float32"},
        },
    }


def make_client(tmp_path, engine: Engine, keep_graphs: bool = True) -> TestClient:
    config = ServerConfig(home=tmp_path, poll_seconds=1.0, keep_graphs=keep_graphs)
    return TestClient(create_app(ServerState(config, engine=engine)))


def new_run(client: TestClient, model: str) -> str:
    body = {"base_model": model, "lora_config": {"rank": 4, "seed": 0}}
    return result(client, client.post("/api/v1/create_model", json=body))["model_id"]


def forward(client: TestClient, model_id: str, route: str = "forward_backward", **flags) -> dict:
    body = {
        "model_id": model_id,
        "forward_backward_input": {"data": [datum_json()], "loss_fn": "cross_entropy"},
        **flags,
    }
    return result(client, client.post(f"/api/v1/{route}", json=body))


@pytest.fixture
def server(tmp_path, session_engine, tiny_models):
    client = make_client(tmp_path, session_engine)
    with client:
        yield client, new_run(client, tiny_models["llama"])


def test_forward_without_the_flag_builds_no_graph(server, session_engine):
    client, model_id = server
    forward(client, model_id, forward_only=True)
    assert session_engine.run(model_id).kept is None
    forward(client, model_id, route="forward", forward_only=True)
    assert session_engine.run(model_id).kept is None


def test_old_sdk_forward_input_builds_no_graph(server, session_engine):
    client, model_id = server
    body = {
        "model_id": model_id,
        "forward_input": {"data": [datum_json()], "loss_fn": "cross_entropy"},
    }
    result(client, client.post("/api/v1/forward", json=body))
    assert session_engine.run(model_id).kept is None


def test_sdk_protobuf_forward_builds_no_graph(server, session_engine):
    client, model_id = server
    message = pb.ForwardBackwardRequest(
        model_id=model_id, loss_fn="cross_entropy", forward_only=True
    )
    datum = message.data.add()
    tokens = np.array(TOKENS)
    datum.model_input.add().encoded_text.tokens = tokens[:-1].astype(np.int32).tobytes()
    datum.loss_fn_inputs["target_tokens"].dense = tokens[1:].astype(np.int64).tobytes()
    datum.loss_fn_inputs["target_tokens"].dtype = pb.DTYPE_INT64
    weights = np.ones(len(TOKENS) - 1, dtype=np.float32)
    datum.loss_fn_inputs["weights"].dense = weights.tobytes()
    datum.loss_fn_inputs["weights"].dtype = pb.DTYPE_FLOAT32
    response = client.post(
        "/api/v1/forward_backward",
        content=message.SerializeToString(),
        headers={"content-type": "application/x-protobuf"},
    )
    result(client, response)
    assert session_engine.run(model_id).kept is None


def test_forward_that_asks_keeps_its_graph_for_the_backward(server, session_engine):
    client, model_id = server
    forward(client, model_id, forward_only=True, keep_graph=True)
    kept = session_engine.run(model_id).kept
    assert kept is not None and kept.logprobs.requires_grad
    with count_forwards(session_engine, model_id) as calls:
        forward(client, model_id)  # the backward on the same tokens
    assert calls[0] == 0, "the backward must reuse the kept forward"
    assert session_engine.run(model_id).kept is None


def test_the_flag_is_ignored_with_a_backward_or_when_the_server_keeps_no_graphs(
    tmp_path, session_engine, tiny_models
):
    with make_client(tmp_path / "on", session_engine) as client:
        model_id = new_run(client, tiny_models["llama"])
        forward(client, model_id, keep_graph=True)  # forward_backward: nothing to keep
        assert session_engine.run(model_id).kept is None
    with make_client(tmp_path / "off", session_engine, keep_graphs=False) as client:
        model_id = new_run(client, tiny_models["llama"])
        forward(client, model_id, forward_only=True, keep_graph=True)
        assert session_engine.run(model_id).kept is None
