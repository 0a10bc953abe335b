"""A small reader for R's serialization format, so R data packages can be used without R.

CRAN data packages (as shipped by Debian's ``r-cran-*``) store their objects as R serialization
streams: ``.rds`` (one object), ``.rda``/``.RData`` (named objects after an ``RDX2``/``RDX3`` magic)
or a lazy-load database (``.rdx`` index + ``.rdb`` blobs). All are compressed (gzip, bzip2, xz or
zlib) XDR streams: big-endian ints and doubles, one ``flags`` word per object, strings as ``CHARSXP``
records. We parse enough of it for data: atomic vectors, character vectors, lists, pairlists and
attributes, environments (as dicts), and the ALTREP classes R writes for data (compact sequences,
wrappers, deferred strings). Closures and byte code are read structurally but not interpreted.

The format is documented only by R's ``src/main/serialize.c``; the type codes below follow it.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RFormatError", "RObject", "decompress", "parse", "read_lazyload_db", "read_rdata", "read_rds"]


class RFormatError(ValueError):
    """The bytes are not an R serialization stream we can read."""


# SEXPTYPEs (Rinternals.h)
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP = 7, 8, 9, 10, 13, 14, 15
STRSXP, DOTSXP, ANYSXP, VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP = 16, 17, 18, 19, 20, 21, 22
WEAKREFSXP, RAWSXP, S4SXP = 23, 24, 25
# pseudo-SEXPTYPEs used only in streams (serialize.c)
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP = 255, 254, 253, 252, 251
BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP, PERSISTSXP = 250, 249, 248, 247
CLASSREFSXP, GENERICREFSXP, BCREPDEF, EMPTYENV_SXP, BASEENV_SXP = 246, 245, 244, 242, 241
ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP, BCREPREF = 240, 239, 238, 243

_PAIRLIST_TYPES = {LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP}
_NA_INTEGER = -(2**31)
# CHARSXP encoding bits in the "levels" field
_UTF8_MASK, _LATIN1_MASK, _BYTES_MASK, _ASCII_MASK = 1 << 3, 1 << 2, 1 << 1, 1 << 6


@dataclass
class RObject:
    """An R value: its SEXPTYPE, a Python payload and its attributes.

    Payloads: ``list[str | None]`` for character vectors (``None`` is ``NA``), ``list[int | None]``
    for integer/logical, ``list[float]`` for double, ``bytes`` for raw, ``list[Any]`` for lists,
    ``list[tuple[str | None, Any]]`` for pairlists, ``dict`` for environments, ``str`` for symbols.
    """

    type: int
    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str | None] | None:
        names = self.attributes.get("names")
        return names.value if isinstance(names, RObject) else None

    def __repr__(self) -> str:  # short: payloads can be megabytes
        size = len(self.value) if hasattr(self.value, "__len__") else "?"
        return f"RObject(type={self.type}, len={size}, attributes={sorted(self.attributes)})"


class _Sentinel(RObject):
    """R's singletons (global env, missing arg, ...): kept distinct but carry nothing."""


def _sentinel(name: str) -> _Sentinel:
    return _Sentinel(type=-1, value=name)


