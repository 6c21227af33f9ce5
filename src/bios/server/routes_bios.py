"""Bios's own extensions, under `/api/v1/bios/...` (Tinker's SDK never calls these).

- `GET /bios/hparams?model=M[&lora=true][&examples=N&completion_tokens=T]`: the learning rate
  chosen for a model, and with dataset figures the full recommendation (batch, steps, rank).
- `POST /bios/diagnose {"records": [...]}`: the training-health findings for a metric stream.
- `GET /bios/runs/{model_id}/fingerprint`: a hash of a run's weights and optimizer state.
- `GET /bios/metrics`: sampling sessions held and the memory their weights take (the caller's
  and the whole server's).

Every route needs a key under `--auth`, as Tinker's do.

Other extensions ride on Tinker's own routes: every Bios objective name (and weighted lists of
them) is accepted as `loss_fn`, `forward_backward_input.reference` names a reference policy,
and `create_model` takes `"full_finetune": true`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from bios.diagnostics import diagnose
from bios.errors import InvalidInputError
from bios.hparams import DatasetStats, get_lr, recommend
from bios.models.catalog import lookup
from bios.server.auth import Tenant
from bios.server.state import State
from bios.server.wire import Body


class DiagnoseBody(Body):
    records: list[dict[str, Any]]


router = APIRouter()


@router.get("/bios/hparams")
def hparams(
    state: State,
    tenant: Tenant,
    model: str,
    lora: bool = True,
    examples: int | None = None,
    completion_tokens: int = 0,
) -> dict:
    if lookup(model) is None:  # advice read from a config.json: only of a model served here
        state.check_model(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answer: dict[str, Any] = {"model": model, "learning_rate": get_lr(model, lora=lora)}
        if examples is not None:
            if examples <= 0 or completion_tokens < 0:
                raise InvalidInputError("examples", "expected examples > 0, completion_tokens >= 0")
            stats = DatasetStats(num_examples=examples, completion_tokens=completion_tokens)
            answer["recommendation"] = dataclasses.asdict(recommend(model, stats, lora=lora))
    answer["warnings"] = [str(w.message) for w in caught]
    return answer


@router.get("/bios/runs/{model_id}/fingerprint")
def fingerprint(model_id: str, state: State, tenant: Tenant) -> dict:
    """A hash of the run's weights, gradients and optimizer state, taken after every request
    queued before it: equal before and after a request means it changed nothing."""
    state.live_run(model_id, tenant)
    run = state.engine.run(model_id)
    worker_future = state.engine.worker_of(model_id).submit(run.fingerprint, lane=model_id)
    return {"model_id": model_id, "fingerprint": worker_future.result()}


@router.get("/bios/metrics")
def metrics(state: State, tenant: Tenant) -> dict:
    return state.samplers.metrics(tenant)


@router.post("/bios/diagnose")
async def diagnose_records(request: Request, tenant: Tenant) -> dict:
    # The body is read only after the key is checked: a caller without one costs nothing.
    raw = await request.body()
    return await run_in_threadpool(diagnose_body, raw)


def diagnose_body(raw: bytes) -> dict:
    try:
        # Python's reader, as before: it takes the NaN that Python's encoder writes.
        body = DiagnoseBody.model_validate(json.loads(raw or b"null"))
    except (ValueError, RecursionError) as error:  # pydantic's ValidationError is a ValueError
        raise InvalidInputError("records", f"not a diagnose request ({error})") from None
    findings = [dataclasses.asdict(f) for f in diagnose(body.records)]
    for finding in findings:  # JSON has no NaN or infinity: say it in words
        finding["evidence"] = {
            k: v if math.isfinite(v) else str(v) for k, v in finding["evidence"].items()
        }
    return {"findings": findings}
