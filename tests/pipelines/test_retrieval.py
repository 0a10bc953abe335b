"""Retrieval-layer probe (linearize.pipelines.retrieval) on a tiny random model and a character tokenizer."""

import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from linearize.pipelines import retrieval as R


@pytest.fixture(scope="module")
def tok():
    chars = ["<pad>", "<s>", "</s>", "<unk>", *sorted(set(string.printable) - set("\t\n\r\x0b\x0c"))]
    t = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def test_examples_locate_both_mentions_of_the_key(tok):
    exs = R.examples(tok, 700, 6, seed=1, min_distance=64)
    assert len(exs) == 6
    for ex in exs:
        answer = ex.ids[ex.n_ctx:]
        assert len(ex.key_pos) == 2 * len(answer)  # " The pass key is K. Remember it. K is the pass key."
        assert [ex.ids[p] for p in ex.key_pos] == answer + answer
        assert ex.n_ctx - 1 - max(ex.key_pos) >= 64
    with pytest.raises(ValueError, match="longer --length"):
        R.examples(tok, 700, 6, min_distance=690)


def test_window_only_cuts_the_receptive_field_and_restores_the_model(model):
    T, W = 40, 4
    x = torch.randint(4, 90, (1, T))
    y = x.clone()
    y[0, :10] = torch.randint(4, 90, (10,))  # differs only > 3 layers x (W - 1) = 9 positions before the last
    with torch.no_grad():
        plain = model(input_ids=x).logits
        with R.window_only(model, [0, 1, 2], W):
            a, b = model(input_ids=x).logits, model(input_ids=y).logits
            with R.window_only(model, [], W):
                assert torch.equal(model(input_ids=x).logits, a)
        with R.window_only(model, [0, 1, 2], T):  # a window as long as the text: the plain model
            torch.testing.assert_close(model(input_ids=x).logits, plain, rtol=1e-5, atol=1e-5)
        assert torch.equal(a[0, -1], b[0, -1]) and not torch.allclose(plain[0, -1], model(input_ids=y).logits[0, -1])
        assert torch.equal(model(input_ids=x).logits, plain)  # the forwards are restored


def test_probe_counts_the_attention_on_the_key_beyond_the_window(model, tok):
    exs = R.examples(tok, 300, 2, min_distance=16)
    mass = R.probe(model, exs, window=16)
    assert mass.shape == (3, 4) and model.config._attn_implementation == "sdpa"
    want = torch.zeros(3, 4)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for ex in exs:
            att = model(input_ids=torch.tensor([ex.ids]), output_attentions=True).attentions
            for layer in range(3):
                for q in range(ex.n_ctx - 1, len(ex.ids) - 1):
                    want[layer] += sum(att[layer][0, :, q, k] for k in ex.key_pos if q - k >= 16) / (len(ex.ids) - ex.n_ctx) / len(exs)
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(mass, want, rtol=1e-4, atol=1e-6)
    assert (mass > 0).all()
    assert torch.equal(R.probe(model, exs, window=1000), torch.zeros(3, 4))  # nothing beyond the window


def test_rank_and_check_reports_every_set(model, tok):
    res = R.rank_and_check(model, tok, keep=[1, 2], window=16, length=300, n=4, compare=[[1, 2]], progress=False)
    assert sorted(res["ranking"]) == [0, 1, 2] and res["sets"]["probe top 1"] == [res["ranking"][0]]
    assert res["sets"]["evenly spaced 2"] == R.evenly_spaced([0, 1, 2], 2) == [0, 2]
    assert set(res["sets"]) == {"probe top 1", "evenly spaced 1", "probe top 2", "evenly spaced 2", "given 1,2",
                                "none kept (all windowed)", "all kept (base)"}
    exs = R.examples(tok, 300, 4, 0, min_distance=16)
    assert res["passkey_acc"]["all kept (base)"] == R.passkey_accuracy(model, exs)
    assert "| probe top 1 |" in R.markdown(res, "tiny")
    assert R.evenly_spaced(list(range(30)), 3) == [5, 15, 25]
    with pytest.raises(ValueError, match="only 3 layers"):
        R.rank_and_check(model, tok, keep=[4], length=300, n=2)


