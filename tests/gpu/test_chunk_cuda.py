"""Fused chunk kernels on CUDA against the float64 chunked path: outputs, final states, every gradient.

Thresholds follow the device notes (the reference gets the same rounded inputs, upcast) (METHOD.md): ||out - ref|| / ||ref|| far under 1e-3 for fp32 (the kernels
use exact fp32 products for fp32 inputs), up to 1e-2 for bf16/fp16 operands; gradients, which chain two
rounded products, get twice that. Every output is NaN-poisoned before launch, so unwritten elements fail.
"""

import pytest
import torch

from tests.ops.helpers import left_pad_mask, random_inputs, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poison():
    from linearize.ops.triton import chunk

    chunk.POISON_OUTPUTS = True
    yield
    chunk.POISON_OUTPUTS = False


def _check(B, T, H, Hkv, D, F, Hf, W, dtype, *, mask=None, seed=0, config=None):
    from linearize.ops import hybrid_attention_chunked
    from linearize.ops.triton.chunk import hybrid_attention_triton

    dev = "cuda"
    ins64 = [t.to(dev) for t in random_inputs(B, T, H, Hkv, D, F, Hf, dtype=torch.float64, seed=seed)]
    ins = [t.to(dtype).requires_grad_(True) for t in ins64[:5]] + [ins64[5].float().requires_grad_(True)]
    # The reference sees the same (rounded) inputs, upcast: the error measured is the kernel's alone.
    ref_ins = [t.detach().double().requires_grad_(True) for t in ins]
    m = None if mask is None else mask.to(dev)
    args = dict(window=W, attention_mask=m, output_final_state=True)
    y, st = hybrid_attention_triton(*ins[:5], window_weight=ins[5], config=config, **args)
    yr, sr = hybrid_attention_chunked(*ref_ins[:5], window_weight=ref_ins[5], **args)
    tol = TOL[dtype]
    assert not torch.isnan(y).any()
    assert rel_err(y, yr) < tol, rel_err(y, yr)
    assert rel_err(st.S, sr.S) < tol and rel_err(st.z, sr.z) < tol
    dy = torch.randn(y.shape, dtype=torch.float64, device=dev)
    gr = torch.autograd.grad(y, ins, dy.to(dtype), allow_unused=True, materialize_grads=True)
    grr = torch.autograd.grad(yr, ref_ins, dy, allow_unused=True, materialize_grads=True)
    floor = max(g.norm().item() for g in grr) * 1e-2  # gamma's gradient is ~0 when all keys are in the window
    for name, a, b in zip("q k v phi_q phi_k gamma".split(), gr, grr):
        assert not torch.isnan(a).any(), name
        err = (a.double() - b).norm().item() / max(b.norm().item(), floor)
        assert err < 2 * tol, (name, err)


# Each (dtype, D, F) compiles its own kernels (a few seconds each), so the dtype x dim grid is sparse; T and
# the window are swept fully. The backward kernels specialize on T, the chunk count and the window (== 1,
# divisible by 16), so the sweep compiles each of them ~7 times; in fp32 that took 200-400 s for one
# (D, F), more than one device call's test budget, so fp32 runs one (T, W) a test id and
# scripts/gpu_tests_parallel.sh spreads them over processes.
DTYPE_DIMS = [
    (torch.bfloat16, 64, 128), (torch.bfloat16, 128, 128), (torch.bfloat16, 256, 128), (torch.bfloat16, 64, 256),
    (torch.bfloat16, 128, 64), (torch.float16, 128, 128),
]
FP32_DIMS = [(64, 128), (128, 128)]
T_W = [(1, 64), (63, 64), (200, 64), (1000, 64), (1000, 128), (333, 0), (333, 1), (77, 200)]


@pytest.mark.parametrize("dtype,D,F", DTYPE_DIMS, ids=lambda x: str(x).replace("torch.", ""))
def test_against_reference(dtype, D, F):
    for T, W in T_W:
        _check(2, T, 4, 2, D, F, 2, W, dtype, seed=T + W + D)


@pytest.mark.parametrize("T,W", T_W, ids=[f"T{t}-W{w}" for t, w in T_W])
@pytest.mark.parametrize("D,F", FP32_DIMS, ids=[f"D{d}-F{f}" for d, f in FP32_DIMS])
def test_against_reference_fp32(D, F, T, W):
    _check(2, T, 4, 2, D, F, 2, W, torch.float32, seed=T + W + D)


