"""The Triton Hedgehog map kernels' forward and backward on CUDA, at training shapes, against the maps' modules
(autograd) and an fp64 reference; and a stage-1 step through them against the modules' path.

Run: ``python3 -m pytest -q tests/gpu/test_feature_maps_cuda.py`` (skipped without CUDA).
Thresholds (METHOD.md): ||out - ref|| / ||ref|| < 1e-3 for fp32, < 1e-2 for bf16/fp16 inputs, against fp64.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from linearize.modules.feature_maps import HedgehogFeatureMap  # noqa: E402
from linearize.ops.triton.feature_maps import hedgehog_pair_triton, rope_hedgehog_pair_triton  # noqa: E402

from ..ops.helpers import random_hedgehog_maps, rel_err  # noqa: E402
from ..tiny_models import perturb_added_weights, tiny_model  # noqa: E402

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _run(maps, qkv, H, Hkv, D, dy, *, kernel: bool):
    """Outputs and the gradients of qkv and both weights (fp32 parameters, cast to qkv's dtype inside)."""
    x = qkv.detach().clone().requires_grad_()
    B, T = x.shape[:2]
    q, k, _ = x.view(B, T, -1, D).split([H, Hkv, Hkv], dim=2)
    ws = [m.weight.detach().clone().requires_grad_() for m in maps]
    if kernel:
        ys = hedgehog_pair_triton(q, k, *ws)
    else:
        ys = [torch.func.functional_call(m, {"weight": w}, (inp,)) for m, w, inp in zip(maps, ws, (q, k))]
    sum((y.double() * g.double()).sum() for y, g in zip(ys, dy)).backward()
    return [y.detach() for y in ys] + [x.grad] + [w.grad for w in ws]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,Hkv,D,f,per_q,feature_rope", [(32, 8, 128, 64, False, True), (32, 8, 128, 64, True, True),
                                                          (9, 3, 64, 64, True, False), (4, 1, 256, 64, True, True),
                                                          (14, 2, 64, 64, False, False)])
