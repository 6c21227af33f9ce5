"""The process group of an N-rank Bios job: set-up, the calls the ranks make together, failures.

Two groups over the same ranks:

- `main`, the backend chosen for the hardware (gloo on CPU; on a CUDA machine
  `cpu:gloo,cuda:nccl`, so CPU tensors still go over gloo): gradients, FSDP2's all-gathers and
  reduce-scatters, weights;
- `control`, always gloo: the commands rank 0 sends, and the small Python objects (shards of a
  batch, logprobs, sample responses) that go with them.

Every collective has a deadline (`BIOS_DIST_TIMEOUT` seconds, default 600). A rank that dies
closes its sockets, and the other ranks' next collective fails at once ("Connection closed by
peer"); a rank that hangs makes it fail at the deadline. (So the deadline must exceed the
longest wait of one rank for another inside a request: the imbalance of a step's shares, or of
a sampling batch whose rows on one rank run much longer than on another.) Either way the failure
is raised as a `DistributedError` that says which step failed and why, and the group is marked
broken: the ranks can no longer be sure they are in step, so every later request fails with the
same message instead of hanging. Restart the job to recover (runs resume from their
checkpoints).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
DEFAULT_TIMEOUT_SECONDS = 600.0
# How long `Group.close` lets gloo's worker threads finish with the last collective.
CLOSE_SETTLE_SECONDS = 0.1


class DistributedError(RuntimeError):
    """A collective failed: a rank died, hung past the deadline, or the group broke earlier."""


def timeout_seconds() -> float:
    return float(os.environ.get("BIOS_DIST_TIMEOUT", DEFAULT_TIMEOUT_SECONDS))


def choose_backend() -> str:
    """gloo on CPU; with CUDA, nccl for CUDA tensors and gloo for CPU ones."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def env_world_size() -> int:
    """The world size torchrun (or any env:// launcher) set for this process; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Group:
    """This process's view of the job: its rank, the two process groups, and their health."""

    def __init__(self) -> None:
        timeout = timedelta(seconds=timeout_seconds())
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=choose_backend(), timeout=timeout)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.backend = str(dist.get_backend())
        self.timeout = timeout.total_seconds()
        self.control = dist.new_group(backend="gloo", timeout=timeout)
        # Rank 0: held while a command and its collectives run, so that the commands of several
        # base models' worker threads never interleave their collectives.
        self.lock = threading.RLock()
        self.broken: str | None = None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # ---- failures -----------------------------------------------------------------------------

    def check(self) -> None:
        if self.broken is not None:
            raise DistributedError(self.broken)

    def collective(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args)`, a collective; its failure breaks the group with a message naming `what`."""
        self.check()
        try:
            return fn(*args, **kwargs)
        except DistributedError:
            raise
        except Exception as error:  # gloo raises RuntimeError; the message says which peer
            self.fail(
                f"{what}: a rank died or stopped responding (deadline {self.timeout:g} s): "
                f"{str(error).strip()}"
            )
            raise DistributedError(self.broken) from error

    def fail(self, reason: str) -> None:
        """Mark the group broken: every later request fails at once with this message."""
        if self.broken is None:
            self.broken = (
                f"distributed training failed on rank {self.rank} of {self.world} during "
                f"{reason.strip()}. The ranks may be out of step, so this job takes no more "
                "requests: restart it (runs resume from their saved checkpoints)"
            )

    # ---- the collectives Bios uses ------------------------------------------------------------

    def broadcast(self, obj: object, what: str) -> Any:
        """Rank 0's `obj` on every rank (control group, pickled)."""
        box = [obj]
        self.collective(what, dist.broadcast_object_list, box, src=0, group=self.control)
        return box[0]

    def scatter(self, objs: list[Any] | None, what: str) -> Any:
        """Rank r gets rank 0's `objs[r]` (control group, pickled)."""
        out: list[Any] = [None]
        self.collective(
            what,
            dist.scatter_object_list,
            out,
            objs if self.is_leader else None,
            src=0,
            group=self.control,
        )
        return out[0]

    def gather(self, obj: object, what: str) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        out = [None] * self.world if self.is_leader else None
        self.collective(what, dist.gather_object, obj, out, dst=0, group=self.control)
        return out

    def all_reduce_sum(self, tensor: torch.Tensor, what: str) -> None:
        self.collective(what, dist.all_reduce, tensor, op=dist.ReduceOp.SUM)

    def broadcast_tensor(self, tensor: torch.Tensor, what: str) -> None:
        self.collective(what, dist.broadcast, tensor, src=0)

    def monitored_barrier(self, what: str) -> None:
        """A barrier that names the ranks that did not arrive (gloo's monitored barrier)."""
        self.collective(
            what,
            dist.monitored_barrier,
            group=self.control,
            timeout=timedelta(seconds=self.timeout),
            wait_all_ranks=True,
        )

    def close(self) -> None:
        """Leave the job, after this rank's last collective. gloo's worker thread lets go of
        that collective's tensors just after it returns, and doing so takes the GIL: were the
        interpreter already finalizing by then, Python would end the thread inside a noexcept
        destructor and the process would abort ("terminate called without an active
        exception", SIGABRT; seen in 1 of about 5 runs of the two-rank tests on a 2-core
        machine). So this waits a moment, the GIL released, before letting the group go."""
        if dist.is_initialized():
            time.sleep(CLOSE_SETTLE_SECONDS)
            dist.destroy_process_group()
