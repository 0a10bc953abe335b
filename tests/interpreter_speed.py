"""Two costs of Triton's CPU interpreter (``TRITON_INTERPRET=1``, triton 3.6) that the kernel tests do not need,
removed in the interpreter subprocesses only (``tests/conftest.py`` calls :func:`apply`). Neither changes what a
kernel computes: each skips work whose result is already in place, and a wrong skip fails loudly (an unpatched
``tl`` builtin raises outside a launch) rather than silently.

1. **Re-patching ``triton.language`` at every ``@triton.jit`` helper call.** A launch patches the language's
   builtins once (``_patch_lang``); each nested device-function call patches them all again (a new lambda per
   builtin) and never restores. Measured on ``test_triton_chunk_interpret.py::test_padding``: 13.8 of 72 s under
   cProfile, in 13,436 calls. Here a nested call whose modules the running launch has already patched skips it.
2. **Integer-overflow sanitizing.** The interpreter's options hard-code ``sanitize_overflow=True``, so every int32
   add, sub and mul is redone in int64 with a device assert (19 of the 72 s). Compiled kernels run without it
   (Triton enables it only with ``debug``), and at the interpreter tests' tiny shapes no index comes near 2**31.
"""

from __future__ import annotations

import dataclasses
import inspect


def apply() -> None:
    import triton.language as tl
    import triton.runtime.interpreter as ti

    if getattr(ti, "_linearize_sped_up", False):
        return
    if not (hasattr(ti, "_patch_lang") and hasattr(ti, "GridExecutor") and hasattr(ti, "interpreter_builder")):
        return  # another Triton: leave its interpreter alone (the tests are only slower)

    patched: list[set[int]] = []  # per running launch: ids of the language modules its _patch_lang patched
    original_patch, original_launch = ti._patch_lang, ti.GridExecutor.__call__

    langs: dict[object, frozenset[int]] = {}

    def langs_of(fn) -> frozenset[int]:
        if fn not in langs:
            langs[fn] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        return langs[fn]

    def patch_lang(fn):
        mine = langs_of(fn)
        if patched and patched[-1] and mine <= patched[-1]:
            return ti._LangPatchScope()  # a helper inside a launch that already patched these modules: nothing to undo
        scope = original_patch(fn)
        if patched:
            patched[-1] |= mine
        return scope

    def launch(self, *args, **kwargs):
        patched.append(set())
        try:
            return original_launch(self, *args, **kwargs)
        finally:
            patched.pop()

    ti._patch_lang = patch_lang
    ti.GridExecutor.__call__ = launch
    options = ti.interpreter_builder.options
    if dataclasses.is_dataclass(options) and "sanitize_overflow" in {f.name for f in dataclasses.fields(options)}:
        ti.interpreter_builder.options = dataclasses.replace(options, sanitize_overflow=False)
    ti._linearize_sped_up = True
