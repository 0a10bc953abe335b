"""GPU timing: eager medians through triton.testing.do_bench, CUDA-graph replays, and the two ceilings.

* ``time_eager``: do_bench's median. do_bench flushes the L2 cache (it writes a 256 MB buffer) before
  every timed call and times each call with CUDA events, so eager numbers are cold-cache numbers and
  need no input rotation. Without Triton, the same loop with CUDA events.
* ``time_graph``: one CUDA graph that runs the function once per input set (rotating among sets when the
  inputs would fit in L2), replayed many times; the median replay time over the number of sets.
* ``measure_ceilings``: a large device-to-device copy (bytes read + written) and an 8192^3 bf16 matmul.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Sequence

import torch


def l2_bytes() -> int:
    if not torch.cuda.is_available():
        return 0
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def rotation_sets(input_bytes: float, max_sets: int = 8) -> int:
    """How many input sets to rotate among so that consecutive calls never find theirs in L2 (2x margin)."""
    if input_bytes <= 0 or l2_bytes() == 0:
        return 1
    return max(1, min(max_sets, math.ceil(2 * l2_bytes() / input_bytes)))


def time_eager(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 5) -> float:
    """Median milliseconds of ``fn()`` (cold L2 each call). ``fn`` must already be compiled/tuned.

    Slow functions get at least ``min_reps`` timed calls (do_bench would otherwise time a single one).
    On a CPU device (dry runs of the benchmark's logic) a wall-clock median, which is no GPU claim.
    """
    if not torch.cuda.is_available():
        return _time_wall(fn, min_reps)
    est = _median_events(fn, 1, None)
    rep_ms = max(rep_ms, min_reps * est * 1.2)
    try:
        import triton.testing
    except ImportError:
        return _time_events(fn, warmup_ms, rep_ms)
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _time_wall(fn: Callable[[], object], n: int) -> float:
    import time

    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_events(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
    est = _median_events(fn, 5, flush)
    for _ in range(max(1, int(warmup_ms / max(est, 1e-3)))):
        fn()
    return _median_events(fn, max(5, min(1000, int(rep_ms / max(est, 1e-3)))), flush)


def _median_events(fn: Callable[[], object], n: int, flush: torch.Tensor | None) -> float:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_graph(fns: Sequence[Callable[[], object]], rep_ms: float = 100) -> float:
    """Median milliseconds per call of the functions captured back to back in one CUDA graph.

    ``fns`` holds one closure per input set (same work, different buffers). Warm-up runs on a side
    stream first, as capture requires; tensors the closures allocate live in the graph's pool.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need CUDA")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        est = _median_events(graph.replay, 5, None)
        n = max(10, min(2000, int(rep_ms / max(est, 1e-3))))
        return _median_events(graph.replay, n, None) / len(fns)
    finally:
        del graph
        torch.cuda.synchronize()


def _copy_gbps(numel: int, device: str, rep_ms: float) -> tuple[float, float]:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_eager(lambda: dst.copy_(src), rep_ms=rep_ms)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9, ms


def _matmul_tflops(n: int, device: str, rep_ms: float) -> tuple[float, float]:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_eager(lambda: a @ b, rep_ms=rep_ms)
    return 2 * n**3 / (ms * 1e-3) / 1e12, ms


def measure_ceilings(rep_ms: float = 200, device: str = "cuda") -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) over 1 GiB, and bf16 matmul TFLOP/s at 8192^3 on random data.

    ``device="cpu"`` measures small stand-ins (64 MiB, 256^3), for dry runs of the benchmark's logic."""
    cpu = device == "cpu"
    n = 256 if cpu else 8192
    gbps, ms = _copy_gbps(2**24 if cpu else 2**28, device, rep_ms)  # 1 GiB of fp32 on the GPU
    tflops, ms_mm = _matmul_tflops(n, device, rep_ms)
    if not cpu:
        torch.cuda.empty_cache()
    return {"copy_gbps": gbps, "matmul_bf16_tflops": tflops, "copy_ms": ms, "matmul_ms": ms_mm, "matmul_n": n}
