"""The generation benchmark's loops on CUDA (benchmarks/gen_loops.py, benchmarks/generate.py), on tiny models:
a decode step replayed in a CUDA graph gives the tokens of the eager loop and of ``generate``; a linearized
decode step makes no host sync (with and without a padding mask); OOM is caught and the search goes on;
the driver runs end to end.

Run: ``python3 -m pytest -q tests/gpu/test_generate_bench_cuda.py`` (skipped without CUDA).
"""

import json

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

import linearize  # noqa: E402
from benchmarks import generate as G  # noqa: E402
from benchmarks.gen_loops import largest_batch, make_cache, probe_fits, run_generate, run_lean  # noqa: E402
from linearize import LinearizeConfig  # noqa: E402
from linearize.modules.attention import PADDING_MASK_KWARG, _new_token_mask  # noqa: E402

from ..tiny_models import cache_kw, perturb_added_weights, tiny_model  # noqa: E402

DEV = torch.device("cuda")


def _models(dtype=torch.float32, **overrides):
    base = tiny_model("llama", **overrides).to(DEV, dtype)
    ours = linearize.convert(tiny_model("llama", **overrides), LinearizeConfig(window=4, feature_dim=6))
    perturb_added_weights(ours)
    return {"base": base, "ours": ours.to(DEV, dtype)}


CACHE = {"base": "static", "ours": "dynamic"}


@pytest.mark.parametrize("key", ["base", "ours"])
def test_graph_replay_tokens_equal_eager_and_generate(key):
    model = _models()[key]
    ids = torch.randint(3, 96, (3, 10), device=DEV)
    N = 20
    cache = make_cache(model, CACHE[key], 10 + N)
    graphed = run_lean(model, ids, N, cache=cache, graph=True, keep_tokens=True)
    assert graphed.graph and graphed.capture_s is not None and graphed.decode_steps == N - 1
    if key == "ours":
        assert G.decode_path(cache) == "ring kernel"
    eager = run_lean(model, ids, N, cache=make_cache(model, CACHE[key], 10 + N), graph=False, keep_tokens=True)
    gen = run_generate(model, ids, N, pad_token_id=0, keep_tokens=True)
    assert torch.equal(graphed.tokens, eager.tokens)
    assert torch.equal(eager.tokens, gen.tokens)


@pytest.mark.parametrize("key", ["base", "ours"])
def test_bf16_graph_decode_runs(key):
    model = _models(torch.bfloat16)[key]
    ids = torch.randint(3, 96, (4, 9), device=DEV)
    cache = make_cache(model, CACHE[key], 9 + 16)
    res = run_lean(model, ids, 16, cache=cache, graph=True, keep_tokens=True)
    assert res.graph and res.tokens.shape == (4, 16) and res.generated == 16
    if key == "ours":
        assert G.decode_path(cache) == "ring kernel"


def test_linearized_decode_step_makes_no_host_sync():
    ours = _models()["ours"]
    ids = torch.randint(3, 96, (3, 10), device=DEV)
    cache = make_cache(ours, "dynamic", 32)
    with torch.no_grad():
        ours(input_ids=ids, **cache_kw(cache), position_ids=torch.arange(10, device=DEV)[None])
        tok = torch.full((3, 1), 5, device=DEV)
        ours(input_ids=tok, **cache_kw(cache), position_ids=torch.full((1, 1), 10, device=DEV))  # ring from here on
        torch.cuda.synchronize()
        mask = torch.ones(3, 12, dtype=torch.long, device=DEV)
        attn = ours.model.layers[0].self_attn
        hidden = torch.randn(3, 1, 32, device=DEV)
        pe = ours.model.rotary_emb(hidden, torch.full((1, 1), 11, device=DEV))
        torch.cuda.set_sync_debug_mode("error")
        try:
            ours(input_ids=tok, **cache_kw(cache), position_ids=torch.full((1, 1), 11, device=DEV), logits_to_keep=1)
            m = _new_token_mask(mask, 3, 1)
            attn(hidden, pe, **cache_kw(cache), **{PADDING_MASK_KWARG: mask})
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert m.shape == (3, 1)


