"""Sessions through the official SDK 0.38 against a real `bios serve` (with API keys): how a
`with ServiceClient(...)` block ends is recorded (first reason wins) and the session is terminal
afterwards; listing, getting and searching sessions; `/auth/apikey/me`; server capabilities;
image and audio model inputs refused by name."""

from __future__ import annotations

import os
import sqlite3
import time

import httpx
import pytest
import tinker
from tinker import types

from server_process import ServerProcess
from test_server_security import create_key

os.environ.setdefault("TINKER_TELEMETRY", "0")


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("sessions")
    keys = {tenant: create_key(home, tenant) for tenant in ("alice", "bob")}
    process = ServerProcess(home, [tiny_models["llama"]], extra_args=["--auth"])
    process.keys = keys
    yield process
    process.stop()


def service(server, tenant="alice", **kwargs) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server.url, api_key=server.keys[tenant], **kwargs)


def rest(server, tenant="alice") -> tinker.RestClient:
    return tinker.RestClient(base_url=server.url, api_key=server.keys[tenant])


def call(server, method, route, tenant="alice", **kwargs) -> httpx.Response:
    headers = {"X-API-Key": server.keys[tenant]} if tenant else {}
    return httpx.request(
        method, f"{server.url}/api/v1/{route}", headers=headers, timeout=60, **kwargs
    )


def datum(tokens=(5, 9, 14, 3)) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(list(tokens[:-1])),
        loss_fn_inputs={"target_tokens": list(tokens[1:]), "weights": [1.0] * (len(tokens) - 1)},
    )


def session_row(server, session_id: str) -> dict:
    with sqlite3.connect(server.home / "bios.sqlite3") as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    return dict(row)