@pytest.mark.parametrize("H,Hkv,D,Hf", [(9, 3, 64, 3), (9, 3, 64, 9), (4, 1, 256, 1), (14, 2, 64, 2)], ids=["smollm2", "smollm2-perq", "gemma3", "qwen2.5"])
def test_real_model_head_shapes(H, Hkv, D, Hf):
    _check(2, 700, H, Hkv, D, 128, Hf, 64, torch.bfloat16, seed=H)


@pytest.mark.parametrize("W", [0, 64])
def test_padding(W):
    m = left_pad_mask(3, 300, [0, 17, 150])
    _check(3, 300, 4, 2, 64, 128, 2, W, torch.bfloat16, mask=m)
    _check(3, 300, 4, 2, 64, 128, 4, W, torch.float32, mask=m)


def test_segments_and_value_blocks():
    from linearize.ops.triton.chunk import LaunchConfig

    for cfg in (LaunchConfig(C=32, BV=32, num_warps=4, nseg=5), LaunchConfig(C=64, BV=64, num_warps=8, nseg=5),
                LaunchConfig(C=32, BV=128, num_warps=8, nseg=1)):
        _check(2, 999, 4, 4, 128, 128, 4, 64, torch.bfloat16, config=cfg)


_FORMS = {"one-pass": (False, False), "fold": (False, True), "split+fold": (True, True)}
# every (block, form) pair but the default launch's (C 64, one pass), which the other tests cover
_INTRA_FORMS = [(intra, form) for form in _FORMS for intra in [None, (32, 4), (16, 4), (16, 2)]
                if intra is not None or form != "one-pass"]


@pytest.mark.parametrize("intra,form", _INTRA_FORMS,
                         ids=[f"{f}-" + ("C{}w{}".format(*i) if i else "C64") for i, f in _INTRA_FORMS])
def test_intra_blocks(intra, form):
    """The backward's intra kernels on blocks smaller than the chunk (``LaunchConfig.C_intra``), the forward in
    two passes (``split_forward``) and the backward without its running-sum walks (``fold_backward``), bf16 with
    padding at W = 64 and 200, on the benchmark's heads, SmolLM2's (3 query heads a key map) and Gemma 3's
    (D = 256: the walks split D in value blocks, the intra kernels do not)."""
    from linearize.ops.triton.chunk import LaunchConfig

    split, fold = _FORMS[form]
    ci, wi = intra or (None, None)
    for W in (64, 200):
        kw = dict(num_stages=2, C_intra=ci, warps_intra=wi, split_forward=split, fold_backward=fold)
        cfg = LaunchConfig(C=64, BV=128, num_warps=8, **kw)
        _check(3, 1000, 4, 4, 128, 128, 4, W, torch.bfloat16, config=cfg, mask=left_pad_mask(3, 1000, [0, 17, 150]))
        _check(2, 700, 9, 3, 64, 128, 3, W, torch.bfloat16, config=LaunchConfig(C=64, BV=64, num_warps=8, **kw), seed=W)
        _check(2, 300, 4, 1, 256, 128, 1, W, torch.bfloat16, config=LaunchConfig(C=32, BV=64, num_warps=4,
               **dict(kw, C_intra=ci and min(ci, 32), num_stages=1)), seed=W)


@pytest.mark.parametrize("training,gluon", [(False, False), (True, True), (True, False)],
                         ids=["eval-default", "training-default", "training-triton"])
