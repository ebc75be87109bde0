"""Capture: ``torch.export`` an unmodified Hugging Face causal LM into a ``StepGraph``.

The step module below is the canonicalisation: it turns the KV cache into explicit inputs and
outputs and positions into an explicit input, so the exported graph is a pure step function
used for prefill (empty cache) and decode alike, with dynamic batch, sequence and cache length.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import time

import torch
from torch.export import Dim

from ..errors import CaptureError
from .interface import StepState, graphwright_implementations, step_state
from .ops import ATTENTION, MOE_EXPERTS
from .step_graph import ModelInfo, StateSpec, StepGraph

_PREFIX = "hf."


def model_info(model) -> ModelInfo:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise CaptureError(f"{type(model).__name__} has no .config: graphwright captures Hugging Face causal LMs (PreTrainedModel)")
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def get(*names, default=None):
        for n in names:
            v = getattr(cfg, n, None)
            if v is not None:
                return v
        return default

    num_heads = get("num_attention_heads", "n_head")
    hidden = get("hidden_size", "n_embd")
    num_layers = get("num_hidden_layers", "n_layer")
    if None in (num_heads, hidden, num_layers):
        raise CaptureError(f"{type(model).__name__}: config lacks num_attention_heads/hidden_size/num_hidden_layers")
    num_kv = get("num_key_value_heads", default=num_heads)
    head_dim = get("head_dim", default=hidden // num_heads)
    eos = get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    is_moe = any(get(n) for n in ("num_local_experts", "num_experts", "n_routed_experts"))
    dtype = next(model.parameters()).dtype
    return ModelInfo(
        architecture=type(model).__name__,
        model_type=getattr(cfg, "model_type", "unknown"),
        num_layers=int(num_layers),
        num_heads=int(num_heads),
        num_kv_heads=int(num_kv),
        head_dim=int(head_dim),
        hidden_size=int(hidden),
        vocab_size=int(get("vocab_size")),
        dtype=dtype,
        eos_token_id=eos,
        pad_token_id=get("pad_token_id"),
        max_positions=get("max_position_embeddings", "n_positions"),
        is_moe=bool(is_moe),
    )


class _StepModule(torch.nn.Module):
    """``(input_ids, positions, logits_index, key_positions, k0, v0, k1, v1, ...)`` -> ``(logits, key_positions', k0', v0', ...)``.

    ``positions`` [B, T] holds absolute positions with -1 for left padding; the model sees
    them clamped at 0 (padding rows are masked out as keys and never read as queries).
    ``logits_index`` [K] selects which of the T positions get logits (``[T-1]`` for
    generation, ``arange(T)`` for perplexity), so prefill does not pay for T x vocab logits.
    """

    def __init__(self, hf_model, num_layers: int):
        super().__init__()
        self.hf = hf_model
        self.num_layers = num_layers
        params = inspect.signature(hf_model.forward).parameters
        self._has_logits_to_keep = "logits_to_keep" in params

    def forward(self, input_ids, positions, logits_index, key_positions, *cache):
        k_pos = torch.cat([key_positions, positions], dim=1)
        caches = [(cache[2 * i], cache[2 * i + 1]) for i in range(self.num_layers)]
        state = StepState(caches=caches, q_pos=positions, k_pos=k_pos)
        kwargs = dict(input_ids=input_ids, position_ids=positions.clamp(min=0), use_cache=False)
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = logits_index
        with step_state(state):
            out = self.hf(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        if not self._has_logits_to_keep:
            logits = logits.index_select(1, logits_index)
        missing = [i for i in range(self.num_layers) if i not in state.new_caches]
        if missing:
            raise CaptureError(
                f"{type(self.hf).__name__}: layers {missing} did not call transformers' attention interface "
                "(custom attention code cannot be captured; use a model whose attention goes through ALL_ATTENTION_FUNCTIONS)"
            )
        flat = [t for i in range(self.num_layers) for t in state.new_caches[i]]
        return (logits, k_pos, *flat)


@contextlib.contextmanager
def _module_tracker(model):
    """Remember which modules were executing, to name the culprit if capture fails."""
    stack: list[str] = []
    deepest: list[str] = []
    handles = []

    def pre(mod, *_):
        stack.append(mod._graphwright_path)
        if len(stack) >= len(deepest):
            deepest[:] = list(stack)

    def post(mod, *_):
        if stack:
            stack.pop()

    for mod in model.modules():
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _flatten_codegen(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop the pytree calling convention: flat tensor placeholders in, a flat tuple out."""
    graph = gm.graph
    graph._codegen = torch.fx.graph.CodeGen()
    out = next(n for n in graph.nodes if n.op == "output")
    flat = out.args[0]
    while isinstance(flat, (list, tuple)) and len(flat) == 1 and isinstance(flat[0], (list, tuple)):
        flat = flat[0]
    out.args = (tuple(flat),)
    # ep.module() installs input-constraint hooks; the runtime checks shapes itself.
    gm._forward_pre_hooks.clear()
    gm.recompile()
    return gm


def _simplify(gm: torch.fx.GraphModule) -> dict:
    """Exact clean-ups of the exported graph: drop export's runtime assertions and guard call,
    and casts to the dtype/device a tensor already has. Returns counts per rule."""
    counts = {"assert_metadata": 0, "guards": 0, "noop_cast": 0}
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
            counts["assert_metadata"] += 1
        elif node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
            counts["guards"] += 1
        elif node.op == "call_function" and node.target in (torch.ops.aten.to.dtype, torch.ops.aten.to.device,
                                                             torch.ops.aten.to.dtype_layout):
            src, out = node.args[0], node.meta.get("val")
            inp = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
            if inp is not None and out is not None and inp.dtype == out.dtype and inp.device == out.device \
                    and not node.kwargs.get("copy", False) and not node.kwargs.get("memory_format"):
                node.replace_all_uses_with(src)
                graph.erase_node(node)
                counts["noop_cast"] += 1
    graph.eliminate_dead_code()
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()
    return counts


def _annotate(gm: torch.fx.GraphModule, model) -> tuple[tuple, tuple]:
    """Put ``layer``, module path, op and variant into ``node.meta['graphwright']``."""
    attn_paths, moe_paths, windows = {}, [], {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (ATTENTION, MOE_EXPERTS):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        path = path[len(_PREFIX):] if path.startswith(_PREFIX) else path
        if node.target is ATTENTION:
            try:
                layer = int(model.get_submodule(path).layer_idx)
            except Exception:  # noqa: BLE001 - fall back to order of appearance
                layer = len(attn_paths)
            attn_paths[layer] = path
            windows[layer] = _window_of(node)
            node.meta["graphwright"] = {"op": "attention", "layer": layer, "module": path, "variant": "dense"}
        else:
            m = re.search(r"layers\.(\d+)\b", path)
            layer = int(m.group(1)) if m else len(moe_paths)
            moe_paths.append(path)
            node.meta["graphwright"] = {"op": "moe_experts", "layer": layer, "module": path, "variant": "loop"}
    return tuple(attn_paths[i] for i in sorted(attn_paths)), tuple(moe_paths), tuple(windows[i] for i in sorted(windows))


def _window_of(node: torch.fx.Node) -> int:
    """The ``window`` argument of a captured ``graphwright.attention`` node (0 = no sliding window)."""
    names = [a.name for a in node.target._schema.arguments]
    i = names.index("window")
    value = node.args[i] if i < len(node.args) else node.kwargs.get("window", 0)
    return int(value or 0)


def _example_inputs(info: ModelInfo, device):
    B, T, S = 2, 3, 2
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    pos = torch.arange(S, S + T, device=device).expand(B, T).contiguous()
    li = torch.arange(T, device=device)
    kp = torch.arange(S, device=device).expand(B, S).contiguous()
    cache = []
    for _ in range(info.num_layers):
        cache.append(torch.zeros(B, info.num_kv_heads, S, info.head_dim, dtype=info.dtype, device=device))
        cache.append(torch.zeros(B, info.num_kv_heads, S, info.head_dim, dtype=info.dtype, device=device))
    return (ids, pos, li, kp, *cache)


def capture(model) -> StepGraph:
    """Export ``model`` (an unmodified HF causal LM) to a ``StepGraph``.

    Raises ``CaptureError`` naming the module and the reason when the model cannot be captured;
    there is no silent fallback.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module (a Hugging Face causal LM); got {type(model).__name__}")
    info = model_info(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    step = _StepModule(model, info.num_layers)
    batch, seq, cache_len = Dim("batch", min=1), Dim("seq", min=1), Dim("cache", min=0)
    nlogits = Dim("nlogits", min=1)
    kv = {0: batch, 2: cache_len}
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "positions": {0: batch, 1: seq},
        "logits_index": {0: nlogits},
        "key_positions": {0: batch, 1: cache_len},
        "cache": tuple(kv for _ in range(2 * info.num_layers)),
    }
    t0 = time.perf_counter()
    try:
        with graphwright_implementations(model), _module_tracker(model) as stack, torch.no_grad():
            try:
                ep = torch.export.export(step, _example_inputs(info, device), dynamic_shapes=dynamic, strict=False)
            except CaptureError:
                raise
            except Exception as exc:  # noqa: BLE001 - re-raised with the module that failed
                where = stack[-1] if stack else type(model).__name__
                where = where[len(_PREFIX):] if where.startswith(_PREFIX) else where
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CaptureError(f"cannot capture {info.architecture}: module {where!r} failed to export: {type(exc).__name__}: {first}") from exc
    finally:
        model.train(was_training)
    gm = _flatten_codegen(ep.module())
    simplified = _simplify(gm)
    attn_paths, moe_paths, windows = _annotate(gm, model)
    if len(attn_paths) != info.num_layers:
        raise CaptureError(f"{info.architecture}: expected {info.num_layers} attention nodes, captured {len(attn_paths)}")
    info = ModelInfo(**{**info.__dict__, "attention_modules": attn_paths, "moe_modules": moe_paths, "windows": windows,
                        "is_moe": info.is_moe or bool(moe_paths)})
    state = [StateSpec("key_positions", "positions", (-1, 0), torch.long, seq_dim=1)]
    for i in range(info.num_layers):
        for kind in ("k", "v"):
            state.append(StateSpec(f"{kind}{i}", "kv", (-1, info.num_kv_heads, 0, info.head_dim), info.dtype, seq_dim=2, layer=i))
    sg = StepGraph(gm=gm, info=info, state=state)
    sg.notes["capture"] = {"seconds": round(time.perf_counter() - t0, 2), "torch": torch.__version__, "simplified": simplified}
    return sg
