"""``compile=true`` on the path CUDA takes: the hybrid chunk kernels and the Hedgehog map kernel serving (Triton's
interpreter on this CPU), inside compiled decoder layers. A stage-2 step (KL + CE, so the softmax teacher runs
compiled too) equals the eager step, with no graph break, and the kernels ran as opaque ops."""

import pytest
import torch

from tests.ops.helpers import inside, interpreter_run_test, needs_triton, rel_err

pytestmark = needs_triton


test_interpreter_run = interpreter_run_test(__file__, timeout=900)


@inside
@pytest.mark.parametrize("stage", [1, 2])
def test_compiled_step_on_the_kernels_equals_eager(monkeypatch, stage):
    import linearize
    import linearize.ops as ops
    from linearize.ops.triton import chunk
    from tests.pipelines.compile_helpers import eager_and_compiled, stage_setup
    from tests.tiny_models import perturb_added_weights, tiny_model

    monkeypatch.setattr(ops, "use_triton", lambda q, phi_q: True)
    monkeypatch.setattr("linearize.modules.attention.use_triton", lambda q, phi_q: True)
    calls = []
    fwd, bwd = chunk._chunk_forward, chunk._chunk_backward
    monkeypatch.setattr(chunk, "_chunk_forward", lambda *a: calls.append("fwd") or fwd(*a))
    monkeypatch.setattr(chunk, "_chunk_backward", lambda *a: calls.append("bwd") or bwd(*a))

    model = linearize.convert(tiny_model("llama"), linearize.LinearizeConfig(feature_dim=6, window=4))
    perturb_added_weights(model)
    ids = torch.randint(3, 96, (2, 37), generator=torch.Generator().manual_seed(0))
    (l0, g0), (l1, g1) = eager_and_compiled(*stage_setup(model, stage), ids)
    # one forward and one backward launch set a layer, eager and compiled
    assert calls.count("fwd") == calls.count("bwd") == 2 * 3, calls
    assert rel_err(l1, l0) < 1e-5
    for n in g0:
        assert rel_err(g1[n], g0[n]) < 1e-4, n
