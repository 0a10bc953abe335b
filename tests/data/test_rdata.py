"""R serialization reader: hand-built XDR streams (no R needed), then the real janeaustenr data."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib

import pytest

from linearize.data import rdata
from linearize.data.rdata import RFormatError, RObject

# --- a minimal R serializer, enough to write test fixtures byte by byte ----------------------------

HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
UTF8, LATIN1 = 1 << 3, 1 << 2


def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def header(version: int = 2) -> bytes:
    out = b"X\n" + i32(version, 0x040201, 0x020300)
    if version == 3:
        out += i32(5) + b"UTF-8"
    return out


def charsxp(s: str | None, enc: int = UTF8) -> bytes:
    if s is None:
        return i32(9, -1)
    raw = s.encode("latin-1" if enc == LATIN1 else "utf-8")
    return i32(9 | (enc << 12), len(raw)) + raw


def strsxp(values: list[str | None], attrs: bytes = b"", enc: int = UTF8) -> bytes:
    flags = 16 | (HAS_ATTR if attrs else 0)
    return i32(flags, len(values)) + b"".join(charsxp(v, enc) for v in values) + attrs


def intsxp(values: list[int]) -> bytes:
    return i32(13, len(values), *values)


def lglsxp(values: list[int]) -> bytes:
    return i32(10, len(values), *values)


def symbol(name: str) -> bytes:
    return i32(1) + charsxp(name)


def pairlist(items: list[tuple[bytes, bytes]]) -> bytes:
    """Tagged pairlist cells; each tag is already-serialized (a SYMSXP or a REFSXP to one)."""
    out = b""
    for tag, value in items:
        out += i32(2 | HAS_TAG) + tag + value
    return out + i32(254)


def vecsxp(items: list[bytes], names: list[str] | None = None, names_tag: bytes | None = None) -> bytes:
    attrs = pairlist([(names_tag or symbol("names"), strsxp(names))]) if names is not None else b""
    return i32(19 | (HAS_ATTR if attrs else 0), len(items)) + b"".join(items) + attrs


# --- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3])
def test_character_vector(version):
    blob = header(version) + strsxp(["PRIDE AND PREJUDICE", "", None, "naïve — “quoted”"])
    obj = rdata.parse(blob)
    assert isinstance(obj, RObject) and obj.type == rdata.STRSXP
    assert obj.value == ["PRIDE AND PREJUDICE", "", None, "naïve — “quoted”"]


def test_latin1_strings_and_numbers():
    assert rdata.parse(header() + strsxp(["café"], enc=LATIN1)).value == ["café"]
    assert rdata.parse(header() + intsxp([1, -(2**31), 3])).value == [1, None, 3]
    assert rdata.parse(header() + i32(14, 2) + struct.pack(">2d", 1.5, -2.0)).value == [1.5, -2.0]
    assert rdata.parse(header() + lglsxp([1, 0])).value == [1, 0]


def test_named_list_with_back_reference():
    # attributes follow the elements, so the inner list's "names" symbol comes first in the stream and
    # the outer one is written as a back-reference to it (REFSXP, index 1 packed in the flags)
    inner = vecsxp([intsxp([7])], names=["x"])
    blob = header() + vecsxp([strsxp(["a", "b"]), inner], names=["letters", "nested"], names_tag=i32((1 << 8) | 255))
    obj = rdata.parse(blob)
    assert obj.names == ["letters", "nested"]
    assert obj.value[0].value == ["a", "b"]
    assert obj.value[1].names == ["x"] and obj.value[1].value[0].value == [7]


def test_rdata_file(tmp_path):
    body = b"RDX2\n" + header() + pairlist([(symbol("emma"), strsxp(["EMMA", "", "By Jane Austen"]))])
    path = tmp_path / "x.rda"
    path.write_bytes(gzip.compress(body))
    assert rdata.read_rdata(path)["emma"].value == ["EMMA", "", "By Jane Austen"]


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress, lambda b: b])
def test_rds_any_compression(tmp_path, compress):
    path = tmp_path / "x.rds"
    path.write_bytes(compress(header() + strsxp(["a"])))
    assert rdata.read_rds(path).value == ["a"]


def test_lazyload_db():
    """A package's data/Rdata.rdx + Rdata.rdb: index (gzip RDS) of offsets into zlib blobs."""
    objects = {"novel1": header() + strsxp(["Chapter 1", "", "It is a truth"]), "novel2": header() + strsxp(["THE END"])}
    rdb, entries = b"", []
    for blob in objects.values():
        record = struct.pack(">I", len(blob)) + zlib.compress(blob)
        entries.append(intsxp([len(rdb), len(record)]))
        rdb += record
    index = header() + vecsxp(
        [vecsxp(entries, names=list(objects)), vecsxp([], names=[]), lglsxp([1])],
        names=["variables", "references", "compressed"],
    )
    out = rdata.read_lazyload_db(gzip.compress(index), rdb)
    assert out["novel1"].value == ["Chapter 1", "", "It is a truth"]
    assert out["novel2"].value == ["THE END"]


def test_errors():
    with pytest.raises(RFormatError, match="not an R serialization"):
        rdata.parse(b"hello world")
    with pytest.raises(RFormatError, match="truncated"):
        rdata.parse((header() + strsxp(["abcdef"]))[:-3])
    with pytest.raises(RFormatError, match="not supported"):
        rdata.parse(b"A\n1\n")


def test_austen_from_debian_package():
    """The real corpus: Debian r-cran-janeaustenr's lazy-load DB, read without R."""
    from linearize.data import load_corpus

    docs = load_corpus("austen")
    assert [d.id for d in docs] == [
        "austen/sensesensibility", "austen/prideprejudice", "austen/mansfieldpark",
        "austen/emma", "austen/northangerabbey", "austen/persuasion",
    ]
    pp = docs[1].text
    assert pp.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen")
    assert "It is a truth universally acknowledged, that a single man in possession\nof a good fortune, must be in want of a wife." in pp
    assert "\n\n" in pp and len(pp) > 600_000
    assert docs[3].text.startswith("EMMA")
    assert all(len(d.text) > 400_000 for d in docs)