def test_skip_empty_blocks(training, gluon):
    """``LaunchConfig(skip_empty=True)`` on the default launches (one-pass forward for evaluation; split + fold on
    blocks of 32 for training): against the float64 reference, and against the same launch unskipped, which it
    must match far closer than either matches the reference (the skipped parts are exact zeros), at windows that
    put the block pairs' edges in different places, with padding. Training with its Gluon kernels (sm_90) and with
    the Triton ones (other GPUs)."""
    import dataclasses

    from linearize.ops.triton.chunk import default_config, hybrid_attention_triton

    for (H, Hkv, D, F, Hf), W in [((4, 4, 128, 128, 4), 64), ((4, 4, 128, 128, 4), 200), ((9, 3, 64, 128, 3), 17),
                                  ((9, 3, 64, 128, 3), 64)]:
        base = dataclasses.replace(default_config(D, F, training=training), skip_empty=False)
        if not gluon:
            base = dataclasses.replace(base, gluon_fwd=None, gluon_dq=False)
        cfg = dataclasses.replace(base, skip_empty=True)
        mask = left_pad_mask(3, 1000, [0, 17, 150])
        _check(3, 1000, H, Hkv, D, F, Hf, W, torch.bfloat16, config=cfg, mask=mask, seed=W)
        ins = [t.cuda().to(torch.bfloat16) for t in random_inputs(3, 1000, H, Hkv, D, F, Hf, seed=W)]
        outs = []
        for c in (base, cfg):
            x = [t.detach().requires_grad_(training) for t in ins[:5]]
            y, _ = hybrid_attention_triton(*x, window=W, window_weight=0.3, attention_mask=mask.cuda(), config=c)
            grads = torch.autograd.grad(y, x, torch.ones_like(y)) if training else ()
            outs.append((y, *grads))
        for a, b in zip(*outs):
            assert rel_err(a, b) < 1e-3, rel_err(a, b)


# (heads (H, Hkv, D, F, Hf), window) the training-launch tests take: the benchmark's at W 64 and 200, SmolLM2's
_TRAINING_HEADS = [((4, 4, 128, 128, 4), 64), ((4, 4, 128, 128, 4), 200), ((9, 3, 64, 128, 3), 64)]


def _check_training_launch(change, heads=_TRAINING_HEADS, gluon=False):
    """The training default (``default_config(D, F, training=True)``) as ``change(cfg, D)`` makes it (None: those
    heads skipped), against the float64 reference in bf16 with padding, on ``heads``. ``gluon`` False: the default
    with its Gluon kernels off (they run on sm_90 only; the launch variants these tests change are the Triton
    kernels' that other GPUs take), unless ``change`` turns them on."""
    import dataclasses

    from linearize.ops.triton.chunk import default_config

    for (H, Hkv, D, F, Hf), W in heads:
        cfg = default_config(D, F, training=True)
        if not gluon:
            cfg = dataclasses.replace(cfg, gluon_fwd=None, gluon_dq=False, gluon_dk=False)
        cfg = change(cfg, D)
        if cfg is not None:
            _check(3, 1000, H, Hkv, D, F, Hf, W, torch.bfloat16, config=cfg,
                   mask=left_pad_mask(3, 1000, [0, 17, 150]), seed=W)


_OWN_BLOCKS = [dict(C_fwd=64, warps_fwd=8), dict(C_intra=64, warps_intra=8, C_fwd=32, warps_fwd=4, C_dk=32, warps_dk=4),
               dict(C_dk=64, warps_dk=8), dict(dk_launches=2), dict(C_dk=64, warps_dk=8, dk_launches=3),
               dict(C_intra=64, warps_intra=8, C_fwd=64, warps_fwd=8, C_dk=32, warps_dk=4, dk_launches=2)]


@pytest.mark.parametrize("own", _OWN_BLOCKS, ids=["fwd64", "dq64", "dk64", "dk-2", "dk64-3", "fwd64-dq64-dk-2"])
@pytest.mark.parametrize("BV", [64, 128])
def test_own_blocks(own, BV):
    """The training default (split + fold + skip on blocks of 32) with some intra kernels on blocks of 64 at 8 warps
    (``LaunchConfig.C_fwd`` / ``C_intra`` / ``C_dk``: wgmma on sm_90, spills) and bwd_dk's gradients over
    two or three launches (``dk_launches``): against the float64 reference in bf16
    with padding, on the benchmark's heads and SmolLM2's, at W = 64 and 200."""
    import dataclasses

    _check_training_launch(lambda cfg, D: dataclasses.replace(cfg, BV=min(BV, D), **own))


