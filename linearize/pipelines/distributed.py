"""Processes of a run: who am I (rank), how many are we (world), which device is mine.

A run is single-process unless it was started by ``torchrun`` (or ``linearize convert --nproc N``,
which calls torchrun), which sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. With more than one process, :func:`setup` checks the set-up (rendezvous, devices),
initialises ``torch.distributed`` (NCCL for CUDA tensors, gloo for CPU tensors and Python objects)
and returns a :class:`Dist` with the few collectives the pipeline needs. With one process every
helper is a no-op, so the single-process path runs exactly the code it ran before.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

#: what torchrun sets for every worker; all are needed when WORLD_SIZE > 1
RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: long enough for rank 0 to evaluate, sample and export alone while the others wait
WAIT_TIMEOUT = timedelta(hours=2)


class DistributedError(RuntimeError):
    """A multi-process set-up that cannot work; the message (one line) says how to fix it."""


@dataclass
class Dist:
    """This process's place in the run. ``group`` is a gloo group for objects and barriers (None alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: Any = None
    owns_group: bool = False  # setup() initialised torch.distributed, so teardown() ends it

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.group)

    def all_reduce(self, value: torch.Tensor, op: str) -> torch.Tensor:
        """Sum (``op="sum"``) or mean (``"mean"``) of ``value`` over ranks, on its own device; returns it."""
        if self.enabled:
            group = self.group if value.device.type == "cpu" else None
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
            if op == "mean":
                value /= self.world
        return value

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def broadcast_tensors(self, tensors: Iterator[torch.Tensor] | list[torch.Tensor], src: int = 0) -> None:
        """Make ``tensors`` (same shapes on every rank) equal to rank ``src``'s, in place."""
        if not self.enabled:
            return
        for t in tensors:
            group = self.group if t.device.type == "cpu" else None
            dist.broadcast(t.data, src=src, group=group)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Point-to-point send to rank ``dst`` (NCCL for CUDA tensors, gloo for CPU ones); pairs with :meth:`recv`."""
        dist.send(tensor, dst, group=self.group if tensor.device.type == "cpu" else None)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``tensor`` (its shape and dtype must be the sender's) from rank ``src``; returns it."""
        dist.recv(tensor, src, group=self.group if tensor.device.type == "cpu" else None)
        return tensor

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Let rank 0 do a cached step (download, dequantize, tokenize) before the others read the cache."""
        if self.enabled and not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.enabled and self.is_main:
                self.barrier()


SINGLE = Dist()


def world_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from torchrun's variables; one-line errors for a half-set rendezvous."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={env['WORLD_SIZE']!r} is not a number") from None
    if world < 1:
        raise DistributedError(f"WORLD_SIZE={world} must be >= 1")
    if world == 1:
        return 0, 1, 0
    missing = [v for v in RENDEZVOUS_VARS if not env.get(v)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={world} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set (no rendezvous): "
            f"start the run with `linearize convert ... --nproc {world}` or `torchrun --nproc_per_node {world} -m linearize convert ...`"
        )
    rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local_rank


def local_device(name: str, local_rank: int, world: int, cuda_count: int | None = None) -> torch.device:
    """This rank's device for ``device=auto|cpu|cuda``: ``cuda:LOCAL_RANK`` on GPU hosts, else the CPU."""
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if name == "cuda" and count == 0:
        raise DistributedError("device=cuda was asked for but CUDA is not available; use --set device=cpu")
    if name == "auto":
        name = "cuda" if count > 0 else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if world > 1 and local_rank >= count:
        raise DistributedError(
            f"LOCAL_RANK={local_rank} needs GPU {local_rank} but this host sees {count} GPU(s): start at most "
            f"{count} process(es) per host (--nproc / --nproc_per_node {count}) or use --set device=cpu"
        )
    return torch.device("cuda", local_rank) if world > 1 else torch.device("cuda")


def check_same_device_type(types: list[str]) -> None:
    """All ranks must train on one kind of device (a CPU rank cannot join an NCCL all-gather)."""
    if len(set(types)) > 1:
        where = ", ".join(f"rank {r}: {t}" for r, t in enumerate(types))
        raise DistributedError(
            f"mixed devices across ranks ({where}): give every process a GPU, or run all on the CPU with --set device=cpu"
        )


def setup(device_name: str, env: Mapping[str, str] | None = None) -> Dist:
    """Initialise the process group when launched with WORLD_SIZE > 1; otherwise return a single-process Dist."""
    rank, world, local_rank = world_from_env(env)
    if world == 1:
        return Dist()  # the single-process path picks its device as it always has
    device = local_device(device_name, local_rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        # NCCL for CUDA tensors (gradients, all-gathers); gloo for CPU tensors. The gloo side is created on
        # every rank whatever its device, so the device check below can run even on a mixed set-up.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=WAIT_TIMEOUT)
    group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    out = Dist(rank=rank, world=world, local_rank=local_rank, device=device, group=group, owns_group=owns)
    check_same_device_type(out.all_gather_object(device.type))
    return out


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def split_blocks(layer_ids: list[int], world: int) -> list[tuple[int, int]]:
    """Contiguous blocks ``[a, b)`` of decoder layers, one per rank, holding near-equal counts of the trained layers.

    ``layer_ids`` are the (sorted) indices of the layers attention transfer trains. Blocks differ in size by
    at most one trained layer; a rank with no layer would idle, so that is an error.
    """
    n = len(layer_ids)
    if world > n:
        raise DistributedError(
            f"block-wise attention transfer needs at least one trained layer per process, but {world} processes share "
            f"{n} layer(s): use --nproc {n} or fewer (or set stage1.steps=0)"
        )
    base, extra = divmod(n, world)
    blocks, start = [], 0
    for r in range(world):
        size = base + (1 if r < extra else 0)
        ids = layer_ids[start : start + size]
        blocks.append((ids[0], ids[-1] + 1))
        start += size
    return blocks