def test_rope_and_maps_in_one_launch_equal_fp64(H, Hkv, D, f, per_q, feature_rope, dtype):
    """A decode step's RoPE and both maps in one launch (B 64, one token), at the 8B's heads (key maps per KV head and per query head), SmolLM2, Gemma 3's D 256 and Qwen2.5:
    q, k rotated and phi_q, phi_k against fp64 RoPE (transformers' rotate-half form) and the maps' modules, and
    no further from fp64 than the model's own RoPE then the map kernel in the same dtype."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B = 64
    Hf = H if per_q else Hkv
    maps = [m.cuda() for m in random_hedgehog_maps(H, Hf, D, f, torch.Generator().manual_seed(H + D), D**-0.5)]
    g = torch.Generator(device="cuda").manual_seed(B + D)
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, device="cuda", generator=g).to(dtype)
    q, k, _ = qkv.view(B, 1, -1, D).split([H, Hkv, Hkv], dim=2)
    pos = torch.randint(0, 8192, (B, 1), device="cuda", generator=g).double()
    freq = 500000.0 ** (-torch.arange(0, D, 2, device="cuda", dtype=torch.float64) / D)
    ang = torch.cat([pos[..., None] * freq] * 2, -1)  # [B, 1, D]
    cos, sin = ang.cos(), ang.sin()

    def model_path(q, k, cos, sin, maps):  # what the step runs without the fusion
        qr, kr = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        fq, fk = (qr, kr) if feature_rope else (q, k)
        return qr, kr, maps[0](fq), maps[1](fk)

    with torch.no_grad():
        got = rope_hedgehog_pair_triton(q, k, cos.to(dtype), sin.to(dtype), maps[0].weight, maps[1].weight,
                                        feature_rope=feature_rope)
        qr, kr = apply_rotary_pos_emb(q, k, cos.to(dtype), sin.to(dtype), unsqueeze_dim=2)
        mod = (qr, kr) + hedgehog_pair_triton(*((qr, kr) if feature_rope else (q, k)), maps[0].weight, maps[1].weight)
        ref = model_path(q.double(), k.double(), cos, sin, [m.double() for m in maps])
    torch.cuda.synchronize()
    for name, a, m, r in zip(("q", "k", "phi_q", "phi_k"), got, mod, ref):
        assert torch.isfinite(a).all() and a.shape == m.shape and a.dtype == m.dtype, name
        assert rel_err(a, r) < TOL[dtype], f"{name}: rel err to fp64 {rel_err(a, r):.2e}"
        assert rel_err(a, r) <= max(1.5 * rel_err(m, r), 1e-6), f"{name}: {rel_err(a, r):.2e} vs unfused {rel_err(m, r):.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("H,Hkv,D,f,per_q", [(9, 3, 64, 64, True), (9, 3, 64, 64, False), (16, 16, 128, 64, True),
                                             (4, 1, 256, 64, True), (14, 2, 64, 128, False)])
def test_forward_and_backward_equal_the_modules_and_fp64(H, Hkv, D, f, per_q, dtype):
    """SmolLM2 with key maps per query head and per KV head, the issue-5 shape, Gemma 3's D 256, Qwen2.5 with
    f 128; B 2 x T 1000 (rows not a multiple of the block). Outputs and all four gradients against fp64 autograd
    through the modules, and no further from it than the modules in the same dtype are."""
    B, T = 2, 1000
    Hf = H if per_q else Hkv
    maps = [m.cuda() for m in random_hedgehog_maps(H, Hf, D, f, torch.Generator().manual_seed(H + D), D**-0.5)]
    g = torch.Generator(device="cuda").manual_seed(B + D)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device="cuda", generator=g).to(dtype)
    dy = [torch.randn(B, T, n, 2 * f, device="cuda", generator=g).to(dtype) for n in (H, Hf)]
    got = _run(maps, qkv, H, Hkv, D, dy, kernel=True)
    mod = _run(maps, qkv, H, Hkv, D, dy, kernel=False)
    ref = _run([m.double() for m in maps], qkv.double(), H, Hkv, D, [t.double() for t in dy], kernel=False)
    torch.cuda.synchronize()
    for name, a, m, r in zip(("phi_q", "phi_k", "d qkv", "d W_q", "d W_k"), got, mod, ref):
        assert torch.isfinite(a).all() and a.shape == m.shape and a.dtype == m.dtype, name
        assert rel_err(a, r) < TOL[dtype], f"{name}: rel err to fp64 {rel_err(a, r):.2e}"
        assert rel_err(a, r) <= max(1.5 * rel_err(m, r), 1e-6), f"{name}: {rel_err(a, r):.2e} vs the modules' {rel_err(m, r):.2e}"


@pytest.mark.parametrize("cfg", [{}, {"feature_map_per_kv_head": True, "sink_tokens": 2, "softmax_heads": [[1, 0]]}],
                         ids=["default", "kvmaps-sinks-kept-head"])
def test_transfer_step_through_the_map_kernel_equals_the_modules(monkeypatch, cfg):
    """Stage 1's loss and the maps' gradients, bf16 autocast as the pipeline trains, the chunk kernels on both
    ways: the map kernel against the modules (HedgehogFeatureMap.kernel = False)."""
    import linearize
    from linearize.pipelines.transfer import freeze_for_transfer, transfer_loss

    model = linearize.convert(tiny_model("llama"), linearize.LinearizeConfig(feature_dim=16, window=8, **cfg))
    perturb_added_weights(model)
    model.to("cuda", torch.bfloat16)  # a bf16 model (bf16 q, k into the maps) with fp32 masters of what trains
    ids = torch.randint(3, 96, (3, 200), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    params = freeze_for_transfer(model)
    for p in params.values():
        p.data = p.data.float()
    out = []
    for kernel in (True, False):
        monkeypatch.setattr(HedgehogFeatureMap, "kernel", kernel)
        model.zero_grad()
        loss = transfer_loss(model, ids)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in params.items() if "feature_map" in n}))
    (l1, g1), (l2, g2) = out
    assert torch.isfinite(l1) and rel_err(l1, l2) < 1e-2, (l1, l2)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        assert g1[n].abs().sum() > 0 and rel_err(g1[n], g2[n]) < 2e-2, (n, rel_err(g1[n], g2[n]))
