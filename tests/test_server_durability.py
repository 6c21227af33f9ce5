"""Crash safety: `kill -9` the server in the middle of a save loop, restart it, and check that
every acknowledged checkpoint is listed, loads, and gives the logits it was saved with. The loop
also overwrites one checkpoint ("latest") each step, so a kill can land inside an overwrite:
"latest" must then hold its last acknowledged copy, or the one being saved if that was recorded
(the deterministic versions of these windows are in test_server_crash_windows.py)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

import bios
from bios.types import AdamParams
from server_process import ServerProcess
from test_client_api import logprobs, sft_data


def test_acknowledged_checkpoints_survive_kill_9(tiny_models, tmp_path):
    model = tiny_models["llama"]
    server = ServerProcess(tmp_path, [model])
    service = bios.ServiceClient(base_url=server.url)
    training = service.create_lora_training_client(model, rank=4, seed=0)
    data = sft_data()
    acknowledged: dict[str, list[list[float]]] = {}
    latest: dict[str, list[list[float]]] = {}  # "acked": last acknowledged; "pending": in flight
    stop = threading.Event()

    def save_loop() -> None:
        step = 0
        while not stop.is_set():
            try:
                training.forward_backward(data, "cross_entropy")
                training.optim_step(AdamParams(learning_rate=1e-2))
                expected = logprobs(training.forward(data, "cross_entropy").result())
                path = training.save_state(f"step-{step}").result().path
                acknowledged[path] = expected
                latest["pending"] = expected
                training.save_state("latest", overwrite=True).result()
                latest["acked"] = latest.pop("pending")
            except Exception:  # the server died under us: what was acknowledged is recorded
                return
            step += 1

    saver = threading.Thread(target=save_loop)
    saver.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.13)  # land somewhere inside the next save
    in_flight = httpx.post(
        f"{server.url}/api/v1/optim_step",
        json={"model_id": training.model_id, "adam_params": {"learning_rate": 0.0}},
        timeout=30,
    ).json()["request_id"]
    server.stop(hard=True)  # SIGKILL
    stop.set()
    saver.join(timeout=60)
    assert len(acknowledged) >= 3

    restarted = ServerProcess(tmp_path, [model], port=server.port)  # the old clients reconnect
    try:
        client = bios.ServiceClient(base_url=restarted.url)
        listed = httpx.get(
            f"{restarted.url}/api/v1/training_runs/{training.model_id}/checkpoints", timeout=30
        ).json()["checkpoints"]
        listed_paths = {c["tinker_path"].replace("tinker://", "bios://") for c in listed}
        assert set(acknowledged) <= listed_paths
        latest_path = next(p for p in listed_paths if p.endswith("/latest"))
        got = logprobs(
            client.create_training_client_from_state_with_optimizer(latest_path)
            .forward(data, "cross_entropy")
            .result()
        )
        assert any(
            all(a == pytest.approx(b, abs=1e-6) for a, b in zip(got, copy, strict=True))
            for copy in latest.values()
        ), "latest holds neither its acknowledged copy nor the recorded in-flight one"
        listed_paths.discard(latest_path)
        for path in listed_paths:  # nothing half-written is listed: every listed one loads
            restored = client.create_training_client_from_state_with_optimizer(path)
            got = logprobs(restored.forward(data, "cross_entropy").result())
            if path in acknowledged:
                for a, b in zip(got, acknowledged[path], strict=True):
                    assert a == pytest.approx(b, abs=1e-6)

        pending = httpx.post(
            f"{restarted.url}/api/v1/retrieve_future", json={"request_id": in_flight}, timeout=30
        ).json()
        assert "restarted" in pending.get("error", ""), pending

        # The old run resumes from its latest checkpoint on its next request.
        latest = max(acknowledged, key=lambda p: int(p.rsplit("-", 1)[1]))
        resumed = training.forward(data, "cross_entropy").result()
        newest = max(listed_paths, key=lambda p: int(p.rsplit("-", 1)[1]))
        if newest == latest:
            for a, b in zip(logprobs(resumed), acknowledged[latest], strict=True):
                assert a == pytest.approx(b, abs=1e-6)
        runs = httpx.get(f"{restarted.url}/api/v1/training_runs", timeout=30).json()
        assert training.model_id in [r["training_run_id"] for r in runs["training_runs"]]
    finally:
        restarted.stop()
