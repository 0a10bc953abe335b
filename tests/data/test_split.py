"""Blocks and the document-level split: lossless cutting, determinism, groups, no leakage."""

from __future__ import annotations

import random

import pytest

from linearize.data.common import Document
from linearize.data.split import cut_blocks, dedupe, order_units, split_units, to_units


def _text(n_paragraphs: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    paras = []
    for p in range(n_paragraphs):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 5))]
        paras.append(f"[{p}] " + "\n".join(lines))
    return "\n\n".join(paras) + "\n"


@pytest.mark.parametrize("block_chars", [50, 300, 2_000])
def test_cut_blocks_is_lossless_and_prefers_paragraphs(block_chars):
    text = _text(200)
    blocks = cut_blocks(text, block_chars)
    assert "".join(blocks) == text
    assert all(len(b) <= block_chars + 2 for b in blocks)
    if block_chars >= 2_000:  # every half-window holds a paragraph break: cut there
        assert all(b.endswith("\n\n") for b in blocks[:-1])


def test_cut_blocks_without_separators():
    text = "x" * 1050
    blocks = cut_blocks(text, 100)
    assert "".join(blocks) == text and [len(b) for b in blocks] == [100] * 10 + [50]
    assert cut_blocks("short", 100) == ["short"]
    with pytest.raises(ValueError):
        cut_blocks("x", 0)


def test_units_blocks_and_groups():
    docs = [
        Document("long", text=_text(100)),
        Document("short", text="tiny"),
        Document("chat", messages=({"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "y"}), group="g"),
    ]
    units = to_units(docs, 500)
    long_units = [u for u in units if u.doc_id == "long"]
    assert len(long_units) > 5 and [u.id for u in long_units[:2]] == ["long@0", "long@1"]
    assert {u.group for u in long_units} == {u.id for u in long_units}  # each block its own group
    assert [u.id for u in units if u.doc_id != "long"] == ["short", "chat"]  # chat is never cut
    assert units[-1].group == "g"


def test_split_is_deterministic_and_disjoint():
    units = to_units([Document(f"d{i}", text=f"document {i}") for i in range(200)], 1000)
    a_train, a_val = split_units(units, 0.05, seed=0)
    b_train, b_val = split_units(units, 0.05, seed=0)
    _, c_val = split_units(units, 0.05, seed=1)
    assert a_train == b_train and a_val == b_val
    assert {u.id for u in a_val} != {u.id for u in c_val}
    assert len(a_val) == 10 and len(a_train) == 190
    assert not {u.id for u in a_train} & {u.id for u in a_val}
    assert [u.id for u in a_train + a_val] != [] and sorted(u.id for u in a_train + a_val) == sorted(u.id for u in units)


def test_split_keeps_groups_together():
    docs = [Document(f"c{i}_{p}", messages=({"role": "user", "content": f"{i}.{p}"}, {"role": "assistant", "content": "ok"}), group=f"c{i}") for i in range(40) for p in range(3)]
    train, val = split_units(to_units(docs, 1000), 0.1, seed=3)
    assert {u.group for u in train}.isdisjoint({u.group for u in val})
    assert len(val) == 4 * 3


def test_split_edge_cases():
    two = to_units([Document("a", text="a"), Document("b", text="b")], 10)
    assert [len(x) for x in split_units(two, 0.01, seed=0)] == [1, 1]  # at least one val unit
    assert [len(x) for x in split_units(two, 0.0, seed=0)] == [2, 0]
    with pytest.raises(ValueError, match="only one document"):
        split_units(two[:1], 0.05, seed=0, label="x.txt")
    with pytest.raises(ValueError, match="val_fraction"):
        split_units(two, 1.0, seed=0)


def test_few_long_documents_split_by_blocks_without_leakage():
    """Six 'novels': the split happens between blocks and no block's text is on both sides."""
    docs = [Document(f"novel{i}", text=_text(300, seed=i)) for i in range(6)]
    units, dropped = dedupe(to_units(docs, 2_000))
    assert dropped == 0
    train, val = split_units(units, 0.05, seed=0)
    assert val and {u.doc_id for u in train} == {d.id for d in docs}
    assert {u.id for u in train}.isdisjoint({u.id for u in val})
    train_text = "\x00".join(u.text for u in train)
    for v in val:
        assert v.text not in train_text
    for d in docs:  # blocks re-assemble each document exactly
        assert "".join(u.text for u in units if u.doc_id == d.id) == d.text
    order_a = [u.id for u in order_units(train, 0)]
    assert order_a == [u.id for u in order_units(train, 0)] != [u.id for u in order_units(train, 1)]
    assert sorted(order_a) == sorted(u.id for u in train)


def test_dedupe_drops_repeats_across_sources():
    seen: set[bytes] = set()
    a, dropped_a = dedupe(to_units([Document("a1", text="same"), Document("a2", text="other"), Document("a3", text="  \n")], 100), seen)
    b, dropped_b = dedupe(to_units([Document("b1", text="same\n")], 100), seen)
    assert [u.id for u in a] == ["a1", "a2"] and dropped_a == 1
    assert b == [] and dropped_b == 1
