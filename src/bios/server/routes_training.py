"""Training routes: create_model, get_info, forward(_backward), optim_step, save/load weights.

Every compute request answers `{request_id}` and is executed in `seq_id` order per model (see
`sequencer.py`). A request that is next in line is validated at once, so a bad one is answered
with a 400 naming the field; one that arrives early is validated when its turn comes and its
error is reported through its future.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future

import zstandard
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers

from bios.checkpoints.layout import read_state
from bios.checkpoints.paths import CheckpointPath, checkpoint_folder
from bios.concurrency import then
from bios.engine.engine import check_lora_config
from bios.errors import InvalidInputError, NotFoundError
from bios.server import tinker_wire
from bios.server.auth import Tenant
from bios.server.state import ServerState, State
from bios.server.wire import (
    CreateModelBody,
    ForwardBackwardBody,
    LoadWeightsBody,
    ModelBody,
    OptimStepBody,
    SaveWeightsBody,
    WeightsInfoBody,
)
from bios.types import LoraConfig


def tinker_uri(path: str) -> str:
    """Paths go out in the SDK's `tinker://` form; Bios's client maps them back."""
    return CheckpointPath.parse(path).uri("tinker://")


def sequenced(
    state: ServerState, model_id: str, seq_id: int | None, kind: str, tenant, action
) -> dict:
    """Queue `action` (which queues the engine's work) in the run's `seq_id` order; answers the
    request id. A request that is next in line and rejected at once is a 400, not a future."""
    state.live_run(model_id, tenant)
    state.store.touch_run(model_id)
    future = state.sequencer.submit(model_id, seq_id, action)
    if future.done() and isinstance(future.exception(), InvalidInputError):
        raise future.exception()
    return {"request_id": state.submit(future, kind, model_id, tenant), "model_id": model_id}


router = APIRouter()


@router.post("/create_model")
def create_model(body: CreateModelBody, state: State, tenant: Tenant) -> dict:
    state.check_model(body.base_model)
    state.check_run_quota(tenant)
    lora = None
    if not body.full_finetune:
        lora = LoraConfig(**(body.lora_config.model_dump() if body.lora_config else {}))
        check_lora_config(lora, "lora_config.rank")

    run_id = derived_run_id(state, body.session_id, body.model_seq_id, tenant)

    def create() -> dict:
        created = state.engine.create_run(
            body.base_model,
            lora,
            run_id,
            user_metadata=body.user_metadata,
            gradient_checkpointing=body.gradient_checkpointing,
        )
        lora_row = lora.model_dump() if lora is not None else None
        state.store.add_run(
            created, tenant, body.session_id, body.base_model, lora_row, body.user_metadata
        )
        state.sequencer.start(created)
        return {"model_id": created, "type": "create_model"}

    future = state.control.submit(create)
    return {"request_id": state.submit(future, "create_model", None, tenant)}


@router.post("/get_info")
def get_info(body: ModelBody, state: State, tenant: Tenant) -> dict:
    row = state.live_run(body.model_id, tenant)
    info = state.engine.get_info(body.model_id).model_dump(mode="json")
    # The SDK loads the tokenizer client-side from this id: a hub id where there is one.
    worker = state.engine.worker(row["base_model"])
    tokenizer_id = (
        row["base_model"]
        if not row["base_model"].startswith(("/", "."))
        else str(worker.loaded.path)
    )
    info["model_data"]["tokenizer_id"] = tokenizer_id
    return info


@router.post("/unload_model")
def unload_model(body: ModelBody, state: State, tenant: Tenant) -> dict:
    state.run_row(body.model_id, tenant)

    def unload() -> dict:
        if state.engine.has_run(body.model_id):
            state.engine.drop_run(body.model_id)
        return {"model_id": body.model_id, "type": "unload_model"}

    future = state.control.submit(unload)
    return {"request_id": state.submit(future, "unload_model", body.model_id, tenant)}


def decompressed(state: ServerState, raw: bytes, headers: Headers) -> bytes:
    """The request body, unpacked if it was sent zstd-compressed (up to the body limit)."""
    if headers.get("content-encoding", "") != "zstd":
        return raw
    try:
        return zstandard.ZstdDecompressor().decompress(
            raw, max_output_size=state.config.max_body_bytes
        )
    except zstandard.ZstdError as error:
        raise InvalidInputError("body", f"not valid zstd ({error})") from None


def parse_forward_backward(
    state: ServerState, raw: bytes, headers: Headers, tenant
) -> tuple[str, int | None, Callable[[], Future]]:
    """A forward(_backward) request, protobuf (as the SDK sends it) or JSON: its run, its
    `seq_id`, and the action that queues it on the engine.

    A forward-only request keeps its autograd graph only when its JSON body says
    `"keep_graph": true` (and the server keeps graphs at all): the SDK never does.
    """
    raw = decompressed(state, raw, headers)
    keep_graph = False
    if headers.get("content-type", "").startswith(tinker_wire.PROTOBUF):
        call = tinker_wire.decode_forward_backward(raw)
        model_id, seq_id = call.model_id, call.seq_id
        data, loss_fn, config, reference = call.data, call.loss_fn, call.loss_fn_config, None
        forward_only = call.forward_only
    else:
        try:
            body = ForwardBackwardBody.model_validate(json.loads(raw or b"null"))
        except (ValueError, TypeError) as error:
            raise InvalidInputError("body", f"not a forward_backward request ({error})") from None
        payload = body.forward_backward_input or body.forward_input
        if payload is None:
            raise InvalidInputError("forward_backward_input", "missing")
        model_id, seq_id = body.model_id, body.seq_id
        data, loss_fn, config, reference = (
            payload.data,
            payload.loss_fn,
            payload.loss_fn_config,
            payload.reference,
        )
        forward_only = body.forward_only or body.forward_input is not None
        keep_graph = body.keep_graph
        if reference is not None and reference != "base":
            check_checkpoint_owner(state, reference, tenant, "reference")
    keep_graph = forward_only and keep_graph and state.config.keep_graphs

    def action() -> Future:
        return state.engine.forward_backward(
            model_id,
            data,
            loss_fn,
            config,
            backward=not forward_only,
            reference=reference,
            keep_graph=keep_graph,
        )

    return model_id, seq_id, action


def handle_forward_backward(
    state: ServerState, raw: bytes, headers: Headers, tenant, kind: str
) -> dict:
    model_id, seq_id, action = parse_forward_backward(state, raw, headers, tenant)
    return sequenced(state, model_id, seq_id, kind, tenant, action)


# Only reading the body happens on the event loop; decoding and validating a large batch runs
# in a thread, so polls and other tenants' requests are not held up meanwhile.
@router.post("/forward_backward")
async def forward_backward(request: Request, state: State, tenant: Tenant) -> dict:
    raw = await request.body()
    return await run_in_threadpool(
        handle_forward_backward, state, raw, request.headers, tenant, "forward_backward"
    )


@router.post("/forward")
async def forward(request: Request, state: State, tenant: Tenant) -> dict:
    raw = await request.body()
    return await run_in_threadpool(
        handle_forward_backward, state, raw, request.headers, tenant, "forward"
    )


@router.post("/optim_step")
def optim_step(body: OptimStepBody, state: State, tenant: Tenant) -> dict:
    return sequenced(
        state,
        body.model_id,
        body.seq_id,
        "optim_step",
        tenant,
        lambda: state.engine.optim_step(body.model_id, body.adam_params),
    )


def saved(state: ServerState, model_id: str, tenant, kind: str) -> Callable[[str], dict]:
    """What to do once a checkpoint is written: record it (with its size) and answer its path."""

    def record(path: str) -> dict:
        folder = checkpoint_folder(state.engine.home, path)
        size = sum(f.stat().st_size for f in folder.iterdir())
        parsed = CheckpointPath.parse(path)
        state.store.add_checkpoint(model_id, parsed.kind, parsed.name, tenant, size)
        key = "save_weights" if kind == "weights" else "save_weights_for_sampler"
        return {"path": tinker_uri(path), "type": key}

    return record


@router.post("/save_weights")
def save_weights(body: SaveWeightsBody, state: State, tenant: Tenant) -> dict:
    if not body.path:
        raise InvalidInputError("path", "a checkpoint name is required")
    state.check_checkpoint_quota(tenant)
    return sequenced(
        state,
        body.model_id,
        body.seq_id,
        "save_weights",
        tenant,
        lambda: then(
            state.engine.save_state(body.model_id, body.path, "weights", body.overwrite),
            saved(state, body.model_id, tenant, "weights"),
        ),
    )


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(body: SaveWeightsBody, state: State, tenant: Tenant) -> dict:
    if body.path:
        state.check_checkpoint_quota(tenant)
        action = lambda: then(  # noqa: E731
            state.engine.save_state(body.model_id, body.path, "sampler_weights", body.overwrite),
            saved(state, body.model_id, tenant, "sampler_weights"),
        )
    else:  # ephemeral: a snapshot to sample from, no file (SDK ≥ 0.3)

        def action() -> Future:
            def register(session) -> dict:
                sampler_id = state.add_sampler(session, tenant, None, body.model_id)
                return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

            return then(state.engine.snapshot_for_sampling(body.model_id), register)

    return sequenced(state, body.model_id, body.seq_id, "save_weights_for_sampler", tenant, action)


@router.post("/load_weights")
def load_weights(body: LoadWeightsBody, state: State, tenant: Tenant) -> dict:
    check_checkpoint_owner(state, body.path, tenant, "path")
    if body.model_id is None:
        return create_by_loading(state, body, tenant)
    return sequenced(
        state,
        body.model_id,
        body.seq_id,
        "load_weights",
        tenant,
        lambda: then(
            state.engine.load_state(body.model_id, body.path, body.optimizer),
            lambda path: {
                "path": tinker_uri(path),
                "model_id": body.model_id,
                "type": "load_weights",
            },
        ),
    )


def create_by_loading(state: ServerState, body: LoadWeightsBody, tenant) -> dict:
    """A new run whose first request is this load: settings come from the checkpoint."""
    run_id = derived_run_id(state, body.session_id, body.model_seq_id, tenant)
    if run_id is None:
        raise InvalidInputError("model_id", "give model_id, or session_id and model_seq_id")
    folder = checkpoint_folder(state.engine.home, body.path)
    saved_state = read_state(folder)
    if body.base_model is not None and body.base_model != saved_state.base_model:
        raise InvalidInputError(
            "base_model",
            f"{body.path} is of {saved_state.base_model!r}, not {body.base_model!r}",
        )
    state.check_model(saved_state.base_model)
    state.check_run_quota(tenant)

    def create() -> dict:
        created = state.engine.create_run_from_state(
            body.path, body.optimizer, run_id, user_metadata=body.user_metadata
        )
        state.store.add_run(
            created,
            tenant,
            body.session_id,
            saved_state.base_model,
            saved_state.lora,
            body.user_metadata,
        )
        state.sequencer.start(created)
        return {"path": tinker_uri(body.path), "model_id": created, "type": "load_weights"}

    future = state.control.submit(create)
    return {
        "request_id": state.submit(future, "load_weights", run_id, tenant),
        "model_id": run_id,
    }


@router.post("/weights_info")
def weights_info(body: WeightsInfoBody, state: State, tenant: Tenant) -> dict:
    check_checkpoint_owner(state, body.tinker_path, tenant, "tinker_path")
    folder = checkpoint_folder(state.engine.home, body.tinker_path, "tinker_path")
    saved_state = read_state(folder, "tinker_path")
    lora = saved_state.lora
    info = {"base_model": saved_state.base_model, "is_lora": lora is not None}
    if lora is not None:
        info.update(
            lora_rank=lora["rank"],
            train_unembed=lora["train_unembed"],
            train_mlp=lora["train_mlp"],
            train_attn=lora["train_attn"],
        )
    return info


def derived_run_id(state: ServerState, session_id, model_seq_id, tenant) -> str | None:
    """Tinker's id for the `model_seq_id`-th model of a session: `<session_id>:train:<n>`.

    SDK ≥ 0.38 derives it on its side for a model created by `load_weights`, so the server must
    use the same rule. Without a session (Bios's own client) the engine picks the id.
    """
    if session_id is None or model_seq_id is None:
        return None
    row = state.store.session(session_id)
    if row is None or row["tenant"] != tenant:
        raise NotFoundError(f"session_id: no session {session_id!r}")
    return f"{session_id}:train:{model_seq_id}"


def check_checkpoint_owner(state: ServerState, path: str, tenant, field: str) -> CheckpointPath:
    """The parsed path, if the checkpoint exists and belongs to `tenant` (else not found)."""
    parsed = CheckpointPath.parse(path, field)
    row = state.store.checkpoint(parsed.run_id, parsed.kind, parsed.name)
    if row is None or row["tenant"] != tenant:
        raise NotFoundError(f"{field}: no checkpoint at {path}")
    return parsed
