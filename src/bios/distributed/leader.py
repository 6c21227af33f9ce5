"""Rank 0: the engine that takes requests and runs each one on every rank.

`DistributedEngine` is the ordinary `Engine` — the same validation in the caller's thread, the
same per-run lanes and fair turns on each base model's worker thread, the same checkpoint
folders — whose runs are `LeaderRun`s: each request a run receives is sent to every rank as a
command (bios.distributed.protocol) and executed there in step. The embedded client and
`bios serve` use it unchanged.
"""

from __future__ import annotations

import atexit
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from bios.distributed import ops
from bios.distributed.group import Group
from bios.distributed.protocol import Replica, call, start_heartbeat, stop_followers
from bios.distributed.runs import ReplicatedRun, ShardedFullRun
from bios.distributed.sampling import DistributedSamplingSession
from bios.distributed.step import (
    CustomEvaluation,
    ObjectiveEvaluation,
    StepHeader,
    shards_of,
)
from bios.engine.batch import PackedBatch
from bios.engine.engine import Engine
from bios.engine.runs import Run, TrainingRun
from bios.engine.sampling_sessions import SamplingSession
from bios.engine.worker import ModelWorker
from bios.errors import InvalidInputError, NotFoundError
from bios.models.lora import LoRAAdapter
from bios.objectives import REF_LOGPROBS, Objective
from bios.types import AdamParams, Datum, ForwardBackwardOutput, LoraConfig, OptimStepResponse


class LeaderRun:
    """Rank 0's handle on a run held by every rank (`bios.engine.runs.Run`): requests go to every
    rank; what the run is (its id, settings, weights) is read from rank 0's own copy."""

    def __init__(self, replica: Replica, local: TrainingRun) -> None:
        self.replica = replica
        self.local = local
        self.dropped = False

    # ---- what the run is: rank 0's copy -------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.local.run_id

    @property
    def base_model(self) -> str:
        return self.local.base_model

    @property
    def lora(self) -> LoraConfig | None:
        return self.local.lora

    @property
    def user_metadata(self) -> dict[str, str]:
        return self.local.user_metadata

    @user_metadata.setter
    def user_metadata(self, value: dict[str, str]) -> None:
        self.local.user_metadata = value

    @property
    def is_lora(self) -> bool:
        return self.local.is_lora

    @property
    def adapter(self) -> LoRAAdapter | None:
        return self.local.adapter

    @property
    def full_model(self) -> nn.Module | None:
        return self.local.full_model

    @property
    def steps(self) -> int:
        return self.local.steps

    def pending_gradient_bytes(self) -> int:
        return self.local.pending_gradient_bytes()

    def gradient_bytes(self) -> int:
        return self.local.gradient_bytes()

    def _call(self, name: str, header=None, shards=None, local=None):
        with self.replica.group.lock:
            if self.dropped:
                raise NotFoundError(f"model_id: no training run {self.local.run_id!r}")
            return call(self.replica, name, header, shards, local)

    @property
    def sharded(self) -> bool:
        return isinstance(self.local, ShardedFullRun)

    # ---- steps ----------------------------------------------------------------------------------

    def forward_backward(
        self,
        batch: PackedBatch,
        objective: Objective,
        config: dict[str, float],
        backward: bool,
        reference: LoRAAdapter | None = None,
        keep_graph: bool = False,  # not kept under N ranks: the backward runs its own forward
    ) -> ForwardBackwardOutput:
        with_reference = objective.needs_reference and REF_LOGPROBS not in batch.inputs
        key = self._reference_key(reference) if with_reference else None
        header = StepHeader(self.local.run_id, backward, key)
        evaluation = ObjectiveEvaluation(batch, objective, config, backward, with_reference)
        world = self.replica.group.world
        return self._call("forward_backward", header, shards_of(batch, world), evaluation)

    def forward_backward_custom(
        self, batch: PackedBatch, data: Sequence[Datum], loss_fn, input_type: str
    ) -> ForwardBackwardOutput:
        header = StepHeader(self.local.run_id, True, None, logits=input_type == "logits")
        evaluation = CustomEvaluation(batch, data, loss_fn, input_type)
        world = self.replica.group.world
        return self._call("forward_backward", header, shards_of(batch, world), evaluation)

    def _reference_key(self, adapter: LoRAAdapter | None) -> str:
        """The name every rank knows a reference adapter by; sent to them the first time."""
        if adapter is None:
            return "base"
        key = f"reference-{id(adapter)}"
        with self.replica.group.lock:
            if self.replica.references.get(key) is not adapter:
                payload = ops.reference_payload(adapter)
                call(self.replica, "put_reference", (key, payload), local=adapter)
        return key

    def optim_step(self, params: AdamParams) -> OptimStepResponse:
        return self._call("optim_step", (self.local.run_id, params))

    def drop_expired_graph(self) -> None:
        pass  # no graphs are kept under N ranks

    # ---- state --------------------------------------------------------------------------------

    def save(self, folder: Path, with_optimizer: bool) -> None:
        """Rank 0 writes one process's files; the other ranks are free meanwhile (their idle
        checks go on, so a long write cannot run into the deadline)."""
        self.replica.group.check()
        if not self.sharded:
            self.local.save(folder, with_optimizer)  # every replica is equal: write rank 0's
            return
        state = self._call("gather_state", (self.local.run_id, with_optimizer))
        self.local.write(folder, state, with_optimizer)

    def load(self, folder: Path, with_optimizer: bool) -> None:
        """Rank 0 reads and checks the files, then every rank takes the state."""
        weights, optimizer_state, steps = self.local.read_state(folder, with_optimizer)
        run_id = self.local.run_id
        if self.sharded:
            layout = self.local.optimizer_layout(optimizer_state)
            header = (run_id, None, layout, steps)
            self._call("load", header, local=(weights, optimizer_state))
        else:
            self._call("load", (run_id, (weights, optimizer_state), None, steps))

    def fingerprint(self) -> str:
        return self._call("fingerprint", self.local.run_id)

    def replica_fingerprints(self) -> list[str]:
        """Each rank's own fingerprint: equal for a LoRA run, whose replicas must not drift."""
        return self._call("replica_fingerprints", self.local.run_id)

    def generate(self, tokens: list[int], max_tokens: int, stop_ids: list[int]) -> list[int]:
        if not self.sharded:
            return self.local.generate(tokens, max_tokens, stop_ids)
        return self._call("generate", (self.local.run_id, tokens, max_tokens, stop_ids))

    def snapshot(self, worker: ModelWorker) -> SamplingSession:
        session_id = uuid.uuid4().hex[:16]
        session = self._call(
            "snapshot", (self.local.run_id, session_id), local=DistributedSamplingSession
        )
        return session.attach(self.replica, session_id)


