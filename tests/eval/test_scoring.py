import math

import numpy as np
import pytest
import torch

from linearize.eval.scoring import encode_pair, loglikelihood_tokens, multiple_choice_metrics, score_task
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


def _mmlu_like_pairs(seed=0, vocab=96):
    """Shared contexts with one-token answers (MMLU), a shared multi-token prefix, odd lengths."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    ctxs = [rand(n) for n in (37, 5, 1, 64, 13)]
    pairs = [(c, [t]) for c in ctxs for t in (40, 41, 42, 43)]
    pairs += [(ctxs[0], [50, 51, 52]), (ctxs[0] + [50], [51, 53]), (ctxs[1], [7, 7]), (ctxs[3], rand(9))]
    return pairs


@pytest.mark.parametrize("linearized", [False, True])
def test_shared_forward_equals_per_request_reference(linearized):
    from linearize.eval.scoring import loglikelihood_tokens_reference

    model = tiny_model("llama")
    if linearized:
        import linearize
        from tests.tiny_models import perturb_added_weights

        model = linearize.convert(model, linearize.LinearizeConfig(window=4))
        perturb_added_weights(model)
    pairs = _mmlu_like_pairs()
    ref = loglikelihood_tokens_reference(model, pairs)
    for bs in (1, 3, 64):
        fast = loglikelihood_tokens(model, pairs, batch_size=bs, progress=False)
        for (a, ga), (b, gb) in zip(fast, ref):
            assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_shared_forward_runs_one_forward_per_distinct_input():
    from linearize.eval.meter import Meter

    model = tiny_model("llama")
    pairs = _mmlu_like_pairs()
    with Meter(model) as m:
        loglikelihood_tokens(model, pairs, batch_size=1, progress=False)
    distinct = {tuple((c + t)[:-1]) for c, t in pairs}
    assert m.forwards == len(distinct) < len(pairs)
    assert m.tokens == sum(len(x) for x in distinct)


def test_mmlu_task_scores_like_the_reference_path():
    """score_task on MMLU-style docs (shared context, answers " A".." D") = metrics from the reference path."""
    from linearize.eval.scoring import doc_metrics, encode_pair, loglikelihood_tokens_reference
    from linearize.eval.tasks import mmlu_docs
    from tests.eval.helpers import byte_tokenizer

    tok = byte_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=1024)
    dev = [{"question": f"Which {i}?", "choices": ["sea", "ship", "wind", "sun"], "answer": i % 4} for i in range(5)]
    test = [{"question": f"Why {w} now?", "choices": ["blue", "grey", "cold", "warm"], "answer": j % 4} for j, w in enumerate(["a", "bb", "ccc"])]
    task = Task("mmlu", "multiple_choice", mmlu_docs("astronomy", test, dev))
    flat = [r for d in task.docs for r in d.requests]
    ref = loglikelihood_tokens_reference(model, [encode_pair(tok, r.context, r.continuation) for r in flat])
    expected = doc_metrics(task, ref)
    got = score_task(model, tok, task, batch_size=2, progress=False)
    assert got["acc"] == pytest.approx(np.mean([m["acc"] for m in expected])) and got["n"] == 3
    assert got["subjects"]["astronomy"]["n"] == 3 and "acc_norm" not in got


def test_meter_counts_unpadded_tokens_and_memory():
    from linearize.eval.meter import Meter

    model = tiny_model("llama")
    with Meter(model) as m:
        ids = torch.randint(3, 96, (2, 10))
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids[:1])
    r = m.result()
    assert r["tokens"] == 10 + 6 + 10 and r["forwards"] == 2 and r["peak_mem_mb"] > 10 and r["memory"] == "cpu_peak_rss"
    model(input_ids=ids)  # the hook is gone
    assert m.tokens == 26


def _byte_bpe_tokenizer():
    """A small byte-level BPE (GPT-2 style, merges across a context/continuation boundary possible)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the sea ship sails. The question: what is 2+2? Answer: A B C D", "hellaswag ends in a dog runs , fast"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


@pytest.mark.parametrize("make_tok", [word_tokenizer, _byte_bpe_tokenizer], ids=["word", "byte-bpe"])
def test_encode_pairs_equals_encode_pair(make_tok):
    """The batched, deduplicated encoding gives encode_pair's tokens for every request: shared contexts
    (MMLU's answers), trailing spaces moved to the continuation, empty contexts, repeated pairs."""
    from linearize.eval.scoring import encode_pairs

    tok = make_tok()
    q = "The question: what is 2+2? Answer:"
    pairs = [(q, " A"), (q, " B"), (q, " C"), (q, " D"), ("the sea ", "ship"), ("the sea", " ship"), ("", "ship sails"),
             ("hellaswag ends in a dog", " runs , fast."), ("the sea ", "ship"), ("  ", "the sea")]
    assert encode_pairs(tok, pairs, chunk=3) == [encode_pair(tok, c, x) for c, x in pairs]
