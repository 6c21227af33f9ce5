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
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers

from bios.checkpoints.layout import read_state
from bios.checkpoints.paths import CheckpointPath, checkpoint_folder
from bios.concurrency import then
from bios.engine.engine import check_lora_config
from bios.errors import InvalidInputError
from bios.fsutil import remove_previous
from bios.server import run_metrics, tinker_wire
from bios.server.auth import Tenant
from bios.server.futures import new_request_id
from bios.server.lifetimes import check_ttl
from bios.server.state import ServerState, State
from bios.server.wire import (
    CreateModelBody,
    ForwardBackwardBody,
    LoadWeightsBody,
    ModelBody,
    OptimStepBody,
    SaveWeightsBody,
    WeightsInfoBody,
    invalid_input,
    too_large,
)
from bios.types import LoraConfig


def tinker_uri(path: str) -> str:
    """Paths go out in the SDK's `tinker://` form; Bios's client maps them back."""
    return CheckpointPath.parse(path).uri("tinker://")


def sequenced(
    state: ServerState,
    model_id: str,
    seq_id: int | None,
    kind: str,
    tenant,
    action,
    request_id: str | None = None,
    on_done: Callable[[], None] | None = None,
) -> dict:
    """Queue `action` (which queues the engine's work) in the run's `seq_id` order; answers the
    request id (`request_id` if the caller chose it). A request that is next in line and
    rejected at once is a 400, not a future. `on_done` runs once the request is over, however
    it ends (a save's quota reservation is released by it)."""
    try:
        state.live_run(model_id, tenant)
        state.store.touch_run(model_id)
        future = state.sequencer.submit(model_id, seq_id, action)
    except BaseException:
        if on_done is not None:
            on_done()
        raise
    if on_done is not None:
        future.add_done_callback(lambda _: on_done())
    if future.done() and isinstance(future.exception(), InvalidInputError):
        raise future.exception()
    request_id = state.submit(future, kind, model_id, tenant, request_id)
    return {"request_id": request_id, "model_id": model_id}


router = APIRouter()


@router.post("/create_model")
def create_model(body: CreateModelBody, state: State, tenant: Tenant) -> dict:
    state.check_model(body.base_model)
    state.check_run_quota(tenant)
    lora = None
    if not body.full_finetune:
        lora = LoraConfig(**(body.lora_config.model_dump() if body.lora_config else {}))
        check_lora_config(lora, "lora_config.rank")
        check_server_lora_config(state, lora)

    run_id = derived_run_id(state, body.session_id, body.model_seq_id, tenant)

    def create() -> dict:
        check_run_id_free(state, run_id)
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
        state.samplers.free_run_snapshots(
            body.model_id
        )  # no client can reach that run's weights now
        return {"model_id": body.model_id, "type": "unload_model"}

    future = state.control.submit(unload)
    return {"request_id": state.submit(future, "unload_model", body.model_id, tenant)}


# What `torch.Generator.manual_seed` takes.
SEED_RANGE = (-(2**63), 2**64)


def check_server_lora_config(state: ServerState, lora: LoraConfig) -> None:
    """The server's bounds on a new adapter, checked before `create_model` answers."""
    limit = state.config.max_lora_rank
    if lora.rank > limit:
        raise InvalidInputError(
            "lora_config.rank", f"{lora.rank:,} is over the limit of {limit:,} (--max-lora-rank)"
        )
    low, high = SEED_RANGE
    if lora.seed is not None and not low <= lora.seed < high:
        raise InvalidInputError(
            "lora_config.seed", f"{lora.seed} is outside [-2**63, 2**64), the range of a seed"
        )
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        raise InvalidInputError(
            "lora_config",
            "train_attn, train_mlp and train_unembed are all false: no layer would be trained",
        )


def decompressed(state: ServerState, raw: bytes, headers: Headers) -> bytes:
    """The request body, unpacked if it was sent zstd-compressed: streamed, counting the bytes
    unpacked, so no more than the body limit is ever held, whatever the frame header claims."""
    if headers.get("content-encoding", "") != "zstd":
        return raw
    limit = state.config.max_body_bytes
    try:
        claimed = zstandard.frame_content_size(raw)  # -1: not declared
    except zstandard.ZstdError as error:
        raise InvalidInputError("body", f"not valid zstd ({error})") from None
    if claimed > limit:
        raise too_large(f"body: the zstd frame declares {claimed:,} bytes unpacked, which", limit)
    chunks, size = [], 0
    # The window a frame asks for is memory too: no more than the body could need (and at least
    # the 8 MiB that compressors use at any level when they are not told the size).
    window = max(2**23, 1 << (limit - 1).bit_length())
    decompressor = zstandard.ZstdDecompressor(max_window_size=min(window, 2**31))
    try:
        with decompressor.stream_reader(raw, read_across_frames=True) as reader:
            while chunk := reader.read(min(2**20, limit + 1 - size)):
                size += len(chunk)
                if size > limit:
                    raise too_large("body: unpacked, the zstd body", limit)
                chunks.append(chunk)
    except zstandard.ZstdError as error:
        if "too much memory" in str(error):
            raise too_large("body: the zstd frame's window", window) from None
        raise InvalidInputError("body", f"not valid zstd ({error})") from None
    return b"".join(chunks)


