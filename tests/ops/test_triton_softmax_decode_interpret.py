"""The softmax decode kernel (kept softmax layers) under Triton's CPU interpreter, against the reference.

As in ``test_triton_decode_interpret.py``: the one test of the normal session re-runs this file in a
subprocess with ``TRITON_INTERPRET=1``; the kernel tests run only there.
"""

import pytest
import torch

from tests.ops.helpers import inside, interpreter_run_test, needs_triton, rel_err
from tests.tiny_models import cache_kw

pytestmark = needs_triton


test_interpreter_run = interpreter_run_test(__file__, timeout=900)


def _problem(B, H, Hkv, L, D, dtype, seed=0):
    """q as transformers hands it over (a transposed view of [B, 1, H, D]), and a cache's k, v."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    return q, k, v


def _static_mask(B, L, filled, pad):
    """A static cache's mask: slots [0, filled) in use, of which each row's first ``pad[b]`` are left padding."""
    slots = torch.arange(L)
    return (slots[None, :] < filled) & (slots[None, :] >= torch.tensor(pad)[:, None])


@inside
@pytest.mark.parametrize("bounded", [False, True], ids=["branchy", "bounded"])
@pytest.mark.parametrize("H,Hkv", [(9, 3), (4, 1), (2, 2)])
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_equals_reference_fp32(H, Hkv, splits, bounded):
    """A static cache filled to 37 of 53 slots (neither a multiple of the 16-key block), rows with
    different left padding (one whose padding covers a whole block, which is then skipped), D=24 (not a
    power of two); outputs NaN-poisoned by construction (a fresh tensor) and compared in full."""
    from linearize.ops.softmax_decode import softmax_decode_reference
    from linearize.ops.triton.softmax_decode import softmax_decode_triton

    B, L, D = 3, 53, 24
    q, k, v = _problem(B, H, Hkv, L, D, torch.float32, seed=H + splits)
    mask = _static_mask(B, L, 37, [0, 5, 20])
    y = softmax_decode_triton(q, k, v, mask, scale=0.3, block_n=16, splits=splits, bounded=bounded)
    ref = softmax_decode_reference(q, k, v, mask, scale=0.3)
    assert y.shape == (B, 1, H, D) and torch.isfinite(y).all()
    assert rel_err(y, ref) < 1e-5


@inside
def test_bounded_loop_with_holes_and_a_mask_longer_than_its_chunk():
    """The bounded loop finds each row's last True over several 1024-slot chunks of the mask (L 1100), and
    masks with holes (random) and a row whose only True is the last slot still match the reference."""
    from linearize.ops.softmax_decode import softmax_decode_reference
    from linearize.ops.triton.softmax_decode import softmax_decode_triton

    B, H, Hkv, L, D = 3, 2, 1, 1100, 8
    q, k, v = _problem(B, H, Hkv, L, D, torch.float32, seed=7)
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(B, L, generator=g) < 0.3
    mask[0, 1030:] = False  # last True inside the second chunk
    mask[1, 700:] = False
    mask[2] = False
    mask[2, L - 1] = True
    for splits in (1, 4):
        y = softmax_decode_triton(q, k, v, mask, block_n=64, splits=splits, bounded=True)
        assert rel_err(y, softmax_decode_reference(q, k, v, mask)) < 1e-5, splits


@inside
@pytest.mark.parametrize("bounded", [False, True], ids=["branchy", "bounded"])
def test_masked_slots_are_never_read(bounded):
    """Keys and values behind the mask (the static cache's empty slots) are NaN: a kernel that reads and
    weights them, even by zero, gives NaN."""
    from linearize.ops.softmax_decode import softmax_decode_reference
    from linearize.ops.triton.softmax_decode import softmax_decode_triton

    B, H, Hkv, L, D = 2, 4, 2, 40, 16
    q, k, v = _problem(B, H, Hkv, L, D, torch.float32)
    mask = _static_mask(B, L, 21, [0, 3])
    k[~mask[:, None, :, None].expand_as(k)] = float("nan")
    v[~mask[:, None, :, None].expand_as(v)] = float("nan")
    y = softmax_decode_triton(q, k, v, mask, block_n=16, splits=2, bounded=bounded)
    ref = softmax_decode_reference(q, k.nan_to_num(), v.nan_to_num(), mask)
    assert torch.isfinite(y).all() and rel_err(y, ref) < 1e-5


@inside
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3)])
def test_half_inputs_without_a_mask(dtype, tol):
    """No mask (a dynamic cache holds only real keys), default launch; half inputs with fp32 sums. bf16 is
    tested on the GPU only (tests/gpu/test_softmax_decode_cuda.py): the interpreter's bf16 dots are not
    faithful (they gave values ~1e9 here)."""
    from linearize.ops.softmax_decode import softmax_decode_reference
    from linearize.ops.triton.softmax_decode import softmax_decode_triton

    q, k, v = _problem(2, 6, 2, 70, 32, dtype, seed=3)
    y = softmax_decode_triton(q, k, v)
    ref = softmax_decode_reference(q.double(), k.double(), v.double())
    assert y.dtype == dtype and rel_err(y, ref) < tol


@inside
@pytest.mark.parametrize("bounded", [False, True], ids=["branchy", "bounded"])
def test_an_all_masked_row_gives_zeros(bounded):
    from linearize.ops.triton.softmax_decode import softmax_decode_triton

    q, k, v = _problem(2, 2, 1, 20, 16, torch.float32)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, :7] = True
    y = softmax_decode_triton(q, k, v, mask, block_n=16, bounded=bounded)
    assert torch.equal(y[1], torch.zeros_like(y[1])) and y[0].abs().sum() > 0


@inside
def test_the_op_compiles_and_passes_opcheck():
    """Inside torch.compile (fullgraph) the launch is one functional custom op; torch.library's checks."""
    from linearize.ops.softmax_decode import softmax_decode_reference
    from linearize.ops.triton.softmax_decode import _softmax_decode_op, softmax_decode_triton

    q, k, v = _problem(2, 4, 2, 33, 16, torch.float32, seed=5)
    mask = _static_mask(2, 33, 30, [0, 2])
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, m: softmax_decode_triton(q, k, v, m, scale=0.25), fullgraph=True)
    assert rel_err(compiled(q, k, v, mask), softmax_decode_reference(q, k, v, mask, scale=0.25)) < 1e-5
    torch.library.opcheck(_softmax_decode_op, (q, k, v, mask, 0.25, 16, 2, 2, 4))
    torch.library.opcheck(_softmax_decode_op, (q, k, v, mask, 0.25, 16, 2, 2, 4, True))
    torch.library.opcheck(_softmax_decode_op, (q, k, v, None, 0.25, 16, 1, 3, 4))


