"""Random inputs for the ops tests (never zeros: zeros hide indexing bugs)."""

from __future__ import annotations

import collections
import importlib.util
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def random_inputs(B, T, H, Hkv, D, F, Hf, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64)
    # positive features, like softmax / relu maps produce
    phi_q = torch.rand(B, T, H, F, generator=g, dtype=torch.float64) + 0.01
    phi_k = torch.rand(B, T, Hf, F, generator=g, dtype=torch.float64) + 0.01
    gamma = torch.rand(H, generator=g, dtype=torch.float64) * 0.9 + 0.05
    out = [t.to(dtype) for t in (q, k, v, phi_q, phi_k)] + [gamma.float() if dtype != torch.float64 else gamma]
    if requires_grad:
        for t in out:
            t.requires_grad_(True)
    return out


def random_hedgehog_maps(heads_q: int, heads_k: int, D: int, f: int, generator: torch.Generator, scale: float):
    """Query and key ``HedgehogFeatureMap``s (``heads_q`` / ``heads_k`` heads, F = 2f) with random weights
    (std ``scale``) instead of the identity slice they start from."""
    from linearize.modules.feature_maps import HedgehogFeatureMap

    maps = []
    for heads in (heads_q, heads_k):
        fm = HedgehogFeatureMap(heads, D, f)
        with torch.no_grad():
            fm.weight.copy_(torch.randn(fm.weight.shape, generator=generator) * scale)
        maps.append(fm)
    return maps


def left_pad_mask(B, T, pads):
    m = torch.ones(B, T, dtype=torch.bool)
    for b, p in enumerate(pads):
        m[b, :p] = False
    return m


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; 0 when both are exactly zero (an input the output does not depend on)."""
    a, b = a.double(), b.double()
    if b.norm() == 0:
        return a.norm().item()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# -- Triton's CPU interpreter ---------------------------------------------------------------------------
# TRITON_INTERPRET=1 must be set before a kernel module is imported (``@triton.jit`` decides then), so an
# interpreter test file re-runs itself in a subprocess with it set; its kernel tests run only in there.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
inside = pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 subprocess of test_interpreter_run")


def run_file_under_interpreter(path: str, timeout: int) -> str:
    """Run the pytest file ``path`` with TRITON_INTERPRET=1 in a subprocess; assert it passed; its stdout."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", path],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    return r.stdout


def interpreter_run_test(path: str, timeout: int, skips: bool = False):
    """The test an interpreter test file defines as ``test_interpreter_run = interpreter_run_test(__file__, ...)``:
    outside the interpreter it re-runs the file under it and checks that tests passed (and, with ``skips``, that
    some were skipped there too); inside, it skips itself."""

    def test_interpreter_run():
        if INTERPRETING:
            pytest.skip("this is the subprocess")
        out = run_file_under_interpreter(path, timeout=timeout)
        assert " passed" in out and (not skips or "skipped" in out)

    return test_interpreter_run


class CountOps(TorchDispatchMode):
    """Counts the aten (and custom) ops dispatched inside, by name: ``with CountOps() as c: ...; c.ops["mm"]``."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
