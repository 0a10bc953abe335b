"""The decode kernel compiles for sm_90 (H100) on a CPU machine, without spilling registers.

The interpreter tests check the arithmetic but accept code that the GPU compiler rejects; this runs
Triton's real pipeline (down to ptxas, shipped in the triton wheel) for the launch defaults of the
benchmark and real-model shapes, with the 16-byte alignment that a CUDA launch specializes on.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles real kernels"),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from check_smem import resource_usage  # noqa: E402  (registers and spills read from a cubin: one copy, the script's)

POINTERS = ["Q", "K", "V", "PQ", "PK", "VALID", "GAMMA", "S", "Z", "KR", "VR", "PKR", "MR", "POS", "Y"]
STRIDES = ["sQ_b", "sQ_h", "sK_b", "sK_h", "sV_b", "sV_h", "sPQ_b", "sPQ_h", "sPK_b", "sPK_h", "sY_b", "sY_h"]


def compile_sm90(dt, D, F, Hf, B, QH, GK, window, has_valid, fc=0, prefetch=False, num_warps=None, heads_dot=False,
                 fold=1, gamma_logit=False):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from linearize.ops.triton.decode import _decode_kernel, _pow2, default_block_d, default_block_w, default_num_warps

    W = window if window >= 2 else 0
    P = fold if W else 1
    DP, FP = _pow2(D), _pow2(F)
    BD = default_block_d(B, Hf, D)
    const = dict(
        D=D, F=F, DP=DP, FP=FP, BD=BD, ND=-(-D // BD), BW=max(default_block_w(W, D, heads_dot, fc), 16 if heads_dot else 1),
        QH=QH, GK=GK, WINDOW=min(window, 2), W=W, R=W + P - 1 if W else 0, HAS_VALID=has_valid, FC=fc,
        PREFETCH=prefetch, QHP=max(_pow2(QH), 16 if heads_dot else 1), HEADS_DOT=heads_dot,
        PREC="ieee" if dt == "fp32" else "tf32", P=P, PW=max(_pow2(P - 1), 16) if heads_dot else min(_pow2(P - 1), 4),
        GAMMA_LOGIT=gamma_logit,
    )
    types = dict(VALID="*u8", GAMMA="*" + dt if gamma_logit else "*fp32", S="*fp32", Z="*fp32", MR="*u8", POS="*i64")
    sig = {n: types.get(n, "*" + dt) for n in POINTERS}
    sig |= {n: "i32" for n in STRIDES + ["B", "Hf", "Hkv"]} | {"scale": "fp32"} | {n: "constexpr" for n in const}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in POINTERS + STRIDES}
    src = ASTSource(fn=_decode_kernel, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    warps = num_warps or default_num_warps(FP, BD, fc, heads_dot)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


@pytest.mark.parametrize(
    "dt,D,F,Hf,QH,GK,window,has_valid,fc",
    [
        ("bf16", 128, 128, 16, 1, 1, 64, False, 0),  # the benchmark shape (B=64, H=16)
        ("fp16", 64, 64, 3, 3, 1, 64, True, 0),  # SmolLM2: 9 query heads on 3 KV heads
        ("bf16", 64, 128, 9, 1, 3, 64, False, 0),  # SmolLM2 as benchmarked (F 128 per query head)
        ("bf16", 64, 64, 14, 1, 7, 128, False, 0),  # Qwen2.5-0.5B, key features per query head
        ("fp32", 256, 256, 1, 4, 1, 1, True, 0),  # Gemma 3 head dim, largest feature dim
        ("bf16", 256, 128, 4, 1, 4, 64, False, 0),  # Gemma 3 270M as converted (4 query heads on 1 KV head)
        ("bf16", 128, 128, 16, 1, 1, 64, False, 32),  # S streamed in 32-row chunks: the benchmark shape
        ("bf16", 64, 128, 9, 1, 3, 64, True, 32),  # SmolLM2
        ("bf16", 256, 128, 4, 1, 4, 64, False, 16),  # Gemma 3
        ("fp32", 256, 256, 4, 1, 4, 1, True, 64),  # the largest dims in fp32
        ("bf16", 64, 128, 9, 1, 3, 64, False, 64),  # SmolLM2's default launch (2 warps from 2026-12-04, 1 from 12-07)
        ("bf16", 128, 128, 16, 1, 1, 64, False, 64),  # the benchmark shape's default launch
    ],
)
def test_compiles_for_sm90_without_spills(dt, D, F, Hf, QH, GK, window, has_valid, fc):
    kernel = compile_sm90(dt, D, F, Hf, 64, QH, GK, window, has_valid, fc)
    use = resource_usage(kernel)
    assert use["STACK"] == 0 and use.get("LOCAL", 0) == 0, f"register spills: {use}"
    assert "ld.global.v4" in kernel.asm["ptx"] or "ld.global.v2" in kernel.asm["ptx"], "S is not loaded in vectors"


@pytest.mark.parametrize(
    "name,D,Hf,GK,warps",
    [("smollm2", 64, 9, 3, 2), ("qwen2.5", 64, 14, 7, 2), ("issue5", 128, 16, 1, 4)],
)
def test_prefetching_chunks_compiles_without_spills_and_loads_earlier(name, D, Hf, GK, warps):
    """PREFETCH (not the default yet): two S chunks live at once, still no spills (at 4 warps for D = 128, where 2
    spill); and in the PTX the first chunk's loads come before the window softmax's exponentials, where the
    plain chunked launch issues every S load after them."""
    def loads_before_exp(kernel):
        body = kernel.asm["ptx"].splitlines()
        first_exp = next(i for i, line in enumerate(body) if "ex2.approx" in line)
        return sum("ld.global" in line for line in body[:first_exp])

    plain = compile_sm90("bf16", D, 128, Hf, 64, 1, GK, 64, False, fc=64, num_warps=warps)
    ahead = compile_sm90("bf16", D, 128, Hf, 64, 1, GK, 64, False, fc=64, prefetch=True, num_warps=warps)
    use = resource_usage(ahead)
    assert use["STACK"] == 0 and use.get("LOCAL", 0) == 0, f"register spills: {use}"
    chunk_vectors = 64 * D // (32 * warps) // 4  # one chunk's fp32 values a thread, in 16-byte loads
    assert loads_before_exp(ahead) >= loads_before_exp(plain) + chunk_vectors


@pytest.mark.parametrize("name,D,Hf,QH,fc", [("llama8b-kvmaps", 128, 8, 4, 32), ("smollm2-kvmaps", 64, 3, 3, 64)])
def test_row_chunks_read_out_by_several_query_heads_compile_without_spills(name, D, Hf, QH, fc):
    """Key maps per KV head with S in row chunks (QH query heads read each chunk out): no spills at 4 warps, where
    the held-whole launch takes 240 (8B) / 212 (SmolLM2) registers a thread. (At 2 warps the 8B shape spills.)"""
    kernel = compile_sm90("bf16", D, 128, Hf, 64, QH, 1, 64, False, fc=fc, num_warps=4)
    use = resource_usage(kernel)
    assert use["STACK"] == 0 and use.get("LOCAL", 0) == 0, f"register spills: {use}"


@pytest.mark.parametrize("fc", [32, 64])
def test_query_heads_as_the_rows_of_dots_compile_to_tensor_cores_without_spills(fc):
    """HEADS_DOT at the 8B's heads with key maps per KV head (4 query heads a program, padded to 16 dot rows):
    tensor-core dots (tf32 for bf16 inputs), no spills at 4 warps."""
    kernel = compile_sm90("bf16", 128, 128, 8, 64, 4, 1, 64, False, fc=fc, num_warps=4, heads_dot=True)
    use = resource_usage(kernel)
    assert use["STACK"] == 0 and use.get("LOCAL", 0) == 0, f"register spills: {use}"
    assert "mma" in kernel.asm["ptx"], "the query heads' dots do not use tensor cores"


def compile_maps_sm90(dt, H, D, f, BR, GQ=1, GK=3, backward=False):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import torch

    from linearize.ops.triton.feature_maps import _hedgehog_pair_kernel, _pow2_at_least_16, block_k

    bk = block_k(D, torch.float32 if dt == "fp32" else torch.bfloat16)
    const = dict(H=H, GQ=GQ, GK=GK, D=D, DP=_pow2_at_least_16(D), FH=f, FHP=_pow2_at_least_16(f), BR=BR, BK=bk, IEEE=dt == "fp32")
    const = {"H": H, "HK": H} | {k: v for k, v in const.items() if k != "H"} | {"BACKWARD": backward}
    fn, ptrs, ints = _hedgehog_pair_kernel, ["XQ", "XK", "WQ", "WK", "DYQ", "DYK", "OQ", "OK"], ["R", "sXQ_r", "sXK_r"]
    sig = {n: "*" + dt for n in ptrs} | {n: "i32" for n in ints} | {n: "constexpr" for n in const}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ptrs + ints[1:]}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward-du"])
@pytest.mark.parametrize(
    "dt,H,D,f",
    [("bf16", 9, 64, 64),  # SmolLM2, Qwen2.5 (D 64)
     ("bf16", 4, 256, 64),  # Gemma 3 (D 256)
     ("bf16", 16, 128, 128),  # the issue-5 shape, the largest f
     ("fp32", 4, 256, 128)],  # fp32 (ieee dot) at the largest sizes
)
def test_map_kernel_compiles_for_sm90_without_spills(dt, H, D, f, backward):
    from linearize.ops.triton.feature_maps import default_block_rows

    import torch

    kernel = compile_maps_sm90(dt, H, D, f, default_block_rows(64, torch.float32 if dt == "fp32" else torch.bfloat16), backward=backward)
    use = resource_usage(kernel)
    assert use["STACK"] == 0 and use.get("LOCAL", 0) == 0, f"register spills: {use}"
    if dt != "fp32":
        assert "mma" in kernel.asm["ptx"], "the per-head projection does not use tensor cores"


@pytest.mark.parametrize(
    "dt,HQX,HKX,GK,D,f,feature_rope,stack",
    [("bf16", 32, 8, 1, 128, 64, True, 8),  # the 8B, key maps per KV head (8 B of stack: as the H100 timed it fastest)
     ("bf16", 9, 3, 3, 64, 64, False, 0),  # SmolLM2, key maps per query head, maps before RoPE
     ("bf16", 4, 1, 4, 256, 64, True, 0),  # Gemma 3 (D 256)
     ("fp32", 4, 1, 1, 256, 128, True, 0)],  # fp32 (ieee dot) at the largest sizes
)
def test_rope_and_maps_kernel_compiles_for_sm90_without_spills(dt, HQX, HKX, GK, D, f, feature_rope, stack):
    """``_rope_pair_kernel`` (a decode step's RoPE and both maps) at its default launch (``ROPE_BLOCK_ROWS``,
    ``ROPE_NUM_WARPS``): no spills beyond the stack bytes of the launch the H100 timed (the 8B's: 5.3 us, the fastest)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import torch

    from linearize.ops.triton.feature_maps import ROPE_BLOCK_ROWS, ROPE_NUM_WARPS, _pow2_at_least_16, _rope_pair_kernel, block_k

    torch_dt = torch.float32 if dt == "fp32" else torch.bfloat16
    const = dict(HQX=HQX, HKX=HKX, GQ=1, GK=GK, D=D, DP=_pow2_at_least_16(D), FH=f, FHP=_pow2_at_least_16(f),
                 BR=ROPE_BLOCK_ROWS, BK=block_k(D, torch_dt), IEEE=dt == "fp32", FEATURE_ROPE=feature_rope)
    ptrs = ["XQ", "XK", "COS", "SIN", "WQ", "WK", "QR", "KR", "OQ", "OK"]
    ints = ["R", "sXQ_r", "sXK_r", "sC_r"]
    sig = {n: "*" + dt for n in ptrs} | {n: "i32" for n in ints} | {n: "constexpr" for n in const}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ptrs + ints[1:]}
    src = ASTSource(fn=_rope_pair_kernel, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=ROPE_NUM_WARPS))
    use = resource_usage(kernel)
    assert use["STACK"] <= stack and use.get("LOCAL", 0) == 0, f"register spills: {use}"
    if dt != "fp32":
        assert "mma" in kernel.asm["ptx"], "the per-head projection does not use tensor cores"


