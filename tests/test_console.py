"""The web console of `bios serve` (`/console`) and of `bios console` (run folders).

A real server process with API keys: alice trains a LoRA run with Bios's own HTTP client and
bob one of his own. Plain httpx requests check the security rules (no key: the login form;
bob's run: 404; a POST without the CSRF token, or from another origin: 403; metadata holding
`<script>` comes back escaped; the key never in a URL nor in the server's log). The recorded
curves are checked against the values the client itself got back (loss:sum / Σ weights, the
optim step's grad norm) and survive a restart. A real headless Chromium (Debian's `chromium`,
driven by playwright) logs in, sees alice's runs only, watches a new point arrive while a client
trains, downloads and deletes a checkpoint, samples in the playground (the logprobs shown equal
Bios's own sample for the same seed), and renders a run of 10,000 recorded steps in under 1 s.
Each page's screenshot is written under the test's folder (and to $BIOS_SCREENSHOTS_DIR when
set: docs/console/ holds the README's).
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer

import bios
from bios.checkpoints.paths import CheckpointPath
from bios.server import run_metrics
from bios.server.store import Store
from bios.types import AdamParams, ModelInput, SamplingParams
from helpers import random_datum
from server_process import ServerProcess
from test_server_security import create_key

CHROMIUM = "/usr/bin/chromium"
SCRIPT = "<script>alert('pwned')</script>"


def sft_batch(seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [random_datum(384, 6 + i, "cross_entropy", generator) for i in range(2)]


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("console")
    keys = {tenant: create_key(home, tenant) for tenant in ("alice", "bob")}
    model = tiny_models["llama"]
    server = ServerProcess(home, [model], extra_args=["--auth"])
    alice = bios.ServiceClient(base_url=server.url, api_key=keys["alice"])
    run = alice.create_lora_training_client(model, rank=4, seed=0, user_metadata={"name": SCRIPT})
    steps = []
    for step in range(2):
        data = sft_batch(step)
        out = run.forward_backward(data, "cross_entropy").result()
        optim = run.optim_step(AdamParams(learning_rate=1e-2)).result()
        weights = sum(float(sum(d.loss_fn_inputs["weights"].data)) for d in data)
        steps.append({"fb": out.metrics, "optim": optim.metrics, "weights": weights})
    sampler_path = run.save_weights_for_sampler("v1").result().path
    state_path = run.save_state("t1").result().path
    bob = bios.ServiceClient(base_url=server.url, api_key=keys["bob"])
    bob_run = bob.create_lora_training_client(model, rank=2, seed=1)
    bob_run.forward_backward(sft_batch(9), "cross_entropy").result()
    bob_run.optim_step(AdamParams(learning_rate=1e-2)).result()
    info = {
        "home": home,
        "server": server,
        "keys": keys,
        "model": model,
        "alice": alice,
        "run": run,
        "steps": steps,
        "sampler_path": sampler_path,
        "state_path": state_path,
        "bob_run": bob_run.model_id,
    }
    yield info
    info["server"].stop()


def console(served) -> httpx.Client:
    return httpx.Client(base_url=served["server"].url + "/console", follow_redirects=False)


def logged_in(served, tenant: str = "alice") -> httpx.Client:
    client = console(served)
    form = client.get("/login")
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', form.text).group(1)
    answer = client.post("/login", data={"key": served["keys"][tenant], "csrf_token": token})
    assert answer.status_code == 303, answer.text
    return client


def csrf_of(html: str) -> str:
    return re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', html).group(1)


def curves(client: httpx.Client, run_id: str) -> dict:
    answer = client.get(f"/api/runs/{run_id}/curves")
    assert answer.status_code == 200, answer.text
    return answer.json()["columns"]


# ---- httpx: the rules ---------------------------------------------------------------------


def test_without_a_key_every_page_sends_to_the_login_form(served):
    client = console(served)
    for path in ("/", f"/runs/{served['run'].model_id}", "/playground"):
        answer = client.get(path)
        assert answer.status_code == 303 and answer.headers["location"] == "/console/login"
    assert client.get(f"/api/runs/{served['run'].model_id}/curves").status_code == 401
    wrong = client.post(
        "/login",
        data={"key": "tml-bios-not-a-key", "csrf_token": csrf_of(client.get("/login").text)},
    )
    assert wrong.status_code == 401 and "unknown or revoked" in wrong.text
    assert "set-cookie" not in wrong.headers


def test_login_keeps_the_key_in_a_strict_http_only_cookie(served):
    client = console(served)
    token = csrf_of(client.get("/login").text)
    answer = client.post("/login", data={"key": served["keys"]["alice"], "csrf_token": token})
    assert answer.status_code == 303 and served["keys"]["alice"] not in answer.headers["location"]
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    # A login form posted without its token (another site's form) is refused.
    refused = console(served).post("/login", data={"key": served["keys"]["alice"]})
    assert refused.status_code == 403 and "set-cookie" not in refused.headers


def test_a_tenant_sees_its_own_runs_and_another_tenants_run_is_a_404(served):
    alice, bob_run = logged_in(served), served["bob_run"]
    page = alice.get("/").text
    assert served["run"].model_id in page and bob_run not in page
    assert alice.get(f"/runs/{bob_run}").status_code == 404
    assert alice.get(f"/api/runs/{bob_run}/curves").status_code == 404
    assert alice.get(f"/runs/{bob_run}/checkpoints/weights/t1/download").status_code == 404
    bob = logged_in(served, "bob")
    assert bob_run in bob.get("/").text and served["run"].model_id not in bob.get("/").text
    assert bob.get(f"/runs/{served['run'].model_id}").status_code == 404


def test_metadata_is_escaped(served):
    page = logged_in(served).get(f"/runs/{served['run'].model_id}")
    assert page.status_code == 200
    assert SCRIPT not in page.text
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_state_changing_requests_need_the_csrf_token_and_the_same_origin(served):
    client, run_id = logged_in(served), served["run"].model_id
    token = csrf_of(client.get(f"/runs/{run_id}").text)
    delete = f"/runs/{run_id}/checkpoints/weights/t1/delete"
    assert client.post(delete).status_code == 403
    assert client.post(delete, data={"csrf_token": "0" * 64}).status_code == 403
    foreign = {"Origin": "https://evil.example"}
    assert client.post(delete, data={"csrf_token": token}, headers=foreign).status_code == 403
    # bob's token is not alice's
    bob_token = csrf_of(logged_in(served, "bob").get("/").text)
    assert client.post(delete, data={"csrf_token": bob_token}).status_code == 403
    sample = {"model": served["model"], "prompt": "hi", "mode": "raw", "max_tokens": 2}
    assert client.post("/api/playground/sample", json=sample).status_code == 403
    assert client.post("/logout").status_code == 403
    listed = client.get(f"/runs/{run_id}").text
    assert "weights/t1" in listed  # nothing was deleted


def test_bad_playground_input_is_a_400_naming_the_field(served):
    client = logged_in(served)
    token = csrf_of(client.get("/playground").text)
    headers = {"X-CSRF-Token": token}
    body = {"model": served["model"], "prompt": "hi", "top_p": 0}
    answer = client.post("/api/playground/sample", json=body, headers=headers)
    assert answer.status_code == 400 and answer.json()["field"] == "top_p"
    body = {"model": served["model"], "prompt": "hi", "beam_width": 4}
    answer = client.post("/api/playground/sample", json=body, headers=headers)
    assert answer.status_code == 400 and answer.json()["field"] == "beam_width"


def test_recorded_curves_are_the_clients_own_numbers(served):
    columns = curves(logged_in(served), served["run"].model_id)
    assert columns["step"] == [1.0, 2.0]
    for index, step in enumerate(served["steps"]):
        want_loss = step["fb"]["loss:sum"] / step["weights"]
        assert columns["loss"][index] == pytest.approx(want_loss, rel=1e-9)
        assert columns["loss:sum"][index] == pytest.approx(step["fb"]["loss:sum"], rel=1e-9)
        assert columns["grad_norm"][index] == pytest.approx(step["optim"]["grad_norm"], rel=1e-9)
        assert columns["learning_rate"][index] == pytest.approx(1e-2)
        tokens = sum(d.model_input.length for d in sft_batch(index))
        assert columns["tokens"][index] == tokens
        assert columns["tokens_per_s"][index] > 0


def test_the_official_sdks_steps_are_recorded_with_their_objective_metrics(served):
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    import tinker
    from tinker import types

    from sdk_scenario import make_data

    sdk = tinker.ServiceClient(base_url=served["server"].url, api_key=served["keys"]["alice"])
    training = sdk.create_lora_training_client(base_model=served["model"], rank=2)
    training = training.result() if hasattr(training, "result") else training  # SDK 0.38: a future
    data = make_data(types, 384, "ppo", seed=3)  # protobuf on the wire
    out = training.forward_backward(data, "ppo").result()
    optim = training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    columns = curves(logged_in(served), training.model_id)
    targets = sum(len(d.loss_fn_inputs["target_tokens"].data) for d in data)
    assert columns["step"] == [1.0]
    assert columns["loss"] == [pytest.approx(out.metrics["loss:sum"] / targets, rel=1e-9)]
    assert columns["clip_fraction:mean"] == [pytest.approx(out.metrics["clip_fraction:mean"])]
    assert columns["grad_norm"] == [pytest.approx(optim.metrics["grad_norm"], rel=1e-9)]


def test_step_points_and_downsampling_by_hand():
    rows = [  # (kind, time, seconds, tokens, weighted tokens, metrics)
        ("forward_backward", 1.0, 0.5, 10, 4.0, {"loss:sum": 8.0, "kl:mean": 0.2}),
        ("forward_backward", 2.0, 0.5, 30, 12.0, {"loss:sum": 4.0, "kl:mean": 0.4}),
        ("optim_step", 3.0, 1.0, 0, 0.0, {"grad_norm": 2.5, "learning_rate": 0.1}),
        ("forward_backward", 4.0, 1.0, 5, 5.0, {"loss:sum": 1.0}),
    ]
    (point,) = run_metrics.step_points(rows)  # the last forward_backward has no step yet
    assert point["loss"] == 12.0 / 16.0 and point["loss:sum"] == 12.0
    assert point["kl:mean"] == pytest.approx(0.3) and point["tokens"] == 40
    assert point["tokens_per_s"] == 40 / 2.0 and point["grad_norm"] == 2.5
    columns = {"step": [1, 2, 3, 4, 5], "loss": [1.0, 3.0, None, 5.0, 7.0]}
    assert run_metrics.downsample(columns, 2) == {"step": [3, 5], "loss": [2.0, 6.0]}
    assert run_metrics.downsample(columns, 5) is columns


# ---- the browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def screenshot(page, shots: Path, name: str) -> None:
    file = shots / f"{name}.png"
    page.screenshot(path=str(file), full_page=True)
    assert file.stat().st_size > 5000
    copy_to = os.environ.get("BIOS_SCREENSHOTS_DIR")
    if copy_to:
        Path(copy_to).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, Path(copy_to) / file.name)


@pytest.fixture
def page(browser, served, shots):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    page.goto(served["server"].url + "/console/")
    assert page.url.endswith("/console/login")
    screenshot(page, shots, "login")
    page.fill("#key", served["keys"]["alice"])
    page.click("#login")
    page.wait_for_url("**/console/")
    yield page
    context.close()


def test_browser_runs_page_lists_the_tenants_runs_only(page, served, shots):
    ids = page.locator("tr.run").evaluate_all("rows => rows.map(r => r.dataset.runId)")
    assert served["run"].model_id in ids and served["bob_run"] not in ids
    assert page.locator(".tenant").inner_text() == "alice"
    # The metadata is shown as text, not run.
    assert SCRIPT in page.locator(".meta").first.inner_text()
    screenshot(page, shots, "runs")


def test_browser_run_page_shows_a_new_point_while_a_client_trains(page, served, shots):
    alice = served["alice"]
    run = alice.create_lora_training_client(served["model"], rank=4, seed=3)
    run.forward_backward(sft_batch(20), "cross_entropy").result()
    run.optim_step(AdamParams(learning_rate=1e-2)).result()
    page.goto(f"{served['server'].url}/console/runs/{run.model_id}")
    page.wait_for_selector("#charts[data-points='1']")
    assert page.locator(".chart").count() >= 4  # loss, grad norm, learning rate, tokens/s
    stop = threading.Event()

    def train() -> None:
        step = 21
        while not stop.is_set() and step < 40:
            run.forward_backward(sft_batch(step), "cross_entropy").result()
            run.optim_step(AdamParams(learning_rate=1e-2)).result()
            step += 1
            time.sleep(0.5)

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        # Polled from here: the page's CSP (no eval) rules out wait_for_function.
        deadline = time.monotonic() + 30
        while int(page.locator("#charts").get_attribute("data-points")) < 3:
            assert time.monotonic() < deadline, "no new point arrived"
            page.wait_for_timeout(200)
    finally:
        stop.set()
        trainer.join()
    metrics = page.locator(".chart").evaluate_all("els => els.map(e => e.dataset.metric)")
    assert metrics[:4] == ["loss", "grad_norm", "learning_rate", "tokens_per_s"]
    screenshot(page, shots, "run")


def test_browser_downloads_and_deletes_a_checkpoint(page, served):
    run_id = served["run"].model_id
    page.goto(f"{served['server'].url}/console/runs/{run_id}")
    row = page.locator("tr.checkpoint[data-name='weights/t1']")
    with page.expect_download() as caught:
        row.locator("a.download").click()
    archive = caught.value.path()
    folder = CheckpointPath.parse(served["state_path"]).folder(served["home"])
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
        assert names == sorted(p.name for p in folder.iterdir())
        for name in names:
            assert tar.extractfile(name).read() == (folder / name).read_bytes()
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button.delete").click()
    page.wait_for_selector("tr.checkpoint[data-name='weights/t1']", state="detached")
    assert not folder.exists()
    api = httpx.get(
        f"{served['server'].url}/api/v1/training_runs/{run_id}/checkpoints",
        headers={"X-API-Key": served["keys"]["alice"]},
    ).json()
    assert [c["checkpoint_id"] for c in api["checkpoints"]] == ["sampler_weights/v1"]


def test_browser_playground_samples_with_the_samplers_logprobs(page, served, shots):
    path = served["sampler_path"].replace("bios://", "tinker://")
    page.goto(f"{served['server'].url}/console/playground")
    page.select_option("#model", path)
    page.check("input[name='mode'][value='raw']")
    page.fill("#prompt", "The quick brown fox")
    page.fill("#temperature", "0.9")
    page.fill("#max_tokens", "12")
    page.fill("#seed", "7")
    page.click("#sample")
    page.wait_for_selector("#output[data-tokens]")
    shown = page.locator("#output .tok").evaluate_all(
        "spans => spans.map(s => [s.textContent, Number(s.dataset.logprob)])"
    )
    tokenizer = AutoTokenizer.from_pretrained(served["model"])
    sampler = served["alice"].create_sampling_client(model_path=served["sampler_path"])
    want = (
        sampler.sample(
            ModelInput.from_ints(tokenizer.encode("The quick brown fox")),
            1,
            SamplingParams(max_tokens=12, temperature=0.9, top_p=1.0, seed=7),
        )
        .result()
        .sequences[0]
    )
    assert [lp for _, lp in shown] == pytest.approx(list(want.logprobs), abs=0)
    assert "".join(text for text, _ in shown) == tokenizer.decode(want.tokens)
    colours = page.locator("#output .tok").evaluate_all("s => s.map(e => e.style.background)")
    assert all(c.startswith("rgb") for c in colours)
    screenshot(page, shots, "playground")


def test_browser_renders_ten_thousand_steps_in_under_a_second(page, served):
    run_id = "seeded-10k"
    store = Store(served["home"] / "bios.sqlite3")
    store.add_run(run_id, "alice", None, served["model"], {"rank": 8}, {"name": "long run"})
    store.close()
    log = run_metrics.MetricsLog(served["home"] / "bios.sqlite3")
    now = time.time() - 10_000
    for step in range(10_000):
        loss = 2.0 * math.exp(-step / 3000) + 0.1
        fb = {"loss:sum": loss * 100.0, "clip_fraction:mean": 0.1}
        log.record(run_id, "forward_backward", now + step, 0.05, 200, 100.0, fb)
        optim = {"grad_norm": 1.0 + step % 7, "learning_rate": 1e-4}
        log.record(run_id, "optim_step", now + step + 0.5, 0.01, 0, 0.0, optim)
    log.flush()
    log.close()
    started = time.perf_counter()
    page.goto(f"{served['server'].url}/console/runs/{run_id}")
    page.wait_for_selector("body[data-curves-drawn='true']")
    elapsed = time.perf_counter() - started
    assert page.locator("#charts").get_attribute("data-points") == "10000"
    assert page.locator("#charts").get_attribute("data-last-step") == "10000"
    assert page.locator(".chart[data-metric='clip_fraction:mean']").count() == 1
    print(f"10,000-step run page rendered in {elapsed:.3f} s")
    assert elapsed < 1.0


# ---- durability (last: it restarts the server) ----------------------------------------------


def test_curves_survive_a_restart_and_the_key_is_never_logged(served):
    before = curves(logged_in(served), served["run"].model_id)
    served["server"].stop()
    served["server"] = ServerProcess(served["home"], [served["model"]], extra_args=["--auth"])
    client = logged_in(served)
    assert curves(client, served["run"].model_id) == before
    runs_page = client.get("/").text
    assert "crashed" in runs_page or "restored" in runs_page  # runs from before the restart
    log = (served["home"] / "server.log").read_text()
    assert all(key not in log for key in served["keys"].values())


def test_the_console_archive_is_a_valid_tar(tmp_path):
    from bios.server.console.archive import tar_chunks

    (tmp_path / "a.bin").write_bytes(os.urandom(1500))
    (tmp_path / "b.json").write_text("{}")
    data = b"".join(tar_chunks(tmp_path))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["a.bin", "b.json"]
        assert tar.extractfile("a.bin").read() == (tmp_path / "a.bin").read_bytes()


# ---- `bios console`: run folders, read-only ------------------------------------------------


def test_bios_console_shows_run_folders_read_only(tmp_path):
    import json

    from fastapi.testclient import TestClient

    from bios.commands.console import create_app

    home, runs = tmp_path / "home", tmp_path / "runs"
    folder = runs / "sft-a"
    folder.mkdir(parents=True)
    config = {"recipe": "sft", "model": "tiny", "rank": 8, "data": "d.jsonl"}
    (folder / "config.json").write_text(json.dumps(config))
    records = [
        {"step": 0, "eval_loss": 3.5},
        {"step": 1, "train_loss": 3.0, "learning_rate": 0.01, "tokens": 100, "tokens_per_s": 50.0},
        {"step": 2, "train_loss": 2.5, "learning_rate": 0.01, "tokens": 120, "tokens_per_s": 60.0},
        {"step": 2, "eval_loss": 2.75},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    checkpoint = home / "runs" / "r1" / "weights" / "step-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter.safetensors").write_bytes(os.urandom(3000))
    line = {"step": 2, "path": "bios://r1/weights/step-2", "final": True}
    (folder / "checkpoints.jsonl").write_text(json.dumps(line) + "\n")
    client = TestClient(create_app(runs, home), follow_redirects=False)
    assert client.get("/").headers["location"] == "/console/"
    page = client.get("/console/").text
    assert "sft-a" in page and "LoRA rank 8" in page and "finished" in page
    assert ">220<" in page  # tokens: 100 + 120
    columns = client.get("/console/api/runs/sft-a/curves").json()["columns"]
    assert columns["step"] == [0.0, 1.0, 2.0]
    assert columns["eval_loss"] == [3.5, None, 2.75]  # one point per step, eval merged in
    assert columns["train_loss"] == [None, 3.0, 2.5]
    tar = client.get("/console/runs/sft-a/checkpoints/weights/step-2/download")
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        member = archive.extractfile("adapter.safetensors").read()
    assert member == (checkpoint / "adapter.safetensors").read_bytes()
    run_page = client.get("/console/runs/sft-a").text
    assert "Delete" not in run_page and "Playground" not in run_page
    token = csrf_of(run_page)
    delete = "/console/runs/sft-a/checkpoints/weights/step-2/delete"
    assert client.post(delete, data={"csrf_token": token}).status_code == 404
    assert checkpoint.exists()
    assert client.get("/console/playground").status_code == 404
    assert client.get("/console/runs/..%2Fetc").status_code == 404
    assert client.get("/console/runs/missing").status_code == 404
