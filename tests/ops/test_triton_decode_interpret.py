"""The Triton decode kernel under Triton's CPU interpreter, against the PyTorch ring step, at tiny shapes.

``TRITON_INTERPRET=1`` must be set before a kernel module is imported (``@triton.jit`` decides then), so
the one test that runs in the normal session re-runs this file in a subprocess with it set; the kernel
tests themselves only run inside that subprocess.
"""

import pytest
import torch

from tests.ops.helpers import (
    inside, interpreter_run_test, needs_triton, random_hedgehog_maps, rel_err,
)

pytestmark = needs_triton


test_interpreter_run = interpreter_run_test(__file__, timeout=900, skips=True)


def _run(H, Hkv, per_q, window, dtype, steps, *, D=16, F=8, filled=None, tol=1e-5, masked=True, step=None, fold=1,
         logit=None, **launch):
    """``logit``: the kernel gets the window weight as these logits (``window_logit``), the reference their
    sigmoid; else both get the problem's gamma."""
    from linearize.ops.ring import ring_step_torch
    from linearize.ops.triton.decode import random_decode_problem, ring_step_triton

    step = step or ring_step_triton
    B = 2
    _, ring, gamma = random_decode_problem(B, H, Hkv, D, F, window, per_q_features=per_q, dtype=dtype, device="cpu",
                                           filled=filled, seed=window, fold=fold)
    ref = ring.clone()
    for t in range(steps):
        inputs, _, _ = random_decode_problem(B, H, Hkv, D, F, window, per_q_features=per_q, dtype=dtype, device="cpu", filled=0, seed=100 + t)
        mask = torch.tensor([[t % 3 != 2], [t % 2 == 0]]) if masked else None  # padding steps, in different rows
        out = torch.full_like(inputs[0], float("nan"))  # every element must be written
        weight = dict(window_weight=gamma) if logit is None else dict(window_logit=logit)
        y = step(*inputs, ring, attention_mask=mask, out=out, **weight, **launch)
        gamma_ref = gamma if logit is None else torch.sigmoid(logit.float())
        y_ref = ring_step_torch(*inputs, ref, window_weight=gamma_ref, attention_mask=mask)
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
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("window", [0, 1, 2, 6])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (3, 3)])
def test_s_streamed_in_row_chunks_equals_torch_ring_step(window, H, Hkv, prefetch):
    """``chunk_rows``: S read, read out, updated and written in chunks of 16 feature rows (F = 40: two full
    chunks, a masked one and one wholly past F), two value blocks per head; key features per query head.
    ``prefetch``: each chunk loaded one step ahead, the first before the window part."""
    _run(H, Hkv, True, window, torch.float32, steps=5, F=40, filled=max(window - 3, 0), block_d=8, chunk_rows=16,
         prefetch=prefetch)



@inside
@pytest.mark.parametrize("H,Hkv,per_q,launch,dtype", [
    (4, 2, True, dict(chunk_rows=16), torch.bfloat16),  # one query head a feature head, S in chunks
    (4, 2, True, dict(chunk_rows=16), torch.float32),
    (6, 2, False, dict(chunk_rows=16), torch.bfloat16),  # three query heads a feature head, S in chunks
    (6, 2, False, dict(chunk_rows=16, heads_dot=True, D=32, block_d=16), torch.bfloat16),  # the same as dot rows
    (6, 2, False, dict(chunk_rows=0), torch.bfloat16),  # S whole
], ids=["chunks", "chunks-fp32", "chunks-G3", "heads-dot", "whole"])
def test_window_logits_take_their_sigmoid_in_the_launch(H, Hkv, per_q, launch, dtype):
    """``window_logit``: the kernel takes the logits (bf16 as a bf16 model holds them, or fp32) and their sigmoid
    inside the launch, where each form of the kernel reads gamma; equal to the torch step with gamma =
    sigmoid(logit.float()). Logits of both signs and far from 0 (gamma near 0 and 1)."""
    logit = torch.tensor([-4.0, 2.5, -0.3, 6.0, 0.7, -1.5][:H], dtype=dtype)
    _run(H, Hkv, per_q, 6, torch.float32, steps=4, F=40, filled=3, logit=logit, **(dict(block_d=8) | launch))


def test_ring_step_takes_one_window_weight():
    """``ring_step``: gamma as a weight or as logits (the torch step takes their sigmoid), never both or neither."""
    from linearize.ops.ring import ring_step
    from linearize.ops.triton.decode import random_decode_problem

    inputs, ring, gamma = random_decode_problem(2, 4, 2, 16, 8, 6, device="cpu", filled=3, seed=1)
    logit = torch.logit(gamma)
    a, b = ring.clone(), ring.clone()
    y_a = ring_step(*inputs, a, window_weight=torch.sigmoid(logit.float()), kernel=False)
    y_b = ring_step(*inputs, b, window_logit=logit, kernel=False)
    assert torch.equal(y_a, y_b) and torch.equal(a.S, b.S)
    for kw in ({}, dict(window_weight=gamma, window_logit=logit)):
        with pytest.raises(ValueError, match="one of window_weight and window_logit"):
            ring_step(*inputs, ring.clone(), kernel=False, **kw)


