"""Triton kernels of the chunked hybrid attention (forward and backward). The launch logic is in ``chunk.py``.

Notation (one query head ``h``; its KV head ``hk``; its key-feature head ``hf``, which is ``hk`` when the key
feature maps are per KV head and ``h`` otherwise). Queries and keys share positions ``t, e`` in ``[0, T)``.
  * window set of query t:  ``0 <= t - e < W``, weight ``gamma * exp(s_te - m_t)``, ``s = scale * q.k``,
    ``m_t`` the max of ``s_te`` over the window set (0 if empty);
  * linear set:             ``t - e >= W``, weight ``a_te = phi_q(t) . phi_k(e)``;
  * ``y_t = sum_e w_te v_e / den_t``, ``den_t = sum_e w_te``. Padding keys (mask 0) are in neither set.
Queries are cut into chunks of ``C``. Query chunk ``c`` sees its window in key chunks ``[c - nwin, c]``
(``nwin = ceil((W - 1) / C)``); every key chunk before that is wholly in the linear set and reaches the
chunk through the running sums ``S = sum phi_k v^T`` [F, D], ``z = sum phi_k`` [F].

Parallelism: the intra-chunk kernels run one program per chunk. The kernels that carry ``S`` (or its
gradient ``dS``) along the sequence run one program per *segment* of ``n_per`` chunks, started from
segment-prefix sums computed by a cheap first pass, so that short batches still fill the GPU; they may
also split the value dimension into blocks of ``BV`` (each block owns ``S[:, block]``).

Backward. With ``dw_te = (dy_t . v_e - delta_t) / den_t`` and ``delta_t = dy_t . y_t``:
  dv_e += w_te dy_t / den_t;  linear: dphi_q += dw a-partner, dphi_k likewise;
  window: ds_te = w_te dw_te, plus the path through the max: ``dm_t = -sum_e ds_te`` lands on the arg-max
  key of row t (as torch's ``amax`` backward does). ``dgamma = sum_t dy_t . u_t`` with ``u = dy/dgamma`` formed by the
  forward in fp32 (the form ``sum exp(s - m) dw`` cancels, and loses the half-precision bits of y).
"""

from __future__ import annotations

import inspect

import triton
import triton.language as tl

#: ints that vary with the batch and the sequence length. Triton would otherwise compile a kernel again for
#: each pattern of them (== 1, divisible by 16, neither): 16 forward compiles, seconds each, for one model's
#: evaluation at mixed lengths (tests/ops/test_triton_specialization.py). The forward kernels (evaluation,
#: prefill: any length) take them unspecialized, with the same sm_90 registers and spills (scripts/check_smem.py
#: --registers); the backward kernels keep the hints: training runs at one length, and bwd_dk spills more
#: without them (72 -> 120 B a thread at the benchmark shape).
LENGTH_ARGS = ("B", "T", "n_chunks", "n_per", "W")


def _jit_lengths(fn):
    """``triton.jit`` that does not specialize on the ``LENGTH_ARGS`` the kernel takes (the forward kernels)."""
    names = [n for n in LENGTH_ARGS if n in inspect.signature(fn).parameters]
    return triton.jit(do_not_specialize=names)(fn)


@triton.jit
def _load_rows(ptr, rows, row_ok, stride_t, cols, ncols):
    """[len(rows), len(cols)] tile of a [.., T, .., X] tensor whose last dim is contiguous; 0 outside."""
    return tl.load(ptr + rows[:, None] * stride_t + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < ncols), other=0.0)


