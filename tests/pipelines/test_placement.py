"""The sharded placement's pieces, in one process: chained spans equal the whole-model block losses; placement on meta."""

from __future__ import annotations

import pytest
import torch

import linearize
from linearize.convert import linearized_layers
from linearize.pipelines.placement import AUTO_REPLICATE_SHARE, describe, device_bytes, place_span, resolve, stage1_spans
from linearize.pipelines.transfer import freeze_for_transfer, span_transfer_loss, transfer_loss

from ..tiny_models import perturb_added_weights, tiny_model

# Gemma 3: every layer converted, so the chain crosses a sliding layer (window 6 < T) after a global one
CASES = {
    "llama": linearize.LinearizeConfig(window=3, feature_dim=4),
    "gemma3_text": linearize.LinearizeConfig(window=3, feature_dim=4, convert_sliding_layers=True),
}


def converted(model_type: str):
    model = linearize.convert(tiny_model(model_type), CASES[model_type])
    perturb_added_weights(model)
    return model


@pytest.mark.parametrize("model_type", list(CASES))
def test_boundary_states_are_the_teachers_hidden_states(model_type):
    """Each span's boundary output is what the unconverted model's layer emits (HF's own masks and rotary per index)."""
    teacher = tiny_model(model_type)
    model = converted(model_type)
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = teacher(input_ids=ids, output_hidden_states=True).hidden_states  # [i] enters layer i
        h = ids
        for s, e in [(0, 1), (1, 2), (2, 3)]:
            _, h = span_transfer_loss(model, h, (s, e), (s, e))
            if e < 3:  # (the last entry of hidden_states is after the final norm)
                torch.testing.assert_close(h, want[e], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", list(CASES))
@pytest.mark.parametrize("blocks", [[(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)], [(1, 2), (2, 3)]])
def test_chained_spans_equal_whole_model_blocks(model_type, blocks):
    """Spans run one after the other on the boundary states give each block the loss and the gradients of
    today's block-wise path (the frozen forward through every earlier layer), bit for bit."""
    model = converted(model_type)
    params = freeze_for_transfer(model)
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    h = ids
    for (a, b), (s, e) in zip(blocks, stage1_spans(blocks)):
        model.zero_grad(set_to_none=True)
        want = transfer_loss(model, ids, block=(a, b))
        want.backward()
        want_grads = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        got, h = span_transfer_loss(model, h, (s, e), (a, b))
        got.backward()
        assert torch.equal(got, want)
        got_grads = {k: p.grad for k, p in params.items() if p.grad is not None}
        assert got_grads.keys() == want_grads.keys() and got_grads
        for k in want_grads:
            assert torch.equal(got_grads[k], want_grads[k]), k
    assert all(l.mode == "hybrid" for l in linearized_layers(model))


def test_spans_follow_blocks():
    assert stage1_spans([(0, 2), (2, 4)]) == [(0, 2), (2, 4)]
    assert stage1_spans([(3, 4), (9, 10), (15, 16)]) == [(0, 4), (4, 10), (10, 16)]  # Gemma 3's global layers


def test_span_must_end_with_its_block():
    model = converted("llama")
    with pytest.raises(ValueError, match="must end the span"):
        span_transfer_loss(model, torch.ones(1, 4, dtype=torch.long), (0, 3), (0, 2))


@pytest.mark.parametrize("tied", [True, False])
def test_place_span_keeps_only_its_layers(tied):
    model = converted("llama") if not tied else linearize.convert(tiny_model("llama", tie_word_embeddings=True), CASES["llama"])
    full = describe(model, torch.device("cpu"))
    assert full["layers_here"] == [0, 1, 2] and full["bytes_here"] == full["model_bytes"] + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    place_span(model, (1, 3), torch.device("cpu"), embeddings=False)
    got = describe(model, torch.device("cpu"))
    assert got["layers_here"] == [1, 2] and not got["embeddings_here"]
    assert got["model_bytes"] == full["model_bytes"] and got["bytes_here"] < full["bytes_here"]
    assert model.lm_head.weight.device.type == "meta" and model.model.norm.weight.device.type == "meta"
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"  # buffer-only modules stay: every span needs them
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied  # ties survive the move

    model = converted("llama") if not tied else linearize.convert(tiny_model("llama", tie_word_embeddings=True), CASES["llama"])
    place_span(model, (0, 1), torch.device("cpu"), embeddings=True)
    got = describe(model, torch.device("cpu"))
    assert got["layers_here"] == [0] and got["embeddings_here"]
    assert (model.lm_head.weight.device.type == "cpu") == tied  # a tied head is the embeddings' own tensor


def test_placement_values():
    assert resolve("auto", 1)[0] == "replicate" and resolve("sharded", 1)[0] == "replicate"
    assert resolve("sharded", 2)[0] == "sharded" and resolve("replicate", 4)[0] == "replicate"
    with pytest.raises(ValueError, match="invalid placement='pipeline': choose auto, replicate or sharded"):
        resolve("pipeline", 2)


def test_auto_placement_replicates_small_models_and_shards_large_ones():
    gpu = 80 * 10**9  # an H100's memory
    smol, llama8b = 135 * 10**6 * 2, 8 * 10**9 * 2  # bf16 weights
    mode, why = resolve("auto", 2, smol, gpu)
    assert mode == "replicate" and "0.3% of each device's 80 GB" in why and "placement=sharded" in why
    mode, why = resolve("auto", 8, llama8b, gpu)
    assert mode == "sharded" and "20.0%" in why
    assert resolve("auto", 2, int(AUTO_REPLICATE_SHARE * gpu), gpu)[0] == "replicate"  # the bound itself replicates
    assert resolve("auto", 2, int(AUTO_REPLICATE_SHARE * gpu) + 1, gpu)[0] == "sharded"
    assert resolve("replicate", 2, llama8b, gpu)[0] == "replicate"  # an explicit choice is kept


def test_device_bytes_on_cpu_shares_the_host_out():
    one, four = device_bytes(torch.device("cpu"), 1), device_bytes(torch.device("cpu"), 4)
    assert one > 10**8 and four == one // 4


def test_bad_placement_setting_is_one_line():
    from linearize.pipelines.config import build_config

    assert build_config(None, None, ["placement=replicate"]).placement == "replicate"
    with pytest.raises(ValueError, match="^--set placement=pipeline: invalid placement='pipeline': choose auto, replicate or sharded$"):
        build_config(None, None, ["placement=pipeline"])
