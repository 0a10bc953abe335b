"""The Triton decode kernel under Triton's CPU interpreter, against the PyTorch ring step, at tiny shapes.

``TRITON_INTERPRET=1`` must be set before a kernel module is imported (``@triton.jit`` decides then), so
the one test that runs in the normal session re-runs this file in a subprocess with it set; the kernel
tests themselves only run inside that subprocess.
"""

import importlib.util

import pytest
import torch

from tests.ops.helpers import INTERPRETING, run_file_under_interpreter

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
inside = pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 subprocess of test_interpreter_run")


def test_interpreter_run():
    if INTERPRETING:
        pytest.skip("this is the subprocess")
    out = run_file_under_interpreter(__file__, timeout=900)
    assert " passed" in out and "skipped" in out


def _clone(ring):
    from linearize.ops.ring import RingState

    return RingState(*(t.clone() for t in (ring.S, ring.z, ring.k, ring.v, ring.phi_k, ring.mask, ring.pos)), window=ring.window)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run(H, Hkv, per_q, window, dtype, steps, *, D=16, F=8, filled=None, tol=1e-5, masked=True, step=None, **launch):
    from linearize.ops.ring import ring_step_torch
    from linearize.ops.triton.decode import random_decode_problem, ring_step_triton

    step = step or ring_step_triton
    B = 2
    _, ring, gamma = random_decode_problem(B, H, Hkv, D, F, window, per_q_features=per_q, dtype=dtype, device="cpu", filled=filled, seed=window)
    ref = _clone(ring)
    for t in range(steps):
        inputs, _, _ = random_decode_problem(B, H, Hkv, D, F, window, per_q_features=per_q, dtype=dtype, device="cpu", filled=0, seed=100 + t)
        mask = torch.tensor([[t % 3 != 2], [t % 2 == 0]]) if masked else None  # padding steps, in different rows
        out = torch.full_like(inputs[0], float("nan"))  # every element must be written
        y = step(*inputs, ring, window_weight=gamma, attention_mask=mask, out=out, **launch)
        y_ref = ring_step_torch(*inputs, ref, window_weight=gamma, attention_mask=mask)
        assert y is out and torch.isfinite(y).all()
        assert _rel(y, y_ref) < tol, f"step {t}: y rel err {_rel(y, y_ref):.2e}"
        assert _rel(ring.S, ref.S) < 1e-5 and _rel(ring.z, ref.z) < 1e-5, f"step {t}: sums"
        for name in ("k", "v", "phi_k", "mask", "pos"):
            assert torch.equal(getattr(ring, name), getattr(ref, name)), f"step {t}: ring {name}"


@inside
@pytest.mark.parametrize("window", [0, 1, 2, 6])
@pytest.mark.parametrize("H,Hkv,per_q", [(4, 2, False), (4, 2, True), (2, 2, False)])
def test_kernel_equals_torch_ring_step(window, H, Hkv, per_q):
    """fp32; a tail that fills up then evicts; two value blocks per head (block_d=8 of D=16)."""
    _run(H, Hkv, per_q, window, torch.float32, steps=5, filled=max(window - 3, 0), block_d=8)


@inside
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_odd_dims_and_ring_blocks(dtype):
    """D=24, F=6 (not powers of two), the ring read in blocks of 4 slots; bf16 gets the bf16 threshold
    (the interpreter rounds fp32 -> bf16 by truncation, the GPU to nearest)."""
    _run(4, 2, False, 7, dtype, steps=4, D=24, F=6, tol=1e-2, block_d=16, block_w=4)


@inside
def test_without_a_mask():
    _run(4, 2, False, 6, torch.float32, steps=4, masked=False)


@inside
def test_the_kernel_compiles_inside_a_torch_compiled_step():
    """CompiledDecode calls the kernel inside torch.compile. The launch is a custom op (``linearize::ring_step``)
    that mutates the ring, so inductor calls it as it is rather than lowering the kernel, which inductor 2.11
    failed to do on the H200. Here inductor compiles the step (fullgraph); ring and output must match the
    torch step over padded steps, as in eager. (Before the custom op, dynamo failed here as well: it cannot
    trace the interpreter's launch.)"""
    from linearize.ops.triton.decode import ring_step_triton

    torch._dynamo.reset()
    compiled = torch.compile(ring_step_triton, fullgraph=True)
    _run(4, 2, False, 6, torch.float32, steps=4, step=compiled)


@inside
def test_the_custom_op_registration():
    """torch.library's own checks of the op: schema (the mutated ring tensors), fake tensor and autograd
    registration, dynamo."""
    from linearize.ops.triton.decode import _ring_step_op, default_block_d, random_decode_problem

    (q, k, v, pq, pk), ring, gamma = random_decode_problem(2, 4, 2, 16, 8, 6, dtype=torch.float32, device="cpu", filled=3)
    out = torch.empty_like(q)
    valid = torch.tensor([1, 0], dtype=torch.uint8)
    args = (q, k, v, pq, pk, valid, gamma, ring.S, ring.z, ring.k, ring.v, ring.phi_k, ring.mask, ring.pos, out,
            0.25, ring.window, 2, default_block_d(2, 2, 16), 8, 4)
    torch.library.opcheck(_ring_step_op, args)