class DistributedEngine(Engine):
    """The engine of rank 0 in an N-rank job."""

    def __init__(self, home: Path | None = None, group: Group | None = None) -> None:
        super().__init__(home)
        self.group = group if group is not None else Group()
        # Ops on rank 0 find models through the plain Engine.worker (never announcing them).
        self.replica = Replica(self.group, lambda name: Engine.worker(self, name))
        self._announced: set[str] = set()
        self._announce_lock = threading.Lock()
        start_heartbeat(self.replica)
        atexit.register(self.shutdown)

    def worker(self, base_model: str) -> ModelWorker:
        """The model's worker here; the first time, every other rank loads the model too."""
        worker = super().worker(base_model)
        key = str(worker.loaded.path)
        with self._announce_lock:
            if key not in self._announced:
                call(self.replica, "load_model", base_model)
                self._announced.add(key)
        return worker

    def _new_run(
        self, worker: ModelWorker, run_id: str, base_model: str, lora: LoraConfig | None
    ) -> LeaderRun:
        local = worker.submit(call, self.replica, "create_run", (run_id, base_model, lora)).result()
        return LeaderRun(self.replica, local)

    def create_run(self, base_model, lora, run_id=None, **options) -> str:
        if options.get("gradient_checkpointing"):
            raise InvalidInputError(
                "gradient_checkpointing", "not available on several ranks yet (one process only)"
            )
        return super().create_run(base_model, lora, run_id, **options)

    def leader_run(self, run_id: str) -> LeaderRun:
        run = self.run(run_id)
        assert isinstance(run, LeaderRun), "every run of a DistributedEngine is a LeaderRun"
        return run

    def drop_run(self, run_id: str) -> None:
        run = self.leader_run(run_id)
        super().drop_run(run_id)
        with self.group.lock:
            run.dropped = True
            call(self.replica, "drop_run", run_id)

    def replica_fingerprints(self, run_id: str) -> list[str]:
        run = self.leader_run(run_id)
        return self.worker_of(run_id).submit(run.replica_fingerprints, lane=run_id).result()

    # ---- sampling sessions: the same weights on every rank -------------------------------------

    def _session_of_run(self, worker: ModelWorker, run: Run) -> SamplingSession:
        assert isinstance(run, LeaderRun), "every run of a DistributedEngine is a LeaderRun"
        return run.snapshot(worker)

    def _session_of_checkpoint(self, folder: Path) -> SamplingSession:
        session = DistributedSamplingSession.of_checkpoint(folder, self.worker)
        return self._open_everywhere(session)

    def _session_of_base(self, worker: ModelWorker, base_model: str) -> SamplingSession:
        return self._open_everywhere(DistributedSamplingSession(worker, base_model))

    def _open_everywhere(self, session: DistributedSamplingSession) -> SamplingSession:
        adapter, full_weights = ops.session_payload(session)
        header = (session.session_id, session.base_model, adapter, full_weights)
        call(self.replica, "open_session", header, local=session)
        return session.attach(self.replica, session.session_id)

    def shutdown(self) -> None:
        """Release the other ranks (they leave their loop and exit)."""
        stop_followers(self.replica)


__all__ = ["DistributedEngine", "LeaderRun", "ReplicatedRun", "ShardedFullRun"]
