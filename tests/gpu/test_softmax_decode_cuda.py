"""The softmax decode kernel (kept softmax layers) on CUDA: against an fp64 reference, in a CUDA graph.

Run: ``python3 -m pytest -q tests/gpu/test_softmax_decode_cuda.py`` (skipped without CUDA).
Thresholds (METHOD.md): ||out - ref|| / ||ref|| < 1e-3 for fp32, < 1e-2 for bf16/fp16 inputs.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from linearize.ops.softmax_decode import softmax_decode_reference  # noqa: E402
from linearize.ops.triton.softmax_decode import softmax_decode_triton  # noqa: E402

from ..ops.helpers import rel_err  # noqa: E402

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def problem(B, H, Hkv, L, D, dtype, filled, pad, seed=0):
    """A static cache of L slots filled to ``filled``, rows left-padded by ``pad[b]``, NaN in every
    slot the mask hides (a kernel that reads them, even to weight them by 0, returns NaN)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=g).to("cuda", dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, L, D, generator=g).to("cuda", dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to("cuda", dtype)
    slots = torch.arange(L, device="cuda")
    mask = (slots[None] < filled) & (slots[None] >= torch.as_tensor(pad, device="cuda")[:, None])
    hidden = ~mask[:, None, :, None].expand_as(k)
    k_ref, v_ref = k.double(), v.double()
    k[hidden], v[hidden] = float("nan"), float("nan")
    return q, k, v, mask, k_ref, v_ref


@pytest.mark.parametrize("bounded", [False, True], ids=["branchy", "bounded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "B,H,Hkv,D,L,filled",
    [
        (64, 9, 3, 64, 4224, 1000),  # SmolLM2-135M's retrieval layers, a 128 + 4096 static cache
        (5, 14, 2, 64, 777, 777),  # Qwen2.5-0.5B, odd sizes, cache full
        (3, 4, 1, 256, 300, 45),  # Gemma 3's head dim, fewer keys than one block of every split
        (2, 16, 16, 128, 129, 129),  # no grouping
    ],
)
def test_kernel_against_fp64(B, H, Hkv, D, L, filled, dtype, bounded):
    pad = [(7 * b) % max(filled // 2, 1) for b in range(B)]
    q, k, v, mask, k_ref, v_ref = problem(B, H, Hkv, L, D, dtype, filled, pad, seed=B + D)
    y = softmax_decode_triton(q, k, v, mask, scale=D**-0.5, bounded=bounded)
    ref = softmax_decode_reference(q.double(), k_ref, v_ref, mask, scale=D**-0.5)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < TOL[dtype], f"rel err {rel_err(y, ref):.2e}"


def test_no_mask_and_every_launch():
    q, k, v, _, k_ref, v_ref = problem(4, 8, 2, 300, 64, torch.bfloat16, 300, [0] * 4)
    ref = softmax_decode_reference(q.double(), k_ref, v_ref)
    for block_n, splits in ((16, 1), (32, 5), (64, 3), (64, 32)):
        y = softmax_decode_triton(q, k, v, block_n=block_n, splits=splits)
        assert rel_err(y, ref) < TOL[torch.bfloat16], (block_n, splits)


@pytest.mark.parametrize("bounded", [False, True], ids=["branchy", "bounded"])
def test_a_cuda_graph_follows_the_mask(bounded):
    """Captured once, replayed as the cache fills: the mask (a fixed buffer, updated in place) is all that
    tells the kernel how many slots to read."""
    B, H, Hkv, L, D = 8, 9, 3, 512, 64
    q, k, v, mask, k_ref, v_ref = problem(B, H, Hkv, L, D, torch.bfloat16, L, [0] * B)
    k, v = k_ref.to(torch.bfloat16), v_ref.to(torch.bfloat16)
    mask_buf = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    mask_buf[:, :10] = True
    softmax_decode_triton(q, k, v, mask_buf, bounded=bounded)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = softmax_decode_triton(q, k, v, mask_buf, bounded=bounded)
    for filled in (10, 11, 200, 512):
        mask_buf.zero_()
        mask_buf[:, :filled] = True
        g.replay()
        ref = softmax_decode_reference(q.double(), k.double(), v.double(), mask_buf)
        assert rel_err(y, ref) < TOL[torch.bfloat16], f"filled {filled}"
