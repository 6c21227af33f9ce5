"""Tenant isolation and API keys: tenant B can see, load, sample, delete or download nothing of
tenant A's, through any route or path form; requests without a valid key get 401."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

import bios
from bios.types import AdamParams, ModelInput, SamplingParams
from server_process import ServerProcess
from test_client_api import sft_data


def create_key(home, tenant: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bios.cli",
            "keys",
            "create",
            "--tenant",
            tenant,
            "--home",
            str(home),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture(scope="module")
def secured(tiny_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("secured")
    keys = {tenant: create_key(home, tenant) for tenant in ("alice", "bob", "eve")}
    server = ServerProcess(home, [tiny_models["llama"]], extra_args=["--auth"])
    alice = bios.ServiceClient(base_url=server.url, api_key=keys["alice"])
    training = alice.create_lora_training_client(tiny_models["llama"], rank=4, seed=0)
    training.forward_backward(sft_data(), "cross_entropy")
    training.optim_step(AdamParams(learning_rate=1e-2))
    state = training.save_state("alice-state").result().path
    sampler_path = training.save_weights_for_sampler("alice-sampler").result().path
    sampler = training.save_weights_and_get_sampling_client()
    pending = httpx.post(
        f"{server.url}/api/v1/optim_step",
        headers={"X-API-Key": keys["alice"]},
        json={"model_id": training.model_id, "adam_params": {"learning_rate": 0.0}},
    ).json()["request_id"]
    yield {
        "server": server,
        "keys": keys,
        "run": training.model_id,
        "state": state,
        "sampler_path": sampler_path,
        "sampler": sampler.sampling_session_id,
        "future": pending,
        "training": training,
        "home": home,
    }
    server.stop()


def call(secured, tenant: str | None, method: str, route: str, **kwargs) -> httpx.Response:
    headers = {"X-API-Key": secured["keys"][tenant]} if tenant else {}
    return httpx.request(
        method, f"{secured['server'].url}/api/v1/{route}", headers=headers, timeout=60, **kwargs
    )


def bob_requests(s) -> dict[str, tuple[str, str, dict]]:
    """Every way tenant bob could reach alice's run, checkpoints, sampler and futures."""
    run, state, sampler_path = s["run"], s["state"], s["sampler_path"]
    tinker_state = state.replace("bios://", "tinker://")
    datum = {
        "model_input": {"chunks": [{"tokens": [1, 2, 3]}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": [2, 3, 4], "dtype": "int64"},
            "weights": {"data": [1, 1, 1], "dtype": "float32"},
        },
    }
    return {
        "get_info": ("POST", "get_info", {"json": {"model_id": run}}),
        "forward_backward": (
            "POST",
            "forward_backward",
            {
                "json": {
                    "model_id": run,
                    "forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy"},
                }
            },
        ),
        "optim_step": (
            "POST",
            "optim_step",
            {"json": {"model_id": run, "adam_params": {"learning_rate": 1.0}}},
        ),
        "save_weights": ("POST", "save_weights", {"json": {"model_id": run, "path": "stolen"}}),
        "unload": ("POST", "unload_model", {"json": {"model_id": run}}),
        "fingerprint": ("GET", f"bios/runs/{run}/fingerprint", {}),
        "load by bios path": ("POST", "load_weights", {"json": {"model_id": run, "path": state}}),
        "create by loading": (
            "POST",
            "load_weights",
            {
                "json": {
                    "session_id": "x",
                    "model_seq_id": 0,
                    "path": tinker_state,
                    "optimizer": True,
                }
            },
        ),
        "weights_info": ("POST", "weights_info", {"json": {"tinker_path": tinker_state}}),
        "sampler on path": (
            "POST",
            "create_sampling_session",
            {"json": {"model_path": sampler_path}},
        ),
        "sample": (
            "POST",
            "asample",
            {
                "json": {
                    "sampling_session_id": s["sampler"],
                    "prompt": {"chunks": [{"tokens": [1, 2]}]},
                    "sampling_params": {"max_tokens": 2},
                }
            },
        ),
        "sampler info": ("GET", f"samplers/{s['sampler']}", {}),
        "future": ("POST", "retrieve_future", {"json": {"request_id": s["future"]}}),
        "run": ("GET", f"training_runs/{run}", {}),
        "checkpoints": ("GET", f"training_runs/{run}/checkpoints", {}),
        "delete": ("DELETE", f"training_runs/{run}/checkpoints/weights/alice-state", {}),
        "archive": ("GET", f"training_runs/{run}/checkpoints/weights/alice-state/archive", {}),
    }


