"""Run the Triton kernels on CPU in Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` when a function is decorated. graphwright's kernel modules are
imported lazily (first use), so setting it here is early enough for them; but transformers
imports Triton (via torch._dynamo) when the root conftest imports graphwright, so ``tl.max``,
``tl.sum`` and the other stdlib helpers were already built as compiled-mode ``JITFunction``s.
Calling one inside an interpreted kernel raises, so for these tests a ``JITFunction`` call runs
its Python body (the interpreter patches ``triton.language`` while a kernel runs).
"""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def triton_interpreter():
    old_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import _patch_lang
    from triton.runtime.jit import JITFunction

    old_call = JITFunction.__call__

    def device_call(self, *args, **kwargs):  # what InterpretedFunction.__call__ does for a device call
        _patch_lang(self.fn)
        return self.fn(*args, **kwargs)

    JITFunction.__call__ = device_call
    try:
        yield
    finally:
        JITFunction.__call__ = old_call
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env
