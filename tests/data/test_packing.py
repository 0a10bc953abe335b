"""Tokenize + pack + split + cache through build_dataset."""

from __future__ import annotations

import json
import time

import pytest
import torch

from linearize.data import build_dataset
from linearize.data.packing import pack_rows, special_ids, tokenizer_fingerprint

from .conftest import CHATML, make_tokenizer


def _docs(n: int) -> list[str]:
    return [f"Document number {i}. " + " ".join(f"w{i}x{j}" for j in range(5 + i % 7)) for i in range(n)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(60)))
    return path


def _pieces(rows: torch.Tensor, eos: int) -> list[list[int]]:
    """The flattened stream cut after each EOS; the trailing incomplete piece is dropped."""
    out, cur = [], []
    for t in rows.flatten().tolist():
        cur.append(t)
        if t == eos:
            out.append(cur)
            cur = []
    return out


def test_rows_exact_length_with_bos_and_eos(tmp_cache, tok, jsonl):
    s = build_dataset(str(jsonl), tok, 16, val_fraction=0.1, seed=0)
    assert s.train.dtype == torch.int64 and s.train.ndim == 2 and s.train.shape[1] == 16
    assert s.val.shape[1] == 16 and s.val.shape[0] > 0
    st = s.stats["train"]
    # no partial row kept, and no full row dropped
    assert st.rows == s.train.shape[0] == st.tokens // 16
    bos, eos = special_ids(tok)
    assert (bos, eos) == (1, 2)
    texts = set(_docs(60))
    pieces = _pieces(s.train, eos)
    assert len(pieces) >= 40
    train_texts = set()
    for piece in pieces:  # rows start at a BOS, so every piece is one whole document
        assert piece[0] == bos and piece.count(bos) == 1 and piece.count(eos) == 1
        text = tok.decode(piece[1:-1])
        assert text in texts
        train_texts.add(text)
    assert s.train[0, 0].item() == bos
    val_texts = {tok.decode(p[1:-1]) for p in _pieces(s.val, eos)}
    assert val_texts and val_texts <= texts and not (val_texts & train_texts)
    assert not set(s.train_ids) & set(s.val_ids)
    assert len(s.train_ids) + len(s.val_ids) == 60 and len(s.val_ids) == 6


def test_no_bos_tokenizer(tmp_cache, tok_nobos, jsonl):
    s = build_dataset(str(jsonl), tok_nobos, 32, cache=False)
    assert special_ids(tok_nobos) == (None, 2)
    assert 1 not in s.train.flatten().tolist()
    assert s.train.flatten().tolist().count(2) >= 50


def test_pack_rows_drops_partial_row():
    rows = pack_rows(torch.arange(50), 16)
    assert rows.shape == (3, 16) and rows[2, -1].item() == 47
    assert pack_rows(torch.arange(50), 16, max_rows=2).shape == (2, 16)
    assert pack_rows(torch.arange(5), 16).shape == (0, 16)


def test_split_determinism(tmp_cache, tok, jsonl):
    a = build_dataset(str(jsonl), tok, 16, seed=0, cache=False)
    b = build_dataset(str(jsonl), tok, 16, seed=0, cache=False)
    c = build_dataset(str(jsonl), tok, 16, seed=1, cache=False)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and a.val_ids == b.val_ids
    assert set(a.val_ids) != set(c.val_ids)
    assert not torch.equal(a.train[: len(c.train)], c.train[: len(a.train)])


def test_no_leakage_on_few_long_documents(tmp_cache, tok_nobos, tmp_path):
    """Three long 'novels': split by blocks; no validation block's text is in any training text."""
    import random

    rng = random.Random(0)
    novels = []
    for n in range(3):
        paras = [" ".join(f"n{n}p{p}w{rng.randint(0, 10**6)}" for _ in range(20)) for p in range(300)]
        novels.append("\n\n".join(paras))
    path = tmp_path / "novels.txt"
    path.write_text("\n\n\n".join(novels))
    s = build_dataset(str(path), tok_nobos, 64, block_chars=2_000, val_fraction=0.05, cache=False)
    assert s.stats["train"].documents == 3 and s.val.shape[0] > 0
    assert set(s.train_ids).isdisjoint(s.val_ids)
    assert all("@" in i for i in s.train_ids + s.val_ids)
    train_text = tok_nobos.decode(s.train.flatten().tolist())
    val_text = tok_nobos.decode(s.val.flatten().tolist())
    for para in val_text.split("\n\n")[1:-1]:  # whole paragraphs of validation rows
        if len(para) > 50:
            assert para not in train_text


def test_max_tokens_take_a_prefix(tmp_cache, tok, jsonl):
    full = build_dataset(str(jsonl), tok, 16, cache=False)
    lim = build_dataset(str(jsonl), tok, 16, max_train_tokens=5 * 16 + 3, max_val_tokens=16, cache=False)
    assert lim.train.shape == (5, 16) and lim.val.shape == (1, 16)
    assert torch.equal(lim.train, full.train[:5]) and torch.equal(lim.val, full.val[:1])
    assert lim.stats["train"].truncated and not full.stats["train"].truncated
    with pytest.raises(ValueError, match="less than one row"):
        build_dataset(str(jsonl), tok, 16, max_train_tokens=10, cache=False)


