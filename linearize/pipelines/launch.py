"""``linearize convert --nproc N``: start the same command under torchrun (torch.distributed.run).

torchrun starts N worker processes per host with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and a
rendezvous set; each runs ``python -m linearize convert ...`` (see :mod:`.distributed`). One host:
a private c10d rendezvous on localhost (``--standalone``). Several hosts: run the same command on
every host with ``--nnodes`` and one ``--rdzv-endpoint HOST:PORT`` that all of them reach.
"""

from __future__ import annotations

import os


class LaunchError(RuntimeError):
    """The launch cannot start, or a worker failed; one line."""


def torchrun_args(
    command: list[str], nproc: int, nnodes: str = "1", rdzv_endpoint: str | None = None, rdzv_id: str | None = None
) -> list[str]:
    """torchrun's argument list that runs ``python -m linearize <command>`` in ``nproc`` processes per host."""
    if nproc < 1:
        raise LaunchError(f"--nproc {nproc}: give at least 1 process per host")
    args = ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes)]
    if rdzv_endpoint:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id or "linearize"]
    elif str(nnodes) in ("1", "1:1"):
        args += ["--standalone"]
    else:
        raise LaunchError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the same on every host (e.g. the first host's address)")
    return args + ["-m", "linearize", *command]


def launch(command: list[str], nproc: int, nnodes: str = "1", rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> None:
    """Run ``linearize <command>`` under torchrun and wait; a worker's failure becomes one LaunchError line."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        raise LaunchError("already running under torchrun: leave out --nproc/--nnodes (torchrun's own flags set the processes)")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_args(command, nproc, nnodes, rdzv_endpoint, rdzv_id))
    try:
        run(args)
    except ChildFailedError as e:
        raise LaunchError(f"the distributed run failed: {describe_failures(e.failures)} (the error is printed above)") from None


def describe_failures(failures: dict) -> str:
    """``{global rank: ProcessFailure}`` -> "rank 1 exited with code 2" (the first to fail)."""
    if not failures:
        return "a worker failed"
    rank, first = min(failures.items(), key=lambda kv: kv[1].timestamp)
    return f"rank {rank} exited with code {first.exitcode}" + (f" ({len(failures)} ranks failed)" if len(failures) > 1 else "")