@pytest.mark.parametrize("local", [True, False], ids=["local", "segment-sums"])
@pytest.mark.parametrize("C", [64, 128])
@pytest.mark.parametrize("nseg", [None, 5])
def test_local_sums(C, nseg, local):
    """The training default (``local_sums``: chunk-sum walks from zero, the readers adding each segment's prefix; no
    segment-sum passes) and the same launch with the segment-sum passes, at the state chunk C = 64 and 128: against
    the float64 reference in bf16 with padding, on the benchmark's heads (W 64 and 200) and SmolLM2's."""
    import dataclasses

    def change(cfg, D):
        if C == 128 and D < 128:
            return None  # (value blocks narrower than the chunk are refused)
        return dataclasses.replace(cfg, local_sums=local, nseg=nseg, C=C)

    _check_training_launch(change)


@pytest.mark.parametrize("tile,nseg", [(64, 1), (32, 1), (64, None)], ids=["64-whole", "32-whole", "64-segments"])
def test_walk_tile(tile, nseg):
    """The training default with its chunk-sum walks on [tile, tile] state tiles (``walk_tile``: F split across
    programs too), over the whole sequence (one segment: no segment-sum passes, no prefix) or the default segments
    (local_sums): against the float64 reference in bf16 with padding, on the benchmark's heads (W 64 and 200) and
    SmolLM2's."""
    import dataclasses

    _check_training_launch(lambda cfg, D: dataclasses.replace(cfg, walk_tile=tile, nseg=nseg))


@pytest.mark.parametrize("nseg", [1, None], ids=["whole", "segments"])
def test_walk_pairs(nseg):
    """The training default with its walks two chunks a step (``walk_pairs``) at 3 pipeline stages, over the whole
    sequence or the default segments (local_sums): against the float64 reference in bf16 with padding (1000 rows:
    16 chunks of 64, segments of odd counts), on the benchmark's heads (W 64 and 200) and SmolLM2's."""
    import dataclasses

    _check_training_launch(lambda cfg, D: dataclasses.replace(cfg, walk_pairs=True, walk_stages=3, nseg=nseg))


@pytest.mark.parametrize("cap", [168, 128])
def test_register_cap(cap):
    """The training default with its block kernels capped at ``cap`` registers a thread (``maxnreg``: spills, three
    or four programs an SM): against the float64 reference in bf16 with padding, on the benchmark's heads and
    SmolLM2's."""
    import dataclasses

    _check_training_launch(lambda cfg, D: dataclasses.replace(cfg, maxnreg=cap), heads=_TRAINING_HEADS[::2])


@pytest.mark.parametrize("delta", [False, True], ids=["dgamma", "dgamma+delta"])
def test_dgamma_in_dq(delta):
    """The training default with the window weight's gradient formed in bwd_dq (``dgamma_in_dq``: no u written or
    read) and, with ``delta_in_dq``, delta too (no bwd_delta): against the float64 reference in bf16 with padding, on
    the benchmark's heads (W 64 and 200) and SmolLM2's."""
    import dataclasses

    _check_training_launch(lambda cfg, D: dataclasses.replace(cfg, dgamma_in_dq=True, delta_in_dq=delta,
                                                              overlap=cfg.overlap and not delta))


def test_dgamma_in_dq_precision_where_the_window_dominates():
    """bf16, window weight x1 and x30 (the window dominates: the gradient's plain sum cancels, and delta read from the
    bf16 output carries its rounding in; the reason u is formed in fp32): gamma's gradient against the float64
    reference, from bwd_dq (dgamma_in_dq + delta_in_dq) no worse than 2x the stored u's, and under 2e-2."""
    import dataclasses

    from linearize.ops import hybrid_attention_chunked
    from linearize.ops.triton.chunk import default_config, hybrid_attention_triton

    base = default_config(128, 128, training=True)
    cfgs = {"u": base, "dq": dataclasses.replace(base, dgamma_in_dq=True, delta_in_dq=True, overlap=False)}
    for gs in (1.0, 30.0):
        ins64 = [t.cuda() for t in random_inputs(2, 1000, 4, 4, 128, 128, 4, dtype=torch.float64, seed=3)]
        ins = [t.to(torch.bfloat16).requires_grad_(True) for t in ins64[:5]]
        ins.append((ins64[5] * gs).float().requires_grad_(True))
        ref = [t.detach().double().requires_grad_(True) for t in ins]
        yr, _ = hybrid_attention_chunked(*ref[:5], window=64, window_weight=ref[5])
        dy = torch.randn(yr.shape, dtype=torch.float64, device="cuda")
        g_ref = torch.autograd.grad(yr, ref[5], dy)[0]
        errs = {}
        for name, cfg in cfgs.items():
            y, _ = hybrid_attention_triton(*ins[:5], window=64, window_weight=ins[5], config=cfg)
            errs[name] = rel_err(torch.autograd.grad(y, ins[5], dy.to(torch.bfloat16))[0], g_ref)
        assert errs["dq"] < 2e-2 and errs["dq"] <= 2 * errs["u"], (gs, errs)