def test_oom_is_caught_and_the_search_goes_on():
    """A probe far past the memory fails as OOM and the next one runs; a search over a model made of many
    small layers (no tensor near 2^31 elements) brackets its limit with OOMs only."""
    base = _models(torch.bfloat16, num_hidden_layers=24)["base"]
    ok, peak, err = probe_fits(base, 2, 8, 16, "static", 96, DEV)
    assert ok and peak > 0 and err is None
    ok, peak, err = probe_fits(base, 4096, 8, 10**7, "static", 96, DEV)
    assert (ok, peak, err) == (False, None, "OOM")
    assert probe_fits(base, 2, 8, 16, "static", 96, DEV)[0]
    per_seq = 24 * 2 * 2 * 8 * 2  # bytes per cached token of a sequence: layers x (k, v) x Hkv x D x bf16
    N = (512 * 2**20) // per_seq  # about 512 MiB a sequence
    errors = []

    def probe(B):
        ok, _, err = probe_fits(base, B, 8, N, "static", 96, DEV)
        errors.append(err)
        return ok

    res = largest_batch(probe, start=16, max_batch=4096, time_cap_s=90)
    free = torch.cuda.get_device_properties(0).total_memory / (512 * 2**20)
    assert 0.5 * free < res["largest"] < free and res["smallest_failing"] > res["largest"], res
    assert set(errors) <= {None, "OOM"}, errors
    # the same cache grown as a DynamicCache: it holds as much at token N, so the limit is within 10% of the static one
    errors.clear()

    def probe_dynamic(B):
        ok, _, err = probe_fits(base, B, 8, N, "dynamic", 96, DEV)
        errors.append(err)
        return ok

    dyn = largest_batch(probe_dynamic, start=16, max_batch=4096, time_cap_s=90)
    assert 0.9 * res["largest"] <= dyn["largest"] <= 1.1 * res["largest"], (res, dyn)
    assert set(errors) <= {None, "OOM"}, errors


def test_driver_end_to_end_on_tiny_models(tmp_path):
    args = G.parse_args(["--tokens", "24", "--batches", "1,4", "--headline-batch", "4", "--prompt-len", "8",
                         "--fit-max-batch", "256", "--fit-time-s", "30", "--out-dir", str(tmp_path)])
    rows = G.run(args, DEV, _models(torch.bfloat16), {"model": "tiny", "dtype": "bfloat16", "pad_token_id": 0})
    dec = [r for r in rows if r["section"] == "decode"]
    assert len(dec) == 8
    for r in dec:
        assert "error" not in r and r["tok_s"] > 0 and r["peak_gib"] > 0 and r["x_floor"] > 0, r
        assert r["graph"] == (r["loop"] == "lean"), r
    assert all(r["decode_path"] == "ring kernel" for r in dec if r["model"] == "ours")
    fits = {r["model"]: r for r in rows if r["section"] == "fit"}
    assert fits["ours"]["largest"] == 256 and fits["base"]["largest"] == 256
    (jpath,) = tmp_path.glob("generate-*.json")
    assert json.loads(jpath.read_text())["goals"]


def test_graph_replay_with_kept_layers_and_heads_past_the_first_buffer():
    """Layers and heads kept softmax (a static cache) captured in a CUDA graph and replayed for more tokens than
    the kept heads' first buffer holds (64 slots): the replays must write inside buffers sized for the whole run
    and give the eager loop's tokens (the fifteenth session's B=64 x 4096 heads3 row crashed here)."""
    model = linearize.convert(tiny_model("llama"), LinearizeConfig(window=4, feature_dim=6, softmax_layers=[0], softmax_heads=[[1, 0]]))
    perturb_added_weights(model)
    model = model.to(DEV)
    ids = torch.randint(3, 96, (3, 10), device=DEV)
    N = 90
    graphed = run_lean(model, ids, N, cache=make_cache(model, "static", 10 + N), graph=True, keep_tokens=True)
    assert graphed.graph and graphed.decode_steps == N - 1
    eager = run_lean(model, ids, N, cache=make_cache(model, "static", 10 + N), graph=False, keep_tokens=True)
    assert torch.equal(graphed.tokens, eager.tokens)


def test_random_weights_drawn_on_the_gpu_are_seeded_twins_on_the_cpu(tmp_path):
    """generate.py draws a config-only model's weights on the GPU (an 8B model's CPU initialization takes
    minutes): two draws with one seed are the same weights, returned on the CPU."""
    from benchmarks.random_model import random_model

    from ..tiny_models import tiny_config_json

    cfg = tiny_config_json(tmp_path / "tiny.json")
    a, b = (random_model(cfg, torch.bfloat16, 3, "cuda") for _ in range(2))
    assert all(p.device.type == "cpu" for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