def test_the_command_writes_json_markdown_and_plot(model, tok, tmp_path):
    from typer.testing import CliRunner

    from linearize.cli import app

    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["retrieval-layers", str(tmp_path / "tiny"), "--keep", "1", "--keep", "2", "--window", "16",
                                 "--sinks", "2", "--length", "300", "--examples", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "probe top 2" in (out / "tiny.md").read_text() and (out / "tiny.png").stat().st_size > 0
    import json

    res = json.loads((out / "tiny.json").read_text())
    assert res["sinks"] == 2 and res["keep"] == [1, 2]
    # --write-config: a YAML that `convert --config` reads, with the layers `choose` picks from that result
    cfg_path = tmp_path / "cfg" / "keep.yaml"
    r = CliRunner().invoke(app, ["retrieval-layers", str(tmp_path / "tiny"), "--keep", "1", "--keep", "2", "--window", "16",
                                 "--sinks", "2", "--length", "300", "--examples", "2", "--out", str(out),
                                 "--write-config", str(cfg_path), "--min-acc", "0"])
    assert r.exit_code == 0, r.output
    from linearize.pipelines.config import build_config

    res = json.loads((out / "tiny.json").read_text())
    cfg = build_config(config_file=cfg_path)
    assert cfg.linearize.softmax_layers == res["sets"]["probe top 1"]  # min-acc 0: the fewest layers tried
    assert cfg.linearize.sink_tokens == 2 and cfg.linearize.window == 16
    r = CliRunner().invoke(app, ["retrieval-layers", str(tmp_path / "tiny"), "--min-acc", "1.5"])
    assert r.exit_code != 0 and "--min-acc" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["retrieval-layers", str(tmp_path / "missing")])
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_choose_takes_the_fewest_layers_that_reach_the_accuracy():
    res = {"keep": [10, 3, 6], "length": 1024, "window": 64, "sinks": 4,
           "sets": {"probe top 3": [1, 2, 3], "probe top 6": [1, 2, 3, 4, 5, 6], "probe top 10": list(range(10))},
           "passkey_acc": {"probe top 3": 0.0, "probe top 6": 0.5, "probe top 10": 0.75}}
    assert R.choose(res, 0.5) == (6, [1, 2, 3, 4, 5, 6], True)
    assert R.choose(res, 0.7) == (10, list(range(10)), True)
    assert R.choose(res, 0.9) == (10, list(range(10)), False)  # none reaches it: the largest tried, flagged
    text = R.config_yaml(res, "m", 0.9)
    assert "no --keep value reached 90%" in text and "softmax_layers: [0, 1, 2" in text


