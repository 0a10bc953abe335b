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
def test_compiled_step_equals_eager(stage):
    import linearize
    from linearize.ops.triton import chunk
    from linearize.pipelines.compile import compiled_layers
    from linearize.pipelines.config import LoraConfig, Stage2LossConfig
    from linearize.pipelines.finetune import add_lora, lora_parameters, stage2_loss
    from linearize.pipelines.transfer import freeze_for_transfer, transfer_loss
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       intermediate_size=512, num_hidden_layers=3)
    model = linearize.convert(model, linearize.LinearizeConfig(window=64, feature_dim=64)).cuda()
    perturb_added_weights(model)
    if stage == 1:
        params, loss_fn = freeze_for_transfer(model), transfer_loss
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        model = add_lora(model, LoraConfig())
        params = lora_parameters(model)
        with torch.no_grad():
            for name, p in params.items():
                if "lora_B" in name:
                    p.normal_(std=0.05)
        loss_fn = stage2_loss(Stage2LossConfig(kl_weight=1.0, ce_weight=0.3))
    model.train()
    ids = torch.randint(3, 96, (2, 300), device="cuda")
    calls = []
    real = chunk._chunk_forward
    chunk._chunk_forward = lambda *a: calls.append(1) or real(*a)
    try:
        results = []
        for compiled in (False, True):
            torch._dynamo.reset()
            counters.clear()
            model.zero_grad()
            with compiled_layers(model, compiled):
                loss = loss_fn(model, ids)
                loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in params.items()}))
            if compiled:
                assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        chunk._chunk_forward = real
    assert len(calls) == 6  # the kernels served each layer, eager and compiled
    (l0, g0), (l1, g1) = results
    assert rel_err(l1, l0) < 1e-2
    for n in g0:
        assert rel_err(g1[n], g0[n]) < 1e-2, n