def turn_of(body: object) -> tuple[str, int] | None:
    """The run and `seq_id` a request body names, or None where it names no turn."""
    if not isinstance(body, dict):
        return None
    model_id, seq_id = body.get("model_id"), body.get("seq_id")
    if isinstance(model_id, str) and isinstance(seq_id, int) and not isinstance(seq_id, bool):
        return model_id, seq_id
    return None


def named_turn(raw: bytes, headers: Headers) -> tuple[str, int] | None:
    """`turn_of` a compute request's body, read leniently (for a request refused before it was
    understood)."""
    try:
        if headers.get("content-type", "").startswith(tinker_wire.PROTOBUF):
            message = tinker_wire.pb.ForwardBackwardRequest()
            message.ParseFromString(raw)
            return turn_of({"model_id": message.model_id, "seq_id": message.seq_id or None})
        return turn_of(json.loads(raw))
    except Exception:  # unreadable: it names nothing
        return None


def raising(error: BaseException) -> Callable[[], Future]:
    """An engine action that, in its turn, refuses with `error`."""

    def refuse() -> Future:
        raise error

    return refuse


def refused_in_turn(state: ServerState, turn: tuple[str, int], tenant, error: InvalidInputError):
    """Answer a refused compute request in its run's `seq_id` turn, as an accepted one is: the
    turn is taken, so the run's later requests are not held up behind a gap that would stay
    open (`Sequencer.gap_seconds`). Raises `error` (a 400) when the turn is the next one, as a
    request refused at once is; only the run's own tenant takes its turns (`sequenced`)."""
    return sequenced(state, turn[0], turn[1], "refused", tenant, raising(error))


def parse_forward_backward(
    state: ServerState, raw: bytes, headers: Headers, tenant
) -> tuple[str, int | None, Callable[[], Future]]:
    """`read_forward_backward`, or, for a body refused that names its run and turn, that run,
    that turn and an action that raises the refusal (so it takes its turn)."""
    raw = decompressed(state, raw, headers)
    try:
        return read_forward_backward(state, raw, headers, tenant)
    except InvalidInputError as error:
        turn = named_turn(raw, headers)
        if turn is None:
            raise
        return turn[0], turn[1], raising(error)


def read_forward_backward(
    state: ServerState, raw: bytes, headers: Headers, tenant
) -> tuple[str, int | None, Callable[[], Future]]:
    """A forward(_backward) request, protobuf (as the SDK sends it) or JSON: its run, its
    `seq_id`, and the action that queues it on the engine.

    A forward-only request keeps its autograd graph only when its JSON body says
    `"keep_graph": true` (and the server keeps graphs at all): the SDK never does.
    """
    keep_graph = False
    max_tokens = state.config.max_tokens_per_request
    if headers.get("content-type", "").startswith(tinker_wire.PROTOBUF):
        call = tinker_wire.decode_forward_backward(raw, max_tokens)
        model_id, seq_id = call.model_id, call.seq_id
        data, loss_fn, config, reference = call.data, call.loss_fn, call.loss_fn_config, None
        forward_only = call.forward_only
    else:
        try:
            body = ForwardBackwardBody.model_validate(json.loads(raw or b"null"))
        except ValidationError as error:
            raise invalid_input(error) from None
        except (ValueError, TypeError) as error:
            raise InvalidInputError("body", f"not a forward_backward request ({error})") from None
        except RecursionError:
            raise InvalidInputError("body", "JSON nested too deeply") from None
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
        for key, value in (config or {}).items():
            if isinstance(value, str):
                raise InvalidInputError(
                    f"loss_fn_config[{key!r}]", "text values are not supported by Bios's objectives"
                )
        forward_only = body.forward_only or body.forward_input is not None
        keep_graph = body.keep_graph
        if reference is not None and reference != "base":
            check_checkpoint_owner(state, reference, tenant, "reference")
        tinker_wire.check_token_count(sum(d.model_input.length for d in data), max_tokens)
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
            owner=tenant,  # provenance spans may name this tenant's sampled sequences only
        )

    if not forward_only:  # its metrics are kept for the console (`run_metrics`)
        action = run_metrics.recorded(state.config.home, model_id, "forward_backward", data, action)
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
        run_metrics.recorded(
            state.config.home,
            body.model_id,
            "optim_step",
            None,
            lambda: state.engine.optim_step(body.model_id, body.adam_params),
        ),
    )