@pytest.mark.parametrize("logit", [False, True], ids=["gamma", "logits"])
@pytest.mark.parametrize("name,D,Hf,QH,heads_dot,spill", [
    ("issue5", 128, 16, 1, False, 0),
    ("llama8b-kvmaps", 128, 8, 4, True, 32),  # 24 B at the launch timed on the H100 (36.6 us at BW 16, 2026-12-06)
])
def test_deferred_folding_compiles_at_its_defaults(name, D, Hf, QH, heads_dot, spill, logit):
    """The ring kernel with deferred folding (fold 8, ``default_fold``'s answer at these heads) at the default launch
    (S in 64-row chunks at 2 warps; the 8B's 4 query heads as dot rows) on sm_90: no more spill bytes a thread than
    the launch the H100 timed (the 8B's dots hold the 16 waiting rows' features and values at once: 32 B). Also with
    the window weight's bf16 logits (their sigmoid in the launch, as a compiled decode step passes them)."""
    from linearize.ops.ring import default_fold

    import torch

    fold = default_fold(64, torch.device("cuda"), D=D, F=128)
    assert fold == 8
    kernel = compile_sm90("bf16", D, 128, Hf, 64, QH, 1, 64, False, fc=64, num_warps=2, heads_dot=heads_dot, fold=fold,
                          gamma_logit=logit)
    use = resource_usage(kernel)
    assert use["STACK"] <= spill and use.get("LOCAL", 0) == 0, f"register spills: {use}"


