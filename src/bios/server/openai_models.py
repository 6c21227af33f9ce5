"""What a request's `model` names, for the caller's tenant, and the samplers held for it.

- a checkpoint path, `tinker://<run>/sampler_weights/<name>` or `bios://…` (`weights/…` too);
- a training run's id: its newest saved checkpoint;
- a sampling session id (`sampler-…`) made through the Tinker API: that very session;
- a base model the server serves.

What is another tenant's is not found, as what does not exist. The OpenAI API opens one
session per tenant and set of weights through the server's samplers
(`routes_sampling.open_session`), held in the sampler table: it counts in the tenant's sampler
quota, is freed when idle and then reopened; a checkpoint that is overwritten gets a new one.
Every request on those weights is queued on that session, so concurrent ones — from this API,
or from the SDK on the same sampler — are decoded in one batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from bios.checkpoints.paths import SCHEMES, CheckpointPath
from bios.errors import InvalidInputError, NotFoundError
from bios.server.routes_sampling import open_session
from bios.server.routes_training import check_checkpoint_owner
from bios.server.state import ServerState


@dataclass(frozen=True)
class Target:
    """What a request's `model` names: the weights (as a key to hold their session under, and
    how to open it), or a sampler the caller already holds."""

    key: tuple | None = None
    base_model: str | None = None
    model_path: str | None = None
    sampler_id: str | None = None


def target_of(state: ServerState, model: str, tenant: str | None) -> Target:
    """Resolve `model` for `tenant`; what is not theirs is not found, as what does not exist."""
    if model.startswith(SCHEMES):
        return _checkpoint(state, check_checkpoint_owner(state, model, tenant, "model"))
    sampler = state.store.sampler(model)
    if sampler is not None and sampler["tenant"] == tenant:
        return Target(sampler_id=model)
    run = state.store.run(model)
    if run is not None and run["tenant"] == tenant:
        saved = state.store.checkpoints(tenant, model)
        if not saved:
            raise NotFoundError(
                f"model: run {model!r} has no saved weights yet (save_weights_for_sampler or "
                "save_state first)"
            )
        latest = max(saved, key=lambda row: row["created"])
        return _checkpoint(state, CheckpointPath(model, latest["kind"], latest["name"]))
    try:
        state.check_model(model)
    except InvalidInputError as error:
        raise NotFoundError(
            f"model: {model!r} is no checkpoint, run or sampler of yours, nor a served model "
            f"({error.problem}); GET /v1/models lists them"
        ) from None
    return Target(key=("base", model), base_model=model)


def _checkpoint(state: ServerState, path: CheckpointPath) -> Target:
    row = state.store.checkpoint(path.run_id, path.kind, path.name) or {}
    # The row's generation and time tell an overwritten checkpoint from the one a session holds.
    key = ("checkpoint", path.uri(), row.get("generation"), row.get("created"))
    return Target(key=key, model_path=path.uri())


class HeldSamplers:
    """The sampler this API holds for each (tenant, weights): opened on first use, reopened
    once the sampler table has freed it (idle, or its run unloaded)."""

    def __init__(self) -> None:
        self._ids: dict[tuple, str] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()

    def session(self, state: ServerState, tenant: str | None, target: Target) -> tuple[Any, str]:
        """(the sampling session, its sampler id)."""
        if target.sampler_id is not None:
            return state.samplers.session(target.sampler_id, tenant), target.sampler_id
        key = (tenant, target.key)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one opening per key: concurrent first requests share it
            sampler_id = self._ids.get(key)
            if sampler_id is not None:
                try:
                    return state.samplers.session(sampler_id, tenant), sampler_id
                except NotFoundError:
                    pass  # freed: open it again
            sampler_id = open_session(state, target.base_model, target.model_path, tenant)
            self._ids[key] = sampler_id
            return state.samplers.session(sampler_id, tenant), sampler_id


def model_cards(state: ServerState, tenant: str | None, started: int) -> list[dict]:
    """The served base models, then the tenant's runs that have saved weights and their
    checkpoints (newest first), each with the base model it was trained from as `parent`."""
    owner = tenant or "bios"
    cards = [
        {"id": name, "object": "model", "created": started, "owned_by": "bios"}
        for name in state.config.models
    ]
    runs, _ = state.store.runs(tenant, limit=1_000_000, offset=0)
    base_of = {row["run_id"]: row["base_model"] for row in runs}
    checkpoints = state.store.checkpoints(tenant)  # newest first
    with_weights = {row["run_id"] for row in checkpoints}
    for row in runs:
        if row["run_id"] in with_weights:
            cards.append(
                {
                    "id": row["run_id"],
                    "object": "model",
                    "created": int(row["created"]),
                    "owned_by": owner,
                    "parent": row["base_model"],
                }
            )
    for row in checkpoints:
        path = CheckpointPath(row["run_id"], row["kind"], row["name"])
        cards.append(
            {
                "id": path.uri("tinker://"),
                "object": "model",
                "created": int(row["created"]),
                "owned_by": owner,
                "parent": base_of.get(row["run_id"]),
            }
        )
    return cards
