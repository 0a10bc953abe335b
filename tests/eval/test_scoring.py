import math

import numpy as np
import pytest
import torch

from linearize.eval.scoring import encode_pair, loglikelihood, loglikelihood_tokens, multiple_choice_metrics, score_task
from linearize.eval.tasks import Doc, Request, Task, winogrande_doc
from tests.eval.helpers import SuccessorLM, word_tokenizer
from tests.tiny_models import tiny_model


def test_acc_vs_acc_norm_differ_with_lengths():
    # the long choice has the larger total loglikelihood, the short one the larger per-character one
    choices = ["a", "abcdefghij"]
    lls = [-2.0, -5.0]
    m = multiple_choice_metrics(lls, choices, gold=1)
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0
    # bytes vs characters: "é" is 2 bytes
    m = multiple_choice_metrics([-3.0, -2.4], ["éé", "abc"], gold=0)
    assert m["acc_norm"] == 0.0 and m["acc_bytes"] == 1.0


def test_encode_pair_moves_trailing_space():
    tok = word_tokenizer()
    ctx, cont = encode_pair(tok, "the sea ", "ship")
    assert tok.convert_ids_to_tokens(ctx) == ["the", "sea"] and tok.convert_ids_to_tokens(cont) == ["ship"]
    ctx, cont = encode_pair(tok, "", "ship")
    assert ctx == [tok.bos_token_id]


def test_loglikelihood_and_greedy_on_successor_model():
    model = SuccessorLM(vocab=32, margin=3.0)
    lse = math.log(math.exp(3.0) + 31)
    res = loglikelihood_tokens(model, [([5, 6], [7, 8]), ([5, 6], [7, 9]), ([5], [9])], batch_size=2)
    assert res[0][1] is True and res[1][1] is False and res[2][1] is False
    assert res[0][0] == pytest.approx(2 * (3.0 - lse), abs=1e-5)
    assert res[1][0] == pytest.approx((3.0 - lse) + (0.0 - lse), abs=1e-5)


def test_lambada_metrics_greedy_match():
    tok = word_tokenizer()
    ids = tok.convert_tokens_to_ids
    # successor model: after "sea" (id k) it predicts id k+1 = "ship"
    vocab = tok.get_vocab()
    inv = {v: k for k, v in vocab.items()}
    nxt = lambda w: inv[vocab[w] + 1]  # noqa: E731
    docs = [Doc([Request("the sea", " " + nxt("sea"))]), Doc([Request("the sea", " moon")])]
    out = score_task(SuccessorLM(vocab=len(vocab)), tok, Task("lambada", "lambada", docs), progress=False)
    assert out["acc"] == 0.5 and out["n"] == 2 and out["perplexity"] > 1
    assert ids("ship") == vocab["sea"] + 1


def test_batched_equals_unbatched_tiny_llama():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(3, 96, (n,), generator=g).tolist(), torch.randint(3, 96, (m,), generator=g).tolist()) for n, m in [(3, 2), (9, 1), (5, 4), (12, 3), (1, 1)]]
    one = loglikelihood_tokens(model, pairs, batch_size=1, progress=False)
    many = loglikelihood_tokens(model, pairs, batch_size=4, progress=False)
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_left_truncation_to_max_length():
    model = tiny_model("llama", max_position_embeddings=8)
    res = loglikelihood_tokens(model, [(list(range(3, 40)), [5, 6])], progress=False)
    assert math.isfinite(res[0][0])


def test_winogrande_partial_scoring():
    d = winogrande_doc("Sarah was better than Maria so _ got the easy cases.", "Sarah", "Maria", "2")
    assert d.gold == 1
    assert [r.context for r in d.requests] == ["Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria"]
    assert {r.continuation for r in d.requests} == {" got the easy cases."}


def test_mc_task_scoring_end_to_end():
    tok = word_tokenizer()
    vocab = tok.get_vocab()
    inv = {v: k for k, v in vocab.items()}
    right = inv[vocab["sea"] + 1]
    doc = Doc([Request("the sea", " " + c) for c in (right, "moon dark")], gold=0, choices=[right, "moon dark"])
    out = score_task(SuccessorLM(vocab=len(vocab)), tok, Task("x", "multiple_choice", [doc, doc]), progress=False)
    assert out["acc"] == 1.0 and out["n"] == 2 and np.isfinite(out["acc_stderr"])