def test_default_chunk_rows_follows_the_measured_shapes():
    """Row chunks (2 warps) where the H200 sweep measured them faster: F > 64 and one value block spanning the head,
    with key features per query head, or per KV head at 128-column heads (Llama-3.1-8B's); S whole elsewhere
    (64-column heads shared by several query heads, F <= 64, Gemma's two value blocks). 16-row chunks at the
    issue-5 heads (D = F = 128, key features per query head), 64 elsewhere."""
    from linearize.ops.triton.decode import default_block_d, default_chunk_rows, default_num_warps

    smol = default_chunk_rows(128, 64, default_block_d(64, 9, 64), True)
    assert smol == 64 and default_num_warps(128, 64, smol) == 1  # test_64_column_heads_default_fits_one_wave
    issue5 = default_chunk_rows(128, 128, default_block_d(64, 16, 128), True)
    assert issue5 == 16 and default_num_warps(128, 128, issue5) == 1  # one wave: test_issue5_default_fits_one_wave
    assert default_num_warps(128, 128, 16, heads_dot=True) == 2  # dot rows at 1 warp: never timed
    assert default_chunk_rows(128, 64, 64, False) == 0  # a 64-column feature head for several query heads
    llama8b_kvmaps = default_chunk_rows(128, 128, default_block_d(64, 8, 128), False)
    assert llama8b_kvmaps == 64 and default_num_warps(128, 128, llama8b_kvmaps) == 2
    assert default_chunk_rows(64, 64, 64, True) == 0  # one chunk would be all of S
    assert default_chunk_rows(128, 256, default_block_d(64, 4, 256), True) == 0  # Gemma 3: not swept chunked
    assert default_num_warps(128, 64, 0) == 4


