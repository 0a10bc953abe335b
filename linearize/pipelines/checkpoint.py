"""Atomic, distributed-aware training checkpoints (torch.distributed.checkpoint), plus a LATEST pointer.

A checkpoint is a directory: the trainable weights and the optimizer state in DCP format (one shard
file per process, keyed by parameter name, so a run can resume with another number of processes:
DCP reshards on load), ``extras-rank<r>.pt`` (schedule and RNG state of each process) and
``meta.json``. All processes write into one hidden temporary directory; once every one has finished
(a barrier), rank 0 flushes it, renames it into place and only then names it in ``LATEST`` (itself
replaced atomically). A run killed at any instant therefore leaves either the previous good
checkpoint or the new one, never a partial one that resuming would take as good.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from ..fetch import write_atomic
from .distributed import SINGLE, Dist

LATEST = "LATEST"
#: optimizer state keyed by parameter name (``state.<name>.exp_avg``), so it reshards across process counts
OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def atomic_write_text(path: Path, text: str) -> None:
    write_atomic(path, text)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _single_ok(single: bool):
    """DCP warns that it assumes one process when torch.distributed is off; one process is what we mean."""
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _dcp_state(weights: dict[str, torch.Tensor], model: nn.Module | None, optimizer) -> dict[str, Any]:
    state: dict[str, Any] = {"trainable": {k: v.detach() for k, v in weights.items()}}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=OPTIM_OPTIONS)
    return state


@dataclass
class Checkpoint:
    stage: str
    step: int
    path: Path
    world_size: int = 1

    def load_weights(self) -> dict[str, torch.Tensor]:
        """All trainable weights as full CPU tensors, read by this process alone (whatever wrote them)."""
        reader = dcp.FileSystemReader(self.path)
        meta = reader.read_metadata()
        out = {
            key[len("trainable.") :]: torch.empty(m.size, dtype=m.properties.dtype)
            for key, m in meta.state_dict_metadata.items()
            if key.startswith("trainable.") and isinstance(m, dcp.TensorStorageMetadata)
        }
        with _single_ok(True):
            dcp.load({"trainable": out}, storage_reader=reader, no_dist=True)
        return out

    def load_extras(self, rank: int = 0) -> dict[str, Any]:
        """This rank's schedule/RNG state; rank 0's when the checkpoint was written by fewer processes."""
        path = self.path / f"extras-rank{rank}.pt"
        if not path.exists():
            path = self.path / "extras-rank0.pt"
        return torch.load(path, weights_only=False)

    def restore(
        self, params: dict[str, torch.Tensor], model: nn.Module | None = None, optimizer=None, dist: Dist = SINGLE
    ) -> dict[str, Any]:
        """Load ``params`` (name -> parameter, plain or sharded) and the optimizer in place; return the extras.

        Every rank asks for the names it holds now; DCP reads them from whichever shard files hold them,
        so the process count (and the split of layers or of FSDP shards) may differ from the saving run.
        """
        state = _dcp_state(params, model, optimizer)
        with _single_ok(not dist.enabled):
            dcp.load(state, checkpoint_id=self.path, process_group=dist.group, no_dist=not dist.enabled)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optimizer"], options=OPTIM_OPTIONS)
        return self.load_extras(dist.rank)


class CheckpointManager:
    """Saves and finds checkpoints under ``root`` (e.g. ``OUT/checkpoints``); keeps the last ``keep``."""

    def __init__(self, root: Path, keep: int = 2, dist: Dist = SINGLE):
        self.root = Path(root)
        self.keep = keep
        self.dist = dist

    def save(
        self,
        stage: str,
        step: int,
        weights: dict[str, torch.Tensor],
        extras: dict[str, Any],
        *,
        model: nn.Module | None = None,
        optimizer=None,
    ) -> Checkpoint:
        """Save this rank's ``weights`` (and ``optimizer``, whose names come from ``model``); every rank calls it."""
        d = self.dist
        name = f"{stage}-step{step:07d}"
        tmp = None
        if d.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=self.root, prefix=f".tmp-{name}-")
        tmp = Path(d.broadcast_object(tmp))
        try:
            with _single_ok(not d.enabled):
                dcp.save(_dcp_state(weights, model, optimizer), checkpoint_id=tmp, process_group=d.group, no_dist=not d.enabled)
            with open(tmp / f"extras-rank{d.rank}.pt", "wb") as f:
                torch.save(extras, f)
                f.flush()
                os.fsync(f.fileno())
            d.barrier()  # every rank's files are in tmp
            final = self.root / name
            if d.is_main:
                atomic_write_json(tmp / "meta.json", {"stage": stage, "step": step, "world_size": d.world})
                _fsync_tree(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.rename(tmp, final)
        except BaseException:
            if d.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if d.is_main:
            atomic_write_json(self.root / LATEST, {"stage": stage, "step": step, "dir": name})
            self._prune(keep_name=name)
        d.barrier()  # nobody starts the next step (or reads LATEST) before it is published
        return Checkpoint(stage, step, final, d.world)

    def latest(self) -> Checkpoint | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        try:
            meta = json.loads(pointer.read_text())
            path = self.root / meta["dir"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"corrupt checkpoint pointer {pointer} ({e}); delete it to start over") from None
        if not (path / ".metadata").exists() or not (path / "meta.json").exists() or not (path / "extras-rank0.pt").exists():
            raise ValueError(f"checkpoint {path} named in {pointer} is missing files; delete {self.root} to start over")
        world = json.loads((path / "meta.json").read_text()).get("world_size", 1)
        return Checkpoint(meta["stage"], int(meta["step"]), path, int(world))

    def _prune(self, keep_name: str) -> None:
        for tmp in self.root.glob(".tmp-*"):  # left by a run killed mid-save
            shutil.rmtree(tmp, ignore_errors=True)
        done = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        done = [p for p in done if p.name != keep_name]
        for old in done[: max(0, len(done) - (self.keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
