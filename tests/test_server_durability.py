"""Crash safety: `kill -9` the server in the middle of a save loop, restart it, and check that
every acknowledged checkpoint is listed, loads, and gives the logits it was saved with. The loop
also overwrites one checkpoint ("latest") each step, so a kill can land inside an overwrite:
"latest" must then hold its last acknowledged copy, or the one being saved if that was recorded
(the deterministic versions of these windows are in test_server_crash_windows.py)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

import bios
from bios.types import AdamParams
from server_process import ServerProcess
from test_client_api import logprobs, sft_data
from test_server_forward_graph import datum_json


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


# ---- many random kills ----------------------------------------------------------------------
#
# Several runs train and save in threads against a real `bios serve` (loopback) that is
# `kill -9`ed at instants drawn from a seeded RNG and restarted on the same port and home, again
# and again. Each run's saves mix plain ones (`step-<n>`), overwrites of one name (`latest`) and
# named sampler saves (`sampler-<n>`, and `sampler-latest` overwritten). A checkpoint counts as
# acknowledged when its request's future completed; the folder's bytes are hashed then, with the
# run's fingerprint taken just before the save. After every restart: the save that was in flight
# is resolved through its request (recorded => it joins the acknowledged ones, else the name must
# hold its last acknowledged copy or not be listed), every run lists exactly its acknowledged
# checkpoints, each folder hashes as it did at acknowledgement, and each run's next request resumes
# it from its latest acknowledged training checkpoint (its fingerprint). At the end every
# acknowledged training checkpoint is loaded into a new run, which must have its fingerprint.
# Reproduce a failure with BIOS_KILL_SEED=<seed printed in the failure>.

KILL_SEED = int(os.environ.get("BIOS_KILL_SEED", "20261202"))
RESTARTED_MARK = "submit it again"  # SERVER_RESTARTED: the request was not done
RESULT_LOST_MARK = "result was not kept"  # RESULT_LOST: the request finished before the kill


class ServerGone(Exception):
    pass


def _call(method: str, url: str, **kwargs) -> httpx.Response:
    try:
        return httpx.request(method, url, timeout=30, **kwargs)
    except httpx.HTTPError as error:
        raise ServerGone(repr(error)) from error


def _wait(url: str, request_id: str, deadline_s: float = 60) -> dict:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        answer = _call("POST", f"{url}/api/v1/retrieve_future", json={"request_id": request_id})
        body = answer.json()
        if body.get("type") != "try_again":
            return body
    raise TimeoutError(f"request {request_id} did not finish")


def _ok(url: str, route: str, body: dict) -> dict:
    response = _call("POST", f"{url}/api/v1/{route}", json=body)
    assert response.status_code == 200, response.text
    answer = _wait(url, response.json()["request_id"])
    assert "error" not in answer, answer
    return answer


def _fingerprint(url: str, model_id: str) -> str:
    response = _call("GET", f"{url}/api/v1/bios/runs/{model_id}/fingerprint")
    assert response.status_code == 200, response.text
    return response.json()["fingerprint"]


def _folder_hash(folder: Path) -> str | None:
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@dataclass
class Acked:
    hash: str
    fingerprint: str  # the run's, just before the save
    order: int  # when it was recorded, among this run's saves


@dataclass
class Pending:
    kind: str
    name: str
    fingerprint: str
    request_id: str | None = None


@dataclass
class KilledRun:
    """One run, driven by one thread between kills; what it was told survives the kills."""

    home: Path
    model_id: str
    rng: random.Random
    acked: dict[tuple[str, str], Acked] = field(default_factory=dict)
    pending: Pending | None = None
    step: int = 0
    order: int = 0
    acks: int = 0  # acknowledged saves, overwrites included
    errors: list[str] = field(default_factory=list)
    saving: threading.Event = field(default_factory=threading.Event)  # a save was just sent

    def folder(self, kind: str, name: str) -> Path:
        return self.home / "runs" / self.model_id / kind / name

    def latest_weights(self) -> Acked:
        return max(
            (a for (kind, _), a in self.acked.items() if kind == "weights"), key=lambda a: a.order
        )

    def record(self, kind: str, name: str, fingerprint: str) -> None:
        folder_hash = _folder_hash(self.folder(kind, name))
        if folder_hash is None:  # checked whether or not the server was killed meanwhile
            self.errors.append(f"{self.model_id}: {kind}/{name} acknowledged, has no folder")
        self.order += 1
        self.acks += 1
        self.acked[(kind, name)] = Acked(folder_hash, fingerprint, self.order)

    def save(self, url: str, kind: str, name: str, overwrite: bool) -> None:
        fingerprint = _fingerprint(url, self.model_id)
        self.pending = Pending(kind, name, fingerprint)
        route = "save_weights" if kind == "weights" else "save_weights_for_sampler"
        body = {"model_id": self.model_id, "path": name, "overwrite": overwrite}
        self.saving.set()
        response = _call("POST", f"{url}/api/v1/{route}", json=body)
        assert response.status_code == 200, response.text
        self.pending.request_id = response.json()["request_id"]
        answer = _wait(url, self.pending.request_id)
        if "error" in answer:
            raise ServerGone(str(answer))  # checked against the kill instant by the caller
        self.record(kind, name, fingerprint)
        self.pending = None

    def train(self, url: str) -> None:
        batch = {"data": [datum_json()], "loss_fn": "cross_entropy"}
        _ok(url, "forward_backward", {"model_id": self.model_id, "forward_backward_input": batch})
        adam = {"learning_rate": 1e-2}
        _ok(url, "optim_step", {"model_id": self.model_id, "adam_params": adam})

    def loop(self, url: str, killed: threading.Event) -> None:
        try:
            while True:
                self.train(url)
                self.step += 1
                choice = self.rng.random()
                if choice < 0.35:
                    self.save(url, "weights", f"step-{self.step}", overwrite=False)
                elif choice < 0.7:
                    self.save(url, "weights", "latest", overwrite=True)
                elif choice < 0.85:
                    self.save(url, "sampler_weights", f"sampler-{self.step}", overwrite=False)
                else:
                    self.save(url, "sampler_weights", "sampler-latest", overwrite=True)
        except (ServerGone, TimeoutError, json.JSONDecodeError, AssertionError) as error:
            if not killed.is_set():  # a failure of a live server, not the kill
                self.errors.append(f"{self.model_id} step {self.step}: {error!r}")
        except Exception as error:  # reported, not swallowed
            self.errors.append(f"{self.model_id} step {self.step}: {error!r}")

    def resolve(self, url: str) -> str:
        """After a restart: was the save in flight at the kill recorded? Update what counts."""
        pending, self.pending = self.pending, None
        if pending is None:
            return "none"
        key = (pending.kind, pending.name)
        listed = _listed(url, self.model_id)
        if pending.request_id is not None:
            answer = _call(
                "POST", f"{url}/api/v1/retrieve_future", json={"request_id": pending.request_id}
            )
            error = answer.json().get("error", "") if answer.status_code == 200 else "unknown"
            if RESULT_LOST_MARK in error:
                assert key in listed, f"{key}: its request finished but it is not listed"
                self.record(*key, pending.fingerprint)
                return f"recorded {key[0]}/{key[1]}"
            assert answer.status_code == 404 or RESTARTED_MARK in error, answer.text
            return f"lost {key[0]}/{key[1]}"
        # The kill came before the request id reached us: it may still have been recorded only
        # if it is listed with bytes other than its acknowledged copy's.
        current = _folder_hash(self.folder(*key))
        if key in listed and (key not in self.acked or self.acked[key].hash != current):
            self.record(*key, pending.fingerprint)
            return f"recorded {key[0]}/{key[1]}"
        return f"lost {key[0]}/{key[1]}"


def _listed(url: str, model_id: str) -> set[tuple[str, str]]:
    response = _call("GET", f"{url}/api/v1/training_runs/{model_id}/checkpoints")
    assert response.status_code == 200, response.text
    return {tuple(c["checkpoint_id"].split("/", 1)) for c in response.json()["checkpoints"]}


def _user_listed(url: str) -> set[tuple[str, str, str]]:
    found, offset = set(), 0
    while True:
        page = _call("GET", f"{url}/api/v1/checkpoints?limit=100&offset={offset}").json()
        for c in page["checkpoints"]:
            found.add(tuple(c["tinker_path"].removeprefix("tinker://").split("/", 2)))
        offset += len(page["checkpoints"])
        if not page["checkpoints"] or offset >= page["cursor"]["total_count"]:
            return found


def _check_after_restart(url: str, runs: list[KilledRun], where: str) -> None:
    everything = _user_listed(url)
    for run in runs:
        assert _listed(url, run.model_id) == set(run.acked), where
        for (kind, name), acked in run.acked.items():
            assert (run.model_id, kind, name) in everything, f"{where}: {kind}/{name}"
            assert _folder_hash(run.folder(kind, name)) == acked.hash, f"{where}: {kind}/{name}"
        # The run's next request resumes it from its latest acknowledged training checkpoint.
        assert _fingerprint(url, run.model_id) == run.latest_weights().fingerprint, where


def _kill_loop(
    home: Path, model: str, kills: int, seed: int, window: tuple[float, float], n_runs: int = 2
) -> dict:
    rng = random.Random(seed)
    server = ServerProcess(home, [model])
    url, port = server.url, server.port
    runs = []
    for index in range(n_runs):
        session = _ok_session(url)
        body = {
            "session_id": session,
            "model_seq_id": 1,
            "base_model": model,
            "lora_config": {"rank": 4, "seed": index},
        }
        model_id = _ok(url, "create_model", body)["model_id"]
        run = KilledRun(home, model_id, random.Random(rng.random()))
        run.train(url)
        run.save(url, "weights", "latest", overwrite=True)  # something to resume from
        runs.append(run)
    started, outcomes = time.monotonic(), []
    try:
        for kill in range(kills):
            where = f"seed {seed}, kill {kill}"
            killed = threading.Event()
            threads = [threading.Thread(target=r.loop, args=(url, killed)) for r in runs]
            for thread in threads:
                thread.start()
            # The kill instant: a random time after the clients start, or (every other kill on
            # average) a short random time after a save was sent, to land inside saves.
            if rng.random() < 0.5:
                time.sleep(rng.uniform(*window))
            else:
                for run in runs:
                    run.saving.clear()
                deadline = time.monotonic() + 30
                while not any(r.saving.is_set() for r in runs) and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.3))
            killed.set()
            server.stop(hard=True)  # SIGKILL
            for thread in threads:
                thread.join(timeout=90)
                assert not thread.is_alive(), f"{where}: a client hangs after the kill"
            for run in runs:
                assert not run.errors, f"{where}: {run.errors}"
            server = ServerProcess(home, [model], port=port)
            outcomes += [run.resolve(url) for run in runs]
            _check_after_restart(url, runs, where)

        # Every acknowledged training checkpoint loads, bit for bit, into a new run.
        session = _ok_session(url)
        loaded = 0
        for run in runs:
            for (kind, name), acked in run.acked.items():
                if kind != "weights":
                    continue
                loaded += 1
                path = f"tinker://{run.model_id}/weights/{name}"
                body = {"path": path, "optimizer": True, "session_id": session}
                copy = _ok(url, "load_weights", {**body, "model_seq_id": loaded})["model_id"]
                assert _fingerprint(url, copy) == acked.fingerprint, f"seed {seed}: {path}"
                _ok(url, "unload_model", {"model_id": copy})
    finally:
        server.stop()
    return {
        "kills": kills,
        "acknowledged": sum(r.acks for r in runs),
        "acknowledged_names": sum(len(r.acked) for r in runs),
        "loaded": loaded,
        "saves_in_flight_at_kills": [o for o in outcomes if o != "none"],
        "seconds": time.monotonic() - started,
    }


def _ok_session(url: str) -> str:
    return _call("POST", f"{url}/api/v1/create_session", json={}).json()["session_id"]


def test_random_kill_9s_keep_every_acknowledged_checkpoint_short(tiny_models, tmp_path):
    summary = _kill_loop(tmp_path, tiny_models["llama"], kills=3, seed=KILL_SEED, window=(0.5, 3.0))
    print(summary)
    assert summary["acknowledged"] >= 3


@pytest.mark.slow
def test_random_kill_9s_keep_every_acknowledged_checkpoint(tiny_models, tmp_path):
    summary = _kill_loop(
        tmp_path, tiny_models["llama"], kills=20, seed=KILL_SEED, window=(0.3, 4.0)
    )
    print(summary)
    assert summary["acknowledged"] >= 20
