"""Triton kernels for the hybrid attention (CUDA only; the PyTorch paths in ``linearize.ops`` are the reference).

``available()`` says whether Triton can run here: on a CUDA device, or anywhere under ``TRITON_INTERPRET=1``
(Triton's CPU interpreter, which the CPU tests use on tiny shapes).
"""

from __future__ import annotations

import importlib.util
import os


# Looked up once: torch.compile traces the dispatch (linearize.decode.CompiledDecode), and dynamo refuses to
# trace importlib's find_spec ("marked as skipped"; seen on the H200 on 2026-12-03). A constant it can read.
_AVAILABLE = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """True when ``triton`` is importable (kernels then run on CUDA tensors, or on CPU in interpret mode)."""
    return _AVAILABLE


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_env(name: str, form: str, example: str, valid) -> tuple[int, int] | tuple[None, None]:
    """Two ints from the environment variable ``name`` ('a,b', read by the caller at import), to time whole steps
    at another launch than a kernel's default; (None, None) where unset. ``valid(a, b)`` says whether they are
    allowed; ``form`` names them (the error's text), ``example`` shows one."""
    spec = os.environ.get(name)
    if not spec:
        return None, None
    try:
        a, b = (int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"{name} must be '{form}' (e.g. {example}); got {spec!r}") from None
    if not valid(a, b):
        raise ValueError(f"{name}: {form} out of range; got {spec!r}")
    return a, b
