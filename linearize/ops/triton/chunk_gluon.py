"""The split forward's block kernel written in Gluon for Hopper (sm_90): ``fwd_blocks_kernel``'s outputs from
warpgroup MMA (wgmma) tiles whose layouts are chosen here rather than by Triton.

Why (benchmarks/NOTES-chunk.md, "Why the block kernels wait"): Triton gives ``fwd_blocks_kernel``'s chained products
on blocks of 32 rows one mma.sync layout with warps [1, 4], so every score tile reaches the next product through
shared memory and every row statistic (the window max, both sums) is a reduction across warps; on blocks of 64 rows,
where Triton does use wgmma, its live set spills. Here one warpgroup (4 warps) takes a block of 64 queries and every
fp32 tile is in wgmma's accumulator layout, in which each warp owns 16 whole rows: a row's max and sums stay within
its warp, and a score tile becomes the next product's A operand in registers (FlashAttention-3's form). q, phi_q,
the key tiles and the chunk sums sit in shared memory, where wgmma reads them (the key tiles copied there by cp.async,
which holds no registers), so the registers hold only the two [64, BV] accumulators and one score tile at a time.
sm_90 compile: 255 registers a thread at D = F = BV = 128, 229 at BV = 64, 219 at SmolLM2's heads, no spill, 80 KB of
shared memory: two programs an SM.

Same math, masks, regions and outputs as ``chunk_kernels.fwd_blocks_kernel`` (see its docstring and the module
notation there); the launcher (``chunk._chunk_forward``) picks this kernel with ``LaunchConfig.gluon_fwd`` where
``supported`` says it can run, else the Triton one. Gluon has no CPU interpreter: CPU tests compile it for sm_90
(tests/ops/test_chunk_gluon_compile.py) and the GPU tests compare its outputs with the reference and with the
Triton kernel's (tests/gpu/test_chunk_cuda.py -k gluon).
"""

from __future__ import annotations

import torch

from .chunk_kernels import LENGTH_ARGS

try:  # (Gluon ships with Triton >= 3.5; the rest of the package works without it)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import async_copy, fence_async_shared, warpgroup_mma
except ImportError:  # pragma: no cover - older Triton
    gluon = None

#: Rows a program takes: one warpgroup's wgmma tile.
BLOCK = 64
WARPS = 4


def supported(q: torch.Tensor, D: int, F: int, BV: int, C: int, *tensors: torch.Tensor) -> bool:
    """Whether the Gluon kernels can take this launch: Gluon present, a Hopper GPU (wgmma), 16-bit inputs, the state
    chunk C one block of 64, head and feature dims (padded) and the value block at most 128 (the registers and
    shared memory of two programs an SM), and ``tensors`` (the rows the kernels copy with cp.async) 16-byte aligned
    rows: 16-byte copies need them, and a shorter copy than 4 bytes does not exist."""
    if gluon is None or q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    aligned = all(t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in t.stride()[:-1]) for t in (q, *tensors))
    return aligned and C == BLOCK and max(D, F, BV) <= 128 and D % 8 == 0 and F % 8 == 0


