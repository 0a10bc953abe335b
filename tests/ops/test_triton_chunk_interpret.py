"""The fused chunk kernels (forward + backward) under Triton's CPU interpreter, against the PyTorch chunked
path, at tiny shapes: outputs, final states and every gradient, on random data.

``TRITON_INTERPRET=1`` must be set before the kernel module is imported, so the test that runs in the normal
session re-runs this file in a subprocess with it set; the kernel tests run only inside that subprocess.
"""

import pytest
import torch

from tests.ops.helpers import inside, interpreter_run_test, left_pad_mask, needs_triton, random_inputs, rel_err

pytestmark = needs_triton


test_interpreter_run = interpreter_run_test(__file__, timeout=1200)


def _grad_err(a: torch.Tensor, b: torch.Tensor, ref_scale: float) -> float:
    """Relative error, measured against the gradient's own norm or, for a gradient that is analytically
    ~0 (gamma when every key is in the window), against the scale of the other gradients."""
    return (a.double() - b.double()).norm().item() / max(b.double().norm().item(), ref_scale)


def _check(B, T, H, Hkv, D, F, Hf, W, *, C=16, BV=16, nseg=None, mask=None, seed=0, tol=2e-5, C_intra=None,
           split_forward=False, fold_backward=False, **launch):
    from linearize.ops import hybrid_attention_chunked
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton

    q, k, v, pq, pk, g = random_inputs(B, T, H, Hkv, D, F, Hf, dtype=torch.float32, seed=seed, requires_grad=True)
    cfg = LaunchConfig(C=C, BV=BV, num_warps=4, nseg=nseg, C_intra=C_intra, warps_intra=C_intra and 2,
                       split_forward=split_forward, fold_backward=fold_backward, **launch)
    args = dict(window=W, window_weight=g, attention_mask=mask, output_final_state=True)
    y, st = hybrid_attention_triton(q, k, v, pq, pk, config=cfg, **args)
    yr, sr = hybrid_attention_chunked(q, k, v, pq, pk, **args)
    assert torch.isfinite(y).all()
    assert rel_err(y, yr) < tol
    for a, b in zip(st, sr):
        assert a.shape == b.shape and rel_err(a, b) < tol
    dy = torch.randn_like(y)
    ins = (q, k, v, pq, pk, g)
    gr = torch.autograd.grad(y, ins, dy, allow_unused=True, materialize_grads=True)
    grr = torch.autograd.grad(yr, ins, dy, allow_unused=True, materialize_grads=True)
    scale = max(x.double().norm().item() for x in grr) * 1e-2
    errs = [_grad_err(a, b, scale) for a, b in zip(gr, grr)]
    assert max(errs) < 10 * tol, dict(zip("q k v phi_q phi_k gamma".split(), errs))


# (B, T, H, Hkv, D, F, Hf, W): T not a multiple of C, T < W, W = 0 / 1, GQA with per-KV and per-query key maps
CASES = [
    (1, 40, 2, 1, 16, 16, 1, 5),
    (2, 37, 4, 2, 16, 32, 2, 0),
    (2, 37, 4, 2, 16, 32, 4, 1),
    (1, 50, 3, 1, 32, 16, 1, 17),
    (1, 50, 3, 1, 32, 16, 3, 16),
    (2, 33, 2, 2, 16, 16, 2, 100),
    (1, 70, 2, 1, 16, 16, 1, 40),
    (1, 9, 2, 2, 16, 16, 2, 4),
]


@inside
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}H{}/{}D{}F{}Hf{}W{}".format(*c))
@pytest.mark.parametrize("nseg", [1, 3])
def test_kernel_matches_chunked(case, nseg):
    _check(*case, nseg=nseg)


@inside
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}H{}/{}D{}F{}Hf{}W{}".format(*c))
@pytest.mark.parametrize("C", [32, 64])
def test_intra_blocks_smaller_than_the_chunk(case, C):
    """``LaunchConfig(C_intra=16)``: the backward's intra kernels on blocks of 16 rows while the forward and the
    running-sum kernels walk chunks of 32 or 64, so the intra / running-sum split of each (query, key) pair must
    follow the outer chunks: every gradient as the reference, with padding in the batch."""
    B, T = case[:2]
    _check(*case, C=C, nseg=2, C_intra=16, mask=left_pad_mask(B, T, [0, 3][:B]))


@inside
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}H{}/{}D{}F{}Hf{}W{}".format(*c))
@pytest.mark.parametrize("C_intra", [None, 16])
def test_split_forward(case, C_intra):
    """``LaunchConfig(split_forward=True)``: each chunk's running sums written by a walk, then one program a block
    of queries (the chunk, or blocks of 16 in chunks of 32): outputs, final states and every gradient as the
    reference, with padding in the batch (the backward reads what the one-pass forward saves)."""
    B, T = case[:2]
    _check(*case, C=16 if C_intra is None else 32, nseg=2, C_intra=C_intra, split_forward=True,
           mask=left_pad_mask(B, T, [0, 3][:B]))


@inside
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}H{}/{}D{}F{}Hf{}W{}".format(*c))
@pytest.mark.parametrize("C_intra", [None, 16])
def test_fold_backward(case, C_intra):
    """``LaunchConfig(fold_backward=True)``: the intra kernels also take the running-sum parts, from each chunk's
    sums and gradient sums, and no running-sum walk runs: every gradient as the reference, with padding, value
    blocks of 16 (the walks split D, the intra kernels do not), with both forwards."""
    B, T = case[:2]
    _check(*case, C=16 if C_intra is None else 32, nseg=2, C_intra=C_intra, split_forward=C_intra is not None,
           fold_backward=True, mask=left_pad_mask(B, T, [0, 3][:B]))


@inside
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 2, 6)], ids=lambda c: "B{}T{}H{}/{}D{}F{}Hf{}W{}".format(*c))
@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)], ids=["fwd32-dk16", "fwd16-dk32"])
@pytest.mark.parametrize("skip", [True], ids=["skip"])  # (without: test_dk_launches_without_skip_or_split_forward)
@pytest.mark.parametrize("dk_launches", [1, 2, 3], ids=["dk1", "dk2", "dk3"])
def test_each_intra_kernel_on_its_own_blocks(case, blocks, skip, dk_launches):
    """``LaunchConfig(C_fwd=..., C_dk=...)``: the split forward's block kernel and bwd_dk on blocks other than
    bwd_dq's (C_intra 16, in chunks of 32), so bwd_dk reads bwd_dq's per-row max-path corrections across blocks of
    another size; and bwd_dk's gradients over two or three launches (``dk_launches``): outputs, final states and
    every gradient as the reference, with padding."""
    B, T = case[:2]
    C_fwd, C_dk = blocks
    _check(*case, C=32, nseg=2, C_intra=16, split_forward=True, fold_backward=True, skip_empty=skip, C_fwd=C_fwd,
           warps_fwd=4, C_dk=C_dk, warps_dk=1, dk_launches=dk_launches, mask=left_pad_mask(B, T, [0, 3][:B]))


