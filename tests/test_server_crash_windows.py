"""Crash windows and races of `bios serve`'s saves and run ids, made deterministic in-process.

A "kill" is simulated by making the next filesystem or database step fail (the steps after it
never run, as after `kill -9`), then a "restart" is a new `ServerState` (and a new engine, so no
run is in memory) on the same home. "Changes nothing" is checked with a state fingerprint: the
run's weights and moments (`/bios/runs/{id}/fingerprint`), the checkpoint folders' bytes and the
database rows.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bios import fsutil
from bios.engine.engine import Engine
from bios.server.app import create_app
from bios.server.state import ServerConfig, ServerState
from bios.server.store import Store
from test_server_forward_graph import datum_json


def start(home: Path, **config) -> tuple[TestClient, ServerState]:
    """A server on `home` as after a (re)start: a fresh engine, start-up cleanup run."""
    state = ServerState(ServerConfig(home=home, poll_seconds=1.0, **config), Engine(home=home))
    return TestClient(create_app(state)), state


def wait(client: TestClient, request_id: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = client.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
        if answer.get("type") != "try_again":
            return answer
    raise TimeoutError(request_id)


def ok(client: TestClient, route: str, body: dict) -> dict:
    response = client.post(f"/api/v1/{route}", json=body)
    assert response.status_code == 200, response.text
    answer = wait(client, response.json()["request_id"])
    assert "error" not in answer, answer
    return answer


def new_run(client: TestClient, model: str, model_seq_id: int = 1) -> tuple[str, str]:
    session = client.post("/api/v1/create_session", json={}).json()["session_id"]
    body = {
        "session_id": session,
        "model_seq_id": model_seq_id,
        "base_model": model,
        "lora_config": {"rank": 4, "seed": 0},
    }
    return session, ok(client, "create_model", body)["model_id"]


def train(client: TestClient, model_id: str) -> None:
    batch = {"data": [datum_json()], "loss_fn": "cross_entropy"}
    ok(client, "forward_backward", {"model_id": model_id, "forward_backward_input": batch})
    ok(client, "optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 1e-2}})


def fingerprint(client: TestClient, model_id: str) -> str:
    response = client.get(f"/api/v1/bios/runs/{model_id}/fingerprint")
    assert response.status_code == 200, response.text
    return response.json()["fingerprint"]


def folder_bytes(home: Path) -> dict[str, str]:
    """Every file under the run folders (dot-folders included), by path, with its hash."""
    return {
        str(path.relative_to(home)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((home / "runs").rglob("*"))
        if path.is_file()
    }


def rows(home: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(home / "bios.sqlite3") as db:
        return {
            "runs": db.execute("SELECT * FROM runs ORDER BY run_id").fetchall(),
            "checkpoints": db.execute(
                "SELECT run_id, kind, name, tenant, size_bytes, created FROM checkpoints "
                "ORDER BY run_id, kind, name"
            ).fetchall(),
        }


def listed(client: TestClient, model_id: str) -> list[str]:
    answer = client.get(f"/api/v1/training_runs/{model_id}/checkpoints").json()
    return [c["checkpoint_id"] for c in answer["checkpoints"]]


def test_kill_between_the_renames_of_an_overwrite_keeps_the_acknowledged_copy(
    tiny_models, tmp_path, monkeypatch
):
    client, _ = start(tmp_path)
    _, model_id = new_run(client, tiny_models["llama"])
    train(client, model_id)
    path = ok(client, "save_weights", {"model_id": model_id, "path": "latest"})["path"]
    acknowledged, saved_bytes = fingerprint(client, model_id), folder_bytes(tmp_path)
    train(client, model_id)
    assert fingerprint(client, model_id) != acknowledged

    # The overwrite: the old folder is moved aside (first rename), then the server dies before
    # the new one is renamed into place (every later rename fails too: nothing runs after a kill).
    renames = []
    real_replace = os.replace

    def dies_at_second_rename(source, destination):
        renames.append((source, destination))
        if len(renames) >= 2:
            raise OSError("killed")
        return real_replace(source, destination)

    monkeypatch.setattr(fsutil.os, "replace", dies_at_second_rename)
    body = {"model_id": model_id, "path": "latest", "overwrite": True}
    request_id = client.post("/api/v1/save_weights", json=body).json()["request_id"]
    assert "killed" in wait(client, request_id).get("error", "")
    monkeypatch.setattr(fsutil.os, "replace", real_replace)
    assert len(renames) >= 2  # the window was reached: the old copy had been moved aside

    client, _ = start(tmp_path)  # the restart's cleanup runs
    assert listed(client, model_id) == ["weights/latest"]
    assert folder_bytes(tmp_path) == saved_bytes  # the acknowledged copy, back, byte for byte
    assert fingerprint(client, model_id) == acknowledged  # the run resumes from it
    session = client.post("/api/v1/create_session", json={}).json()["session_id"]
    load = {"path": path, "optimizer": True, "session_id": session, "model_seq_id": 1}
    copy = ok(client, "load_weights", load)["model_id"]
    assert fingerprint(client, copy) == acknowledged


def test_a_kill_after_an_overwrite_renamed_but_before_its_row_keeps_the_old_copy(
    tiny_models, tmp_path, monkeypatch
):
    """The new folder is in place but not recorded (the save was never acknowledged): start-up
    puts the recorded copy back rather than keeping an unrecorded one under its name."""
    client, _ = start(tmp_path)
    _, model_id = new_run(client, tiny_models["llama"])
    train(client, model_id)
    ok(client, "save_weights", {"model_id": model_id, "path": "latest"})
    acknowledged, saved_bytes = fingerprint(client, model_id), folder_bytes(tmp_path)
    train(client, model_id)

    def killed(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(Store, "add_checkpoint", killed)
    body = {"model_id": model_id, "path": "latest", "overwrite": True}
    request_id = client.post("/api/v1/save_weights", json=body).json()["request_id"]
    assert "killed" in wait(client, request_id).get("error", "")
    monkeypatch.undo()

    client, _ = start(tmp_path)
    assert listed(client, model_id) == ["weights/latest"]
    assert folder_bytes(tmp_path) == saved_bytes
    assert fingerprint(client, model_id) == acknowledged


def test_a_completed_save_is_not_reported_as_lost_after_a_kill(tiny_models, tmp_path, monkeypatch):
    """Killed after the checkpoint's row, before the future's status row (simulated by a
    status write that never happens): the request must not read "submit it again"."""
    client, _ = start(tmp_path)
    _, model_id = new_run(client, tiny_models["llama"])
    train(client, model_id)
    monkeypatch.setattr(Store, "finish_future", lambda *args, **kwargs: None)
    response = client.post("/api/v1/save_weights", json={"model_id": model_id, "path": "ck"})
    request_id = response.json()["request_id"]
    assert "error" not in wait(client, request_id)
    monkeypatch.undo()

    client, _ = start(tmp_path)
    assert listed(client, model_id) == ["weights/ck"]
    answer = client.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
    assert "submit it again" not in answer.get("error", ""), answer
    with sqlite3.connect(tmp_path / "bios.sqlite3") as db:
        status = db.execute("SELECT status FROM futures WHERE request_id = ?", (request_id,))
        assert status.fetchone() == ("done",)


@pytest.mark.parametrize("restart", [False, True], ids=["unloaded", "restarted"])
def test_reusing_a_runs_id_is_refused_and_changes_nothing(tiny_models, tmp_path, restart):
    client, _ = start(tmp_path)
    session, model_id = new_run(client, tiny_models["llama"])
    train(client, model_id)
    path = ok(client, "save_weights", {"model_id": model_id, "path": "ck"})["path"]
    train(client, model_id)
    ok(client, "save_weights", {"model_id": model_id, "path": "ck2"})
    before = fingerprint(client, model_id)
    if restart:
        client, _ = start(tmp_path)
    else:
        ok(client, "unload_model", {"model_id": model_id})
    saved = folder_bytes(tmp_path), rows(tmp_path)

    create = {
        "session_id": session,
        "model_seq_id": 1,
        "base_model": tiny_models["llama"],
        "lora_config": {"rank": 4, "seed": 1},
    }
    load = {"session_id": session, "model_seq_id": 1, "path": path, "optimizer": True}
    for route, body in [("create_model", create), ("load_weights", load)]:
        response = client.post(f"/api/v1/{route}", json=body)
        assert 400 <= response.status_code < 500, (route, response.text)
        assert "model_seq_id" in response.text, response.text
    assert (folder_bytes(tmp_path), rows(tmp_path)) == saved
    assert fingerprint(client, model_id) == before  # resumed from its own latest checkpoint


def test_concurrent_saves_never_store_more_than_the_quota(tiny_models, tmp_path, monkeypatch):
    client, state = start(tmp_path)
    _, model_id = new_run(client, tiny_models["llama"])
    train(client, model_id)
    ok(client, "save_weights", {"model_id": model_id, "path": "probe"})
    size = state.store.checkpoint_bytes(None)
    client.delete(f"/api/v1/training_runs/{model_id}/checkpoints/weights/probe")
    assert state.store.checkpoint_bytes(None) == 0
    state.config.max_checkpoint_bytes_per_tenant = int(2.5 * size)

    # Hold the run's worker in its first save until all eight requests have been answered.
    run = state.engine.run(model_id)
    gate, real_save = threading.Event(), run.save

    def gated_save(*args, **kwargs):
        assert gate.wait(60)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(run, "save", gated_save)
    answers = [
        client.post("/api/v1/save_weights", json={"model_id": model_id, "path": f"c{i}"})
        for i in range(8)
    ]
    gate.set()
    accepted = [a.json()["request_id"] for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    outcomes = [wait(client, request_id) for request_id in accepted]
    assert all("error" not in outcome for outcome in outcomes), outcomes
    stored = state.store.checkpoint_bytes(None)
    assert stored <= state.config.max_checkpoint_bytes_per_tenant, (stored, size)
    assert accepted and refused and all(a.status_code == 403 for a in refused)
    assert "checkpoints" in refused[0].text

    # Every reservation was settled: the quota left is what the stored rows leave. A save that
    # fails (a name that exists, no overwrite) releases its reservation too.
    response = client.post("/api/v1/save_weights", json={"model_id": model_id, "path": "c0"})
    if response.status_code == 200:
        assert "error" in wait(client, response.json()["request_id"])
    for name in [f"c{i}" for i in range(1, 8)]:
        client.delete(f"/api/v1/training_runs/{model_id}/checkpoints/weights/{name}")
    ok(client, "save_weights", {"model_id": model_id, "path": "after"})
