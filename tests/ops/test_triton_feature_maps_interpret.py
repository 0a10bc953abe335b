"""The Triton Hedgehog map kernels' forward and backward under Triton's CPU interpreter, against the modules'
autograd, at tiny shapes; and a linearized layer that uses them for training. (bf16 is left to the GPU tests:
the interpreter computes it through numpy, which has no bf16.)"""

import pytest
import torch

from tests.ops.helpers import inside, interpreter_run_test, needs_triton, random_hedgehog_maps, rel_err

pytestmark = needs_triton


test_interpreter_run = interpreter_run_test(__file__, timeout=900, skips=True)


def _maps_and_inputs(B, T, H, Hkv, Hk, D, f, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mq, mk = (m.to(dtype) for m in random_hedgehog_maps(H, Hk, D, f, g, 0.4))
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(dtype)
    return mq, mk, qkv, g


@inside
@pytest.mark.parametrize(
    "B,T,H,Hkv,Hk,D,f,dtype,tol",
    [(2, 19, 4, 2, 4, 16, 8, torch.float32, 1e-5),  # key maps per query head over 2 KV heads (G = 2); rows: 38 over 3 programs
     (3, 7, 4, 2, 2, 24, 5, torch.float32, 1e-5),  # key maps per KV head; D, f not powers of two
     (1, 33, 6, 2, 6, 16, 16, torch.float16, 2e-3),  # G = 3, the last program partial
     (2, 1, 3, 3, 3, 40, 20, torch.float16, 2e-3)],  # a decode-like step, MHA
)
def test_forward_and_gradients_equal_the_modules(B, T, H, Hkv, Hk, D, f, dtype, tol):
    """Outputs, and the gradients of both inputs (views of one fused projection: strided heads) and both weights
    (fp32 parameters, cast as the modules cast them) under a random output gradient, against autograd through
    ``HedgehogFeatureMap``."""
    from linearize.ops.triton.feature_maps import hedgehog_pair_triton

    mq, mk, qkv, g = _maps_and_inputs(B, T, H, Hkv, Hk, D, f, dtype, seed=B * T + D)
    wq, wk = (m.weight.detach().float().clone().requires_grad_() for m in (mq, mk))
    results = []
    for kernel in (False, True):
        x = qkv.clone().requires_grad_()
        q, k, _ = x.view(B, T, -1, D).split([H, Hkv, Hkv], dim=2)
        for m, w in ((mq, wq), (mk, wk)):  # the modules read fp32 weights too, so both paths cast the same way
            m.weight = torch.nn.Parameter(w.detach().clone())
        if kernel:
            yq, yk = hedgehog_pair_triton(q, k, wq, wk, block_rows=16)
        else:
            yq, yk = mq(q), mk(k)
        gq = torch.randn(yq.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        gk = torch.randn(yk.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        ((yq.float() * gq.float()).sum() + (yk.float() * gk.float()).sum()).backward()
        grads = (x.grad, wq.grad.clone(), wk.grad.clone()) if kernel else (x.grad, mq.weight.grad, mk.weight.grad)
        results.append((yq.detach(), yk.detach()) + grads)
        wq.grad = wk.grad = None
    names = ("phi_q", "phi_k", "d qkv", "d W_q", "d W_k")
    for name, ref, got in zip(names, *results):
        assert got.shape == ref.shape and got.dtype == ref.dtype and torch.isfinite(got).all(), name
        assert rel_err(got, ref) < tol, f"{name}: rel err {rel_err(got, ref):.2e}"


@inside
def test_weights_only_and_one_map_used():
    """Stage 1 trains the maps on frozen inputs: only the weights' gradients are asked for; a loss that reads
    only phi_k leaves phi_q's gradient undefined, and W_q gets zeros."""
    from linearize.ops.triton.feature_maps import hedgehog_pair_triton

    mq, mk, qkv, _ = _maps_and_inputs(2, 9, 4, 2, 2, 16, 8, torch.float32, seed=3)
    q, k, _ = qkv.view(2, 9, -1, 16).split([4, 2, 2], dim=2)
    wq, wk = (m.weight.detach().clone().requires_grad_() for m in (mq, mk))
    _, yk = hedgehog_pair_triton(q, k, wq, wk)
    yk.square().sum().backward()
    mk.weight.grad = None
    mk(k).square().sum().backward()
    assert rel_err(wk.grad, mk.weight.grad) < 1e-5 and torch.equal(wq.grad, torch.zeros_like(wq))


@inside
def test_ops_pass_opcheck():
    """Schemas, fake kernels and the autograd registration, as torch.compile relies on them."""
    from linearize.ops.triton.feature_maps import _hedgehog_pair_du_op, _hedgehog_pair_op, _rope_hedgehog_pair_op

    mq, mk, qkv, g = _maps_and_inputs(2, 5, 4, 2, 4, 16, 8, torch.float32, seed=4)
    q, k, _ = qkv.view(2, 5, -1, 16).split([4, 2, 2], dim=2)
    q, k = q.contiguous().requires_grad_(), k.contiguous().requires_grad_()
    wq, wk = (m.weight.detach().clone().requires_grad_() for m in (mq, mk))
    torch.library.opcheck(_hedgehog_pair_op, (q, k, wq, wk, 16, 4))
    dyq, dyk = torch.randn(2, 5, 4, 16, generator=g), torch.randn(2, 5, 4, 16, generator=g)
    torch.library.opcheck(_hedgehog_pair_du_op, (q.detach(), k.detach(), wq.detach(), wk.detach(), dyq, dyk, 16, 4))
    cos, sin = _rope(5, 16, 2, torch.float32, seed=1)  # RoPE + maps: no autograd (decode steps only)
    torch.library.opcheck(_rope_hedgehog_pair_op, (q.detach(), k.detach(), cos, sin, wq.detach(), wk.detach(), True, 16, 4))


def _rope(T, D, B, dtype, seed, batch_broadcast=False):
    """cos, sin [B or 1, T, D] as transformers' Llama rotary embedding makes them, at random positions."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rot = LlamaRotaryEmbedding(LlamaConfig(head_dim=D, hidden_size=4 * D, num_attention_heads=4))
    pos = torch.randint(0, 5000, (1 if batch_broadcast else B, T), generator=torch.Generator().manual_seed(seed))
    return rot(torch.zeros(1, dtype=dtype), pos)


@inside
@pytest.mark.parametrize(
    "B,T,H,Hkv,Hk,D,f,dtype,feature_rope,bcast,tol",
    [(5, 1, 4, 2, 2, 16, 8, torch.float32, True, False, 1e-5),  # a decode step, key maps per KV head
     (3, 1, 4, 2, 4, 24, 5, torch.float32, True, True, 1e-5),  # key maps per query head (G = 2); D, f not powers of 2;
                                                                 # one cos row for the batch (stride 0)
     (2, 7, 6, 2, 2, 16, 16, torch.float16, True, False, 2e-3),  # several tokens, G = 3, the last program partial
     (4, 1, 3, 3, 3, 40, 20, torch.float32, False, False, 1e-5)],  # the maps read q, k before RoPE
)
def test_rope_and_maps_in_one_launch_equal_transformers_rope_and_the_modules(B, T, H, Hkv, Hk, D, f, dtype,
                                                                             feature_rope, bcast, tol):
    """q, k rotated as ``apply_rotary_pos_emb`` does (inputs: views of one fused projection) and the two maps of
    what the layer's ``feature_rope`` says they read, against transformers and ``HedgehogFeatureMap`` (with G map
    heads over one input head, the first of them writes its rotation)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from linearize.ops.triton.feature_maps import rope_hedgehog_pair_triton

    mq, mk, qkv, _ = _maps_and_inputs(B, T, H, Hkv, Hk, D, f, dtype, seed=B * T + D)
    q, k, _ = qkv.view(B, T, -1, D).split([H, Hkv, Hkv], dim=2)
    cos, sin = _rope(T, D, B, dtype, seed=D, batch_broadcast=bcast)
    with torch.no_grad():
        qr, kr = apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float(), unsqueeze_dim=2)
        qr, kr = qr.to(dtype), kr.to(dtype)  # rounded once, as inductor's fused RoPE does
        want = (qr, kr, mq(qr if feature_rope else q), mk(kr if feature_rope else k))
        got = rope_hedgehog_pair_triton(q, k, cos, sin, mq.weight, mk.weight, feature_rope=feature_rope, block_rows=16)
    for name, ref, out in zip(("q", "k", "phi_q", "phi_k"), want, got):
        assert out.shape == ref.shape and out.dtype == ref.dtype and torch.isfinite(out).all(), name
        assert rel_err(out, ref) < tol, f"{name}: rel err {rel_err(out, ref):.2e}"


@inside
def test_rope_and_maps_refuse_what_they_cannot_do():
    """No backward, RoPE over part of the head, an odd head dim: one-line errors, not wrong numbers."""
    from linearize.ops.triton.feature_maps import rope_hedgehog_pair_triton

    mq, mk, qkv, _ = _maps_and_inputs(2, 1, 4, 2, 2, 16, 8, torch.float32, seed=0)
    q, k, _ = qkv.view(2, 1, -1, 16).split([4, 2, 2], dim=2)
    cos, sin = _rope(1, 16, 2, torch.float32, seed=0)
    with pytest.raises(ValueError, match="no backward"):
        rope_hedgehog_pair_triton(q, k, cos, sin, mq.weight, mk.weight)
    with torch.no_grad(), pytest.raises(ValueError, match="whole head dim"):
        rope_hedgehog_pair_triton(q, k, cos[..., :8], sin[..., :8], mq.weight, mk.weight)


@inside
@pytest.mark.parametrize("cfg", [{}, {"feature_map_per_kv_head": True, "sink_tokens": 2, "softmax_heads": [[1, 0]]}],
                         ids=["default", "kvmaps-sinks-kept-head"])
def test_a_transfer_step_through_the_kernel_equals_the_modules(monkeypatch, cfg):
    """A linearized tiny llama with the kernels made to serve on CPU: stage 1's loss (each layer's hybrid output
    against its softmax output) and the maps' gradients equal the modules' path; the kernel ran once a layer in
    the forward and once in the backward."""
    import linearize
    import linearize.ops as ops
    from linearize.modules.feature_maps import HedgehogFeatureMap
    from linearize.ops.triton import feature_maps as fmk
    from linearize.pipelines.transfer import freeze_for_transfer, transfer_loss
    from tests.tiny_models import perturb_added_weights, tiny_model

    monkeypatch.setattr(ops, "use_triton", lambda q, phi_q: False)  # the chunk kernels stay off (PyTorch path);
    monkeypatch.setattr("linearize.modules.attention.use_triton", lambda q, phi_q: True)  # only the maps run Triton
    launches = {"fwd": 0, "du": 0}
    pair_kernel = fmk._hedgehog_pair_kernel

    class Spy:  # counts launches by direction
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches["du" if kwargs["BACKWARD"] else "fwd"] += 1
                return pair_kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(fmk, "_hedgehog_pair_kernel", Spy())
    model = linearize.convert(tiny_model("llama"), linearize.LinearizeConfig(feature_dim=6, window=4, **cfg))
    perturb_added_weights(model)
    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    maps = [p for n, p in freeze_for_transfer(model).items() if "feature_map" in n]
    losses, grads = [], []
    for use_kernel in (True, False):
        monkeypatch.setattr(HedgehogFeatureMap, "kernel", use_kernel)
        model.zero_grad()
        loss = transfer_loss(model, ids)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in maps])
    assert torch.allclose(losses[0], losses[1], rtol=1e-5), losses
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-4
    layers = model.config.num_hidden_layers
    assert launches == {"fwd": layers, "du": layers}, launches


@pytest.mark.parametrize("backward", [False, True])
def test_launch_grid_stays_inside_cuda_limits_at_millions_of_rows(monkeypatch, backward):
    """A prefill of 4096 x 1024 tokens is 4M rows: the launch must keep every grid axis but the first under CUDA's
    65,535 (a second axis of row blocks failed with 'invalid argument' beyond 2M rows). Meta tensors and a
    recording launcher: nothing runs."""
    import linearize.ops.triton.feature_maps as fm

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(fm, "_hedgehog_pair_kernel", Recorder())
    B, T, H, Hk, D, f = 4096, 1024, 14, 2, 64, 64
    xq, xk = torch.empty(B, T, H, D, device="meta"), torch.empty(B, T, Hk, D, device="meta")
    wq, wk = torch.empty(H, D, f, device="meta"), torch.empty(Hk, D, f, device="meta")
    grads = (torch.empty(B, T, H, 2 * f, device="meta"), torch.empty(B, T, Hk, 2 * f, device="meta")) if backward else None
    fm._launch_pair(xq, xk, wq, wk, grads, block_rows=32, num_warps=4)
    (grid,) = grids
    assert grid[0] == (H + Hk) * (B * T // 32) < 2**31 and all(n <= 65535 for n in grid[1:])