@inside
@pytest.mark.parametrize("case", [CASES[i] for i in (3, 6)], ids=lambda c: "B{}T{}H{}/{}D{}F{}Hf{}W{}".format(*c))
@pytest.mark.parametrize("fold", [False, True], ids=["walks", "fold"])
@pytest.mark.parametrize("dk_launches", [2, 3])
def test_dk_launches_without_skip_or_split_forward(case, fold, dk_launches):
    """``dk_launches`` 2 and 3 with the one-pass forward, blocks of the chunk, value blocks narrower than D (the unfolded
    backward's dv / dphi_k buffers in fp32, added to by the running-sum walks) and without ``skip_empty`` (the
    launches then visit every block pair and mask the pairs their gradients do not take): every gradient as the
    reference."""
    B, T = case[:2]
    _check(*case, C=16, BV=16, nseg=2, fold_backward=fold, dk_launches=dk_launches, mask=left_pad_mask(B, T, [0, 3][:B]))


# Block pairs (of 16 rows) whose nearest positions are exactly at the window's edge: W = 31 puts a pair's one linear
# pair of positions at distance W, W = 18 a pair's one window pair at distance W - 1.
SKIP_EDGES = [(1, 70, 2, 1, 16, 16, 1, 31), (2, 50, 2, 2, 16, 16, 2, 18)]


@inside
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 2, 5, 6, 7)] + SKIP_EDGES,
                         ids=lambda c: "B{}T{}H{}/{}D{}F{}Hf{}W{}".format(*c))
@pytest.mark.parametrize("form", ["one-pass", "split+fold/16"])
def test_skip_empty_blocks_changes_nothing(case, form):
    """``LaunchConfig(skip_empty=True)``: the window or linear part of a block pair that no pair of positions can take
    is neither loaded nor computed. Those parts are exact zeros, so outputs, final states and every gradient must be
    bit-identical to the unskipped kernels (which the tests above check against the reference), in both forwards
    and the folded backward, with padding: T not a multiple of the block, T < W, W = 0 / 1, GQA."""
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton

    B, T = case[:2]
    W = case[-1]
    split = form != "one-pass"
    q, k, v, pq, pk, g = random_inputs(*case[:7], dtype=torch.float32, seed=3, requires_grad=True)
    args = dict(window=W, window_weight=g, attention_mask=left_pad_mask(B, T, [0, 3][:B]), output_final_state=True)
    ins = (q, k, v, pq, pk, g)
    dy = torch.randn(q.shape)
    outs = []
    for skip in (False, True):
        cfg = LaunchConfig(C=32 if split else 16, BV=16, num_warps=4, nseg=2, C_intra=16 if split else None,
                           warps_intra=2 if split else None, split_forward=split, fold_backward=split, skip_empty=skip)
        y, st = hybrid_attention_triton(q, k, v, pq, pk, config=cfg, **args)
        grads = torch.autograd.grad(y, ins, dy, allow_unused=True, materialize_grads=True)
        outs.append((y, *st, *grads))
    for name, a, b in zip("y S z k v phi_k mask dq dk dv dphi_q dphi_k dgamma".split(), *outs):
        assert torch.equal(a, b), name


@inside
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 2, 5, 6)], ids=lambda c: "B{}T{}H{}/{}D{}F{}Hf{}W{}".format(*c))
@pytest.mark.parametrize("form,nseg", [("split+fold", 3), ("split+fold", 1), ("split", 3), ("fold", 3)])
def test_local_sums(case, form, nseg):
    """``LaunchConfig.local_sums``: the chunk-sum walks start each segment from zero and write its total (no
    segment-sum passes), and fwd_blocks / bwd_dq / bwd_dk add the segment's prefix: outputs, final states and every
    gradient as the reference, with padding, over 1 and 3 segments; the split forward alone (its chunk sums not kept)
    and the folded backward alone (its chunk sums walked again, locally, after the one-pass forward)."""
    B, T = case[:2]
    _check(*case, C=32, nseg=nseg, C_intra=16, split_forward="split" in form, fold_backward="fold" in form,
           skip_empty=True, local_sums=True, mask=left_pad_mask(B, T, [0, 3][:B]))


@inside
@pytest.mark.parametrize("dk_launches", [2, 3])
def test_local_sums_with_dk_launches(dk_launches):
    """local_sums with bwd_dk's gradients over 2 or 3 launches: the launches that form dv / dphi_k add the reverse prefix,
    the dk-only one reads none: every gradient as the reference."""
    B, T = CASES[6][:2]
    _check(*CASES[6], C=32, nseg=3, C_intra=16, split_forward=True, fold_backward=True, skip_empty=True,
           local_sums=True, dk_launches=dk_launches, mask=left_pad_mask(B, T, [0, 3][:B]))


def _second_piece(cfgs, frozen_gamma: bool):
    """A prefill's second piece (D and F not powers of two, D over two value blocks, padding), started from the first
    piece's state, under each of ``cfgs``: per config (y, and the gradients of q, k, v, phi_q, phi_k and, unless
    ``frozen_gamma``, gamma)."""
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton

    q, k, v, pq, pk, g = random_inputs(2, 45, 4, 2, 24, 20, 2, dtype=torch.float32, seed=12, requires_grad=True)
    m = left_pad_mask(2, 45, [0, 7])
    base = LaunchConfig(C=16, BV=16, num_warps=4, nseg=2)
    with torch.no_grad():
        _, st = hybrid_attention_triton(q[:, :19], k[:, :19], v[:, :19], pq[:, :19], pk[:, :19], window=9,
                                        window_weight=g, attention_mask=m[:, :19], output_final_state=True, config=base)
    gamma = g.detach() if frozen_gamma else g
    ins = (q, k, v, pq, pk) if frozen_gamma else (q, k, v, pq, pk, g)
    outs = []
    for cfg in cfgs:
        y, _ = hybrid_attention_triton(q[:, 19:], k[:, 19:], v[:, 19:], pq[:, 19:], pk[:, 19:], window=9,
                                       window_weight=gamma, attention_mask=m[:, 19:], initial_state=st, config=cfg)
        outs.append((y, *torch.autograd.grad(y, ins, torch.ones_like(y))))
    return outs


@inside
def test_local_sums_with_value_blocks_odd_dims_and_an_initial_state():
    """local_sums with D over two value blocks (z written by block 0 only, each block's prefix its own columns), D and
    F not powers of two, and a piece of a prefill started from a state (the prefix seeded by it): as the reference."""
    from linearize.ops.triton.chunk import LaunchConfig

    _check(1, 45, 2, 1, 24, 20, 1, 9, C=32, BV=16, nseg=2, C_intra=16, split_forward=True, fold_backward=True,
           local_sums=True)
    cfgs = [LaunchConfig(C=32, BV=16, num_warps=4, nseg=2, C_intra=16, split_forward=True, fold_backward=True,
                         local_sums=local) for local in (False, True)]
    for name, a, b in zip("y dq dk dv dphi_q dphi_k dgamma".split(), *_second_piece(cfgs, frozen_gamma=False)):
        assert rel_err(a, b) < 1e-5, name


