"""``python -m tests.run_interpreted SCRIPT ARGS...``: run a script as ``__main__`` with Triton's interpreter sped up
as in the pytest subprocesses (``tests/interpreter_speed.py``); the caller sets ``TRITON_INTERPRET=1``."""

import os
import runpy
import sys

from tests.interpreter_speed import apply

if __name__ == "__main__":
    apply()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as ``python SCRIPT`` would
    runpy.run_path(sys.argv[0], run_name="__main__")