def test_default_prefetch_where_the_h100_measured_it_faster(monkeypatch):
    """Chunks loaded one step ahead for 64-column value blocks streamed in row chunks at 2 warps or more; not at 1
    warp (those heads' default: it spills there), not for 128-column blocks (slower there) nor where S is held whole (no chunks to load ahead).
    ``LINEARIZE_DECODE_PREFETCH`` 0 / 1 overrides the table, for timing whole steps either way."""
    from linearize.ops.triton import decode

    monkeypatch.setattr(decode, "_PREFETCH_ENV", None)
    assert decode.default_prefetch(64, 64) and not decode.default_prefetch(64, 128)
    assert not decode.default_prefetch(0, 64)
    assert not decode.default_prefetch(64, 64, num_warps=1)  # (spills at 1 warp: the 64-column heads' default)
    monkeypatch.setattr(decode, "_PREFETCH_ENV", "0")
    assert not decode.default_prefetch(64, 64)
    monkeypatch.setattr(decode, "_PREFETCH_ENV", "1")
    assert decode.default_prefetch(64, 128) and not decode.default_prefetch(0, 128)


def test_heads_dot_where_the_h100_measured_it_and_the_env_forces_it(monkeypatch):
    """``default_heads_dot``: on where it applies (S in row chunks, several query heads a feature head; H100 at the
    8B's heads 52.0 -> 43.4 us); ``LINEARIZE_DECODE_HEADS_DOT`` 0 / 1 turns it off / on there, for timing whole
    steps either way."""
    from linearize.ops.triton import decode

    monkeypatch.setattr(decode, "_HEADS_DOT_ENV", None)
    assert decode.default_heads_dot(64, True)
    assert not decode.default_heads_dot(0, True) and not decode.default_heads_dot(64, False)
    monkeypatch.setattr(decode, "_HEADS_DOT_ENV", "1")
    assert decode.default_heads_dot(64, True)
    assert not decode.default_heads_dot(0, True) and not decode.default_heads_dot(64, False)
    monkeypatch.setattr(decode, "_HEADS_DOT_ENV", "0")
    assert not decode.default_heads_dot(64, True)


