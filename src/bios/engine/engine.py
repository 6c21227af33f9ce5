"""The engine: base-model workers, the runs on them, and the requests a client can make.

Requests are validated in the caller's thread, before they are queued, so a bad request raises
at once and changes nothing; valid requests return a `concurrent.futures.Future` that the
model's worker completes in submission order.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path

import torch

from bios.checkpoints.layout import read_state
from bios.checkpoints.paths import CheckpointPath, check_name, check_run_id, checkpoint_folder
from bios.engine import memory
from bios.engine.batch import PackedBatch, resolve_config, resolve_objective
from bios.engine.devices import Precision, resolve_precision
from bios.engine.kept_graph import KEEP_SECONDS
from bios.engine.provenance import SampledSequences
from bios.engine.runs import Run, TrainingRun
from bios.engine.sampling_sessions import SamplingSession
from bios.engine.worker import ModelWorker
from bios.errors import InvalidInputError, NotFoundError
from bios.fsutil import atomic_folder
from bios.models.loading import bios_home, load_model, resolve_model_path
from bios.models.lora import LoRAAdapter
from bios.objectives import LossFn
from bios.objectives.custom import CustomLossFn, check_custom_loss
from bios.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoraConfig,
    ModelData,
    OptimStepResponse,
    checked_adam_params,
)


def check_lora_config(lora: LoraConfig | None, field: str = "rank") -> None:
    """The rule on a new run's LoRA settings; `field` names the rank as the caller's input does
    (the server's is `lora_config.rank`)."""
    if lora is not None and lora.rank <= 0:
        raise InvalidInputError(field, f"expected a positive integer, got {lora.rank}")


class Engine:
    """Holds one worker per base model and routes each run's requests to it.

    Every base model lives on one device in one dtype (`bios.engine.devices`: `device` and
    `dtype` None choose them, `precision.reason` says why), resolved here, so a device that is
    not there fails before anything is loaded. Whatever the dtype, what is trained is float32:
    LoRA factors (and so their AdamW moments), and a full fine-tuning run's own copy of the
    model, its master weights, which a bf16 engine's run computes with under
    `torch.autocast(device.type, dtype)` (`TrainingRun`).
    """

    def __init__(
        self,
        home: Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        self.precision: Precision = resolve_precision(device, dtype)
        self.home = Path(home) if home is not None else bios_home()
        self._workers: dict[str, ModelWorker] = {}
        self._run_workers: dict[str, ModelWorker] = {}
        self._references: dict[tuple[str, int], LoRAAdapter] = {}
        # Weak: a snapshot lives as long as a client holds it, so dropped ones free their memory.
        self._sessions: weakref.WeakValueDictionary[str, SamplingSession] = (
            weakref.WeakValueDictionary()
        )
        self._lock = threading.Lock()
        # What samplers recorded (`record_stability_info`), for objectives with provenance.
        self.sampled = SampledSequences()

    @property
    def device(self) -> torch.device:
        return self.precision.device

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype

    @property
    def precision_reason(self) -> str:
        return self.precision.reason

    # ---- models and runs ----------------------------------------------------------------------

    def worker(self, base_model: str) -> ModelWorker:
        """The worker of `base_model`, loading the model the first time it is asked for."""
        if not isinstance(base_model, str) or not base_model:
            raise InvalidInputError(
                "base_model", f"expected a model name or path, got {base_model!r}"
            )
        key = str(resolve_model_path(base_model))
        with self._lock:
            if key not in self._workers:
                self._workers[key] = ModelWorker(load_model(base_model, self.dtype, self.device))
            return self._workers[key]

    def run(self, run_id: str) -> Run:
        worker = self._run_workers.get(run_id)
        if worker is None:
            raise NotFoundError(f"model_id: no training run {run_id!r}")
        return worker.runs[run_id]

    def create_run(
        self,
        base_model: str,
        lora: LoraConfig | None,
        run_id: str | None = None,
        *,
        user_metadata: Mapping[str, str] | None = None,
        gradient_checkpointing: bool = False,
    ) -> str:
        """A new LoRA run (`lora` given) or full fine-tuning run on `base_model`.

        `run_id` is chosen by the engine unless the caller (the server, which derives Tinker's
        `<session>:train:<n>` ids) names it. `user_metadata` is kept with the run
        (`TrainingRun.user_metadata`). `gradient_checkpointing`: recompute each decoder layer in
        the backward pass instead of keeping its activations (`engine/forward.py`).
        """
        check_lora_config(lora)
        if not isinstance(gradient_checkpointing, bool):
            raise InvalidInputError(
                "gradient_checkpointing", f"expected true or false, got {gradient_checkpointing!r}"
            )
        if run_id is not None:
            check_run_id(run_id, "model_id")
            if run_id in self._run_workers:
                raise InvalidInputError("model_id", f"a run {run_id!r} already exists")
        worker = self.worker(base_model)
        run_id = run_id or uuid.uuid4().hex[:16]
        run = self._new_run(worker, run_id, base_model, lora)
        run.user_metadata = dict(user_metadata or {})
        run.checkpoint_layers = gradient_checkpointing
        with self._lock:
            worker.runs[run_id] = run
            self._run_workers[run_id] = worker
        return run_id

    def _new_run(
        self, worker: ModelWorker, run_id: str, base_model: str, lora: LoraConfig | None
    ) -> Run:
        model = worker.loaded.model
        full_copy = 0 if lora is not None else 4 * memory.trainable_parameters(model, None)
        memory.check_run_fits(memory.trainable_parameters(model, lora), full_copy, self.device)
        # Full fine-tuning: the run's own copy in float32 (its master weights), on the device.
        full_model = None
        if lora is None:
            full_model = load_model(base_model, torch.float32, self.device).model
        # Built on the worker thread: it reads the shared model, which other runs may be using.
        return worker.submit(
            TrainingRun, run_id, base_model, worker.host, lora, full_model
        ).result()

    def create_run_from_state(
        self,
        path: str,
        with_optimizer: bool,
        run_id: str | None = None,
        *,
        user_metadata: Mapping[str, str] | None = None,
    ) -> str:
        """A new run with the settings, weights (and optionally optimizer) of a saved state."""
        folder = checkpoint_folder(self.home, path)
        saved = read_state(folder)
        run_id = self.create_run(
            saved.base_model, saved.lora_config(), run_id, user_metadata=user_metadata
        )
        try:
            self.load_state(run_id, path, with_optimizer).result()
        except BaseException:
            self.drop_run(run_id)
            raise
        return run_id

    def worker_of(self, run_id: str) -> ModelWorker:
        self.run(run_id)
        return self._run_workers[run_id]

    def has_run(self, run_id: str) -> bool:
        return run_id in self._run_workers

    def drop_run(self, run_id: str) -> None:
        """Forget a run and free its weights and optimizer state (its checkpoints stay)."""
        with self._lock:
            worker = self._run_workers.pop(run_id)
            del worker.runs[run_id]

    # ---- requests ---------------------------------------------------------------------------

    def forward_backward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: LossFn,
        loss_fn_config: Mapping[str, float] | None = None,
        backward: bool = True,
        reference: str | None = None,
        keep_graph: bool = False,
        owner: str | None = None,
    ) -> Future[ForwardBackwardOutput]:
        """`reference` (for dpo, ipo, kl, ...): None for the base model, or a checkpoint path.

        `keep_graph` (a forward only): keep its autograd graph for a `forward_backward` on the
        same tokens that follows, which then skips its forward pass (`kept_graph.py`).
        `owner`: whose sampling records (`self.sampled`) provenance spans may name.
        """
        run, worker = self.run(run_id), self._run_workers[run_id]
        objective = resolve_objective(loss_fn)
        config = resolve_config(objective, loss_fn_config)
        batch = worker.pack(
            data, objective, lookup=lambda sequence_id: self.sampled.lookup(owner, sequence_id)
        )
        if backward or keep_graph:
            self._check_step_fits(run, worker, batch)
        adapter = self._reference_adapter(run, reference)
        future = worker.submit(
            run.forward_backward,
            batch,
            objective,
            config,
            backward,
            adapter,
            keep_graph,
            lane=run_id,
        )
        if keep_graph and not backward:
            # Free the kept graph's memory once it expires, if nothing used or replaced it.
            timer = threading.Timer(
                KEEP_SECONDS + 1, lambda: worker.submit(run.drop_expired_graph, lane=run_id)
            )
            timer.daemon = True
            timer.start()
        return future

    def snapshot_for_sampling(self, run_id: str) -> Future[SamplingSession]:
        """A sampling session on the run's weights as they are once every request queued before
        this one has run (the engine holds it weakly, like `create_sampling_session`)."""
        run, worker = self.run(run_id), self._run_workers[run_id]

        def snapshot() -> SamplingSession:
            session = self._session_of_run(worker, run)
            with self._lock:
                self._sessions[session.session_id] = session
            return session

        return worker.submit(snapshot, lane=run_id)

    def forward_backward_custom(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: CustomLossFn,
        loss_type_input: str = "logprobs",
    ) -> Future[ForwardBackwardOutput]:
        """A user's loss of per-datum logprobs (or logits), on the live graph of one forward."""
        run, worker = self.run(run_id), self._run_workers[run_id]
        check_custom_loss(loss_fn, loss_type_input)
        batch = worker.pack(data, None)
        self._check_step_fits(run, worker, batch)
        return worker.submit(
            run.forward_backward_custom, batch, data, loss_fn, loss_type_input, lane=run_id
        )

    def _check_step_fits(self, run: Run, worker: ModelWorker, batch: PackedBatch) -> None:
        """Refuse, before anything is queued, a step whose activations would not fit."""
        model = run.full_model if run.full_model is not None else worker.loaded.model
        compute_dtype = worker.loaded.model.dtype  # a full run's autocast computes in it too
        memory.check_step_fits(
            memory.Shape.of(model),
            batch,
            self.device,
            run.checkpoint_layers,
            run.lora.rank if run.lora is not None else None,
            str(compute_dtype).removeprefix("torch."),
            new_gradients=run.gradient_bytes(),
            held_gradients=run.pending_gradient_bytes(),
            weight_casts=memory.weight_cast_bytes(model, compute_dtype),
        )

    def _reference_adapter(self, run: Run, reference: str | None) -> LoRAAdapter | None:
        """The frozen reference policy: None (the base model) or a saved LoRA adapter.

        Both share the base weights: a reference costs one adapter, not a second model. Loaded
        adapters are kept (checkpoints are immutable unless overwritten, which changes mtime).
        """
        if reference is None or reference == "base":
            return None
        folder = checkpoint_folder(self.home, reference, "reference")
        saved = read_state(folder, "reference")
        if not saved.is_lora:
            raise InvalidInputError(
                "reference",
                f"{reference} is a full fine-tuning checkpoint; "
                "pass ref_logprobs in the data instead",
            )
        if saved.base_model != run.base_model:
            raise InvalidInputError(
                "reference", f"{reference} is of {saved.base_model!r}, not {run.base_model!r}"
            )
        key = (str(folder), saved.modified_ns)
        with self._lock:
            if key not in self._references:
                adapter = LoRAAdapter.load_peft(folder, self.device)
                self._references[key] = adapter.requires_grad_(False)
            return self._references[key]

    def optim_step(self, run_id: str, adam_params: AdamParams) -> Future[OptimStepResponse]:
        run = self.run(run_id)
        checked_adam_params(adam_params)
        return self._run_workers[run_id].submit(run.optim_step, adam_params, lane=run_id)

    def save_state(
        self,
        run_id: str,
        name: str,
        kind: str = "weights",
        overwrite: bool = False,
        keep_previous: str | None = None,
    ) -> Future[str]:
        """Save weights (+ optimizer for kind "weights") atomically; the future gives the URI.

        `keep_previous` (the server's token for this save): an overwritten checkpoint is kept
        beside the new one (`bios.fsutil.previous_name`) until the caller has recorded the new
        one and removes it, so a crash in between leaves the old copy to recover."""
        run = self.run(run_id)
        path = CheckpointPath(run_id, kind, check_name(name))
        folder = path.folder(self.home)
        if folder.exists() and not overwrite:
            raise InvalidInputError("name", f"{path.uri()} already exists")

        def save() -> str:
            if folder.exists() and not overwrite:  # saved by a request queued before this one
                raise InvalidInputError("name", f"{path.uri()} already exists")
            with atomic_folder(folder, keep_previous=keep_previous) as staging:
                run.save(staging, with_optimizer=kind == "weights")
            return path.uri()

        return self._run_workers[run_id].submit(save, lane=run_id)

    def load_state(self, run_id: str, path: str, with_optimizer: bool) -> Future[str]:
        run = self.run(run_id)
        folder = checkpoint_folder(self.home, path)
        saved = read_state(folder)
        if saved.base_model != run.base_model:
            raise InvalidInputError(
                "path",
                f"checkpoint is of base model {saved.base_model!r}, run is of {run.base_model!r}",
            )
        if with_optimizer and CheckpointPath.parse(path).kind != "weights":
            raise InvalidInputError(
                "path", "sampler weights hold no optimizer state; use a weights/ path"
            )

        def load() -> str:
            run.load(folder, with_optimizer)
            return path

        return self._run_workers[run_id].submit(load, lane=run_id)

    def get_info(self, run_id: str) -> GetInfoResponse:
        run = self.run(run_id)
        loaded = self._run_workers[run_id].loaded
        return GetInfoResponse(
            model_data=ModelData(
                arch=loaded.model.config.model_type,
                model_name=run.base_model,
                tokenizer_id=run.base_model,
            ),
            model_id=run_id,
            is_lora=run.is_lora,
            lora_rank=run.lora.rank if run.lora is not None else None,
            model_name=run.base_model,
        )

    def tokenizer(self, run_id: str):
        self.run(run_id)
        return self._run_workers[run_id].loaded.tokenizer

    def generate(self, run_id: str, tokens: Sequence[int], max_tokens: int) -> Future[list[int]]:
        run, worker = self.run(run_id), self._run_workers[run_id]
        tokens = list(tokens)
        if not tokens:
            raise InvalidInputError("prompt", "is empty")
        if max_tokens <= 0:
            raise InvalidInputError("max_tokens", f"expected a positive integer, got {max_tokens}")
        bad = [t for t in tokens if not 0 <= t < worker.vocab_size]
        if bad:
            raise InvalidInputError("prompt", f"token id {bad[0]} is outside the vocabulary")
        stop_ids = list(worker.loaded.eos_token_ids())
        return worker.submit(run.generate, tokens, max_tokens, stop_ids, lane=run_id)

    # ---- sampling (bios.engine.sampling_sessions) -------------------------------------------

    def create_sampling_session(
        self,
        run_id: str | None = None,
        model_path: str | None = None,
        base_model: str | None = None,
    ) -> SamplingSession:
        """A sampling session on a snapshot of a run's current weights (taken after every request
        queued before it), on saved weights (`model_path`), or on a base model. The engine holds
        it weakly (by `session.session_id`): it lives while the caller keeps it."""
        if run_id is not None:
            run, worker = self.run(run_id), self._run_workers[run_id]
            session = worker.submit(self._session_of_run, worker, run, lane=run_id).result()
        elif model_path is not None:
            try:
                folder = checkpoint_folder(self.home, model_path, "model_path")
            except NotFoundError as error:
                raise InvalidInputError("model_path", f"no checkpoint at {model_path}") from error
            session = self._session_of_checkpoint(folder)
            if base_model is not None and self.worker(base_model) is not session.worker:
                raise InvalidInputError(
                    "base_model", f"{model_path} is of {session.base_model!r}, not {base_model!r}"
                )
        elif base_model is not None:
            session = self._session_of_base(self.worker(base_model), base_model)
        else:
            raise InvalidInputError("model_path", "give model_path or base_model")
        with self._lock:
            self._sessions[session.session_id] = session
        return session

    # Where sessions come from (a DistributedEngine builds the same on every rank).

    def _session_of_run(self, worker: ModelWorker, run: Run) -> SamplingSession:
        return SamplingSession.of_run(worker, run)

    def _session_of_checkpoint(self, folder: Path) -> SamplingSession:
        return SamplingSession.of_checkpoint(folder, self.worker)

    def _session_of_base(self, worker: ModelWorker, base_model: str) -> SamplingSession:
        return SamplingSession(worker, base_model)

    def sampling_session(self, session_id: str) -> SamplingSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFoundError(f"sampling_session_id: no sampling session {session_id!r}")
        return session

    def sample(self, session_id: str, *args, **kwargs) -> Future:
        """`SamplingSession.sample`: checked now, decoded in a batch with concurrent requests."""
        return self.sampling_session(session_id).sample(*args, **kwargs)

    def compute_logprobs(self, session_id: str, prompt) -> Future[list[float | None]]:
        return self.sampling_session(session_id).compute_logprobs(prompt)
