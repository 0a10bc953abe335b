"""The decode form of the hybrid state: fixed-size ring buffers, updated in place.

``HybridState`` keeps the window tail in order and grows it up to ``window - 1`` keys, so a decode step
allocates new tensors every token. For decode (and CUDA graphs) the tail lives in a ring of
``W = window`` slots instead (``W = 0`` for ``window <= 1``): ``window - 1`` slots hold the tail and one
slot is free for the incoming key. The softmax over the window does not depend on the keys' order, so
a ring gives the same outputs as the ordered tail.

Ring invariants, with ``p = pos`` (a device scalar: tokens written to the ring so far):
  * the next key is written to slot ``p % W``; that slot's old content (if any) is already in S, z;
  * the tail, oldest first, is slots ``(p - n) % W, ..., (p - 1) % W`` with ``n = min(p, W - 1)``;
    unfilled slots hold zeros with ``mask`` False, so they count for nothing anywhere;
  * a step reads the window (tail + new key), then absorbs slot ``(p + 1) % W`` (the oldest tail key,
    or an empty slot while the tail is not full) into S, z.
``z`` is double-buffered: ``z[p % 2]`` is current and a step writes ``z[(p + 1) % 2]``, so that a
kernel whose programs all read z can update it without a race (see ``triton/decode.py``).

**Deferred folding** (``fold = P > 1``). Absorbing one key a step rewrites all of S every step: a step's bytes are
S read + S written + the window. With ``P`` the ring keeps ``P - 1`` more slots (``W + P - 1`` in all), and a key
that leaves the window waits there, read out as an explicit linear term (``phi_q . phi_k`` times its value) until
``P`` keys have left; they are then folded into S, z at once. S is then written once every ``P`` steps and read
every step, at the cost of reading up to ``P - 1`` waiting keys' features and values a step. With
``a = p - W + 1`` (keys out of the window at step ``p``), positions ``< P * floor(a / P)`` are in S, the
``a mod P`` after them wait in the ring (ages ``W .. W + (a mod P) - 1``, age = ``p`` minus the position), and
a step whose ``a + 1`` is a multiple of ``P`` folds ages ``W - 1 .. W + P - 2`` after its readout. Everything is a
function of ``pos``: no host sync, the same kernel launch every step. ``P = 1`` is the eager absorb above.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .common import check_inputs, compute_dtype, default_scale, key_mask, safe_divide, window_exp, window_weight_vector
from .state import HybridState


def ring_slots(window: int, fold: int = 1) -> int:
    """Slots of the ring for ``window``: the tail (window - 1), one for the new key and ``fold - 1`` for keys that
    left the window and wait to be folded into S; 0 if window <= 1 (no ring, nothing waits)."""
    return window + fold - 1 if window >= 2 else 0


def check_fold(fold: int) -> int:
    if not isinstance(fold, int) or isinstance(fold, bool) or fold < 1:
        raise ValueError(f"fold (steps between writes of the linear sums) must be an int >= 1; got {fold!r}")
    return fold


#: ``LINEARIZE_DECODE_FOLD=P`` (read at import) sets the fold period rings get by default, to time whole decode steps
_FOLD_ENV = os.environ.get("LINEARIZE_DECODE_FOLD")


def default_fold(window: int, device: torch.device | str | None = None, *, D: int = 0, F: int = 0) -> int:
    """Steps between writes of S in decode (``RingState.fold``) for a ring on ``device`` with head dim ``D`` and
    ``F`` key features; ``LINEARIZE_DECODE_FOLD`` overrides it on every device.

    8 on CUDA for 128-column heads with F > 64 (the kernel streams S in row chunks there, and reads a feature head
    out for its query heads in one dot). H100, ``benchmarks/tune_decode.py --fold`` (2026-12-06, B 64, CUDA graph):
    the issue-5 heads (key maps per query head, D = F = 128) 67.7 -> 55.8 us (fold 6: 55.5, 16: 58.2, 32: 64.9);
    Llama-3.1-8B's heads with key maps per KV head, query heads as dot rows, 43.4 -> 39.6 us. 1 elsewhere: where a
    feature head is read out for its query heads one by one (8B heads without the dots 51.7 -> 63.0 us), at
    64-column heads (SmolLM2's 25.7 -> 26.6, Qwen2.5's per KV head 25.2 -> 40.2) and where it was not timed
    (Gemma's 256). CPU: 1 (a step there is not bound by the state's bytes)."""
    if window < 2:
        return 1
    if _FOLD_ENV:
        return check_fold(int(_FOLD_ENV))
    if device is not None and torch.device(device).type == "cuda" and D == 128 and F > 64:
        return 8
    return 1


def fold_phase(pos: torch.Tensor, window: int, fold: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys waiting in the ring before the step at ``pos``, whether that step folds), as device tensors like
    ``pos``; see the module docstring. No host sync."""
    a = pos - window + 1
    waiting = torch.where(a >= 0, a % fold, torch.zeros_like(a))
    return waiting, (a >= 0) & (waiting == fold - 1)


