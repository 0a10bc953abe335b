"""Triton decode step of the hybrid attention: one token per sequence against a ``RingState``, in place.

Same math as ``ring_step_torch`` (and so ``hybrid_attention_step``). One program per
``(sequence b, key-feature head f, block of BD value columns)``; ``f`` is a KV head when the key feature
maps are per KV head (the program then serves the G query heads of that KV head), else a query head.
Each program reads its slice ``S[b, f, :, block]`` once, does the readout of its query heads for its
value columns, adds the evicted key to the slice and writes it back: S is read once and written once,
which is nearly all the bytes of a step. The window scores need whole keys, so every value block of a
head recomputes them (those re-reads of the ring hit L2: the block index varies fastest in the grid).
With ``chunk_rows`` the slice is streamed in row chunks instead of held whole: 80 registers a thread instead of
168 at SmolLM2's shape (sm_90 compile), so twice the programs fit on an SM; with key maps per KV head each chunk
is read out by the program's query heads as it passes. ``benchmarks/tune_decode.py`` times the launches.

With deferred folding (``RingState.fold = P > 1``, ``linearize.ops.ring``) a program reads its slice every step but
writes it back only on the steps that fold (every P-th), and reads the keys waiting to be folded as linear terms.

No races between the programs of one launch (``R = W + P - 1`` ring slots):
  * the new key goes to ring slot ``pos % R`` (age 0), which no program reads in this step (the new key is read
    from the inputs instead); the slots read (the tail: ages 1 .. W - 1; waiting or folded: W - 1 .. R - 1) are
    not written;
  * ``z`` is double-buffered: every program reads ``z[pos % 2]``; value block 0 writes ``z[(pos+1) % 2]``;
  * a program writes only its own slice of S;
  * ``pos`` itself is advanced after the kernel (``pos.add_(1)``, or by a compiled step for all layers at once),
    since every program reads it.
No host sync and no shape that depends on data, so a step can be captured in a CUDA graph.

To time one step at given shapes (benchmarks): ``inputs, ring = random_decode_problem(...)``, then
``ring_step_triton(*inputs, ring, window_weight=gamma, out=y)`` (the ring advances every call; the
cost per step does not depend on the position).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..common import default_scale, window_weight_vector
from ..ring import RingState, check_ring, ring_from_state, ring_slots
from ..state import HybridState
from . import launch_env


@triton.jit
def _ring_block(KR, VR, MR, b, j, r0, pos, rdf, dfull_ok, rd, d_ok, Hkv, D: tl.constexpr, BW: tl.constexpr,
                W: tl.constexpr, R: tl.constexpr):
    """Ring slots r0 .. r0 + BW of KV head j: keys [BW, DP] and values [BW, BD] in the ring's dtype (converted where
    they are used: fp32 copies loaded early would hold twice the registers through the scores), and which slots
    count (in the window's tail: ages 1 .. W - 1, so not the new key's slot nor a key waiting to be folded; filled).
    Only the tail's slots are loaded."""
    rs = r0 + tl.arange(0, BW)
    if R == W:  # the whole ring is the window: every slot but the new key's
        tail = (rs < R) & (rs != pos % R)
    else:
        age = (pos + R - rs) % R
        tail = (rs < R) & (age >= 1) & (age < W)
    row = (b * R + rs) * Hkv + j
    # the three loads do not wait on each other; validity is applied to the values
    mr = tl.load(MR + b * R + rs, mask=tail, other=0)
    kb = tl.load(KR + row[:, None] * D + rdf[None, :], mask=tail[:, None] & dfull_ok[None, :], other=0.0)
    vb = tl.load(VR + row[:, None] * D + rd[None, :], mask=tail[:, None] & d_ok[None, :], other=0.0)
    ok = tail & (mr != 0)
    return kb, vb, ok


@triton.jit
def _slot_of_age(pos, age, R: tl.constexpr):
    """The ring slot of the key ``age`` steps older than the one at ``pos`` (age 0; ``age`` < R), as
    ``linearize.ops.ring._slots_of_ages``."""
    return (pos + R - age) % R


@triton.jit
def _fold_key(MR, b, pos, i, W: tl.constexpr, R: tl.constexpr):
    """The slot of the i-th key a fold takes (age W - 1 + i: the one leaving the window, then the waiting ones) and
    whether it holds a valid key. The callers apply that validity to the loaded values, so that a key's loads do
    not wait on its mask (a load masked by a loaded mask waits a round trip for it: with P keys in turn, the folding
    step of the 8B's heads took 55.6 us against 37 for the others, H100, ``benchmarks/profile_decode.py`` under
    Nsight Compute). The loops stay rolled: unrolled, their loads held registers across S and spilled."""
    r = _slot_of_age(pos, W - 1 + i, R)
    return r, tl.load(MR + b * R + r) != 0


@triton.jit
def _waiting_block(PKR, VR, MR, b, f, j, pos, waiting, i0, rf, f_ok, rd, d_ok, Hf, Hkv, F: tl.constexpr,
                   D: tl.constexpr, W: tl.constexpr, R: tl.constexpr, P: tl.constexpr, PW: tl.constexpr):
    """Waiting keys i0 .. i0 + PW of those that left the window and wait to be folded (ages W .. W + waiting - 1, at
    most P - 1): their features [PW, FP] and values [PW, BD] in fp32, zero where a slot does not count."""
    i = i0 + tl.arange(0, PW)
    rs = _slot_of_age(pos, W + i, R)
    live = (i < waiting) & (i < P - 1)
    # the three loads do not wait on each other: a padded slot's validity is applied to the values (a load masked
    # by the loaded mask would wait a round trip for it)
    mr = tl.load(MR + b * R + rs, mask=live, other=0)
    pk = tl.load(PKR + ((b * R + rs) * Hf + f)[:, None] * F + rf[None, :], mask=live[:, None] & f_ok[None, :],
                 other=0.0)
    vb = tl.load(VR + ((b * R + rs) * Hkv + j)[:, None] * D + rd[None, :], mask=live[:, None] & d_ok[None, :],
                 other=0.0)
    ok = (live & (mr != 0))[:, None]
    return tl.where(ok, pk.to(tl.float32), 0.0), tl.where(ok, vb.to(tl.float32), 0.0)


