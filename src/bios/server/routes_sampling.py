"""Sampling routes: create_sampling_session, asample, samplers/{id}.

A sampling session is an immutable snapshot (of a run's weights, a saved checkpoint, or a base
model). Concurrent `asample` requests on one session are decoded together by the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter

from bios.checkpoints.paths import CheckpointPath
from bios.concurrency import then
from bios.errors import InvalidInputError
from bios.server.auth import Tenant
from bios.server.futures import new_request_id
from bios.server.routes_training import check_checkpoint_owner
from bios.server.state import ServerState, State
from bios.server.tinker_wire import check_token_count
from bios.server.wire import Body, only
from bios.types import ModelInput, SampleResponse, SamplingParams


class CreateSamplingSessionBody(Body):
    session_id: str | None = None
    sampling_session_seq_id: int | None = None
    base_model: str | None = None
    model_path: str | None = None


class SampleBody(Body):
    prompt: ModelInput
    num_samples: int = 1
    sampling_params: SamplingParams
    sampling_session_id: str | None = None
    base_model: str | None = None
    model_path: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_logprobs_last_n: int | None = None
    target_prompt_logprobs: Annotated[
        dict[str, Any] | None,
        only(None, why="not implemented by Bios: ask topk_prompt_logprobs, or compute_logprobs"),
    ] = None
    # StableReinforce's sampling-time record (SDK 0.38 sends it on every asample, False by
    # default); what Bios records is `stable_reinforce`'s business.
    record_stability_info: bool | None = None
    prompt_alt_tokens_k: Annotated[
        int, only(0, why="not implemented by Bios: draw alternatives with num_samples")
    ] = 0


def check_size(state: ServerState, body: SampleBody, context: int | None = None) -> None:
    """The server's bounds on one `asample`, before anything is allocated: samples, and tokens
    (the prompt, plus each sample's `max_tokens`, or the rest of the `context` without one)."""
    limit = state.config.max_samples_per_request
    if body.num_samples > limit:
        raise InvalidInputError(
            "num_samples", f"{body.num_samples:,} is over the limit of {limit:,} (--max-samples)"
        )
    prompt = body.prompt.length
    each = body.sampling_params.max_tokens
    if each is None:
        each = max(context - prompt, 0) if context is not None else 0
    tokens = prompt + max(body.num_samples, 0) * max(each, 0)
    field = "sampling_params.max_tokens" if tokens > prompt else "prompt"
    check_token_count(tokens, state.config.max_tokens_per_request, field)


def open_session(state: ServerState, base_model: str | None, model_path: str | None, tenant) -> str:
    """A new sampling session of `tenant`, held for it (counted in its sampler quota)."""
    state.samplers.check_quota(tenant)
    session, run_id = new_session(state, base_model, model_path, tenant)
    return state.samplers.add(session, tenant, model_path, run_id)


def new_session(state: ServerState, base_model: str | None, model_path: str | None, tenant):
    """A sampling session on a checkpoint `tenant` owns or on a served base model, and the run
    the checkpoint belongs to (None for a base model)."""
    if model_path is not None:
        check_checkpoint_owner(state, model_path, tenant, "model_path")
        session = state.engine.create_sampling_session(model_path=model_path)
        run_id = CheckpointPath.parse(model_path).run_id
    else:
        if base_model is not None:
            state.check_model(base_model)
        session = state.engine.create_sampling_session(base_model=base_model)
        run_id = None
    return session, run_id


router = APIRouter()


@router.post("/create_sampling_session")
def create_sampling_session(body: CreateSamplingSessionBody, state: State, tenant: Tenant) -> dict:
    if body.session_id is not None:  # an open session of the tenant's (a finished one: 410)
        state.open_session(body.session_id, tenant)
    sampler_id = open_session(state, body.base_model, body.model_path, tenant)
    if body.session_id is not None:
        state.store.link_sampler(body.session_id, sampler_id)
    return {"type": "create_sampling_session", "sampling_session_id": sampler_id}


@router.post("/asample")
def asample(body: SampleBody, state: State, tenant: Tenant) -> dict[str, Any]:
    check_size(state, body)  # before a session is made for it
    sampler_id = body.sampling_session_id
    if sampler_id is not None:
        session = state.samplers.session(sampler_id, tenant)
    else:  # a one-off session for this request: nobody can name it again, so it is not held
        session, _ = new_session(state, body.base_model, body.model_path, tenant)
    check_size(state, body, session.worker.max_length)
    future = session.sample(
        body.prompt,
        body.num_samples,
        body.sampling_params,
        include_prompt_logprobs=body.prompt_logprobs,
        topk_prompt_logprobs=body.topk_prompt_logprobs,
        topk_sample_logprobs=body.topk_sample_logprobs,
        prompt_logprobs_last_n=body.prompt_logprobs_last_n,
    )
    # SDK ≥ 0.38 asserts one sequence id per requested sample on every asample future.
    request_id = new_request_id()
    sequence_ids = [f"{request_id}:{i}" for i in range(body.num_samples)]
    record = None
    if body.record_stability_info:

        def record(response: SampleResponse) -> None:
            state.engine.sampled.record_response(tenant, sequence_ids, body.prompt.length, response)

    future = then(future, lambda response: stamped(response, sequence_ids, record))
    if sampler_id is not None:
        state.samplers.used(sampler_id, future)
    state.submit(future, "sample", None, tenant, request_id=request_id)
    return {"request_id": request_id, "sample_sequence_ids": sequence_ids}


def stamped(
    response: SampleResponse,
    sequence_ids: list[str],
    record: Callable[[SampleResponse], None] | None,
) -> SampleResponse:
    """`response` with each sequence's `sequence_id`, recorded by `record` (when given); run by
    `then` before the request's future is done, so a training request may name a sequence as
    soon as its client has seen it."""
    sequences = [
        sequence.model_copy(update={"sequence_id": sequence_id})
        for sequence, sequence_id in zip(response.sequences, sequence_ids, strict=True)
    ]
    response = response.model_copy(update={"sequences": sequences})
    if record is not None:
        record(response)
    return response


@router.get("/samplers/{sampler_id}")
def sampler(sampler_id: str, state: State, tenant: Tenant) -> dict:
    session = state.samplers.session(sampler_id, tenant)
    row = state.store.sampler(sampler_id)
    return {
        "sampler_id": sampler_id,
        "base_model": session.base_model,
        "model_path": row["model_path"],
    }