@dataclass(frozen=True)
class RingState:
    """A ``HybridState`` in decode form. Tensors are updated in place by a step; shapes never change.

    Shapes (``W = ring_slots(window, fold)``, ``H'`` = key feature heads):
        S      [B, H', F, D]   float32 (float64 in fp64 tests), the linear sums
        z      [2, B, H', F]   same dtype as S; ``z[pos % 2]`` is the current key sum
        k, v   [B, W, Hkv, D]  the ring of window keys / values (model dtype)
        phi_k  [B, W, H', F]   their features
        mask   [B, W]          bool, True where a slot holds a valid (non-padding) key
        pos    [1]             int64 on the state's device: tokens written to the ring
    """

    S: torch.Tensor
    z: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    phi_k: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    window: int
    fold: int = 1  # steps between writes of S (module docstring: deferred folding)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def window_slots(self) -> int:
        """Slots the window takes (the tail and the new key): ``window``, or 0 without a ring."""
        return ring_slots(self.window)

    @property
    def batch_size(self) -> int:
        return self.S.shape[0]

    def _map(self, fn) -> "RingState":
        t = [fn(x) for x in (self.S, self.z.transpose(0, 1), self.k, self.v, self.phi_k, self.mask)]
        t[1] = t[1].transpose(0, 1).contiguous()
        return RingState(*t, pos=self.pos, window=self.window, fold=self.fold)

    def clone(self) -> "RingState":
        """An independent copy, ``pos`` included (a step's reference side, or a snapshot before timing)."""
        return RingState(*(t.clone() for t in (self.S, self.z, self.k, self.v, self.phi_k, self.mask, self.pos)),
                         window=self.window, fold=self.fold)

    def index_batch(self, index: torch.Tensor) -> "RingState":
        """Select / reorder / repeat sequences (beam search, batch pruning). All sequences share ``pos``."""
        return self._map(lambda t: t.index_select(0, index.to(t.device)).contiguous())

    def to(self, device: torch.device | str) -> "RingState":
        r = self._map(lambda t: t.to(device, non_blocking=True))
        return RingState(r.S, r.z, r.k, r.v, r.phi_k, r.mask, pos=self.pos.to(device), window=self.window, fold=self.fold)


def ring_from_state(state: HybridState, window: int, fold: int | None = None) -> RingState:
    """Copy an ordered ``HybridState`` (tail of L <= window - 1 keys) into a fresh ring. No host sync. ``fold``:
    steps between writes of S (default ``default_fold``; 1 where window <= 1)."""
    fold = default_fold(window, state.S.device, D=state.S.shape[3], F=state.S.shape[2]) if fold is None else check_fold(fold)
    if window < 2:
        fold = 1
    W = ring_slots(window, fold)
    B, L = state.k.shape[:2]
    if L > max(window - 1, 0):
        raise ValueError(f"state holds {L} window keys but window={window} keeps at most {max(window - 1, 0)}")
    Hkv, D = state.k.shape[2:]
    Hf, F = state.phi_k.shape[2:]
    dev = state.S.device

    def ring(tail: torch.Tensor) -> torch.Tensor:
        r = tail.new_zeros((B, W) + tuple(tail.shape[2:]))
        r[:, :L] = tail
        return r

    z = state.z.new_zeros((2,) + tuple(state.z.shape))
    z[L % 2] = state.z
    return RingState(
        S=state.S.clone().contiguous(),
        z=z,
        k=ring(state.k),
        v=ring(state.v),
        phi_k=ring(state.phi_k),
        mask=ring(state.mask),
        pos=torch.full((1,), L, dtype=torch.int64, device=dev),
        window=window,
        fold=fold,
    )