@triton.jit
def _waiting_part(pq, PKR, VR, MR, b, f, j, pos, waiting, rf, f_ok, rd, d_ok, Hf, Hkv, F: tl.constexpr,
                  D: tl.constexpr, W: tl.constexpr, R: tl.constexpr, P: tl.constexpr, PW: tl.constexpr):
    """One query head's (features ``pq`` [FP]) readout of the waiting keys, which are linear keys not yet in S, z:
    (num [BD], den)."""
    num = tl.zeros([rd.shape[0]], tl.float32)
    den = 0.0
    for i0 in tl.static_range(0, P - 1, PW):  # unrolled, so that the blocks' loads do not wait on each other
        pk, vb = _waiting_block(PKR, VR, MR, b, f, j, pos, waiting, i0, rf, f_ok, rd, d_ok, Hf, Hkv, F, D, W, R, P, PW)
        a = tl.sum(pk * pq[None, :], 1)  # [PW]
        num += tl.sum(a[:, None] * vb, 0)
        den += tl.sum(a, 0)
    return num, den


@triton.jit
def _waiting_heads(pq_all, PKR, VR, MR, b, f, j, pos, waiting, rf, f_ok, rd, d_ok, Hf, Hkv, F: tl.constexpr,
                   D: tl.constexpr, W: tl.constexpr, R: tl.constexpr, P: tl.constexpr, PW: tl.constexpr,
                   PREC: tl.constexpr):
    """``_waiting_part`` for the query heads' features ``pq_all`` [QHP, FP] at once, by two dots (PW >= 16):
    (num [QHP, BD], den [QHP])."""
    pk, vb = _waiting_block(PKR, VR, MR, b, f, j, pos, waiting, 0, rf, f_ok, rd, d_ok, Hf, Hkv, F, D, W, R, P, PW)
    a = tl.dot(pq_all, tl.trans(pk), input_precision=PREC)  # [QHP, PW]
    return tl.dot(a, vb, input_precision=PREC), tl.sum(a, 1)


@triton.jit
def _fold_rows(s, PKR, VR, MR, b, f, j, pos, rows, rows_ok, rd, d_ok, Hf, Hkv, F: tl.constexpr, D: tl.constexpr,
               W: tl.constexpr, R: tl.constexpr, P: tl.constexpr):
    """``s`` [rows, BD] (feature rows ``rows`` of the S slice, value columns ``rd``) plus the P keys of ages
    W - 1 .. W + P - 2: the one leaving the window and the P - 1 waiting. One rank-1 update a key (the step that
    folds runs once every P)."""
    for i in range(P):
        r, ok = _fold_key(MR, b, pos, i, W, R)
        pk = tl.load(PKR + ((b * R + r) * Hf + f) * F + rows, mask=rows_ok, other=0.0).to(tl.float32)
        vv = tl.load(VR + ((b * R + r) * Hkv + j) * D + rd, mask=d_ok, other=0.0).to(tl.float32)
        s += tl.where(ok, pk, 0.0)[:, None] * tl.where(ok, vv, 0.0)[None, :]
    return s


@triton.jit
def _fold_z(z, PKR, MR, b, f, pos, rf, f_ok, Hf, F: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
            P: tl.constexpr):
    """``z`` [FP] plus the features of the P keys ``_fold_rows`` folds."""
    for i in range(P):
        r, ok = _fold_key(MR, b, pos, i, W, R)
        z += tl.where(ok, tl.load(PKR + ((b * R + r) * Hf + f) * F + rf, mask=f_ok, other=0.0).to(tl.float32), 0.0)
    return z


@triton.jit
def _window_part(Q, K, V, KR, VR, MR, b, j, h, rd, d_ok, valid_new, v_new, pos, sQ_b, sQ_h, sK_b, sK_h, scale,
                 Hkv, D: tl.constexpr, DP: tl.constexpr, BW: tl.constexpr, W: tl.constexpr, R: tl.constexpr):
    """Query head h's softmax over its window (the new key and the ring's valid slots): (acc [BD], l), both
    relative to the running max, so that acc / l is the window's output."""
    rdf = tl.arange(0, DP)  # whole head dim, for the scores
    dfull_ok = rdf < D
    k_new = tl.load(K + b * sK_b + j * sK_h + rdf, mask=dfull_ok, other=0.0).to(tl.float32)
    qv = tl.load(Q + b * sQ_b + h * sQ_h + rdf, mask=dfull_ok, other=0.0).to(tl.float32)
    # online max over the window, starting from the new key; ends at the max over all valid keys,
    # so acc = sum exp(s - m) v exactly as the reference defines it
    s_new = tl.sum(qv * k_new, 0) * scale
    m = tl.where(valid_new, s_new, float("-inf"))
    l = tl.where(valid_new, 1.0, 0.0)
    acc = tl.where(valid_new, v_new, 0.0)
    if W > 0:
        for r0 in range(0, R, BW):
            kb, vb, ok = _ring_block(KR, VR, MR, b, j, r0, pos, rdf, dfull_ok, rd, d_ok, Hkv, D, BW, W, R)
            s = tl.sum(kb.to(tl.float32) * qv[None, :], 1) * scale
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_use)
            p = tl.where(ok, tl.exp(s - m_use), 0.0)
            vb = tl.where(ok[:, None], vb.to(tl.float32), 0.0)  # a skipped slot may hold anything finite or not
            acc = acc * alpha + tl.sum(p[:, None] * vb, 0)
            l = l * alpha + tl.sum(p, 0)
            m = m_new
    return acc, l


