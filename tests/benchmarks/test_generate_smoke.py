"""The generation benchmark on a CPU: its smoke run (lean loop tokens == generate's, then the whole driver on
tiny models; the wall-clock numbers mean nothing), the largest-batch search, and the floor's byte count."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_script_entry_point():
    """``python benchmarks/generate.py`` (as a script, not a package) parses its arguments."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--smoke" in proc.stdout and "floor" in proc.stdout


def test_smoke_tokens_match_and_driver_writes_results(tmp_path, capsys):
    from benchmarks import generate as G

    assert G.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "smoke OK" in out and "base: lean (3, 12) vs generate (3, 12) greedy tokens: equal" in out
    assert "ours: lean (3, 12) vs generate (3, 12) greedy tokens: equal" in out
    (jpath,) = tmp_path.glob("generate-cpu-*.json")
    assert "## Decode" in jpath.with_suffix(".md").read_text()
    payload = json.loads(jpath.read_text())
    assert payload["environment"]["transformers"] and payload["environment"]["git"]["commit"]
    rows = [r for r in payload["rows"] if r["section"] == "decode"]
    assert {(r["model"], r["loop"], r["batch"]) for r in rows} == {
        (m, loop, b) for m in ("ours", "base") for loop in ("lean", "generate") for b in (1, 3)}
    for r in rows:
        assert r["generated"] == 12 and r["decode_steps"] == 11 and r["tok_s"] > 0 and r["floor_step_ms"] > 0, r
        assert not r["cut"] and "error" not in r, r
    assert [(r["model"], r["cache"]) for r in payload["rows"] if r["section"] == "fit"] == [
        ("ours", "dynamic"), ("base", "static"), ("base", "dynamic")]
    assert payload["goals"][0].startswith("decode tokens/s at batch 3 x 12 new tokens")


def test_smoke_with_kept_softmax_layers(capsys):
    """A linearized model that keeps a softmax layer decodes in the lean and compiled loops on a StaticCache
    (through CompiledDecode, which masks the kept layer's empty slots) to the same greedy tokens as
    generate's dynamic cache."""
    from benchmarks import generate as G

    assert G.main(["--smoke", "--set", "softmax_layers=[1]", "--loops", "lean,compiled,generate", "--batches", "3"]) == 0
    out = capsys.readouterr().out
    assert "ours 2/3" in out
    assert "ours: lean (3, 12) vs generate (3, 12) greedy tokens: equal" in out
    assert "ours: compiled step vs generate greedy tokens: equal" in out


def test_smoke_with_kept_softmax_heads(capsys):
    """Heads kept softmax inside a linearized layer (softmax_heads): the lean loop, the compiled step and
    generate give the same greedy tokens (a dynamic cache whose kept-head buffers are sized for the run)."""
    from benchmarks import generate as G

    assert G.main(["--smoke", "--set", "softmax_heads=[[1,0]]", "--loops", "lean,compiled,generate", "--batches", "3"]) == 0
    out = capsys.readouterr().out
    assert "ours: lean (3, 12) vs generate (3, 12) greedy tokens: equal" in out
    assert "ours: compiled step vs generate greedy tokens: equal" in out


def test_plan_order_and_budget_skips(tmp_path):
    from benchmarks import generate as G

    args = G.parse_args(["--batches", "1,64,256"])
    tasks = G.plan(args)
    assert tasks[:2] == [("decode", "lean", 64, "ours"), ("decode", "lean", 64, "base")]
    assert tasks[6:9] == [("fit", None, None, "ours"), ("fit", None, None, "base"), ("fit", "dynamic", None, "base")]
    assert tasks[9:11] == [("decode", "generate", 64, "ours"), ("decode", "generate", 64, "base")]
    assert G.parse_args(["--quick"]).tokens == 1024 and G.parse_args([]).tokens == 4096
    assert G.parse_settings(["window=16", "feature_map=t2r", "feature_map_per_kv_head=true"]) == {
        "window": 16, "feature_map": "t2r", "feature_map_per_kv_head": True}