@inside
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "inductor"])
def test_compiled_decode_with_kept_layers_runs_them_on_the_kernel(monkeypatch, compile):
    """The whole path: CompiledDecode's kept layers (static cache, left padding) attend through the
    registered attention function and the kernel (made to serve on CPU), and equal the full forward;
    compiled, in one graph (no recompile after the first step)."""
    from transformers import StaticCache

    import linearize
    from linearize.modules import softmax_decode as sd
    from linearize.ops.triton import softmax_decode as kernel
    from tests.decode_steps import greedy_steps_and_full_forward
    from tests.tiny_models import perturb_added_weights, tiny_model

    class Counted:  # the merge kernel's launches, counted inside the op's body (which dynamo does not trace)
        def __init__(self, fn):
            self.fn, self.calls = fn, 0

        def __getitem__(self, grid):
            self.calls += 1
            return self.fn[grid]

    merge = Counted(kernel._combine_kernel)
    monkeypatch.setattr(sd, "_device_ok", lambda q: True)
    monkeypatch.setattr(kernel, "_combine_kernel", merge)
    model = linearize.convert(tiny_model("llama"), linearize.LinearizeConfig(feature_dim=6, window=4, softmax_layers=[0, 2], feature_rope=False))
    perturb_added_weights(model)
    g = torch.Generator().manual_seed(0)
    B, P, N = 3, 9, 4
    ids = torch.randint(3, 96, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :3] = 0
    torch._dynamo.reset()
    step = linearize.CompiledDecode(model, compile=compile)
    cache = StaticCache(config=model.config, max_cache_len=P + N + 20)  # 20 empty slots: a skipped block
    got, ref = greedy_steps_and_full_forward(model, step, cache, ids, mask, N, pass_mask=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # 2 kept layers x N steps (compiled: plus the fake-tensor runs while tracing, which launch nothing)
    assert merge.calls == 2 * N, f"{merge.calls} kernel launches; 2 kept layers x {N} steps expected"
    assert model.config._attn_implementation == "sdpa"  # restored after each step


@inside
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "inductor"])
def test_compiled_decode_with_kept_heads_runs_them_on_the_kernel(monkeypatch, compile):
    """Heads kept softmax inside linearized layers (softmax_heads): their one-token steps read the layer's
    fixed KV buffers through the kernel (made to serve on CPU), left padding included, and equal the full
    forward; compiled, in one graph."""
    from transformers import DynamicCache

    import linearize
    from linearize.decode import reserve_kept_heads
    from linearize.modules import softmax_decode as sd
    from linearize.ops.triton import softmax_decode as kernel
    from tests.decode_steps import greedy_steps_and_full_forward
    from tests.tiny_models import perturb_added_weights, tiny_model

    calls = []
    real = kernel._combine_kernel
    monkeypatch.setattr(sd, "_device_ok", lambda q: True)
    monkeypatch.setattr(kernel, "_combine_kernel", type("C", (), {"__getitem__": lambda self, g: calls.append(1) or real[g]})())
    cfg = linearize.LinearizeConfig(feature_dim=6, window=4, softmax_heads=[[0, 1], [2, 0]], feature_rope=False)
    model = linearize.convert(tiny_model("llama"), cfg)
    perturb_added_weights(model)
    B, P, N = 3, 9, 4
    ids = torch.randint(3, 96, (B, P), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :3] = 0
    torch._dynamo.reset()
    step = linearize.CompiledDecode(model, compile=compile)
    cache = DynamicCache(config=model.config)
    reserve_kept_heads(cache, P + N + 20)  # 20 slots never written: masked, skipped
    got, ref = greedy_steps_and_full_forward(model, step, cache, ids, mask, N, pass_mask=False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 * N, f"{len(calls)} kernel launches; 2 layers with kept heads x {N} steps expected"


@inside
def test_a_base_model_on_a_static_cache_through_the_kernel(monkeypatch):
    """The benchmark's ``basek`` rows: a plain transformers model decoding on a StaticCache, with the masks
    transformers builds, inside ``softmax_decode_kernel``: every layer's steps take the kernel and equal the
    full forward."""
    from transformers import StaticCache

    from linearize.modules import softmax_decode as sd
    from linearize.ops.triton import softmax_decode as kernel
    from tests.tiny_models import tiny_model

    launches = []
    real = kernel._combine_kernel
    monkeypatch.setattr(sd, "_device_ok", lambda q: True)
    monkeypatch.setattr(kernel, "_combine_kernel", type("C", (), {"__getitem__": lambda self, g: launches.append(1) or real[g]})())
    model = tiny_model("llama").eval()
    B, P, N = 2, 7, 3
    ids = torch.randint(3, 96, (B, P), generator=torch.Generator().manual_seed(1))
    cache = StaticCache(config=model.config, max_cache_len=P + N + 17)
    got = []
    with torch.no_grad(), sd.softmax_decode_kernel(model):
        logits = model(input_ids=ids, **cache_kw(cache), use_cache=True).logits[:, -1:]
        seq = ids
        for i in range(N):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            logits = model(input_ids=nxt, **cache_kw(cache), use_cache=True, position_ids=torch.full((1, 1), P + i)).logits
            got.append(logits)
    ref = model(input_ids=seq).logits[:, P:]
    torch.testing.assert_close(torch.cat(got, 1), ref, rtol=1e-4, atol=1e-4)
    assert len(launches) == N * model.config.num_hidden_layers