@inside
@pytest.mark.parametrize("case", [CASES[i] for i in (1, 3)], ids=lambda c: "B{}T{}H{}/{}D{}F{}Hf{}W{}".format(*c))
@pytest.mark.parametrize("form,nseg,local", [("split+fold", 1, False), ("split+fold", 3, False),
                                             ("split+fold", 3, True), ("fold", 1, False)])
def test_walk_tile(case, form, nseg, local):
    """``LaunchConfig.walk_tile``: the chunk-sum walks on [16, 16] tiles of the state (F = 32 over two feature
    blocks; D = 32 over two value blocks where the readers take one of 32), over the whole sequence (one segment:
    no segment-sum passes) or three, with local_sums, and the folded backward after the one-pass forward: outputs,
    final states and every gradient as the reference, with padding."""
    B, T = case[:2]
    _check(*case, C=32, BV=32, nseg=nseg, C_intra=16, split_forward="split" in form, fold_backward=True,
           skip_empty=True, local_sums=local, walk_tile=16, mask=left_pad_mask(B, T, [0, 3][:B]))


@inside
@pytest.mark.parametrize("case", [CASES[i] for i in (1, 6)], ids=lambda c: "B{}T{}H{}/{}D{}F{}Hf{}W{}".format(*c))
@pytest.mark.parametrize("nseg,local,tile", [(1, False, 16), (2, True, 16), (3, False, None)])
def test_walk_pairs(case, nseg, local, tile):
    """``LaunchConfig.walk_pairs``: the chunk-sum walks two chunks a step, over segments of odd and even chunk counts
    (T 37 and 70 on chunks of 16: 3 and 5 chunks; the pair past a segment's end formed but not added), with a window
    of 0 (no window chunk: the backward's pair before chunk 0 kept in range) and of 40, on state tiles or not, from zero a
    segment (local_sums) or from its prefix: as the reference, with padding."""
    B, T = case[:2]
    _check(*case, C=16, BV=16, nseg=nseg, split_forward=True, fold_backward=True, local_sums=local, walk_tile=tile,
           walk_pairs=True, walk_stages=3, mask=left_pad_mask(B, T, [0, 3][:B]))


@inside
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 2, 5, 6)], ids=lambda c: "B{}T{}H{}/{}D{}F{}Hf{}W{}".format(*c))
@pytest.mark.parametrize("form,nseg,tile,local,delta", [("split+fold", 1, 16, False, True),
                                                        ("split+fold", 3, None, True, False), ("fold", 3, None, False, True)],
                         ids=["whole-tiles-delta", "local", "fold-delta"])
def test_dgamma_in_dq(case, form, nseg, tile, local, delta):
    """``LaunchConfig.dgamma_in_dq``: the window weight's gradient formed in bwd_dq from its window row sums and phi_q .
    dphi_q (no u stored by the forward), and with ``delta_in_dq`` delta formed there too (no bwd_delta): outputs,
    states and every gradient, gamma's included, as the reference, with padding, W 0 / 1 / 5 / 40 / past T, over one
    segment on state tiles, three with local_sums, and the folded backward after the one-pass forward. (Dropping
    the l_w phi_q . dphi_q term fails gamma's gradient: 0.45 relative error.)"""
    B, T = case[:2]
    _check(*case, C=32, BV=32, nseg=nseg, C_intra=16, split_forward="split" in form, fold_backward=True,
           skip_empty=True, local_sums=local, walk_tile=tile, dgamma_in_dq=True, delta_in_dq=delta,
           mask=left_pad_mask(B, T, [0, 3][:B]))