@pytest.mark.parametrize("nseg,cap", [(None, None), (5, None), (None, 128)],
                         ids=["default-segments", "5-segments", "walks-at-128-registers"])
def test_overlap(nseg, cap):
    """The training default with the backward's gradient-sum walk on a side stream beside bwd_dq (``overlap``), over
    the default segments (one at the benchmark heads) and five (local_sums: the walk also writes the segment totals
    the prefix reads), and with the walks capped at 128 registers (``walk_maxnreg``): against the float64 reference
    in bf16 with padding, on the benchmark's heads (W 64 and 200) and SmolLM2's."""
    import dataclasses

    _check_training_launch(lambda cfg, D: dataclasses.replace(cfg, overlap=True, nseg=nseg, walk_maxnreg=cap))


def test_overlap_inside_a_cuda_graph():
    """forward + backward with ``overlap`` captured in a CUDA graph (the side stream forked from and joined to the
    capturing stream) and replayed on new inputs: the same output and gradients as the eager launch without it."""
    import dataclasses

    from linearize.ops.triton.chunk import default_config, hybrid_attention_triton

    cfg = default_config(128, 128, training=True)
    base = dataclasses.replace(cfg, overlap=False)
    ins = [t.cuda().to(torch.bfloat16).requires_grad_(True) for t in random_inputs(2, 700, 4, 4, 128, 128, 4, seed=1)[:5]]
    gamma = torch.full((4,), 0.4, device="cuda", requires_grad=True)
    leaves = [*ins, gamma]
    dy = torch.randn(2, 700, 4, 128, device="cuda", dtype=torch.bfloat16)

    def step(c):
        y, _ = hybrid_attention_triton(*ins, window=64, window_weight=gamma, config=c)
        return (y, *torch.autograd.grad(y, leaves, dy))

    warm = torch.cuda.Stream()  # (compile and warm up outside the capture, on a side stream, as capture requires)
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        step(cfg)
    torch.cuda.current_stream().wait_stream(warm)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(cfg)
    new = random_inputs(2, 700, 4, 4, 128, 128, 4, seed=2)[:5]
    with torch.no_grad():
        for t, x in zip(ins, new):
            t.copy_(x.cuda().to(torch.bfloat16))
        dy.copy_(torch.randn_like(dy))
    graph.replay()
    torch.cuda.synchronize()
    ref = step(base)
    for name, a, b in zip("y dq dk dv dphi_q dphi_k dgamma".split(), outs, ref):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-3, (name, rel_err(a, b))


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