def test_window_only_keeps_the_named_heads_global(model):
    T, W = 40, 4
    x = torch.randint(4, 90, (1, T))
    mods = R._attention_modules(model)
    seen = []
    hook = mods[1].o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].unflatten(-1, (4, 8))))
    try:
        with torch.no_grad():
            model(input_ids=x)
            with R.window_only(model, [1], W, kept_heads=[[1, 1]]):  # KV head 1 = query heads 2, 3
                model(input_ids=x)
            with R.window_only(model, [1], W):
                model(input_ids=x)
    finally:
        hook.remove()
    plain, mixed, windowed = seen
    torch.testing.assert_close(mixed[..., 2:, :], plain[..., 2:, :], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[..., :2, :], windowed[..., :2, :], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(windowed[0, -1, 2:], plain[0, -1, 2:], atol=1e-4)


def test_rank_and_check_by_heads(model, tok, tmp_path):
    res = R.rank_and_check(model, tok, keep=[1, 3], window=16, length=300, n=4, compare=[[[0, 1]]], progress=False, heads=True,
                           mqar=5)
    from linearize.eval.recall import score_mqar

    assert res["mqar_acc"]["all kept (base)"] == score_mqar(model, tok, limit=5, progress=False)["acc"]
    assert set(res["mqar_acc"]) == set(res["sets"]) and "| MQAR acc |" in R.markdown(res, "tiny")
    assert res["unit"] == "heads" and sorted(res["ranking"]) == [[i, h] for i in range(3) for h in range(2)]
    assert res["sets"]["probe top 1"] == [res["ranking"][0]] and res["sets"]["given 0/1"] == [[0, 1]]
    exs = R.examples(tok, 300, 4, 0, min_distance=16)
    assert res["passkey_acc"]["all kept (base)"] == R.passkey_accuracy(model, exs)
    scores = [res["score_per_head"][f"{i}/{h}"] for i, h in res["ranking"]]
    assert scores == sorted(scores, reverse=True)
    assert "| probe top 3 |" in R.markdown(res, "tiny") and "| rank | layer | KV head |" in R.markdown(res, "tiny")
    R.plot(res, tmp_path / "h.png", "tiny")
    assert (tmp_path / "h.png").stat().st_size > 0
    text = R.config_yaml(res, "tiny", 0.0)
    assert "softmax_heads:" in text and "--heads" in text
    from linearize.pipelines.config import build_config

    (tmp_path / "keep.yaml").write_text(text)
    assert build_config(config_file=tmp_path / "keep.yaml").linearize.softmax_heads == res["sets"]["probe top 1"]
    with pytest.raises(ValueError, match="only 6 KV heads"):
        R.rank_and_check(model, tok, keep=[7], length=300, n=2, heads=True)


def test_mqar_lines_leave_the_suite_sequences_unchanged(tok):
    """``lines=True`` adds where each queried pair sits, drawing the same random numbers: the suite's sequences
    (what ``score_mqar`` scores) do not change."""
    import random

    from linearize.eval.recall import mqar_example, mqar_sequences

    plain = mqar_example(tok, 8, random.Random(3))
    ids, spans, lines = mqar_example(tok, 8, random.Random(3), lines=True)
    assert (ids, spans) == plain and len(lines) == len(spans) == 8
    colon = tok.convert_tokens_to_ids(":")
    for (a, b), (s, e) in zip(spans, lines):
        line = ids[s:e]  # "key: value\n", a token a character
        n = line.index(colon) + 1
        assert ids[a - n:a] == line[:n]  # the query names the line's key ...
        assert ids[a:b] == line[n:n + b - a]  # ... and its answer is the line's value
    assert [s[:2] for s in mqar_sequences(tok, limit=10, seed=0, lines=True)[0]] == mqar_sequences(tok, limit=10, seed=0)[0]


def test_mqar_probe_counts_the_attention_on_the_queried_line(model, tok):
    from linearize.eval.recall import mqar_sequences

    mass = R.mqar_probe(model, tok, 5, window=8)
    seqs, _ = mqar_sequences(tok, limit=5, seed=1, lines=True)
    want = torch.zeros(3, 4)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for ids, spans, lines in seqs:
            att = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
            for layer in range(3):
                per = torch.zeros(4)
                for (a, b), (s, e) in zip(spans, lines):
                    rows = range(a - 1, b - 1)
                    per += sum(sum(att[layer][0, :, q, k] for k in range(s, e) if q - k >= 8) for q in rows) / len(rows)
                want[layer] += per / len(spans) / len(seqs)
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(mass, want, rtol=1e-4, atol=1e-6)
    assert (mass > 0).all()


@pytest.mark.parametrize("rank_by", ["mqar", "both"])
def test_rank_by_mqar_or_both(model, tok, tmp_path, rank_by):
    """The ranking follows the chosen probe: MQAR's KV-head scores, or the sum of the two normalized scores."""
    res = R.rank_and_check(model, tok, keep=[1, 2], window=8, length=300, n=2, progress=False, heads=True,
                           rank_by=rank_by, mqar_probe_n=5)
    probes = res["scores_by_probe"]
    assert set(probes) == ({"mqar"} if rank_by == "mqar" else {"passkey", "mqar"}) and res["rank_by"] == rank_by
    if rank_by == "mqar":
        want = probes["mqar"]
    else:
        top = {k: max(v.values()) for k, v in probes.items()}
        want = {u: probes["passkey"][u] / top["passkey"] + probes["mqar"][u] / top["mqar"] for u in probes["mqar"]}
    assert res["score_per_head"] == pytest.approx(want)
    scores = [res["score_per_head"][f"{i}/{h}"] for i, h in res["ranking"]]
    assert scores == sorted(scores, reverse=True)
    assert "MQAR answer" in R.markdown(res, "tiny") and f"--rank-by {rank_by}" in R.config_yaml(res, "tiny", 0.0)
    R.plot(res, tmp_path / "h.png", "tiny")
    with pytest.raises(ValueError, match="rank_by must be one of"):
        R.rank_and_check(model, tok, keep=[1], length=300, n=2, rank_by="lambada")


def test_the_command_takes_rank_by(model, tok, tmp_path):
    from typer.testing import CliRunner

    from linearize.cli import app

    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out"
    args = ["retrieval-layers", str(tmp_path / "tiny"), "--heads", "--keep", "1", "--window", "8", "--length", "300",
            "--examples", "2", "--out", str(out)]
    r = CliRunner().invoke(app, args + ["--rank-by", "both", "--mqar-probe", "3"])
    assert r.exit_code == 0, r.output
    assert (out / "tiny-heads-rank-both.json").exists() and (out / "tiny-heads-rank-both.png").stat().st_size > 0
    r = CliRunner().invoke(app, args + ["--rank-by", "nope"])
    assert r.exit_code != 0 and "--rank-by" in r.output and "Traceback" not in r.output
