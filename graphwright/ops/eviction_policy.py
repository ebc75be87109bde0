"""A KV-eviction policy as one small declarative object, and the one helper that registers its op.

An ``EvictionPolicy`` says everything the op registration and the pass rewrite need to know:

* ``name``: the op is ``graphwright::evict_<name>`` (``torch.ops.graphwright.evict_<name>.default``);
* ``needs_q``: the policy scores with queries (all but StreamingLLM). Then the op reads ``q`` first,
  ``scale`` after the state, and takes an optional ``key_bias`` last;
* ``slot_state``: per-slot state carried besides k/v/positions, [B, Hk, S_l] (or [B, Hk, S_l, W]
  with ``trailing``), compacted with the cache (H2O: ``score`` fp32; FastGen: ``score`` fp32 and
  ``token_class`` int8; Scissorhands: packed indicator bits [B, Hk, S_l, ceil(m/8)] uint8);
* ``step_inputs``: per-step inputs the pass computes once for all layers ([B, T]; FastGen: the
  token classes ``new_class`` of this step's ids), never state;
* ``head_state``: per-head state [B, Hk, width] that is not compacted (FastGen: ``policy``, empty
  [B, Hk, 0] before prefill, then one id per head);
* ``params``: scalar parameters (name, torch schema type ``"float"``, ``"int"`` or ``"str"``);
* ``reference``: the pure-torch definition, called positionally in the op's argument order.

The op signature is derived from those fields, in this order (the order today's saved graphs,
ONNX split and lowering tables use)::

    evict_<name>([q,] k, v, q_pos, k_pos, *slot_state, *step_inputs, *head_state, [scale,] *params[, key_bias=None])
        -> (k, v, k_pos, *slot_state, *head_state)

The output length is data dependent (the largest kept count over rows and heads), so the fake
impl allocates an unbacked size for k, v, k_pos and the slot state; head state keeps ``width``.

Adding a policy (e.g. Keyformer, Scissorhands) takes three steps:

1. Write its reference ``<name>_reference(...)`` with the signature above (select a ``keep`` mask
   [B, Hk, S] and return ``eviction_ref.compact(keep, k, v, k_pos, (slot states...))`` plus head
   state), in ``ops/policy_<name>.py``, next to an ``EvictionPolicy(...)`` declaring it, and
   ``register_policy(POLICY)`` there; import that module in ``ops/eviction.py``.
2. Write the pass ``passes/<name>.py``: an ``EvictionPass`` subclass with its recipe ``args`` (plus
   ``LAYERS_ARG``) whose ``run`` calls ``rewrite_layers(sg, name, evict_pass_build(POLICY, params), ...)``
   (``eviction_common``) and records ``sg.notes[name]``.
3. Write ``tests/passes/test_<name>.py``: the exact setting is the identity on the tiny models,
   and the op's kept set equals a slow loop oracle.

Invariant tested (``tests/passes/test_eviction_policy.py``): a toy policy registered by this helper
gives an op whose fake and reference agree on ranks, dtypes and fixed dims, whose schema follows
the order above, and the four built-in policies keep their exact op schemas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

LIB = "graphwright"
_SCHEMA_TYPES = {"float": "float", "int": "SymInt", "str": "str", "bool": "bool"}


@dataclass(frozen=True)
class SlotState:
    """Per-slot state [B, Hk, S_l] compacted with the cache: op argument ``arg``, state ``<state><layer>``.

    ``trailing=True``: the state is [B, Hk, S_l, W] (W fixed by the pass's parameters, e.g.
    Scissorhands' packed ring buffer of indicator bits); the fake keeps the input's W.
    """

    arg: str
    dtype: torch.dtype
    state: str = ""
    trailing: bool = False

    @property
    def prefix(self) -> str:
        return self.state or self.arg


@dataclass(frozen=True)
class HeadState:
    """Per-head state [B, Hk, width] (``[B, Hk, 0]`` before prefill); not compacted."""

    arg: str
    dtype: torch.dtype
    width: int = 1
    state: str = ""

    @property
    def prefix(self) -> str:
        return self.state or self.arg


@dataclass(frozen=True)
class StepInput:
    """A per-step input [B, T] the pass computes (not state)."""

    arg: str
    dtype: torch.dtype


@dataclass(frozen=True)
class Param:
    """A scalar parameter: ``type`` is ``"float"``, ``"int"``, ``"str"`` or ``"bool"``."""

    name: str
    type: str


@dataclass(frozen=True)
class EvictionPolicy:
    name: str
    reference: Callable
    params: tuple = ()
    needs_q: bool = True
    slot_state: tuple = ()
    step_inputs: tuple = ()
    head_state: tuple = field(default=())
    doc: str = ""

    @property
    def qualname(self) -> str:
        return f"{LIB}::evict_{self.name}"

    @property
    def op(self):
        """The registered op overload (``register_policy`` first)."""
        return getattr(torch.ops.graphwright, f"evict_{self.name}").default

    def tensor_inputs(self) -> tuple[str, ...]:
        """Required tensor arguments in op order."""
        return ((("q",) if self.needs_q else ()) + ("k", "v", "q_pos", "k_pos")
                + tuple(s.arg for s in self.slot_state) + tuple(s.arg for s in self.step_inputs)
                + tuple(s.arg for s in self.head_state))

    def arg_names(self) -> tuple[str, ...]:
        return (self.tensor_inputs() + (("scale",) if self.needs_q else ()) + tuple(p.name for p in self.params)
                + (("key_bias",) if self.needs_q else ()))

    def outputs(self) -> tuple[str, ...]:
        """Output names in op order: k, v, k_pos, then slot and head state by argument name."""
        return ("k", "v", "k_pos") + tuple(s.arg for s in self.slot_state) + tuple(s.arg for s in self.head_state)

    def schema(self) -> str:
        for p in self.params:
            if p.type not in _SCHEMA_TYPES:
                raise ValueError(f"policy {self.name}: parameter {p.name!r} has type {p.type!r}; "
                                 f"allowed: {', '.join(_SCHEMA_TYPES)}")
        args = [f"Tensor {a}" for a in self.tensor_inputs()]
        if self.needs_q:
            args.append("float scale")
        args += [f"{_SCHEMA_TYPES[p.type]} {p.name}" for p in self.params]
        if self.needs_q:
            args.append("Tensor? key_bias=None")
        return f"({', '.join(args)}) -> ({', '.join(['Tensor'] * len(self.outputs()))})"


EVICT_OPS: list = []  # every registered eviction op (the ONNX split keeps them on the runtime side)
REFERENCES: dict = {}  # op -> reference (the "reference" and "torch" lowering tables)
POLICIES: dict = {}  # name -> EvictionPolicy


def _fresh(outs, inputs):
    """Custom ops must not return their inputs: copy any output that is one (the no-eviction fast path)."""
    ids = {id(t) for t in inputs if isinstance(t, Tensor)}
    return tuple(o.clone() if id(o) in ids else o for o in outs)


def _fake(policy: EvictionPolicy):
    names = policy.arg_names()

    def fake(*args, **kwargs):
        a = dict(zip(names, args), **kwargs)
        k, v, k_pos = a["k"], a["v"], a["k_pos"]
        n = torch.library.get_ctx().new_dynamic_size()
        B, Hk = k.shape[:2]
        outs = [k.new_empty(B, Hk, n, k.shape[-1]), v.new_empty(B, v.shape[1], n, v.shape[-1]), k_pos.new_empty(B, Hk, n)]
        outs += [k_pos.new_empty(B, Hk, n, *((a[s.arg].shape[-1],) if s.trailing else ()), dtype=s.dtype)
                 for s in policy.slot_state]
        outs += [a[s.arg].new_empty(B, Hk, s.width, dtype=s.dtype) for s in policy.head_state]
        return tuple(outs)

    return fake


def register_policy(policy: EvictionPolicy):
    """Register ``graphwright::evict_<name>`` (op + fake) and add it to ``EVICT_OPS``/``REFERENCES``.

    Returns the op overload. Raises ``ValueError`` when a policy of that name is registered already.
    """
    if policy.name in POLICIES:
        raise ValueError(f"eviction policy {policy.name!r} is registered already")
    ref = policy.reference

    def impl(*args):
        return _fresh(ref(*args), args)

    impl.__doc__ = policy.doc or ref.__doc__
    op = torch.library.custom_op(policy.qualname, impl, mutates_args=(), schema=policy.schema())
    op.register_fake(_fake(policy))
    overload = policy.op
    POLICIES[policy.name] = policy
    EVICT_OPS.append(overload)
    REFERENCES[overload] = ref
    return overload
