"""Data-parallel training under ``torchrun``: the process group kiln's C++ trainer trains on.

``torchrun --nproc-per-node N src/train_model.py ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`from_environment`
sees them and creates the default group with ``torch.distributed.init_process_group`` (``gloo`` on the
CPU, ``nccl`` on CUDA, or ``dist_backend``); the C++ trainer finds that same group by its name
(``group_name``) in c10d's registry and runs every collective on it. Without ``WORLD_SIZE`` (no
torchrun) there is no group and training is single-process, exactly as before.

Rank 0 alone talks to MLflow and writes checkpoints and plots; what every rank must agree on (the run
id, the checkpoint to resume from, an error) is decided on rank 0 and broadcast (:meth:`Distributed.from_rank0`).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

BACKENDS = ("auto", "gloo", "nccl")


class DistributedError(RuntimeError):
    """Another rank of a data-parallel job failed; the message names it and its error."""


def _same_kind(kind: str, message: str) -> Exception:
    """The error a rank raises for another rank's failure: of the same kind when it is one the user
    fixes (a missing path, a bad value, MLflow unusable), so every rank reports it the same way."""
    from kiln.tracking import TrackingError

    kinds: dict[str, type[Exception]] = {
        "FileNotFoundError": FileNotFoundError,
        "ValueError": ValueError,
        "TrackingError": TrackingError,
    }
    return kinds.get(kind, DistributedError)(message)


def _kind(error: BaseException) -> str:
    from kiln.tracking import TrackingError

    for kind in (FileNotFoundError, ValueError, TrackingError):
        if isinstance(error, kind):
            return kind.__name__
    return type(error).__name__


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job and the process group it trains on."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    group_name: str  # the C++ trainer's process_group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def from_rank0(self, compute: Callable[[], T], what: str, share: Callable[[T], Any] | None = None) -> Any:
        """``compute()`` on rank 0: rank 0 gets its result, the other ranks ``share(result)`` (the
        result itself by default; it is pickled, so ``share`` keeps what they need of it). When it
        raises, every rank raises (rank 0 its own error, the others a DistributedError naming it), so
        no rank waits for the others."""
        import torch.distributed as dist

        payload: list[Any] = [None]
        error: BaseException | None = None
        result: Any = None
        if self.is_main:
            try:
                result = compute()
                payload = [("ok", share(result) if share is not None else result)]
            except Exception as failure:
                error = failure
                payload = [("error", (_kind(failure), f"{type(failure).__name__}: {failure}"))]
        dist.broadcast_object_list(payload, src=0)
        status, value = payload[0]
        if status == "error":
            if error is not None:
                raise error
            kind, message = value
            raise _same_kind(kind, f"rank 0 failed in {what}: {message}")
        return result if self.is_main else value

    def check_everywhere(self, check: Callable[[], None], what: str) -> None:
        """Run ``check()`` on every rank; if it raises on any, raise on every rank, naming each rank
        (and host) that failed and why: one rank's missing data dir stops the whole job at once."""
        import torch.distributed as dist

        failure: tuple[str, str] | None = None
        try:
            check()
        except Exception as raised:
            failure = (_kind(raised), f"rank {self.rank} on {socket.gethostname()}: {raised}")
        failures: list[tuple[str, str] | None] = [None] * self.world_size
        dist.all_gather_object(failures, failure)
        failed = [item for item in failures if item is not None]
        if not failed:
            return
        message = f"{what} failed on {len(failed)} of {self.world_size} ranks: " + "; ".join(m for _, m in failed)
        raise _same_kind(failed[0][0], message)

    def files_from_rank0(self, path: Path) -> None:
        """Make rank 0's file at ``path`` (a checkpoint to resume from) exist at ``path`` on every
        rank: sent over the group to the ranks that lack it (other machines without shared storage)."""
        import torch
        import torch.distributed as dist

        device = f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"
        present = torch.tensor([1 if path.is_file() else 0], device=device)
        dist.all_reduce(present, op=dist.ReduceOp.MIN)
        if int(present.item()) == 1:
            return
        payload = [path.read_bytes() if self.is_main else None]
        dist.broadcast_object_list(payload, src=0)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.rank{self.rank}")
            partial.write_bytes(payload[0])
            os.replace(partial, path)


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (``--max-restarts``); 0 otherwise."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def training_device(device: str) -> str:
    """Under torchrun, ``cuda`` is this process's own GPU, ``cuda:<LOCAL_RANK>``."""
    if device == "cuda" and under_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def from_environment(device: str, backend: str = "auto", timeout_s: float = 1800) -> Distributed | None:
    """The process group of this torchrun worker, created on first use; None without torchrun.

    ``backend`` ``auto`` is ``nccl`` when training on CUDA, else ``gloo``. ``timeout_s`` bounds every
    collective: a rank that died or hangs makes the others fail after that long instead of waiting
    forever (torchrun usually stops them sooner, when it sees the failed worker exit).
    """
    if not under_torchrun():
        return None
    import torch
    import torch.distributed as dist

    if backend not in BACKENDS:
        raise ValueError(f"dist_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if timeout_s <= 0:
        raise ValueError(f"dist_timeout_s must be positive, got {timeout_s}")
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" and not device.startswith("cuda"):
        raise ValueError(
            f"dist_backend=nccl reduces GPU tensors but training runs on {device}: "
            "set no_cuda=false on a machine with GPUs, or dist_backend=gloo"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise ValueError(
                    f"WORLD_SIZE is set but {key} is not: start data-parallel training with torchrun "
                    "(torchrun --nproc-per-node N src/train_model.py ...)"
                )
        timeout = timedelta(seconds=timeout_s)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun keeps its store across --max-restarts rounds: without a prefix per round, a restarted
        # worker could read a dead worker's address from the round before and fail to connect.
        store = dist.PrefixStore(f"kiln/restart-{restart_count()}/", store)
        options: dict[str, Any] = {"store": store, "rank": rank, "world_size": world_size}
        if backend == "nccl":
            options["device_id"] = torch.device(device)
        dist.init_process_group(backend, timeout=timeout, **options)
        atexit.register(_destroy)
    group = dist.group.WORLD
    return Distributed(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=dist.get_backend(group),
        group_name=group.group_name,
    )


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def quiet_other_ranks(distributed: Distributed | None) -> None:
    """Ranks other than 0 log warnings and errors only: one rank's log tells the job's story."""
    if distributed is not None and not distributed.is_main:
        logging.getLogger().setLevel(logging.WARNING)
        for name in ("kiln", "__main__"):
            logging.getLogger(name).setLevel(logging.WARNING)
