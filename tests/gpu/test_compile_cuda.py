"""``compile=true`` on CUDA: a stage-1 and a stage-2 step (KL + CE) with the decoder layers compiled, the chunk and
map kernels serving as opaque ops, equal the eager step; no graph break.

Run: ``python3 -m pytest -q tests/gpu/test_compile_cuda.py`` (skipped without CUDA). fp32 weights, bf16 autocast as
the pipeline trains; compiled and eager run the same kernels on the same inputs, and inductor's fused glue rounds
differently only inside bf16: relative error < 1e-2 on the loss and the gradients (METHOD.md's bf16 threshold).
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from ..ops.helpers import rel_err  # noqa: E402
from ..tiny_models import perturb_added_weights, tiny_model  # noqa: E402


@pytest.mark.parametrize("stage", [1, 2])
def test_compiled_step_equals_eager(stage, monkeypatch):
    import linearize
    from linearize.ops.triton import chunk

    from ..pipelines.compile_helpers import eager_and_compiled, stage_setup

    torch.manual_seed(0)
    model = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       intermediate_size=512, num_hidden_layers=3)
    model = linearize.convert(model, linearize.LinearizeConfig(window=64, feature_dim=64)).cuda()
    perturb_added_weights(model)
    calls = []
    real = chunk._chunk_forward
    monkeypatch.setattr(chunk, "_chunk_forward", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(3, 96, (2, 300), device="cuda")
    (l0, g0), (l1, g1) = eager_and_compiled(*stage_setup(model, stage), ids)
    assert len(calls) == 6  # the kernels served each layer, eager and compiled
    assert rel_err(l1, l0) < 1e-2
    for n in g0:
        assert rel_err(g1[n], g0[n]) < 1e-2, n
