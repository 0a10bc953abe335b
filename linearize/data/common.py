"""Shared pieces of :mod:`linearize.data`: the cache root, atomic writes, the ``Document`` record.

Every file under the cache appears atomically (written under a temporary name in the same
directory, then ``os.replace``d), so a killed fetch or build never leaves a half-written file that a
later run would take as good.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..fetch import cache_dir, temp_sibling, write_atomic

__all__ = ["CorpusError", "Document", "cache_dir", "data_dir", "log", "progress", "read_jsonl", "temp_sibling", "write_atomic", "write_jsonl"]


class CorpusError(RuntimeError):
    """A built-in corpus could not be fetched (no network, no apt, a package changed shape...)."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus: plain ``text``, or chat ``messages`` rendered later with the
    tokenizer's chat template (the template depends on the model, so corpora store messages).

    ``group``: documents sharing a group always land in the same split (e.g. the parts of one
    ShareGPT conversation); ``None`` means the document is its own group. Plain-text documents may
    be cut into blocks before splitting; chat documents never are (a block would lose its template).
    """

    id: str
    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError(f"document {self.id!r}: exactly one of text and messages must be given")

    @property
    def chars(self) -> int:
        if self.text is not None:
            return len(self.text)
        return sum(len(m.get("content") or "") for m in self.messages or ())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.text is not None:
            out["text"] = self.text
        else:
            out["messages"] = list(self.messages or ())
        if self.group is not None:
            out["group"] = self.group
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Document:
        messages = obj.get("messages")
        return cls(
            id=obj["id"],
            text=obj.get("text"),
            messages=tuple(messages) if messages is not None else None,
            group=obj.get("group"),
        )


def data_dir(*parts: str) -> Path:
    """``<cache>/data/<parts...>``."""
    return cache_dir().joinpath("data", *parts)


def write_jsonl(path: Path, docs: Iterable[Document]) -> None:
    """Write documents as JSON lines, atomically."""
    tmp = temp_sibling(path)
    try:
        with tmp.open("x", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc.to_json(), ensure_ascii=False))
                f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield Document.from_json(json.loads(line))


def progress(total: int | None, desc: str, *, unit: str = "it", min_total: int = 0) -> tqdm:
    """A tqdm bar on stderr, hidden when the job is small (``total < min_total``)."""
    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, leave=False, dynamic_ncols=True,
        disable=total is not None and total < min_total,
    )


def log(message: str) -> None:
    """One status line on stderr (tqdm-safe)."""
    tqdm.write(message, file=sys.stderr)