class _Reader:
    """Recursive-descent reader over one uncompressed XDR stream (after the ``X\\n`` header)."""

    def __init__(self, data: bytes | memoryview, offset: int, persist: Any = None) -> None:
        self.buf = memoryview(data)
        self.pos = offset
        self.refs: list[Any] = []
        self.persist = persist  # callable(list[str]) -> value, for PERSISTSXP (lazy-load DB refs)

    # -- primitives -----------------------------------------------------------------------------
    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise RFormatError(f"R stream truncated at byte {self.pos} (wanted {n} more)")
        chunk = self.buf[self.pos : end]
        self.pos = end
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints, upper then lower 32 bits
            upper, lower = struct.unpack(">II", self._take(8))
            return (upper << 32) | lower
        if n < 0:
            raise RFormatError(f"negative vector length {n} at byte {self.pos}")
        return n

    def string(self, n: int) -> bytes:
        return bytes(self._take(n))

    # -- items ----------------------------------------------------------------------------------
    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        levels = flags >> 12
        is_obj = bool(flags & (1 << 8))
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if kind == NILVALUE_SXP:
            return None
        if kind in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP):
            return _sentinel({EMPTYENV_SXP: "emptyenv", BASEENV_SXP: "baseenv", GLOBALENV_SXP: "globalenv",
                              UNBOUNDVALUE_SXP: "unbound", MISSINGARG_SXP: "missing",
                              BASENAMESPACE_SXP: "base-namespace"}[kind])
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            if not 0 < index <= len(self.refs):
                raise RFormatError(f"bad back-reference {index} (table has {len(self.refs)})")
            return self.refs[index - 1]
        if kind == PERSISTSXP:
            names = self._string_vec()
            value = self.persist(names) if self.persist else RObject(PERSISTSXP, names)
            self.refs.append(value)
            return value
        if kind == SYMSXP:
            name = self.item()  # a CHARSXP
            sym = RObject(SYMSXP, name.value if isinstance(name, RObject) else name)
            self.refs.append(sym)
            return sym
        if kind in (PACKAGESXP, NAMESPACESXP):
            obj = RObject(kind, self._string_vec())
            self.refs.append(obj)
            return obj
        if kind == ENVSXP:
            return self._environment()
        if kind in _PAIRLIST_TYPES:
            return self._pairlist(kind, has_attr, has_tag)
        if kind == ALTREP_SXP:
            return self._altrep()
        if kind == CHARSXP:
            return RObject(CHARSXP, self._charsxp(levels))

        if kind in (SPECIALSXP, BUILTINSXP):
            obj = RObject(kind, self.string(self.int()).decode("latin-1"))
        elif kind == EXTPTRSXP:
            obj = RObject(kind, None)
            self.refs.append(obj)
            obj.value = (self.item(), self.item())  # prot, tag
        elif kind == WEAKREFSXP:
            obj = RObject(kind, None)
            self.refs.append(obj)
        elif kind in (LGLSXP, INTSXP):
            n = self.length()
            ints = struct.unpack(f">{n}i", self._take(4 * n))
            obj = RObject(kind, [None if v == _NA_INTEGER else v for v in ints])
        elif kind == REALSXP:
            n = self.length()
            obj = RObject(kind, list(struct.unpack(f">{n}d", self._take(8 * n))))
        elif kind == CPLXSXP:
            n = self.length()
            parts = struct.unpack(f">{2 * n}d", self._take(16 * n))
            obj = RObject(kind, [complex(parts[i], parts[i + 1]) for i in range(0, 2 * n, 2)])
        elif kind == STRSXP:
            obj = RObject(kind, self._strings(self.length()))
        elif kind in (VECSXP, EXPRSXP):
            n = self.length()
            obj = RObject(kind, [self.item() for _ in range(n)])
        elif kind == RAWSXP:
            obj = RObject(kind, self.string(self.length()))
        elif kind == S4SXP:
            obj = RObject(kind, None)
        elif kind == BCODESXP:
            raise RFormatError("R byte code (BCODESXP) is not supported; only data objects can be read")
        else:
            raise RFormatError(f"unsupported R SEXPTYPE {kind} at byte {self.pos - 4}")
        if has_attr:
            obj.attributes = _pairlist_to_dict(self.item())
        del is_obj  # the object bit only mirrors the presence of a class attribute
        return obj

    def _charsxp(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.string(n)
        if levels & _LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & _BYTES_MASK:
            return raw.decode("utf-8", errors="backslashreplace")
        # UTF-8, ASCII, or "native" (R writes the native encoding; in practice UTF-8 these days)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")

    def _strings(self, n: int) -> list[str | None]:
        """A STRSXP's elements. Each is a CHARSXP item; inlined for speed (novels have 10^5 lines)."""
        out: list[str | None] = []
        unpack, take = struct.unpack, self._take
        for _ in range(n):
            flags = unpack(">i", take(4))[0]
            if flags & 0xFF != CHARSXP:  # not expected in data written by R, but legal: fall back
                self.pos -= 4
                value = self.item()
                out.append(value.value if isinstance(value, RObject) else value)
                continue
            out.append(self._charsxp(flags >> 12))
        return out

    def _string_vec(self) -> list[str | None]:
        """InStringVec: a zero word, a length, then CHARSXP items (used by PERSISTSXP/PACKAGESXP)."""
        if self.int() != 0:
            raise RFormatError("names in persistent string vector are not supported")
        return self._strings(self.length())

    def _environment(self) -> RObject:
        locked = self.int()
        env = RObject(ENVSXP, {})
        self.refs.append(env)  # before the contents: they may refer back to the environment
        enclos, frame, hashtab, attrib = self.item(), self.item(), self.item(), self.item()
        contents: dict[str, Any] = {}
        if isinstance(frame, RObject) and frame.type in _PAIRLIST_TYPES:
            contents.update(_pairlist_to_dict(frame))
        if isinstance(hashtab, RObject) and hashtab.type == VECSXP:
            for bucket in hashtab.value:
                if isinstance(bucket, RObject) and bucket.type in _PAIRLIST_TYPES:
                    contents.update(_pairlist_to_dict(bucket))
        env.value = contents
        env.attributes = _pairlist_to_dict(attrib)
        env.attributes["__locked__"] = bool(locked)
        env.attributes["__enclos__"] = enclos
        return env

    def _pairlist(self, kind: int, has_attr: bool, has_tag: bool) -> RObject:
        """A pairlist (or call/closure/promise) cell chain, read iteratively along the CDRs."""
        head = RObject(LISTSXP if kind in (LISTSXP, ATTRLISTSXP) else kind, [])
        cells: list[tuple[str | None, Any]] = head.value
        first = True
        while True:
            attrs = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            if first:
                head.attributes = _pairlist_to_dict(attrs)
                first = False
            cells.append((tag.value if isinstance(tag, RObject) else None, car))
            # the CDR: another cell of a pairlist type continues the chain; anything else ends it
            flags = self.int()
            cdr_kind = flags & 0xFF
            if cdr_kind in _PAIRLIST_TYPES:
                has_attr = bool(flags & (1 << 9))
                has_tag = bool(flags & (1 << 10))
                continue
            if cdr_kind != NILVALUE_SXP:
                self.pos -= 4
                cells.append((None, self.item()))  # dotted pair: keep the odd tail
            return head

    def _altrep(self) -> Any:
        info, state, attr = self.item(), self.item(), self.item()
        cls = info.value[0][1] if isinstance(info, RObject) and info.value else None
        cls_name = cls.value if isinstance(cls, RObject) else str(cls)
        obj = _expand_altrep(cls_name, state)
        if isinstance(obj, RObject):
            obj = RObject(obj.type, obj.value, dict(obj.attributes) | _pairlist_to_dict(attr))
        return obj


def _expand_altrep(cls_name: str, state: Any) -> RObject:
    """Materialize the ALTREP classes that base R writes into data files."""
    if cls_name in ("compact_intseq", "compact_realseq"):
        n, start, step = state.value[:3]
        n = int(n)
        if cls_name == "compact_intseq":
            return RObject(INTSXP, [int(start + i * step) for i in range(n)])
        return RObject(REALSXP, [start + i * step for i in range(n)])
    if cls_name.startswith("wrap_"):  # state: list(payload, metadata)
        payload = state.value[0]
        return payload if isinstance(payload, RObject) else RObject(NILSXP, None)
    if cls_name == "deferred_string":  # state: pairlist(numeric payload, scipen info)
        cells = state.value if isinstance(state, RObject) else []
        payload = cells[0][1] if cells else None
        values = payload.value if isinstance(payload, RObject) else []
        return RObject(STRSXP, [None if v is None or (isinstance(v, float) and math.isnan(v)) else _r_format(v) for v in values])
    raise RFormatError(f"unsupported ALTREP class {cls_name!r}")


def _r_format(v: float) -> str:
    """R's as.character for a number, good enough for deferred strings (15 significant digits)."""
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return f"{v:.15g}"


def _pairlist_to_dict(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, RObject) or obj.type not in _PAIRLIST_TYPES:
        return {}
    return {tag if tag is not None else f"__{i}": value for i, (tag, value) in enumerate(obj.value)}


# ---------------------------------------------------------------------------------------------------
# streams and files


def decompress(data: bytes) -> bytes:
    """Undo whichever of gzip, bzip2, xz or raw zlib compressed ``data``; pass plain data through."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    if len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0:
        try:
            return zlib.decompress(data)
        except zlib.error:
            pass
    return data


def parse(data: bytes | memoryview, persist: Any = None) -> Any:
    """Parse one uncompressed serialization stream (``X\\n`` XDR or ``B\\n`` native little-endian is
    not supported: R has written XDR by default forever). Returns the top-level object."""
    head = bytes(data[:2])
    if head != b"X\n":
        if head in (b"A\n", b"B\n"):
            raise RFormatError(f"R serialization format {head[:1].decode()!r} is not supported (only XDR 'X')")
        raise RFormatError("not an R serialization stream (missing the 'X\\n' header)")
    reader = _Reader(data, 2, persist)
    version = reader.int()
    reader.int()  # writer's R version
    reader.int()  # minimal reader version
    if version == 3:
        reader.string(reader.int())  # native encoding name
    elif version != 2:
        raise RFormatError(f"R serialization version {version} is not supported")
    return reader.item()


def read_rds(path: str | Path) -> Any:
    """``readRDS``: one object from a (usually gzip-compressed) ``.rds`` file."""
    return parse(decompress(Path(path).read_bytes()))


def read_rdata(path: str | Path) -> dict[str, Any]:
    """``load``: the named objects of an ``.rda``/``.RData`` file."""
    data = decompress(Path(path).read_bytes())
    if data[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise RFormatError(f"{path}: not an RData file (no RDX2/RDX3 magic)")
    return _pairlist_to_dict(parse(memoryview(data)[5:]))


def _lazyload_blob(rdb: bytes, offset: int, length: int, compressed: int) -> bytes:
    """One object of a lazy-load DB: a 4-byte big-endian inflated size, then (for compression types
    2 and 3) a type byte ``Z``/``2``/``X``/``0``, then the compressed stream."""
    blob = rdb[offset : offset + length]
    if len(blob) != length:
        raise RFormatError(f"lazy-load DB truncated: wanted bytes {offset}..{offset + length}")
    size = struct.unpack(">I", blob[:4])[0]
    if compressed in (2, 3):
        kind, payload = blob[4:5], blob[5:]
        out = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}.get(kind)
        if out is None:
            raise RFormatError(f"unknown lazy-load compression type {kind!r}")
        data = out(payload)
    elif compressed:
        data = zlib.decompress(blob[4:])
    else:
        data = blob[4:]
    if len(data) != size:
        raise RFormatError(f"lazy-load object inflated to {len(data)} bytes, header says {size}")
    return data


def read_lazyload_db(rdx: str | Path | bytes, rdb: str | Path | bytes | None = None) -> dict[str, Any]:
    """All variables of a lazy-load database (``<name>.rdx`` index + ``<name>.rdb`` data), e.g. a
    package's ``data/Rdata.rdx``, given as paths or as the files' bytes. Environments referenced
    between objects are resolved from the index's ``references`` table."""
    if isinstance(rdx, bytes):
        if not isinstance(rdb, bytes):
            raise TypeError("pass the .rdb bytes along with the .rdx bytes")
        rdx_bytes, rdb_bytes, label = rdx, rdb, "lazy-load DB"
    else:
        rdx_bytes = Path(rdx).read_bytes()
        rdb_bytes = rdb if isinstance(rdb, bytes) else Path(rdb or Path(rdx).with_suffix(".rdb")).read_bytes()
        label = str(rdx)
    index = parse(decompress(rdx_bytes))
    if not isinstance(index, RObject) or index.type != VECSXP or not index.names:
        raise RFormatError(f"{label}: not a lazy-load index")
    parts = dict(zip(index.names, index.value))
    flag = parts.get("compressed")
    compressed = int(flag.value[0]) if isinstance(flag, RObject) and flag.value and flag.value[0] is not None else 1

    def locate(entry: RObject) -> bytes:
        offset, length = (int(v) for v in entry.value[:2])
        return _lazyload_blob(rdb_bytes, offset, length, compressed)

    references = parts.get("references")
    ref_entries = dict(zip(references.names or [], references.value)) if isinstance(references, RObject) else {}
    ref_cache: dict[str, Any] = {}

    def persist(names: list[str | None]) -> Any:
        key = names[0] if names else None
        if key not in ref_cache:
            if key not in ref_entries:
                raise RFormatError(f"{label}: unknown lazy-load reference {key!r}")
            ref_cache[key] = RObject(ENVSXP, {})  # placeholder breaks cycles
            ref_cache[key] = parse(locate(ref_entries[key]), persist)
        return ref_cache[key]

    variables = parts.get("variables")
    if not isinstance(variables, RObject) or not variables.names:
        return {}
    return {name: parse(locate(entry), persist) for name, entry in zip(variables.names, variables.value)}
