"""One run's test images over several processes or GPUs: ``torch.distributed``, as ``torchrun`` starts it.

    torchrun --standalone --nproc-per-node 4 -m medcert_core certify-runs --profile jsrt --data-root DATA

Each rank certifies the test images ``rank, rank + N, rank + 2N, ...`` of a run (:class:`Shard`);
every image's noise comes from a generator seeded from (run seed, image id), so a certificate does
not depend on which rank computed it. Rank 0 gathers the ranks' rows and maps, writes the run into
the results store, and the ranks meet at a barrier before the next run. With one process (or none
of torchrun's variables) nothing here is used and a run is computed as always.

The process group is gloo's: it runs on CPUs and carries the small Python objects gathered (rows,
label maps); the certification itself runs on each rank's own device (on CUDA, the GPU of its
``LOCAL_RANK``). Collectives wait up to ``MEDCERT_DIST_TIMEOUT_S`` seconds (default 12 h: a rank
may wait while another trains a model the run needs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

DEFAULT_TIMEOUT_S = 12 * 3600


@dataclass(frozen=True)
class Shard:
    """This process's part of every run: images ``rank, rank + world_size, ...``."""

    rank: int = 0
    world_size: int = 1

    def indices(self, count: int) -> range:
        return range(self.rank, count, self.world_size)

    @property
    def first(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher setting RANK / WORLD_SIZE) started several processes."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(timeout_s: float | None = None) -> Shard | None:
    """Join the process group the launcher describes (env://, gloo) and, on CUDA, take the GPU of
    ``LOCAL_RANK``; returns this process's shard, or None when not launched with several processes."""
    if not launched_by_torchrun():
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" / "auto" now mean this GPU
        seconds = timeout_s if timeout_s is not None else float(os.environ.get("MEDCERT_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        dist.init_process_group("gloo", timeout=timedelta(seconds=seconds))
    return current()


def current() -> Shard | None:
    """This process's shard when a process group of several processes is initialized; else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Shard(dist.get_rank(), dist.get_world_size())
    return None


def gather_to_first(value: Any) -> list[Any] | None:
    """Every rank's ``value``, in rank order, on rank 0 (None on the others)."""
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def from_first(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a decision all ranks must take alike)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def shutdown() -> None:
    """Leave the process group (if any)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