@pytest.mark.parametrize(
    "case",
    list(
        bob_requests(
            {
                "run": "r",
                "state": "bios://r/weights/x",
                "sampler_path": "bios://r/sampler_weights/y",
                "sampler": "s",
                "future": "f",
            }
        )
    ),
)
def test_another_tenant_gets_404_everywhere(case, secured):
    method, route, kwargs = bob_requests(secured)[case]
    # Bob's own run, so a request's own fields are valid and only ownership can fail.
    response = call(secured, "bob", method, route, **kwargs)
    assert response.status_code == 404, (case, response.status_code, response.text)
    assert "no " in response.json()["error"]


def test_listings_show_only_your_own(secured):
    assert call(secured, "bob", "GET", "training_runs").json()["training_runs"] == []
    assert call(secured, "bob", "GET", "checkpoints").json()["checkpoints"] == []
    mine = call(secured, "alice", "GET", "training_runs").json()["training_runs"]
    assert [r["training_run_id"] for r in mine] == [secured["run"]]
    listed = call(secured, "alice", "GET", "checkpoints").json()["checkpoints"]
    assert sorted(c["checkpoint_id"] for c in listed) == [
        "sampler_weights/alice-sampler",
        "weights/alice-state",
    ]


def test_alice_state_is_untouched_and_still_hers(secured):
    training = secured["training"]
    before = call(secured, "alice", "GET", f"bios/runs/{secured['run']}/fingerprint").json()
    for method, route, kwargs in bob_requests(secured).values():
        call(secured, "bob", method, route, **kwargs)
    after = call(secured, "alice", "GET", f"bios/runs/{secured['run']}/fingerprint").json()
    assert before == after
    # Alice can still use everything bob could not.
    sampler = bios.ServiceClient(base_url=secured["server"].url, api_key=secured["keys"]["alice"])
    sampling = sampler.create_sampling_client(model_path=secured["sampler_path"])
    out = sampling.sample(ModelInput.from_ints([1, 2]), 1, SamplingParams(max_tokens=2)).result()
    assert len(out.sequences[0].tokens) >= 1
    assert training.forward(sft_data(), "cross_entropy").result().metrics["loss:sum"] > 0


def test_requests_without_a_valid_key_get_401(secured):
    for headers in ({}, {"X-API-Key": "tml-bios-not-a-key"}):
        response = httpx.post(
            f"{secured['server'].url}/api/v1/create_session", json={}, headers=headers, timeout=30
        )
        assert response.status_code == 401 and "X-API-Key" in response.json()["error"]
    assert httpx.get(f"{secured['server'].url}/api/v1/healthz", timeout=30).status_code == 200


def test_revoked_key_stops_working(secured):
    assert call(secured, "eve", "POST", "create_session", json={}).status_code == 200
    revoked = subprocess.run(
        [
            sys.executable,
            "-m",
            "bios.cli",
            "keys",
            "revoke",
            secured["keys"]["eve"][:20],
            "--home",
            str(secured["home"]),
        ],
        capture_output=True,
        text=True,
    )
    assert revoked.returncode == 0 and "revoked 1" in revoked.stdout
    assert call(secured, "eve", "POST", "create_session", json={}).status_code == 401


def test_every_route_but_health_and_signed_downloads_needs_a_key(secured):
    """Enumerated from the server's own route table, so a route added later is covered too."""
    url = secured["server"].url
    paths = httpx.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    open_routes = {
        "/api/v1/healthz",
        "/api/v1/archives/{run_id}/{kind}/{name}.tar",
        "/api/v1/external_files/{run_id}/{name}/{file}",
    }
    checked = 0
    for path, methods in paths.items():
        if path in open_routes or not path.startswith("/api/v1/"):
            continue
        filled = path.replace("{", "").replace("}", "")  # every path parameter: its own name
        for method in methods:
            body = {"json": {}} if method in ("post", "put") else {}
            response = httpx.request(method, url + filled, timeout=30, **body)
            assert response.status_code == 401, (method, path, response.status_code)
            checked += 1
    assert checked > 20
    for route in ("bios/diagnose", "telemetry"):  # a large body is not even read without a key
        response = httpx.post(f"{url}/api/v1/{route}", content=b"{" * 2**20, timeout=30)
        assert response.status_code == 401
    query = {"model": str(secured["home"])}
    response = httpx.get(f"{url}/api/v1/bios/hparams", params=query, timeout=30)
    assert response.status_code == 401