@pytest.mark.parametrize("limit", [1, 5, 63, 64, 65, 100, 1000, 4096, 5000])
def test_largest_batch_finds_the_limit(limit):
    from benchmarks.gen_loops import largest_batch

    seen = []
    res = largest_batch(lambda b: seen.append(b) or b <= limit, start=64, max_batch=10**6, time_cap_s=1e9, resolution=0)
    assert res["largest"] == limit and res["smallest_failing"] == limit + 1 and res["stopped"] == "converged"
    assert len(seen) <= 2 * 20  # doubling then bisection: logarithmic


def test_largest_batch_resolution_caps_and_nothing_fits():
    from benchmarks.gen_loops import largest_batch

    res = largest_batch(lambda b: b <= 3000, start=64, max_batch=10**6, time_cap_s=1e9, resolution=0.03)
    assert res["largest"] <= 3000 < res["smallest_failing"] and res["smallest_failing"] - res["largest"] <= 0.03 * res["largest"]
    res = largest_batch(lambda b: True, start=64, max_batch=300, time_cap_s=1e9)
    assert res["largest"] == 300 and res["smallest_failing"] is None and res["stopped"] == "max batch"
    res = largest_batch(lambda b: False, start=64, max_batch=300, time_cap_s=1e9)
    assert res["largest"] == 0 and res["smallest_failing"] == 1
    ticks = iter(range(1000))
    res = largest_batch(lambda b: b <= 10**5, start=64, max_batch=10**6, time_cap_s=3, clock=lambda: next(ticks))
    assert res["stopped"] == "time cap" and 0 < res["largest"] <= 10**5 and res["smallest_failing"] is None


def test_floor_bytes_match_the_docstring_formula():
    """SmolLM2-135M's shape (30 layers, H 9 / Hkv 3, D 64): a linearized step at batch 64 moves the weights,
    the fp32 state twice, the window tail and the logits; a base step the weights, KV at its length and logits."""
    from benchmarks.gen_floor import LayerShape, ModelShape, decode_run_cost, keys_summed, state_bytes_per_sequence

    P_w, V, B = 134_515_008 * 2, 49152, 64
    lin = ModelShape(tuple(LayerShape("hybrid", 9, 3, 64, 9, 128, 64) for _ in range(30)), P_w, 0, 10**8, V, 2)
    base = ModelShape(tuple(LayerShape("softmax", 9, 3, 64) for _ in range(30)), P_w, 0, 10**8, V, 2)
    c = decode_run_cost(lin, B, 128, 4096)
    per_layer = 2 * 4 * B * 9 * (128 * 64 + 128) + B * (63 * 2 * 3 * 64 * 2 + 9 * 128 * 2) + B * (2 * 3 * 64 + 9 * 128) * 2
    assert c.steps == 4095
    assert c.bytes / c.steps == pytest.approx(P_w + 30 * per_layer + B * V * 2)
    assert 1.1e9 < c.parts["state"] / c.steps < 1.2e9  # the docstring's 1.15 GB at batch 64
    cb = decode_run_cost(base, B, 128, 4096)
    kv = 30 * B * 2 * 3 * 64 * 2 * (keys_summed(128, 4096) + 4095)
    assert cb.bytes == pytest.approx((P_w + B * V * 2) * 4095 + kv)
    assert keys_summed(128, 4096) == sum(128 + i for i in range(1, 4096))
    assert keys_summed(10, 50, window=16) == sum(min(10 + i, 16) for i in range(1, 50))
    assert 3.0e9 < cb.parts["kv"] / cb.steps < 3.4e9  # the docstring's 3.2 GB at the mean length
    assert state_bytes_per_sequence(base, 4224) == 30 * 4224 * 2 * 3 * 64 * 2