@inside
def test_dgamma_in_dq_keeps_its_precision_where_the_window_dominates():
    """fp16 operands, window weight x1 and x30 (where the window dominates, the gradient sum_t,e exp(s - m)(dy . v -
    delta) / den cancels, and delta read from the rounded output would carry its rounding into it): gamma's gradient
    against fp64 within 5e-4, as the fp32-formed u's (interpreter: 1.1e-4 - 2.3e-4 against u's 1.5e-4 - 4.4e-4; the
    plain cancelling sum gives 0.9e-3 - 1.7e-3 here)."""
    from linearize.ops import hybrid_attention_chunked
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton

    cfgs = {name: LaunchConfig(C=16, BV=16, num_warps=4, nseg=2, fold_backward=True, dgamma_in_dq=name != "u",
                               delta_in_dq=name == "dq+delta") for name in ("u", "dq", "dq+delta")}
    for gs in (1.0, 30.0):
        for T, W in [(200, 20), (90, 20)]:
            ins64 = random_inputs(2, T, 4, 2, 16, 32, 2, dtype=torch.float64, seed=T)
            ins = [t.to(torch.float16).requires_grad_(True) for t in ins64[:5]]
            ins.append((ins64[5] * gs).float().requires_grad_(True))
            ref = [t.detach().double().requires_grad_(True) for t in ins]
            yr, _ = hybrid_attention_chunked(*ref[:5], window=W, window_weight=ref[5])
            dy = torch.randn(yr.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            g_ref = torch.autograd.grad(yr, ref[5], dy)[0]
            errs = {}
            for name, cfg in cfgs.items():
                y, _ = hybrid_attention_triton(*ins[:5], window=W, window_weight=ins[5], config=cfg)
                errs[name] = rel_err(torch.autograd.grad(y, ins[5], dy.half())[0], g_ref)
            assert errs["dq"] < 5e-4 and errs["dq"] <= 2 * errs["u"], (gs, T, errs)
            assert errs["dq+delta"] == errs["dq"]  # (delta formed from the same loads, in the same order)


def test_dgamma_in_dq_writes_no_u_and_delta_in_dq_runs_no_delta_pass():
    """The launches of one forward + backward (check_smem's recorder, on CPU without running a kernel): with
    dgamma_in_dq the forward stores no u and bwd_dq forms dgamma; with delta_in_dq bwd_delta does not run, also where
    the window weight is frozen (bwd_dq then forms delta but no dgamma)."""
    import dataclasses

    from linearize.ops.triton.chunk import default_config
    from scripts.check_smem import record_launches

    # (the Triton kernels': the training default's Gluon ones, which the recorder takes as an H100 would, form neither)
    base = dataclasses.replace(default_config(128, 128, training=True), gluon_fwd=None, gluon_dq=False)
    shape = (2, 300, 4, 2, 128, 128, 2, 64, torch.bfloat16)

    def kernels(cfg, gamma_grad=True):
        return {(r["kernel"], r["constexprs"].get("STORE_U"), r["constexprs"].get("DGAM"),
                 r["constexprs"].get("DELTA_HERE")) for r in record_launches(*shape, config=cfg, gamma_grad=gamma_grad)
                if r["kernel"] in ("fwd_blocks_kernel", "bwd_dq_kernel", "bwd_delta_kernel")}

    assert kernels(base) == {("fwd_blocks_kernel", True, None, None), ("bwd_delta_kernel", None, None, None),
                             ("bwd_dq_kernel", None, False, False)}
    in_dq = dataclasses.replace(base, dgamma_in_dq=True)
    assert kernels(in_dq) == {("fwd_blocks_kernel", False, None, None), ("bwd_delta_kernel", None, None, None),
                              ("bwd_dq_kernel", None, True, False)}
    both = dataclasses.replace(in_dq, delta_in_dq=True, overlap=False)  # (overlap's walk reads delta before bwd_dq)
    assert kernels(both) == {("fwd_blocks_kernel", False, None, None), ("bwd_dq_kernel", None, True, True)}
    assert kernels(both, gamma_grad=False) == {("fwd_blocks_kernel", False, None, None),
                                               ("bwd_dq_kernel", None, False, True)}


@inside
def test_dgamma_in_dq_through_the_ops_and_compiled():
    """dgamma_in_dq + delta_in_dq through the custom ops torch.compile calls (the backward op told by its autograd that
    gamma wants a gradient, WANT_DGAMMA): opcheck (schemas, fake kernels: dgamma's shape with no u stored), and the
    compiled function's output and gradients as eager's, with gamma trained and frozen."""
    from linearize.ops.triton.chunk import LaunchConfig, _hybrid_chunk_op, _launch_ints, hybrid_attention_triton

    cfg = LaunchConfig(C=16, BV=16, num_warps=4, nseg=2, split_forward=True, fold_backward=True, local_sums=True,
                       dgamma_in_dq=True, delta_in_dq=True)
    q, k, v, pq, pk, g = random_inputs(2, 21, 4, 2, 16, 8, 4, dtype=torch.float32, seed=5, requires_grad=True)
    mask = left_pad_mask(2, 21, [0, 5]).to(torch.uint8).contiguous()
    torch.library.opcheck(_hybrid_chunk_op, (q, k, v, pq, pk, g, mask, None, None, 6, 0.25, *_launch_ints(cfg), False))

    def f(q, k, v, pq, pk, g):
        y, _ = hybrid_attention_triton(q * 1.5, k, v, pq.exp(), pk.exp(), window=6, window_weight=g.sigmoid(), config=cfg)
        return (y.tanh() * 2).sum(-1)

    ins = random_inputs(2, 37, 4, 2, 16, 8, 2, dtype=torch.float32, seed=6, requires_grad=True)
    dy = torch.randn(2, 37, 4, generator=torch.Generator().manual_seed(1))
    for frozen in (False, True):
        args = list(ins)
        if frozen:
            args[5] = ins[5].detach()
        out = [f(*args), torch.compile(f, fullgraph=True)(*args)]
        wrt = ins[:5] if frozen else ins
        grads = [torch.autograd.grad(o, wrt, dy) for o in out]
        assert rel_err(out[1], out[0]) < 1e-6
        for a, b in zip(*grads):
            assert rel_err(b, a) < 1e-6


def test_dgamma_and_delta_in_dq_need_the_fold():
    from linearize.ops.triton.chunk import LaunchConfig

    with pytest.raises(ValueError, match="overlap .* needs fold_backward"):
        LaunchConfig(C=64, BV=64, num_warps=4, overlap=True)
    with pytest.raises(ValueError, match="excludes delta_in_dq"):
        LaunchConfig(C=64, BV=64, num_warps=4, fold_backward=True, dgamma_in_dq=True, delta_in_dq=True, overlap=True)
    with pytest.raises(ValueError, match="dgamma_in_dq needs fold_backward"):
        LaunchConfig(C=64, BV=64, num_warps=4, dgamma_in_dq=True)
    with pytest.raises(ValueError, match="delta_in_dq needs dgamma_in_dq"):
        LaunchConfig(C=64, BV=64, num_warps=4, fold_backward=True, delta_in_dq=True)


@inside
def test_register_cap_changes_no_result():
    """``LaunchConfig.maxnreg`` and ``walk_maxnreg`` (the block kernels' and the walks' register caps, compile options)
    with the training form: as the reference."""
    B, T = CASES[6][:2]
    _check(*CASES[6], C=32, BV=16, nseg=2, C_intra=16, split_forward=True, fold_backward=True, skip_empty=True,
           local_sums=True, walk_tile=16, maxnreg=168, walk_maxnreg=128, mask=left_pad_mask(B, T, [0, 3][:B]))


@inside
def test_walk_tile_with_odd_dims_and_an_initial_state():
    """walk_tile with F = 20 and D = 24 (the last feature and value tiles partly masked) and a piece of a prefill
    started from a state, over one segment (the walk seeded by the state itself, no segment sums) and two: as the
    default walks."""
    from linearize.ops.triton.chunk import LaunchConfig

    cfgs = [LaunchConfig(C=32, BV=32, num_warps=4, nseg=nseg, C_intra=16, split_forward=True, fold_backward=True,
                         walk_tile=tile) for nseg, tile in ((2, None), (1, 16), (2, 16))]
    base, *rest = _second_piece(cfgs, frozen_gamma=False)
    for outs in rest:
        for name, a, b in zip("y dq dk dv dphi_q dphi_k dgamma".split(), outs, base):
            assert rel_err(a, b) < 1e-5, name


def test_walk_and_register_options_are_checked():
    from linearize.ops.triton.chunk import LaunchConfig

    with pytest.raises(ValueError, match="walk_tile"):
        LaunchConfig(C=64, BV=64, num_warps=4, walk_tile=48)
    with pytest.raises(ValueError, match="walk_stages"):
        LaunchConfig(C=64, BV=64, num_warps=4, walk_stages=8)
    with pytest.raises(ValueError, match="maxnreg"):
        LaunchConfig(C=64, BV=64, num_warps=4, maxnreg=300)
    with pytest.raises(ValueError, match="walk_maxnreg=32"):
        LaunchConfig(C=64, BV=64, num_warps=4, walk_maxnreg=32)


def test_gluon_fwd_is_checked():
    from linearize.ops.triton.chunk import LaunchConfig

    with pytest.raises(ValueError, match="gluon_fwd=32 must be None, 64 or 128"):
        LaunchConfig(C=64, BV=64, num_warps=4, split_forward=True, gluon_fwd=32)
    with pytest.raises(ValueError, match="needs split_forward"):
        LaunchConfig(C=64, BV=64, num_warps=4, gluon_fwd=64)
    for name in ("gluon_dq", "gluon_dk"):
        with pytest.raises(ValueError, match=f"{name} .* needs fold_backward"):
            LaunchConfig(C=64, BV=64, num_warps=4, **{name: True})
    with pytest.raises(ValueError, match="gluon_dk=4 must be 0"):
        LaunchConfig(C=64, BV=64, num_warps=4, fold_backward=True, gluon_dk=4)


@inside
def test_gluon_fwd_falls_back_to_the_triton_kernel_off_hopper():
    """``LaunchConfig.gluon_fwd`` / ``gluon_dq`` / ``gluon_dk`` where the Gluon kernels cannot run (here: the interpreter on CPU;
    likewise any GPU but sm_90, fp32 inputs, C != 64): the Triton kernels run instead, with the same outputs and
    gradients."""
    import dataclasses

    from linearize.ops.triton import chunk_gluon
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton

    cfg = LaunchConfig(C=64, BV=64, num_warps=4, nseg=1, C_intra=32, warps_intra=4, split_forward=True,
                       fold_backward=True, skip_empty=True)
    q, k, v, pq, pk, g = random_inputs(1, 70, 2, 1, 16, 16, 1, dtype=torch.float32, seed=5)
    assert not chunk_gluon.supported(q, 16, 16, 64, 64)
    outs = []
    for c in (cfg, dataclasses.replace(cfg, gluon_fwd=64, gluon_dq=True, gluon_dk=True),
              dataclasses.replace(cfg, gluon_dk=3)):
        ins = [x.clone().requires_grad_(True) for x in (q, k, v, pq, pk, g)]
        y, _ = hybrid_attention_triton(*ins[:5], window=20, window_weight=ins[5], config=c)
        outs.append((y, *torch.autograd.grad(y.sum(), ins)))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_local_sums_needs_a_walk_it_changes():
    from linearize.ops.triton.chunk import LaunchConfig

    with pytest.raises(ValueError, match="local_sums"):
        LaunchConfig(C=64, BV=64, num_warps=4, local_sums=True)


@inside
def test_fold_backward_with_odd_dims_and_an_initial_state():
    """D and F not powers of two, D over two value blocks, the window weight frozen, and a piece of a prefill
    started from a state: the same gradients as the walks."""
    from linearize.ops.triton.chunk import LaunchConfig

    _check(1, 45, 2, 1, 24, 20, 1, 9, BV=16, nseg=2, fold_backward=True)
    cfgs = [LaunchConfig(C=16, BV=16, num_warps=4, nseg=2, fold_backward=fold) for fold in (False, True)]
    for a, b in zip(*_second_piece(cfgs, frozen_gamma=True)):
        assert rel_err(a, b) < 1e-5


@inside
def test_split_forward_with_value_blocks_and_an_initial_state():
    """Value blocks (each program a slice of D; z written once) and a prefill from a state: both forwards agree."""
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton

    q, k, v, pq, pk, g = random_inputs(2, 45, 4, 2, 24, 20, 2, dtype=torch.float32, seed=11)
    args = dict(window=9, window_weight=g, attention_mask=left_pad_mask(2, 45, [0, 7]), output_final_state=True)
    cut = 19
    outs = []
    for split in (False, True):
        cfg = LaunchConfig(C=32, BV=16, num_warps=4, nseg=2, split_forward=split, C_intra=16 if split else None)
        _, st = hybrid_attention_triton(*(x[:, :cut] for x in (q, k, v, pq, pk)), config=cfg,
                                        **dict(args, attention_mask=args["attention_mask"][:, :cut]))
        y, st2 = hybrid_attention_triton(*(x[:, cut:] for x in (q, k, v, pq, pk)), config=cfg, initial_state=st,
                                         **dict(args, attention_mask=args["attention_mask"][:, cut:]))
        outs.append((y, st2))
    (y0, s0), (y1, s1) = outs
    assert rel_err(y1, y0) < 1e-6
    for a, b in zip(s1, s0):
        assert rel_err(a, b) < 1e-6


def test_split_forward_excludes_one_acc():
    from linearize.ops.triton.chunk import LaunchConfig

    with pytest.raises(ValueError, match="split_forward"):
        LaunchConfig(C=64, BV=64, num_warps=4, one_acc=True, split_forward=True)


def test_a_launch_config_travels_through_the_ops_ints():
    """The custom ops take a LaunchConfig as ints (torch.compile's schemas have no dataclasses): every field, every
    flag, comes back as it went."""
    from linearize.ops.triton.chunk import LaunchConfig, _cfg, _launch_ints

    for cfg in (LaunchConfig(C=64, BV=128, num_warps=8, num_stages=2),
                LaunchConfig(C=64, BV=64, num_warps=4, nseg=7, one_acc=True, skip_empty=True),
                LaunchConfig(C=64, BV=128, num_warps=8, num_stages=2, C_intra=32, warps_intra=4, split_forward=True,
                             fold_backward=True, skip_empty=True),
                LaunchConfig(C=64, BV=64, num_warps=8, C_intra=32, warps_intra=4, C_fwd=64, warps_fwd=8, C_dk=16,
                             warps_dk=2, split_forward=True, fold_backward=True),
                LaunchConfig(C=128, BV=128, num_warps=16, C_dk=128, warps_dk=16, dk_launches=3),
                LaunchConfig(C=64, BV=64, num_warps=4, dk_launches=2, skip_empty=True),
                LaunchConfig(C=128, BV=128, num_warps=8, C_intra=32, warps_intra=4, split_forward=True,
                             fold_backward=True, skip_empty=True, local_sums=True, dk_launches=3),
                *(LaunchConfig(C=64, BV=128, num_warps=8, nseg=1, split_forward=True, fold_backward=True,
                               walk_tile=tile) for tile in (16, 32, 64)),
                LaunchConfig(C=64, BV=128, num_warps=8, split_forward=True, fold_backward=True, walk_tile=64,
                             walk_pairs=True, walk_stages=4, local_sums=True),
                LaunchConfig(C=64, BV=64, num_warps=4, fold_backward=True, walk_stages=1),
                LaunchConfig(C=64, BV=128, num_warps=8, C_intra=32, warps_intra=4, C_fwd=64, warps_fwd=8, C_dk=32,
                             warps_dk=4, split_forward=True, fold_backward=True, maxnreg=168),
                LaunchConfig(C=64, BV=64, num_warps=4, fold_backward=True, dgamma_in_dq=True),
                LaunchConfig(C=64, BV=128, num_warps=8, split_forward=True, fold_backward=True, walk_tile=64,
                             walk_stages=3, dgamma_in_dq=True, delta_in_dq=True),
                LaunchConfig(C=64, BV=64, num_warps=4, fold_backward=True, overlap=True),
                LaunchConfig(C=64, BV=128, num_warps=8, split_forward=True, fold_backward=True, walk_tile=64,
                             maxnreg=200, walk_maxnreg=128, overlap=True),
                *(LaunchConfig(C=64, BV=128, num_warps=8, C_intra=32, warps_intra=4, split_forward=True,
                               fold_backward=True, overlap=True, gluon_fwd=g, gluon_dq=g == 64) for g in (64, 128)),
                LaunchConfig(C=64, BV=64, num_warps=4, fold_backward=True, gluon_dq=True, gluon_dk=True),
                *(LaunchConfig(C=64, BV=64, num_warps=4, fold_backward=True, gluon_dk=form) for form in (2, 3))):
        assert _cfg(_launch_ints(cfg)) == cfg


def test_intra_block_must_divide_the_chunk():
    from linearize.ops.triton.chunk import LaunchConfig

    for bad in (8, 24, 128):
        with pytest.raises(ValueError, match="C_intra"):
            LaunchConfig(C=64, BV=64, num_warps=4, C_intra=bad)
        with pytest.raises(ValueError, match="C_dk"):
            LaunchConfig(C=64, BV=64, num_warps=4, C_dk=bad)
    with pytest.raises(ValueError, match="dk_launches"):
        LaunchConfig(C=64, BV=64, num_warps=4, dk_launches=4)
    with pytest.raises(ValueError, match="C_dk=256 must be at most 128"):  # (a byte in the ops' ints)
        LaunchConfig(C=256, BV=64, num_warps=4, C_dk=256)
    assert LaunchConfig(C=64, BV=64, num_warps=4, C_intra=32).C_intra == 32


@inside
def test_value_blocks_and_odd_dims():
    # D and F that are not powers of two (masked tiles), value dim split over 2 blocks (atomic adds)
    _check(1, 45, 2, 1, 24, 20, 1, 9, BV=16, nseg=2)
    _check(2, 30, 4, 2, 32, 16, 4, 6, BV=16, nseg=2, seed=3)


@inside
@pytest.mark.parametrize("W", [0, 5, 19])
def test_padding(W):
    m = left_pad_mask(2, 37, [0, 9])
    m[0, 20] = False  # a hole too: invalid keys count nowhere
    _check(2, 37, 4, 2, 16, 32, 2, W, mask=m, nseg=2)
    _check(2, 37, 4, 2, 16, 32, 4, W, mask=m, nseg=3)


@inside
@pytest.mark.parametrize("W", [0, 1, 6, 40])
def test_prefill_in_pieces(W):
    """First piece with the final state, then the rest from it: equals one pass of the chunked path."""
    from linearize.ops import hybrid_attention_chunked
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton

    q, k, v, pq, pk, g = random_inputs(2, 45, 4, 2, 16, 16, 2, dtype=torch.float32, seed=W)
    m = left_pad_mask(2, 45, [0, 7])
    cfg = LaunchConfig(C=16, BV=16, num_warps=4, nseg=2)
    full, full_state = hybrid_attention_chunked(q, k, v, pq, pk, window=W, window_weight=g, attention_mask=m, output_final_state=True)
    cut = 19
    y1, st = hybrid_attention_triton(
        q[:, :cut], k[:, :cut], v[:, :cut], pq[:, :cut], pk[:, :cut], window=W, window_weight=g,
        attention_mask=m[:, :cut], output_final_state=True, config=cfg,
    )
    y2, st2 = hybrid_attention_triton(
        q[:, cut:], k[:, cut:], v[:, cut:], pq[:, cut:], pk[:, cut:], window=W, window_weight=g,
        attention_mask=m[:, cut:], initial_state=st, output_final_state=True, config=cfg,
    )
    assert rel_err(torch.cat([y1, y2], 1), full) < 2e-5
    for a, b in zip(st2, full_state):
        assert rel_err(a, b) < 2e-5


@inside
def test_half_precision_and_constant_window_weight():
    """fp16 operands (the interpreter's bf16 stores are not faithful): outputs and gradients, gamma's too,
    against fp64 on the same rounded inputs; and a plain-float window weight (no gamma gradient kept)."""
    from linearize.ops import hybrid_attention_chunked
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton

    cfg = LaunchConfig(C=16, BV=16, num_warps=4, nseg=2)
    for T, W in [(90, 20), (50, 64)]:
        ins64 = random_inputs(2, T, 4, 2, 16, 32, 2, dtype=torch.float64, seed=T)
        ins = [t.to(torch.float16).requires_grad_(True) for t in ins64[:5]] + [ins64[5].float().requires_grad_(True)]
        ref = [t.detach().double().requires_grad_(True) for t in ins]
        y, _ = hybrid_attention_triton(*ins[:5], window=W, window_weight=ins[5], config=cfg)
        yr, _ = hybrid_attention_chunked(*ref[:5], window=W, window_weight=ref[5])
        assert rel_err(y, yr) < 5e-3
        dy = torch.randn(y.shape, dtype=torch.float64)
        gr = torch.autograd.grad(y, ins, dy.half(), allow_unused=True, materialize_grads=True)
        grr = torch.autograd.grad(yr, ref, dy, allow_unused=True, materialize_grads=True)
        floor = max(g.norm().item() for g in grr) * 1e-2
        errs = {n: _grad_err(a, b, floor) for n, a, b in zip("q k v phi_q phi_k gamma".split(), gr, grr)}
        assert max(errs.values()) < 1e-2, errs
    q, k, v, pq, pk, _ = random_inputs(1, 40, 2, 1, 16, 16, 1, dtype=torch.float32, seed=5, requires_grad=True)
    y, _ = hybrid_attention_triton(q, k, v, pq, pk, window=7, window_weight=0.3, config=cfg)
    yr, _ = hybrid_attention_chunked(q, k, v, pq, pk, window=7, window_weight=0.3)
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (q, k, v, pq, pk), dy), torch.autograd.grad(yr, (q, k, v, pq, pk), dy)):
        assert rel_err(a, b) < 1e-4