def test_rope_launch_env_parses_or_says_what_it_wants(monkeypatch):
    """``LINEARIZE_ROPE_LAUNCH=rows,warps`` sets the RoPE + maps kernel's default launch (to time whole steps at
    another launch); a malformed value fails with the form it wants."""
    from linearize.ops.triton import feature_maps

    monkeypatch.delenv("LINEARIZE_ROPE_LAUNCH", raising=False)
    assert feature_maps._rope_launch_env() == (None, None)
    monkeypatch.setenv("LINEARIZE_ROPE_LAUNCH", "16,2")
    assert feature_maps._rope_launch_env() == (16, 2)
    for bad in ("16", "24,2", "16,3", "a,b"):
        monkeypatch.setenv("LINEARIZE_ROPE_LAUNCH", bad)
        with pytest.raises(ValueError, match="LINEARIZE_ROPE_LAUNCH"):
            feature_maps._rope_launch_env()


def test_issue5_default_fits_one_wave():
    """The default launch at the issue-5 heads (B 64, H 16, D = F = 128, key features per query head: 16-row
    chunks of S, 32-slot window blocks, 1 warp) must not spill on sm_90 and must leave room for 8 programs an SM,
    so that all 1,024 run in one wave on an H100's 132 SMs. At 64-row chunks and 2 warps it held 235 registers:
    4 programs an SM, two waves, 57.0 us against 45.0 (``default_chunk_rows``)."""
    from linearize.ops.ring import default_fold
    from linearize.ops.triton.decode import default_block_d, default_block_w, default_chunk_rows, default_num_warps

    fold = default_fold(64, "cuda", D=128, F=128)  # CUDA's deferred folding at these heads (8)
    fc = default_chunk_rows(128, 128, default_block_d(64, 16, 128), True)
    assert fc == 16 and default_block_w(64, 128) == 32
    use = resource_usage(compile_sm90("bf16", 128, 128, 16, 64, 1, 1, 64, False, fc=fc, fold=fold))
    assert use["STACK"] == 0 and use.get("LOCAL", 0) == 0, f"register spills: {use}"
    regs, warps = use["REG"], default_num_warps(128, 128, fc)
    assert warps == 1 and 65536 // (regs * 32 * warps) * 132 >= 64 * 16, f"{regs} registers at {warps} warps: two waves"


@pytest.mark.parametrize("model,H", [("smollm2", 9), ("qwen2.5", 14)])
def test_64_column_heads_default_fits_one_wave(model, H):
    """The default launch at SmolLM2's and Qwen2.5's heads (B 64, D 64, F 128 per query head: 64-row chunks of S,
    1 warp, 32-slot window blocks, no prefetch) must not spill on sm_90 (255 registers a thread: at the edge) and
    must run in one wave on an H100's 132 SMs. Prefetch at 1 warp spilled 368 B a thread and was 16-19% slower
    (H100, 2026-12-07); the former 2-warp default ran Qwen2.5's 896 programs in 1.7 waves."""
    from linearize.ops.ring import default_fold
    from linearize.ops.triton.decode import (default_block_d, default_block_w, default_chunk_rows, default_num_warps,
                                             default_prefetch)

    fold = default_fold(64, "cuda", D=64, F=128)
    bd = default_block_d(64, H, 64)
    fc = default_chunk_rows(128, 64, bd, True)
    warps = default_num_warps(128, bd, fc)
    assert (bd, fc, warps, default_block_w(64, 64, False, fc)) == (64, 64, 1, 32)
    assert not default_prefetch(fc, bd, warps)
    use = resource_usage(compile_sm90("bf16", 64, 128, H, 64, 1, 1, 64, False, fc=fc, fold=fold))
    assert use["STACK"] == 0 and use.get("LOCAL", 0) == 0, f"register spills: {use}"
    assert 65536 // (use["REG"] * 32 * warps) * 132 >= 64 * H, f"{use['REG']} registers at {warps} warps: two waves"


def test_ring_launch_env_parses_or_says_what_it_wants(monkeypatch):
    """``LINEARIZE_DECODE_LAUNCH=warps,block_w`` sets the ring kernel's default warps and window block (to time whole
    steps at a former default); a malformed value fails with the form it wants."""
    from linearize.ops.triton import decode

    monkeypatch.delenv("LINEARIZE_DECODE_LAUNCH", raising=False)
    assert decode._ring_launch_env() == (None, None)
    monkeypatch.setenv("LINEARIZE_DECODE_LAUNCH", "2,64")
    assert decode._ring_launch_env() == (2, 64)
    for bad in ("2", "3,64", "2,48", "a,b", "2,0"):
        monkeypatch.setenv("LINEARIZE_DECODE_LAUNCH", bad)
        with pytest.raises(ValueError, match="LINEARIZE_DECODE_LAUNCH"):
            decode._ring_launch_env()