@triton.jit
def _key_ok(M, b, sM_b, e, T, HAS_MASK: tl.constexpr):
    ok = (e >= 0) & (e < T)
    if HAS_MASK:
        ok = ok & (tl.load(M + b * sM_b + e, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _window_and_linear(t, e, k_ok, W):
    """[len(t), len(e)] masks of query t against key e: in the window (0 <= t - e < W) and in the linear set
    (t - e >= W); padding keys (k_ok False) in neither."""
    diff = t[:, None] - e[None, :]
    return (diff >= 0) & (diff < W) & k_ok[None, :], (diff >= W) & k_ok[None, :]


@triton.jit
def _load_sums(S_ptr, Z_ptr, base, rf, rv, F, D):
    """The [F, BV] block rv of running sum S and all of z, from [.., F, D] / [.., F] fp32 buffers at ``base``."""
    S = tl.load(S_ptr + base * F * D + rf[:, None] * D + rv[None, :], mask=(rf[:, None] < F) & (rv[None, :] < D), other=0.0)
    z = tl.load(Z_ptr + base * F + rf, mask=rf < F, other=0.0)
    return S, z


@triton.jit
def _store_sums(S_ptr, Z_ptr, base, rf, rv, F, D, S, z, iv):
    """Inverse of ``_load_sums``; z is written once, by value block 0."""
    tl.store(S_ptr + base * F * D + rf[:, None] * D + rv[None, :], S, mask=(rf[:, None] < F) & (rv[None, :] < D))
    if iv == 0:
        tl.store(Z_ptr + base * F + rf, z, mask=rf < F)


@triton.jit
def _walk_tile(F, D, BF: tl.constexpr, BV: tl.constexpr):
    """(iv, rf, rv): the value block index and the [BF, BV] tile of the [F, D] state that a chunk-sum walk program
    (axis 2: value block fastest, then feature block) carries; one feature block unless ``LaunchConfig.walk_tile``
    splits F too."""
    nv = (D + BV - 1) // BV
    iv = tl.program_id(2) % nv
    return iv, (tl.program_id(2) // nv) * BF + tl.arange(0, BF), iv * BV + tl.arange(0, BV)


@triton.jit
def _walk_start(S0, Z0, base, rf, rv, F, D, BF: tl.constexpr, BV: tl.constexpr, LOCAL: tl.constexpr):
    """A chunk-sum walk's starting sums (fp32): its segment's prefix S0 / Z0 at ``base``, or zero where LOCAL
    (``LaunchConfig.local_sums``)."""
    if LOCAL:
        S = tl.zeros([BF, BV], dtype=tl.float32)
        z = tl.zeros([BF], dtype=tl.float32)
    else:
        S, z = _load_sums(S0, Z0, base, rf, rv, F, D)
    return S, z


@triton.jit
def _prefix_sums(PRE_S, PRE_Z, c, n_per, B, b, Hf, hf, rf, rv, F, D):
    """The prefix of state chunk c's segment (value block rv) where the chunk-sum walks started each segment from zero
    (``LaunchConfig.local_sums``): PRE_S [nseg, B, H', F, D] in the chunk sums' dtype, PRE_Z [nseg, B, H', F] fp32.
    fwd_blocks and bwd_dq take it as a second product beside the chunk's own sums, not added to them: an [F, D] sum
    tile held in registers spills them (sm_90, D = F = 128: 240 / 176 B a thread); bwd_dk adds it to its tile
    before its loops, where no loop tile is live yet (200 B against 272 after them, benchmarks/NOTES-chunk.md)."""
    return _load_sums(PRE_S, PRE_Z, ((c // n_per) * B + b) * Hf + hf, rf, rv, F, D)


@triton.jit
def _key_chunk_sums(PKb, Vb, M, b, sM_b, e, T, sPK_t, sV_t, rf, rv, F, D, HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    """(phi_k^T v [F, BV], sum phi_k [F]) over keys ``e`` (padding and out-of-range keys count nothing)."""
    ok = _key_ok(M, b, sM_b, e, T, HAS_MASK)
    pk = _load_rows(PKb, e, ok, sPK_t, rf, F)
    vv = _load_rows(Vb, e, ok, sV_t, rv, D)
    return tl.dot(tl.trans(pk), vv, input_precision=PREC), tl.sum(pk.to(tl.float32), 0)


# ---------------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------------
@_jit_lengths
def fwd_segment_sums_kernel(
    PK, V, M, OUT_S, OUT_Z,
    sPK_b, sPK_t, sPK_h, sV_b, sV_t, sV_h, sM_b,
    B, T, Hf, Gk, n_chunks, n_per, nwin,
    F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    """OUT_S[s] = sum of phi_k v^T over key chunks [s*n_per - nwin, (s+1)*n_per - nwin): the keys that the
    chunks of segment s do NOT yet hold in their running sum are exactly those of the next segment shift."""
    s = tl.program_id(0)
    bh = tl.program_id(1)
    iv = tl.program_id(2)
    b = bh // Hf
    hf = bh % Hf
    hk = hf // Gk
    rf = tl.arange(0, BF)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    acc = tl.zeros([BF, BV], dtype=tl.float32)
    accz = tl.zeros([BF], dtype=tl.float32)
    c_lo = tl.maximum(s * n_per - nwin, 0)
    c_hi = tl.minimum((s + 1) * n_per - nwin, n_chunks)
    for c in range(c_lo, c_hi):
        dS, dz = _key_chunk_sums(PK + b * sPK_b + hf * sPK_h, V + b * sV_b + hk * sV_h, M, b, sM_b, c * C + rc, T,
                                 sPK_t, sV_t, rf, rv, F, D, HAS_MASK, PREC)
        acc += dS
        accz += dz
    _store_sums(OUT_S, OUT_Z, (s * B + b) * Hf + hf, rf, rv, F, D, acc, accz, iv)


@triton.jit(do_not_specialize=["nseg", "N"])
def segment_prefix_kernel(X, INIT, OUT, nseg, N, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Exclusive prefix over segments: OUT[s] = INIT + sum of X[s'] for s' < s (s' > s with REVERSE), X and OUT
    [nseg, N] fp32, INIT [N] (or 0). One pass over X, instead of torch's cumsum, flips and subtractions
    (14 launches and four to five passes over the segment sums: 13% of forward+backward at T = 2K on the H200)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    if HAS_INIT:
        acc = tl.load(INIT + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, nseg):
        if REVERSE:
            sg = nseg - 1 - i
        else:
            sg = i
        x = tl.load(X + sg * N + offs, mask=ok, other=0.0)
        tl.store(OUT + sg * N + offs, acc.to(OUT.dtype.element_ty), mask=ok)  # (summed in fp32, stored in OUT's dtype)
        acc += x


@triton.jit
def _fwd_window_one_acc(q, pq, Kb, Vb, PKb, M, b, sM_b, t, c, nwin, W, T, scale, gam, sK_t, sV_t, sPK_t, rd, rf, rv, rc,
                        D, F, C: tl.constexpr, BV: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    """fwd_kernel's window and near-linear part for ONE_ACC: (sum_e (gamma p + a) v [C, BV], l_w, l_l, m, arg).
    Pass 1 finds the window max and its key in the same order and with the same strict comparison as the
    online form, so ties pick the same key."""
    m_i = tl.full([C], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([C], dtype=tl.int32)
    for j in range(tl.maximum(c - nwin, 0), c + 1):
        e = j * C + rc
        k_ok = _key_ok(M, b, sM_b, e, T, HAS_MASK)
        k = _load_rows(Kb, e, k_ok, sK_t, rd, D)
        win, _ = _window_and_linear(t, e, k_ok, W)
        sm = tl.where(win, tl.dot(q, tl.trans(k), input_precision=PREC) * scale, float("-inf"))
        tmax = tl.max(sm, 1)
        arg = tl.where(tmax > m_i, j * C + tl.argmax(sm, 1), arg)
        m_i = tl.maximum(m_i, tmax)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    acc = tl.zeros([C, BV], dtype=tl.float32)
    l_w = tl.zeros([C], dtype=tl.float32)
    l_l = tl.zeros([C], dtype=tl.float32)
    for j in range(tl.maximum(c - nwin, 0), c + 1):
        e = j * C + rc
        k_ok = _key_ok(M, b, sM_b, e, T, HAS_MASK)
        k = _load_rows(Kb, e, k_ok, sK_t, rd, D)
        vv = _load_rows(Vb, e, k_ok, sV_t, rv, D)
        pk = _load_rows(PKb, e, k_ok, sPK_t, rf, F)
        win, lin = _window_and_linear(t, e, k_ok, W)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        p = tl.where(win, tl.exp(sc - m_safe[:, None]), 0.0)
        a = tl.where(lin, tl.dot(pq, tl.trans(pk), input_precision=PREC), 0.0)
        acc += tl.dot((gam * p + a).to(vv.dtype), vv, input_precision=PREC)
        l_w += tl.sum(p, 1)
        l_l += tl.sum(a, 1)
    return acc, l_w, l_l, m_i, arg


@triton.jit
def _pair_reach(W, C: tl.constexpr):
    """(DL, DW): a block of C queries and the block of C keys delta blocks before it hold a linear pair of positions
    (t - e >= W) iff delta >= DL, and a window pair (0 <= t - e < W) iff delta <= DW, since t - e spans
    delta C -/+ (C - 1). Padding and the sequence's end only remove pairs. Every delta >= 0 has one or both."""
    return W // C, (W + C - 2) // C


@triton.jit
def _key_regions(i, j_lo, W, C: tl.constexpr):
    """Query block i's key blocks j_lo..i split by ``_pair_reach``: (j_both, j_near), the first key block with window
    pairs and the first without linear pairs; [j_lo, j_both) hold only linear pairs, [j_near, i] only window pairs."""
    DL, DW = _pair_reach(W, C)
    j_both = tl.minimum(tl.maximum(i - DW, j_lo), i + 1)
    j_near = tl.minimum(tl.maximum(i - DL + 1, j_both), i + 1)
    return j_both, j_near


@triton.jit
def _query_regions(j, i_hi, W, C: tl.constexpr):
    """Key block j's query blocks j..i_hi - 1 split by ``_pair_reach``: (i_both, i_far), the first query block with
    linear pairs and the first without window pairs; [j, i_both) hold only window pairs, [i_far, i_hi) only linear."""
    DL, DW = _pair_reach(W, C)
    i_both = tl.maximum(tl.minimum(j + DL, i_hi), j)
    i_far = tl.maximum(tl.minimum(j + DW + 1, i_hi), i_both)
    return i_both, i_far


@triton.jit
def _key_block(Kb, Vb, PKb, M, b, sM_b, t, e, W, T, sK_t, sV_t, sPK_t, rd, rv, rf, D, F, HAS_MASK: tl.constexpr,
               DO_WIN: tl.constexpr, DO_LIN: tl.constexpr):
    """The keys e for the queries t: (k [len(e), D], v [len(e), len(rv)], phi_k [len(e), F], the window and linear
    masks). A tile that the step's parts (DO_WIN: k; DO_LIN: phi_k) do not need is not loaded: v stands in its place
    and is never read as it."""
    k_ok = _key_ok(M, b, sM_b, e, T, HAS_MASK)
    if DO_WIN:
        k = _load_rows(Kb, e, k_ok, sK_t, rd, D)
    vv = _load_rows(Vb, e, k_ok, sV_t, rv, D)
    if DO_LIN:
        pk = _load_rows(PKb, e, k_ok, sPK_t, rf, F)
    if not DO_WIN:
        k = vv
    if not DO_LIN:
        pk = vv
    win, lin = _window_and_linear(t, e, k_ok, W)
    return k, vv, pk, win, lin


@triton.jit
def _fwd_window_steps(j_lo, j_hi, q, pq, Kb, Vb, PKb, M, b, sM_b, t, W, T, scale, sK_t, sV_t, sPK_t, rd, rf, rv, rc,
                      D, F, acc_w, acc_l, l_w, l_l, m_i, arg, C: tl.constexpr, HAS_MASK: tl.constexpr,
                      PREC: tl.constexpr, DO_WIN: tl.constexpr, DO_LIN: tl.constexpr):
    """The forward's two-accumulator steps over key blocks j_lo <= j < j_hi (C keys each): the window's online
    softmax (max, arg-max key, numerator, denominator) and the near keys' linear terms; DO_WIN / DO_LIN False: that
    part is neither loaded nor computed (for blocks where it has no pair, ``_pair_reach``)."""
    for j in range(j_lo, j_hi):
        k, vv, pk, win, lin = _key_block(Kb, Vb, PKb, M, b, sM_b, t, j * C + rc, W, T, sK_t, sV_t, sPK_t, rd, rv, rf,
                                         D, F, HAS_MASK, DO_WIN, DO_LIN)
        if DO_WIN:
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            sm = tl.where(win, sc, float("-inf"))
            tmax = tl.max(sm, 1)
            targ = tl.argmax(sm, 1)
            m_new = tl.maximum(m_i, tmax)
            arg = tl.where(tmax > m_i, j * C + targ, arg)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.where(win, tl.exp(sc - m_safe[:, None]), 0.0)
            acc_w = acc_w * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PREC)
            l_w = l_w * alpha + tl.sum(p, 1)
            m_i = m_new
        if DO_LIN:
            a = tl.where(lin, tl.dot(pq, tl.trans(pk), input_precision=PREC), 0.0)
            acc_l += tl.dot(a.to(vv.dtype), vv, input_precision=PREC)
            l_l += tl.sum(a, 1)
    return acc_w, acc_l, l_w, l_l, m_i, arg


@triton.jit
def _fwd_window(j_lo, i, q, pq, Kb, Vb, PKb, M, b, sM_b, t, W, T, scale, sK_t, sV_t, sPK_t, rd, rf, rv, rc, D, F,
                acc_w, acc_l, l_w, l_l, m_i, arg, C: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                SKIP: tl.constexpr):
    """``_fwd_window_steps`` over key blocks j_lo..i for query block i (blocks of C rows). SKIP: in three loops, in
    the same order: the far blocks that have only linear pairs, those with both, the near ones with only window
    pairs; the parts skipped are exact zeros, so the results are the same. Three loops rather than a branch a
    block: Triton pipelines a loop's loads only where the products that take them are not under a branch."""
    if SKIP:
        j_both, j_near = _key_regions(i, j_lo, W, C)
        acc_w, acc_l, l_w, l_l, m_i, arg = _fwd_window_steps(
            j_lo, j_both, q, pq, Kb, Vb, PKb, M, b, sM_b, t, W, T, scale, sK_t, sV_t, sPK_t, rd, rf, rv, rc, D, F,
            acc_w, acc_l, l_w, l_l, m_i, arg, C, HAS_MASK, PREC, False, True)
        acc_w, acc_l, l_w, l_l, m_i, arg = _fwd_window_steps(
            j_both, j_near, q, pq, Kb, Vb, PKb, M, b, sM_b, t, W, T, scale, sK_t, sV_t, sPK_t, rd, rf, rv, rc, D, F,
            acc_w, acc_l, l_w, l_l, m_i, arg, C, HAS_MASK, PREC, True, True)
        acc_w, acc_l, l_w, l_l, m_i, arg = _fwd_window_steps(
            j_near, i + 1, q, pq, Kb, Vb, PKb, M, b, sM_b, t, W, T, scale, sK_t, sV_t, sPK_t, rd, rf, rv, rc, D, F,
            acc_w, acc_l, l_w, l_l, m_i, arg, C, HAS_MASK, PREC, True, False)
    else:
        acc_w, acc_l, l_w, l_l, m_i, arg = _fwd_window_steps(
            j_lo, i + 1, q, pq, Kb, Vb, PKb, M, b, sM_b, t, W, T, scale, sK_t, sV_t, sPK_t, rd, rf, rv, rc, D, F,
            acc_w, acc_l, l_w, l_l, m_i, arg, C, HAS_MASK, PREC, True, True)
    return acc_w, acc_l, l_w, l_l, m_i, arg


@triton.jit
def _fwd_store(Y, U, MAX, DEN, ARG, b, h, H, T, t, t_ok, rv, sY_b, sY_t, sY_h, D, gam, acc_w, acc_l, l_w, l_l, m_i, arg,
               iv, ONE_ACC: tl.constexpr, STORE_U: tl.constexpr):
    """y = (gamma A_w + A_lin) / den for query rows t, value block rv; u (STORE_U) and, from value block 0, the
    window max, the denominator and the arg-max key per row. ONE_ACC: acc_l already holds gamma A_w + A_lin."""
    den = gam * l_w + l_l
    ok = den > 0
    if ONE_ACC:
        num = acc_l
    else:
        num = gam * acc_w + acc_l
    y = tl.where(ok[:, None], num / tl.where(ok, den, 1.0)[:, None], 0.0)
    yp = Y + b * sY_b + h * sY_h + t[:, None] * sY_t + rv[None, :]
    tl.store(yp, y.to(Y.dtype.element_ty), mask=t_ok[:, None] & (rv[None, :] < D))
    if STORE_U:
        # d y / d gamma, formed here in fp32: in the backward, dy . y - dy . y_window would cancel.
        inv2 = tl.where(ok, 1.0 / tl.where(ok, den * den, 1.0), 0.0)
        u = (acc_w * l_l[:, None] - l_w[:, None] * acc_l) * inv2[:, None]
        up = U + b * sY_b + h * sY_h + t[:, None] * sY_t + rv[None, :]
        tl.store(up, u.to(U.dtype.element_ty), mask=t_ok[:, None] & (rv[None, :] < D))
    if iv == 0:
        row = (b * H + h) * T + t
        tl.store(MAX + row, tl.where(m_i == float("-inf"), 0.0, m_i), mask=t_ok)
        tl.store(DEN + row, den, mask=t_ok)
        tl.store(ARG + row, arg, mask=t_ok)


@_jit_lengths
def fwd_kernel(
    Q, K, V, PQ, PK, M, GAMMA, S0, Z0, Y, U, MAX, DEN, ARG,
    sQ_b, sQ_t, sQ_h, sK_b, sK_t, sK_h, sV_b, sV_t, sV_h, sPQ_b, sPQ_t, sPQ_h, sPK_b, sPK_t, sPK_h,
    sY_b, sY_t, sY_h, sM_b,
    B, T, H, Hf, Gk, n_chunks, n_per, nwin, W, scale,
    D: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    GQ: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, STORE_U: tl.constexpr, ONE_ACC: tl.constexpr = False,
    SKIP: tl.constexpr = False,
):
    """Outputs of one segment of chunks, for the GQ query heads that share feature head hf, V-block iv.
    Also stores, per query, the window max m, the denominator and the arg-max key (for the backward), and
    with STORE_U the exact dy/dgamma direction u = (A_w l_lin - l_w A_lin) / den^2 (laid out like Y).
    ONE_ACC (not with STORE_U, which needs the window's numerator apart): find the window max in a first pass over
    the key chunks, then accumulate (gamma exp(s - m) + a) v in one product: one [C, BV] fp32 accumulator and one
    product a key chunk fewer, for one more q.k a key chunk: a smaller live set (benchmarks/NOTES-chunk.md)."""
    tl.static_assert(not (ONE_ACC and STORE_U), "ONE_ACC has no separate window numerator for u")
    s = tl.program_id(0)
    bh = tl.program_id(1)
    iv = tl.program_id(2)
    b = bh // Hf
    hf = bh % Hf
    hk = hf // Gk
    rd = tl.arange(0, BD)
    rf = tl.arange(0, BF)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    base = (s * B + b) * Hf + hf
    S, z = _load_sums(S0, Z0, base, rf, rv, F, D)
    Kb = K + b * sK_b + hk * sK_h
    Vb = V + b * sV_b + hk * sV_h
    PKb = PK + b * sPK_b + hf * sPK_h
    c_lo = s * n_per
    c_hi = tl.minimum((s + 1) * n_per, n_chunks)
    for c in range(c_lo, c_hi):
        t = c * C + rc
        t_ok = t < T
        for g in tl.static_range(GQ):
            h = hf * GQ + g
            q = _load_rows(Q + b * sQ_b + h * sQ_h, t, t_ok, sQ_t, rd, D)
            pq = _load_rows(PQ + b * sPQ_b + h * sPQ_h, t, t_ok, sPQ_t, rf, F)
            m_i = tl.full([C], float("-inf"), dtype=tl.float32)
            l_w = tl.zeros([C], dtype=tl.float32)
            l_l = tl.zeros([C], dtype=tl.float32)
            arg = tl.zeros([C], dtype=tl.int32)
            acc_l = tl.zeros([C, BV], dtype=tl.float32)
            gam = tl.load(GAMMA + h)
            if ONE_ACC:
                acc_l, l_w, l_l, m_i, arg = _fwd_window_one_acc(
                    q, pq, Kb, Vb, PKb, M, b, sM_b, t, c, nwin, W, T, scale, gam, sK_t, sV_t, sPK_t, rd, rf, rv, rc,
                    D, F, C, BV, HAS_MASK, PREC)
                acc_w = acc_l  # (unread: with ONE_ACC the stores take acc_l alone)
            else:
                acc_w = tl.zeros([C, BV], dtype=tl.float32)
                acc_w, acc_l, l_w, l_l, m_i, arg = _fwd_window(
                    tl.maximum(c - nwin, 0), c, q, pq, Kb, Vb, PKb, M, b, sM_b, t, W, T, scale, sK_t, sV_t, sPK_t,
                    rd, rf, rv, rc, D, F, acc_w, acc_l, l_w, l_l, m_i, arg, C, HAS_MASK, PREC, SKIP)
            # The running sum enters the product in the operand dtype (as fla does): half the bytes and
            # twice the rate of tf32; it stays fp32 in registers.
            acc_l += tl.dot(pq, S.to(pq.dtype), input_precision=PREC)
            l_l += tl.sum(pq.to(tl.float32) * z[None, :], 1)
            _fwd_store(Y, U, MAX, DEN, ARG, b, h, H, T, t, t_ok, rv, sY_b, sY_t, sY_h, D, gam, acc_w, acc_l, l_w, l_l,
                       m_i, arg, iv, ONE_ACC, STORE_U)
        # Key chunk c - nwin is now wholly in the linear set of every later query chunk.
        dS, dz = _key_chunk_sums(PKb, Vb, M, b, sM_b, (c - nwin) * C + rc, T, sPK_t, sV_t, rf, rv, F, D, HAS_MASK, PREC)
        S += dS
        z += dz


# ---------------------------------------------------------------------------------------------------------
# forward in two passes (LaunchConfig.split_forward): each chunk's running sums written down by a light walk,
# then every block of queries in parallel, with no fp32 running sum held in registers
# ---------------------------------------------------------------------------------------------------------
@_jit_lengths
def fwd_chunk_states_kernel(
    PK, V, M, S0, Z0, CS, CZ, SEG_S, SEG_Z,
    sPK_b, sPK_t, sPK_h, sV_b, sV_t, sV_h, sM_b,
    B, T, Hf, Gk, n_chunks, n_per, nwin,
    F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr, LOCAL: tl.constexpr = False, PAIRS: tl.constexpr = False,
    ZERO_START: tl.constexpr = False,
):
    """CS[c] = the running sum S that query chunk c reads (phi_k v^T over key chunks < c - nwin), in the inputs'
    dtype (the dtype fwd_kernel's product takes it in), CZ[c] = z in fp32: laid out [n_chunks, B, Hf, F, D|1].
    One program a segment, started from its prefix (S0, Z0) as fwd_kernel is. LOCAL: started from zero instead
    (CS then holds only the segment's own keys; readers add the prefix, ``_prefix_sums``), and the segment's total
    written to SEG_S / SEG_Z as fwd_segment_sums_kernel writes it, so that pass does not run. PAIRS: two chunks a
    step, the second's sums formed beside the first's (two independent products and loads in flight a step;
    ``LaunchConfig.walk_pairs``). ZERO_START: started from zero with nothing else changed (one segment with no initial
    state, whose prefix is zero: S0 / Z0 unread, so no prefix pass need write them)."""
    s = tl.program_id(0)
    bh = tl.program_id(1)
    iv, rf, rv = _walk_tile(F, D, BF, BV)
    b = bh // Hf
    hf = bh % Hf
    hk = hf // Gk
    rc = tl.arange(0, C)
    FROM_ZERO: tl.constexpr = LOCAL or ZERO_START
    S, z = _walk_start(S0, Z0, (s * B + b) * Hf + hf, rf, rv, F, D, BF, BV, FROM_ZERO)
    c_lo = s * n_per
    c_hi = tl.minimum((s + 1) * n_per, n_chunks)
    PKb = PK + b * sPK_b + hf * sPK_h
    Vb = V + b * sV_b + hk * sV_h
    for c in range(c_lo, c_hi, 1 + PAIRS):
        if PAIRS:  # (keys past the segment are loaded but not added: see below)
            dS2, dz2 = _key_chunk_sums(PKb, Vb, M, b, sM_b, (c + 1 - nwin) * C + rc, T, sPK_t, sV_t, rf, rv, F, D,
                                       HAS_MASK, PREC)
        _store_sums(CS, CZ, (c * B + b) * Hf + hf, rf, rv, F, D, S.to(CS.dtype.element_ty), z, iv)
        dS, dz = _key_chunk_sums(PKb, Vb, M, b, sM_b, (c - nwin) * C + rc, T, sPK_t, sV_t, rf, rv, F, D, HAS_MASK, PREC)
        S += dS
        z += dz
        if PAIRS:
            if c + 1 < c_hi:
                _store_sums(CS, CZ, ((c + 1) * B + b) * Hf + hf, rf, rv, F, D, S.to(CS.dtype.element_ty), z, iv)
                S += dS2
                z += dz2
    if LOCAL:  # (key chunks [c_lo - nwin, c_hi - nwin): fwd_segment_sums_kernel's for every segment but the last,
        # whose total no prefix reads)
        _store_sums(SEG_S, SEG_Z, (s * B + b) * Hf + hf, rf, rv, F, D, S, z, iv)


@_jit_lengths
def fwd_blocks_kernel(
    Q, K, V, PQ, PK, M, GAMMA, CS, CZ, PRE_S, PRE_Z, Y, U, MAX, DEN, ARG,
    sQ_b, sQ_t, sQ_h, sK_b, sK_t, sK_h, sV_b, sV_t, sV_h, sPQ_b, sPQ_t, sPQ_h, sPK_b, sPK_t, sPK_h,
    sY_b, sY_t, sY_h, sM_b,
    B, T, H, Hf, Gk, GQ, n_chunks, n_per, nwin, W, scale, Cs,
    D: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr, STORE_U: tl.constexpr, SKIP: tl.constexpr = False,
    LOCAL: tl.constexpr = False,
):
    """fwd_kernel's outputs for one block of C queries (C divides the walk's chunk Cs; n_chunks counts blocks),
    query head h, value block iv: the window and near-linear keys (those of the block's chunk of Cs and the nwin
    chunks before it) as fwd_kernel takes them, plus phi_q . CS[chunk] for the keys before those."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    iv = tl.program_id(2)
    b = bh // H
    h = bh % H
    hf = h // GQ
    hk = hf // Gk
    rd = tl.arange(0, BD)
    rf = tl.arange(0, BF)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    t = i * C + rc
    t_ok = t < T
    c = i * C // Cs
    q = _load_rows(Q + b * sQ_b + h * sQ_h, t, t_ok, sQ_t, rd, D)
    pq = _load_rows(PQ + b * sPQ_b + h * sPQ_h, t, t_ok, sPQ_t, rf, F)
    Kb = K + b * sK_b + hk * sK_h
    Vb = V + b * sV_b + hk * sV_h
    PKb = PK + b * sPK_b + hf * sPK_h
    m_i = tl.full([C], float("-inf"), dtype=tl.float32)
    l_w = tl.zeros([C], dtype=tl.float32)
    l_l = tl.zeros([C], dtype=tl.float32)
    arg = tl.zeros([C], dtype=tl.int32)
    acc_w = tl.zeros([C, BV], dtype=tl.float32)
    acc_l = tl.zeros([C, BV], dtype=tl.float32)
    gam = tl.load(GAMMA + h)
    acc_w, acc_l, l_w, l_l, m_i, arg = _fwd_window(
        tl.maximum((c - nwin) * (Cs // C), 0), i, q, pq, Kb, Vb, PKb, M, b, sM_b, t, W, T, scale, sK_t, sV_t, sPK_t,
        rd, rf, rv, rc, D, F, acc_w, acc_l, l_w, l_l, m_i, arg, C, HAS_MASK, PREC, SKIP)
    S, z = _load_sums(CS, CZ, (c * B + b) * Hf + hf, rf, rv, F, D)
    acc_l += tl.dot(pq, S.to(pq.dtype), input_precision=PREC)
    if LOCAL:
        P, pz = _prefix_sums(PRE_S, PRE_Z, c, n_per, B, b, Hf, hf, rf, rv, F, D)
        acc_l += tl.dot(pq, P.to(pq.dtype), input_precision=PREC)
        z += pz
    l_l += tl.sum(pq.to(tl.float32) * z[None, :], 1)
    _fwd_store(Y, U, MAX, DEN, ARG, b, h, H, T, t, t_ok, rv, sY_b, sY_t, sY_h, D, gam, acc_w, acc_l, l_w, l_l, m_i, arg,
               iv, False, STORE_U)


# ---------------------------------------------------------------------------------------------------------
# backward: intra-chunk parts (window and the linear keys of the nwin + 1 nearest chunks), one program per chunk
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_window_exp(q, k, win, mrow, scale, PREC: tl.constexpr):
    """exp(s - m) of a block pair's window pairs (0 elsewhere), from the window max m the forward saved: the window
    softmax's numerator again, as both backward kernels form it."""
    sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    return tl.where(win, tl.exp(sc - mrow[:, None]), 0.0)


@triton.jit
def _bwd_dw(dy, vv, delta, inv, PREC: tl.constexpr):
    """(dy . v - delta) / den of a block pair: the loss's gradient in each pair's unnormalized weight (both backward
    kernels)."""
    dp = tl.dot(dy, tl.trans(vv), input_precision=PREC)
    return (dp - delta[:, None]) * inv[:, None]


@triton.jit
def _bwd_dq_steps(j_lo, j_hi, q, dy, Kb, Vb, PKb, M, b, sM_b, t, W, T, scale, sK_t, sV_t, sPK_t, rd, rf, rc, D, F,
                  mrow, delta, inv, gam, dq, dpq, rs, lw, C: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                  DO_WIN: tl.constexpr, DO_LIN: tl.constexpr, DGAM: tl.constexpr = False):
    """bwd_dq's steps over key blocks j_lo <= j < j_hi: (dq, dphi_q, the row sums of ds, lw); DO_WIN / DO_LIN as in
    ``_fwd_window_steps``. DGAM: rs sums exp(s - m) dw without gamma (the caller scales it) and lw sums exp(s - m)
    (the window's share of the denominator): what bwd_dq_kernel's DGAM forms the window weight's gradient from."""
    for j in range(j_lo, j_hi):
        k, vv, pk, win, lin = _key_block(Kb, Vb, PKb, M, b, sM_b, t, j * C + rc, W, T, sK_t, sV_t, sPK_t, rd, rd, rf,
                                         D, F, HAS_MASK, DO_WIN, DO_LIN)
        if DO_WIN:
            ex = _bwd_window_exp(q, k, win, mrow, scale, PREC)
        dw = _bwd_dw(dy, vv, delta, inv, PREC)
        if DO_WIN:
            if DGAM:
                ew = ex * dw
                rs += tl.sum(ew, 1)
                lw += tl.sum(ex, 1)
                ds = gam * ew
            else:
                ds = gam * ex * dw
                rs += tl.sum(ds, 1)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        if DO_LIN:
            da = tl.where(lin, dw, 0.0)
            dpq += tl.dot(da.to(pk.dtype), pk, input_precision=PREC)
    return dq, dpq, rs, lw


@triton.jit
def _bwd_dk_steps(i_lo, i_hi, k, vv, pk, Q, PQ, DY, MAX, DEN, DELTA, ARG, CORR, b, h, H, T, e, k_ok, W, scale,
                  sQ_b, sQ_t, sQ_h, sPQ_b, sPQ_t, sPQ_h, sDY_b, sDY_t, sDY_h, rd, rf, rc, D, F, gam, dk, dv, dpk,
                  C: tl.constexpr, PREC: tl.constexpr, DO_WIN: tl.constexpr, DO_LIN: tl.constexpr,
                  G_K: tl.constexpr, G_V: tl.constexpr, G_P: tl.constexpr):
    """bwd_dk's steps over query blocks i_lo <= i < i_hi of query head h: (dk, dv, dphi_k); DO_WIN / DO_LIN as in
    ``_fwd_window_steps`` (the max path's key, arg, is a window key: it enters with the window part). G_K / G_V /
    G_P: the gradients formed (dk, dv, dphi_k: the kernel's GRADS; the others pass through), and only the terms they
    take: dk the window pairs' ds (exponent and dw), dv the pairs' weights (exponent and phi_q . phi_k), dphi_k the
    linear pairs' dw."""
    for i in range(i_lo, i_hi):
        t = i * C + rc
        t_ok = t < T
        row = (b * H + h) * T + t
        if DO_WIN and (G_K or G_V):
            q = _load_rows(Q + b * sQ_b + h * sQ_h, t, t_ok, sQ_t, rd, D)
        if DO_LIN and (G_V or G_P):
            pq = _load_rows(PQ + b * sPQ_b + h * sPQ_h, t, t_ok, sPQ_t, rf, F)
        dy = _load_rows(DY + b * sDY_b + h * sDY_h, t, t_ok, sDY_t, rd, D)
        if DO_WIN and (G_K or G_V):
            mrow = tl.load(MAX + row, mask=t_ok, other=0.0)
        den = tl.load(DEN + row, mask=t_ok, other=0.0)
        if (DO_WIN and G_K) or (DO_LIN and G_P):
            delta = tl.load(DELTA + row, mask=t_ok, other=0.0)
        if DO_WIN and G_K:
            arg = tl.load(ARG + row, mask=t_ok, other=-1)
            corr = tl.load(CORR + row, mask=t_ok, other=0.0)
        inv = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
        win, lin = _window_and_linear(t, e, k_ok, W)
        if DO_WIN and (G_K or G_V):
            ex = _bwd_window_exp(q, k, win, mrow, scale, PREC)
        if (DO_WIN and G_K) or (DO_LIN and G_P):
            dw = _bwd_dw(dy, vv, delta, inv, PREC)
        if DO_WIN and G_K:
            ds = gam * ex * dw + tl.where(arg[:, None] == e[None, :], corr[:, None], 0.0)
        if G_V:
            if DO_LIN:
                a = tl.where(lin, tl.dot(pq, tl.trans(pk), input_precision=PREC), 0.0)
            if DO_WIN and DO_LIN:
                wv = (gam * ex + a) * inv[:, None]
            elif DO_WIN:
                wv = gam * ex * inv[:, None]
            else:
                wv = a * inv[:, None]
            dv += tl.dot(tl.trans(wv.to(dy.dtype)), dy, input_precision=PREC)
        if DO_WIN and G_K:  # (after dv and loads in the old order: the one-launch kernel's sm_90 code stays as it was)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        if DO_LIN and G_P:
            da = tl.where(lin, dw, 0.0)
            dpk += tl.dot(tl.trans(da.to(pq.dtype)), pq, input_precision=PREC)
    return dk, dv, dpk


@triton.jit
def bwd_dq_kernel(
    Q, K, V, PQ, PK, M, GAMMA, DY, MAX, DEN, DELTA, ARG, DQ, DPQ, CORR, CS, CZ, PRE_S, PRE_Z, Y, DG,
    sQ_b, sQ_t, sQ_h, sK_b, sK_t, sK_h, sV_b, sV_t, sV_h, sPQ_b, sPQ_t, sPQ_h, sPK_b, sPK_t, sPK_h,
    sDY_b, sDY_t, sDY_h, sM_b,
    B, T, H, Hf, G, GQ, n_chunks, n_per, nwin, W, scale, Cs,
    D: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, C: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr, FOLD: tl.constexpr = False, SKIP: tl.constexpr = False,
    LOCAL: tl.constexpr = False, DGAM: tl.constexpr = False, DELTA_HERE: tl.constexpr = False,
):
    """dq (complete), dphi_q (intra part) and the max-path correction per query, for a block of C queries.
    The intra part is every key in the state kernels' chunk (Cs, a multiple of C: ``LaunchConfig.C_intra``) and
    the nwin chunks before it; the running-sum kernels take the keys before those. FOLD: also their part,
    (dy S^T - delta z) / den from the chunk's running sums CS / CZ (fwd_chunk_states_kernel's), so dphi_q is
    complete (written in DPQ's dtype) and bwd_dq_state_kernel does not run.
    DGAM (with FOLD): also this block's share of the window weight's gradient, DG[c, b, h] = sum_t dy_t . u_t with
    u = dy / dgamma = (N_w l_lin - l_w N_lin) / den^2 (N_w, l_w: the window's numerator and denominator; N_lin, l_lin:
    the linear part's), from what the kernel forms anyway: sum_t (l_lin r - l_w phi_q . dphi_q) / den, with r = sum_W
    exp(s - m) dw and l_lin = den - gamma l_w. The error of delta (read from the rounded output) cancels between the
    two terms, so no fp32 u need be stored by the forward (bwd_delta_kernel's HAS_U path, a [B, T, H, D] write and
    read). DELTA_HERE: delta = dy . y formed here from Y (same strides as DY) and stored for the later kernels, instead
    of by bwd_delta_kernel."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    hf = h // GQ
    rd = tl.arange(0, BD)
    rf = tl.arange(0, BF)
    rc = tl.arange(0, C)
    t = c * C + rc
    t_ok = t < T
    row = (b * H + h) * T + t
    q = _load_rows(Q + b * sQ_b + h * sQ_h, t, t_ok, sQ_t, rd, D)
    dy = _load_rows(DY + b * sDY_b + h * sDY_h, t, t_ok, sDY_t, rd, D)
    mrow = tl.load(MAX + row, mask=t_ok, other=0.0)
    den = tl.load(DEN + row, mask=t_ok, other=0.0)
    if DELTA_HERE:
        yy = _load_rows(Y + b * sDY_b + h * sDY_h, t, t_ok, sDY_t, rd, D)
        delta = tl.sum(yy.to(tl.float32) * dy.to(tl.float32), 1)
        tl.store(DELTA + row, delta, mask=t_ok)
    else:
        delta = tl.load(DELTA + row, mask=t_ok, other=0.0)
    arg = tl.load(ARG + row, mask=t_ok, other=0)
    inv = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
    gam = tl.load(GAMMA + h)
    Kb = K + b * sK_b + hk * sK_h
    Vb = V + b * sV_b + hk * sV_h
    PKb = PK + b * sPK_b + hf * sPK_h
    dq = tl.zeros([C, BD], dtype=tl.float32)
    dpq = tl.zeros([C, BF], dtype=tl.float32)
    rs = tl.zeros([C], dtype=tl.float32)
    lw = tl.zeros([C], dtype=tl.float32)
    j_lo = tl.maximum((c * C // Cs - nwin) * (Cs // C), 0)
    if SKIP:  # (as _fwd_window: the far blocks with only linear pairs, both, the near ones with only window pairs)
        j_both, j_near = _key_regions(c, j_lo, W, C)
        dq, dpq, rs, lw = _bwd_dq_steps(j_lo, j_both, q, dy, Kb, Vb, PKb, M, b, sM_b, t, W, T, scale, sK_t, sV_t, sPK_t, rd, rf,
                                    rc, D, F, mrow, delta, inv, gam, dq, dpq, rs, lw, C, HAS_MASK, PREC, False, True, DGAM)
        dq, dpq, rs, lw = _bwd_dq_steps(j_both, j_near, q, dy, Kb, Vb, PKb, M, b, sM_b, t, W, T, scale, sK_t, sV_t, sPK_t, rd, rf,
                                    rc, D, F, mrow, delta, inv, gam, dq, dpq, rs, lw, C, HAS_MASK, PREC, True, True, DGAM)
        dq, dpq, rs, lw = _bwd_dq_steps(j_near, c + 1, q, dy, Kb, Vb, PKb, M, b, sM_b, t, W, T, scale, sK_t, sV_t, sPK_t, rd, rf,
                                    rc, D, F, mrow, delta, inv, gam, dq, dpq, rs, lw, C, HAS_MASK, PREC, True, False, DGAM)
    else:
        dq, dpq, rs, lw = _bwd_dq_steps(j_lo, c + 1, q, dy, Kb, Vb, PKb, M, b, sM_b, t, W, T, scale, sK_t, sV_t, sPK_t, rd,
                                    rf, rc, D, F, mrow, delta, inv, gam, dq, dpq, rs, lw, C, HAS_MASK, PREC, True, True, DGAM)
    if DGAM:  # (the steps summed r = exp(s - m) dw without gamma; the row sum of ds is gamma r)
        r = rs
        rs = gam * r
    corr = -rs
    if FOLD:
        S, z = _load_sums(CS, CZ, ((c * C // Cs) * B + b) * Hf + hf, rf, rd, F, D)
        dyi = (dy.to(tl.float32) * inv[:, None]).to(PK.dtype.element_ty)
        if LOCAL:  # (the segment's prefix as a second product, after the first: see _prefix_sums)
            dpq += tl.dot(dyi, tl.trans(S.to(PK.dtype.element_ty)), input_precision=PREC)
            P, pz = _prefix_sums(PRE_S, PRE_Z, c * C // Cs, n_per, B, b, Hf, hf, rf, rd, F, D)
            dpq += tl.dot(dyi, tl.trans(P.to(PK.dtype.element_ty)), input_precision=PREC)
            z += pz
            dpq -= (delta * inv)[:, None] * z[None, :]
        else:
            dpq += tl.dot(dyi, tl.trans(S.to(PK.dtype.element_ty)), input_precision=PREC) - (delta * inv)[:, None] * z[None, :]
    if DGAM:  # (FOLD: dpq is complete here)
        pq = _load_rows(PQ + b * sPQ_b + h * sPQ_h, t, t_ok, sPQ_t, rf, F).to(tl.float32)
        pdp = tl.sum(pq * dpq, 1)
        l_lin = den - gam * lw
        dg = tl.where(t_ok, (l_lin * r - lw * pdp) * inv, 0.0)
        tl.store(DG + (c * B + b) * H + h, tl.sum(dg, 0))
    # The max m_t = s(t, arg_t) carries dm_t = corr_t back to that one key.
    kg = _load_rows(Kb, arg, t_ok, sK_t, rd, D).to(tl.float32)
    dq = (dq + corr[:, None] * kg) * scale
    tl.store(DQ + b * sQ_b + h * sQ_h + t[:, None] * sQ_t + rd[None, :], dq.to(DQ.dtype.element_ty),
             mask=t_ok[:, None] & (rd[None, :] < D))
    tl.store(DPQ + ((b * T + t[:, None]) * H + h) * F + rf[None, :], dpq.to(DPQ.dtype.element_ty),
             mask=t_ok[:, None] & (rf[None, :] < F))
    tl.store(CORR + row, corr, mask=t_ok)


@triton.jit
def _fold_dsums(dv, dpk, pk, vv, dS, dz, k_ok, PREC: tl.constexpr, G_V: tl.constexpr, G_P: tl.constexpr):
    """bwd_dk's FOLD: the later queries' part of a key block's gradients from gradient sums (dS [F, D], dz [F]):
    dv += phi_k dS, dphi_k += v dS^T + dz (padding keys none)."""
    if G_V:
        dv += tl.where(k_ok[:, None], tl.dot(pk, dS, input_precision=PREC), 0.0)
    if G_P:
        dpk += tl.where(k_ok[:, None], tl.dot(vv, tl.trans(dS), input_precision=PREC) + dz[None, :], 0.0)
    return dv, dpk


@triton.jit
def bwd_dk_kernel(
    Q, K, V, PQ, PK, M, GAMMA, DY, MAX, DEN, DELTA, ARG, CORR, DK, DV, DPK, CDS, CDZ, REV_S, REV_Z,
    sQ_b, sQ_t, sQ_h, sK_b, sK_t, sK_h, sV_b, sV_t, sV_h, sPQ_b, sPQ_t, sPQ_h, sPK_b, sPK_t, sPK_h,
    sDY_b, sDY_t, sDY_h, sM_b,
    B, T, H, Hf, Gk, n_chunks, n_per, nwin, W, scale, Cs,
    D: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, C: tl.constexpr,
    GQ: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, FOLD: tl.constexpr = False,
    SKIP: tl.constexpr = False, GRADS: tl.constexpr = 7, LOCAL: tl.constexpr = False,
):
    """dk (complete), dv and dphi_k (intra parts) of a block j of C keys for feature head hf, summed over its GQ
    query heads: the queries of the state kernels' chunk (Cs) that holds it and of the nwin chunks after.
    Written laid out [B, T, Hf, X], dv and dphi_k to fp32 buffers unless FOLD: then they also take the later
    queries' part, phi_k dS and v dS^T + dz from the chunk's gradient sums CDS / CDZ
    (bwd_chunk_dstates_kernel's), are complete, are written in DV's / DPK's dtype, and bwd_dk_state_kernel does
    not run. GRADS: the gradients this launch forms and writes (1 dk, 2 dv, 4 dphi_k): ``LaunchConfig.dk_launches``
    splits them over launches with smaller live sets, each recomputing the terms it needs."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hf
    hf = bh % Hf
    hk = hf // Gk
    rd = tl.arange(0, BD)
    rf = tl.arange(0, BF)
    rc = tl.arange(0, C)
    e = j * C + rc
    k_ok = _key_ok(M, b, sM_b, e, T, HAS_MASK)
    e_in = e < T
    G_K: tl.constexpr = GRADS % 2 == 1
    G_V: tl.constexpr = GRADS // 2 % 2 == 1
    G_P: tl.constexpr = GRADS // 4 % 2 == 1
    # (tiles a launch does not read stand in as another it loads; never read as what they stand for)
    if G_K or G_V:
        k = _load_rows(K + b * sK_b + hk * sK_h, e, e_in, sK_t, rd, D)
    if G_K or G_P:
        vv = _load_rows(V + b * sV_b + hk * sV_h, e, e_in, sV_t, rd, D)
    if G_V:
        pk = _load_rows(PK + b * sPK_b + hf * sPK_h, e, e_in, sPK_t, rf, F)
    if not (G_K or G_P):
        vv = k
    if not (G_K or G_V):
        k = vv
    if not G_V:
        pk = vv
    dk = tl.zeros([C, BD], dtype=tl.float32)
    dv = tl.zeros([C, BD], dtype=tl.float32)
    dpk = tl.zeros([C, BF], dtype=tl.float32)
    if FOLD and LOCAL:  # (the fold's products first, before the loops' tiles are live: see _prefix_sums)
        dS, dz = _load_sums(CDS, CDZ, ((j * C // Cs) * B + b) * Hf + hf, rf, rd, F, D)
        P, pz = _prefix_sums(REV_S, REV_Z, j * C // Cs, n_per, B, b, Hf, hf, rf, rd, F, D)
        dv, dpk = _fold_dsums(dv, dpk, pk, vv, (dS + P.to(dS.dtype)).to(k.dtype), dz + pz, k_ok, PREC, G_V, G_P)
    for g in tl.static_range(GQ):
        h = hf * GQ + g
        gam = tl.load(GAMMA + h)
        i_hi = tl.minimum((j * C // Cs + nwin + 1) * (Cs // C), n_chunks)
        args = (k, vv, pk, Q, PQ, DY, MAX, DEN, DELTA, ARG, CORR, b, h, H, T, e, k_ok, W, scale, sQ_b, sQ_t, sQ_h,
                sPQ_b, sPQ_t, sPQ_h, sDY_b, sDY_t, sDY_h, rd, rf, rc, D, F, gam)
        if SKIP:  # (as _fwd_window, in the key block's order: the near query blocks first)
            i_both, i_far = _query_regions(j, i_hi, W, C)
            if G_V or (G_K and G_P):
                dk, dv, dpk = _bwd_dk_steps(j, i_both, *args, dk, dv, dpk, C, PREC, True, False, G_K, G_V, G_P)
                dk, dv, dpk = _bwd_dk_steps(i_both, i_far, *args, dk, dv, dpk, C, PREC, True, True, G_K, G_V, G_P)
                dk, dv, dpk = _bwd_dk_steps(i_far, i_hi, *args, dk, dv, dpk, C, PREC, False, True, G_K, G_V, G_P)
            elif G_K:  # (dk alone: the blocks with window pairs, in one loop)
                dk, dv, dpk = _bwd_dk_steps(j, i_far, *args, dk, dv, dpk, C, PREC, True, False, G_K, G_V, G_P)
            else:  # (dphi_k alone: the blocks with linear pairs)
                dk, dv, dpk = _bwd_dk_steps(i_both, i_hi, *args, dk, dv, dpk, C, PREC, False, True, G_K, G_V, G_P)
        else:
            dk, dv, dpk = _bwd_dk_steps(j, i_hi, *args, dk, dv, dpk, C, PREC, True, True, G_K, G_V, G_P)
    if FOLD and not LOCAL:
        dS, dz = _load_sums(CDS, CDZ, ((j * C // Cs) * B + b) * Hf + hf, rf, rd, F, D)
        dv, dpk = _fold_dsums(dv, dpk, pk, vv, dS.to(k.dtype), dz, k_ok, PREC, G_V, G_P)
    out = (b * T + e[:, None]) * Hf + hf
    if G_K:
        tl.store(DK + out * D + rd[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=e_in[:, None] & (rd[None, :] < D))
    if G_V:
        tl.store(DV + out * D + rd[None, :], dv.to(DV.dtype.element_ty), mask=e_in[:, None] & (rd[None, :] < D))
    if G_P:
        tl.store(DPK + out * F + rf[None, :], dpk.to(DPK.dtype.element_ty), mask=e_in[:, None] & (rf[None, :] < F))


# ---------------------------------------------------------------------------------------------------------
# backward: the running-sum parts
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _query_chunk_dsums(PQ, DY, DEN, DELTA, b, hf, H, T, t, sPQ_b, sPQ_t, sPQ_h, sDY_b, sDY_t, sDY_h, rf, rv, F, D,
                       dS, dz, zw, GQ: tl.constexpr, PREC: tl.constexpr):
    """(dS + sum phi_q^T (dy / den) [F, BV], dz - zw sum phi_q delta / den [F]) over query rows t of the GQ query
    heads of feature head hf: what those queries add to the gradient sums of every earlier key (zw 0 leaves dz to
    value block 0)."""
    t_ok = t < T
    for g in tl.static_range(GQ):
        h = hf * GQ + g
        row = (b * H + h) * T + t
        pq = _load_rows(PQ + b * sPQ_b + h * sPQ_h, t, t_ok, sPQ_t, rf, F)
        dy = _load_rows(DY + b * sDY_b + h * sDY_h, t, t_ok, sDY_t, rv, D).to(tl.float32)
        den = tl.load(DEN + row, mask=t_ok, other=0.0)
        delta = tl.load(DELTA + row, mask=t_ok, other=0.0)
        inv = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
        dS += tl.dot(tl.trans(pq), (dy * inv[:, None]).to(pq.dtype), input_precision=PREC)
        dz -= zw * tl.sum(pq.to(tl.float32) * (delta * inv)[:, None], 0)
    return dS, dz


@triton.jit
def bwd_segment_sums_kernel(
    PQ, DY, DEN, DELTA, OUT_S, OUT_Z,
    sPQ_b, sPQ_t, sPQ_h, sDY_b, sDY_t, sDY_h,
    B, T, H, Hf, n_chunks, n_per, nwin,
    F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    GQ: tl.constexpr, PREC: tl.constexpr,
):
    """OUT_S[s] = sum over query chunks [s*n_per + nwin, (s+1)*n_per + nwin) of phi_q^T (dy / den), summed
    over the GQ query heads of feature head hf (the gradient of S seen by the keys of segment s's successor);
    OUT_Z[s] likewise for z: -sum phi_q delta / den."""
    s = tl.program_id(0)
    bh = tl.program_id(1)
    iv = tl.program_id(2)
    b = bh // Hf
    hf = bh % Hf
    rf = tl.arange(0, BF)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    acc = tl.zeros([BF, BV], dtype=tl.float32)
    accz = tl.zeros([BF], dtype=tl.float32)
    c_lo = s * n_per + nwin
    c_hi = tl.minimum((s + 1) * n_per + nwin, n_chunks)
    for c in range(c_lo, c_hi):
        acc, accz = _query_chunk_dsums(PQ, DY, DEN, DELTA, b, hf, H, T, c * C + rc, sPQ_b, sPQ_t, sPQ_h,
                                       sDY_b, sDY_t, sDY_h, rf, rv, F, D, acc, accz, 1.0, GQ, PREC)
    _store_sums(OUT_S, OUT_Z, (s * B + b) * Hf + hf, rf, rv, F, D, acc, accz, iv)


@triton.jit
def bwd_dq_state_kernel(
    PK, V, M, DY, DEN, DELTA, S0, Z0, DPQ, OUT,
    sPK_b, sPK_t, sPK_h, sV_b, sV_t, sV_h, sDY_b, sDY_t, sDY_h, sM_b,
    B, T, H, Hf, Gk, n_chunks, n_per, nwin,
    F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    GQ: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, ATOMIC: tl.constexpr,
):
    """dphi_q += (dy S^T - delta z) / den: the running sums rebuilt along the segment, as in the forward.
    Without value blocks (not ATOMIC) it writes the finished gradient to OUT in its own dtype; with them it
    adds into the fp32 buffer DPQ."""
    s = tl.program_id(0)
    bh = tl.program_id(1)
    iv = tl.program_id(2)
    b = bh // Hf
    hf = bh % Hf
    hk = hf // Gk
    rf = tl.arange(0, BF)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    base = (s * B + b) * Hf + hf
    S, z = _load_sums(S0, Z0, base, rf, rv, F, D)
    z = tl.where(iv == 0, z, 0.0)
    c_lo = s * n_per
    c_hi = tl.minimum((s + 1) * n_per, n_chunks)
    for c in range(c_lo, c_hi):
        t = c * C + rc
        t_ok = t < T
        for g in tl.static_range(GQ):
            h = hf * GQ + g
            row = (b * H + h) * T + t
            dy = _load_rows(DY + b * sDY_b + h * sDY_h, t, t_ok, sDY_t, rv, D).to(tl.float32)
            den = tl.load(DEN + row, mask=t_ok, other=0.0)
            delta = tl.load(DELTA + row, mask=t_ok, other=0.0)
            inv = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
            dyi = (dy * inv[:, None]).to(PK.dtype.element_ty)
            add = tl.dot(dyi, tl.trans(S.to(PK.dtype.element_ty)), input_precision=PREC) - (delta * inv)[:, None] * z[None, :]
            ptr = DPQ + ((b * T + t[:, None]) * H + h) * F + rf[None, :]
            ok = t_ok[:, None] & (rf[None, :] < F)
            if ATOMIC:
                tl.atomic_add(ptr, add, mask=ok)
            else:
                tot = tl.load(ptr, mask=ok, other=0.0) + add
                tl.store(OUT + ((b * T + t[:, None]) * H + h) * F + rf[None, :], tot.to(OUT.dtype.element_ty), mask=ok)
        dS, dz = _key_chunk_sums(PK + b * sPK_b + hf * sPK_h, V + b * sV_b + hk * sV_h, M, b, sM_b, (c - nwin) * C + rc, T,
                                 sPK_t, sV_t, rf, rv, F, D, HAS_MASK, PREC)
        S += dS
        z += tl.where(iv == 0, dz, 0.0)


@triton.jit
def bwd_dk_state_kernel(
    PQ, PK, V, M, DY, DEN, DELTA, DS0, DZ0, DV, DPK, OUT_V, OUT_PK,
    sPQ_b, sPQ_t, sPQ_h, sPK_b, sPK_t, sPK_h, sV_b, sV_t, sV_h, sDY_b, sDY_t, sDY_h, sM_b,
    B, T, H, Hf, Gk, n_chunks, n_per, nwin,
    F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    GQ: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, ATOMIC: tl.constexpr, FINAL: tl.constexpr,
):
    """dv += phi_k dS, dphi_k += v dS^T + dz: the gradient sums carried backwards along the segment.
    FINAL: write the finished dv / dphi_k to OUT_V / OUT_PK in their dtype instead of back to the buffers."""
    s = tl.program_id(0)
    bh = tl.program_id(1)
    iv = tl.program_id(2)
    b = bh // Hf
    hf = bh % Hf
    hk = hf // Gk
    rf = tl.arange(0, BF)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    base = (s * B + b) * Hf + hf
    dS, dz = _load_sums(DS0, DZ0, base, rf, rv, F, D)
    dz = tl.where(iv == 0, dz, 0.0)
    c_lo = s * n_per
    c_hi = tl.minimum((s + 1) * n_per, n_chunks)
    for jj in range(c_lo, c_hi):
        j = c_hi - 1 - (jj - c_lo)
        e = j * C + rc
        k_ok = _key_ok(M, b, sM_b, e, T, HAS_MASK)
        pk = _load_rows(PK + b * sPK_b + hf * sPK_h, e, k_ok, sPK_t, rf, F)
        vv = _load_rows(V + b * sV_b + hk * sV_h, e, k_ok, sV_t, rv, D)
        dSh = dS.to(pk.dtype)
        dv_add = tl.dot(pk, dSh, input_precision=PREC)
        dpk_add = tl.dot(vv, tl.trans(dSh), input_precision=PREC) + dz[None, :]
        dpk_add = tl.where(k_ok[:, None], dpk_add, 0.0)
        out = (b * T + e[:, None]) * Hf + hf
        okv = (e[:, None] < T) & (rv[None, :] < D)
        pv = DV + out * D + rv[None, :]
        okf = (e[:, None] < T) & (rf[None, :] < F)
        pf = DPK + out * F + rf[None, :]
        if FINAL:
            tl.store(OUT_V + out * D + rv[None, :], (tl.load(pv, mask=okv, other=0.0) + dv_add).to(OUT_V.dtype.element_ty), mask=okv)
            tl.store(OUT_PK + out * F + rf[None, :], (tl.load(pf, mask=okf, other=0.0) + dpk_add).to(OUT_PK.dtype.element_ty), mask=okf)
        else:
            tl.store(pv, tl.load(pv, mask=okv, other=0.0) + dv_add, mask=okv)
            if ATOMIC:
                tl.atomic_add(pf, dpk_add, mask=okf)
            else:
                tl.store(pf, tl.load(pf, mask=okf, other=0.0) + dpk_add, mask=okf)
        # Query chunk j + nwin now holds key chunk j - 1 in its running sum.
        dS, dz = _query_chunk_dsums(PQ, DY, DEN, DELTA, b, hf, H, T, (j + nwin) * C + rc, sPQ_b, sPQ_t, sPQ_h,
                                    sDY_b, sDY_t, sDY_h, rf, rv, F, D, dS, dz, tl.where(iv == 0, 1.0, 0.0), GQ, PREC)


@triton.jit
def bwd_chunk_dstates_kernel(
    PQ, DY, DEN, DELTA, DS0, DZ0, CDS, CDZ, SEG_S, SEG_Z,
    sPQ_b, sPQ_t, sPQ_h, sDY_b, sDY_t, sDY_h,
    B, T, H, Hf, n_chunks, n_per, nwin,
    F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    GQ: tl.constexpr, PREC: tl.constexpr, LOCAL: tl.constexpr = False, PAIRS: tl.constexpr = False,
    ZERO_START: tl.constexpr = False,
):
    """CDS[j] = the gradient sum dS that key chunk j receives from the queries of chunks > j + nwin
    (sum phi_q (dy / den)^T), in phi_q's dtype (the dtype bwd_dk_state_kernel's products take it in), CDZ[j] = dz
    in fp32: bwd_dk_state_kernel's walk backwards along a segment from its reverse prefix (DS0, DZ0), without its
    dv / dphi_k work, which bwd_dk_kernel's FOLD then does for every key block in parallel. LOCAL: started from
    zero (readers add the segment's reverse prefix), and the segment's total written to SEG_S / SEG_Z as
    bwd_segment_sums_kernel writes it, so that pass does not run. PAIRS: two chunks a step, as in
    fwd_chunk_states_kernel. ZERO_START: started from zero with nothing else changed (one segment: its reverse prefix
    is zero, DS0 / DZ0 unread)."""
    s = tl.program_id(0)
    bh = tl.program_id(1)
    iv, rf, rv = _walk_tile(F, D, BF, BV)
    b = bh // Hf
    hf = bh % Hf
    rc = tl.arange(0, C)
    FROM_ZERO: tl.constexpr = LOCAL or ZERO_START
    dS, dz = _walk_start(DS0, DZ0, (s * B + b) * Hf + hf, rf, rv, F, D, BF, BV, FROM_ZERO)
    c_lo = s * n_per
    c_hi = tl.minimum((s + 1) * n_per, n_chunks)
    for jj in range(c_lo, c_hi, 1 + PAIRS):
        j = c_hi - 1 - (jj - c_lo)
        if PAIRS:  # (the chunk before j; before the segment it is formed but not added, and its rows kept >= 0)
            a2, az2 = _query_chunk_dsums(PQ, DY, DEN, DELTA, b, hf, H, T, (tl.maximum(j - 1, 0) + nwin) * C + rc,
                                         sPQ_b, sPQ_t, sPQ_h, sDY_b, sDY_t, sDY_h, rf, rv, F, D,
                                         tl.zeros([BF, BV], dtype=tl.float32), tl.zeros([BF], dtype=tl.float32), 1.0,
                                         GQ, PREC)
        _store_sums(CDS, CDZ, (j * B + b) * Hf + hf, rf, rv, F, D, dS.to(CDS.dtype.element_ty), dz, iv)
        dS, dz = _query_chunk_dsums(PQ, DY, DEN, DELTA, b, hf, H, T, (j + nwin) * C + rc, sPQ_b, sPQ_t, sPQ_h,
                                    sDY_b, sDY_t, sDY_h, rf, rv, F, D, dS, dz, 1.0, GQ, PREC)
        if PAIRS:
            if j - 1 >= c_lo:
                _store_sums(CDS, CDZ, ((j - 1) * B + b) * Hf + hf, rf, rv, F, D, dS.to(CDS.dtype.element_ty), dz, iv)
                dS += a2
                dz += az2
    if LOCAL:  # (query chunks [c_lo + nwin, c_hi + nwin): bwd_segment_sums_kernel's)
        _store_sums(SEG_S, SEG_Z, (s * B + b) * Hf + hf, rf, rv, F, D, dS, dz, iv)


@triton.jit
def bwd_delta_kernel(
    Y, U, DY, DELTA, DGAM, sY_b, sY_t, sY_h, sDY_b, sDY_t, sDY_h, B, T, H,
    D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, HAS_U: tl.constexpr,
):
    """delta[b, h, t] = dy . y in fp32, one pass over both (no fp32 copies of them); with HAS_U also this
    block's share of dgamma[h] = sum_t dy . u."""
    it = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = it * BT + tl.arange(0, BT)
    rd = tl.arange(0, BD)
    ok = t < T
    y = _load_rows(Y + b * sY_b + h * sY_h, t, ok, sY_t, rd, D).to(tl.float32)
    dy = _load_rows(DY + b * sDY_b + h * sDY_h, t, ok, sDY_t, rd, D).to(tl.float32)
    tl.store(DELTA + (b * H + h) * T + t, tl.sum(y * dy, 1), mask=ok)
    if HAS_U:
        u = _load_rows(U + b * sY_b + h * sY_h, t, ok, sY_t, rd, D).to(tl.float32)
        tl.store(DGAM + (it * B + b) * H + h, tl.sum(tl.sum(u * dy, 1), 0))