def test_model_shape_reads_the_modules():
    import linearize
    from benchmarks.gen_floor import model_shape
    from tests.tiny_models import tiny_model

    base = tiny_model("llama")
    s = model_shape(base)
    assert [L.kind for L in s.layers] == ["softmax"] * 3 and s.layers[0].H == 4 and s.layers[0].Hkv == 2 and s.layers[0].D == 8
    emb = base.get_input_embeddings().weight
    assert s.embed_row_bytes == 32 * 4  # untied: the input embedding is read at the B rows only
    assert s.weight_bytes == sum(p.numel() * 4 for p in base.parameters()) - emb.numel() * 4
    ours = linearize.convert(tiny_model("llama", tie_word_embeddings=True), linearize.LinearizeConfig(window=4, feature_dim=6))
    s = model_shape(ours)
    assert [L.kind for L in s.layers] == ["hybrid"] * 3 and s.layers[0].F == 12 and s.layers[0].Hf == 4 and s.layers[0].window == 4
    assert s.embed_row_bytes == 0 and s.weight_bytes == sum(p.numel() * 4 for p in ours.parameters())
    assert s.hybrid_layers == 3 and torch.is_tensor(ours.get_output_embeddings().weight)


def test_smoke_compiled_loop_tokens_match_generate(tmp_path, capsys):
    """The compiled loop (linearize.CompiledDecode for ours, torch.compile with a StaticCache for the base)
    decodes the same greedy tokens as generate, and its rows run; ``--inductor`` entries reach torch.compile."""
    from benchmarks import generate as G

    torch._dynamo.reset()
    assert G.main(["--smoke", "--loops", "lean,compiled", "--batches", "3", "--no-fit", "--out-dir", str(tmp_path),
                   "--inductor", "triton.persistent_reductions=False"]) == 0
    out = capsys.readouterr().out
    assert "ours: compiled step vs generate greedy tokens: equal" in out
    assert "base: compiled step vs generate greedy tokens: equal" in out
    payload = json.loads(next(tmp_path.glob("generate-cpu-*.json")).read_text())
    comp = [r for r in payload["rows"] if r["section"] == "decode" and r["loop"] == "compiled"]
    assert {r["model"] for r in comp} == {"ours", "base"} and all(r["tok_s"] > 0 and "error" not in r for r in comp)


def test_smoke_profile_and_basek_rows(tmp_path, capsys):
    """--profile-steps: the headline batch's lean rows carry a per-kernel (on a CPU: per-op) profile, in the
    JSON and the markdown; --models basek: the base on the softmax decode kernel runs as a row of its own."""
    from benchmarks import generate as G

    assert G.main(["--smoke", "--loops", "lean", "--batches", "3", "--no-fit", "--profile-steps", "2",
                   "--models", "ours,base,basek", "--out-dir", str(tmp_path)]) == 0
    assert "basek: lean (3, 12) vs generate (3, 12) greedy tokens: equal" in capsys.readouterr().out
    js = next(tmp_path.glob("generate-cpu-*.json"))
    rows = [r for r in json.loads(js.read_text())["rows"] if r["section"] == "decode"]
    assert {r["model"] for r in rows} == {"ours", "base", "basek"} and all("error" not in r for r in rows)
    for r in rows:
        p = r["profile"]
        assert p["steps"] == 2 and p["launches_per_step"] > 0 and p["top"][0]["us_per_step"] >= p["top"][-1]["us_per_step"]
    assert "## Kernel profile" in js.with_suffix(".md").read_text()


def test_a_failed_row_keeps_the_cause_not_only_the_first_line():
    """Inductor wraps the real error several lines down, in a chained exception (H200, 2026-12-03: the
    row said only 'SubprocException: An exception occurred in a subprocess:')."""
    from benchmarks.gen_loops import error_tail, short_error

    try:
        try:
            raise ValueError("the real cause: pointer type *i1")
        except ValueError as inner:
            raise RuntimeError("An exception occurred in a subprocess:\n(details below)") from inner
    except RuntimeError as e:
        assert short_error(e) == "RuntimeError: An exception occurred in a subprocess:"
        tail = error_tail(e)
    assert "the real cause: pointer type *i1" in tail and "details below" in tail


