"""`bios serve` against the official `tinker` SDK, at its newest release and its newest 0.25.x.

The server runs as a real process on loopback. The same scenario (every built-in loss, training
steps, a custom loss, save/load with optimizer, sampling, checkpoint listing and download) runs
through each SDK over HTTP and through Bios's embedded engine; the numbers must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import bios
from bios.engine.engine import Engine
from sdk_scenario import scenario
from server_process import ServerProcess

HERE = Path(__file__).parent
# `make setup` installs the 0.25 SDK beside the venv's own (newest) one; see the Makefile.
SDK_PATHS = {"0.38.0": None, "0.25.0": Path(sys.prefix) / "tinker-0.25"}


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("server"), [tiny_models["llama"]])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def embedded_results(tiny_models, tmp_path_factory) -> dict:
    service = bios.ServiceClient(engine=Engine(home=tmp_path_factory.mktemp("embedded")))
    return scenario(service, bios.types, tiny_models["llama"])


def run_sdk(version: str, url: str, model: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TINKER_TELEMETRY": "0"}
    if SDK_PATHS[version] is not None:
        assert SDK_PATHS[version].is_dir(), f"tinker {version} missing: run `make setup`"
        env["PYTHONPATH"] = str(SDK_PATHS[version])
    done = subprocess.run(
        [sys.executable, str(HERE / "sdk_scenario.py"), "tinker", url, model],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULTS "))


def assert_close(got, want, path: str = "") -> None:
    if isinstance(want, dict):
        for key in want:
            assert key in got, f"{path}/{key} missing"
            assert_close(got[key], want[key], f"{path}/{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for index, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close(a, b, f"{path}[{index}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), path
    else:
        assert got == want, path


@pytest.mark.parametrize("version", list(SDK_PATHS))
def test_official_sdk_matches_embedded_engine(version, server, tiny_models, embedded_results):
    results = run_sdk(version, server.url, tiny_models["llama"])
    assert results["sdk_version"] == version
    assert_close(results, embedded_results)
    assert results["checkpoints"] == ["weights/ckpt"]
    if version == "0.25.0":  # the archive route was replaced by per-file URLs in later SDKs
        assert results["archive_bytes"] > 10_000


def post(server, route: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/api/v1/{route}", json=body, timeout=60, **kwargs)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, tiny_models):
    session = post(server, "create_session", {"tags": []}).json()["session_id"]
    unknown_model = post(
        server,
        "create_model",
        {"session_id": session, "model_seq_id": 0, "base_model": "nobody/nothing"},
    )
    assert unknown_model.status_code == 400 and "not served here" in unknown_model.json()["error"]

    missing_run = post(
        server,
        "optim_step",
        {"model_id": "no-such-run", "seq_id": 1, "adam_params": {"learning_rate": 0.1}},
    )
    assert missing_run.status_code == 404 and "no training run" in missing_run.json()["error"]

    malformed = httpx.post(
        f"{server.url}/api/v1/forward_backward",
        content=b"\x08\xff\xff garbage",
        headers={"content-type": "application/x-protobuf"},
        timeout=60,
    )
    assert malformed.status_code == 400 and "protobuf" in malformed.json()["error"]
    not_json = httpx.post(
        f"{server.url}/api/v1/optim_step",
        content=b"{",
        timeout=60,
        headers={"content-type": "application/json"},
    )
    assert not_json.status_code == 422

    created = post(
        server,
        "create_model",
        {
            "session_id": session,
            "model_seq_id": 1,
            "base_model": tiny_models["llama"],
            "lora_config": {"rank": 4},
        },
    )
    future = post(server, "retrieve_future", {"request_id": created.json()["request_id"]}).json()
    model_id = future["model_id"]
    datum = {
        "model_input": {"chunks": [{"tokens": [1, 2, 3]}]},
        "loss_fn_inputs": {"target_tokens": {"data": [2, 3, 4], "dtype": "int64"}},
    }
    unknown_loss = post(
        server,
        "forward_backward",
        {
            "model_id": model_id,
            "seq_id": 1,
            "forward_backward_input": {"data": [datum], "loss_fn": "ppo2"},
        },
    )
    assert unknown_loss.status_code == 400 and "unknown loss 'ppo2'" in unknown_loss.json()["error"]
    # The rejected request took its turn: the next one (seq 2) runs.
    step = post(
        server,
        "optim_step",
        {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.1}},
    )
    result = post(server, "retrieve_future", {"request_id": step.json()["request_id"]}).json()
    assert result["metrics"]["grad_norm"] == 0.0
    assert httpx.get(f"{server.url}/api/v1/healthz", timeout=10).json() == {"status": "ok"}


def test_bios_extensions(server):
    answer = httpx.get(
        f"{server.url}/api/v1/bios/hparams",
        params={"model": "meta-llama/Llama-3.2-1B", "examples": 1000, "completion_tokens": 50_000},
        timeout=30,
    ).json()
    assert answer["learning_rate"] == pytest.approx(4.91e-4, rel=2e-3)
    assert answer["recommendation"]["batch_size"] == 16  # 1,000 examples: ~100 steps need 16
    records = [{"step": s, "loss": 2.0 - 0.01 * s} for s in range(30)] + [
        {"step": 30, "loss": float("nan")}
    ]
    # NaN is not JSON, but Python's encoder writes it and the server reads it.
    response = httpx.post(
        f"{server.url}/api/v1/bios/diagnose",
        content=json.dumps({"records": records}),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    findings = response.json()["findings"]
    assert [f["step"] for f in findings if f["kind"] == "nonfinite"] == [30]
