"""Triton kernels for the hybrid attention (CUDA only; the PyTorch paths in ``linearize.ops`` are the reference).

``available()`` says whether Triton can run here: on a CUDA device, or anywhere under ``TRITON_INTERPRET=1``
(Triton's CPU interpreter, which the CPU tests use on tiny shapes).
"""

from __future__ import annotations

import importlib.util
import os


def available() -> bool:
    """True when ``triton`` is importable (kernels then run on CUDA tensors, or on CPU in interpret mode)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
