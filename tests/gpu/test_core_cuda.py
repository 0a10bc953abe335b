"""The PyTorch paths on CUDA (the Triton kernels will get their own tests here). Skipped without a GPU."""

import pytest
import torch
from transformers import DynamicCache

import linearize
from linearize import LinearizeConfig
from linearize.ops import hybrid_attention_chunked, hybrid_attention_reference

from ..ops.helpers import random_inputs, rel_err
from ..tiny_models import ARCHS, cache_kw, perturb_added_weights, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("T,window", [(65, 16), (1000, 64), (257, 300)])
def test_chunked_on_cuda_matches_fp64_reference(dtype, tol, T, window):
    inputs = random_inputs(2, T, 8, 2, 64, 32, 8, dtype=torch.float64, seed=T)
    y_ref = hybrid_attention_reference(*inputs[:5], window=window, window_weight=inputs[5])
    cuda_in = [t.to("cuda", dtype) for t in inputs[:5]]
    y, _ = hybrid_attention_chunked(*cuda_in, window=window, window_weight=inputs[5].float().cuda())
    assert y.dtype == dtype and torch.isfinite(y).all()
    # TF32 may be on for fp32 matmuls: allow its error level
    assert rel_err(y.cpu(), y_ref) < tol


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_equals_forward_on_cuda(arch):
    model = linearize.convert(tiny_model(arch), LinearizeConfig(window=4, feature_dim=6)).cuda()
    perturb_added_weights(model)
    ids = torch.randint(3, 96, (2, 20), device="cuda")
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, t : t + 1], **cache_kw(cache)).logits for t in range(20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=2e-3, atol=2e-3)


def test_bf16_model_generates_on_cuda():
    model = linearize.convert(tiny_model("llama"), LinearizeConfig(window=4)).cuda().to(torch.bfloat16)
    ids = torch.randint(3, 96, (3, 9), device="cuda")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 17)