@inside
def test_batch_over_the_grid_limit_runs_in_pieces(monkeypatch):
    """B x H over CUDA's 65535 (lowered here to 5): slices of 2 sequences (H = 2), concatenated; outputs,
    gradients, an initial state and the final state as one pass of the chunked path."""
    from linearize.ops import hybrid_attention_chunked
    from linearize.ops.triton import chunk
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton

    calls = []
    real = chunk._HybridChunkFn.apply
    monkeypatch.setattr(chunk._HybridChunkFn, "apply", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(chunk, "MAX_GRID_Y", 5)
    q, k, v, pq, pk, g = random_inputs(5, 30, 2, 1, 16, 16, 2, dtype=torch.float32, seed=11, requires_grad=True)
    m = left_pad_mask(5, 30, [0, 3, 0, 12, 1])
    cfg = LaunchConfig(C=16, BV=16, num_warps=4, nseg=2)
    args = dict(window=6, window_weight=g, attention_mask=m, output_final_state=True)
    _, st0 = hybrid_attention_chunked(q[:, :11].detach(), k[:, :11].detach(), v[:, :11].detach(), pq[:, :11].detach(),
                                      pk[:, :11].detach(), window=6, window_weight=g.detach(), attention_mask=m[:, :11],
                                      output_final_state=True)
    rest = [t[:, 11:] for t in (q, k, v, pq, pk)]
    y, st = hybrid_attention_triton(*rest, initial_state=st0, config=cfg, **(args | {"attention_mask": m[:, 11:]}))
    yr, sr = hybrid_attention_chunked(*rest, initial_state=st0, **(args | {"attention_mask": m[:, 11:]}))
    assert calls == [2, 2, 1]
    assert rel_err(y, yr) < 2e-5
    for a, b in zip(st, sr):
        assert a.shape == b.shape and rel_err(a, b) < 2e-5
    dy = torch.randn_like(y)
    ins = (q, k, v, pq, pk, g)
    gr = torch.autograd.grad(y, ins, dy, allow_unused=True, materialize_grads=True)
    grr = torch.autograd.grad(yr, ins, dy, allow_unused=True, materialize_grads=True)
    scale = max(x.double().norm().item() for x in grr) * 1e-2
    assert max(_grad_err(a, b, scale) for a, b in zip(gr, grr)) < 2e-4


@inside
@pytest.mark.parametrize("W", [1, 5, 17])
def test_steep_scores_outside_the_window(W):
    """Every future key outscores every key a query may see by up to ~1500: the kernels' exp must never meet
    those scores unmasked (the PyTorch path's backward once turned them into NaN: tests/ops/test_window_exp.py)."""
    from linearize.ops import hybrid_attention_chunked
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton

    T = 45
    q, k, v, pq, pk, g = random_inputs(1, T, 2, 1, 16, 16, 1, dtype=torch.float32, seed=W)
    q[..., 0] = 60.0
    k[..., 0] = 100.0 * torch.arange(T, dtype=torch.float32).view(1, T, 1) / T
    ins = [t.detach().requires_grad_(True) for t in (q, k, v, pq, pk, g)]
    args = dict(window=W, window_weight=ins[5])
    y, _ = hybrid_attention_triton(*ins[:5], config=LaunchConfig(C=16, BV=16, num_warps=4), **args)
    yr, _ = hybrid_attention_chunked(*ins[:5], **args)
    assert torch.isfinite(y).all() and rel_err(y, yr) < 2e-5
    dy = torch.randn_like(y)
    gr = torch.autograd.grad(y, ins, dy)
    grr = torch.autograd.grad(yr, ins, dy)
    scale = max(x.double().norm().item() for x in grr) * 1e-2
    for name, a, b in zip("q k v phi_q phi_k gamma".split(), gr, grr):
        assert torch.isfinite(a).all(), name
        assert _grad_err(a, b, scale) < 2e-4, name


@inside
@pytest.mark.parametrize("case", [(1, 40, 2, 1, 16, 16, 1, 5), (2, 37, 4, 2, 16, 32, 4, 1), (1, 50, 3, 1, 32, 16, 1, 17),
                                  (2, 33, 2, 2, 16, 16, 2, 100), (1, 9, 2, 2, 16, 16, 2, 4)])
def test_one_accumulator_forward(case):
    """``LaunchConfig(one_acc=True)``: the window max in a first pass and one accumulator. Same outputs, the same
    saved max / arg-max (so the backward's gradients match too), with padding; used only where the window weight
    needs no gradient (with one, the kernel falls back to two accumulators for u = dy/dgamma)."""
    from linearize.ops import hybrid_attention_chunked
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton

    B, T, H, Hkv, D, F, Hf, W = case
    q, k, v, pq, pk, g = random_inputs(B, T, H, Hkv, D, F, Hf, dtype=torch.float32, seed=W, requires_grad=True)
    g = g.detach()  # frozen window weight: no u, so ONE_ACC runs
    mask = left_pad_mask(B, T, [0, 3][:B])
    ins = (q, k, v, pq, pk)
    args = dict(window=W, window_weight=g, attention_mask=mask, output_final_state=True)
    y, st = hybrid_attention_triton(*ins, config=LaunchConfig(C=16, BV=16, num_warps=4, nseg=2, one_acc=True), **args)
    y2, _ = hybrid_attention_triton(*ins, config=LaunchConfig(C=16, BV=16, num_warps=4, nseg=2), **args)
    yr, sr = hybrid_attention_chunked(*ins, **args)
    assert torch.isfinite(y).all() and rel_err(y, yr) < 2e-5 and rel_err(y, y2) < 2e-5
    for a, b in zip(st, sr):
        assert rel_err(a, b) < 2e-5
    dy = torch.randn_like(y)
    gr = torch.autograd.grad(y, ins, dy)
    grr = torch.autograd.grad(yr, ins, dy)
    scale = max(x.double().norm().item() for x in grr) * 1e-2
    errs = {n: _grad_err(a, b, scale) for n, a, b in zip("q k v phi_q phi_k".split(), gr, grr)}
    assert max(errs.values()) < 2e-4, errs


@inside
def test_one_accumulator_steps_aside_when_gamma_needs_a_gradient():
    from linearize.ops import hybrid_attention_chunked
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton

    q, k, v, pq, pk, g = random_inputs(1, 40, 2, 1, 16, 16, 1, dtype=torch.float32, seed=3, requires_grad=True)
    y, _ = hybrid_attention_triton(q, k, v, pq, pk, window=5, window_weight=g,
                                   config=LaunchConfig(C=16, BV=16, num_warps=4, one_acc=True))
    yr, _ = hybrid_attention_chunked(q, k, v, pq, pk, window=5, window_weight=g)
    (dg,), (dgr,) = torch.autograd.grad(y.sum(), [g]), torch.autograd.grad(yr.sum(), [g])
    assert rel_err(y, yr) < 2e-5 and rel_err(dg, dgr) < 1e-4


@needs_triton
@inside
@pytest.mark.parametrize("nseg", [1, 2, 5])
@pytest.mark.parametrize("reverse", [False, True])
def test_segment_prefix_against_torch(nseg, reverse):
    """The exclusive prefix over segments (forward: seeded with the initial sums; backward: reversed, from 0)
    against its torch form, on a block count that is not a multiple of the kernel's block."""
    from linearize.ops.triton import chunk

    g = torch.Generator().manual_seed(nseg)
    x = torch.randn(nseg, 3, 2, 7, 50, generator=g)  # 2100 elements a segment: 3 blocks of 1024, the last partial
    init = None if reverse else torch.randn(3, 2, 7, 50, generator=g)
    chunk.POISON_OUTPUTS = True
    try:
        out = chunk._segment_prefix(x, init, reverse=reverse)
    finally:
        chunk.POISON_OUTPUTS = False
    ref = x.flip(0).cumsum(0).flip(0) - x if reverse else x.cumsum(0) - x + init
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)


