"""graphwright's functions in transformers' attention and experts interfaces.

transformers dispatches every attention layer through ``ALL_ATTENTION_FUNCTIONS`` and every
(3-D weight) MoE experts module through ``ALL_EXPERTS_FUNCTIONS``. Registering our own
implementation there is the one capture boundary that survives transformers releases (no
per-model patching, no pattern matching of how each model spells attention). During capture
the functions below:

* concatenate the layer's explicit cache tensors with the new keys/values,
* emit exactly one ``graphwright.attention`` (or ``graphwright.moe_experts``) node,
* record the new cache tensors so the step module can return them as graph outputs.

The per-call state (cache inputs, positions) travels in a ``contextvars.ContextVar`` set by the
step module, so it reaches every layer even for models that do not forward ``**kwargs``.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

from ..errors import CaptureError
from . import ops  # noqa: F401  (registers torch.ops.graphwright.*)

IMPLEMENTATION = "graphwright"

# kwargs that transformers passes to every attention function and that we handle or that are
# harmless; anything else that changes the math is refused with the module's name.
_IGNORED_KWARGS = {"dropout", "position_ids", "cache_position", "output_attentions", "use_cache", "is_causal"}
_UNSUPPORTED_KWARGS = {"s_aux": "attention sinks", "softcap": "logit soft-capping"}


@dataclass
class StepState:
    """What one step of the step graph carries through the model."""

    caches: list  # per layer: (k_cache [B,Hk,S,D], v_cache [B,Hk,S,Dv])
    q_pos: torch.Tensor  # [B, T]
    k_pos: torch.Tensor  # [B, S + T]
    new_caches: dict = field(default_factory=dict)
    attention_modules: dict = field(default_factory=dict)  # layer -> module (for error messages)


_STATE: contextvars.ContextVar[StepState | None] = contextvars.ContextVar("graphwright_step", default=None)


def _module_name(module) -> str:
    return getattr(module, "_graphwright_path", None) or type(module).__name__


def graphwright_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: one ``graphwright.attention`` node per layer."""
    state = _STATE.get()
    if state is None:
        raise CaptureError(
            f"{_module_name(module)}: the graphwright attention implementation only runs inside a "
            "graphwright step graph (use graphwright.compile(model), not model.forward)"
        )
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise CaptureError(f"{_module_name(module)} uses {what} ({name}), which graphwright.attention does not support yet")
    if getattr(module, "is_causal", True) is False:
        raise CaptureError(f"{_module_name(module)} is not causal (encoder or cross attention); graphwright captures decoder-only causal LMs")
    layer = getattr(module, "layer_idx", None)
    if layer is None or not (0 <= int(layer) < len(state.caches)):
        raise CaptureError(f"{_module_name(module)} has no usable layer_idx ({layer!r}); cannot assign its KV cache")
    layer = int(layer)
    if layer in state.new_caches:
        raise CaptureError(f"{_module_name(module)}: layer {layer} attention was called twice in one step")
    window = kwargs.get("sliding_window") or 0
    scale = float(scaling) if scaling is not None else float(query.shape[-1]) ** -0.5
    k_cache, v_cache = state.caches[layer]
    k_all = torch.cat([k_cache, key.to(k_cache.dtype)], dim=2)
    v_all = torch.cat([v_cache, value.to(v_cache.dtype)], dim=2)
    state.new_caches[layer] = (k_all, v_all)
    state.attention_modules[layer] = module
    out = torch.ops.graphwright.attention(query, k_all, v_all, state.q_pos, state.k_pos, scale, int(window))
    return out.transpose(1, 2), None


def graphwright_experts(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts-interface function: one ``graphwright.moe_experts`` node per block."""
    name = _module_name(self)
    flags = {
        "has_gate": getattr(self, "has_gate", True),
        "is_concatenated": getattr(self, "is_concatenated", True),
        "is_transposed": not getattr(self, "is_transposed", False),
        "no bias": not getattr(self, "has_bias", False),
        "no post-expert norm": not getattr(self, "has_post_expert_norm", False),
    }
    missing = [k for k, ok in flags.items() if not ok]
    if missing:
        raise CaptureError(f"{name}: experts layout not supported by graphwright.moe_experts (needs {', '.join(missing)})")
    if not hasattr(self, "gate_up_proj") or not hasattr(self, "down_proj"):
        raise CaptureError(f"{name}: experts module has no 3-D gate_up_proj/down_proj weights")
    act = getattr(self.config, "hidden_act", None) or getattr(self.config, "hidden_activation", None)
    if act not in ops.SUPPORTED_MOE_ACTIVATIONS:
        raise CaptureError(f"{name}: expert activation {act!r} not supported; supported: {ops.SUPPORTED_MOE_ACTIVATIONS}")
    return torch.ops.graphwright.moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, act)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, graphwright_attention)
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # transformers without the experts interface: MoE blocks then fail to capture by name
        return
    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, graphwright_experts)


_register()


@contextlib.contextmanager
def step_state(state: StepState):
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)


def _configs(model):
    """The model's config and every sub-config that carries an attention implementation."""
    seen = []
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and all(cfg is not s for s in seen):
            seen.append(cfg)
    return seen


@contextlib.contextmanager
def graphwright_implementations(model):
    """Scoped and reversible: route the model's attention/experts through graphwright.

    Sets ``config._attn_implementation`` (and ``_experts_implementation`` where present) on
    every config of the model, tags modules with their path for error messages, and restores
    everything in ``finally``.
    """
    saved = []
    tagged = []
    try:
        for cfg in _configs(model):
            for attr in ("_attn_implementation", "_experts_implementation"):
                if attr == "_attn_implementation" or hasattr(cfg, attr):
                    saved.append((cfg, attr, getattr(cfg, attr, None)))
                    setattr(cfg, attr, IMPLEMENTATION)
        for path, mod in model.named_modules():
            if "_graphwright_path" not in mod.__dict__:
                mod._graphwright_path = path or type(mod).__name__
                tagged.append(mod)
        yield model
    finally:
        for cfg, attr, value in reversed(saved):
            setattr(cfg, attr, value)
        for mod in tagged:
            mod.__dict__.pop("_graphwright_path", None)