def test_warmup_and_timed_run_share_the_cache_shape(monkeypatch):
    """--profile-steps sizes the warm-up's cache for its extra profiled steps; the timed run's cache must be
    sized the same, or a static cache (kept softmax layers, the base) has another shape and the compiled step
    recompiles inside the timed run (H200, 2026-12-03: 40 s of compiling counted as decode time)."""
    from benchmarks import generate as G

    sizes = []
    real = G.make_cache

    def spy(model, kind, max_len):
        sizes.append((kind, max_len))
        return real(model, kind, max_len)

    monkeypatch.setattr(G, "make_cache", spy)
    assert G.main(["--smoke", "--set", "softmax_layers=[1]", "--loops", "compiled", "--batches", "3", "--no-fit",
                   "--profile-steps", "2", "--models", "ours"]) == 0
    static = [n for kind, n in sizes if kind == "static"]
    assert len(static) >= 2 and len(set(static)) == 1, sizes


def test_smoke_compiled_with_fused_projections(capsys):
    """--fuse-projections: the compiled step with one q/k/v and one gate/up GEMM a layer gives generate's tokens."""
    from benchmarks import generate as G

    assert G.main(["--smoke", "--loops", "compiled", "--batches", "3", "--no-fit", "--models", "ours",
                   "--fuse-projections"]) == 0
    assert "ours: compiled step vs generate greedy tokens: equal" in capsys.readouterr().out


def test_prefill_spans_never_leave_one_token():
    from benchmarks.gen_loops import prefill_spans

    assert prefill_spans(128, 16) == [(a, a + 16) for a in range(0, 128, 16)]
    assert prefill_spans(33, 16) == [(0, 16), (16, 33)]  # not (32, 33): a one-token forward is a decode step
    assert prefill_spans(34, 16) == [(0, 16), (16, 32), (32, 34)]
    assert prefill_spans(10, None) == prefill_spans(10, 16) == [(0, 10)]


@pytest.mark.parametrize("cfg", [None, {"softmax_layers": [1]}, {"softmax_heads": [[1, 0]], "feature_map_per_kv_head": True}],
                         ids=["base", "kept-layer", "kept-heads"])
def test_chunked_prefill_decodes_the_same_tokens(cfg):
    """The largest-batch probe prefills 16 tokens a forward: the same greedy tokens as one prefill forward."""
    import linearize
    from benchmarks.gen_loops import make_cache, run_lean
    from tests.tiny_models import perturb_added_weights, tiny_model

    model = tiny_model("llama")
    if cfg is not None:
        model = linearize.convert(model, linearize.LinearizeConfig(feature_dim=6, window=4, **cfg))
        perturb_added_weights(model)
    kind = "dynamic" if cfg is not None and not cfg.get("softmax_layers") else "static"
    ids = torch.randint(3, 96, (2, 37), generator=torch.Generator().manual_seed(0))
    runs = [run_lean(model, ids, 6, cache=make_cache(model, kind, 37 + 6), keep_tokens=True, prefill_chunk=c) for c in (None, 8)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)


def test_grown_dynamic_cache_holds_token_n_and_decodes_on():
    """The base's DynamicCache probe: after the prefill its full-attention layers are grown to the length a real
    run reaches (prompt + N - 1 after the last step), the decode goes on from there, and nothing else grows."""
    import linearize
    from benchmarks.gen_loops import grow_kv_layers, make_cache, probe_fits, run_lean
    from tests.tiny_models import tiny_model

    base = tiny_model("llama")
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = make_cache(base, "dynamic", 0)
    before = run_lean(base, ids, 1, cache=make_cache(base, "dynamic", 0), keep_tokens=True).tokens
    res = run_lean(base, ids, 4, cache=cache, grow_to=30, keep_tokens=True)
    assert res.generated == 4 and torch.equal(res.tokens[:, :1], before)  # the prefill's token is the prompt's
    for layer in cache.layers:
        assert layer.keys.shape[-2] == layer.values.shape[-2] == 33  # 30 + 3 decode steps
        assert torch.count_nonzero(layer.keys[..., 9:30, :]) == 0  # the grown span
    assert grow_kv_layers(cache, 10) == 0  # never shrinks
    assert probe_fits(base, 2, 8, 16, "dynamic", 96, torch.device("cpu")) == (True, None, None)

    ours = linearize.convert(tiny_model("llama"), linearize.LinearizeConfig(feature_dim=6, window=4, softmax_heads=[[1, 0]]))
    cache = make_cache(ours, "dynamic", 40)
    run_lean(ours, ids, 2, cache=cache, prefill_chunk=4)
    assert grow_kv_layers(cache, 40) == 0  # linearized layers (and the heads they keep) are not DynamicLayers
    assert cache.get_seq_length() == 10


