import math

import pytest
import torch

from linearize.eval.perplexity import parse_ppl, sliding_perplexity, windows
from linearize.eval.recall import mqar_example, passkey_examples, score_mqar, score_passkey
from tests.eval.helpers import word_tokenizer
from tests.tiny_models import tiny_model


@pytest.mark.parametrize("total,length,stride", [(100, 32, 16), (100, 32, 31), (33, 32, 8), (10, 32, 16), (101, 20, 7)])
def test_windows_score_every_token_but_first_once(total, length, stride):
    ws = windows(total, length, stride)
    scored = [t for b, e, s in ws for t in range(e - s, e)]
    assert sorted(scored) == list(range(1, total))
    for b, e, s in ws:
        assert e - b <= length and s <= e - b
    # every window after the first keeps at least length - stride tokens of context
    for b, e, s in ws[1:]:
        assert (e - s) - b >= min(length - stride, e - s - b)


def test_sliding_perplexity_stride_equal_length_matches_blocks():
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (64,), generator=torch.Generator().manual_seed(0))
    r = sliding_perplexity(model, ids, 16, stride=16, progress=False)
    nll = 0.0
    for b in range(0, 64, 16):  # disjoint blocks, all tokens but each block's first scored
        x = ids[b : b + 16][None]
        lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        nll -= lp.gather(1, x[0, 1:, None]).sum().item()
    assert r["tokens"] == 60 and r["stride"] == 16 and r["windows"] == 4
    assert r["ppl"] == pytest.approx(math.exp(nll / 60), rel=1e-5)
    r2 = sliding_perplexity(model, ids, 16, stride=4, progress=False, batch_size=3)
    assert r2["tokens"] == 63 and r2["windows"] > 4
    assert sliding_perplexity(model, ids, 16, stride=4, progress=False, batch_size=1)["ppl"] == pytest.approx(r2["ppl"], rel=1e-5)


def test_parse_ppl():
    assert parse_ppl("ppl:austen") == ("austen", (512, 2048, 4096))
    assert parse_ppl("ppl:notes.txt@64,128") == ("notes.txt", (64, 128))
    with pytest.raises(ValueError):
        parse_ppl("ppl:austen@x")


def test_passkey_deterministic_and_exact_length():
    tok = word_tokenizer()
    a = passkey_examples(tok, (64, 96), (0.0, 0.5, 1.0), per_cell=2, seed=3)
    b = passkey_examples(tok, (64, 96), (0.0, 0.5, 1.0), per_cell=2, seed=3)
    c = passkey_examples(tok, (64, 96), (0.0, 0.5, 1.0), per_cell=2, seed=4)
    assert a == b and [e["key"] for e in a] != [e["key"] for e in c]
    for e in a:
        assert len(e["context"]) + len(e["answer"]) == e["length"]


def test_passkey_and_mqar_score_on_tiny_model():
    tok = word_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    r1 = score_passkey(model, tok, (64, 128), limit=10, seed=0, progress=False)
    r2 = score_passkey(model, tok, (64, 128), limit=10, seed=0, progress=False)
    assert r1 == r2 and 0.0 <= r1["acc"] <= 1.0 and r1["n"] == 10 and "acc@128" in r1
    # per depth: 5 depths x 2 lengths, 1 example per cell; the depth means average back to the total
    depths = [r1[f"acc_depth{d:g}"] for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert sum(depths) / 5 == pytest.approx(r1["acc"])
    m1 = score_mqar(model, tok, (2, 4), limit=4, seed=1, progress=False)
    assert m1 == score_mqar(model, tok, (2, 4), limit=4, seed=1, progress=False)
    assert m1["queries"] == 2 * 2 + 2 * 4 and 0.0 <= m1["acc"] <= 1.0


def test_mqar_spans_point_at_values():
    import random

    from transformers import AutoTokenizer  # noqa: F401

    tok = word_tokenizer()
    ids, spans = mqar_example(tok, 3, random.Random(0))
    assert len(spans) == 3 and all(0 < a < b <= len(ids) for a, b in spans)


def test_too_long_context_is_one_line_error():
    tok = word_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))  # max_position_embeddings=512
    with pytest.raises(ValueError, match="max_position_embeddings") as e:
        score_passkey(model, tok, (1024,), limit=1, progress=False)
    assert "\n" not in str(e.value)
