"""Run the Triton kernels on CPU in Triton's interpreter, or on a GPU with ``GW_TRITON_DEVICE=cuda``.

Interpreter (default, what CI runs): Triton reads ``TRITON_INTERPRET`` when a function is
decorated. graphwright's kernel modules are imported lazily (first use), so setting it here is
early enough for them; but transformers imports Triton (via torch._dynamo) when the root conftest
imports graphwright, so ``tl.max``, ``tl.sum`` and the other stdlib helpers were already built as
compiled-mode ``JITFunction``s. Calling one inside an interpreted kernel raises, so for these tests
a ``JITFunction`` call runs its Python body (the interpreter patches ``triton.language`` while a
kernel runs).

GPU (``GW_TRITON_DEVICE=cuda``, on a machine with one; ``bench/gpu_checks.sh`` runs it): the same
kernel tests, the same CPU references and tolerances, but every kernel entry point runs compiled on
the GPU: its tensor arguments are copied to CUDA and its outputs back (``cuda_kernels`` below), so
the test bodies stay as they are. Tests marked ``interpreter_only`` (whole models on the CPU, the
interpreter's own error) are deselected there.
"""

import functools
import os

import pytest
import torch

ON_CUDA = os.environ.get("GW_TRITON_DEVICE") == "cuda"

# (module, function) pairs the kernel tests call; every one is a plain function taking and returning tensors
KERNEL_ENTRY_POINTS = (
    ("graphwright.codegen.triton.attention_prefill", "attention_prefill"),
    ("graphwright.codegen.triton.attention_decode", "attention_decode"),
    ("graphwright.codegen.triton.latent_attention", "latent_attention_triton"),
    ("graphwright.codegen.triton.block_sparse", "block_sparse_triton"),
    ("graphwright.codegen.triton.moe", "moe_experts_triton"),
    ("graphwright.codegen.triton.moe", "fused_moe_triton"),
    ("graphwright.codegen.triton", "latent_attention_triton"),
    ("graphwright.codegen.triton", "fused_moe_triton"),
)


def _on_cuda(fn):
    """``fn`` with its tensor arguments on the GPU and its tensor results back on the CPU."""
    from torch.utils._pytree import tree_map

    def to(device, x):
        return x.to(device) if isinstance(x, torch.Tensor) else x

    @functools.wraps(fn)
    def run(*args, **kwargs):
        out = fn(*tree_map(functools.partial(to, "cuda"), args), **tree_map(functools.partial(to, "cuda"), kwargs))
        torch.cuda.synchronize()
        return tree_map(functools.partial(to, "cpu"), out)

    return run


def cuda_kernels():
    """Point every kernel entry point at its GPU-running twin (before the test modules import them)."""
    import importlib

    if not torch.cuda.is_available():
        raise RuntimeError("GW_TRITON_DEVICE=cuda needs a CUDA GPU; unset it to run the kernels in the interpreter")
    for module, name in KERNEL_ENTRY_POINTS:
        mod = importlib.import_module(module)
        setattr(mod, name, _on_cuda(getattr(mod, name)))


def pytest_collection_modifyitems(config, items):
    """On the GPU, tests marked ``interpreter_only`` (whole CPU models, the interpreter's own error) are
    deselected, not skipped: ``bench/gpu_checks.py`` runs whole models on the GPU instead."""
    if not ON_CUDA:
        return
    gone = [item for item in items if "interpreter_only" in item.keywords]
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = [item for item in items if "interpreter_only" not in item.keywords]


if ON_CUDA:
    cuda_kernels()


@pytest.fixture(autouse=True, scope="session")
def triton_interpreter():
    if ON_CUDA:
        yield
        return
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