@triton.jit
def _window_heads(Q, K, KR, VR, MR, b, j, hq, g_ok, rd, d_ok, valid_new, v_new, pos, sQ_b, sQ_h, sK_b, sK_h, scale,
                  Hkv, D: tl.constexpr, DP: tl.constexpr, BW: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
                  PREC: tl.constexpr):
    """``_window_part`` for the query heads ``hq`` [QR] of one KV head at once: each ring block is loaded once for
    all of them, scored and summed by two dots in ``PREC`` ([QR, D] x [D, BW], [QR, BW] x [BW, BD]; QR, BW >= 16;
    half-precision q and k are exact in tf32). -> (acc [QR, BD], l [QR]), relative to each head's running max."""
    rdf = tl.arange(0, DP)
    dfull_ok = rdf < D
    k_new = tl.load(K + b * sK_b + j * sK_h + rdf, mask=dfull_ok, other=0.0).to(tl.float32)
    qm = tl.load(Q + b * sQ_b + hq[:, None] * sQ_h + rdf[None, :], mask=g_ok[:, None] & dfull_ok[None, :],
                 other=0.0).to(tl.float32)
    s_new = tl.sum(qm * k_new[None, :], 1) * scale
    m = tl.where(valid_new, s_new, float("-inf"))
    l = tl.where(valid_new, 1.0, 0.0) + tl.zeros_like(s_new)
    acc = tl.where(valid_new, v_new, 0.0)[None, :] + tl.zeros_like(s_new)[:, None]
    if W > 0:
        for r0 in range(0, R, BW):
            kb, vb, ok = _ring_block(KR, VR, MR, b, j, r0, pos, rdf, dfull_ok, rd, d_ok, Hkv, D, BW, W, R)
            # a skipped slot's key reaches only its own score, masked below
            s = tl.dot(qm, tl.trans(kb.to(tl.float32)), input_precision=PREC) * scale  # [QR, BW]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_use)
            p = tl.where(ok[None, :], tl.exp(s - m_use[:, None]), 0.0)
            vb = tl.where(ok[:, None], vb.to(tl.float32), 0.0)  # a skipped slot's value would reach every row
            acc = acc * alpha[:, None] + tl.dot(p, vb, input_precision=PREC)
            l = l * alpha + tl.sum(p, 1)
            m = m_new
    return acc, l


@triton.jit
def _s_rows(S, bf, c0, rd, d_ok, F: tl.constexpr, D: tl.constexpr, FC: tl.constexpr):
    """Pointers and mask of rows c0 .. c0 + FC of the S slice [F, D] of feature head ``bf``, value columns ``rd``."""
    rc = c0 + tl.arange(0, FC)
    return S + bf * F * D + rc[:, None] * D + rd[None, :], (rc < F)[:, None] & d_ok[None, :]


@triton.jit
def _gamma(GAMMA, h, LOGIT: tl.constexpr, h_ok=None):
    """The window weight of query head(s) h in fp32: GAMMA holds gamma, or (LOGIT) its logits, whose sigmoid
    is taken here rather than in a kernel of its own before the launch (as ``torch.sigmoid(logit.float())``)."""
    g = tl.load(GAMMA + h, mask=h_ok).to(tl.float32)  # (masked heads: the caller zeroes them)
    if LOGIT:
        g = tl.sigmoid(g)
    return g