def test_goal_takes_the_base_on_its_larger_cache():
    from benchmarks import generate as G

    fit = lambda m, c, b: {"section": "fit", "model": m, "cache": c, "largest": b, "smallest_failing": b + 1,  # noqa: E731
                           "stopped": "converged"}
    rows = [fit("ours", "dynamic", 9000), fit("base", "static", 1000), fit("base", "dynamic", 1200)]
    line = next(g for g in G.goals(rows, G.parse_args([])) if g.startswith("largest batch"))
    assert "base 1200 (dynamic cache; static 1000): 7.5x (goal >= 8x): MISSED" in line


def test_static_cache_sizes_the_kept_heads_for_the_whole_run():
    """Layers and heads kept softmax together decode on a static cache (the kept layers' mask). The kept heads'
    buffers must hold the static cache's whole length from the prefill on: a captured step cannot grow them,
    and replays would write past them (the fifteenth session's segfault on the H200). The capture guard
    names a layer that is short."""
    import linearize
    from benchmarks.gen_loops import run_lean
    from linearize.decode import kept_heads_short
    from linearize.modules.cache import HybridCacheLayer
    from tests.tiny_models import tiny_model
    from transformers import DynamicCache, StaticCache

    model = linearize.convert(tiny_model("llama"), linearize.LinearizeConfig(
        feature_dim=6, window=4, softmax_layers=[0], softmax_heads=[[1, 0]]))
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=9 + 100)  # (the kept heads' first buffer: 64 slots)
    run_lean(model, ids, 3, cache=cache)
    kept = [layer for layer in cache.layers if isinstance(layer, HybridCacheLayer) and layer.kept_k is not None]
    assert kept and all(layer.kept_k.shape[2] >= 109 for layer in kept)
    assert kept_heads_short(cache, 109) is None

    heads_only = linearize.convert(tiny_model("llama"), linearize.LinearizeConfig(feature_dim=6, window=4, softmax_heads=[[1, 0]]))
    bare = DynamicCache(config=heads_only.config)  # not reserved: the buffers start at 64 slots and double
    run_lean(heads_only, ids, 3, cache=bare)
    why = kept_heads_short(bare, 109)
    assert why is not None and "layer 1" in why and "reserve_kept_heads(cache, 109)" in why


def test_random_weight_models_load_only_what_the_rows_need(tmp_path):
    """A config-only model (benchmarks/configs/*.json) loads the base only when a base row is asked for: an 8B
    architecture's twin would be 16 GB of host memory and its initialization for nothing."""
    from benchmarks import generate as G
    from tests.tiny_models import tiny_config_json

    cfg = tiny_config_json(tmp_path / "tiny.json")
    args = G.parse_args(["--model", str(cfg), "--models", "ours", "--set", "feature_dim=4", "--set", "window=4"])
    models, info = G.load_real(args)
    assert list(models) == ["ours"] and info["params"] > 0 and info["pad_token_id"] == 0
    args = G.parse_args(["--model", str(cfg), "--models", "ours,base", "--set", "feature_dim=4", "--set", "window=4"])
    models, _ = G.load_real(args)
    assert sorted(models) == ["base", "ours"]
    assert torch.equal(models["base"].lm_head.weight, models["ours"].lm_head.weight)  # one seed: twins


