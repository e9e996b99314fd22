"""Multi-process data-parallel training: ``torchrun --nproc_per_node=N -m gatelab train CONFIG``.

:func:`session` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), starts the
process group (gloo on the CPU, nccl on CUDA) and ends it; without that environment it yields a
one-process :class:`Group` whose operations do nothing, so the trainer has one code path.

Every rank computes the same global batch of step ``k`` (a pure function of ``(seed, k)``,
:mod:`gatelab.data`) and trains on its own rows of it (:meth:`Group.shard`); each rank's loss is its
share of the global mean, so DDP's averaged gradient is the one-process gradient of the same global
batch, up to the order of the float sums.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .data import Unit

__all__ = ["Group", "session", "cores", "threads_per_rank", "replicate", "Replicated", "rank_seed", "DistributedError"]


class DistributedError(RuntimeError):
    """Rank 0 failed where the other ranks wait for it; they stop with its message."""


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Group:
    """The ranks training one run; ``Group()`` is a single process and every method is then a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this machine (they share its cores)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run's files and evaluates."""
        return self.rank == 0

    def shard_rows(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` (near-equal contiguous blocks, rank order)."""
        bounds = np.linspace(0, n, self.world + 1).round().astype(int)
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    def shard(self, unit: Unit) -> Unit:
        """This rank's rows of the global unit ``unit``."""
        if not self.active:
            return unit
        rows = self.shard_rows(unit.x.shape[0])
        return unit._replace(x=unit.x[rows], y=unit.y[rows],
                             lengths=None if unit.lengths is None else unit.lengths[rows])

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks (a new tensor)."""
        t = t.detach().clone()
        if self.active:
            dist.all_reduce(t)
        return t

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def first(self, fn: Any) -> Any:
        """``fn()`` on rank 0 only, its result on every rank; if it raises, rank 0 re-raises it and the
        others raise :class:`DistributedError` with its message (instead of waiting for it forever)."""
        if not self.active:
            return fn()
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except BaseException as err:
                error = err
        message = self.broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise DistributedError(f"rank 0 failed, so rank {self.rank} stops: {message}")
        return self.broadcast(result)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _environment() -> tuple[int, int, int, int] | None:
    """``(rank, world, local_rank, local_world)`` from torchrun's variables, or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as err:
        raise DistributedError(f"torchrun's environment is not a set of integers ({err})") from None
    return rank, world, local_rank, local_world


TIMEOUT_VARIABLE = "GATELAB_DDP_TIMEOUT_MINUTES"


def timeout_minutes() -> float:
    """How long a collective waits for the other ranks before it fails: ``$GATELAB_DDP_TIMEOUT_MINUTES``,
    default 30 (a rank-0 evaluation of a large validation split must fit inside it)."""
    raw = os.environ.get(TIMEOUT_VARIABLE, "30")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise DistributedError(f"{TIMEOUT_VARIABLE} must be a positive number of minutes, got {raw!r}")
    return value


def main_process() -> bool:
    """Whether this process writes what a whole launch writes once: rank 0 of a process group the caller
    started, else rank 0 of a torchrun launch (read from its environment, before any group exists), else
    any process."""
    if dist.is_available() and dist.is_initialized():  # a group of the caller's own, as session() uses it
        return dist.get_rank() == 0
    env = _environment()
    return env is None or env[0] == 0


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[Group]:
    """The process group of a torchrun launch for the duration of a run.

    Under torchrun with ``WORLD_SIZE > 1`` it starts the group (gloo for the CPU, nccl for CUDA, where
    rank ``r`` uses GPU ``LOCAL_RANK``) and destroys it at the end; a group the caller started already
    is used as it is and left running. Otherwise it yields ``Group()``."""
    if dist.is_available() and dist.is_initialized():
        env = _environment()
        local = env[2:] if env else (dist.get_rank(), dist.get_world_size())
        yield Group(dist.get_rank(), dist.get_world_size(), *local)
        return
    env = _environment()
    if env is None or env[1] <= 1:
        yield Group()
        return
    rank, world, local_rank, local_world = env
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=timeout_minutes()))
    try:
        yield Group(rank, world, local_rank, local_world)
    finally:
        dist.destroy_process_group()


def threads_per_rank(threads: int, group: Group, n_cores: int | None = None) -> tuple[int, str | None]:
    """``(torch threads for this rank, a message when capped)``: the ranks on this machine times their
    threads never exceed its cores. ``threads = 0`` (torch's default) becomes cores / ranks."""
    if not group.active:
        return threads, None
    n_cores = n_cores or cores()
    fair = max(1, n_cores // group.local_world)
    if threads == 0:
        return fair, None
    if threads * group.local_world <= n_cores:
        return threads, None
    return fair, (f"train.threads = {threads} on each of {group.local_world} ranks would need "
                  f"{threads * group.local_world} cores, and this machine has {n_cores}: each rank uses {fair}"
                  + (" (more ranks than cores: they share them)" if group.local_world > n_cores else ""))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own randomness (dropout): rank 0 keeps ``seed``, the others differ."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**64, rank]).generate_state(1, np.uint64)[0]) % 2**63


class Replicated(DistributedDataParallel):
    """DistributedDataParallel whose other attributes are the model's (``criterion``, ``n_targets``), so
    :func:`gatelab.train.unit_loss` reads the same over one process or many."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def replicate(model: torch.nn.Module, group: Group, device: torch.device) -> torch.nn.Module:
    """``model`` in DDP across ``group`` (rank 0's parameters broadcast to all), or ``model`` itself."""
    if not group.active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    # gatelab's models change no buffer while training, so syncing them before each forward is wasted
    quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
             else {"broadcast_buffers": False})  # the older name, deprecated in torch 2.13
    return Replicated(model, device_ids=ids, **quiet)