if gluon is not None:

    @gluon.jit
    def _tile(ptr, rows, row_ok, stride_t, cols, ncols):
        """[len(rows), len(cols)] tile of a [.., T, .., X] tensor (last dim contiguous) in the layout of rows / cols;
        0 outside."""
        return gl.load(ptr + rows[:, None] * stride_t + cols[None, :],
                       mask=row_ok[:, None] & (cols[None, :] < ncols), other=0.0)

    @gluon.jit
    def _to_shared(x, layout: gl.constexpr):
        """x in shared memory for wgmma, visible to it (the async proxy) from every warp of the program."""
        s = gl.allocate_shared_memory(x.dtype, x.shape, layout, x)
        fence_async_shared()
        gl.thread_barrier()
        return s

    @gluon.jit
    def _copy_key_block(k_s, v_s, pk_s, Kb, Vb, PKb, M, b, sM_b, e, T, sK_t, sV_t, sPK_t, cd, cv, cf, D, F, do_k, do_pk,
                        HAS_MASK: gl.constexpr):
        """Key rows e's k (do_k), v and phi_k (do_pk) tiles into their shared buffers, straight from global memory
        (cp.async, zero-filled where masked: no registers held for the tiles), waited for and visible to wgmma from
        every warp. Waits first for every warp to be done with the buffers' previous tiles."""
        ok = e < T
        if HAS_MASK:
            ok = ok & (gl.load(M + b * sM_b + e, mask=ok, other=0) != 0)
        gl.thread_barrier()
        rows_ok = ok[:, None]
        if do_k:
            async_copy.async_copy_global_to_shared(k_s, Kb + e[:, None] * sK_t + cd[None, :],
                                                   mask=rows_ok & (cd[None, :] < D))
        async_copy.async_copy_global_to_shared(v_s, Vb + e[:, None] * sV_t + cv[None, :],
                                               mask=rows_ok & (cv[None, :] < D))
        if do_pk:
            async_copy.async_copy_global_to_shared(pk_s, PKb + e[:, None] * sPK_t + cf[None, :],
                                                   mask=rows_ok & (cf[None, :] < F))
        async_copy.commit_group()
        async_copy.wait_group(0)
        fence_async_shared()
        gl.thread_barrier()

    @gluon.jit
    def _steps(j_lo, j_both, j_near, j_hi, q_s, pq_s, k_s, v_s, pk_s, Kb, Vb, PKb, M, b, sM_b, tr, W, T, scale, sK_t,
               sV_t, sPK_t, rk, cd, cv, cf, D, F, acc_w, acc_l, l_w, l_l, m_i, arg, C: gl.constexpr,
               HAS_MASK: gl.constexpr, mma: gl.constexpr, opa: gl.constexpr):
        """``chunk_kernels._fwd_window`` over key blocks j_lo <= j < j_hi: the near keys' linear terms where
        j < j_near and the window's online softmax where j >= j_both (``_key_regions``; the part a block has no
        pair for is neither loaded nor computed). One loop with the parts under branches, where the Triton kernel
        runs three loops (for its software pipeliner, which Gluon does not have): three loops' hoisted address
        tiles held at once spilled 224 B a thread (sm_90, D = F = 128), one loop none of its own."""
        col: gl.constexpr = gl.SliceLayout(0, mma)
        for j in range(j_lo, j_hi):
            do_win = j >= j_both
            do_lin = j < j_near
            _copy_key_block(k_s, v_s, pk_s, Kb, Vb, PKb, M, b, sM_b, j * C + rk, T, sK_t, sV_t, sPK_t, cd, cv, cf, D, F,
                            do_win, do_lin, HAS_MASK)
            cc = gl.arange(0, C, layout=col)
            ec = j * C + cc
            # Keys past the end need no mask of their own: for the rows that are stored (t < T <= e) t - e < 0, in
            # neither set. (A [C] mask held for them cost 16 registers a thread.)
            if HAS_MASK:
                k_ok = gl.load(M + b * sM_b + ec, mask=ec < T, other=0) != 0
            # the masks from the row and column positions where they are used, not held as [C, C] tiles
            e2 = ec[None, :]
            zero = gl.zeros([C, C], gl.float32, mma)
            # (the linear part first: its tiles are dead before the window's are formed; the other order spilled)
            if do_lin:
                a = warpgroup_mma(pq_s, pk_s.permute((1, 0)), zero, use_acc=False)
                lin = e2 <= (tr - W)[:, None]  # t - e >= W
                if HAS_MASK:
                    lin = lin & k_ok[None, :]
                a = gl.where(lin, a, 0.0)
                l_l = l_l + gl.sum(a, 1)
                acc_l = warpgroup_mma(gl.convert_layout(a.to(v_s.dtype), opa), v_s, acc_l)
            if do_win:
                sc = warpgroup_mma(q_s, k_s.permute((1, 0)), zero, use_acc=False)
                # masked to -inf in place, so exp(sc - m) is 0 outside the window: one score tile live, not two
                win = (e2 <= tr[:, None]) & (e2 > (tr - W)[:, None])  # 0 <= t - e < W
                if HAS_MASK:
                    win = win & k_ok[None, :]
                sc = gl.where(win, sc * scale, float("-inf"))
                tmax = gl.max(sc, 1)
                # the first key of the row's max (tl.argmax's tie-break)
                targ = gl.min(gl.where(sc == tmax[:, None], cc[None, :], C), 1) + j * C
                m_new = gl.maximum(m_i, tmax)
                arg = gl.where(tmax > m_i, targ, arg)
                m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = gl.exp(m_i - m_safe)
                p = gl.exp(sc - m_safe[:, None])
                l_w = l_w * alpha + gl.sum(p, 1)
                acc_w = warpgroup_mma(gl.convert_layout(p.to(v_s.dtype), opa), v_s, acc_w * alpha[:, None])
                m_i = m_new
        return acc_w, acc_l, l_w, l_l, m_i, arg

    # (unspecialized on the lengths, as the Triton forward kernels are: chunk_kernels.LENGTH_ARGS)
    @gluon.jit(do_not_specialize=LENGTH_ARGS)
    def fwd_blocks_wgmma_kernel(
        Q, K, V, PQ, PK, M, GAMMA, CS, CZ, PRE_S, PRE_Z, Y, U, MAX, DEN, ARG,
        sQ_b, sQ_t, sQ_h, sK_b, sK_t, sK_h, sV_b, sV_t, sV_h, sPQ_b, sPQ_t, sPQ_h, sPK_b, sPK_t, sPK_h,
        sY_b, sY_t, sY_h, sM_b,
        B, T, H, Hf, Gk, GQ, n_chunks, n_per, nwin, W, scale, Cs,
        D: gl.constexpr, F: gl.constexpr, BD: gl.constexpr, BF: gl.constexpr, BV: gl.constexpr, C: gl.constexpr,
        HAS_MASK: gl.constexpr, PREC: gl.constexpr, STORE_U: gl.constexpr, SKIP: gl.constexpr = False,
        LOCAL: gl.constexpr = False,
    ):
        """``chunk_kernels.fwd_blocks_kernel`` (same arguments; C = Cs = 64 rows a program, 4 warps; PREC unused:
        16-bit inputs only)."""
        gl.static_assert(C == 64, "one warpgroup's wgmma tile: blocks of 64 rows")
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
        opa: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # 16-byte loads along a row
        row: gl.constexpr = gl.SliceLayout(1, mma)
        brow: gl.constexpr = gl.SliceLayout(1, blk)
        bcol: gl.constexpr = gl.SliceLayout(0, blk)
        dt: gl.constexpr = Q.dtype.element_ty
        sl_d: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, BD], dt)
        sl_f: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, BF], dt)
        sl_v: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, BV], dt)
        sl_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BF, BV], dt)

        i = gl.program_id(0)
        bh = gl.program_id(1)
        iv = gl.program_id(2)
        b = bh // H
        h = bh % H
        hf = h // GQ
        hk = hf // Gk
        c = i * C // Cs
        rk = gl.arange(0, C, layout=brow)
        cd = gl.arange(0, BD, layout=bcol)
        cf = gl.arange(0, BF, layout=bcol)
        cv = iv * BV + gl.arange(0, BV, layout=bcol)
        tb = i * C + rk
        pq = _tile(PQ + b * sPQ_b + h * sPQ_h, tb, tb < T, sPQ_t, cf, F)
        q_s = _to_shared(_tile(Q + b * sQ_b + h * sQ_h, tb, tb < T, sQ_t, cd, D), sl_d)
        pq_s = _to_shared(pq, sl_f)

        # The keys before the window's chunks, through the chunk's sums (and its segment's prefix): taken first, so
        # that their shared tiles are free again for the key blocks.
        base = (c * B + b) * Hf + hf
        rs = gl.arange(0, BF, layout=brow)
        s_ok = (rs[:, None] < F) & (cv[None, :] < D)
        z = gl.load(CZ + base * F + cf, mask=cf < F, other=0.0)
        S_s = _to_shared(gl.load(CS + base * F * D + rs[:, None] * D + cv[None, :], mask=s_ok, other=0.0).to(dt), sl_s)
        acc_l = warpgroup_mma(pq_s, S_s, gl.zeros([C, BV], gl.float32, mma), use_acc=False)
        if LOCAL:
            pbase = ((c // n_per) * B + b) * Hf + hf
            z += gl.load(PRE_Z + pbase * F + cf, mask=cf < F, other=0.0)
            P_s = _to_shared(gl.load(PRE_S + pbase * F * D + rs[:, None] * D + cv[None, :], mask=s_ok,
                                     other=0.0).to(dt), sl_s)
            acc_l = warpgroup_mma(pq_s, P_s, acc_l)
        l_l = gl.convert_layout(gl.sum(pq.to(gl.float32) * z[None, :], 1), row)

        tr = i * C + gl.arange(0, C, layout=row)
        m_i = gl.full([C], float("-inf"), gl.float32, row)
        l_w = gl.zeros([C], gl.float32, row)
        arg = gl.zeros([C], gl.int32, row)
        acc_w = gl.zeros([C, BV], gl.float32, mma)
        k_s = gl.allocate_shared_memory(dt, [C, BD], sl_d)
        v_s = gl.allocate_shared_memory(dt, [C, BV], sl_v)
        pk_s = gl.allocate_shared_memory(dt, [C, BF], sl_f)
        Kb = K + b * sK_b + hk * sK_h
        Vb = V + b * sV_b + hk * sV_h
        PKb = PK + b * sPK_b + hf * sPK_h
        j_lo = gl.maximum((c - nwin) * (Cs // C), 0)
        j_both = j_lo
        j_near = i + 1
        if SKIP:  # chunk_kernels._key_regions
            j_both = gl.minimum(gl.maximum(i - (W + C - 2) // C, j_lo), i + 1)
            j_near = gl.minimum(gl.maximum(i - W // C + 1, j_both), i + 1)
        acc_w, acc_l, l_w, l_l, m_i, arg = _steps(
            j_lo, j_both, j_near, i + 1, q_s, pq_s, k_s, v_s, pk_s, Kb, Vb, PKb, M, b, sM_b, tr, W, T, scale, sK_t,
            sV_t, sPK_t, rk, cd, cv, cf, D, F, acc_w, acc_l, l_w, l_l, m_i, arg, C, HAS_MASK, mma, opa)

        # chunk_kernels._fwd_store, in the accumulators' layout
        gam = gl.load(GAMMA + h)
        den = gam * l_w + l_l
        ok = den > 0
        y = gl.where(ok[:, None], (gam * acc_w + acc_l) / gl.where(ok, den, 1.0)[:, None], 0.0)
        # Stored from the load layout (16-byte vectors along a row): from the accumulators' layout a warp's store
        # would touch 8 rows 4 bytes a thread; Gluon does not coalesce stores itself, as Triton does.
        out_ok = (tb[:, None] < T) & (cv[None, :] < D)
        off = b * sY_b + h * sY_h + tb[:, None] * sY_t + cv[None, :]
        gl.store(Y + off, gl.convert_layout(y.to(dt), blk), mask=out_ok)
        if STORE_U:
            inv2 = gl.where(ok, 1.0 / gl.where(ok, den * den, 1.0), 0.0)
            u = (acc_w * l_l[:, None] - l_w[:, None] * acc_l) * inv2[:, None]
            gl.store(U + off, gl.convert_layout(u.to(dt), blk), mask=out_ok)
        t_ok = tr < T
        if iv == 0:
            r = (b * H + h) * T + tr
            gl.store(MAX + r, gl.where(m_i == float("-inf"), 0.0, m_i), mask=t_ok)
            gl.store(DEN + r, den, mask=t_ok)
            gl.store(ARG + r, arg, mask=t_ok)

    @gluon.jit
    def _dq_lin_steps(j_lo, j_hi, dy_s, v_s, pk_s, Vb, PKb, M, b, sM_b, tr, W, T, sV_t, sPK_t, rk, cd, cf, D, F,
                      delta, inv, dpq, C: gl.constexpr, HAS_MASK: gl.constexpr, mma: gl.constexpr, opa: gl.constexpr):
        """``chunk_kernels._bwd_dq_steps``' linear part over key blocks j_lo <= j < j_hi (those with linear pairs):
        dphi_q += dw phi_k over the linear pairs, dw = (dy . v - delta) / den."""
        col: gl.constexpr = gl.SliceLayout(0, mma)
        for j in range(j_lo, j_hi):
            _copy_key_block(v_s, v_s, pk_s, Vb, Vb, PKb, M, b, sM_b, j * C + rk, T, sV_t, sV_t, sPK_t, cd, cd, cf, D,
                            F, False, True, HAS_MASK)
            ec = j * C + gl.arange(0, C, layout=col)
            dw = (warpgroup_mma(dy_s, v_s.permute((1, 0)), gl.zeros([C, C], gl.float32, mma), use_acc=False)
                  - delta[:, None]) * inv[:, None]
            lin = ec[None, :] <= (tr - W)[:, None]  # t - e >= W (keys past the end: t - e < 0 for stored rows)
            if HAS_MASK:
                lin = lin & (gl.load(M + b * sM_b + ec, mask=ec < T, other=0) != 0)[None, :]
            dpq = warpgroup_mma(gl.convert_layout(gl.where(lin, dw, 0.0).to(pk_s.dtype), opa), pk_s, dpq)
        return dpq

    @gluon.jit
    def _dq_win_steps(j_lo, j_hi, q_s, dy_s, k_s, v_s, Kb, Vb, M, b, sM_b, tr, W, T, scale, sK_t, sV_t, rk, cd, D,
                      mrow, delta, inv, gam, dq, rs, C: gl.constexpr, HAS_MASK: gl.constexpr, mma: gl.constexpr,
                      opa: gl.constexpr):
        """``chunk_kernels._bwd_dq_steps``' window part over key blocks j_lo <= j < j_hi (those with window pairs):
        ds = gamma exp(s - m) dw into dq and its row sums."""
        col: gl.constexpr = gl.SliceLayout(0, mma)
        for j in range(j_lo, j_hi):
            _copy_key_block(k_s, v_s, k_s, Kb, Vb, Kb, M, b, sM_b, j * C + rk, T, sK_t, sV_t, sK_t, cd, cd, cd, D, D,
                            True, False, HAS_MASK)
            ec = j * C + gl.arange(0, C, layout=col)
            zero = gl.zeros([C, C], gl.float32, mma)
            dw = (warpgroup_mma(dy_s, v_s.permute((1, 0)), zero, use_acc=False) - delta[:, None]) * inv[:, None]
            sc = warpgroup_mma(q_s, k_s.permute((1, 0)), zero, use_acc=False)
            e2 = ec[None, :]
            win = (e2 <= tr[:, None]) & (e2 > (tr - W)[:, None])  # 0 <= t - e < W
            if HAS_MASK:
                win = win & (gl.load(M + b * sM_b + ec, mask=ec < T, other=0) != 0)[None, :]
            # exp(-inf - m) = 0 outside the window (m: the forward's max, 0 where its window was empty)
            ds = gam * gl.exp(gl.where(win, sc * scale, float("-inf")) - mrow[:, None]) * dw
            rs = rs + gl.sum(ds, 1)
            dq = warpgroup_mma(gl.convert_layout(ds.to(k_s.dtype), opa), k_s, dq)
        return dq, rs

    @gluon.jit(do_not_specialize=LENGTH_ARGS)
    def bwd_dq_wgmma_kernel(
        Q, K, V, PQ, PK, M, GAMMA, DY, MAX, DEN, DELTA, ARG, DQ, DPQ, CORR, CS, CZ, PRE_S, PRE_Z, Y, DG,
        sQ_b, sQ_t, sQ_h, sK_b, sK_t, sK_h, sV_b, sV_t, sV_h, sPQ_b, sPQ_t, sPQ_h, sPK_b, sPK_t, sPK_h,
        sDY_b, sDY_t, sDY_h, sM_b,
        B, T, H, Hf, G, GQ, n_chunks, n_per, nwin, W, scale, Cs,
        D: gl.constexpr, F: gl.constexpr, BD: gl.constexpr, BF: gl.constexpr, C: gl.constexpr,
        HAS_MASK: gl.constexpr, PREC: gl.constexpr, FOLD: gl.constexpr = False, SKIP: gl.constexpr = False,
        LOCAL: gl.constexpr = False, DGAM: gl.constexpr = False, DELTA_HERE: gl.constexpr = False,
    ):
        """``chunk_kernels.bwd_dq_kernel`` with FOLD (same arguments; C = Cs = 64 rows a program, 4 warps; DGAM and
        DELTA_HERE not taken: the launcher keeps the Triton kernel for them; PREC unused). In two passes over the
        key blocks, each with one accumulator live: dphi_q (the chunk sums' part, (dy S^T - delta z) / den, then the
        linear pairs'), stored, then dq (the window pairs'); a block with both kinds of pairs is read twice (from L2)
        and its dy . v^T formed twice. One pass holding both accumulators spilled 112 B a thread (sm_90,
        D = F = 128)."""
        gl.static_assert(C == 64, "one warpgroup's wgmma tile: blocks of 64 rows")
        gl.static_assert(FOLD and not DGAM and not DELTA_HERE, "the folded backward's bwd_dq only")
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
        opa: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        row: gl.constexpr = gl.SliceLayout(1, mma)
        col: gl.constexpr = gl.SliceLayout(0, mma)
        brow: gl.constexpr = gl.SliceLayout(1, blk)
        bcol: gl.constexpr = gl.SliceLayout(0, blk)
        dt: gl.constexpr = Q.dtype.element_ty
        pt: gl.constexpr = PK.dtype.element_ty
        sl_d: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, BD], dt)
        sl_f: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, BF], pt)
        sl_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BF, BD], pt)

        c = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // G
        hf = h // GQ
        cs = c * C // Cs
        rk = gl.arange(0, C, layout=brow)
        cd = gl.arange(0, BD, layout=bcol)
        cf = gl.arange(0, BF, layout=bcol)
        tb = c * C + rk
        tb_ok = tb < T
        dy = _tile(DY + b * sDY_b + h * sDY_h, tb, tb_ok, sDY_t, cd, D)
        dy_s = _to_shared(dy, sl_d)
        tr = c * C + gl.arange(0, C, layout=row)
        t_ok = tr < T
        r = (b * H + h) * T + tr
        den = gl.load(DEN + r, mask=t_ok, other=0.0)
        delta = gl.load(DELTA + r, mask=t_ok, other=0.0)
        inv = gl.where(den > 0, 1.0 / gl.where(den > 0, den, 1.0), 0.0)
        Kb = K + b * sK_b + hk * sK_h
        Vb = V + b * sV_b + hk * sV_h
        PKb = PK + b * sPK_b + hf * sPK_h
        j_lo = gl.maximum((cs - nwin) * (Cs // C), 0)
        j_both = j_lo
        j_near = c + 1
        if SKIP:  # chunk_kernels._key_regions
            j_both = gl.minimum(gl.maximum(c - (W + C - 2) // C, j_lo), c + 1)
            j_near = gl.minimum(gl.maximum(c - W // C + 1, j_both), c + 1)

        # dphi_q: the chunk sums' part, (dy / den) S^T (and the segment prefix's) less (delta / den) z, then the
        # linear pairs'; complete, stored (from the load layout: 16-byte vectors along a row).
        inv_b = gl.convert_layout(inv, brow)
        dyi = gl.convert_layout((dy.to(gl.float32) * inv_b[:, None]).to(pt), opa)
        base = (cs * B + b) * Hf + hf
        rs_f = gl.arange(0, BF, layout=brow)
        s_ok = (rs_f[:, None] < F) & (cd[None, :] < D)
        S_s = _to_shared(gl.load(CS + base * F * D + rs_f[:, None] * D + cd[None, :], mask=s_ok, other=0.0).to(pt),
                         sl_s)
        dpq = warpgroup_mma(dyi, S_s.permute((1, 0)), gl.zeros([C, BF], gl.float32, mma), use_acc=False)
        zc = gl.arange(0, BF, layout=col)
        z = gl.load(CZ + base * F + zc, mask=zc < F, other=0.0)
        if LOCAL:
            pbase = ((cs // n_per) * B + b) * Hf + hf
            P_s = _to_shared(gl.load(PRE_S + pbase * F * D + rs_f[:, None] * D + cd[None, :], mask=s_ok,
                                     other=0.0).to(pt), sl_s)
            dpq = warpgroup_mma(dyi, P_s.permute((1, 0)), dpq)
            z += gl.load(PRE_Z + pbase * F + zc, mask=zc < F, other=0.0)
        dpq = dpq - (delta * inv)[:, None] * z[None, :]
        v_s = gl.allocate_shared_memory(dt, [C, BD], sl_d)
        pk_s = gl.allocate_shared_memory(pt, [C, BF], sl_f)
        dpq = _dq_lin_steps(j_lo, j_near, dy_s, v_s, pk_s, Vb, PKb, M, b, sM_b, tr, W, T, sV_t, sPK_t, rk, cd, cf, D,
                            F, delta, inv, dpq, C, HAS_MASK, mma, opa)
        gl.store(DPQ + ((b * T + tb[:, None]) * H + h) * F + cf[None, :],
                 gl.convert_layout(dpq.to(DPQ.dtype.element_ty), blk), mask=tb_ok[:, None] & (cf[None, :] < F))

        # dq: the window pairs' ds k, then the max path's correction. (q's buffer may take the linear pass's: every
        # warp is done with those first.)
        gl.thread_barrier()
        q_s = _to_shared(_tile(Q + b * sQ_b + h * sQ_h, tb, tb_ok, sQ_t, cd, D), sl_d)
        k_s = gl.allocate_shared_memory(dt, [C, BD], sl_d)
        mrow = gl.load(MAX + r, mask=t_ok, other=0.0)
        gam = gl.load(GAMMA + h)
        dq, rs = _dq_win_steps(j_both, c + 1, q_s, dy_s, k_s, v_s, Kb, Vb, M, b, sM_b, tr, W, T, scale, sK_t, sV_t,
                               rk, cd, D, mrow, delta, inv, gam, gl.zeros([C, BD], gl.float32, mma),
                               gl.zeros([C], gl.float32, row), C, HAS_MASK, mma, opa)
        corr = -rs
        gl.store(CORR + r, corr, mask=t_ok)
        # The max m_t = s(t, arg_t) carries dm_t = corr_t back to that one key.
        arg = gl.load(ARG + r, mask=t_ok, other=0)
        dc = gl.arange(0, BD, layout=col)
        kg = gl.load(Kb + arg[:, None] * sK_t + dc[None, :], mask=t_ok[:, None] & (dc[None, :] < D), other=0.0)
        dq = (dq + corr[:, None] * kg.to(gl.float32)) * scale
        gl.store(DQ + b * sQ_b + h * sQ_h + tb[:, None] * sQ_t + cd[None, :],
                 gl.convert_layout(dq.to(DQ.dtype.element_ty), blk), mask=tb_ok[:, None] & (cd[None, :] < D))