@inside
@pytest.mark.parametrize("window", [1, 6])
def test_default_launch_where_it_streams_rows(window):
    """The default launch at a shape where ``default_chunk_rows`` picks 64-row chunks (key features per query
    head, F = 128 > 64, one value block a head): two chunks of S a program, at the default launch (1 warp, no
    prefetch: ``default_num_warps``), and with prefetch (the 2-warp form)."""
    from linearize.ops.triton.decode import _pow2, default_block_d, default_chunk_rows

    assert default_chunk_rows(128, 16, default_block_d(2, 4, 16), True) == 64 == _pow2(128) // 2
    _run(4, 2, True, window, torch.float32, steps=4, F=128, filled=max(window - 3, 0))
    _run(4, 2, True, window, torch.float32, steps=4, F=128, filled=max(window - 3, 0), prefetch=True)
    # the issue-5 heads' form (key features per query head in 16-row chunks, 1 warp), with folding
    _run(4, 2, True, window, torch.float32, steps=6, F=128, filled=max(window - 3, 0), chunk_rows=16, num_warps=1,
         fold=4)

@inside
@pytest.mark.parametrize("H,Hkv,window,prefetch", [
    *((6, 2, w, p) for w in (0, 1, 2, 6) for p in (False, True)),  # G = 3: 3 of 4 accumulator rows used
    (8, 2, 6, True), (8, 2, 1, False),  # G = 4: every row
])
def test_s_in_row_chunks_read_out_by_each_query_head_of_a_kv_head(window, H, Hkv, prefetch):
    """Key maps per KV head: one program streams its KV head's S in chunks of 16 rows and reads each chunk out
    for all G of its query heads, with padding steps, two value blocks a head, F = 40 (a masked chunk and one
    wholly past F). (G = 1 is the per-query-head form, tested above.)"""
    _run(H, Hkv, False, window, torch.float32, steps=5, F=40, filled=max(window - 3, 0), block_d=8, chunk_rows=16,
         prefetch=prefetch)


@inside
@pytest.mark.parametrize("H,Hkv,window,prefetch", [
    *((6, 2, w, False) for w in (0, 1, 2, 6)),  # G = 3: 3 of the 16 dot rows used
    (6, 2, 6, True), (8, 2, 1, True),  # G = 4, chunks loaded a step ahead
])
def test_query_heads_as_the_rows_of_dots(window, H, Hkv, prefetch):
    """``heads_dot``: the query heads of a KV head's key maps as the rows of fp32 dots (the window's scores and
    sums over each ring block, the readout of each S chunk), padded to 16 rows; two value blocks of 16 columns
    (D = 32), F = 40 in chunks of 16 rows (a masked chunk and one wholly past F), padding steps."""
    _run(H, Hkv, False, window, torch.float32, steps=5, D=32, F=40, filled=max(window - 3, 0), block_d=16,
         chunk_rows=16, prefetch=prefetch, heads_dot=True)


@inside
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_query_heads_as_the_rows_of_dots_in_half_precision(dtype):
    """Half-precision inputs: the dots in tf32 on the GPU (the interpreter computes them in fp32); D = 24 (not a
    power of two), a window of 20 keys (the ring in one masked block), a value block wider than the head."""
    _run(8, 2, False, 20, dtype, steps=4, D=24, F=40, tol=1e-2, block_d=32, chunk_rows=16, heads_dot=True)


@inside
def test_heads_dot_refuses_what_it_cannot_serve():
    from linearize.ops.triton.decode import random_decode_problem, ring_step_triton

    inputs, ring, gamma = random_decode_problem(2, 4, 2, 32, 40, 4, per_q_features=False, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="heads_dot needs chunk_rows"):
        ring_step_triton(*inputs, ring, window_weight=gamma, chunk_rows=0, heads_dot=True)
    with pytest.raises(ValueError, match="at least 16"):
        ring_step_triton(*inputs, ring, window_weight=gamma, chunk_rows=16, block_d=8, heads_dot=True)
    inputs, ring, gamma = random_decode_problem(2, 4, 2, 32, 40, 4, per_q_features=True, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="key maps per KV head"):
        ring_step_triton(*inputs, ring, window_weight=gamma, chunk_rows=16, heads_dot=True)


