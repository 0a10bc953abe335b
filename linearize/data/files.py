"""User data: ``.txt``, ``.jsonl``/``.json`` files, directories of them, and ``hf:`` datasets.

Plain text: documents are separated by two or more consecutive blank lines (a single blank line is a
paragraph break inside a document). Chapters of a book or concatenated articles usually have such
gaps; a file without them is one document, which is fine: long documents are cut into blocks at
paragraph boundaries before the train/val split anyway (see :mod:`linearize.data.split`).

JSON lines (``.jsonl``), or a ``.json`` array: one record per document, with a ``text`` string or a
``messages`` (``[{"role", "content"}]``) / ``conversations`` (``[{"from", "value"}]``) list rendered
with the model's chat template. Records without either are an error: silently dropping half a
user's data would be worse.

Errors are one line and name the path: ``FileNotFoundError`` for a missing path, ``ValueError`` for
a file that cannot be read or yields no text.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .chat import normalize_messages
from .common import Document

__all__ = ["TEXT_SUFFIXES", "file_fingerprint", "load_file", "load_hf", "split_text_documents"]

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSON_SUFFIXES = (".jsonl", ".json")
_DOC_BREAK = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")  # 2+ blank lines


def split_text_documents(text: str) -> list[str]:
    """Split on runs of two or more blank lines; strip each piece; drop empty ones."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [piece.strip("\n") + "\n" for piece in _DOC_BREAK.split(text) if piece.strip()]


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        return raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def _record_document(record: Any, doc_id: str, where: str) -> Document:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with 'text' or 'messages'")
    text = record.get("text")
    if isinstance(text, str):
        return Document(id=doc_id, text=text)
    turns = record.get("messages", record.get("conversations"))
    if turns is not None:
        messages = normalize_messages(turns)
        if messages is None:
            raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} with a user and an assistant turn")
        return Document(id=doc_id, messages=messages)
    raise ValueError(f"{where}: record has no 'text' string or 'messages' list")


def _load_json(path: Path, name: str) -> list[Document]:
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON array of records")
        return [_record_document(r, f"{name}#{i}", f"{path}[{i}]") for i, r in enumerate(records)]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        docs.append(_record_document(record, f"{name}:{lineno}", f"{path}:{lineno}"))
    return docs


def _load_one(path: Path, label: str) -> list[Document]:
    """Documents of one file; ids are ``<label>#<k>`` (text) or ``<label>:<line>`` (JSON lines)."""
    if path.suffix.lower() in JSON_SUFFIXES:
        return _load_json(path, label)
    return [Document(id=f"{label}#{i}", text=t) for i, t in enumerate(split_text_documents(_read_text(path)))]


def load_file(path: str | Path) -> list[Document]:
    """Documents of a user file, or of every ``.txt``/``.md``/``.rst``/``.jsonl``/``.json`` file under a
    directory (recursively, in sorted order). Document ids are ``<file name>#<k>`` (text) or
    ``<file name>:<line>`` (JSON lines), below the directory's name for a directory: they do not depend
    on where the data lives, so neither does the split."""
    path = Path(path).expanduser()
    label = path.resolve().name or str(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES)
        if not found:
            raise ValueError(f"{path}: directory has no {'/'.join(TEXT_SUFFIXES + JSON_SUFFIXES)} files")
        docs = [d for f in found for d in _load_one(f, f"{label}/{f.relative_to(path).as_posix()}")]
    else:
        docs = _load_one(path, label)
    docs = [d for d in docs if d.text is None or d.text.strip()]
    if not docs:
        raise ValueError(f"{path}: no text in it")
    return docs


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the file's (or directory's files') contents: the packed-data cache key, so editing
    the data invalidates the cache even when the path stays the same."""
    path = Path(path).expanduser()
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        digest.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with f.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def load_hf(spec: str) -> list[Document]:
    """``hf:<dataset>[:<config>][@<split>]`` through the ``datasets`` library (split default ``train``).
    Rows need a ``text`` column or a ``messages``/``conversations`` column."""
    body = spec.removeprefix("hf:")
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise ValueError(f"{spec!r}: expected hf:<dataset>[:<config>][@<split>]")
    try:
        import datasets  # optional: heavy, and most uses here are offline corpora
    except ImportError:
        raise ValueError(f"{spec!r} needs the 'datasets' library: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as err:  # network, missing dataset, bad config: one line for the user
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{spec!r}: cannot load dataset ({first})") from None
    columns = set(getattr(ds, "column_names", None) or [])
    if not columns & {"text", "messages", "conversations"}:
        raise ValueError(f"{spec!r}: dataset has no 'text', 'messages' or 'conversations' column (has {sorted(columns)})")
    docs = [_record_document(dict(row), f"{name}#{i}", f"{spec}[{i}]") for i, row in enumerate(ds)]
    docs = [d for d in docs if d.text is None or d.text.strip()]
    if not docs:
        raise ValueError(f"{spec!r}: no text in it")
    return docs
