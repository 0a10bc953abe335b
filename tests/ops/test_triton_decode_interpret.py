"""The Triton decode kernel under Triton's CPU interpreter, against the PyTorch ring step, at tiny shapes.

``TRITON_INTERPRET=1`` must be set before a kernel module is imported (``@triton.jit`` decides then), so
the one test that runs in the normal session re-runs this file in a subprocess with it set; the kernel
tests themselves only run inside that subprocess.
"""

import pytest
import torch

from tests.ops.helpers import (
    INTERPRETING, inside, needs_triton, random_hedgehog_maps, rel_err, run_file_under_interpreter,
)

pytestmark = needs_triton


def test_interpreter_run():
    if INTERPRETING:
        pytest.skip("this is the subprocess")
    out = run_file_under_interpreter(__file__, timeout=900)
    assert " passed" in out and "skipped" in out


def _run(H, Hkv, per_q, window, dtype, steps, *, D=16, F=8, filled=None, tol=1e-5, masked=True, step=None, **launch):
    from linearize.ops.ring import ring_step_torch
    from linearize.ops.triton.decode import random_decode_problem, ring_step_triton

    step = step or ring_step_triton
    B = 2
    _, ring, gamma = random_decode_problem(B, H, Hkv, D, F, window, per_q_features=per_q, dtype=dtype, device="cpu", filled=filled, seed=window)
    ref = ring.clone()
    for t in range(steps):
        inputs, _, _ = random_decode_problem(B, H, Hkv, D, F, window, per_q_features=per_q, dtype=dtype, device="cpu", filled=0, seed=100 + t)
        mask = torch.tensor([[t % 3 != 2], [t % 2 == 0]]) if masked else None  # padding steps, in different rows
        out = torch.full_like(inputs[0], float("nan"))  # every element must be written
        y = step(*inputs, ring, window_weight=gamma, attention_mask=mask, out=out, **launch)
        y_ref = ring_step_torch(*inputs, ref, window_weight=gamma, attention_mask=mask)
        assert y is out and torch.isfinite(y).all()
        assert rel_err(y, y_ref) < tol, f"step {t}: y rel err {rel_err(y, y_ref):.2e}"
        assert rel_err(ring.S, ref.S) < 1e-5 and rel_err(ring.z, ref.z) < 1e-5, f"step {t}: sums"
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


@inside
@pytest.mark.parametrize(
    "window,H,Hkv,per_q,dtype,tol",
    [(6, 4, 2, False, torch.float32, 1e-5), (6, 4, 2, True, torch.float32, 1e-5), (1, 3, 3, False, torch.float32, 1e-5),
     (0, 4, 2, True, torch.float32, 1e-5), (6, 4, 2, False, torch.float16, 5e-3)],
)
def test_fused_hedgehog_maps_equal_the_maps_computed_outside(window, H, Hkv, per_q, dtype, tol):
    """``hedgehog=(fq, fk, Wq, Wk)``: the kernel computes phi_q, phi_k itself. Output and ring must match the
    torch ring step fed ``HedgehogFeatureMap``'s features of the same inputs, over padded steps (D=24 and
    f=5: no powers of two; the weights read in row blocks)."""
    from linearize.ops.ring import ring_step_torch
    from linearize.ops.triton.decode import random_decode_problem, ring_step_triton

    B, D, f = 2, 24, 5
    Hf = H if per_q else Hkv
    g = torch.Generator().manual_seed(window + H)
    maps = random_hedgehog_maps(H, Hf, D, f, g, 0.4)
    _, ring, gamma = random_decode_problem(B, H, Hkv, D, 2 * f, window, per_q_features=per_q, dtype=dtype, device="cpu",
                                           filled=max(window - 3, 0), seed=window)
    ref = ring.clone()
    for t in range(5):
        (q, k, v, _, _), _, _ = random_decode_problem(B, H, Hkv, D, 2 * f, window, per_q_features=per_q, dtype=dtype,
                                                       device="cpu", filled=0, seed=100 + t)
        fq, fk = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
        with torch.no_grad():
            phi_q, phi_k = maps[0](fq), maps[1](fk)
        mask = torch.tensor([[t % 3 != 2], [t % 2 == 0]])
        out = torch.full_like(q, float("nan"))
        y = ring_step_triton(q, k, v, phi_q, phi_k, ring, window_weight=gamma, attention_mask=mask, out=out, block_d=8,
                             hedgehog=(fq, fk, maps[0].weight.detach().to(dtype), maps[1].weight.detach().to(dtype)))
        y_ref = ring_step_torch(q, k, v, phi_q, phi_k, ref, window_weight=gamma, attention_mask=mask)
        assert torch.isfinite(y).all() and rel_err(y, y_ref) < tol, f"step {t}: y rel err {rel_err(y, y_ref):.2e}"
        assert rel_err(ring.S, ref.S) < tol and rel_err(ring.z, ref.z) < tol, f"step {t}: sums"
        assert rel_err(ring.phi_k.float(), ref.phi_k.float()) < tol, f"step {t}: the ring's phi_k"
        for name in ("k", "v", "mask", "pos"):
            assert torch.equal(getattr(ring, name), getattr(ref, name)), f"step {t}: ring {name}"


@inside
@pytest.mark.parametrize(
    "compile,cfg,fuse,want",
    [(True, {}, True, True), (False, {"sink_tokens": 2}, True, False), (False, {}, None, False)],
    ids=["inductor", "sinks-eager", "default-unfused"],
)
def test_compiled_decode_fuses_the_maps_into_the_kernel(monkeypatch, compile, cfg, fuse, want):
    """CompiledDecode(fuse_maps=True) on a tiny llama with the kernels made to serve on CPU: every layer's
    launch computes its Hedgehog maps (FUSED), and the steps equal the full forward, padded row included; a
    layout with sinks keeps the maps outside (its phi gets a sink feature the kernel does not compute); the
    default (fuse_maps=False, measured faster on the H200) keeps them outside too."""
    from transformers import DynamicCache

    import linearize
    import linearize.ops as ops
    from linearize.ops.triton import decode as dec
    from tests.decode_steps import greedy_steps_and_full_forward
    from tests.tiny_models import perturb_added_weights, tiny_model

    class Spy:  # records each launch's FUSED flag, inside the op's body (which dynamo does not trace)
        def __init__(self, fn):
            self.fn, self.fused = fn, []

        def __getitem__(self, grid):
            launch = self.fn[grid]

            def call(*a, **kw):
                self.fused.append(kw["FUSED"])
                return launch(*a, **kw)
            return call

    monkeypatch.setattr(ops, "use_triton", lambda q, phi_q: True)
    spy = Spy(dec._decode_kernel)
    monkeypatch.setattr(dec, "_decode_kernel", spy)
    torch._dynamo.reset()
    model = linearize.convert(tiny_model("llama"), linearize.LinearizeConfig(feature_dim=6, window=4, feature_rope=False, **cfg))
    perturb_added_weights(model)
    B, P, N = 2, 9, 3
    ids = torch.randint(3, 96, (B, P), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :3] = 0
    step = linearize.CompiledDecode(model, compile=compile, **({} if fuse is None else {"fuse_maps": fuse}))
    got, ref = greedy_steps_and_full_forward(model, step, DynamicCache(config=model.config), ids, mask, N, pass_mask=False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    layers = model.config.num_hidden_layers
    assert spy.fused == [want] * (layers * N), f"{cfg}: FUSED per launch {spy.fused}"
