"""Deterministic, leak-free train/validation split at the document (or block) level.

Splitting happens on text, before tokenization and packing, so a packed training row can never hold
validation text. A corpus of a few long documents (6 novels) cannot be split usefully by document,
so every plain-text document longer than ``block_chars`` is first cut into blocks at paragraph
boundaries; the split unit is the block. Chat documents are never cut (a block would lose the
template's structure); documents sharing a ``group`` always go to the same side.

Which units go to validation depends only on ``seed`` and the units' ids (a keyed hash orders them),
so the same seed gives the same split on any machine, and a different seed a different one. Exact
duplicate units are dropped first (first occurrence wins), so identical text cannot sit on both sides.

Each unit is then tokenized as its own document (``BOS ... EOS``). Blocks are not re-joined with
their neighbours: units of bounded size, shuffled, make any prefix of the packed rows (what a token
budget keeps) a low-variance sample of every source and document, in proportion to their size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .common import Document

__all__ = ["Unit", "cut_blocks", "dedupe", "order_units", "split_units", "to_units"]


@dataclass(frozen=True)
class Unit:
    """A split unit: a whole document or one block of it. ``id`` is ``<doc id>`` or ``<doc id>@<k>``."""

    id: str
    doc_id: str
    index: int
    group: str
    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    @property
    def chars(self) -> int:
        if self.text is not None:
            return len(self.text)
        return sum(len(m.get("content") or "") for m in self.messages or ())


def cut_blocks(text: str, block_chars: int) -> list[str]:
    """Cut ``text`` into consecutive pieces of at most about ``block_chars`` characters, preferring a
    paragraph break (blank line), then a line break, then a space, in the last half of each window.
    ``"".join(cut_blocks(t, n)) == t`` always holds: no character is lost or duplicated."""
    if block_chars <= 0:
        raise ValueError("block_chars must be positive")
    blocks, start, n = [], 0, len(text)
    while n - start > block_chars:
        lo, hi = start + block_chars // 2, start + block_chars
        cut = -1
        for sep in ("\n\n", "\n", " "):
            i = text.rfind(sep, lo, hi)
            if i != -1:
                cut = i + len(sep)
                while cut < n and text[cut] == "\n":  # keep a blank-line run with the block it ends
                    cut += 1
                break
        if cut == -1 or cut <= start:
            cut = hi
        blocks.append(text[start:cut])
        start = cut
    if start < n:
        blocks.append(text[start:])
    return blocks


def to_units(docs: Iterable[Document], block_chars: int) -> list[Unit]:
    """Documents -> split units: plain text longer than ``block_chars`` is cut into blocks (each its
    own group), anything else is one unit in its document's group."""
    units: list[Unit] = []
    for doc in docs:
        if doc.text is not None and len(doc.text) > block_chars:
            for k, block in enumerate(cut_blocks(doc.text, block_chars)):
                uid = f"{doc.id}@{k}"
                units.append(Unit(uid, doc.id, k, uid, text=block))
        else:
            units.append(Unit(doc.id, doc.id, 0, doc.group or doc.id, text=doc.text, messages=doc.messages))
    return units


def _content_key(unit: Unit) -> bytes:
    if unit.text is not None:
        payload = unit.text.strip().encode("utf-8")
    else:
        payload = json.dumps(unit.messages, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(payload).digest()


def dedupe(units: Iterable[Unit], seen: set[bytes] | None = None) -> tuple[list[Unit], int]:
    """Drop units whose content (whitespace-stripped text, or messages) was seen before; also drop
    empty text units. Returns the kept units and the number dropped. ``seen`` carries across sources."""
    seen = set() if seen is None else seen
    kept, dropped = [], 0
    for unit in units:
        key = _content_key(unit)
        if key in seen or (unit.text is not None and not unit.text.strip()):
            dropped += 1
            continue
        seen.add(key)
        kept.append(unit)
    return kept, dropped


def _rank(seed: int, salt: str, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{salt}\x00{key}".encode()).digest()


def split_units(units: Sequence[Unit], val_fraction: float, seed: int, *, label: str = "data") -> tuple[list[Unit], list[Unit]]:
    """(train, val) units, in their original order. Validation gets ``round(val_fraction * groups)``
    groups, at least one (when ``val_fraction > 0``) and never all of them."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups = sorted({u.group for u in units})
    if val_fraction == 0 or not groups:
        return list(units), []
    if len(groups) < 2:
        raise ValueError(
            f"{label}: only one document/block, so nothing can be held out for validation; "
            "add data, use a smaller block size, or val_fraction=0"
        )
    n_val = min(len(groups) - 1, max(1, round(val_fraction * len(groups))))
    val_groups = set(sorted(groups, key=lambda g: _rank(seed, "split", g))[:n_val])
    train = [u for u in units if u.group not in val_groups]
    val = [u for u in units if u.group in val_groups]
    return train, val


def order_units(units: Sequence[Unit], seed: int) -> list[Unit]:
    """A seeded shuffle of units (by keyed hash of their ids), so sources and documents are mixed in
    the packed rows and a token budget takes a sample of everything rather than the first files."""
    return sorted(units, key=lambda u: _rank(seed, "order", u.id))
