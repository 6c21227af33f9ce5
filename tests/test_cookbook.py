"""tinker-cookbook 0.6.1, unpatched, against a real `bios serve` process on a tiny model.

Each cookbook entry point runs in its own process (tests/cookbook_scenario.py), as a user would
run it, with only the environment the SDK reads (`TINKER_BASE_URL`, a `tml-` key). The tests
check what it learned from the metrics the cookbook itself logged, the files it left, and how
Bios recorded the end of its session (`with ServiceClient` posts `/sessions/{id}/finish`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from safetensors.torch import load_file

from server_process import ServerProcess

HERE = Path(__file__).parent
SUCCESS = {"type": "client_finished", "reason": {"type": "success"}, "detail": None}


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    assert importlib.util.find_spec("tinker_cookbook"), "tinker-cookbook missing: run `make setup`"
    process = ServerProcess(tmp_path_factory.mktemp("cookbook-server"), [tiny_models["llama"]])
    yield process
    process.stop()


def run_scenario(server: ServerProcess, model: str, workdir: Path, name: str, *extra: str) -> dict:
    env = {
        **os.environ,
        "TINKER_BASE_URL": server.url,
        "TINKER_API_KEY": "tml-bios-cookbook",
        "HF_HUB_OFFLINE": "1",
        "TINKER_TELEMETRY": "0",
    }
    command = [sys.executable, str(HERE / "cookbook_scenario.py"), name, "--model", model]
    done = subprocess.run(
        [*command, "--workdir", str(workdir), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    server_log = (server.home / "server.log").read_text(errors="replace")
    assert done.returncode == 0 and lines, (
        f"{name} exited {done.returncode}\n--- stderr\n{done.stderr[-4000:]}"
        f"\n--- server.log\n{server_log[-3000:]}"
    )
    return json.loads(lines[-1].removeprefix("RESULTS "))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cookbook-runs")


@pytest.fixture(scope="module")
def sft(server, tiny_models, workdir) -> dict:
    return run_scenario(server, tiny_models["llama"], workdir, "sft")


def test_supervised_train_main(sft):
    nll = sft["train_nll"]
    assert len(nll) == 6  # max_steps
    assert nll[-1] < nll[0] - 1.0, nll
    # The held-out NLL (the cookbook's sampler-side evaluator, via compute_logprobs) falls too.
    assert len(sft["test_nll"]) == 2 and sft["test_nll"][1] < sft["test_nll"][0] - 0.5
    assert [c["name"] for c in sft["checkpoints"]] == ["000003", "final"]
    assert {"metrics.jsonl", "checkpoints.jsonl", "config.json"} <= set(sft["files"])
    assert sft["sessions"] == [SUCCESS]


def test_rl_train_main_sync(server, tiny_models, workdir):
    results = run_scenario(server, tiny_models["llama"], workdir, "rl_sync")
    assert results["loss_fn"] == "importance_sampling"
    reward = results["reward"]
    assert len(reward) == 8
    assert sum(reward[-2:]) / 2 > sum(reward[:2]) / 2 + 0.2, reward
    # On-policy: the trainer's logprobs of the sampled tokens are the sampler's.
    assert max(abs(k) for k in results["kl_sample_train"]) < 1e-4
    assert [c["name"] for c in results["checkpoints"]][-1] == "final"
    assert results["sessions"] == [SUCCESS]


def test_rl_train_main_async_with_its_default_loss(server, tiny_models, workdir):
    results = run_scenario(server, tiny_models["llama"], workdir, "rl_async")
    assert results["loss_fn"] == "stable_reinforce"  # AsyncConfig's default, left alone
    reward = results["reward"]
    assert len(reward) == 16  # on one-step-stale samples, at half sync's LR: slower, steadier
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.25, reward
    # The first batch is sampled from the weights it trains: no staleness yet.
    assert abs(results["kl_sample_train"][0]) < 1e-4
    assert [c["name"] for c in results["checkpoints"]][-1] == "final"
    assert results["sessions"] == [SUCCESS]


def test_preference_train_dpo_main(server, tiny_models, workdir):
    results = run_scenario(server, tiny_models["llama"], workdir, "dpo")
    loss = results["dpo_loss"]
    assert len(loss) == 3  # one batch of all eight pairs, three epochs
    # Before the first step the policy is its own reference: every margin is 0, loss = log 2.
    assert loss[0] == pytest.approx(math.log(2), abs=1e-4)
    assert loss[-1] < 0.1 and results["accuracy"][-1] == 1.0, results
    assert [c["name"] for c in results["checkpoints"]] == ["final"]
    # train_dpo.main opens its ServiceClient without `with`: its session is never finished, so
    # a clean exit here is the process's own (checked by run_scenario).


def test_distillation_train_on_policy_main(server, tiny_models, workdir, sft):
    student = sft["checkpoints"][-1]["state_path"]
    results = run_scenario(server, tiny_models["llama"], workdir, "distill", "--student", student)
    kl = results["teacher_kl"]
    assert len(kl) == 4
    assert sum(kl[1:]) / 3 < 0.75 * kl[0] and kl[-1] < kl[0], kl
    assert [c["name"] for c in results["checkpoints"]] == ["final"]


def expiry(entry: dict) -> timedelta | None:
    """How long after its save a listed checkpoint expires."""
    if entry["expires_at"] is None:
        return None
    return datetime.fromisoformat(entry["expires_at"]) - datetime.fromisoformat(entry["time"])


def test_checkpoints_rest_client_and_download(server, tiny_models, workdir, sft):
    results = run_scenario(
        server, tiny_models["llama"], workdir, "checkpoints", "--sft-log", sft["log_path"]
    )
    periodic, final = results["periodic"], results["final"]
    # The cookbook reads the renderer back from the run on resume.
    assert results["run_user_metadata"] == {"renderer_name": "role_colon"}

    listed = results["listed"]
    paths = [periodic["state_path"], periodic["sampler_path"], final["state_path"]]
    paths.append(final["sampler_path"])
    assert sorted(listed) == sorted(paths)
    # Periodic saves carry the cookbook's 7-day TTL; the final one is kept indefinitely.
    second = timedelta(seconds=1)
    week = timedelta(seconds=604800)
    assert abs(expiry(listed[periodic["state_path"]]) - week) < second
    assert abs(expiry(listed[periodic["sampler_path"]]) - week) < second
    assert expiry(listed[final["state_path"]]) is expiry(listed[final["sampler_path"]]) is None

    # A new TTL counts from when it is set.
    after_ttl = results["after_ttl"]
    expires = datetime.fromisoformat(after_ttl[periodic["state_path"]]["expires_at"])
    set_at = datetime.fromisoformat(results["ttl_set_at"])
    assert timedelta(0) <= expires - (set_at + timedelta(hours=1)) < timedelta(seconds=30)
    assert after_ttl[periodic["sampler_path"]] == listed[periodic["sampler_path"]]

    after_delete = results["after_delete"]
    assert sorted(after_delete) == sorted(set(paths) - {periodic["sampler_path"]})

    # Both downloads (the cookbook's weights.download, age-encrypted in transit, and the SDK's
    # `tinker checkpoint download`) give the same trained LoRA adapter.
    assert results["cookbook_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert results["cli"]["rc"] == 0, results["cli"]["tail"]
    [cli_dir] = {Path(name).parent for name in results["cli_files"]}
    assert sorted(Path(name).name for name in results["cli_files"]) == results["cookbook_files"]
    download = workdir / "download"
    ours = load_file(download / "cookbook" / "adapter_model.safetensors")
    theirs = load_file(download / "cli" / cli_dir / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    assert results["export_runs"] == {
        "tinker_cookbook.weights.download": [],
        "tinker checkpoint download": [],
    }
    lora_b = [tensor for name, tensor in ours.items() if "lora_B" in name]
    # LoRA's B starts at zero: a nonzero B is the trained adapter, not a fresh one.
    assert lora_b and max(float(t.abs().max()) for t in lora_b) > 0