@inside
@pytest.mark.parametrize("masked,forms", [(False, ((False, True), (True, False))), (True, ((False, False), (True, True)))],
                         ids=["dense", "padded"])
def test_ops_pass_opcheck(masked, forms):
    """The forward and backward custom ops: schemas, fake kernels (shapes, dtypes, the segment count) and the
    autograd registration, as torch.compile relies on them; gamma with and without a gradient (u stored or not);
    the padded split + fold also with local_sums (the prefix then kept in the chunk sums' dtype).
    ``forms``: (split + fold launch, u stored) pairs, so that each pair of the three factors (mask, launch, u) meets
    in both of its value combinations over the two ids (4 opchecks of the interpreter's ~12 s, not all 8)."""
    from linearize.ops.triton.chunk import LaunchConfig, _hybrid_chunk_op, _launch_ints

    q, k, v, pq, pk, g = random_inputs(2, 21, 4, 2, 16, 8, 4, dtype=torch.float32, seed=5, requires_grad=True)
    mask = left_pad_mask(2, 21, [0, 5]).to(torch.uint8).contiguous() if masked else None
    S0, z0 = torch.zeros(2, 4, 8, 16), torch.zeros(2, 4, 8)
    for split_fold, store_u in forms:
        cfg = LaunchConfig(C=16, BV=16, num_warps=4, nseg=2, split_forward=split_fold, fold_backward=split_fold,
                           local_sums=split_fold and masked)
        launch = _launch_ints(cfg)  # (split + fold: the op also returns each chunk's sums, kept for the backward)
        gamma = g if store_u else g.detach()
        torch.library.opcheck(_hybrid_chunk_op, (q, k, v, pq, pk, gamma, mask, S0, z0, 6, 0.25, *launch, store_u))


