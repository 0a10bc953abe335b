"""``compile=true`` on the path CUDA takes: the hybrid chunk kernels and the Hedgehog map kernel serving (Triton's
interpreter on this CPU), inside compiled decoder layers. A stage-2 step (KL + CE, so the softmax teacher runs
compiled too) equals the eager step, with no graph break, and the kernels ran as opaque ops."""

import pytest
import torch

from tests.ops.helpers import INTERPRETING, inside, needs_triton, rel_err, run_file_under_interpreter

pytestmark = needs_triton


def test_interpreter_run():
    if INTERPRETING:
        pytest.skip("this is the subprocess")
    out = run_file_under_interpreter(__file__, timeout=900)
    assert " passed" in out


@inside
@pytest.mark.parametrize("stage", [1, 2])
def test_compiled_step_on_the_kernels_equals_eager(monkeypatch, stage):
    import linearize
    import linearize.ops as ops
    from linearize.ops.triton import chunk
    from linearize.pipelines.compile import compiled_layers
    from linearize.pipelines.config import LoraConfig, Stage2LossConfig
    from linearize.pipelines.finetune import add_lora, lora_parameters, stage2_loss
    from linearize.pipelines.transfer import freeze_for_transfer, transfer_loss
    from tests.tiny_models import perturb_added_weights, tiny_model
    from torch._dynamo.utils import counters

    monkeypatch.setattr(ops, "use_triton", lambda q, phi_q: True)
    monkeypatch.setattr("linearize.modules.attention.use_triton", lambda q, phi_q: True)
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = chunk._chunk_forward, chunk._chunk_backward
    monkeypatch.setattr(chunk, "_chunk_forward", lambda *a: calls.__setitem__("fwd", calls["fwd"] + 1) or fwd(*a))
    monkeypatch.setattr(chunk, "_chunk_backward", lambda *a: calls.__setitem__("bwd", calls["bwd"] + 1) or bwd(*a))

    model = linearize.convert(tiny_model("llama"), linearize.LinearizeConfig(feature_dim=6, window=4))
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
                if "lora_B" in name:  # (initialised to 0 by peft: move it, so the adapters change the output)
                    p.normal_(generator=torch.Generator().manual_seed(len(name)))
        loss_fn = stage2_loss(Stage2LossConfig(kl_weight=1.0, ce_weight=0.3))
    model.train()
    ids = torch.randint(3, 96, (2, 37), generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model.zero_grad()
        calls.update(fwd=0, bwd=0)
        with compiled_layers(model, compiled):
            loss = loss_fn(model, ids)
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in params.items()}))
        assert calls == {"fwd": 3, "bwd": 3}, calls  # one forward and one backward launch set a layer
        if compiled:
            assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    (l0, g0), (l1, g1) = results
    assert rel_err(l1, l0) < 1e-5
    for n in g0:
        assert rel_err(g1[n], g0[n]) < 1e-4, n
