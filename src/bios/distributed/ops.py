"""The ops every rank runs for rank 0's commands: runs, their steps and state, sessions.

Each op is `fn(replica, header, shard, local)`: `header` reached every rank, `shard` is this
rank's own payload (or None), `local` is rank 0's private arguments (None on the other ranks).
"""

from __future__ import annotations

import hashlib

import torch

from bios.distributed.protocol import Replica, op
from bios.distributed.runs import ReplicatedRun, ShardedFullRun
from bios.distributed.step import Shard, StepHeader, distributed_step
from bios.engine.devices import resolve_precision
from bios.engine.runs import TrainingRun
from bios.engine.sampling_sessions import SamplingSession, frozen_copy
from bios.models.loading import load_model
from bios.models.lora import LoRAAdapter

# ---- base models and runs ----------------------------------------------------------------------


@op("load_model")
def _load_model(replica: Replica, base_model: str, shard: None, local: None) -> None:
    replica.worker_of(base_model)


@op("create_run")
def _create_run(replica: Replica, header, shard: None, local: None) -> TrainingRun:
    run_id, base_model, lora = header
    host = replica.worker_of(base_model).host
    if lora is not None:
        run: TrainingRun = ReplicatedRun(run_id, base_model, host, lora, replica.group)
    else:
        run = ShardedFullRun(run_id, base_model, host, replica.group)
    replica.runs[run_id] = run
    return run


@op("drop_run")
def _drop_run(replica: Replica, run_id: str, shard: None, local: None) -> None:
    replica.runs.pop(run_id, None)


def reference_payload(adapter: LoRAAdapter) -> dict:
    return {
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        # On the CPU: a pickled CUDA tensor would land on the sender's GPU index.
        "factors": {(m, f): p.detach().cpu().clone() for m, f, p in adapter.named_factors()},
    }


def adapter_from_payload(payload: dict, device: torch.device | None = None) -> LoRAAdapter:
    """A frozen adapter from `reference_payload`'s tensors, on `device` (None: the CPU)."""
    factors = payload["factors"]
    shapes = {
        module: (factors[(module, "lora_A")].shape[1], factors[(module, "lora_B")].shape[0])
        for module, _ in factors
    }
    adapter = LoRAAdapter(shapes, payload["rank"], payload["alpha"], seed=0)
    with torch.no_grad():
        for module, factor, param in adapter.named_factors():
            param.copy_(factors[(module, factor)])
    return adapter.requires_grad_(False).to(device or torch.device("cpu"))


@op("put_reference")
def _put_reference(replica: Replica, header, shard: None, local: LoRAAdapter | None) -> None:
    key, payload = header
    device = resolve_precision().device  # this rank's, as its models'
    replica.references[key] = local if local is not None else adapter_from_payload(payload, device)


@op("forward_backward")
def _forward_backward(replica: Replica, header: StepHeader, shard: Shard, local) -> object:
    run = replica.runs[header.run_id]
    reference = None
    if header.reference not in (None, "base"):
        reference = replica.references[header.reference]
    distributed_step(replica.group, run, header, shard, reference, local)
    return local.output if local is not None else None


@op("optim_step")
def _optim_step(replica: Replica, header, shard: None, local: None):
    run_id, params = header
    return replica.runs[run_id].optim_step(params)


@op("gather_state")
def _gather_state(replica: Replica, header, shard: None, local: None) -> tuple | None:
    run_id, with_optimizer = header
    run = replica.runs[run_id]
    assert isinstance(run, ShardedFullRun)
    return run.gather_state(with_optimizer)  # whole tensors on rank 0, None elsewhere


@op("load")
def _load(replica: Replica, header, shard: None, local) -> None:
    run_id, state, layout, steps = header
    run = replica.runs[run_id]
    if isinstance(run, ShardedFullRun):
        weights, optimizer_state = local if local is not None else (None, None)
        run.assign_everywhere(weights, optimizer_state, layout, steps)
    else:
        run.assign(*state, steps)


@op("fingerprint")
def _fingerprint(replica: Replica, run_id: str, shard: None, local: None) -> str | None:
    own = replica.runs[run_id].fingerprint()
    every = replica.group.gather(own, f"fingerprint {run_id}")
    if every is None:
        return None
    return hashlib.sha256("".join(every).encode()).hexdigest()


@op("replica_fingerprints")
def _replica_fingerprints(replica: Replica, run_id: str, shard: None, local: None):
    """Each rank's own fingerprint (equal for a LoRA run: the replicas must not drift)."""
    return replica.group.gather(replica.runs[run_id].fingerprint(), f"fingerprints {run_id}")


@op("generate")
def _generate(replica: Replica, header, shard: None, local: None) -> list[int]:
    run_id, tokens, max_tokens, stop_ids = header
    return replica.runs[run_id].generate(tokens, max_tokens, stop_ids)


# ---- sampling sessions -------------------------------------------------------------------------


@op("snapshot")
def _snapshot(replica: Replica, header, shard: None, local) -> SamplingSession:
    """Every rank: a session on the run's current weights (a full run's are gathered whole)."""
    run_id, session_id = header
    run = replica.runs[run_id]
    worker = replica.worker_of(run.base_model)
    session_class = local if local is not None else SamplingSession
    if isinstance(run, ShardedFullRun):
        session = session_class(worker, run.base_model, full_model=run.full_weights())
    else:
        session = session_class(worker, run.base_model, adapter=frozen_copy(run.adapter))
    if local is None:
        replica.sessions[session_id] = session
    return session


@op("open_session")
def _open_session(replica: Replica, header, shard: None, local: None) -> None:
    """The other ranks: a session on a base model, a saved adapter, or saved full weights."""
    if local is not None:
        return  # rank 0 built its own session from the files
    session_id, base_model, adapter, full_weights = header
    worker = replica.worker_of(base_model)
    full_model = None
    if full_weights is not None:
        full_model = load_model(base_model, worker.dtype, worker.device).model
        full_model.load_state_dict(full_weights, strict=False)
        full_model = full_model.requires_grad_(False).eval()
    replica.sessions[session_id] = SamplingSession(
        worker,
        base_model,
        adapter=adapter_from_payload(adapter, worker.device) if adapter is not None else None,
        full_model=full_model,
    )


def session_payload(session: SamplingSession) -> tuple[dict | None, dict | None]:
    """Rank 0: what the other ranks need to rebuild `session`'s weights."""
    adapter = session._adapter
    full = session._full_model
    return (
        reference_payload(adapter) if adapter is not None else None,
        {k: v.detach() for k, v in full.state_dict().items()} if full is not None else None,
    )