@pytest.mark.parametrize("kv_maps", [False, True])
def test_llama31_8b_config_at_tiny_widths_decodes_like_its_full_forward(tmp_path, kv_maps):
    """``benchmarks/configs/llama3.1-8b.json`` (what gpu_decode_calls.sh 15 and 16 time) with its architecture kept:
    llama3 RoPE scaling, 4 query heads a KV head, untied head; only the widths and depth cut. Converted (both key-map
    layouts, maps moved off their identity start), greedy cached decode's logits equal the full forward's."""
    import linearize
    from benchmarks.random_model import random_model
    from tests.tiny_models import perturb_added_weights

    cfg = json.loads((ROOT / "benchmarks/configs/llama3.1-8b.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["num_attention_heads"] == 4 * cfg["num_key_value_heads"]
    cfg |= {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 500}
    path = tmp_path / "llama31-tiny.json"
    path.write_text(json.dumps(cfg))
    model = linearize.convert(random_model(path, torch.float32, 0).eval(),
                              linearize.LinearizeConfig(window=16, feature_dim=8, feature_map_per_kv_head=kv_maps))
    perturb_added_weights(model)
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        full = model(input_ids=out.sequences).logits[:, ids.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=1e-4, atol=1e-4)


def test_a_failed_probe_drops_its_cache_before_giving_memory_back(monkeypatch):
    """A probe that runs out of memory must hold no reference to its (partly allocated) cache when it empties the
    allocator's cache: a kept reference left its blocks reserved, and later, smaller probes failed among them."""
    import weakref

    from benchmarks import gen_loops
    from tests.tiny_models import tiny_model

    class Cache:  # stands for a StaticCache whose layers were allocated before the OOM
        pass

    refs, alive_at_free = [], []

    def make_cache(model, kind, max_len):
        cache = Cache()
        refs.append(weakref.ref(cache))
        return cache

    def run_lean(model, ids, steps, cache=None, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.10 GiB")

    monkeypatch.setattr(gen_loops, "make_cache", make_cache)
    monkeypatch.setattr(gen_loops, "run_lean", run_lean)
    monkeypatch.setattr(gen_loops, "free_memory", lambda device: alive_at_free.append(refs[-1]() is not None))
    assert gen_loops.probe_fits(tiny_model("llama"), 4, 8, 16, "static", 96, torch.device("cpu")) == (False, None, "OOM")
    assert alive_at_free == [False]


def test_inductor_entries_parse_or_say_what_is_wrong():
    """``--inductor KEY=VALUE``: values as Python literals (else strings), keys checked against inductor's config;
    not together with --compile-mode (torch.compile takes mode or options)."""
    from argparse import Namespace

    from benchmarks import generate as G

    assert G.compile_options(Namespace(compile_mode=None, inductor=[])) == {}
    assert G.compile_options(Namespace(compile_mode="default", inductor=[])) == {"mode": "default"}
    got = G.compile_options(Namespace(compile_mode=None, inductor=["triton.multi_kernel=1", "triton.persistent_reductions=False"]))
    assert got == {"options": {"triton.multi_kernel": 1, "triton.persistent_reductions": False}}
    for entries, mode, message in ((["triton.multi_kernel"], None, "KEY=VALUE"), (["no.such_key=1"], None, "not an inductor"),
                                   (["triton.multi_kernel=1"], "default", "cannot be combined")):
        with pytest.raises(SystemExit, match=message):
            G.compile_options(Namespace(compile_mode=mode, inductor=entries))


def test_blas_choice_is_parsed_and_checked(capsys):
    """``--blas``: torch's default unless given; only the two libraries ``preferred_blas_library`` takes here."""
    from benchmarks import generate as G

    assert G.parse_args([]).blas is None
    assert G.parse_args(["--blas", "cublaslt"]).blas == "cublaslt"
    with pytest.raises(SystemExit):
        G.parse_args(["--blas", "hipblaslt"])
    assert "invalid choice" in capsys.readouterr().err