@inside
def test_ops_at_one_segment_from_no_state(monkeypatch):
    """split + fold over one segment with no initial state (``chunk._zero_start``): the walks start from zero and no
    prefix pass runs, forward or backward; the op's pre_S / pre_z are empty, as its fake says (opcheck)."""
    from linearize.ops.triton import chunk
    from linearize.ops.triton.chunk import LaunchConfig, _hybrid_chunk_op, _launch_ints

    cfg = LaunchConfig(C=16, BV=16, num_warps=4, nseg=1, split_forward=True, fold_backward=True, walk_tile=16)
    q, k, v, pq, pk, g = random_inputs(2, 37, 4, 2, 16, 8, 4, dtype=torch.float32, seed=9, requires_grad=True)
    prefixes = []
    real = chunk._segment_prefix
    monkeypatch.setattr(chunk, "_segment_prefix", lambda *a, **kw: prefixes.append(1) or real(*a, **kw))
    out = _hybrid_chunk_op(q, k, v, pq, pk, g, None, None, None, 6, 0.25, *_launch_ints(cfg), True)
    assert out[5].numel() == out[6].numel() == 0
    out[0].sum().backward()
    assert not prefixes
    torch.library.opcheck(_hybrid_chunk_op, (q, k, v, pq, pk, g, None, None, None, 6, 0.25, *_launch_ints(cfg), True))


