"""User data files: .txt, .jsonl, .json, directories, hf: specs, and their one-line errors."""

from __future__ import annotations

import json
import sys
import types

import pytest

from linearize.data import build_dataset, load_file, load_hf
from linearize.data.files import split_text_documents


def test_txt_splits_on_two_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("Title\n\nPara one.\nstill one.\n\nPara two.\n\n\nSecond doc.\n \n\t\n\n\nThird doc.\n\n\n\n")
    docs = load_file(path)
    assert [d.text for d in docs] == ["Title\n\nPara one.\nstill one.\n\nPara two.\n", "Second doc.\n", "Third doc.\n"]
    assert [d.id for d in docs] == ["notes.txt#0", "notes.txt#1", "notes.txt#2"]


def test_txt_crlf_and_single_document():
    assert split_text_documents("a\r\n\r\nb\r\n") == ["a\n\nb\n"]


def test_jsonl_text_and_messages(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [
        {"text": "plain document"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    docs = load_file(path)
    assert docs[0].text == "plain document" and docs[0].id == "data.jsonl:1"
    assert docs[1].messages == ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"})
    assert docs[2].messages == ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})
    assert docs[2].id == "data.jsonl:4"


def test_json_array_and_directory(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    (tmp_path / "d" / "sub" / "b.txt").write_text("three")
    (tmp_path / "d" / "ignored.bin").write_bytes(b"\x00\x01")
    docs = load_file(tmp_path / "d")
    assert [d.text for d in docs] == ["one", "two", "three\n"]
    assert [d.id for d in docs] == ["d/a.json#0", "d/a.json#1", "d/sub/b.txt#0"]


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError) as err:
        load_file(missing)
    assert str(missing) in _one_line(err)
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(str(missing), None, 8)
    assert str(missing) in _one_line(err)


def test_unknown_source_name():
    with pytest.raises(ValueError) as err:
        build_dataset("austin", None, 8)
    assert "austin" in _one_line(err) and "austen" in str(err.value)


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty.txt", "", "no text"),
        ("blank.txt", "\n\n  \n\n\n", "no text"),
        ("empty.jsonl", "\n\n", "no text"),
        ("bad.jsonl", '{"text": "ok"}\n{not json}\n', r"bad\.jsonl:2: invalid JSON"),
        ("nofield.jsonl", '{"body": "x"}\n', r"nofield\.jsonl:1: record has no 'text'"),
        ("badmsg.jsonl", '{"messages": [{"role": "alien", "content": "x"}]}\n', r"badmsg\.jsonl:1: 'messages' must be"),
        ("obj.json", '{"text": "x"}', "expected a JSON array"),
    ],
)
def test_bad_files(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        load_file(path)
    assert str(path) in _one_line(err)


def test_binary_file(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8") as err:
        load_file(path)
    _one_line(err)


def test_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="pip install datasets") as err:
        load_hf("hf:wikitext:wikitext-2-raw-v1@train")
    _one_line(err)


def test_hf_spec_through_fake_datasets(monkeypatch):
    calls = []

    class FakeDataset(list):
        column_names = ["text", "id"]

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return FakeDataset([{"text": "first", "id": 1}, {"text": "", "id": 2}, {"text": "third", "id": 3}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = load_hf("hf:org/name:cfg@validation")
    assert calls == [("org/name", "cfg", "validation")]
    assert [d.text for d in docs] == ["first", "third"]
    load_hf("hf:plain")
    assert calls[-1] == ("plain", None, "train")


def test_load_documents_entry_point(tmp_path):
    from linearize.data import load_documents

    (tmp_path / "a.txt").write_text("alpha\n\n\nbeta\n")
    assert [d.text for d in load_documents(str(tmp_path / "a.txt"))] == ["alpha\n", "beta\n"]
    assert len(load_documents("austen+austen")) == 6
