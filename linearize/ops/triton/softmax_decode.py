"""Triton decode step of softmax attention over a KV cache (split-K "flash decoding"), for kept softmax layers.

Same math and layout as ``linearize.ops.softmax_decode.softmax_decode_reference``.

Why: transformers' SDPA path, given a mask, repeats every KV head G times (``repeat_kv``: a fresh copy
of the whole cache, every layer, every step), and SDPA then reads every slot of a static cache, filled or
not. At SmolLM2's shapes (B 64, 9 query on 3 KV heads, D 64, a 4224-slot static cache) that is ~1.4 GB
of traffic a layer a step against ~0.1 GB of keys and values actually filled on average. Here:

* one program per ``(sequence b, KV head j, split s of the keys)`` serves all G query heads of KV head j,
  so each key and value is read once (GQA without a copy); split s takes every NS-th block of BN keys;
* a block of BN keys is loaded only if its mask has a True: a static cache's empty slots (masked) and a
  prompt's left padding cost one byte a slot, the mask's. The mask is the only thing that says how far
  the cache is filled, so no host value (and no recompile, no graph re-capture) tracks the length;
* a second launch merges the splits' partial softmaxes (max, sum, weighted values) per query head.

Scratch for the partials: B Hkv NS G (D + 2) fp32, a few MB. All arithmetic in fp32 except the two dots,
which take the inputs' dtype (p is rounded to it for the second one, as flash attention does); fp32 inputs
use IEEE fp32 dots, not TF32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import default_scale
from ..softmax_decode import check_decode_inputs
from .decode import _pow2

_NEG = tl.constexpr(-1.0e30)  # "minus infinity" that keeps exp(m - M) and m - M finite


@triton.jit
def _split_kernel(
    Q, K, V, MASK, ACC, M, LSE,
    sQ_b, sQ_h, sK_b, sK_h, sK_l, sV_b, sV_h, sV_l, sM_b, sM_l,
    L, Hkv, NS, blocks_per_split, scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, BOUNDED: tl.constexpr = False, CH: tl.constexpr = 1024,
):
    pid = tl.program_id(0)
    s = pid % NS
    bj = (pid // NS).to(tl.int64)
    b = bj // Hkv
    j = bj % Hkv
    rg = tl.arange(0, GP)
    rd = tl.arange(0, DP)
    g_ok = rg < G
    d_ok = rd < D
    q = tl.load(Q + b * sQ_b + (j * G + rg)[:, None] * sQ_h + rd[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([GP], _NEG, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    k_base = K + b * sK_b + j * sK_h
    v_base = V + b * sV_b + j * sV_h
    n_it = blocks_per_split
    if BOUNDED and HAS_MASK:
        # The last True of the row bounds the loop (a static cache's empty tail costs one byte a slot, read
        # once here), so the loop body needs no data-dependent branch and its loads can be pipelined.
        hi = -1
        for c0 in range(0, L, CH):
            rc = c0 + tl.arange(0, CH)
            mk = tl.load(MASK + b * sM_b + rc * sM_l, mask=rc < L, other=0)
            hi = tl.maximum(hi, tl.max(tl.where(mk != 0, rc, -1), axis=0))
        n_it = tl.minimum(n_it, tl.cdiv(tl.cdiv(hi + 1, BN) - s, NS))
    for it in range(0, n_it):
        # split s takes blocks s, s + NS, s + 2 NS, ...: however far the cache is filled, every split has
        # about the same number of filled blocks (contiguous ranges would leave the later splits idle)
        rn = (it * NS + s) * BN + tl.arange(0, BN)
        n_ok = rn < L
        if HAS_MASK:
            keep = (tl.load(MASK + b * sM_b + rn * sM_l, mask=n_ok, other=0) != 0) & n_ok
        else:
            keep = n_ok
        # unbounded: an empty or fully padded block costs no K/V traffic; bounded: every block up to the
        # last True is loaded (masked lanes stay unfetched), without the branch
        if BOUNDED or tl.max(keep.to(tl.int32), axis=0) > 0:
            kv_ok = keep[:, None] & d_ok[None, :]
            k = tl.load(k_base + rn[:, None] * sK_l + rd[None, :], mask=kv_ok, other=0.0)
            v = tl.load(v_base + rn[:, None] * sV_l + rd[None, :], mask=kv_ok, other=0.0)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = tl.where(keep[None, :], sc * scale, _NEG)
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.where(keep[None, :], tl.exp(sc - m_new[:, None]), 0.0)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
    row = (bj * NS + s) * G + rg  # partials of the G real query heads only
    tl.store(ACC + row[:, None] * D + rd[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(M + row, m_i, mask=g_ok)
    tl.store(LSE + row, l_i, mask=g_ok)


@triton.jit
def _combine_kernel(
    ACC, M, LSE, Y, sY_b, sY_h, Hkv,
    NS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
):
    bj = tl.program_id(0).to(tl.int64)
    b = bj // Hkv
    j = bj % Hkv
    rg = tl.arange(0, GP)
    rd = tl.arange(0, DP)
    g_ok = rg < G
    gd_ok = g_ok[:, None] & (rd < D)[None, :]
    m_all = tl.full([GP], _NEG, tl.float32)
    for s in tl.static_range(NS):
        m_all = tl.maximum(m_all, tl.load(M + (bj * NS + s) * G + rg, mask=g_ok, other=_NEG))
    num = tl.zeros([GP, DP], tl.float32)
    den = tl.zeros([GP], tl.float32)
    for s in tl.static_range(NS):
        row = (bj * NS + s) * G + rg
        w = tl.exp(tl.load(M + row, mask=g_ok, other=_NEG) - m_all)
        den += w * tl.load(LSE + row, mask=g_ok, other=0.0)
        num += w[:, None] * tl.load(ACC + row[:, None] * D + rd[None, :], mask=gd_ok, other=0.0)
    y = num / tl.where(den > 0, den, 1.0)[:, None]  # an all-masked row: zeros
    tl.store(Y + b * sY_b + (j * G + rg)[:, None] * sY_h + rd[None, :], y.to(Y.dtype.element_ty), mask=gd_ok)


# The bounded loop won on the H200 at every fill of a 4224-slot cache, B=64, 3 KV heads, D=64 (18.1/29.2/46.3/
# 74.9 us against the branchy loop's 23.6/42.2/66.5/102.3 at 256/1024/2176/4224 filled keys, CUDA graphs;
# benchmarks/results/softmax-decode-nvidia-h200-20261203-221345).
BOUNDED_DEFAULT = True


def default_num_warps(D: int, itemsize: int = 2) -> int:
    """4 warps; 8 for rows over 256 bytes (head dim 256 in half, 128 in fp32), where 4 spill registers
    (ptxas for sm_90: tests/ops/test_triton_softmax_decode_compile.py)."""
    return 8 if D * itemsize > 256 else 4


def default_launch(B: int, Hkv: int, L: int, D: int, itemsize: int = 2) -> tuple[int, int, int]:
    """(BN keys a block, NS splits, blocks a split): a K and a V tile of at most 16 KB each (BN 16 to 64),
    about 384 programs in all (about 3 an SM on an H100/H200), at least 4 blocks a split so a program's loads
    overlap, at most 32 splits (the merge's unrolled loop).

    384, not more: with the bounded loop, 2 splits (384 programs) beat 6 (1152) at every fill on the H200
    (13.2/22.4/37.7/61.4 us against 18.1/29.2/46.3/74.9 at 256/1024/2176/4224 keys, B=64, 3 KV heads, D=64;
    benchmarks/results/softmax-decode-nvidia-h200-20261203-221345): each split re-reads q and adds a merge
    row, and more programs than the SMs can hold at once only queue."""
    BN = max(16, min(64, 16384 // (D * itemsize)))
    blocks = max(-(-L // BN), 1)
    ns = max(1, min(32, -(-384 // (B * Hkv)), -(-blocks // 4)))
    per = -(-blocks // ns)
    return BN, -(-blocks // per), per


# A custom op, so that torch.compile (linearize.CompiledDecode) sees one opaque, functional call and does
# not lower the kernels itself (inductor 2.11 failed on lowering the ring kernel; see ops/triton/decode.py).
@torch.library.custom_op("linearize::softmax_decode", mutates_args=())
def _softmax_decode_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
    scale: float, BN: int, NS: int, per: int, num_warps: int, bounded: bool = False,
) -> torch.Tensor:
    B, H, _, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    y = torch.empty(B, 1, H, D, dtype=q.dtype, device=q.device)
    acc = torch.empty(B * Hkv * NS * G, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B * Hkv * NS * G, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    has_mask = key_mask is not None
    mask = key_mask.view(torch.uint8) if has_mask else m
    sm_b, sm_l = (key_mask.stride(0), key_mask.stride(1)) if has_mask else (0, 0)
    GP, DP = max(16, _pow2(G)), max(16, _pow2(D))
    _split_kernel[(B * Hkv * NS,)](
        q, k, v, mask, acc, m, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), sm_b, sm_l,
        L, Hkv, NS, per, scale,
        G=G, GP=GP, D=D, DP=DP, BN=BN, HAS_MASK=has_mask, IEEE=q.dtype == torch.float32, BOUNDED=bounded,
        num_warps=num_warps,
    )
    _combine_kernel[(B * Hkv,)](acc, m, lse, y, y.stride(0), y.stride(2), Hkv, NS=NS, G=G, GP=GP, D=D, DP=DP, num_warps=num_warps)
    return y


@_softmax_decode_op.register_fake
def _(q, k, v, key_mask, scale, BN, NS, per, num_warps, bounded=False):
    B, H, _, D = q.shape
    return q.new_empty(B, 1, H, D)


def softmax_decode_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, *,
    scale: float | None = None, block_n: int | None = None, splits: int | None = None, num_warps: int | None = None,
    bounded: bool | None = None,
) -> torch.Tensor:
    """The Triton twin of ``softmax_decode_reference``: y [B, 1, H, D] in q's dtype. No host sync and no
    data-dependent shape (capturable in a CUDA graph). ``block_n``/``splits`` override the launch (tests,
    tuning). ``bounded``: find the mask's last True first and loop only up to it, without the per-block
    branch (default ``BOUNDED_DEFAULT``: the bounded loop, the faster one on the H200)."""
    B, H, Hkv, L, D = check_decode_inputs(q, k, v, key_mask)
    if D > 256:
        raise ValueError(f"the softmax decode kernel supports head dim up to 256; got {D}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one of float16/bfloat16/float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    BN, NS, per = default_launch(B, Hkv, L, D, q.element_size())
    if block_n is not None or splits is not None:
        BN = block_n or BN
        blocks = max(-(-L // BN), 1)
        per = -(-blocks // max(1, min(splits or NS, blocks)))
        NS = -(-blocks // per)
    warps = num_warps or default_num_warps(D, q.element_size())
    bounded = BOUNDED_DEFAULT if bounded is None else bounded
    return _softmax_decode_op(q, k, v, key_mask, float(default_scale(scale, D)), BN, NS, per, warps, bounded)