def _slots_of_ages(pos: torch.Tensor, ages: torch.Tensor, slots: int) -> torch.Tensor:
    """Ring slots [n] holding the keys ``ages`` [n] steps older than position ``pos`` (the new key is age 0)."""
    return (pos - ages) % slots


def _waiting_sums(ring: RingState, ages: torch.Tensor, take: torch.Tensor, ct: torch.dtype):
    """The sums of the ring's keys at ``ages`` [n] where ``take`` [n] (and their mask): ([B, H', F, D], [B, H', F])."""
    idx = _slots_of_ages(ring.pos, ages, ring.slots)
    ok = ring.mask.index_select(1, idx) & take.view(1, -1)  # [B, n]
    pk = torch.where(ok[..., None, None], ring.phi_k.index_select(1, idx).to(ct), 0)  # [B, n, H', F]
    vv = torch.where(ok[..., None, None], ring.v.index_select(1, idx).to(ct), 0)  # [B, n, Hkv, D]
    Hf, Hkv = pk.shape[2], vv.shape[2]
    vv = vv.repeat_interleave(Hf // Hkv, dim=2)  # key feature head f reads KV head f // (H' / Hkv)
    return torch.einsum("bnhf,bnhd->bhfd", pk, vv), pk.sum(1)


def ring_to_state(ring: RingState) -> HybridState:
    """The ordered ``HybridState`` of a ring (copies; keys waiting to be folded are added to the sums). Reads
    ``pos`` on the host: one sync, outside decode."""
    p = int(ring.pos.item())
    W = ring.window_slots
    n = min(p, max(W - 1, 0))
    dev = ring.k.device
    idx = (torch.arange(p - n, p, device=dev) % ring.slots) if W else torch.zeros(0, dtype=torch.long, device=dev)
    S, z = ring.S.clone(), ring.z[p % 2].clone()
    if ring.fold > 1:
        waiting, _ = fold_phase(ring.pos, W, ring.fold)
        ages = torch.arange(W, W + ring.fold - 1, device=dev)
        dS, dz = _waiting_sums(ring, ages, ages - W < waiting, S.dtype)
        S, z = S + dS, z + dz
    return HybridState(
        S=S,
        z=z,
        k=ring.k.index_select(1, idx),
        v=ring.v.index_select(1, idx),
        phi_k=ring.phi_k.index_select(1, idx),
        mask=ring.mask.index_select(1, idx),
    )


def ring_tail_mask(ring: RingState) -> torch.Tensor:
    """Validity [B, max(W - 1, 0)] of the tail, oldest first, as it stands before a step. No host sync.

    Ages ``W - 1, ..., 1`` (``W`` window slots): the tail of ``min(p, W - 1)`` keys, preceded (while it is not full)
    by never-written slots, which are False. The new key's slot is left out: its old key is already in the sums."""
    W = ring.window_slots
    if W == 0:
        return ring.mask[:, :0]
    idx = _slots_of_ages(ring.pos, torch.arange(W - 1, 0, -1, device=ring.pos.device), ring.slots)
    return ring.mask.index_select(1, idx)


def check_ring(ring: RingState, q, k, v, phi_q, phi_k):
    """Shapes of the step's inputs against the ring; returns the ``Dims``. Host-side only (no sync)."""
    d = check_inputs(q, k, v, phi_q, phi_k, ring.window)
    if d.T != 1:
        raise ValueError(f"a ring decode step takes one token per sequence; got T={d.T}")
    check_fold(ring.fold)
    if ring.window < 2 and ring.fold != 1:
        raise ValueError(f"a ring for window={ring.window} holds no keys, so its fold must be 1; got {ring.fold}")
    W = ring_slots(ring.window, ring.fold)
    want = {
        "S": (ring.S, (d.B, d.Hf, d.F, d.D)),
        "z": (ring.z, (2, d.B, d.Hf, d.F)),
        "k": (ring.k, (d.B, W, d.Hkv, d.D)),
        "v": (ring.v, (d.B, W, d.Hkv, d.D)),
        "phi_k": (ring.phi_k, (d.B, W, d.Hf, d.F)),
        "mask": (ring.mask, (d.B, W)),
        "pos": (ring.pos, (1,)),
    }
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"ring {name} must be {shape} for these inputs; got {tuple(t.shape)}")
    return d