@inside
def test_chunk_rows_refuses_what_it_cannot_serve():
    from linearize.ops.triton.decode import random_decode_problem, ring_step_triton

    inputs, ring, gamma = random_decode_problem(2, 4, 2, 16, 40, 4, per_q_features=False, dtype=torch.float32, device="cpu")
    for bad in (8, 24, 128):
        with pytest.raises(ValueError, match="chunk_rows must be 0 or a power of two"):
            ring_step_triton(*inputs, ring, window_weight=gamma, chunk_rows=bad)
    inputs, ring, gamma = random_decode_problem(2, 4, 2, 16, 40, 4, per_q_features=True, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="power of two"):
        ring_step_triton(*inputs, ring, window_weight=gamma, chunk_rows=24)


@inside
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_odd_dims_and_ring_blocks(dtype):
    """D=24, F=6 (not powers of two), the ring read in blocks of 4 slots; bf16 gets the bf16 threshold
    (the interpreter rounds fp32 -> bf16 by truncation, the GPU to nearest)."""
    _run(4, 2, False, 7, dtype, steps=4, D=24, F=6, tol=1e-2, block_d=16, block_w=4)


@inside
@pytest.mark.parametrize("form,window,fold", [
    *((f, 6, 4) for f in ("whole", "rows", "rows-prefetch", "heads-loop", "heads-dot")),  # 3 waiting: a masked row
    ("whole", 2, 3), ("heads-loop", 2, 3),  # a tail of one key
    ("rows-prefetch", 7, 6), ("heads-dot", 7, 6),  # 5 waiting in a block of 8 (of 16 in the dots)
])
def test_deferred_folding_equals_torch_ring_step(form, window, fold):
    """``fold > 1``: S and z written only every ``fold`` steps, the keys waiting in between read out as linear
    terms. Enough steps for two folds and the waits between them, with padding steps; every form of the kernel:
    S held whole (key maps per query head, two value blocks a head), S in row chunks (F = 40: a masked chunk and
    one past F), loaded a step ahead, read out for G = 3 query heads one by one, or as the rows of dots."""
    steps = window + 2 * fold + 1
    kw = dict(steps=steps, filled=max(window - 3, 0), fold=fold)
    if form == "whole":
        _run(4, 2, True, window, torch.float32, block_d=8, chunk_rows=0, **kw)
    elif form in ("rows", "rows-prefetch"):
        _run(4, 2, True, window, torch.float32, F=40, block_d=8, chunk_rows=16, prefetch=form == "rows-prefetch", **kw)
    else:
        _run(6, 2, False, window, torch.float32, D=32, F=40, block_d=16, chunk_rows=16, heads_dot=form == "heads-dot",
             **kw)


@inside
def test_deferred_folding_in_half_precision():
    """bf16 ring with the default launch of a chunked, dotted form; the fold's sums stay fp32."""
    _run(8, 2, False, 5, torch.bfloat16, steps=12, D=24, F=40, tol=1e-2, block_d=32, chunk_rows=16, heads_dot=True,
         fold=3)


@inside
def test_without_a_mask():
    _run(4, 2, False, 6, torch.float32, steps=4, masked=False)


@inside
def test_the_kernel_compiles_inside_a_torch_compiled_step():
    """CompiledDecode calls the kernel inside torch.compile. The launch is a custom op (``linearize::ring_step_v2``)
    that mutates the ring, so inductor calls it as it is rather than lowering the kernel, which inductor 2.11
    failed to do on the H200. Here inductor compiles the step (fullgraph); ring and output must match the
    torch step over padded steps, as in eager. (Before the custom op, dynamo failed here as well: it cannot
    trace the interpreter's launch.)"""
    from linearize.ops.triton.decode import ring_step_triton

    torch._dynamo.reset()
    compiled = torch.compile(ring_step_triton, fullgraph=True)
    _run(4, 2, False, 6, torch.float32, steps=4, step=compiled)
    # the row-chunk form with the query heads as dot rows: the op's launch arguments pass through inductor
    _run(4, 2, False, 6, torch.float32, steps=3, F=40, step=compiled, chunk_rows=16, heads_dot=True)


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
    "B,T,H,Hkv,Hk,D,f,dtype,tol",
    [(3, 1, 4, 2, 4, 24, 5, torch.float32, 1e-6),  # keys per query head over 2 KV heads; D, f not powers of two
     (2, 5, 4, 2, 2, 16, 8, torch.float32, 1e-6),  # several tokens a row, key maps per KV head
     (1, 1, 3, 3, 3, 40, 20, torch.float16, 1e-3),
     (17, 1, 6, 2, 6, 16, 16, torch.float16, 1e-3)],  # rows over two programs (block of 16), the last one partial
)
def test_hedgehog_pair_kernel_equals_the_feature_map_modules(B, T, H, Hkv, Hk, D, f, dtype, tol):
    """``hedgehog_pair_triton`` against ``HedgehogFeatureMap`` on the same inputs: q and k are views of one fused
    projection (strided heads), as a decode step hands them over."""
    from linearize.ops.triton.feature_maps import hedgehog_pair_triton

    g = torch.Generator().manual_seed(B + D)
    mq, mk = (m.to(dtype) for m in random_hedgehog_maps(H, Hk, D, f, g, 0.4))
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(dtype)
    q, k, _ = qkv.view(B, T, -1, D).split([H, Hkv, Hkv], dim=2)
    with torch.no_grad():
        ref_q, ref_k = mq(q), mk(k)
    got_q, got_k = hedgehog_pair_triton(q, k, mq.weight.detach(), mk.weight.detach(), block_rows=16)
    assert got_q.shape == ref_q.shape and got_k.shape == ref_k.shape and got_q.dtype == dtype
    assert torch.isfinite(got_q).all() and torch.isfinite(got_k).all()
    assert rel_err(got_q, ref_q) < tol and rel_err(got_k, ref_k) < tol, (rel_err(got_q, ref_q), rel_err(got_k, ref_k))


