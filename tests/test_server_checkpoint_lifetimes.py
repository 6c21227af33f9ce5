"""Checkpoints through the official SDK 0.38 against a real `bios serve` (with API keys): time to
live on saves and `set_checkpoint_ttl`; expiry deletes files and rows but keeps what a live run
resumes from; exports (`save_weights_external`) downloaded by the SDK's CLI, by the cookbook's
`weights.download` (age-encrypted) and by signed URLs, then loaded with PEFT; publish; copy."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pyrage
import pytest
import tinker
import torch
from peft import PeftModel
from tinker import types
from transformers import AutoModelForCausalLM

from server_process import ServerProcess
from test_server_security import create_key

os.environ.setdefault("TINKER_TELEMETRY", "0")
TOKENS = [5, 9, 14, 3, 22, 7, 31]


def datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
    )


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("lifetimes")
    keys = {tenant: create_key(home, tenant) for tenant in ("alice", "bob")}
    process = ServerProcess(home, [tiny_models["llama"]], extra_args=["--auth"])
    process.keys = keys
    yield process
    process.stop()


def service(server, tenant="alice") -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server.url, api_key=server.keys[tenant])


def rest(server, tenant="alice") -> tinker.RestClient:
    return tinker.RestClient(base_url=server.url, api_key=server.keys[tenant])


def train(client: tinker.ServiceClient, model: str):
    training = client.create_lora_training_client(model, rank=4, seed=0).result()
    training.forward_backward([datum()], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    return training


@pytest.fixture(scope="module")
def trained(server, tiny_models):
    client = service(server)
    training = train(client, tiny_models["llama"])
    state = training.save_state("state", ttl_seconds=7200).result().path
    sampler = training.save_weights_for_sampler("sampler", ttl_seconds=3600).result().path
    logprobs = training.forward([datum()], "cross_entropy").result().loss_fn_outputs[0]
    yield {
        "client": client,
        "training": training,
        "state": state,
        "sampler": sampler,
        "logprobs": list(logprobs["logprobs"].data),
    }
    client.close("success").result()


def listed(server, run_id: str, tenant="alice") -> dict[str, types.Checkpoint]:
    response = rest(server, tenant).list_checkpoints(run_id).result()
    return {c.checkpoint_id: c for c in response.checkpoints}


def set_expiry_in_the_past(server, run_id: str) -> None:
    """Time travel: the server's stored expiry of the run's checkpoints moved to the past."""
    with sqlite3.connect(server.home / "bios.sqlite3") as db:
        db.execute("UPDATE checkpoints SET expires = 1.0 WHERE run_id = ?", (run_id,))


def folder(server, run_id: str, checkpoint_id: str) -> Path:
    return server.home / "runs" / run_id / checkpoint_id


def peft_logprobs(base_model: str, adapter: Path) -> list[float]:
    """log p(token t+1 | tokens ≤ t) from transformers + PEFT on the downloaded adapter."""
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32), adapter
    )
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS[:-1]])).logits[0].float()
    picked = torch.log_softmax(logits, -1).gather(1, torch.tensor(TOKENS[1:])[:, None])
    return picked[:, 0].tolist()


def test_ttl_is_stored_listed_and_changed(server, trained):
    run_id = trained["training"].model_id
    checkpoints = listed(server, run_id)
    state, sampler = checkpoints["weights/state"], checkpoints["sampler_weights/sampler"]
    assert (state.expires_at - state.time).total_seconds() == pytest.approx(7200, abs=1e-3)
    assert (sampler.expires_at - sampler.time).total_seconds() == pytest.approx(3600, abs=1e-3)

    before = time.time()
    rest(server).set_checkpoint_ttl_from_tinker_path(trained["state"], 86400).result()
    expires = listed(server, run_id)["weights/state"].expires_at.timestamp()
    assert before + 86400 <= expires <= time.time() + 86400
    rest(server).set_checkpoint_ttl_from_tinker_path(trained["state"], None).result()
    assert listed(server, run_id)["weights/state"].expires_at is None

    with pytest.raises(tinker.BadRequestError, match="ttl_seconds"):
        rest(server).set_checkpoint_ttl_from_tinker_path(trained["state"], 60).result()
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds"):
        trained["training"].save_state("short", ttl_seconds=10).result()
    started = time.monotonic()  # it took its turn: the next request does not wait for it
    trained["training"].save_state("next", ttl_seconds=None).result()
    assert time.monotonic() - started < 30
    with pytest.raises(tinker.NotFoundError):
        rest(server, "bob").set_checkpoint_ttl_from_tinker_path(trained["state"], 7200).result()
    assert "weights/short" not in listed(server, run_id)


def test_expiry_deletes_files_and_rows_but_keeps_what_a_live_run_resumes_from(server, tiny_models):
    client = service(server)
    training = train(client, tiny_models["llama"])
    run_id = training.model_id
    for name in ("older", "latest"):
        training.save_state(name, ttl_seconds=3600).result()
    training.save_weights_for_sampler("for-sampling", ttl_seconds=3600).result()
    set_expiry_in_the_past(server, run_id)

    kept = listed(server, run_id)  # the listing sweeps first
    assert list(kept) == ["weights/latest"]
    assert kept["weights/latest"].expires_at < datetime.now(UTC)  # kept though expired
    assert not folder(server, run_id, "weights/older").exists()
    assert not folder(server, run_id, "sampler_weights/for-sampling").exists()
    assert folder(server, run_id, "weights/latest").is_dir()

    client.close("success").result()  # the run is no longer live: nothing keeps it
    assert listed(server, run_id) == {}
    assert not folder(server, run_id, "weights/latest").exists()


def test_the_cli_downloads_a_training_checkpoint_that_peft_loads(
    server, trained, tiny_models, tmp_path
):
    env = {
        **os.environ,
        "TINKER_BASE_URL": server.url,
        "TINKER_API_KEY": server.keys["alice"],
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinker.cli",
            "checkpoint",
            "download",
            trained["state"],
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (target,) = tmp_path.iterdir()
    assert sorted(p.name for p in target.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    got = peft_logprobs(tiny_models["llama"], target)
    assert got == pytest.approx(trained["logprobs"], abs=1e-5)
    exports = rest(server).list_user_checkpoints(limit=1000).result().checkpoints
    assert not any(c.checkpoint_type == "external" for c in exports)  # the CLI deleted its own


def test_the_cookbook_downloads_through_an_age_encrypted_export(
    server, trained, tiny_models, tmp_path, monkeypatch
):
    from tinker_cookbook import weights

    monkeypatch.setenv("TINKER_API_KEY", server.keys["alice"])
    out = weights.download(
        tinker_path=trained["state"], output_dir=str(tmp_path / "adapter"), base_url=server.url
    )
    got = peft_logprobs(tiny_models["llama"], Path(out))
    assert got == pytest.approx(trained["logprobs"], abs=1e-5)


def test_exports_are_listed_signed_encrypted_and_published(server, trained):
    training, run_id = trained["training"], trained["training"].model_id
    plain = training.save_weights_external("plain", ttl_seconds=7200).result().path
    assert plain == f"tinker://{run_id}/external_weights/plain"
    listed_export = listed(server, run_id)["external_weights/plain"]
    assert listed_export.checkpoint_type == "external"
    assert (listed_export.expires_at - listed_export.time).total_seconds() == pytest.approx(7200)

    urls = rest(server).get_external_weights_urls(plain).result()
    assert sorted(urls.urls) == ["adapter_config.json", "adapter_model.safetensors"]
    files = {name: urllib.request.urlopen(url).read() for name, url in urls.urls.items()}
    for name, content in files.items():
        assert content == (folder(server, run_id, "external_weights/plain") / name).read_bytes()
    tampered = urls.urls["adapter_config.json"].replace("signature=", "signature=0")
    assert httpx.get(tampered, timeout=30).status_code == 404

    identity = pyrage.x25519.Identity.generate()
    sealed = (
        training.save_weights_external(
            "sealed", age_encryption_recipients=[str(identity.to_public())]
        )
        .result()
        .path
    )
    sealed_urls = rest(server).get_external_weights_urls(sealed).result().urls
    assert sorted(sealed_urls) == ["adapter_config.json.age", "adapter_model.safetensors.age"]
    for name, url in sealed_urls.items():
        content = pyrage.decrypt(urllib.request.urlopen(url).read(), [identity])
        assert content == files[name.removesuffix(".age")]

    with pytest.raises(tinker.BadRequestError, match=r"age_encryption_recipients\[0\]"):
        training.save_weights_external("bad", age_encryption_recipients=["age1nope"]).result()
    # A refused request still took its turn: the run's next request does not wait for it.
    started = time.monotonic()
    training.save_weights_external("after-refusal").result()
    assert time.monotonic() - started < 30

    # Bob sees nothing of alice's until she publishes, then reads only.
    with pytest.raises(tinker.NotFoundError):
        rest(server, "bob").get_external_weights_urls(plain).result()
    rest(server).publish_checkpoint_from_tinker_path(plain).result()
    assert listed(server, run_id)["external_weights/plain"].public is True
    assert sorted(rest(server, "bob").get_external_weights_urls(plain).result().urls) == sorted(
        files
    )
    with pytest.raises(tinker.NotFoundError):
        rest(server, "bob").delete_checkpoint_from_tinker_path(plain).result()
    rest(server).unpublish_checkpoint_from_tinker_path(plain).result()
    with pytest.raises(tinker.NotFoundError):
        rest(server, "bob").get_external_weights_urls(plain).result()
    rest(server).delete_checkpoint_from_tinker_path(plain).result()
    assert not folder(server, run_id, "external_weights/plain").exists()


def test_a_published_training_checkpoint_is_loadable_by_another_tenant(server, trained):
    bob = service(server, "bob")
    with pytest.raises(tinker.NotFoundError):
        rest(server, "bob").get_weights_info_by_tinker_path(trained["state"]).result()
    rest(server).publish_checkpoint_from_tinker_path(trained["state"]).result()
    try:
        info = rest(server, "bob").get_weights_info_by_tinker_path(trained["state"]).result()
        assert info.is_lora and info.lora_rank == 4
        loaded = bob.create_training_client_from_state(trained["state"]).result()
        out = loaded.forward([datum()], "cross_entropy").result().loss_fn_outputs[0]
        assert list(out["logprobs"].data) == pytest.approx(trained["logprobs"], abs=1e-6)
    finally:
        rest(server).unpublish_checkpoint_from_tinker_path(trained["state"]).result()
        bob.close("success").result()


def test_copy_weights_shares_the_files_and_the_copy_is_not_trained(server, trained):
    copied = rest(server).copy_weights(trained["state"], "archive", ttl_seconds=7200).result()
    run_id = copied.removeprefix("tinker://").split("/")[0]
    assert copied == f"tinker://{run_id}/weights/state"
    original = folder(server, trained["training"].model_id, "weights/state")
    copy = folder(server, run_id, "weights/state")
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        assert (copy / name).stat().st_ino == (original / name).stat().st_ino  # no bytes copied
    assert listed(server, run_id)["weights/state"].expires_at is not None

    step = httpx.post(
        f"{server.url}/api/v1/optim_step",
        headers={"X-API-Key": server.keys["alice"]},
        json={"model_id": run_id, "adam_params": {"learning_rate": 0.1}},
        timeout=60,
    )
    assert step.status_code == 400 and "cannot be trained" in step.json()["error"]
    loaded = trained["client"].create_training_client_from_state(copied).result()
    out = loaded.forward([datum()], "cross_entropy").result().loss_fn_outputs[0]
    assert list(out["logprobs"].data) == pytest.approx(trained["logprobs"], abs=1e-6)