@triton.jit
def _decode_kernel(
    Q, K, V, PQ, PK, VALID, GAMMA,  # step inputs
    S, Z, KR, VR, PKR, MR, POS,  # ring state (contiguous)
    Y,
    sQ_b, sQ_h, sK_b, sK_h, sV_b, sV_h, sPQ_b, sPQ_h, sPK_b, sPK_h, sY_b, sY_h,
    B, Hf, Hkv, scale,
    D: tl.constexpr, F: tl.constexpr, DP: tl.constexpr, FP: tl.constexpr,
    BD: tl.constexpr, ND: tl.constexpr, BW: tl.constexpr,
    QH: tl.constexpr, GK: tl.constexpr, WINDOW: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
    HAS_VALID: tl.constexpr, FC: tl.constexpr = 0, PREFETCH: tl.constexpr = False, QHP: tl.constexpr = 1,
    HEADS_DOT: tl.constexpr = False, PREC: tl.constexpr = "ieee", P: tl.constexpr = 1, PW: tl.constexpr = 1,
    GAMMA_LOGIT: tl.constexpr = False,
):
    """FC (rows of S per chunk): 0 holds the program's whole S slice in registers at once; FC < FP streams it in
    row chunks (read, read out, update, write back), the window parts first, so that fewer registers are live and
    more programs share an SM. With QH > 1 query heads a feature head (key maps per KV head), each chunk is read
    out by all of them (QHP: QH rounded up to a power of two, the rows of their [QHP, BD] accumulators).

    PREFETCH (with FC): the first chunk's load is issued before the window part and each next chunk's before
    the current one is read out, so a program's S loads overlap its other work instead of each waiting in
    turn. Where every program of the launch is resident at once (SmolLM2, Qwen2.5: B x Hf programs of 2 warps),
    the kernel's time is one program's chain of dependent loads, which this shortens; it holds two chunks.

    HEADS_DOT (with FC and QH > 1): the QH query heads as the rows of tensor-core dots instead of a static loop over
    them: the window part scores each ring block for all of them at once (``_window_heads``: one load of the block,
    not QH), and each S chunk is read out by one [QHP, FC] x [FC, BD] dot (QHP >= 16 here: dots need 16 rows; the
    padding rows load zeros and are not stored). PREC, the dots' precision: "tf32" for half-precision inputs (S and
    the window's weights rounded to 10 mantissa bits, 1/8 of the bf16 output's rounding; q, k, v and phi_q are
    exact in it), "ieee" for fp32 inputs (fp32 FMA: sm_90 spills there).

    W window slots, R = W + P - 1 ring slots. P > 1 (deferred folding, ``linearize.ops.ring``): S and z are read
    every step and written only on the steps that fold (every P-th); the keys waiting in the ring between folds
    (at most P - 1, in blocks of PW) are read out as explicit linear terms, which seed ``num`` and ``den``."""
    pid = tl.program_id(0)
    pid_d = pid % ND
    bf = (pid // ND).to(tl.int64)
    b = bf // Hf
    f = bf % Hf
    j = f // GK  # kv head
    rd = pid_d * BD + tl.arange(0, BD)
    d_ok = rd < D
    rf = tl.arange(0, FP)
    f_ok = rf < F
    pos = tl.load(POS)
    par = pos % 2
    if P > 1:
        a_lin = pos - W + 1  # keys out of the window at this step
        waiting = tl.where(a_lin >= 0, a_lin % P, 0)
        do_fold = (a_lin >= 0) & (waiting == P - 1)
    if HAS_VALID:
        valid_new = tl.load(VALID + b) != 0
    else:
        valid_new = b >= 0

    # the current z; the new key's features and value block; the evicted key
    zb = B * Hf * F
    z_vec = tl.load(Z + par * zb + bf * F + rf, mask=f_ok, other=0.0)
    pk_new = tl.load(PK + b * sPK_b + f * sPK_h + rf, mask=f_ok, other=0.0).to(tl.float32)
    pk_store = pk_new  # what the ring keeps for this key (before the padding mask)
    pk_new = tl.where(valid_new, pk_new, 0.0)
    v_new = tl.load(V + b * sV_b + j * sV_h + rd, mask=d_ok, other=0.0).to(tl.float32)
    if W > 0:
        ns = pos % R
    if W > 0 and P == 1:
        ev = (pos + 1) % R
        # the evicted key, loaded now so its latency overlaps the readout (masked by value: no dependent load)
        ev_ok = tl.load(MR + b * R + ev) != 0
        pk_ev = tl.where(ev_ok, tl.load(PKR + ((b * R + ev) * Hf + f) * F + rf, mask=f_ok, other=0.0).to(tl.float32), 0.0)
        v_ev = tl.where(ev_ok, tl.load(VR + ((b * R + ev) * Hkv + j) * D + rd, mask=d_ok, other=0.0).to(tl.float32), 0.0)
    if WINDOW == 0:  # the new key is in the linear set of its own query
        z_vec += pk_new

    if FC > 0:  # S streamed in row chunks, read out by this feature head's QH query heads as each chunk passes
        if QH == 1:
            h = f
            pq = tl.load(PQ + b * sPQ_b + h * sPQ_h + rf, mask=f_ok, other=0.0).to(tl.float32)
            den = tl.sum(pq * z_vec, 0)
        if PREFETCH:
            n_ptrs, n_ok = _s_rows(S, bf, 0, rd, d_ok, F, D, FC)
            s_next = tl.load(n_ptrs, mask=n_ok, other=0.0)
        if QH == 1:
            if WINDOW >= 1:
                acc, l = _window_part(Q, K, V, KR, VR, MR, b, j, h, rd, d_ok, valid_new, v_new, pos, sQ_b, sQ_h, sK_b,
                                      sK_h, scale, Hkv, D, DP, BW, W, R)
            num = tl.zeros([BD], tl.float32)
            if P > 1:
                num, den_w = _waiting_part(pq, PKR, VR, MR, b, f, j, pos, waiting, rf, f_ok, rd, d_ok, Hf, Hkv, F, D,
                                           W, R, P, PW)
                den += den_w
        elif HEADS_DOT:  # the query heads are the rows of dots: den [QHP], window parts [QHP, BD], num [QHP, BD]
            rg = tl.arange(0, QHP)
            g_ok = rg < QH
            pq_all = tl.load(PQ + b * sPQ_b + (f * QH + rg)[:, None] * sPQ_h + rf[None, :],
                             mask=g_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
            den = tl.sum(pq_all * z_vec[None, :], 1)
            if WINDOW >= 1:
                acc, l = _window_heads(Q, K, KR, VR, MR, b, j, f * QH + rg, g_ok, rd, d_ok, valid_new, v_new, pos,
                                       sQ_b, sQ_h, sK_b, sK_h, scale, Hkv, D, DP, BW, W, R, PREC)
            num = tl.zeros([QHP, BD], tl.float32)
            if P > 1:
                num, den_w = _waiting_heads(pq_all, PKR, VR, MR, b, f, j, pos, waiting, rf, f_ok, rd, d_ok, Hf, Hkv, F,
                                            D, W, R, P, PW, PREC)
                den += den_w
        else:  # one row a query head: den [QHP], window parts [QHP, BD], num [QHP, BD]
            rg = tl.arange(0, QHP)
            g_ok = rg < QH
            den = tl.zeros([QHP], tl.float32)
            acc = tl.zeros([QHP, BD], tl.float32)
            l = tl.zeros([QHP], tl.float32)
            num = tl.zeros([QHP, BD], tl.float32)
            for g in tl.static_range(QH):
                pq = tl.load(PQ + b * sPQ_b + (f * QH + g) * sPQ_h + rf, mask=f_ok, other=0.0).to(tl.float32)
                den_g = tl.sum(pq * z_vec, 0)
                if P > 1:
                    num_w, den_w = _waiting_part(pq, PKR, VR, MR, b, f, j, pos, waiting, rf, f_ok, rd, d_ok, Hf, Hkv,
                                                 F, D, W, R, P, PW)
                    num = tl.where(rg[:, None] == g, num_w[None, :], num)
                    den_g += den_w
                den = tl.where(rg == g, den_g, den)
                if WINDOW >= 1:
                    acc_g, l_g = _window_part(Q, K, V, KR, VR, MR, b, j, f * QH + g, rd, d_ok, valid_new, v_new, pos,
                                              sQ_b, sQ_h, sK_b, sK_h, scale, Hkv, D, DP, BW, W, R)
                    acc = tl.where(rg[:, None] == g, acc_g[None, :], acc)
                    l = tl.where(rg == g, l_g, l)
        if W > 0 and P == 1:
            ev_row = ((b * R + ev) * Hf + f) * F
        for c0 in tl.static_range(0, FP, FC):
            rc = c0 + tl.arange(0, FC)
            c_ok = rc < F
            c_ptrs, cd_ok = _s_rows(S, bf, c0, rd, d_ok, F, D, FC)
            if PREFETCH:
                s_c = s_next
                if c0 + FC < FP:
                    n_ptrs, n_ok = _s_rows(S, bf, c0 + FC, rd, d_ok, F, D, FC)
                    s_next = tl.load(n_ptrs, mask=n_ok, other=0.0)
            else:
                s_c = tl.load(c_ptrs, mask=cd_ok, other=0.0)
            if WINDOW <= 1:
                pkn_c = tl.load(PK + b * sPK_b + f * sPK_h + rc, mask=c_ok, other=0.0).to(tl.float32)
                pkn_c = tl.where(valid_new, pkn_c, 0.0)
            if WINDOW == 0:
                s_c += pkn_c[:, None] * v_new[None, :]
            if QH == 1:
                pq_c = tl.load(PQ + b * sPQ_b + h * sPQ_h + rc, mask=c_ok, other=0.0).to(tl.float32)
                num += tl.sum(pq_c[:, None] * s_c, 0)
            elif HEADS_DOT:
                pq_c = tl.load(PQ + b * sPQ_b + (f * QH + rg)[:, None] * sPQ_h + rc[None, :],
                               mask=g_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                num += tl.dot(pq_c, s_c, input_precision=PREC)
            else:
                for g in tl.static_range(QH):
                    pq_c = tl.load(PQ + b * sPQ_b + (f * QH + g) * sPQ_h + rc, mask=c_ok, other=0.0).to(tl.float32)
                    num = tl.where(rg[:, None] == g, num + tl.sum(pq_c[:, None] * s_c, 0)[None, :], num)
            if WINDOW == 1:
                s_c += pkn_c[:, None] * v_new[None, :]
            if P > 1:  # S is written only by the steps that fold
                if do_fold:
                    s_c = _fold_rows(s_c, PKR, VR, MR, b, f, j, pos, rc, c_ok, rd, d_ok, Hf, Hkv, F, D, W, R, P)
                    tl.store(c_ptrs, s_c, mask=cd_ok)
            else:
                if W > 0:
                    pke_c = tl.load(PKR + ev_row + rc, mask=c_ok, other=0.0).to(tl.float32)
                    s_c += tl.where(ev_ok, pke_c, 0.0)[:, None] * v_ev[None, :]
                tl.store(c_ptrs, s_c, mask=cd_ok)
        if QH == 1:
            if WINDOW >= 1:
                gam = _gamma(GAMMA, h, GAMMA_LOGIT)
                num += gam * acc
                den += gam * l
            y = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
            tl.store(Y + b * sY_b + h * sY_h + rd, y.to(Y.dtype.element_ty), mask=d_ok)
        else:
            if WINDOW >= 1:
                gam = tl.where(g_ok, _gamma(GAMMA, f * QH + rg, GAMMA_LOGIT, g_ok), 0.0)
                num += gam[:, None] * acc
                den += gam * l
            y = tl.where(den[:, None] > 0, num / tl.where(den > 0, den, 1.0)[:, None], 0.0)
            tl.store(Y + b * sY_b + (f * QH + rg)[:, None] * sY_h + rd[None, :], y.to(Y.dtype.element_ty),
                     mask=g_ok[:, None] & d_ok[None, :])
    else:  # S[b, f, :, block] in registers once, read out by the QH query heads of this feature head
        s_ptrs = S + bf * F * D + rf[:, None] * D + rd[None, :]
        sd_ok = f_ok[:, None] & d_ok[None, :]
        s_tile = tl.load(s_ptrs, mask=sd_ok, other=0.0)
        if WINDOW == 0:
            s_tile += pk_new[:, None] * v_new[None, :]
        for g in tl.static_range(QH):
            h = f * QH + g
            pq = tl.load(PQ + b * sPQ_b + h * sPQ_h + rf, mask=f_ok, other=0.0).to(tl.float32)
            num = tl.sum(pq[:, None] * s_tile, 0)  # [BD]
            den = tl.sum(pq * z_vec, 0)
            if P > 1:
                num_w, den_w = _waiting_part(pq, PKR, VR, MR, b, f, j, pos, waiting, rf, f_ok, rd, d_ok, Hf, Hkv, F, D,
                                             W, R, P, PW)
                num += num_w
                den += den_w
            if WINDOW >= 1:
                acc, l = _window_part(Q, K, V, KR, VR, MR, b, j, h, rd, d_ok, valid_new, v_new, pos, sQ_b, sQ_h, sK_b,
                                      sK_h, scale, Hkv, D, DP, BW, W, R)
                gam = _gamma(GAMMA, h, GAMMA_LOGIT)
                num += gam * acc
                den += gam * l
            y = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
            tl.store(Y + b * sY_b + h * sY_h + rd, y.to(Y.dtype.element_ty), mask=d_ok)
        # After the readout: the key that leaves the window joins the sums.
        if WINDOW == 1:
            s_tile += pk_new[:, None] * v_new[None, :]
        if P > 1:  # S is written only by the steps that fold
            if do_fold:
                s_tile = _fold_rows(s_tile, PKR, VR, MR, b, f, j, pos, rf, f_ok, rd, d_ok, Hf, Hkv, F, D, W, R, P)
                tl.store(s_ptrs, s_tile, mask=sd_ok)
        else:
            if W > 0:
                s_tile += pk_ev[:, None] * v_ev[None, :]
            tl.store(s_ptrs, s_tile, mask=sd_ok)

    if WINDOW == 1:
        z_vec += pk_new
    if P > 1:
        if do_fold:
            z_vec = _fold_z(z_vec, PKR, MR, b, f, pos, rf, f_ok, Hf, F, W, R, P)
    elif W > 0:
        z_vec += pk_ev
    if pid_d == 0:
        tl.store(Z + (1 - par) * zb + bf * F + rf, z_vec, mask=f_ok)

    # The new key into the free slot (no program of this launch reads that slot).
    if W > 0:
        if f % GK == 0:
            k_blk = tl.load(K + b * sK_b + j * sK_h + rd, mask=d_ok, other=0.0)
            kv_off = ((b * R + ns) * Hkv + j) * D + rd
            tl.store(KR + kv_off, k_blk.to(KR.dtype.element_ty), mask=d_ok)
            tl.store(VR + kv_off, v_new.to(VR.dtype.element_ty), mask=d_ok)
        if pid_d == 0:
            tl.store(PKR + ((b * R + ns) * Hf + f) * F + rf, pk_store.to(PKR.dtype.element_ty), mask=f_ok)
            if f == 0:
                tl.store(MR + b * R + ns, valid_new.to(tl.uint8))


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def default_block_d(B: int, Hf: int, D: int) -> int:
    """Value-block width: the whole head (at most 128 columns), so the window scores and the maps are computed
    once per (sequence, feature head), not once per block. Measured (``benchmarks/tune_decode.py``, H200,
    B 64, CUDA graph, cold state): SmolLM2 (Hf 9, D 64, F 128) 21.1 us at BD 64 against 23.1 at BD 32 and
    24.2 at BD 16; per-KV-head key maps (Hf 3) 17.2 against 24.3 at BD 16; B 64, H 16, D F 128: 69.7 us at
    BD 128 against 80.7 at BD 32."""
    return min(_pow2(D), 128)


def default_block_w(W: int, D: int, heads_dot: bool = False, FC: int = 0) -> int:
    """Window block: ring slots loaded per iteration of the window loop, a [BW, D] key tile of at most 4096
    elements (16 to the ring's slots). 16 with ``heads_dot`` (the dots' smallest side): Llama-3.1-8B's heads with
    key maps per KV head (D = F = 128, fold 8, FC 64, 2 warps) took 36.3 us at BW 16 against 39.3 at BW 32, and
    36.6 against 39.4 on a second H100 (``benchmarks/tune_decode.py``, 2026-12-06; sm_90: 8 spill bytes a thread
    instead of 32, 35 KB of shared memory instead of 51). With S in row chunks (``FC``) at most 32, the 1-warp
    launches' block (``default_num_warps``): the issue-5 heads (16-row chunks) 45.0 us against 47.3 at BW 16 (H100,
    2026-12-06); SmolLM2's and Qwen2.5's heads (D 64, FC 64) 21.6 and 29.0 us against 22.0 and 29.7 at BW 64 (H100,
    2026-12-07, fold 1, ``benchmarks/results/tune-decode-nvidia-h100-80gb-hbm3-20261207-030825``)."""
    if heads_dot:
        return max(1, min(_pow2(W), 16))
    cap = max(4096 // _pow2(D), 16)
    return max(1, min(_pow2(W), min(cap, 32) if FC else cap))


def default_chunk_rows(F: int, D: int, BD: int, per_query_features: bool) -> int:
    """Feature rows of S a program streams at a time (0: it holds its S slice whole).

    64 where measured faster (``benchmarks/tune_decode.py``, B=64), F > 64 and one value block per head:
    - key features per query head (H200, 2026-12-04): SmolLM2 (D 64, F 128) 21.6 -> 18.6 us, the issue-5 shape
      (D = F = 128) 68.7 -> 54.8 us, both at 2 warps (``default_num_warps``);
    - key features per KV head read out by 4 query heads a program (Llama-3.1-8B's heads, D = F = 128; H200,
      2026-12-05): 72.3 us whole at 4 warps -> 45.8 us at FC 64 and 2 warps. Narrower heads shared by several
      query heads (SmolLM2's per KV head: D 64) were not swept in the chunked form, so they keep S whole.
    Head dim 256 (Gemma 3: two value blocks) was not swept in the chunked form either, so it keeps S whole.

    16 where key features per query head fill 128-column heads (the issue-5 shape, D = F = 128), at 1 warp
    (``default_num_warps``) and 32-slot window blocks. H100, ``benchmarks/tune_decode.py --fold 8`` (2026-12-06,
    B 64, CUDA graph): the issue-5 heads 45.0 us against 57.0 at FC 64 / 2 warps (FC 16 at 2 warps: 50.0 with BW
    16, 60.0 with BW 32; FC 64 at 1 warp: 51.4); Llama-3.1-8B's heads with key maps per query head 73.0 against
    94.3. On sm_90 that program holds 206 registers with no spills, so 9 fit an SM and the issue-5 heads' 1,024
    programs run in one wave on an H100's 132 SMs (at FC 64 and 2 warps: 235 registers, 4 an SM, two waves)."""
    if _pow2(F) > 64 and BD == _pow2(D) and (per_query_features or BD >= 128):
        return 16 if per_query_features and BD == 128 and _pow2(F) == 128 else 64
    return 0


#: ``LINEARIZE_DECODE_PREFETCH=1`` / ``0`` (read at import) forces ``default_prefetch`` on / off, to time whole
#: decode steps either way
_PREFETCH_ENV = os.environ.get("LINEARIZE_DECODE_PREFETCH")


def default_prefetch(FC: int, BD: int = 64, num_warps: int = 2) -> bool:
    """Each S chunk's load issued one step ahead (``_decode_kernel``'s PREFETCH) where S streams in row chunks
    (``FC``), the value block is at most 64 columns and the launch has 2 or more warps. H100,
    ``benchmarks/tune_decode.py`` (2026-12-05, B 64, 2 warps): Qwen2.5's heads (D 64, F 128) 35.3 -> 30.7 us, its
    whole compiled step 2.021 -> 1.947 ms (2026-12-07: 35.5 -> 30.2 us again, but SmolLM2's 22.6 -> 25.2). At 1 warp,
    these heads' default since 2026-12-07, it was slower at both (FC 64, BW 32: SmolLM2 21.6 -> 25.1 us, Qwen2.5
    29.0 -> 34.5). At the issue-5 shape (BD = D = F = 128) it was slower too (FC 64: 69.1 -> 83.2 us), so 128-column
    blocks keep the plain loop."""
    if _PREFETCH_ENV in ("0", "1"):
        return bool(FC) and _PREFETCH_ENV == "1"
    return bool(FC) and BD <= 64 and num_warps >= 2


def _ring_launch_env() -> tuple[int | None, int | None]:
    """``LINEARIZE_DECODE_LAUNCH=WARPS,BW`` (read at import): warps (1, 2, 4 or 8) and window block (a power of two) of
    ``ring_step_triton``'s default launch, to time whole decode steps at another launch than the default (with
    ``LINEARIZE_DECODE_PREFETCH``)."""
    return launch_env("LINEARIZE_DECODE_LAUNCH", "warps,block_w", "2,64",
                      lambda w, bw: w in (1, 2, 4, 8) and bw >= 1 and not bw & (bw - 1))


_WARPS_ENV, _BW_ENV = _ring_launch_env()


#: ``LINEARIZE_DECODE_HEADS_DOT=1`` / ``0`` (read at import) forces ``default_heads_dot`` on / off where it applies,
#: to time whole decode steps either way
_HEADS_DOT_ENV = os.environ.get("LINEARIZE_DECODE_HEADS_DOT")


def default_heads_dot(FC: int, several_query_heads: bool) -> bool:
    """``_decode_kernel``'s HEADS_DOT wherever it applies (S in row chunks, several query heads a feature head).
    H100, ``benchmarks/tune_decode.py`` (2026-12-06, B 64, CUDA graph): Llama-3.1-8B's heads with key maps per KV
    head (4 query heads a program, FC 64, 2 warps) 52.0 -> 43.4 us, and 39.6 with deferred folding (fold 8)."""
    if _HEADS_DOT_ENV in ("0", "1"):
        return bool(FC) and several_query_heads and _HEADS_DOT_ENV == "1"
    return bool(FC) and several_query_heads


def default_num_warps(FP: int, BD: int, FC: int = 0, heads_dot: bool = False) -> int:
    """With S streamed in row chunks (``FC``; the smaller live slice needs fewer threads: 4 warps were 7-14% slower
    than 2, 8 warps 40-50%): 1 warp for 16-row chunks of 128-column heads (the issue-5 heads' default,
    ``default_chunk_rows``: 45.0 us against 50.0 at 2 warps) and for value blocks of at most 64 columns (SmolLM2's
    and Qwen2.5's heads, FC 64: H100 2026-12-07, fold 1, 21.6 and 29.0 us at 1 warp, BW 32, no prefetch against 25.2
    and 30.2 at their former 2 warps, BW 64, prefetch; ``benchmarks/results/tune-decode-nvidia-h100-80gb-hbm3-
    20261207-030825``; the whole compiled step at B 64 x 4096, H100 2026-12-07: SmolLM2 1.517 -> 1.414 ms, Qwen2.5
    1.750 -> 1.720, ``generate-nvidia-h100-80gb-hbm3-20261207-08*``); 2 elsewhere, and where the heads are dot rows (1 warp never timed so). Holding S whole: 4
    warps (fastest at every measured shape: 8 was 20-40% slower), 8 once the S slice passes 128 fp32 registers a
    thread at 4 (F x BD > 16384: head dim 256 with 256 features), which would spill."""
    if FC:
        return 1 if ((FC == 16 and BD == 128) or BD <= 64) and not heads_dot else 2
    return 4 if FP * BD <= 16384 else 8


# A custom op, so that torch.compile (linearize.CompiledDecode) treats the launch as one opaque call that
# mutates the ring, instead of lowering the Triton kernel itself: inductor 2.11 failed on that lowering
# twice on the H200 (2026-12-03: the bool mask's dtype view, then an error in its compile subprocess).
@torch.library.custom_op(
    "linearize::ring_step_v2",
    mutates_args=("S", "z", "kr", "vr", "pkr", "mask", "pos", "out"),
)
def _ring_step_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: torch.Tensor, phi_k: torch.Tensor,
    valid: torch.Tensor | None, gamma: torch.Tensor,
    S: torch.Tensor, z: torch.Tensor, kr: torch.Tensor, vr: torch.Tensor, pkr: torch.Tensor,
    mask: torch.Tensor, pos: torch.Tensor, out: torch.Tensor,
    scale: float, window: int, Hkv: int, BD: int, BW: int, num_warps: int, FC: int = 0, prefetch: bool = False,
    heads_dot: bool = False, gamma_logit: bool = False,
) -> None:
    """One kernel launch; the shapes are checked by ``ring_step_triton``. Writes y to ``out``. ``gamma`` [H]:
    the window weights, or (``gamma_logit``) their logits."""
    B, _, H, D = q.shape
    Hf, F = pkr.shape[2], pkr.shape[3]
    R = kr.shape[1]  # ring slots: the window's W and the P - 1 of deferred folding
    W = ring_slots(window)
    P = R - W + 1 if W else 1
    DP, FP = _pow2(D), _pow2(F)
    ND = -(-D // BD)
    G, Gk = H // Hkv, Hf // Hkv
    QH = G // Gk
    heads_dot = bool(heads_dot and FC and QH > 1)
    has_valid = valid is not None
    # the waiting keys read in blocks of PW: all at once in the dots (which need 16 rows), else 4 at a time (sm_90:
    # SmolLM2 spilled 224 B a thread with all 15 of fold 16 at once, none in blocks of 4)
    PW = max(_pow2(P - 1), 16) if heads_dot else min(_pow2(P - 1), 4)
    _decode_kernel[(B * Hf * ND,)](
        q, k, v, phi_q, phi_k, valid if has_valid else gamma, gamma,
        S, z, kr, vr, pkr, mask.view(torch.uint8), pos,
        out,
        q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
        phi_q.stride(0), phi_q.stride(2), phi_k.stride(0), phi_k.stride(2), out.stride(0), out.stride(2),
        B, Hf, Hkv, scale,
        D=D, F=F, DP=DP, FP=FP, BD=BD, ND=ND, BW=max(BW, 16) if heads_dot else BW,
        QH=QH, GK=Gk, WINDOW=min(window, 2), W=W, HAS_VALID=has_valid, FC=FC, PREFETCH=bool(FC and prefetch),
        QHP=max(_pow2(QH), 16) if heads_dot else _pow2(QH), HEADS_DOT=heads_dot,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", R=R, P=P, PW=PW, GAMMA_LOGIT=gamma_logit,
        num_warps=num_warps,
    )


@_ring_step_op.register_fake
def _(q, k, v, phi_q, phi_k, valid, gamma, S, z, kr, vr, pkr, mask, pos, out, scale, window, Hkv, BD, BW, num_warps, FC=0,
      prefetch=False, heads_dot=False, gamma_logit=False):
    return None


def ring_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    ring: RingState,
    *,
    window_weight: float | torch.Tensor | None = None,
    window_logit: torch.Tensor | None = None,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_d: int | None = None,
    block_w: int | None = None,
    num_warps: int | None = None,
    chunk_rows: int | None = None,
    prefetch: bool | None = None,
    heads_dot: bool | None = None,
    advance: bool = True,
) -> torch.Tensor:
    """The Triton twin of ``ring_step_torch``: y [B,1,H,D] in q's dtype, ``ring`` advanced in place (its ``pos``
    left to the caller with ``advance`` False, as ``ring_step_torch``).

    The window weight gamma is ``window_weight`` or ``sigmoid(window_logit)`` (exactly one given): a module passes
    its logits (a tensor [H] or one value), so that the sigmoid runs inside the launch instead of as a kernel of
    its own before it (one launch a layer of a compiled decode step).
    ``out`` (optional, [B,1,H,D] in q's dtype) receives y, so that a captured graph has a fixed output.
    ``block_d``/``block_w``/``num_warps``/``chunk_rows`` override the launch configuration (benchmarks,
    tuning; ``LINEARIZE_DECODE_LAUNCH`` sets the default warps and window block). ``chunk_rows`` (a power of two >= 16): stream each program's S slice in chunks of that many feature
    rows instead of holding it whole (0). ``prefetch`` (with chunks): issue each chunk's load one step ahead
    (``_decode_kernel``'s PREFETCH; default ``default_prefetch``). ``heads_dot`` (with chunks, where one key-feature
    head serves several query heads): those heads as the rows of tensor-core dots, tf32 for half-precision inputs
    (``_decode_kernel``'s HEADS_DOT; default ``default_heads_dot``).
    """
    d = check_ring(ring, q, k, v, phi_q, phi_k)
    if ring.S.dtype != torch.float32 or ring.z.dtype != torch.float32:
        raise ValueError(f"the decode kernel keeps the sums in float32; got S {ring.S.dtype}, z {ring.z.dtype}")
    if ring.k.dtype != k.dtype or ring.v.dtype != v.dtype or ring.phi_k.dtype != phi_k.dtype:
        raise ValueError(
            f"ring dtypes (k {ring.k.dtype}, phi_k {ring.phi_k.dtype}) must match the step's inputs (k {k.dtype}, phi_k {phi_k.dtype})"
        )
    if d.D > 256 or d.F > 256:
        raise ValueError(f"the decode kernel supports head dim and feature dim up to 256; got D={d.D}, F={d.F}")
    for name, t in (("S", ring.S), ("z", ring.z), ("k", ring.k), ("v", ring.v), ("phi_k", ring.phi_k), ("mask", ring.mask)):
        if not t.is_contiguous():
            raise ValueError(f"ring {name} must be contiguous")
    q, k, v, phi_q, phi_k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, phi_q, phi_k))
    if (window_weight is None) == (window_logit is None):
        raise ValueError("ring_step_triton takes one of window_weight and window_logit")
    if window_logit is not None:  # in its own dtype: the kernel takes the sigmoid in fp32
        if not torch.is_tensor(window_logit):
            raise ValueError(f"window_logit must be a tensor; got {type(window_logit).__name__}")
        gamma = window_weight_vector(window_logit, d.H, window_logit.dtype, q.device).contiguous()
    else:
        gamma = window_weight_vector(window_weight, d.H, torch.float32, q.device).contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    valid = None
    if attention_mask is not None:
        if attention_mask.shape != (d.B, 1):
            raise ValueError(f"attention_mask must be [B, 1] = [{d.B}, 1]; got {tuple(attention_mask.shape)}")
        valid = attention_mask.reshape(d.B).to(torch.uint8)

    W = ring.slots
    BD = block_d or default_block_d(d.B, d.Hf, d.D)
    FC = default_chunk_rows(d.F, d.D, BD, d.Hf == d.H) if chunk_rows is None else chunk_rows
    if FC:
        if FC < 16 or FC & (FC - 1) or FC > _pow2(d.F):
            raise ValueError(f"chunk_rows must be 0 or a power of two in [16, {_pow2(d.F)}]; got {FC}")
    several = d.Hf < d.H  # one key-feature head serves several query heads
    dots_fit = min(BD, _pow2(d.D)) >= 16  # tl.dot's smallest side
    if heads_dot and not (FC and several):
        raise ValueError("heads_dot needs chunk_rows > 0 and key maps per KV head (several query heads a feature head)")
    if heads_dot and not dots_fit:
        raise ValueError(f"heads_dot needs value blocks and a head dim of at least 16 (dots); got block {BD}, D={d.D}")
    dot = (default_heads_dot(FC, several) and dots_fit) if heads_dot is None else heads_dot
    BW = block_w or _BW_ENV or default_block_w(W, d.D, dot, FC)
    warps = num_warps or _WARPS_ENV or default_num_warps(_pow2(d.F), BD, FC, dot)
    _ring_step_op(
        q, k, v, phi_q, phi_k, valid, gamma,
        ring.S, ring.z, ring.k, ring.v, ring.phi_k, ring.mask, ring.pos, out,
        float(default_scale(scale, d.D)), ring.window, d.Hkv, BD, BW, warps, FC,
        default_prefetch(FC, BD, warps) if prefetch is None else prefetch, dot, window_logit is not None,
    )
    if advance:
        ring.pos.add_(1)
    return out


def random_decode_problem(
    B: int,
    H: int,
    Hkv: int,
    D: int,
    F: int,
    window: int,
    *,
    per_q_features: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    filled: int | None = None,
    seed: int = 0,
    fold: int | None = None,
) -> tuple[tuple[torch.Tensor, ...], RingState, torch.Tensor]:
    """Random step inputs (q, k, v, phi_q, phi_k), a ring with a full random tail, and gamma [H].

    For benchmarks and tests: ``y = ring_step_triton(*inputs, ring, window_weight=gamma)``. The tail
    holds ``filled`` keys (default: full, ``window - 1``) and random fp32 sums; nothing is zero. ``fold``: the
    ring's deferred folding (``RingState.fold``; default ``default_fold``, what ``generate`` gets)
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    Hf = H if per_q_features else Hkv
    L = max(window - 1, 0) if filled is None else filled

    def rnd(*shape, positive=False):
        x = torch.rand(*shape, generator=g) + 0.01 if positive else torch.randn(*shape, generator=g)
        return x.to(device=device, dtype=dtype)

    inputs = (rnd(B, 1, H, D), rnd(B, 1, Hkv, D), rnd(B, 1, Hkv, D), rnd(B, 1, H, F, positive=True), rnd(B, 1, Hf, F, positive=True))
    state = HybridState(
        S=(torch.rand(B, Hf, F, D, generator=g) * 4).to(device),
        z=(torch.rand(B, Hf, F, generator=g) * 4 + 1).to(device),
        k=rnd(B, L, Hkv, D),
        v=rnd(B, L, Hkv, D),
        phi_k=rnd(B, L, Hf, F, positive=True),
        mask=torch.ones(B, L, dtype=torch.bool, device=device),
    )
    gamma = (torch.rand(H, generator=g) * 0.9 + 0.05).to(device)
    return inputs, ring_from_state(state, window, fold), gamma
