"""What the server holds for a tenant is freed when no client can reach it, counted in its quota
and shown in its metrics (sampling snapshots); and models load only from allowed folders, with
one answer for a folder that is missing and one that is not allowed."""

from __future__ import annotations

import gc
import os
import shutil
import time
import weakref
from concurrent.futures import Future
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bios.commands import serve
from bios.engine.engine import Engine
from bios.errors import NotFoundError
from bios.server.app import create_app
from bios.server.state import ServerConfig, ServerState
from helpers import future_result as result

PROMPT = {"chunks": [{"tokens": [1, 2, 3]}]}


def sample(client: TestClient, sampler_id: str):
    body = {
        "sampling_session_id": sampler_id,
        "prompt": PROMPT,
        "sampling_params": {"max_tokens": 2},
    }
    return client.post("/api/v1/asample", json=body)


@pytest.fixture
def served(tiny_models, session_engine, tmp_path):
    config = ServerConfig(home=tmp_path, poll_seconds=1.0, max_samplers_per_tenant=3)
    state = ServerState(config, engine=session_engine)
    client = TestClient(create_app(state))
    body = {"base_model": tiny_models["llama"], "lora_config": {"rank": 4, "seed": 0}}
    model_id = result(client, client.post("/api/v1/create_model", json=body))["model_id"]
    return client, state, model_id


def snapshot(client: TestClient, model_id: str) -> str:
    response = client.post("/api/v1/save_weights_for_sampler", json={"model_id": model_id})
    return result(client, response)["sampling_session_id"]


def test_unloading_a_run_frees_its_snapshots_and_metrics_show_them(served):
    client, state, model_id = served
    sampler_id = snapshot(client, model_id)
    held = weakref.ref(state.samplers[sampler_id].session)
    assert result(client, sample(client, sampler_id))["sequences"]
    metrics = client.get("/api/v1/bios/metrics").json()
    assert metrics["tenant"]["snapshots"] == 1 and metrics["tenant"]["snapshot_bytes"] > 0
    assert metrics["server"]["snapshot_bytes"] >= metrics["tenant"]["snapshot_bytes"]

    result(client, client.post("/api/v1/unload_model", json={"model_id": model_id}))
    response = sample(client, sampler_id)
    assert response.status_code == 404
    assert "freed" in response.json()["error"] and "unloaded" in response.json()["error"]
    assert client.get(f"/api/v1/samplers/{sampler_id}").status_code == 404
    metrics = client.get("/api/v1/bios/metrics").json()["tenant"]
    assert metrics["snapshots"] == 0 and metrics["snapshot_bytes"] == 0
    gc.collect()
    assert held() is None  # its weights are gone, not merely unlisted


def test_snapshots_count_in_the_sampler_quota(served):
    client, state, model_id = served
    state.config.snapshot_replaced_idle_seconds = 3600.0  # nothing is replaced in this test
    held = [snapshot(client, model_id) for _ in range(3)]
    response = client.post("/api/v1/save_weights_for_sampler", json={"model_id": model_id})
    assert response.status_code == 403 and "samplers: 3" in response.json()["error"]
    body = {"base_model": state.engine.run(model_id).base_model}
    response = client.post("/api/v1/create_sampling_session", json=body)
    assert response.status_code == 403
    assert all(sample(client, s).status_code == 200 for s in held)  # the held ones still work


class FakeSession:
    base_model = "m"
    weight_bytes = 1000


def fake_state(tmp_path: Path, **config) -> ServerState:
    return ServerState(ServerConfig(home=tmp_path, **config), engine=Engine(home=tmp_path))