def ring_step_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    ring: RingState,
    *,
    window_weight: float | torch.Tensor,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    advance: bool = True,
) -> torch.Tensor:
    """One decode token against ``ring``, updating it in place; same math as ``hybrid_attention_step``.

    Shapes: q [B,1,H,D], k/v [B,1,Hkv,D], phi_q [B,1,H,F], phi_k [B,1,H',F], attention_mask [B,1].
    Returns y [B,1,H,D] in q's dtype. Plain PyTorch, no host sync: the reference for the Triton kernel.
    ``advance`` False leaves ``ring.pos`` to the caller, who must add 1 before the ring's next step (a compiled
    step advances every layer's ring in one op: ``linearize.decode``).
    """
    d = check_ring(ring, q, k, v, phi_q, phi_k)
    window = ring.window
    W, R, P = ring.window_slots, ring.slots, ring.fold
    ct = compute_dtype(q)
    scale = default_scale(scale, d.D)
    gamma = window_weight_vector(window_weight, d.H, ct, q.device).view(1, d.Hkv, d.G, 1)
    valid = key_mask(attention_mask, d.B, 1, q.device)  # [B,1]
    pos = ring.pos
    par = pos % 2

    qg = q.to(ct).view(d.B, d.Hkv, d.G, d.D)
    pq = phi_q.to(ct).view(d.B, d.Hkv, d.G, d.F)
    S = ring.S.to(ct).view(d.B, d.Hkv, d.Gk, d.F, d.D)
    z = ring.z.index_select(0, par)[0].to(ct).view(d.B, d.Hkv, d.Gk, d.F)

    def absorb(S, z, pk, vv, ok):
        """Add keys pk [B,H',F] with values vv [B,Hkv,D] where ok [B] (masked with where: no 0 * inf)."""
        pk = torch.where(ok.view(-1, 1, 1), pk.to(ct), 0).view(d.B, d.Hkv, d.Gk, d.F)
        vv = torch.where(ok.view(-1, 1, 1), vv.to(ct), 0).view(d.B, d.Hkv, 1, 1, d.D)
        return S + pk.unsqueeze(-1) * vv, z + pk

    def ages_sums(lo, hi, take):
        """The sums of the ring's keys of ages lo .. hi - 1 where ``take`` [hi - lo], viewed as S and z are."""
        dS, dz = _waiting_sums(ring, torch.arange(lo, hi, device=pos.device), take, ct)
        return dS.view(S.shape), dz.view(z.shape)

    if window == 0:  # the new key is in the linear set of its own query
        S, z = absorb(S, z, phi_k[:, 0], v[:, 0], valid[:, 0])
    if P > 1:  # the keys waiting to be folded are linear keys: read out with S, z (which they are not in yet)
        waiting, do_fold = fold_phase(pos, W, P)
        wS, wz = ages_sums(W, W + P - 1, torch.arange(P - 1, device=pos.device) < waiting)
        num = (pq.unsqueeze(-2) @ (S + wS)).squeeze(-2)
        den = (pq * (z + wz)).sum(-1)
    else:
        num = (pq.unsqueeze(-2) @ S).squeeze(-2)  # [B,Hkv,G,D]
        den = (pq * z).sum(-1)
    if W:  # the new key takes the free slot; the window is then its W newest slots (the whole ring if P = 1)
        ns = pos % R
        ring.k.index_copy_(1, ns, k.to(ring.k.dtype))
        ring.v.index_copy_(1, ns, v.to(ring.v.dtype))
        ring.phi_k.index_copy_(1, ns, phi_k.to(ring.phi_k.dtype))
        ring.mask.index_copy_(1, ns, valid)
        win = _slots_of_ages(pos, torch.arange(W, device=pos.device), R)
        kw, vw, allowed = ring.k.index_select(1, win), ring.v.index_select(1, win), ring.mask.index_select(1, win)
    else:
        kw, vw, allowed = k, v, valid
    if window >= 1:
        n = kw.shape[1]
        kw = kw.to(ct).permute(0, 2, 1, 3)  # [B,Hkv,n,D]
        vw = vw.to(ct).permute(0, 2, 1, 3)
        s = scale * (qg @ kw.transpose(-1, -2))  # [B,Hkv,G,n]
        p = window_exp(s, allowed.view(d.B, 1, 1, n))
        num = num + gamma * (p @ vw)
        den = den + gamma.squeeze(-1) * p.sum(-1)
    y = safe_divide(num, den).reshape(d.B, 1, d.H, d.D).to(q.dtype)

    if window == 1:  # the new key leaves the window right after its own query
        S, z = absorb(S, z, phi_k[:, 0], v[:, 0], valid[:, 0])
    elif W and P == 1:  # the oldest tail key (an empty slot while the tail fills) joins the sums
        ev = (pos + 1) % W
        S, z = absorb(S, z, ring.phi_k.index_select(1, ev)[:, 0], ring.v.index_select(1, ev)[:, 0], ring.mask.index_select(1, ev)[:, 0])
    elif W:  # every P-th step: the P - 1 waiting keys and the one leaving the window join the sums
        fS, fz = ages_sums(W - 1, R, do_fold.expand(P))
        S, z = S + fS, z + fz
    ring.S.copy_(S.view(ring.S.shape))
    ring.z.index_copy_(0, 1 - par, z.reshape(1, d.B, d.Hf, d.F).to(ring.z.dtype))
    if advance:
        ring.pos.add_(1)
    return y


