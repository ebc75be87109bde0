"""EvictionPolicy + register_policy: a toy policy's op agrees with its reference (values, fake shapes), and
runs end to end through the generic pass helper; the built-in policies keep their op schemas."""

from __future__ import annotations

import pytest
import torch

from graphwright.ops import eviction as ev
from graphwright.ops.eviction_policy import POLICIES, EvictionPolicy, HeadState, Param, SlotState, register_policy
from graphwright.ops.eviction_ref import compact, row_length
from graphwright.passes.base import Arg
from graphwright.passes.eviction_common import LAYERS_ARG, EvictionPass, evict_pass_build, rewrite_layers
from tests.conftest import left_padded_batch
from tests.passes.eviction_helpers import decode_loop, kept_positions, random_step, run_pass, state_of

BUILTIN_SCHEMAS = {
    "h2o": "(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, Tensor score, float scale, SymInt heavy_n, "
           "float heavy_f, SymInt recent_n, float recent_f, Tensor? key_bias=None) -> (Tensor, Tensor, Tensor, Tensor)",
    "snapkv": "(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, float scale, SymInt budget, SymInt window, "
              "SymInt kernel, str pool, Tensor? key_bias=None) -> (Tensor, Tensor, Tensor)",
    "fastgen": "(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, Tensor score, Tensor token_class, "
               "Tensor new_class, Tensor policy, float scale, float recovery, SymInt local_n, float local_f, "
               "SymInt frequent_n, float frequent_f, str criterion, str force, Tensor? key_bias=None) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "streaming": "(Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, SymInt sinks, SymInt window) -> (Tensor, Tensor, Tensor)",
}


def toy_reference(q, k, v, q_pos, k_pos, seen, steps, scale, last, key_bias=None):
    """Keep the ``last`` most recent positions; ``seen`` counts the steps a slot has been cached, ``steps`` the steps."""
    B, Hk, S = k_pos.shape
    seen = torch.cat([seen, seen.new_zeros(B, Hk, S - seen.shape[2])], 2) + 1
    steps = (steps if steps.shape[-1] else steps.new_zeros(B, Hk, 1)) + 1
    keep = k_pos >= (row_length(q_pos) - last)[:, None, None]
    return (*compact(keep, k, v, k_pos, (seen,)), steps)


TOY = EvictionPolicy(name="toy_last", reference=toy_reference, params=(Param("last", "int"),),
                     slot_state=(SlotState("seen", torch.int32, state="toy_seen"),),
                     head_state=(HeadState("steps", torch.long, width=1, state="toy_steps"),))
TOY_OP = POLICIES["toy_last"].op if "toy_last" in POLICIES else register_policy(TOY)


class ToyLast(EvictionPass):  # not registered: a pass is a few lines with the generic helper
    name = "toy_last"
    args = (Arg("last", int, 3, "recent tokens kept", min=1), LAYERS_ARG)

    def run(self, sg, ctx):
        rewrite_layers(sg, "toy_last", evict_pass_build(TOY, {"last": self.last}), self.layer_set(sg.info))
        return sg


def test_builtin_policies_keep_their_schemas():
    for name, want in BUILTIN_SCHEMAS.items():
        assert str(POLICIES[name].op._schema) == f"graphwright::evict_{name}{want}"
    assert set(ev.EVICT_OPS) >= {ev.EVICT_H2O, ev.EVICT_SNAPKV, ev.EVICT_FASTGEN, ev.EVICT_STREAMING}


def test_toy_policy_op_fake_and_reference_agree():
    assert str(TOY_OP._schema) == ("graphwright::evict_toy_last(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, "
                                   "Tensor seen, Tensor steps, float scale, SymInt last, Tensor? key_bias=None) "
                                   "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
    assert TOY_OP in ev.EVICT_OPS and ev.REFERENCES[TOY_OP] is toy_reference
    q, k, v, q_pos, k_pos = random_step(T=2, seed=4, holes=False)
    seen = torch.ones(*k_pos.shape[:2], k_pos.shape[2] - 2, dtype=torch.int32)
    steps = torch.zeros(*k_pos.shape[:2], 0, dtype=torch.long)
    got = TOY_OP(q, k, v, q_pos, k_pos, seen, steps, 0.35, 4)
    want = toy_reference(q, k, v, q_pos, k_pos, seen, steps, 0.35, 4)
    assert len(got) == 5
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert kept_positions(got[2])[1] == [list(range(int(q_pos[1, -1]) - 3, int(q_pos[1, -1]) + 1))] * 2
    assert got[3][0, 0, :4].tolist() == [2, 2, 1, 1] and got[4].tolist() == [[[1], [1]], [[1], [1]]]

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fake = TOY_OP(*(mode.from_tensor(t) for t in (q, k, v, q_pos, k_pos, seen, steps)), 0.35, 4)
    for f, real, name in zip(fake, got, ("k", "v", "k_pos", "seen", "steps")):
        assert f.dim() == real.dim() and f.dtype == real.dtype, name
        fixed = [d for d in range(real.dim()) if d != 2 or name == "steps"]
        assert [f.shape[d] for d in fixed] == [real.shape[d] for d in fixed], name
        if name != "steps":
            assert not isinstance(f.shape[2], int), name  # data-dependent kept count
    with pytest.raises(ValueError, match="registered already"):
        register_policy(TOY)


def test_toy_policy_through_the_generic_pass(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    ev_cm = run_pass(cm, ToyLast(last=3, layers=[1]))
    names = [s.name for s in ev_cm.step_graph.state]
    assert "toy_seen1" in names and "toy_steps1" in names and "toy_seen0" not in names
    ids, mask = left_padded_batch(256, [9, 6], seed=2)

    def check(i, state):
        kp1 = kept_positions(state_of(ev_cm, state, "key_positions1"))
        assert kp1 == [[list(range(6 + i, 9 + i))] * 2, [list(range(3 + i, 6 + i))] * 2]
        assert state_of(ev_cm, state, "toy_steps1").flatten().tolist() == [i + 1] * 4
        # steps each kept slot has been cached: the state is compacted with the cache
        assert state_of(ev_cm, state, "toy_seen1")[0, 0].tolist() == ([[1, 1, 1], [2, 2, 1]][i] if i < 2 else [3, 2, 1])
        assert state_of(ev_cm, state, "k0").shape[2] == 9 + i  # layer 0 keeps its dense cache

    decode_loop(ev_cm, ids, mask, 4, on_step=check)


def test_bad_param_type_is_refused():
    bad = EvictionPolicy(name="bad_type", reference=toy_reference, params=(Param("x", "tensor"),))
    with pytest.raises(ValueError, match="allowed"):
        bad.schema()
