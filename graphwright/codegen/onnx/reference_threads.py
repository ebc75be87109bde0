"""The torch side of the export verification with one intra-op thread for small steps.

``export.torch_reference`` runs the verification probe through the torch runtime's step: a short prefill
(2 rows of 7 tokens for a recipe that crosses nothing) and 3 single-token decode steps. Each of those steps is a
chain of ~200 matmuls of a few rows (SmolLM2-135M: [2, 576] x [576, 576]). With torch's default two OpenMP
threads on 2 cores, every one of them ends in a thread barrier; when the other core is busy (another process,
or ``decode_process.py``'s child exporting ``decode.onnx`` in parallel, which is exactly when
``export_onnx`` computes the reference early) the barrier waits for a descheduled thread and spins.
Measured on SmolLM2-135M identity (loaded machine, load 9-13 on 2 cores, alternating in one process,
``bench/verify_threads.py``): ``torch_reference`` 1.9-14.6 CPU s with 2 threads vs 0.34-0.36 CPU s with 1.

``small_steps(tokens)``: a context manager that sets ``torch.set_num_threads(1)`` while a step of at most
``MAX_TOKENS`` tokens (batch x new tokens) runs and restores the previous count after it (also when the step
raises). Longer prefills (a probe that crosses a 512-token budget) keep every thread: there the matmuls are
large enough for threading to pay. ``ENABLED = False`` turns it off (the A/B).

Exactness: no arithmetic changes meaning; the thread count can only change the order of float
additions inside a matmul. Invariant tested (``tests/onnx/test_reference_threads.py``): the reference logits
with and without it agree within 1e-5 (tiny Llama; the verification tolerance is 1e-3), the thread count is
restored after each step, also on an exception, and a long step keeps its threads.
"""

from __future__ import annotations

import contextlib

import torch

ENABLED = True
MAX_TOKENS = 256  # batch x new tokens of a step run with one thread (the identity probe's prefill: 14)


@contextlib.contextmanager
def small_steps(tokens: int):
    """Inside: one intra-op thread when ``tokens <= MAX_TOKENS`` (and ``ENABLED``); yields whether it capped."""
    before = torch.get_num_threads()
    cap = ENABLED and tokens <= MAX_TOKENS and before > 1
    if cap:
        torch.set_num_threads(1)
    try:
        yield cap
    finally:
        if cap:
            torch.set_num_threads(before)