def saved(
    state: ServerState,
    model_id: str,
    tenant,
    kind: str,
    request_id: str,
    generation: str,
    body: SaveWeightsBody | None = None,
) -> Callable[[str], dict]:
    """What to do once a checkpoint is written: record it (with its size, and the request's
    `ttl_seconds` and `user_metadata`) and, in the same transaction, its request as done; then
    drop the copy an overwrite kept; answer its path."""
    key = "save_weights" if kind == "weights" else "save_weights_for_sampler"

    def record(path: str) -> dict:
        folder = checkpoint_folder(state.engine.home, path)
        size = sum(f.stat().st_size for f in folder.iterdir())
        parsed = CheckpointPath.parse(path)
        state.store.add_checkpoint(
            model_id,
            parsed.kind,
            parsed.name,
            tenant,
            size,
            generation=generation,
            request=(request_id, model_id, key),
            ttl_seconds=body.ttl_seconds if body is not None else None,
            user_metadata=body.user_metadata if body is not None else None,
        )
        remove_previous(folder, generation)
        return {"path": tinker_uri(path), "type": key}

    return record


def save_checkpoint(state: ServerState, body: SaveWeightsBody, tenant, kind: str) -> dict:
    """Queue a named save. Its share of the tenant's checkpoint quota (an estimate of its size)
    is reserved first, so concurrent saves cannot overshoot the quota together, and released
    when the request ends (its row then counts the real size). An overwritten checkpoint is kept
    aside until the new one is recorded (`bios.fsutil.atomic_folder`'s `keep_previous`)."""
    key = "save_weights" if kind == "weights" else "save_weights_for_sampler"
    state.live_run(body.model_id, tenant)
    release = state.reserve_checkpoint(tenant, state.checkpoint_estimate(body.model_id, kind))
    request_id = new_request_id()
    generation = request_id.removeprefix("req-")

    def action() -> Future:
        check_ttl(body.ttl_seconds)  # in its turn, so that a refused save still takes it
        return then(
            state.engine.save_state(
                body.model_id, body.path, kind, body.overwrite, keep_previous=generation
            ),
            saved(state, body.model_id, tenant, kind, request_id, generation, body),
        )

    return sequenced(
        state, body.model_id, body.seq_id, key, tenant, action, request_id, on_done=release
    )


@router.post("/save_weights")
def save_weights(body: SaveWeightsBody, state: State, tenant: Tenant) -> dict:
    if not body.path:
        raise InvalidInputError("path", "a checkpoint name is required")
    return save_checkpoint(state, body, tenant, "weights")


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(body: SaveWeightsBody, state: State, tenant: Tenant) -> dict:
    if body.path:
        return save_checkpoint(state, body, tenant, "sampler_weights")
    else:  # ephemeral: a snapshot to sample from, no file (SDK ≥ 0.3)
        state.samplers.check_quota(tenant, snapshot_of=body.model_id)

        def action() -> Future:
            if body.ttl_seconds is not None:
                raise InvalidInputError(
                    "ttl_seconds", "an unnamed save keeps no checkpoint to expire; give a path"
                )

            def register(session) -> dict:
                sampler_id = state.samplers.add(session, tenant, None, body.model_id, snapshot=True)
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
        check_run_id_free(state, run_id)
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
    state.open_session(session_id, tenant)  # not found, or finished (410)
    run_id = f"{session_id}:train:{model_seq_id}"
    check_run_id_free(state, run_id)
    return run_id


def check_run_id_free(state: ServerState, run_id: str | None) -> None:
    """A derived id that already names a run (created before a restart or an `unload_model`)
    is refused: creating under it would replace that run's weights. Checked when the request
    arrives and again when its turn comes (an earlier queued create may have taken the id)."""
    if run_id is not None and (state.store.run(run_id) is not None or state.engine.has_run(run_id)):
        session_id, _, model_seq_id = run_id.rpartition(":train:")
        raise InvalidInputError(
            "model_seq_id",
            f"model {model_seq_id} of session {session_id!r} already exists ({run_id!r}); "
            "create with the next model_seq_id, or continue that run by its model_id",
        )


def check_checkpoint_owner(state: ServerState, path: str, tenant, field: str) -> CheckpointPath:
    """The parsed path, if the checkpoint exists, has not expired, and belongs to `tenant` or
    was published by another tenant (else not found)."""
    parsed = CheckpointPath.parse(path, field)
    state.readable_checkpoint(parsed, tenant, field)
    return parsed