class _Spy:
    """Counts the launches of a kernel it wraps (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


@pytest.fixture
def gluon_spy(monkeypatch):
    """The Gluon kernels' launches, counted (``.calls`` the forward's, ``.dq.calls`` bwd_dq's, ``.dk.calls``
    bwd_dk's): a test of them must not pass on the Triton kernels' fallback."""
    from linearize.ops.triton import chunk_gluon

    if not _hopper():
        pytest.skip("the Gluon kernels use wgmma: sm_90 only")
    spy = _Spy(chunk_gluon.fwd_blocks_wgmma_kernel)
    spy.dq = _Spy(chunk_gluon.bwd_dq_wgmma_kernel)
    spy.dk = _Spy(chunk_gluon.bwd_dk_wgmma_kernel)
    monkeypatch.setattr(chunk_gluon, "fwd_blocks_wgmma_kernel", spy)
    monkeypatch.setattr(chunk_gluon, "bwd_dq_wgmma_kernel", spy.dq)
    monkeypatch.setattr(chunk_gluon, "bwd_dk_wgmma_kernel", spy.dk)
    return spy


@pytest.mark.parametrize("BV", [128, 64])
@pytest.mark.parametrize("nseg", [None, 5], ids=["default-segments", "5-segments"])
def test_gluon_fwd(gluon_spy, BV, nseg):
    """The training default with the split forward's block kernel in Gluon (``gluon_fwd``: wgmma on blocks of 64, one
    warpgroup), on 128 and 64 value columns, over the default segments and five (local_sums: the kernel adds the
    segment's prefix): outputs, states and every gradient (through u, the max, the denominator and the arg-max it
    writes) against the float64 reference in bf16 with padding, on the benchmark's heads (W 64 and 200) and SmolLM2's."""
    import dataclasses

    _check_training_launch(lambda cfg, D: dataclasses.replace(cfg, gluon_fwd=BV, nseg=nseg))
    assert gluon_spy.calls == 3 and gluon_spy.dq.calls == 0


def test_training_default_takes_the_gluon_kernels(gluon_spy):
    """The training default as it is on sm_90 (the split forward's block kernel and bwd_dq in Gluon, bwd_dk in
    Triton): against the float64 reference in bf16 with padding, on the benchmark's heads and SmolLM2's."""
    _check_training_launch(lambda cfg, D: cfg, gluon=True)
    assert gluon_spy.calls == 3 and gluon_spy.dq.calls == 3 and gluon_spy.dk.calls == 0


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
@pytest.mark.parametrize("nseg", [None, 5], ids=["default-segments", "5-segments"])
def test_gluon_dq(gluon_spy, nseg, overlap):
    """The training default with bwd_dq in Gluon (``gluon_dq``: blocks of 64, one warpgroup, the linear and window
    pairs in two passes), with and without the walk beside it (``overlap``), with the Gluon forward too, over the
    default segments and five (the segment prefix): against the float64 reference in bf16 with padding, on the
    benchmark's heads (W 64 and 200) and SmolLM2's."""
    import dataclasses

    _check_training_launch(lambda cfg, D: dataclasses.replace(cfg, gluon_fwd=128, gluon_dq=True, nseg=nseg,
                                                              overlap=overlap))
    assert gluon_spy.calls == 3 and gluon_spy.dq.calls == 3 and gluon_spy.dk.calls == 0


#: LaunchConfig.gluon_dk's forms: their bwd_dk launches a backward
_DK_LAUNCHES = {1: 3, 2: 2, 3: 1}


@pytest.mark.parametrize("form", [1, 2, 3], ids=["3-launches", "2-launches", "3-kinds"])
@pytest.mark.parametrize("nseg", [None, 5], ids=["default-segments", "5-segments"])
def test_gluon_dk(gluon_spy, nseg, form):
    """The training default with bwd_dk in Gluon (``gluon_dk``: blocks of 64 keys, query-major tiles transposed
    through shared memory; its three gradients over three launches, two (dk, then dv + dphi_k), or one launch of
    three kinds of program), alone and with the Gluon forward and bwd_dq, over the default segments and five
    (the segments' reverse prefix in the fold): against the float64 reference in bf16 with padding, on the
    benchmark's heads (W 64 and 200) and SmolLM2's (three query heads a key head)."""
    import dataclasses

    n = 3 * _DK_LAUNCHES[form]
    _check_training_launch(lambda cfg, D: dataclasses.replace(cfg, gluon_dk=form, nseg=nseg))
    assert gluon_spy.calls == 0 and gluon_spy.dq.calls == 0 and gluon_spy.dk.calls == n
    _check_training_launch(lambda cfg, D: dataclasses.replace(cfg, gluon_fwd=128, gluon_dq=True, gluon_dk=form,
                                                              nseg=nseg))
    assert gluon_spy.calls == 3 and gluon_spy.dq.calls == 3 and gluon_spy.dk.calls == 2 * n


_GLUON_GRID = [(torch.bfloat16, 64, 128), (torch.bfloat16, 128, 64), (torch.bfloat16, 80, 96), (torch.float16, 128, 128)]


@pytest.mark.parametrize("form", [1, 3], ids=["dk-3-launches", "dk-3-kinds"])
@pytest.mark.parametrize("dtype,D,F", _GLUON_GRID, ids=lambda x: str(x).replace("torch.", ""))
def test_gluon_odd_shapes(gluon_spy, dtype, D, F, form):
    """The three Gluon kernels (bwd_dk in three launches and in one of three kinds of program) on the kernel grid's T
    and windows (T < 64, T not a multiple of 64, W = 0 / 1 / 200), head and feature dims under their padded blocks,
    GQA, fp16: against the float64 reference."""
    import dataclasses

    from linearize.ops.triton.chunk import default_config

    cfg = dataclasses.replace(default_config(D, F, training=True), gluon_fwd=128, gluon_dq=True, gluon_dk=form)
    for T, W in T_W:
        _check(2, T, 4, 2, D, F, 2, W, dtype, seed=T + W + D, config=cfg)
    n = len(T_W)
    assert gluon_spy.calls == n and gluon_spy.dq.calls == n and gluon_spy.dk.calls == _DK_LAUNCHES[form] * n


def test_gluon_fwd_writes_what_the_triton_kernel_writes(gluon_spy):
    """The forward op's outputs (y, u, the row max, denominator and arg-max, the kept chunk sums) from the Gluon kernel
    against the Triton block kernel's, with padding, at the benchmark's heads and SmolLM2's."""
    import dataclasses

    from linearize.ops.triton.chunk import _hybrid_chunk_op, _launch_ints, default_config

    for (H, Hkv, D, F, Hf), W in _TRAINING_HEADS:
        *ins, gamma = (t.cuda() for t in random_inputs(3, 1000, H, Hkv, D, F, Hf, seed=W))
        ins = [t.to(torch.bfloat16) for t in ins]
        gamma = gamma.float().contiguous()
        mask = left_pad_mask(3, 1000, [0, 17, 150]).cuda().to(torch.uint8)
        cfg = dataclasses.replace(default_config(D, F, training=True), gluon_fwd=None)
        outs = [_hybrid_chunk_op(*ins, gamma, mask, None, None, W, D ** -0.5, *_launch_ints(c), True)
                for c in (cfg, dataclasses.replace(cfg, gluon_fwd=128))]
        (y0, u0, m0, d0, a0, *rest0), (y1, u1, m1, d1, a1, *rest1) = outs
        assert rel_err(y1, y0) < 1e-2 and rel_err(u1, u0) < 1e-2
        assert rel_err(m1, m0) < 1e-5 and rel_err(d1, d0) < 1e-3
        assert (a1 == a0).float().mean() > 0.999  # (near-ties may differ: the scores' fp32 sums differ in order)
        for a, b in zip(rest1, rest0):
            assert torch.equal(a, b)  # (the same walk wrote them)
    assert gluon_spy.calls == len(_TRAINING_HEADS)


def test_value_blocks_narrower_than_the_chunk_are_refused():
    """C=64, BV=32 is miscompiled by Triton 3.6 on sm_90 (sweep of 2026-12-03): refused before launch."""
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton

    q, k, v, pq, pk, g = (t.cuda() for t in random_inputs(1, 70, 2, 2, 128, 64, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="BV >= C"):
        hybrid_attention_triton(q, k, v, pq, pk, window=64, window_weight=g, config=LaunchConfig(C=64, BV=32, num_warps=4))


@pytest.mark.parametrize("D", [16, 32])
def test_small_head_dims(D):
    """Head dims under 64 get C = BV = the head dim (default_config), the blocks the sweep found right."""
    _check(2, 300, 4, 2, D, 64, 2, 64, torch.bfloat16, seed=D)


def test_long_sequence_memory_is_linear():
    """T = 16K forward + backward stays within a small multiple of the inputs' size (no T x T anything)."""
    from linearize.ops.triton.chunk import hybrid_attention_triton

    B, T, H, D, F = 1, 16384, 4, 128, 128
    q, k, v, pq, pk, g = (t.cuda() for t in random_inputs(B, T, H, H, D, F, H, dtype=torch.bfloat16, requires_grad=False))
    for t in (q, k, v, pq, pk):
        t.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y, _ = hybrid_attention_triton(q, k, v, pq, pk, window=64, window_weight=g)
    y.float().sum().backward()
    torch.cuda.synchronize()
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v, pq, pk))
    assert torch.cuda.max_memory_allocated() - base < 8 * inputs