def test_a_newer_snapshot_replaces_only_older_ones_idle_for_the_grace(tmp_path):
    state = fake_state(tmp_path, snapshot_replaced_idle_seconds=1.0)
    first = state.samplers.add(FakeSession(), "t", None, "run", snapshot=True)
    busy = state.samplers.add(FakeSession(), "t", None, "run", snapshot=True)
    other_run = state.samplers.add(FakeSession(), "t", None, "run2", snapshot=True)
    named = state.samplers.add(FakeSession(), "t", "bios://run/sampler_weights/a", "run")
    in_flight: Future = Future()
    state.samplers.used(busy, in_flight)  # an SDK client still sampling from an older snapshot
    second = state.samplers.add(FakeSession(), "t", None, "run", snapshot=True)
    assert state.samplers.session(first, "t")  # used 0 s ago: kept, and its use restarts its clock
    time.sleep(1.05)
    third = state.samplers.add(FakeSession(), "t", None, "run", snapshot=True)
    for freed in (first, second):
        with pytest.raises(NotFoundError, match=r"freed .*newer snapshot"):
            state.samplers.session(freed, "t")
    for kept in (busy, other_run, named, third):
        assert state.samplers.session(kept, "t")
    in_flight.set_result(None)
    assert state.samplers.metrics("t")["tenant"]["snapshots"] == 3


def test_an_idle_sampler_is_freed_after_the_timeout(tmp_path):
    state = fake_state(tmp_path, sampler_idle_seconds=1.0)
    idle = state.samplers.add(FakeSession(), "t", None, None)
    used = state.samplers.add(FakeSession(), "t", None, None)
    time.sleep(0.6)
    state.samplers.session(used, "t")
    time.sleep(0.5)
    with pytest.raises(NotFoundError, match=r"freed .*unused for 1 s"):
        state.samplers.session(idle, "t")
    assert state.samplers.session(used, "t")
    assert state.samplers.metrics("t")["tenant"]["samplers"] == 1
    with pytest.raises(NotFoundError, match="no sampling session"):
        state.samplers.session(used, "another tenant")


# ---- models load only from allowed folders ------------------------------------------------------


def test_models_load_only_from_allowed_folders_and_say_nothing_else(tiny_models, tmp_path):
    allowed = Path(tiny_models["llama"]).parent
    outside = shutil.copytree(tiny_models["llama"], tmp_path / "outside" / "llama")
    (tmp_path / "empty").mkdir()
    config = ServerConfig(home=tmp_path / "home", poll_seconds=1.0, model_dirs=[allowed])
    client = TestClient(create_app(ServerState(config, engine=Engine(home=tmp_path / "home"))))

    def refusal(name: str) -> str:
        body = {"base_model": name, "lora_config": {"rank": 4, "seed": 0}}
        response = client.post("/api/v1/create_model", json=body)
        assert response.status_code == 400, (name, response.text)
        assert response.json()["field"] == "base_model"
        return response.json()["error"].replace(repr(name), "NAME")

    probes = [
        str(outside),  # a real model outside the allowed folders
        str(tmp_path / "empty"),  # a folder with no model
        str(tmp_path / "missing"),  # nothing at all
        str(allowed / os.path.relpath(outside, allowed)),  # escaping an allowed folder
        str(allowed / "missing"),
        "no-such-org/no-such-model",
    ]
    answers = {refusal(name) for name in probes}
    assert len(answers) == 1, answers
    assert str(tmp_path) not in answers.pop()
    # hparams reads a config.json only where create_model would load: same answer everywhere.
    for name in probes[:3]:
        response = client.get("/api/v1/bios/hparams", params={"model": name})
        assert response.status_code == 400
        assert response.json()["error"].replace(repr(name), "NAME") == refusal(name)
    body = {"base_model": tiny_models["llama"], "lora_config": {"rank": 4, "seed": 0}}
    assert result(client, client.post("/api/v1/create_model", json=body))["model_id"]


def test_bios_serve_passes_its_model_dirs_and_sampler_limits():
    import argparse

    parser = argparse.ArgumentParser()
    serve.add(parser.add_subparsers())
    args = parser.parse_args(
        ["serve", "--model-dir", "/a", "--model-dir", "/b", "--sampler-idle-minutes", "5"]
    )
    assert args.model_dir == ["/a", "/b"] and args.sampler_idle_minutes == 5.0
    assert args.max_samplers == 64
    assert parser.parse_args(["serve"]).model_dir == []  # bios serve: an empty allow-list
