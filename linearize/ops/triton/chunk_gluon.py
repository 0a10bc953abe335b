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
    # The layouts every kernel here takes, for one warpgroup (4 warps) and blocks of 64 rows:
    #: wgmma's accumulator layout of a [64, N] fp32 tile: each warp owns 16 whole rows (N in steps of 64)
    _MMA = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    MMA: gl.constexpr = gl.constexpr(_MMA)
    #: a 16-bit tile as wgmma's A operand in registers (a score tile turned into the next product's input)
    OPA: gl.constexpr = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=_MMA, k_width=2))
    #: global loads and stores: 16-byte vectors along a row
    _BLK = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    BLK: gl.constexpr = gl.constexpr(_BLK)
    #: [C] vectors of a tile's rows / columns, in the accumulators' layout and in the loads'
    ROW: gl.constexpr = gl.constexpr(gl.SliceLayout(1, _MMA))
    COL: gl.constexpr = gl.constexpr(gl.SliceLayout(0, _MMA))
    BROW: gl.constexpr = gl.constexpr(gl.SliceLayout(1, _BLK))
    BCOL: gl.constexpr = gl.constexpr(gl.SliceLayout(0, _BLK))

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
    def _sums_to_shared(S, base, rows, cols, F, D, dt: gl.constexpr, layout: gl.constexpr):
        """The [F, len(cols)] tile cols of a chunk's [F, D] sums at ``base`` (``chunk_kernels._load_sums``' S) in
        shared memory, in dtype dt, for wgmma."""
        ok = (rows[:, None] < F) & (cols[None, :] < D)
        return _to_shared(gl.load(S + base * F * D + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(dt),
                          layout)

    @gluon.jit
    def _key_valid(M, b, sM_b, e, T):
        """Keys e in the sequence and not padding (the key mask M of batch row b)."""
        return gl.load(M + b * sM_b + e, mask=e < T, other=0) != 0

    @gluon.jit
    def _key_regions(i, j_lo, W, C: gl.constexpr, SKIP: gl.constexpr):
        """``chunk_kernels._key_regions`` (query block i's key blocks j_lo..i: (j_both, j_near)), or, without SKIP,
        every block holding both kinds of pairs."""
        j_both = j_lo
        j_near = i + 1
        if SKIP:
            j_both = gl.minimum(gl.maximum(i - (W + C - 2) // C, j_lo), i + 1)
            j_near = gl.minimum(gl.maximum(i - W // C + 1, j_both), i + 1)
        return j_both, j_near

    @gluon.jit
    def _async_rows(buf, base, rows, rows_ok, stride_t, cols, ncols):
        """Issue the cp.async copy of rows ``rows`` of a [.., T, .., X] tensor into ``buf`` (zero where masked)."""
        async_copy.async_copy_global_to_shared(buf, base + rows[:, None] * stride_t + cols[None, :],
                                               mask=rows_ok[:, None] & (cols[None, :] < ncols))

    @gluon.jit
    def _copied():
        """Wait for this thread's cp.async copies, then make every warp's visible to wgmma."""
        async_copy.commit_group()
        async_copy.wait_group(0)
        fence_async_shared()
        gl.thread_barrier()

    @gluon.jit
    def _copy_key_block(k_s, v_s, pk_s, Kb, Vb, PKb, M, b, sM_b, e, T, sK_t, sV_t, sPK_t, cd, cv, cf, D, F, do_k, do_pk,
                        HAS_MASK: gl.constexpr):
        """Key rows e's k (do_k), v and phi_k (do_pk) tiles into their shared buffers, straight from global memory
        (cp.async, zero-filled where masked: no registers held for the tiles), waited for and visible to wgmma from
        every warp. Waits first for every warp to be done with the buffers' previous tiles."""
        ok = e < T
        if HAS_MASK:
            ok = ok & _key_valid(M, b, sM_b, e, T)
        gl.thread_barrier()
        if do_k:
            _async_rows(k_s, Kb, e, ok, sK_t, cd, D)
        _async_rows(v_s, Vb, e, ok, sV_t, cv, D)
        if do_pk:
            _async_rows(pk_s, PKb, e, ok, sPK_t, cf, F)
        _copied()

    @gluon.jit
    def _steps(j_lo, j_both, j_near, j_hi, q_s, pq_s, k_s, v_s, pk_s, Kb, Vb, PKb, M, b, sM_b, tr, W, T, scale, sK_t,
               sV_t, sPK_t, rk, cd, cv, cf, D, F, acc_w, acc_l, l_w, l_l, m_i, arg, C: gl.constexpr,
               HAS_MASK: gl.constexpr):
        """``chunk_kernels._fwd_window`` over key blocks j_lo <= j < j_hi: the near keys' linear terms where
        j < j_near and the window's online softmax where j >= j_both (``_key_regions``; the part a block has no
        pair for is neither loaded nor computed). One loop with the parts under branches, where the Triton kernel
        runs three loops (for its software pipeliner, which Gluon does not have): three loops' hoisted address
        tiles held at once spilled 224 B a thread (sm_90, D = F = 128), one loop none of its own."""
        for j in range(j_lo, j_hi):
            do_win = j >= j_both
            do_lin = j < j_near
            _copy_key_block(k_s, v_s, pk_s, Kb, Vb, PKb, M, b, sM_b, j * C + rk, T, sK_t, sV_t, sPK_t, cd, cv, cf, D, F,
                            do_win, do_lin, HAS_MASK)
            cc = gl.arange(0, C, layout=COL)
            ec = j * C + cc
            # Keys past the end need no mask of their own: for the rows that are stored (t < T <= e) t - e < 0, in
            # neither set. (A [C] mask held for them cost 16 registers a thread.)
            if HAS_MASK:
                k_ok = _key_valid(M, b, sM_b, ec, T)
            # the masks from the row and column positions where they are used, not held as [C, C] tiles
            e2 = ec[None, :]
            zero = gl.zeros([C, C], gl.float32, MMA)
            # (the linear part first: its tiles are dead before the window's are formed; the other order spilled)
            if do_lin:
                a = warpgroup_mma(pq_s, pk_s.permute((1, 0)), zero, use_acc=False)
                lin = e2 <= (tr - W)[:, None]  # t - e >= W
                if HAS_MASK:
                    lin = lin & k_ok[None, :]
                a = gl.where(lin, a, 0.0)
                l_l = l_l + gl.sum(a, 1)
                acc_l = warpgroup_mma(gl.convert_layout(a.to(v_s.dtype), OPA), v_s, acc_l)
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
                acc_w = warpgroup_mma(gl.convert_layout(p.to(v_s.dtype), OPA), v_s, acc_w * alpha[:, None])
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
        rk = gl.arange(0, C, layout=BROW)
        cd = gl.arange(0, BD, layout=BCOL)
        cf = gl.arange(0, BF, layout=BCOL)
        cv = iv * BV + gl.arange(0, BV, layout=BCOL)
        tb = i * C + rk
        pq = _tile(PQ + b * sPQ_b + h * sPQ_h, tb, tb < T, sPQ_t, cf, F)
        q_s = _to_shared(_tile(Q + b * sQ_b + h * sQ_h, tb, tb < T, sQ_t, cd, D), sl_d)
        pq_s = _to_shared(pq, sl_f)

        # The keys before the window's chunks, through the chunk's sums (and its segment's prefix): taken first, so
        # that their shared tiles are free again for the key blocks.
        base = (c * B + b) * Hf + hf
        rs = gl.arange(0, BF, layout=BROW)
        z = gl.load(CZ + base * F + cf, mask=cf < F, other=0.0)
        S_s = _sums_to_shared(CS, base, rs, cv, F, D, dt, sl_s)
        acc_l = warpgroup_mma(pq_s, S_s, gl.zeros([C, BV], gl.float32, MMA), use_acc=False)
        if LOCAL:
            pbase = ((c // n_per) * B + b) * Hf + hf
            z += gl.load(PRE_Z + pbase * F + cf, mask=cf < F, other=0.0)
            P_s = _sums_to_shared(PRE_S, pbase, rs, cv, F, D, dt, sl_s)
            acc_l = warpgroup_mma(pq_s, P_s, acc_l)
        l_l = gl.convert_layout(gl.sum(pq.to(gl.float32) * z[None, :], 1), ROW)

        tr = i * C + gl.arange(0, C, layout=ROW)
        m_i = gl.full([C], float("-inf"), gl.float32, ROW)
        l_w = gl.zeros([C], gl.float32, ROW)
        arg = gl.zeros([C], gl.int32, ROW)
        acc_w = gl.zeros([C, BV], gl.float32, MMA)
        k_s = gl.allocate_shared_memory(dt, [C, BD], sl_d)
        v_s = gl.allocate_shared_memory(dt, [C, BV], sl_v)
        pk_s = gl.allocate_shared_memory(dt, [C, BF], sl_f)
        Kb = K + b * sK_b + hk * sK_h
        Vb = V + b * sV_b + hk * sV_h
        PKb = PK + b * sPK_b + hf * sPK_h
        j_lo = gl.maximum((c - nwin) * (Cs // C), 0)
        j_both, j_near = _key_regions(i, j_lo, W, C, SKIP)
        acc_w, acc_l, l_w, l_l, m_i, arg = _steps(
            j_lo, j_both, j_near, i + 1, q_s, pq_s, k_s, v_s, pk_s, Kb, Vb, PKb, M, b, sM_b, tr, W, T, scale, sK_t,
            sV_t, sPK_t, rk, cd, cv, cf, D, F, acc_w, acc_l, l_w, l_l, m_i, arg, C, HAS_MASK)

        # chunk_kernels._fwd_store, in the accumulators' layout
        gam = gl.load(GAMMA + h)
        den = gam * l_w + l_l
        ok = den > 0
        y = gl.where(ok[:, None], (gam * acc_w + acc_l) / gl.where(ok, den, 1.0)[:, None], 0.0)
        # Stored from the load layout (16-byte vectors along a row): from the accumulators' layout a warp's store
        # would touch 8 rows 4 bytes a thread; Gluon does not coalesce stores itself, as Triton does.
        out_ok = (tb[:, None] < T) & (cv[None, :] < D)
        off = b * sY_b + h * sY_h + tb[:, None] * sY_t + cv[None, :]
        gl.store(Y + off, gl.convert_layout(y.to(dt), BLK), mask=out_ok)
        if STORE_U:
            inv2 = gl.where(ok, 1.0 / gl.where(ok, den * den, 1.0), 0.0)
            u = (acc_w * l_l[:, None] - l_w[:, None] * acc_l) * inv2[:, None]
            gl.store(U + off, gl.convert_layout(u.to(dt), BLK), mask=out_ok)
        t_ok = tr < T
        if iv == 0:
            r = (b * H + h) * T + tr
            gl.store(MAX + r, gl.where(m_i == float("-inf"), 0.0, m_i), mask=t_ok)
            gl.store(DEN + r, den, mask=t_ok)
            gl.store(ARG + r, arg, mask=t_ok)

    @gluon.jit
    def _dq_lin_steps(j_lo, j_hi, dy_s, v_s, pk_s, Vb, PKb, M, b, sM_b, tr, W, T, sV_t, sPK_t, rk, cd, cf, D, F,
                      delta, inv, dpq, C: gl.constexpr, HAS_MASK: gl.constexpr):
        """``chunk_kernels._bwd_dq_steps``' linear part over key blocks j_lo <= j < j_hi (those with linear pairs):
        dphi_q += dw phi_k over the linear pairs, dw = (dy . v - delta) / den."""
        for j in range(j_lo, j_hi):
            _copy_key_block(v_s, v_s, pk_s, Vb, Vb, PKb, M, b, sM_b, j * C + rk, T, sV_t, sV_t, sPK_t, cd, cd, cf, D,
                            F, False, True, HAS_MASK)
            ec = j * C + gl.arange(0, C, layout=COL)
            dw = (warpgroup_mma(dy_s, v_s.permute((1, 0)), gl.zeros([C, C], gl.float32, MMA), use_acc=False)
                  - delta[:, None]) * inv[:, None]
            lin = ec[None, :] <= (tr - W)[:, None]  # t - e >= W (keys past the end: t - e < 0 for stored rows)
            if HAS_MASK:
                lin = lin & _key_valid(M, b, sM_b, ec, T)[None, :]
            dpq = warpgroup_mma(gl.convert_layout(gl.where(lin, dw, 0.0).to(pk_s.dtype), OPA), pk_s, dpq)
        return dpq

    @gluon.jit
    def _dq_win_steps(j_lo, j_hi, q_s, dy_s, k_s, v_s, Kb, Vb, M, b, sM_b, tr, W, T, scale, sK_t, sV_t, rk, cd, D,
                      mrow, delta, inv, gam, dq, rs, C: gl.constexpr, HAS_MASK: gl.constexpr):
        """``chunk_kernels._bwd_dq_steps``' window part over key blocks j_lo <= j < j_hi (those with window pairs):
        ds = gamma exp(s - m) dw into dq and its row sums."""
        for j in range(j_lo, j_hi):
            _copy_key_block(k_s, v_s, k_s, Kb, Vb, Kb, M, b, sM_b, j * C + rk, T, sK_t, sV_t, sK_t, cd, cd, cd, D, D,
                            True, False, HAS_MASK)
            ec = j * C + gl.arange(0, C, layout=COL)
            zero = gl.zeros([C, C], gl.float32, MMA)
            dw = (warpgroup_mma(dy_s, v_s.permute((1, 0)), zero, use_acc=False) - delta[:, None]) * inv[:, None]
            sc = warpgroup_mma(q_s, k_s.permute((1, 0)), zero, use_acc=False)
            e2 = ec[None, :]
            win = (e2 <= tr[:, None]) & (e2 > (tr - W)[:, None])  # 0 <= t - e < W
            if HAS_MASK:
                win = win & _key_valid(M, b, sM_b, ec, T)[None, :]
            # exp(-inf - m) = 0 outside the window (m: the forward's max, 0 where its window was empty)
            ds = gam * gl.exp(gl.where(win, sc * scale, float("-inf")) - mrow[:, None]) * dw
            rs = rs + gl.sum(ds, 1)
            dq = warpgroup_mma(gl.convert_layout(ds.to(k_s.dtype), OPA), k_s, dq)
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
        rk = gl.arange(0, C, layout=BROW)
        cd = gl.arange(0, BD, layout=BCOL)
        cf = gl.arange(0, BF, layout=BCOL)
        tb = c * C + rk
        tb_ok = tb < T
        dy = _tile(DY + b * sDY_b + h * sDY_h, tb, tb_ok, sDY_t, cd, D)
        dy_s = _to_shared(dy, sl_d)
        tr = c * C + gl.arange(0, C, layout=ROW)
        t_ok = tr < T
        r = (b * H + h) * T + tr
        den = gl.load(DEN + r, mask=t_ok, other=0.0)
        delta = gl.load(DELTA + r, mask=t_ok, other=0.0)
        inv = gl.where(den > 0, 1.0 / gl.where(den > 0, den, 1.0), 0.0)
        Kb = K + b * sK_b + hk * sK_h
        Vb = V + b * sV_b + hk * sV_h
        PKb = PK + b * sPK_b + hf * sPK_h
        j_lo = gl.maximum((cs - nwin) * (Cs // C), 0)
        j_both, j_near = _key_regions(c, j_lo, W, C, SKIP)

        # dphi_q: the chunk sums' part, (dy / den) S^T (and the segment prefix's) less (delta / den) z, then the
        # linear pairs'; complete, stored (from the load layout: 16-byte vectors along a row).
        inv_b = gl.convert_layout(inv, BROW)
        dyi = gl.convert_layout((dy.to(gl.float32) * inv_b[:, None]).to(pt), OPA)
        base = (cs * B + b) * Hf + hf
        rs_f = gl.arange(0, BF, layout=BROW)
        S_s = _sums_to_shared(CS, base, rs_f, cd, F, D, pt, sl_s)
        dpq = warpgroup_mma(dyi, S_s.permute((1, 0)), gl.zeros([C, BF], gl.float32, MMA), use_acc=False)
        zc = gl.arange(0, BF, layout=COL)
        z = gl.load(CZ + base * F + zc, mask=zc < F, other=0.0)
        if LOCAL:
            pbase = ((cs // n_per) * B + b) * Hf + hf
            P_s = _sums_to_shared(PRE_S, pbase, rs_f, cd, F, D, pt, sl_s)
            dpq = warpgroup_mma(dyi, P_s.permute((1, 0)), dpq)
            z += gl.load(PRE_Z + pbase * F + zc, mask=zc < F, other=0.0)
        dpq = dpq - (delta * inv)[:, None] * z[None, :]
        v_s = gl.allocate_shared_memory(dt, [C, BD], sl_d)
        pk_s = gl.allocate_shared_memory(pt, [C, BF], sl_f)
        dpq = _dq_lin_steps(j_lo, j_near, dy_s, v_s, pk_s, Vb, PKb, M, b, sM_b, tr, W, T, sV_t, sPK_t, rk, cd, cf, D,
                            F, delta, inv, dpq, C, HAS_MASK)
        gl.store(DPQ + ((b * T + tb[:, None]) * H + h) * F + cf[None, :],
                 gl.convert_layout(dpq.to(DPQ.dtype.element_ty), BLK), mask=tb_ok[:, None] & (cf[None, :] < F))

        # dq: the window pairs' ds k, then the max path's correction. (q's buffer may take the linear pass's: every
        # warp is done with those first.)
        gl.thread_barrier()
        q_s = _to_shared(_tile(Q + b * sQ_b + h * sQ_h, tb, tb_ok, sQ_t, cd, D), sl_d)
        k_s = gl.allocate_shared_memory(dt, [C, BD], sl_d)
        mrow = gl.load(MAX + r, mask=t_ok, other=0.0)
        gam = gl.load(GAMMA + h)
        dq, rs = _dq_win_steps(j_both, c + 1, q_s, dy_s, k_s, v_s, Kb, Vb, M, b, sM_b, tr, W, T, scale, sK_t, sV_t,
                               rk, cd, D, mrow, delta, inv, gam, gl.zeros([C, BD], gl.float32, MMA),
                               gl.zeros([C], gl.float32, ROW), C, HAS_MASK)
        corr = -rs
        gl.store(CORR + r, corr, mask=t_ok)
        # The max m_t = s(t, arg_t) carries dm_t = corr_t back to that one key.
        arg = gl.load(ARG + r, mask=t_ok, other=0)
        dc = gl.arange(0, BD, layout=COL)
        kg = gl.load(Kb + arg[:, None] * sK_t + dc[None, :], mask=t_ok[:, None] & (dc[None, :] < D), other=0.0)
        dq = (dq + corr[:, None] * kg.to(gl.float32)) * scale
        gl.store(DQ + b * sQ_b + h * sQ_h + tb[:, None] * sQ_t + cd[None, :],
                 gl.convert_layout(dq.to(DQ.dtype.element_ty), BLK), mask=tb_ok[:, None] & (cd[None, :] < D))

    @gluon.jit
    def _window_weights(q_s, k_s, MAX, r, t_ok, t2, e2, k_ok, gam, W, scale, C: gl.constexpr, HAS_MASK: gl.constexpr):
        """gamma exp(s - m) on a [queries, keys] tile's window pairs (0 <= t - e < W, keys valid where HAS_MASK:
        k_ok), 0 elsewhere: the window's weights before the shared normalizer (m: the forward's row max, 0 where its
        window was empty, so exp(-inf - m) = 0 outside)."""
        win = (e2 <= t2) & (e2 > t2 - W)  # 0 <= t - e < W
        if HAS_MASK:
            win = win & k_ok[None, :]
        sc = warpgroup_mma(q_s, k_s.permute((1, 0)), gl.zeros([C, C], gl.float32, MMA), use_acc=False)
        mrow = gl.load(MAX + r, mask=t_ok, other=0.0)
        return gam * gl.exp(gl.where(win, sc * scale, float("-inf")) - mrow[:, None])

    @gluon.jit
    def _xt_into(x, x_s, b_s, acc):
        """acc + x^T b: the [queries, keys] tile x transposed through shared memory (x_s) into the product over the
        queries, with b's [queries, N] tile in shared memory. Waits first for every warp's previous product to be
        done reading x_s."""
        gl.thread_barrier()
        x_s.store(x.to(x_s.dtype))
        fence_async_shared()
        gl.thread_barrier()
        return warpgroup_mma(x_s.permute((1, 0)), b_s, acc)

    @gluon.jit
    def _dvp_block(do_win, do_lin, acc, acc2, k_s, v_s, pk_s, q_s, pq_s, dy_s, x_s, MAX, DELTA, r, t_ok, inv, t2, e2,
                   k_ok, gam, W, scale, C: gl.constexpr, HAS_MASK: gl.constexpr):
        """One query block's part of dv (acc) and dphi_k (acc2), ``_dk_pass`` with GR 6: the window weights' tile and
        the linear weights' tile into dv as products of their own, then the linear pairs' dw into dphi_k, one
        [C, C] tile live at a time beside the two accumulators (the window and linear weights summed into one tile
        first, as dv's pass alone does, spilled 408 B a thread at D = F = 128)."""
        zero = gl.zeros([C, C], gl.float32, MMA)
        if do_win:
            acc = _xt_into(_window_weights(q_s, k_s, MAX, r, t_ok, t2, e2, k_ok, gam, W, scale, C, HAS_MASK)
                           * inv[:, None], x_s, dy_s, acc)
        if do_lin:
            lin = e2 <= t2 - W  # t - e >= W
            if HAS_MASK:
                lin = lin & k_ok[None, :]
            a = warpgroup_mma(pq_s, pk_s.permute((1, 0)), zero, use_acc=False)
            acc = _xt_into(gl.where(lin, a, 0.0) * inv[:, None], x_s, dy_s, acc)
            delta = gl.load(DELTA + r, mask=t_ok, other=0.0)
            dw = (warpgroup_mma(dy_s, v_s.permute((1, 0)), zero, use_acc=False) - delta[:, None]) * inv[:, None]
            acc2 = _xt_into(gl.where(lin, dw, 0.0), x_s, pq_s, acc2)
        return acc, acc2

    @gluon.jit
    def _dk_pass(GR: gl.constexpr, i_lo, i_both, i_far, i_hi, acc, acc2, k_s, v_s, pk_s, q_s, pq_s, dy_s, x_s, Q, PQ,
                 DY, MAX, DEN, DELTA, ARG, CORR, GAMMA, b, hf, H, T, j, M, sM_b, W, scale, sQ_b, sQ_t, sQ_h, sPQ_b,
                 sPQ_t, sPQ_h, sDY_b, sDY_t, sDY_h, rq, cd, cf, D, F, C: gl.constexpr, GQ: gl.constexpr,
                 HAS_MASK: gl.constexpr):
        """One of bwd_dk's passes over the query blocks i_lo <= i < i_hi of the key block's GQ query heads, for its
        gradients GR (``_dk_program``'s bits): 2 dv into acc (every block: the window weights where i < i_far, the
        linear ones where i >= i_both, over den), 1 dk into acc (the window pairs' ds, with the max path's correction
        at each row's arg-max key), 4 dphi_k into acc2 (the linear pairs' dw), 6 dv into acc and dphi_k into acc2
        (dv's tile, then dphi_k's where the block has linear pairs: one read of the query tiles for both).
        The tiles are query-major ([queries, keys], as bwd_dq's: a row's statistics are 2 registers a thread, where
        key-major tiles hold each as a 16-register column vector and spilled), and reach the product that sums over
        the queries (tile^T . q / dy / phi_q) as its A operand through shared memory (x_s), transposed there."""
        zero = gl.zeros([C, C], gl.float32, MMA)
        # (the key positions and mask formed here, not held from the prologue: a [C] vector of the tiles' columns is 16
        # registers a thread, and the passes together spilled with them)
        e_c = j * C + gl.arange(0, C, layout=COL)
        k_ok = e_c  # (unread without a mask)
        if HAS_MASK:
            k_ok = _key_valid(M, b, sM_b, e_c, T)
        e2 = e_c[None, :]
        for g in gl.static_range(GQ):
            h = hf * GQ + g
            gam = gl.load(GAMMA + h)
            for i in range(i_lo, i_hi):
                do_win = i < i_far
                do_lin = i >= i_both
                tq = i * C + rq  # (load layout)
                tq_ok = tq < T
                gl.thread_barrier()  # every warp is done with the previous query block's tiles (x_s too)
                if (GR & 2) != 0:  # (only the tiles the block's parts take)
                    if do_win:
                        _async_rows(q_s, Q + b * sQ_b + h * sQ_h, tq, tq_ok, sQ_t, cd, D)
                    if do_lin:
                        _async_rows(pq_s, PQ + b * sPQ_b + h * sPQ_h, tq, tq_ok, sPQ_t, cf, F)
                elif GR == 1:
                    _async_rows(q_s, Q + b * sQ_b + h * sQ_h, tq, tq_ok, sQ_t, cd, D)
                else:
                    _async_rows(pq_s, PQ + b * sPQ_b + h * sPQ_h, tq, tq_ok, sPQ_t, cf, F)
                _async_rows(dy_s, DY + b * sDY_b + h * sDY_h, tq, tq_ok, sDY_t, cd, D)
                _copied()
                t = i * C + gl.arange(0, C, layout=ROW)
                t_ok = t < T
                r = (b * H + h) * T + t
                # (queries past the end: dy 0 and 1 / den 0, so they add nothing; keys past the end are not stored)
                inv = gl.load(DEN + r, mask=t_ok, other=0.0)
                inv = gl.where(inv > 0, 1.0 / gl.where(inv > 0, inv, 1.0), 0.0)
                t2 = t[:, None]
                if GR == 6:
                    acc, acc2 = _dvp_block(do_win, do_lin, acc, acc2, k_s, v_s, pk_s, q_s, pq_s, dy_s, x_s, MAX, DELTA,
                                           r, t_ok, inv, t2, e2, k_ok, gam, W, scale, C, HAS_MASK)
                elif GR == 2:
                    x = zero
                    if do_win:
                        x = _window_weights(q_s, k_s, MAX, r, t_ok, t2, e2, k_ok, gam, W, scale, C, HAS_MASK)
                    if do_lin:
                        lin = e2 <= t2 - W  # t - e >= W
                        if HAS_MASK:
                            lin = lin & k_ok[None, :]
                        x = x + gl.where(lin, warpgroup_mma(pq_s, pk_s.permute((1, 0)), zero, use_acc=False), 0.0)
                    x = x * inv[:, None]
                else:
                    delta = gl.load(DELTA + r, mask=t_ok, other=0.0)
                    dw = (warpgroup_mma(dy_s, v_s.permute((1, 0)), zero, use_acc=False) - delta[:, None]) * inv[:, None]
                    if GR == 1:
                        x = _window_weights(q_s, k_s, MAX, r, t_ok, t2, e2, k_ok, gam, W, scale, C, HAS_MASK) * dw
                        arg = gl.load(ARG + r, mask=t_ok, other=-1)
                        corr = gl.load(CORR + r, mask=t_ok, other=0.0)
                        x = x + gl.where(e2 == arg[:, None], corr[:, None], 0.0)
                    else:
                        lin = e2 <= t2 - W
                        if HAS_MASK:
                            lin = lin & k_ok[None, :]
                        x = gl.where(lin, dw, 0.0)
                if GR != 6:
                    x_s.store(x.to(x_s.dtype))
                    fence_async_shared()
                    gl.thread_barrier()
                    if GR == 2:
                        acc = warpgroup_mma(x_s.permute((1, 0)), dy_s, acc)
                    elif GR == 1:
                        acc = warpgroup_mma(x_s.permute((1, 0)), q_s, acc)
                    else:
                        acc2 = warpgroup_mma(x_s.permute((1, 0)), pq_s, acc2)
        return acc, acc2

    @gluon.jit
    def _fold_sums(CDS, REV_S, base, pbase, cd, F, D, BF: gl.constexpr, pt: gl.constexpr, sl: gl.constexpr,
                   LOCAL: gl.constexpr):
        """The key chunk's gradient sums dS [F, D] (plus the segment's reverse prefix where LOCAL) in shared memory,
        visible to wgmma. Through registers 32 rows at a time: the whole [F, D] tile is 64 registers a thread in
        bf16, 128 in fp32, and this runs beside an accumulator."""
        dS_s = gl.allocate_shared_memory(pt, [BF, cd.shape[0]], sl)
        for r0 in gl.static_range(0, BF, 32):
            rr = r0 + gl.arange(0, 32, layout=BROW)
            ok = (rr[:, None] < F) & (cd[None, :] < D)
            x = gl.load(CDS + base * F * D + rr[:, None] * D + cd[None, :], mask=ok, other=0.0)
            if LOCAL:
                x = (x.to(gl.float32) + gl.load(REV_S + pbase * F * D + rr[:, None] * D + cd[None, :], mask=ok,
                                                other=0.0).to(gl.float32)).to(pt)
            dS_s.slice(r0, 32).store(x.to(pt))
        fence_async_shared()
        gl.thread_barrier()
        return dS_s

    @gluon.jit
    def _dk_program(GR: gl.constexpr, j, Q, K, V, PQ, PK, M, GAMMA, DY, MAX, DEN, DELTA, ARG, CORR, DK, DV, DPK, CDS,
                    CDZ, REV_S, REV_Z, sQ_b, sQ_t, sQ_h, sK_b, sK_t, sK_h, sV_b, sV_t, sV_h, sPQ_b, sPQ_t, sPQ_h, sPK_b,
                    sPK_t, sPK_h, sDY_b, sDY_t, sDY_h, sM_b, B, T, H, Hf, Gk, n_chunks, n_per, nwin, W, scale, Cs,
                    D: gl.constexpr, F: gl.constexpr, BD: gl.constexpr, BF: gl.constexpr, C: gl.constexpr,
                    GQ: gl.constexpr, HAS_MASK: gl.constexpr, SKIP: gl.constexpr, LOCAL: gl.constexpr):
        """Key block j's gradients GR (bwd_dk's bits: 1 dk, 2 dv with the fold's phi_k dS, 4 dphi_k with the fold's
        v dS^T + dz; 6 dv and dphi_k from one read of the sums and of the query tiles), stored."""
        dt: gl.constexpr = Q.dtype.element_ty
        pt: gl.constexpr = PK.dtype.element_ty
        sl_d: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, BD], dt)
        sl_f: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, BF], pt)
        sl_x: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, C], dt)
        sl_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BF, BD], pt)

        bh = gl.program_id(1)
        b = bh // Hf
        hf = bh % Hf
        hk = hf // Gk
        rq = gl.arange(0, C, layout=BROW)
        cd = gl.arange(0, BD, layout=BCOL)
        cf = gl.arange(0, BF, layout=BCOL)
        eb = j * C + rq
        eb_in = eb < T
        cj = j * C // Cs
        i_hi = gl.minimum((cj + nwin + 1) * (Cs // C), n_chunks)
        i_both = j
        i_far = i_hi
        if SKIP:  # chunk_kernels._query_regions
            i_both = gl.maximum(gl.minimum(j + W // C, i_hi), j)
            i_far = gl.maximum(gl.minimum(j + (W + C - 2) // C + 1, i_hi), i_both)
        base = (cj * B + b) * Hf + hf
        pbase = ((cj // n_per) * B + b) * Hf + hf
        out = (b * T + eb[:, None]) * Hf + hf
        k_s = gl.allocate_shared_memory(dt, [C, BD], sl_d)
        v_s = gl.allocate_shared_memory(dt, [C, BD], sl_d)
        pk_s = gl.allocate_shared_memory(pt, [C, BF], sl_f)
        if (GR & 3) != 0:  # (k: the window scores of dk and dv; v: dw, and the fold of dphi_k; phi_k: dv's)
            _async_rows(k_s, K + b * sK_b + hk * sK_h, eb, eb_in, sK_t, cd, D)
        if (GR & 5) != 0:
            _async_rows(v_s, V + b * sV_b + hk * sV_h, eb, eb_in, sV_t, cd, D)
        if (GR & 2) != 0:
            _async_rows(pk_s, PK + b * sPK_b + hf * sPK_h, eb, eb_in, sPK_t, cf, F)
        if HAS_MASK:  # (keys past the end need no mask: they are not stored)
            e_r = j * C + gl.arange(0, C, layout=ROW)
            k_ok_r = _key_valid(M, b, sM_b, e_r, T)
        acc = gl.zeros([C, BD], gl.float32, MMA)
        acc2 = gl.zeros([C, BF], gl.float32, MMA)
        # the fold (the later queries' part: phi_k dS into dv, v dS^T + dz into dphi_k), then the query tiles,
        # allocated after the sums are read so that they may take their space (sm_90, D = F = 128: 88 KB of shared
        # memory at most a kind, two programs an SM, against 120 KB allocated first)
        if (GR & 6) != 0:
            dS_s = _fold_sums(CDS, REV_S, base, pbase, cd, F, D, BF, pt, sl_s, LOCAL)
            _copied()
            if (GR & 2) != 0:
                acc = warpgroup_mma(pk_s, dS_s, acc, use_acc=False)
                if HAS_MASK:
                    acc = gl.where(k_ok_r[:, None], acc, 0.0)
            if (GR & 4) != 0:
                acc2 = warpgroup_mma(v_s, dS_s.permute((1, 0)), acc2, use_acc=False)
                fz = gl.arange(0, BF, layout=COL)
                dz = gl.load(CDZ + base * F + fz, mask=fz < F, other=0.0)
                if LOCAL:
                    dz += gl.load(REV_Z + pbase * F + fz, mask=fz < F, other=0.0)
                acc2 = acc2 + dz[None, :]
                if HAS_MASK:
                    acc2 = gl.where(k_ok_r[:, None], acc2, 0.0)
        else:
            _copied()
        gl.thread_barrier()
        x_s = gl.allocate_shared_memory(dt, [C, C], sl_x)
        q_s = gl.allocate_shared_memory(dt, [C, BD], sl_d)
        pq_s = gl.allocate_shared_memory(pt, [C, BF], sl_f)
        dy_s = gl.allocate_shared_memory(dt, [C, BD], sl_d)
        # (each gradient's query blocks: dv's every block of the key's window chunks, dk's the window pairs', dphi_k's
        # the linear pairs')
        i_lo = j
        i_end = i_hi
        if GR == 1:
            i_end = i_far
        if GR == 4:
            i_lo = i_both
        acc, acc2 = _dk_pass(GR, i_lo, i_both, i_far, i_end, acc, acc2, k_s, v_s, pk_s, q_s, pq_s, dy_s, x_s, Q, PQ, DY,
                             MAX, DEN, DELTA, ARG, CORR, GAMMA, b, hf, H, T, j, M, sM_b, W, scale, sQ_b, sQ_t, sQ_h,
                             sPQ_b, sPQ_t, sPQ_h, sDY_b, sDY_t, sDY_h, rq, cd, cf, D, F, C, GQ, HAS_MASK)
        # (stored from the load layout: 16-byte vectors along a row)
        if GR == 1:
            gl.store(DK + out * D + cd[None, :], gl.convert_layout((acc * scale).to(DK.dtype.element_ty), BLK),
                     mask=eb_in[:, None] & (cd[None, :] < D))
        if (GR & 2) != 0:
            gl.store(DV + out * D + cd[None, :], gl.convert_layout(acc.to(DV.dtype.element_ty), BLK),
                     mask=eb_in[:, None] & (cd[None, :] < D))
        if (GR & 4) != 0:
            gl.store(DPK + out * F + cf[None, :], gl.convert_layout(acc2.to(DPK.dtype.element_ty), BLK),
                     mask=eb_in[:, None] & (cf[None, :] < F))

    @gluon.jit
    def bwd_dk_wgmma_kernel(
        Q, K, V, PQ, PK, M, GAMMA, DY, MAX, DEN, DELTA, ARG, CORR, DK, DV, DPK, CDS, CDZ, REV_S, REV_Z,
        sQ_b, sQ_t, sQ_h, sK_b, sK_t, sK_h, sV_b, sV_t, sV_h, sPQ_b, sPQ_t, sPQ_h, sPK_b, sPK_t, sPK_h,
        sDY_b, sDY_t, sDY_h, sM_b,
        B, T, H, Hf, Gk, n_chunks, n_per, nwin, W, scale, Cs,
        D: gl.constexpr, F: gl.constexpr, BD: gl.constexpr, BF: gl.constexpr, C: gl.constexpr,
        GQ: gl.constexpr, HAS_MASK: gl.constexpr, PREC: gl.constexpr, FOLD: gl.constexpr = False,
        SKIP: gl.constexpr = False, GRADS: gl.constexpr = 2, LOCAL: gl.constexpr = False, KINDS: gl.constexpr = 1,
    ):
        """``chunk_kernels.bwd_dk_kernel`` with FOLD (same arguments; C = Cs = 64 keys a program, 4 warps; PREC
        unused), its three gradients split among programs, each holding one or two [64, D] accumulators: one [64, D]
        fp32 accumulator is 64 registers a thread at D = 128, and the three as passes of one program (one live at a
        time) still spilled 168 B a thread (sm_90, D = F = 128: what each pass keeps for the next).

        KINDS 1: this launch's programs all take GRADS (1 dk, 2 dv, 4 dphi_k, 6 dv and dphi_k; the launcher runs
        three launches, 2 1 4, or two, 1 6). KINDS 3: one launch of three kinds of program, dk | dv | dphi_k, a key
        block's side by side in the grid (axis 0 is key block x 3 + kind), so that their reads of the block's key,
        query and sum tiles meet in L2. Each kind loads the query tiles it takes and forms its scores again. (Two
        kinds, dk | dv + dphi_k, spilled 288 B a thread in one kernel, sm_90, D = F = 128: ptxas gives the branches
        one register budget.)"""
        gl.static_assert(C == 64, "one warpgroup's wgmma tile: blocks of 64 keys")
        gl.static_assert(FOLD, "the folded bwd_dk")
        gl.static_assert(KINDS != 1 or GRADS == 1 or GRADS == 2 or GRADS == 4 or GRADS == 6,
                         "GRADS: one gradient a launch, or dv and dphi_k")
        gl.static_assert(KINDS == 1 or KINDS == 3, "KINDS: 1 or 3 kinds of program")
        pid = gl.program_id(0)
        if KINDS == 1:
            _dk_program(GRADS, pid, Q, K, V, PQ, PK, M, GAMMA, DY, MAX, DEN, DELTA, ARG, CORR, DK, DV, DPK, CDS, CDZ,
                        REV_S, REV_Z, sQ_b, sQ_t, sQ_h, sK_b, sK_t, sK_h, sV_b, sV_t, sV_h, sPQ_b, sPQ_t, sPQ_h, sPK_b,
                        sPK_t, sPK_h, sDY_b, sDY_t, sDY_h, sM_b, B, T, H, Hf, Gk, n_chunks, n_per, nwin, W, scale, Cs,
                        D, F, BD, BF, C, GQ, HAS_MASK, SKIP, LOCAL)
        else:
            j = pid // KINDS
            kind = pid % KINDS
            if kind == 0:
                _dk_program(1, j, Q, K, V, PQ, PK, M, GAMMA, DY, MAX, DEN, DELTA, ARG, CORR, DK, DV, DPK, CDS, CDZ,
                            REV_S, REV_Z, sQ_b, sQ_t, sQ_h, sK_b, sK_t, sK_h, sV_b, sV_t, sV_h, sPQ_b, sPQ_t, sPQ_h,
                            sPK_b, sPK_t, sPK_h, sDY_b, sDY_t, sDY_h, sM_b, B, T, H, Hf, Gk, n_chunks, n_per, nwin, W,
                            scale, Cs, D, F, BD, BF, C, GQ, HAS_MASK, SKIP, LOCAL)
            elif kind == 1:
                _dk_program(2, j, Q, K, V, PQ, PK, M, GAMMA, DY, MAX, DEN, DELTA, ARG, CORR, DK, DV, DPK, CDS, CDZ,
                            REV_S, REV_Z, sQ_b, sQ_t, sQ_h, sK_b, sK_t, sK_h, sV_b, sV_t, sV_h, sPQ_b, sPQ_t, sPQ_h,
                            sPK_b, sPK_t, sPK_h, sDY_b, sDY_t, sDY_h, sM_b, B, T, H, Hf, Gk, n_chunks, n_per, nwin, W,
                            scale, Cs, D, F, BD, BF, C, GQ, HAS_MASK, SKIP, LOCAL)
            else:
                _dk_program(4, j, Q, K, V, PQ, PK, M, GAMMA, DY, MAX, DEN, DELTA, ARG, CORR, DK, DV, DPK, CDS, CDZ,
                            REV_S, REV_Z, sQ_b, sQ_t, sQ_h, sK_b, sK_t, sK_h, sV_b, sV_t, sV_h, sPQ_b, sPQ_t, sPQ_h,
                            sPK_b, sPK_t, sPK_h, sDY_b, sDY_t, sDY_h, sM_b, B, T, H, Hf, Gk, n_chunks, n_per, nwin, W,
                            scale, Cs, D, F, BD, BF, C, GQ, HAS_MASK, SKIP, LOCAL)