def test_a_with_block_finishes_its_session_and_the_session_is_terminal(server, tiny_models):
    before = time.time()
    with service(server, display_name="nightly sft run", user_metadata={"team": "a"}) as client:
        training = client.create_lora_training_client(tiny_models["llama"], rank=4, seed=0).result()
        training.forward_backward([datum()], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        session_id = client.holder.get_session_id()
        model_id = training.model_id
    row = session_row(server, session_id)
    assert (row["finish_reason"], row["finish_detail"]) == ("success", None)
    assert before <= row["finished"] <= time.time()

    got = rest(server).get_session(session_id).result()
    assert got.training_run_ids == [model_id]
    assert got.display_name == "nightly sft run" and got.user_metadata == {"team": "a"}
    raw = call(server, "GET", f"sessions/{session_id}").json()  # Bios's additions
    finished = {"type": "client_finished", "reason": {"type": "success"}, "detail": None}
    assert raw["status"] == finished and raw["finished_at"] is not None
    assert call(server, "GET", f"training_runs/{model_id}").json()["session_id"] == session_id

    # Terminal: its heartbeat, a new run in it and a request to its run get 410 (the SDK's
    # heartbeat loop stops on a 410); finishing again keeps the first reason.
    beat = call(server, "POST", "session_heartbeat", json={"session_id": session_id})
    assert beat.status_code == 410 and "finished (success)" in beat.json()["error"]
    create = call(
        server,
        "POST",
        "create_model",
        json={"session_id": session_id, "model_seq_id": 5, "base_model": tiny_models["llama"]},
    )
    assert create.status_code == 410
    step = call(
        server,
        "POST",
        "optim_step",
        json={"model_id": model_id, "adam_params": {"learning_rate": 0.1}},
    )
    assert step.status_code == 410 and session_id in step.json()["error"]
    again = call(
        server,
        "POST",
        f"sessions/{session_id}/finish",
        json={"reason": {"type": "errored"}, "detail": "late"},
    )
    assert again.status_code == 200
    assert session_row(server, session_id)["finish_reason"] == "success"


def test_an_error_in_the_block_is_recorded_as_errored_and_not_masked(server, tiny_models):
    with pytest.raises(ZeroDivisionError):
        with service(server) as client:
            client.create_lora_training_client(tiny_models["llama"], rank=4, seed=0).result()
            session_id = client.holder.get_session_id()
            1 / 0  # noqa: B018
    assert session_row(server, session_id)["finish_reason"] == "errored"

    with pytest.raises(KeyboardInterrupt):
        with service(server) as client:
            client.create_lora_training_client(tiny_models["llama"], rank=4, seed=0).result()
            interrupted = client.holder.get_session_id()
            raise KeyboardInterrupt
    assert session_row(server, interrupted)["finish_reason"] == "interrupted"

    client = service(server)
    client.create_lora_training_client(tiny_models["llama"], rank=4, seed=0).result()
    explicit = client.holder.get_session_id()
    client.close("errored", detail="loss diverged at step 12").result()
    row = session_row(server, explicit)
    assert (row["finish_reason"], row["finish_detail"]) == ("errored", "loss diverged at step 12")


def test_finish_bodies_are_checked(server):
    session_id = call(server, "POST", "create_session", json={"tags": []}).json()["session_id"]
    bad_reason = call(
        server, "POST", f"sessions/{session_id}/finish", json={"reason": {"type": "done"}}
    )
    assert bad_reason.status_code == 422 and "reason" in bad_reason.json()["error"]
    unknown = call(
        server,
        "POST",
        f"sessions/{session_id}/finish",
        json={"reason": {"type": "success"}, "extra": 1},
    )
    assert unknown.status_code == 400 and "extra" in unknown.json()["error"]
    others = call(
        server, "POST", f"sessions/{session_id}/finish", "bob", json={"reason": {"type": "success"}}
    )
    assert others.status_code == 404
    assert session_row(server, session_id)["finished"] is None  # nothing changed


def test_sessions_are_listed_got_and_searched_per_tenant(server):
    ids = []
    for index in range(3):
        body = {"tags": [], "display_name": f"sweep lr {index}", "user_metadata": {"i": str(index)}}
        ids.append(call(server, "POST", "create_session", json=body).json()["session_id"])
    bob = call(server, "POST", "create_session", "bob", json={"tags": []}).json()["session_id"]
    call(server, "POST", f"sessions/{ids[0]}/finish", json={"reason": {"type": "interrupted"}})

    listed = rest(server).list_sessions(limit=3).result().sessions
    assert listed == ids[::-1]  # newest first
    assert bob not in rest(server).list_sessions(limit=100).result().sessions
    assert bob in rest(server, "bob").list_sessions(limit=100).result().sessions
    with pytest.raises(tinker.NotFoundError):
        rest(server).get_session(bob).result()

    search = rest(server).search_sessions
    page = search(types.SessionSearchRequest(display_name="SWEEP lr", limit=2)).result()
    assert [s.session_id for s in page.sessions] == [ids[2], ids[1]]
    assert page.next_cursor is not None
    rest_page = search(
        types.SessionSearchRequest(display_name="sweep", limit=2, cursor=page.next_cursor)
    ).result()
    assert [s.session_id for s in rest_page.sessions] == [ids[0]]
    assert rest_page.next_cursor is None
    finished = search(
        types.SessionSearchRequest(
            display_name="sweep",
            statuses=[types.ClientFinishedSessionStatusQuery(reasons=["interrupted"])],
        )
    ).result()
    assert [s.session_id for s in finished.sessions] == [ids[0]]
    summary = finished.sessions[0]
    assert summary.owner == "alice" and summary.project_id == "default"
    assert summary.status.reason.type == "interrupted"
    by_metadata = search(types.SessionSearchRequest(user_metadata={"i": "1"})).result()
    assert [s.session_id for s in by_metadata.sessions] == [ids[1]]
    with pytest.raises(tinker.BadRequestError, match="owner_urns"):
        search(types.SessionSearchRequest(owner=types.UserSearchOwner(owner_urns=["bob"]))).result()


def test_api_key_me_and_capabilities(server, tiny_models):
    me = call(server, "GET", "auth/apikey/me")
    assert me.status_code == 200
    body = me.json()
    assert body["details"]["user_details"]["email"] == "alice"
    assert server.keys["alice"].startswith(body["name"])
    assert call(server, "GET", "auth/apikey/me", tenant=None).status_code == 401

    capabilities = rest(server).get_server_capabilities().result()
    (model,) = capabilities.supported_models
    assert model.model_name == tiny_models["llama"]
    assert model.trainable is True and model.sampleable is True


def test_logout_revokes_only_the_presented_key(server, tmp_path):
    key = create_key(server.home, "carol")
    assert (
        httpx.get(
            f"{server.url}/api/v1/auth/apikey/me", headers={"X-API-Key": key}, timeout=30
        ).status_code
        == 200
    )
    deleted = httpx.delete(
        f"{server.url}/api/v1/auth/apikey/me", headers={"X-API-Key": key}, timeout=30
    )
    assert deleted.status_code == 200
    after = httpx.post(
        f"{server.url}/api/v1/create_session", headers={"X-API-Key": key}, json={}, timeout=30
    )
    assert after.status_code == 401
    assert call(server, "GET", "auth/apikey/me").status_code == 200  # alice's key still works


@pytest.mark.parametrize(
    "chunk, name",
    [
        (types.ImageChunk(data=b"\x89PNG....", format="png", expected_tokens=4), "ImageChunk"),
        (
            types.ImageAssetPointerChunk(location="s3://x/y.png", format="png", expected_tokens=4),
            "ImageAssetPointerChunk",
        ),
    ],
)
def test_image_inputs_are_refused_by_name(server, tiny_models, chunk, name):
    client = service(server)
    sampler = client.create_sampling_client(base_model=tiny_models["llama"])
    prompt = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[5, 6]), chunk])
    with pytest.raises(tinker.BadRequestError, match=name):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result()
    if name == "ImageChunk":  # the SDK sends forward_backward as protobuf
        training = client.create_lora_training_client(tiny_models["llama"], rank=4, seed=0).result()
        bad = types.Datum(
            model_input=prompt,
            loss_fn_inputs={"target_tokens": [1] * 6, "weights": [1.0] * 6},
        )
        with pytest.raises(tinker.BadRequestError, match=name):
            training.forward_backward([bad], "cross_entropy").result()
    client.close("success").result()
