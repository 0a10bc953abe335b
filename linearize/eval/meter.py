"""Wall time, throughput and peak memory of one stretch of evaluation.

``Meter(model)`` counts the tokens that go through ``model``'s forward (a forward pre-hook: the
attention mask's ones, else every input id, so right padding is not counted) and the peak memory:
on CUDA ``torch.cuda.max_memory_allocated`` (reset at the start), on CPU the process's peak resident
set size (``VmHWM``, reset through ``/proc/self/clear_refs`` where Linux allows it; otherwise the
peak since the process started, flagged ``"since_start": True``).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

MB = 2**20


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


def _cpu_peak_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class Meter:
    """``with Meter(model) as m: ...`` then ``m.result()``."""

    def __init__(self, model=None, device: torch.device | str | None = None):
        self.model = model
        self.device = torch.device(device) if device is not None else _device(model)
        self.tokens = 0
        self.forwards = 0
        self.seconds = 0.0
        self.peak = 0
        self.since_start = False
        self._hook = None

    def _count(self, _module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None:
            self.tokens += int(mask.sum().item())
        elif ids is not None:
            self.tokens += ids.numel()
        self.forwards += 1

    def __enter__(self) -> "Meter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.since_start = not _reset_cpu_peak()
        if self.model is not None:
            self._hook = self.model.register_forward_pre_hook(self._count, with_kwargs=True)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _cpu_peak_bytes()
        self.seconds = time.perf_counter() - self._t0
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def result(self) -> dict:
        out = {
            "seconds": round(self.seconds, 2),
            "tokens": self.tokens,
            "forwards": self.forwards,
            "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds > 0 else None,
            "peak_mem_mb": round(self.peak / MB, 1),
            "memory": "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss",
        }
        if self.since_start:
            out["since_start"] = True
        return out
