"""Triton Hedgehog feature maps: phi_q and phi_k of a layer in one launch, forward and backward.

Why: the modules compute a map in ~8 kernels (a permuted copy of the input, the batched GEMM and its copy
back, the fp32 cast, neg, two softmaxes, cat, the cast back) and about as many in the backward, each a pass
over [B, T, H, F] tensors, some in fp32. In a compiled decode step that was 12.5 us a layer of SmolLM2 at
B 64 on the H200 for a few hundred KB of traffic (``benchmarks/results/generate-nvidia-h200-20261203-225408.log``);
in training it is a dozen passes over the features per map and layer. Here a forward is one kernel for both
maps, and a backward one kernel for both maps' du = dL/d(xW) plus the two GEMMs of each map's projection
(dx = du W^T, dW = x^T du, as the modules' einsum backward does them). Computing the maps inside the ring
kernel instead was measured slower (its S tile stays live in registers).

Same math as ``HedgehogFeatureMap.forward``: u = x W per head, rounded to x's dtype (what the einsum
returns), then [softmax(u), softmax(-u)] in fp32, rounded to x's dtype; the backward recomputes u and the
softmaxes in fp32 (as autograd keeps them), du = p1 (g1 - <g1, p1>) - p2 (g2 - <g2, p2>) in fp32 from the
output gradient halves g1, g2, rounded to x's dtype (the gradient of the fp32 cast). One program per (output
head, block of BR rows); rows are the B*T tokens. The output heads of a map read input head ``h // G``
(G = output heads / input heads: keys of a GQA model with maps per query head), as ``_project`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_env
from .decode import _pow2


@triton.jit
def _softmax_pair(u, f_ok):
    """softmax(u), softmax(-u) over the valid features ``f_ok`` of each row of u [BR, FHP] (fp32)."""
    pos = tl.where(f_ok[None, :], u, float("-inf"))
    neg = tl.where(f_ok[None, :], -u, float("-inf"))
    e1 = tl.exp(pos - tl.max(pos, 1)[:, None])
    e2 = tl.exp(neg - tl.max(neg, 1)[:, None])
    return e1 / tl.sum(e1, 1)[:, None], e2 / tl.sum(e2, 1)[:, None]


@triton.jit
def _hedgehog_softmaxes(X, W, h, r0, R, sX_r,
                        G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, FH: tl.constexpr, FHP: tl.constexpr,
                        BR: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """softmax(u), softmax(-u) [BR, FHP] (fp32) of rows r0..r0+BR of output head h, u = x W rounded to x's
    dtype; X [R, Hx, D] (row stride sX_r, head stride D), W [H, D, FH]. Also the rows, their mask, the
    feature offsets and theirs."""
    rr = r0 + tl.arange(0, BR)
    r_ok = rr < R
    rf = tl.arange(0, FHP)
    f_ok = rf < FH
    x_rows = X + rr[:, None].to(tl.int64) * sX_r + (h // G) * D
    u = tl.zeros([BR, FHP], tl.float32)
    for d0 in tl.static_range(0, DP, BK):  # the head dim in slices: a whole [D, f] tile of W would spill
        rd = d0 + tl.arange(0, BK)
        d_ok = rd < D
        x = tl.load(x_rows + rd[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(W + h * D * FH + rd[:, None] * FH + rf[None, :], mask=d_ok[:, None] & f_ok[None, :], other=0.0)
        if IEEE:
            u += tl.dot(x, w, input_precision="ieee")
        else:
            u += tl.dot(x, w)
    p1, p2 = _softmax_pair(u.to(X.dtype.element_ty).to(tl.float32), f_ok)
    return p1, p2, rr, r_ok, rf, f_ok


@triton.jit
def _hedgehog_rows(X, W, Y, h, r0, R, sX_r, sY_r,
                   G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, FH: tl.constexpr, FHP: tl.constexpr,
                   BR: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """Y [R, H, 2 FH] (row stride sY_r, head stride 2 FH) at rows r0..r0+BR of output head h."""
    p1, p2, rr, r_ok, rf, f_ok = _hedgehog_softmaxes(X, W, h, r0, R, sX_r, G, D, DP, FH, FHP, BR, BK, IEEE)
    out = Y + rr[:, None].to(tl.int64) * sY_r + h * 2 * FH + rf[None, :]
    ok = r_ok[:, None] & f_ok[None, :]
    tl.store(out, p1.to(Y.dtype.element_ty), mask=ok)
    tl.store(out + FH, p2.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _hedgehog_du_rows(X, W, DY, DU, h, r0, R, sX_r,
                      H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, FH: tl.constexpr,
                      FHP: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """DU [R, H, FH] (contiguous, X's dtype) at rows r0..r0+BR of output head h, from DY [R, H, 2 FH] (contiguous)."""
    p1, p2, rr, r_ok, rf, f_ok = _hedgehog_softmaxes(X, W, h, r0, R, sX_r, G, D, DP, FH, FHP, BR, BK, IEEE)
    ok = r_ok[:, None] & f_ok[None, :]
    dy = DY + rr[:, None].to(tl.int64) * (H * 2 * FH) + h * 2 * FH + rf[None, :]
    g1 = tl.load(dy, mask=ok, other=0.0).to(tl.float32)
    g2 = tl.load(dy + FH, mask=ok, other=0.0).to(tl.float32)
    du = p1 * (g1 - tl.sum(g1 * p1, 1)[:, None]) - p2 * (g2 - tl.sum(g2 * p2, 1)[:, None])
    tl.store(DU + rr[:, None].to(tl.int64) * (H * FH) + h * FH + rf[None, :], du.to(DU.dtype.element_ty), mask=ok)


@triton.jit
def _hedgehog_pair_kernel(
    XQ, XK, WQ, WK, DYQ, DYK, OQ, OK, R, sXQ_r, sXK_r,
    H: tl.constexpr, HK: tl.constexpr, GQ: tl.constexpr, GK: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, FH: tl.constexpr, FHP: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
    IEEE: tl.constexpr, BACKWARD: tl.constexpr,
):
    """Both maps (contiguous outputs O), on a 1D grid of (H + HK) x row blocks, the head varying fastest (a row
    block's programs run together and share its rows in L2; axis 0 also has no 65,535 limit, which a second axis
    of row blocks met at 2M rows): heads 0..H-1 serve the query map, the rest the key map. The forward writes
    phi [R, H, 2 FH] (DY unused); BACKWARD writes du [R, H, FH] from DY [R, H, 2 FH]."""
    pid = tl.program_id(0) % (H + HK)
    r0 = (tl.program_id(0) // (H + HK)) * BR
    if BACKWARD:
        if pid < H:
            _hedgehog_du_rows(XQ, WQ, DYQ, OQ, pid, r0, R, sXQ_r, H, GQ, D, DP, FH, FHP, BR, BK, IEEE)
        else:
            _hedgehog_du_rows(XK, WK, DYK, OK, pid - H, r0, R, sXK_r, HK, GK, D, DP, FH, FHP, BR, BK, IEEE)
    else:
        if pid < H:
            _hedgehog_rows(XQ, WQ, OQ, pid, r0, R, sXQ_r, H * 2 * FH, GQ, D, DP, FH, FHP, BR, BK, IEEE)
        else:
            _hedgehog_rows(XK, WK, OK, pid - H, r0, R, sXK_r, HK * 2 * FH, GK, D, DP, FH, FHP, BR, BK, IEEE)


@triton.jit
def _rope_rows(X, COS, SIN, XR, W, Y, h, r0, R, sX_r, sC_r,
               HX: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, FH: tl.constexpr,
               FHP: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, FEATURE_ROPE: tl.constexpr):
    """Rows r0..r0+BR of output head h: its input head ``h // G`` rotated (x cos + rotate_half(x) sin in fp32,
    rounded once to x's dtype, as inductor fuses it) into XR [R, HX, D] by the first of the G output heads that
    read it, and phi = [softmax(u), softmax(-u)] of u = x W into Y [R, H, 2 FH], x rotated or not (FEATURE_ROPE).
    COS, SIN [R, D] (row stride sC_r)."""
    rr = r0 + tl.arange(0, BR)
    r_ok = rr < R
    rf = tl.arange(0, FHP)
    f_ok = rf < FH
    x_rows = X + rr[:, None].to(tl.int64) * sX_r + (h // G) * D
    c_rows = rr[:, None].to(tl.int64) * sC_r
    writes = (h % G) == 0
    u = tl.zeros([BR, FHP], tl.float32)
    for d0 in tl.static_range(0, DP, BK):
        rd = d0 + tl.arange(0, BK)
        d_ok = rd < D
        ok = r_ok[:, None] & d_ok[None, :]
        first = rd < D // 2
        partner = tl.where(first, rd + D // 2, rd - D // 2)  # rotate_half: [-x2, x1]
        x = tl.load(x_rows + rd[None, :], mask=ok, other=0.0)
        xp = tl.load(x_rows + partner[None, :], mask=ok, other=0.0).to(tl.float32)
        c = tl.load(COS + c_rows + rd[None, :], mask=ok, other=0.0).to(tl.float32)
        s = tl.load(SIN + c_rows + rd[None, :], mask=ok, other=0.0).to(tl.float32)
        xr = (x.to(tl.float32) * c + tl.where(first, -xp, xp) * s).to(X.dtype.element_ty)
        tl.store(XR + rr[:, None].to(tl.int64) * (HX * D) + (h // G) * D + rd[None, :], xr, mask=ok & writes)
        w = tl.load(W + h * D * FH + rd[:, None] * FH + rf[None, :], mask=d_ok[:, None] & f_ok[None, :], other=0.0)
        xin = xr if FEATURE_ROPE else x
        if IEEE:
            u += tl.dot(xin, w, input_precision="ieee")
        else:
            u += tl.dot(xin, w)
    p1, p2 = _softmax_pair(u.to(X.dtype.element_ty).to(tl.float32), f_ok)
    out = Y + rr[:, None].to(tl.int64) * (G * HX * 2 * FH) + h * 2 * FH + rf[None, :]
    ok = r_ok[:, None] & f_ok[None, :]
    tl.store(out, p1.to(Y.dtype.element_ty), mask=ok)
    tl.store(out + FH, p2.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _rope_pair_kernel(
    XQ, XK, COS, SIN, WQ, WK, QR, KR, OQ, OK, R, sXQ_r, sXK_r, sC_r,
    HQX: tl.constexpr, HKX: tl.constexpr, GQ: tl.constexpr, GK: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, FH: tl.constexpr, FHP: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
    IEEE: tl.constexpr, FEATURE_ROPE: tl.constexpr,
):
    """RoPE on q and k and both maps, on the grid of ``_hedgehog_pair_kernel`` (the map heads, H = GQ HQX query
    then GK HKX key heads, fastest; then row blocks): q, k rotated into QR, KR and phi_q, phi_k into OQ, OK."""
    H = GQ * HQX
    pid = tl.program_id(0) % (H + GK * HKX)
    r0 = (tl.program_id(0) // (H + GK * HKX)) * BR
    if pid < H:
        _rope_rows(XQ, COS, SIN, QR, WQ, OQ, pid, r0, R, sXQ_r, sC_r, HQX, GQ, D, DP, FH, FHP, BR, BK, IEEE,
                   FEATURE_ROPE)
    else:
        _rope_rows(XK, COS, SIN, KR, WK, OK, pid - H, r0, R, sXK_r, sC_r, HKX, GK, D, DP, FH, FHP, BR, BK, IEEE,
                   FEATURE_ROPE)


def _pow2_at_least_16(n: int) -> int:
    """tl.dot takes dims of at least 16."""
    return max(16, _pow2(n))


def block_k(D: int, dtype: torch.dtype) -> int:
    """Head-dim slice per dot: 64 (16 in fp32), so W's tile stays in registers at D 256, f 128 (sm_90 compile
    of ``tests/ops/test_triton_decode_compile.py``: fp32 spilled at 32 x 32)."""
    return min(_pow2_at_least_16(D), 16 if dtype == torch.float32 else 64)


def default_block_rows(R: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Rows per program: 32 at most (several programs per head at decode batches; 16 in fp32, whose tiles are
    twice the registers), 16 at least (tl.dot)."""
    return min(16 if dtype == torch.float32 else 32, _pow2_at_least_16(R))


def _launch_pair(xq, xk, wq, wk, grads: tuple | None, block_rows: int, num_warps: int):
    """One launch of ``_hedgehog_pair_kernel`` over (the two maps' output heads, blocks of rows): the maps' outputs
    phi [B,T,H,2f] / [B,T,Hk,2f] (``grads`` None), or their du [B,T,H,f] / [B,T,Hk,f] from ``grads`` = (dy_q, dy_k),
    in x's dtype."""
    width = 2 if grads is None else 1
    B, T, Hq_in, D = xq.shape
    Hk_in = xk.shape[2]
    H, _, FH = wq.shape
    Hk = wk.shape[0]
    R = B * T
    xq2, xk2 = xq.reshape(R, Hq_in, D), xk.reshape(R, Hk_in, D)
    oq, ok = _pair_like(xq, xk, wq, wk, width)
    if R:
        dyq, dyk = (oq, ok) if grads is None else (g.contiguous() for g in grads)
        _hedgehog_pair_kernel[((H + Hk) * triton.cdiv(R, block_rows),)](
            xq2, xk2, wq, wk, dyq, dyk, oq, ok, R, xq2.stride(0), xk2.stride(0),
            H=H, HK=Hk, GQ=H // Hq_in, GK=Hk // Hk_in, D=D, DP=_pow2_at_least_16(D), FH=FH, FHP=_pow2_at_least_16(FH),
            BR=block_rows, BK=block_k(D, xq.dtype), IEEE=xq.dtype == torch.float32, BACKWARD=grads is not None,
            num_warps=num_warps,
        )
    return oq, ok


def _pair_like(xq, xk, wq, wk, width: int):
    """Uninitialized [B,T,H,width * f] and [B,T,Hk,width * f] in x's dtype and device (outputs, fakes, gradients)."""
    B, T = xq.shape[:2]
    return xq.new_empty(B, T, wq.shape[0], width * wq.shape[2]), xk.new_empty(B, T, wk.shape[0], width * wk.shape[2])


@torch.library.custom_op("linearize::hedgehog_pair", mutates_args=())
def _hedgehog_pair_op(xq: torch.Tensor, xk: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, block_rows: int,
                      num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch; shapes checked by ``hedgehog_pair_triton``. An opaque op to torch.compile, like the ring step."""
    return _launch_pair(xq, xk, wq, wk, None, block_rows, num_warps)


@_hedgehog_pair_op.register_fake
def _(xq, xk, wq, wk, block_rows, num_warps):
    return _pair_like(xq, xk, wq, wk, 2)


@torch.library.custom_op("linearize::hedgehog_pair_du", mutates_args=())
def _hedgehog_pair_du_op(xq: torch.Tensor, xk: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, dyq: torch.Tensor,
                         dyk: torch.Tensor, block_rows: int, num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """du [B,T,H,f] of both maps (x's dtype) from the output gradients dy [B,T,H,2f]: one launch."""
    return _launch_pair(xq, xk, wq, wk, (dyq, dyk), block_rows, num_warps)


@_hedgehog_pair_du_op.register_fake
def _(xq, xk, wq, wk, dyq, dyk, block_rows, num_warps):
    return _pair_like(xq, xk, wq, wk, 1)


def _projection_grads(x: torch.Tensor, w: torch.Tensor, du: torch.Tensor, need_x: bool, need_w: bool):
    """dx [B,T,Hx,D] and dW [H,D,f] of u = x W (``FeatureMap._project``) from du [B,T,H,f]: its einsum's backward."""
    B, T, Hx, D = x.shape
    H, _, FH = w.shape
    du5 = du.view(B, T, Hx, H // Hx, FH)
    dx = torch.einsum("bthgf,hgdf->bthd", du5, w.view(Hx, H // Hx, D, FH)) if need_x else None
    dw = torch.einsum("bthd,bthgf->hgdf", x, du5).reshape(H, D, FH) if need_w else None
    return dx, dw


def _pair_setup(ctx, inputs, output):
    xq, xk, wq, wk, block_rows, num_warps = inputs
    ctx.save_for_backward(xq, xk, wq, wk)
    ctx.launch = (block_rows, num_warps)


def _pair_backward(ctx, dyq, dyk):
    xq, xk, wq, wk = ctx.saved_tensors
    if dyq is None or dyk is None:  # an output the loss did not read
        zq, zk = (t.zero_() for t in _pair_like(xq, xk, wq, wk, 2))
        dyq, dyk = zq if dyq is None else dyq, zk if dyk is None else dyk
    duq, duk = _hedgehog_pair_du_op(xq, xk, wq, wk, dyq.to(xq.dtype), dyk.to(xk.dtype), *ctx.launch)
    need = ctx.needs_input_grad
    dxq, dwq = _projection_grads(xq, wq, duq, need[0], need[2])
    dxk, dwk = _projection_grads(xk, wk, duk, need[1], need[3])
    return dxq, dxk, dwq, dwk, None, None


_hedgehog_pair_op.register_autograd(_pair_backward, setup_context=_pair_setup)


def _pair_inputs(xq, xk, wq, wk):
    """The map kernels' inputs checked (one-line errors) and laid out as they read them: x's last two dims packed
    and one row stride over (B, T); the weights contiguous in x's dtype (as the map casts them)."""
    if xq.dim() != 4 or xk.dim() != 4 or xq.shape[:2] != xk.shape[:2] or xq.shape[3] != xk.shape[3]:
        raise ValueError(f"xq, xk must be [B, T, heads, D] with the same B, T, D; got {tuple(xq.shape)}, {tuple(xk.shape)}")
    if xq.dtype != xk.dtype:
        raise ValueError(f"xq and xk must share a dtype; got {xq.dtype}, {xk.dtype}")
    D = xq.shape[3]
    if wq.dim() != 3 or wk.dim() != 3 or wq.shape[1] != D or wk.shape[1:] != wq.shape[1:]:
        raise ValueError(f"weights must be [H, {D}, f] with one f; got {tuple(wq.shape)}, {tuple(wk.shape)}")
    if wq.shape[0] % xq.shape[2] or wk.shape[0] % xk.shape[2]:
        raise ValueError(f"map heads ({wq.shape[0]}, {wk.shape[0]}) must be multiples of the input heads "
                         f"({xq.shape[2]}, {xk.shape[2]})")
    if D > 256 or wq.shape[2] > 128:
        raise ValueError(f"the map kernel takes head dim <= 256 and f <= 128; got D={D}, f={wq.shape[2]}")
    xq, xk = (x if x.stride(3) == 1 and x.stride(2) == D else x.contiguous() for x in (xq, xk))
    # one row stride over (B, T): a [B, 1, H, D] view always has it; a longer T needs its rows evenly spaced
    xq, xk = (x if x.shape[1] == 1 or x.stride(0) == x.shape[1] * x.stride(1) else x.contiguous() for x in (xq, xk))
    return xq, xk, wq.to(xq.dtype).contiguous(), wk.to(xq.dtype).contiguous()


def hedgehog_pair_triton(
    xq: torch.Tensor, xk: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, *,
    block_rows: int | None = None, num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(HedgehogFeatureMap(wq)(xq), HedgehogFeatureMap(wk)(xk))`` in one launch, differentiable in all four
    inputs (the backward: one launch for both maps' du, then each projection's two GEMMs).

    xq [B,T,Hq,D], xk [B,T,Hk',D] (same dtype, last two dims packed: a view of a fused projection is
    fine); wq [H,D,f], wk [Hk,D,f] with H % Hq == 0 and Hk % Hk' == 0 (cast to x's dtype, as the map does).
    -> phi_q [B,T,H,2f], phi_k [B,T,Hk,2f] in x's dtype, contiguous.
    """
    xq, xk, wq, wk = _pair_inputs(xq, xk, wq, wk)
    R = xq.shape[0] * xq.shape[1]
    return _hedgehog_pair_op(xq, xk, wq, wk, block_rows or default_block_rows(R, xq.dtype), num_warps)


def _rows_of(t: torch.Tensor, B: int, T: int, D: int) -> tuple[torch.Tensor, int]:
    """cos or sin [B or 1, T, D] as rows [B T, D] and their stride (0 for a batch-broadcast one token)."""
    t = t.expand(B, T, D)
    if T == 1 and t.stride(2) == 1:
        return t, t.stride(0)
    return t.contiguous(), D


@torch.library.custom_op("linearize::rope_hedgehog_pair", mutates_args=())
def _rope_hedgehog_pair_op(xq: torch.Tensor, xk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, wq: torch.Tensor,
                           wk: torch.Tensor, feature_rope: bool, block_rows: int, num_warps: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch; shapes checked by ``rope_hedgehog_pair_triton``. No autograd (decode steps only)."""
    B, T, Hqx, D = xq.shape
    Hkx = xk.shape[2]
    R = B * T
    qr, kr = torch.empty_like(xq, memory_format=torch.contiguous_format), torch.empty_like(xk, memory_format=torch.contiguous_format)
    oq, ok = _pair_like(xq, xk, wq, wk, 2)
    if R:
        (cos2, sC), (sin2, sS) = _rows_of(cos, B, T, D), _rows_of(sin, B, T, D)
        if sC != sS:
            sin2, cos2, sC = sin2.contiguous(), cos2.contiguous(), D
        xq2, xk2 = xq.reshape(R, Hqx, D), xk.reshape(R, Hkx, D)
        H, Hk = wq.shape[0], wk.shape[0]
        FH = wq.shape[2]
        _rope_pair_kernel[((H + Hk) * triton.cdiv(R, block_rows),)](
            xq2, xk2, cos2, sin2, wq, wk, qr, kr, oq, ok, R, xq2.stride(0), xk2.stride(0), sC,
            HQX=Hqx, HKX=Hkx, GQ=H // Hqx, GK=Hk // Hkx, D=D, DP=_pow2_at_least_16(D), FH=FH,
            FHP=_pow2_at_least_16(FH), BR=block_rows, BK=block_k(D, xq.dtype), IEEE=xq.dtype == torch.float32,
            FEATURE_ROPE=feature_rope, num_warps=num_warps,
        )
    return qr, kr, oq, ok


@_rope_hedgehog_pair_op.register_fake
def _(xq, xk, cos, sin, wq, wk, feature_rope, block_rows, num_warps):
    oq, ok = _pair_like(xq, xk, wq, wk, 2)
    return torch.empty_like(xq, memory_format=torch.contiguous_format), torch.empty_like(xk, memory_format=torch.contiguous_format), oq, ok


def _rope_launch_env() -> tuple[int | None, int | None]:
    """``LINEARIZE_ROPE_LAUNCH=BR,W`` (read at import): rows a program (a power of two >= 16) and warps (1, 2, 4 or 8)
    of ``rope_hedgehog_pair_triton``'s default launch, to time whole decode steps at another launch than the
    default."""
    return launch_env("LINEARIZE_ROPE_LAUNCH", "rows,warps", "16,2",
                      lambda br, w: br >= 16 and not br & (br - 1) and w in (1, 2, 4, 8))


_ROPE_ROWS_ENV, _ROPE_WARPS_ENV = _rope_launch_env()

#: rows a program of ``rope_hedgehog_pair_triton`` by default: the fewest a dot takes, so that a decode batch spreads
#: over more programs. H100, ``benchmarks/tune_decode.py --rope-sweep`` at the 8B's heads with key maps per KV head
#: (B 64, CUDA graph, 2026-12-06): 5.3 us at 16 rows and 4 warps against 5.5 at 32 (6.4 at 64; 1 and 2 warps slower
#: at every row count); the whole 8B step 7.603 -> 7.585 ms (``gpu_decode_calls.sh 34``)
ROPE_BLOCK_ROWS = 16
ROPE_NUM_WARPS = 4


def rope_hedgehog_pair_triton(
    xq: torch.Tensor, xk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, *,
    feature_rope: bool = True, block_rows: int | None = None, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's RoPE and both Hedgehog maps in one launch, in place of RoPE's kernels and the map kernel
    (``hedgehog_pair_triton``): -> (q, k rotated, phi_q, phi_k).

    xq [B,T,Hq,D], xk [B,T,Hk',D] before RoPE (a view of a fused projection is fine); cos, sin [B or 1,T,D] (the
    model's ``position_embeddings``; RoPE as transformers' ``apply_rotary_pos_emb``: x cos + rotate_half(x) sin,
    over the whole head dim); wq [H,D,f], wk [Hk,D,f] as ``hedgehog_pair_triton`` takes them. The maps read q and
    k rotated (``feature_rope``, LoLCATs) or as given. No gradient: for steps under ``torch.no_grad``.
    ``block_rows``, ``num_warps``: the launch (default ``ROPE_BLOCK_ROWS`` and ``ROPE_NUM_WARPS``, or ``LINEARIZE_ROPE_LAUNCH``).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (xq, xk, cos, sin, wq, wk)):
        raise ValueError("rope_hedgehog_pair_triton has no backward; call it under torch.no_grad()")
    xq, xk, wq, wk = _pair_inputs(xq, xk, wq, wk)
    B, T, _, D = xq.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[-1] != D or t.shape[1] != T or t.shape[0] not in (1, B):
            raise ValueError(f"{name} must be [B or 1, T, {D}] (RoPE over the whole head dim); got {tuple(t.shape)}")
    if D % 2:
        raise ValueError(f"RoPE needs an even head dim; got {D}")
    cos, sin = cos.to(xq.dtype), sin.to(xq.dtype)
    return _rope_hedgehog_pair_op(xq, xk, cos, sin, wq, wk, feature_rope,
                                  block_rows or _ROPE_ROWS_ENV or ROPE_BLOCK_ROWS,
                                  num_warps or _ROPE_WARPS_ENV or ROPE_NUM_WARPS)
