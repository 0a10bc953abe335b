"""Where a training step's time goes: torch.profiler over a few steps of a real run, on request.

    LINEARIZE_PROFILE=START:COUNT linearize convert ...        # e.g. 10:3, steps counted from 0 in each stage

Every process writes ``profile-<stage>-rank<r>.md`` next to the run's ``metrics.jsonl``: wall time a step, the
GPU-busy fraction (the union of kernel intervals over the wall time; far under 1 means the host launching
kernels is the bound, not the GPU), kernels a step, and the top ops by host time and by device time. With
several processes, comparing the ranks' files with a one-process run's shows what FSDP adds to a step.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

ENV = "LINEARIZE_PROFILE"


def parse_window(spec: str | None) -> tuple[int, int] | None:
    """``"START:COUNT"`` -> (start, stop) steps; None or empty -> None."""
    if not spec:
        return None
    try:
        start, count = (int(x) for x in spec.split(":"))
        if start < 0 or count < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: expected START:COUNT with START >= 0 and COUNT >= 1 (e.g. 10:3)") from None
    return start, start + count


def gpu_busy(prof, wall_s: float) -> tuple[float, int]:
    """(union of the kernel intervals / wall time, number of kernels) from a finished profiler."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA")
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy / 1e6 / wall_s, len(spans)


def top_ops(prof, key: str, limit: int = 25) -> list[dict]:
    """The ``limit`` ops with the most ``key`` time (``self_cpu_time_total`` or ``self_device_time_total``)."""
    rows = sorted(prof.key_averages(), key=lambda a: getattr(a, key, 0), reverse=True)
    return [{"name": a.key[:100], "calls": a.count, "ms": getattr(a, key, 0) / 1e3} for a in rows[:limit] if getattr(a, key, 0) > 0]


class StepProfiler:
    """Profiles steps [start, stop) of one stage's loop when ``LINEARIZE_PROFILE`` asks for it (else does nothing)."""

    def __init__(self, stage: str, out_dir: Path, rank: int = 0, spec: str | None = None):
        self.window = parse_window(os.environ.get(ENV) if spec is None else spec)
        self.stage, self.out_dir, self.rank = stage, Path(out_dir), rank
        self.prof, self.t0, self.steps = None, 0.0, 0

    def before(self, step: int) -> None:
        if self.window is None or step != self.window[0]:
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._sync()
        self.prof = profile(activities=acts)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def after(self, step: int, last: bool = False) -> Path | None:
        """Call after each step; returns the report's path once the window (or the stage) has ended."""
        if self.prof is None:
            return None
        self.steps += 1
        if step + 1 < self.window[1] and not last:
            return None
        self._sync()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        path = self.write(wall)
        self.prof = None
        return path

    def write(self, wall_s: float) -> Path:
        busy, kernels = gpu_busy(self.prof, wall_s)
        n = max(self.steps, 1)
        cuda = torch.cuda.is_available()
        lines = [
            f"# Profile: {self.stage}, rank {self.rank}, steps {self.window[0]}..{self.window[0] + n - 1}", "",
            f"torch {torch.__version__}; device {torch.cuda.get_device_name() if cuda else 'cpu'}", "",
            f"- wall time a step: {wall_s / n * 1e3:.1f} ms",
        ]
        if cuda:
            lines += [f"- GPU busy: {100 * busy:.0f}% of the wall time", f"- kernels a step: {kernels / n:.0f}"]
        for title, key in (("host (self CPU time)", "self_cpu_time_total"), ("device (self time)", "self_device_time_total")):
            ops = top_ops(self.prof, key)
            if not ops:
                continue
            lines += ["", f"## Top ops by {title}, over the {n} steps", "", "| op | calls | ms |", "|---|---:|---:|"]
            lines += [f"| `{o['name']}` | {o['calls']} | {o['ms']:.2f} |" for o in ops]
        path = self.out_dir / f"profile-{self.stage}-rank{self.rank}.md"
        path.write_text("\n".join(lines) + "\n")
        return path

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
