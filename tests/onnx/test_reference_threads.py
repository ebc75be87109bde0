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


def test_capped_reference_still_catches_a_wrong_layer(tmp_path):
    """The verification with the one-thread reference fails an artifact whose layer 1 is wrong (its
    first MatMul weight scaled by 1.5) and passes the untouched one."""
    import json

    import onnx
    from onnx import numpy_helper

    import graphwright as gw
    from graphwright.codegen.onnx.artifact import OnnxStep
    from graphwright.codegen.onnx.export import verify_artifact
    from graphwright.errors import GraphwrightError

    cm = _compiled("tiny-llama")
    out = gw.export_onnx(cm, tmp_path / "x", verify=False, external_data=False)
    meta = json.loads((out / "graphwright.json").read_text())
    ref = torch_reference(cm, decode_steps=1)
    good = verify_artifact(cm, OnnxStep.from_metadata(out / "model.onnx", meta, providers=["CPUExecutionProvider"]),
                           decode_steps=1, reference=ref)
    assert good["passed"] and good["max_abs_logit_diff"] <= 1e-4
    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    # layer 1's first MatMul weight (the optimizer folds the transposed weights into anonymous initializers)
    init = next(inits[x] for n in model.graph.node if n.op_type == "MatMul" and "layers.1." in str(n.metadata_props)
                for x in n.input if x in inits)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(model, str(tmp_path / "wrong.onnx"))
    wrong = OnnxStep.from_metadata(tmp_path / "wrong.onnx", meta, providers=["CPUExecutionProvider"])
    with pytest.raises(GraphwrightError, match=r"ONNX verification failed at prefill: max \|logit difference\|"):
        verify_artifact(cm, wrong, decode_steps=1, reference=ref)
