"""Atomic training checkpoints: a directory per checkpoint, published by renaming, plus a LATEST pointer.

A checkpoint is written to a hidden temporary directory, flushed, renamed into place, and only then
named in ``LATEST`` (itself replaced atomically). A run killed at any instant therefore leaves either
the previous good checkpoint or the new one, never a partial one that resuming would take as good.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..fetch import write_atomic

LATEST = "LATEST"


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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    stage: str
    step: int
    path: Path

    def load_weights(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / "trainable.safetensors")

    def load_training_state(self) -> dict[str, Any]:
        return torch.load(self.path / "training_state.pt", weights_only=False)


class CheckpointManager:
    """Saves and finds checkpoints under ``root`` (e.g. ``OUT/checkpoints``); keeps the last ``keep``."""

    def __init__(self, root: Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def save(self, stage: str, step: int, weights: dict[str, torch.Tensor], training_state: dict[str, Any]) -> Checkpoint:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"{stage}-step{step:07d}"
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-{name}-"))
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "trainable.safetensors")
            torch.save(training_state, tmp / "training_state.pt")
            atomic_write_json(tmp / "meta.json", {"stage": stage, "step": step})
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            final = self.root / name
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_json(self.root / LATEST, {"stage": stage, "step": step, "dir": name})
        self._prune(keep_name=name)
        return Checkpoint(stage, step, final)

    def latest(self) -> Checkpoint | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        try:
            meta = json.loads(pointer.read_text())
            path = self.root / meta["dir"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"corrupt checkpoint pointer {pointer} ({e}); delete it to start over") from None
        if not (path / "trainable.safetensors").exists() or not (path / "training_state.pt").exists():
            raise ValueError(f"checkpoint {path} named in {pointer} is missing files; delete {self.root} to start over")
        return Checkpoint(meta["stage"], int(meta["step"]), path)

    def _prune(self, keep_name: str) -> None:
        for tmp in self.root.glob(".tmp-*"):  # left by a run killed mid-save
            shutil.rmtree(tmp, ignore_errors=True)
        done = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        done = [p for p in done if p.name != keep_name]
        for old in done[: max(0, len(done) - (self.keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