@inside
def test_split_forward_keeps_the_chunk_sums_for_the_folded_backward(monkeypatch):
    """split_forward + fold_backward: the chunk sums the forward wrote are the ones the backward reads, so they are
    walked once per forward + backward (fold alone walks them in the backward), eagerly and through the custom ops;
    the gradients equal the fold-alone ones (the same sums, walked twice)."""
    from linearize.ops.triton import chunk
    from linearize.ops.triton.chunk import LaunchConfig, _hybrid_chunk_op, _launch_ints, hybrid_attention_triton

    walks = []
    real = chunk._chunk_states
    monkeypatch.setattr(chunk, "_chunk_states", lambda *a: walks.append(1) or real(*a))
    q, k, v, pq, pk, g = random_inputs(2, 45, 4, 2, 16, 8, 4, dtype=torch.float32, seed=11, requires_grad=True)
    ins = (q, k, v, pq, pk, g)
    dy = torch.randn(2, 45, 4, 16, generator=torch.Generator().manual_seed(2))
    grads = {}
    for split in (False, True):
        cfg = LaunchConfig(C=16, BV=16, num_warps=4, nseg=2, split_forward=split, fold_backward=True)
        walks.clear()
        y, _ = hybrid_attention_triton(q, k, v, pq, pk, window=6, window_weight=g, config=cfg)
        grads[split] = torch.autograd.grad(y, ins, dy)
        assert len(walks) == 1, (split, len(walks))
        walks.clear()
        y = _hybrid_chunk_op(q, k, v, pq, pk, g, None, None, None, 6, 0.25, *_launch_ints(cfg), True)[0]
        op_grads = torch.autograd.grad(y, ins, dy)
        assert len(walks) == 1, ("op", split, len(walks))
        for a, b in zip(op_grads, grads[split]):
            assert rel_err(a, b) < 1e-6
    for a, b in zip(grads[True], grads[False]):
        assert rel_err(a, b) < 1e-6


@inside
def test_compiled_function_equals_eager():
    """torch.compile around the kernels (inductor on this CPU; the ops stay opaque launches): output and every
    gradient as eager, with glue before and after the op for inductor to fuse."""
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton

    cfg = LaunchConfig(C=16, BV=16, num_warps=4, nseg=2)

    def f(q, k, v, pq, pk, g):
        y, _ = hybrid_attention_triton(q * 1.5, k, v, pq.exp(), pk.exp(), window=6, window_weight=g.sigmoid(), config=cfg)
        return (y.tanh() * 2).sum(-1)

    ins = random_inputs(2, 37, 4, 2, 16, 8, 2, dtype=torch.float32, seed=6, requires_grad=True)
    dy = torch.randn(2, 37, 4, generator=torch.Generator().manual_seed(1))
    out = [f(*ins), torch.compile(f, fullgraph=True)(*ins)]
    grads = [torch.autograd.grad(o, ins, dy) for o in out]
    assert rel_err(out[1], out[0]) < 1e-6
    for a, b in zip(*grads):
        assert rel_err(b, a) < 1e-6


@inside
def test_a_training_call_fills_nothing():
    """Forward + backward without an initial state, eagerly and through the custom ops torch.compile calls: no zero
    state built and read, and no zero gradient filled for the op's saved outputs (pre_S alone is 67 MB at 16K)."""
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton
    from tests.ops.helpers import CountOps as Count

    q, k, v, pq, pk, g = random_inputs(2, 40, 4, 2, 16, 8, 4, dtype=torch.float32, seed=9, requires_grad=True)
    dy = torch.randn(2, 40, 4, 16)
    cfg = LaunchConfig(C=16, BV=16, num_warps=4, nseg=2)
    fills = {"zeros", "zeros_like", "new_zeros", "fill_", "zero_", "full", "ones"}
    with Count() as c:
        y, _ = hybrid_attention_triton(q, k, v, pq, pk, window=6, window_weight=g, config=cfg)
        ref = torch.autograd.grad(y, (q, k, v, pq, pk, g), dy)
    assert not fills & set(c.ops), c.ops
    # the custom op (what torch.compile calls), through its registered autograd
    from linearize.ops.triton import chunk
    from linearize.ops.triton.chunk import _hybrid_chunk_op, _launch_ints

    with Count() as c:
        y = _hybrid_chunk_op(q, k, v, pq, pk, g, None, None, None, 6, 0.25, *_launch_ints(cfg), True)[0]
        grads = torch.autograd.grad(y, (q, k, v, pq, pk, g), dy)
    assert c.ops[chunk.FORWARD_OP] == 1 and c.ops[chunk.BACKWARD_OP] == 1 and not fills & set(c.ops), c.ops
    for a, b in zip(grads, ref):
        assert rel_err(a, b) < 1e-6
