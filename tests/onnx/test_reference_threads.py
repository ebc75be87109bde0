"""reference_threads.py: the verification's torch reference runs its small steps with one intra-op thread.

Invariants: the reference logits with and without the cap agree within 1e-5 (the verification tolerance is
1e-3), each small step really runs with one thread and the caller's count is restored after every step, also
when the step raises; a step above ``MAX_TOKENS`` keeps its threads.
"""

import pytest
import torch

from graphwright.codegen.onnx import reference_threads
from graphwright.codegen.onnx.export import torch_reference
from tests.conftest import _compiled


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_reference_same_logits_one_thread_per_small_step(two_threads, monkeypatch):
    cm = _compiled("tiny-llama")
    seen = []
    step = cm._step

    def counting(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return step(*args, **kwargs)

    monkeypatch.setattr(cm, "_step", counting)
    monkeypatch.setattr(reference_threads, "ENABLED", False)
    off = torch_reference(cm, decode_steps=3)
    assert seen == [2, 2, 2, 2] and torch.get_num_threads() == 2
    seen.clear()
    monkeypatch.setattr(reference_threads, "ENABLED", True)
    on = torch_reference(cm, decode_steps=3)
    assert seen == [1, 1, 1, 1]  # the 2 x 7-token prefill and 3 decode steps
    assert torch.get_num_threads() == 2
    assert len(on["steps"]) == len(off["steps"]) == 4
    for (in_on, lt_on), (in_off, lt_off) in zip(on["steps"], off["steps"]):
        assert torch.equal(in_on[0], in_off[0])  # the same greedy tokens fed
        assert (lt_on - lt_off).abs().max().item() <= 1e-5


def test_small_steps_restores_and_leaves_long_steps(two_threads):
    with reference_threads.small_steps(reference_threads.MAX_TOKENS) as capped:
        assert capped and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with reference_threads.small_steps(reference_threads.MAX_TOKENS + 1) as capped:
        assert not capped and torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"):
        with reference_threads.small_steps(2):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