@inside
@pytest.mark.parametrize(
    "compile,cfg,opts,want",
    [(True, {}, {}, "rope"), (False, {"feature_rope": True}, {}, "rope"),
     (False, {"sink_tokens": 2}, {}, "rope"), (False, {}, {"fuse_rope": False}, "maps"),
     (False, {}, {"fuse_maps": False}, None)],
    ids=["inductor-default", "feature-rope-eager", "sinks-eager", "rope-off", "off"],
)
def test_compiled_decode_runs_the_map_kernel(monkeypatch, compile, cfg, opts, want):
    """CompiledDecode on a tiny llama with the kernels made to serve on CPU: by default every layer's step applies
    RoPE and computes its two Hedgehog maps in one launch (``rope_hedgehog_pair_triton``), whether the maps read
    q, k before RoPE or after it (sinks too: their feature is appended afterwards); ``fuse_rope=False`` leaves RoPE
    to the model and computes the maps in one launch of the map kernel; ``fuse_maps=False`` uses the modules. The
    steps equal the full forward every way, padded row included. Compiled, the window weight's sigmoid is not a
    kernel of the graph (the ring kernel takes the logits)."""
    from transformers import DynamicCache

    import linearize
    import linearize.ops as ops
    from linearize.ops.triton import feature_maps as fmk
    from tests.decode_steps import greedy_steps_and_full_forward
    from tests.tiny_models import perturb_added_weights, tiny_model

    class Spy:  # counts the map kernel's launches in decode steps, inside the op's body (which dynamo does not trace)
        def __init__(self, fn):
            self.fn, self.launches, self.stepping = fn, 0, False

        def __getitem__(self, grid):
            self.launches += self.stepping
            return self.fn[grid]

    def serves(q, phi_q):  # as on CUDA, for [B, T, heads, D] and features (not hidden states)
        return q.dim() == phi_q.dim() == 4 and q.shape[-1] <= 256 and phi_q.shape[-1] <= 256

    monkeypatch.setattr(ops, "use_triton", serves)
    monkeypatch.setattr("linearize.modules.attention.use_triton", serves)
    spies = {"maps": Spy(fmk._hedgehog_pair_kernel), "rope": Spy(fmk._rope_pair_kernel)}
    monkeypatch.setattr(fmk, "_hedgehog_pair_kernel", spies["maps"])
    monkeypatch.setattr(fmk, "_rope_pair_kernel", spies["rope"])
    torch._dynamo.reset()
    model = linearize.convert(tiny_model("llama"), linearize.LinearizeConfig(feature_dim=6, window=4, **({"feature_rope": False} | cfg)))
    perturb_added_weights(model)
    B, P, N = 2, 9, 3
    ids = torch.randint(3, 96, (B, P), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :3] = 0
    compiled = linearize.CompiledDecode(model, compile=compile, **opts)

    def step(*args):
        for spy in spies.values():
            spy.stepping = True
        try:
            return compiled(*args)
        finally:
            for spy in spies.values():
                spy.stepping = False

    from torch._inductor.utils import run_and_get_code

    (got, ref), code = run_and_get_code(
        greedy_steps_and_full_forward, model, step, DynamicCache(config=model.config), ids, mask, N, pass_mask=False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    if compile:  # the window weight's sigmoid is taken inside the ring kernel's launch, not in a kernel of its own
        assert "ring_step_v2" in "".join(code) and "sigmoid" not in "".join(code)
    layers = model.config.num_hidden_layers
    launches = {name: spy.launches for name, spy in spies.items()}
    assert launches == {name: layers * N if name == want else 0 for name in spies}, f"{cfg}, {opts}: {launches}"