def ring_kernel_serves(q, k, v, phi_q, phi_k, state: RingState | HybridState) -> bool:
    """Whether the Triton decode kernel takes a step of these inputs against ``state`` (a ring, or the
    ordered state about to become one): the fused kernels serve the inputs (CUDA, triton, and
    ``LINEARIZE_KERNELS`` is not ``torch``; see ``linearize.ops.use_triton``), the sums are fp32 and the
    tail's dtypes are the inputs'."""
    from . import use_triton

    return (
        use_triton(q, phi_q)
        and state.S.dtype == torch.float32
        and (state.k.dtype, state.v.dtype, state.phi_k.dtype) == (k.dtype, v.dtype, phi_k.dtype)
    )


def ring_step(q, k, v, phi_q, phi_k, ring: RingState, *, window_weight=None, window_logit=None, scale=None,
              attention_mask=None, kernel: bool = True, advance: bool = True) -> torch.Tensor:
    """One in-place decode step: the Triton kernel where it serves (``ring_kernel_serves``) and ``kernel``
    allows it, else ``ring_step_torch``. Shapes and ``advance`` as ``ring_step_torch``; no host sync either way.
    gamma is ``window_weight``, or ``sigmoid(window_logit.float())`` (exactly one given; the kernel takes that
    sigmoid inside its launch)."""
    if (window_weight is None) == (window_logit is None):
        raise ValueError("ring_step takes one of window_weight and window_logit")
    args = dict(scale=scale, attention_mask=attention_mask, advance=advance)
    if kernel and ring_kernel_serves(q, k, v, phi_q, phi_k, ring):
        from .triton.decode import ring_step_triton

        return ring_step_triton(q, k, v, phi_q, phi_k, ring, window_weight=window_weight, window_logit=window_logit, **args)
    if window_logit is not None:
        window_weight = torch.sigmoid(window_logit.float())
    return ring_step_torch(q, k, v, phi_q, phi_k, ring, window_weight=window_weight, **args)