def test_too_little_data(tmp_cache, tok, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("a\n\n\nb\n")
    with pytest.raises(ValueError, match="less than one row of seq_len=4096"):
        build_dataset(str(path), tok, 4096, cache=False)


def test_cache_returns_identical_rows_faster(tmp_cache, tok, tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("\n\n\n".join(" ".join(f"word{i * 31 + j}" for j in range(300)) for i in range(100)))
    t0 = time.perf_counter()
    first = build_dataset(str(path), tok, 128, seed=7)
    t1 = time.perf_counter()
    second = build_dataset(str(path), tok, 128, seed=7)
    t2 = time.perf_counter()
    assert not first.from_cache and second.from_cache
    assert second.cache_path == first.cache_path and first.cache_path.parent == tmp_cache / "data" / "packed"
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert first.stats == second.stats and first.val_ids == second.val_ids
    assert t2 - t1 < (t1 - t0) / 3, (t1 - t0, t2 - t1)
    # anything that changes the rows changes the key: seq_len, seed, tokenizer, and the file's content
    assert not build_dataset(str(path), tok, 64, seed=7).from_cache
    assert not build_dataset(str(path), tok, 128, seed=8).from_cache
    assert not build_dataset(str(path), make_tokenizer(bos=True, vocab_size=300), 128, seed=7).from_cache
    path.write_text(path.read_text() + "\n\n\nmore text")
    assert not build_dataset(str(path), tok, 128, seed=7).from_cache
    assert len(list((tmp_cache / "data" / "packed").iterdir())) == 5  # no temp files left behind


def test_tokenizer_fingerprint(tok, tok_nobos, tok_chat):
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(make_tokenizer(bos=True))
    assert len({tokenizer_fingerprint(t) for t in (tok, tok_nobos, tok_chat)}) == 3


def test_chat_rendering(tmp_cache, tok, tok_chat, tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    templated = tok_chat.decode(build_dataset(str(path), tok_chat, 16, cache=False).train.flatten().tolist())
    assert "<|im_start|>user\nquestion " in templated and "<|im_end|>\n<|im_start|>assistant\nanswer " in templated
    plain = tok.decode(build_dataset(str(path), tok, 16, cache=False).train.flatten().tolist())
    assert "User: question " in plain and "?\nAssistant: answer " in plain


def test_mixing_sources(tmp_cache, tok, tmp_path, jsonl):
    other = tmp_path / "other.txt"
    other.write_text("\n\n\n".join(f"other text {i} " * 5 for i in range(30)))
    s = build_dataset(f"{jsonl}+{other}", tok, 16, cache=False)
    for ids in (s.train_ids, s.val_ids):  # each source is split on its own: both feed both sides
        assert any(i.startswith("docs.jsonl:") for i in ids) and any(i.startswith("other.txt#") for i in ids)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_dataset(f"{jsonl}+{tmp_path}/missing.txt", tok, 16)


def test_builtin_mix_with_budget(tok_nobos):
    """Real corpora, mixed and truncated (packed cache off: nothing written)."""
    s = build_dataset("austen+shakespeare", tok_nobos, 256, max_train_tokens=256 * 40, max_val_tokens=256 * 8, cache=False)
    assert s.train.shape == (40, 256) and s.val.shape == (8, 256)
    for ids in (s.train_ids, s.val_ids):
        assert any(i.startswith("austen/") for i in ids) and any(i.startswith("shakespeare/") for i in ids)
    assert set(s.train_ids).isdisjoint(s.val_ids)


def test_sharegpt_with_chat_template(tok_chat):
    s = build_dataset("sharegpt", tok_chat, 256, max_train_tokens=256 * 200, max_val_tokens=256 * 4, cache=False)
    assert s.train.shape == (200, 256) and s.val.shape == (4, 256)
    text = tok_chat.decode(s.train.flatten().tolist())
    assert "<|im_start|>user\n" in text and "<|im_start|>assistant\n" in text
    groups = lambda ids: {i.rsplit("_", 1)[0] for i in ids}
    assert groups(s.train_ids).isdisjoint(groups(s.val_ids))


def test_chat_ends_on_a_single_eos(tmp_cache, tmp_path):
    """A ChatML template whose end-of-turn is the EOS: no doubled EOS between conversations."""
    tok = make_tokenizer(bos=False, chat_template=CHATML.replace("<|im_end|>", "</s>"))
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(30)))
    flat = build_dataset(str(path), tok, 8, cache=False).train.flatten().tolist()
    assert not any(a == b == 2 for a, b in zip(flat, flat[1:]))
    text = tok.decode(flat)
    assert "</s><|im_start|>user\nq" in text and "</s>\n</s>" not in text
