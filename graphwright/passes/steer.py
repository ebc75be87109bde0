"""``steer``: PASTA attention steering (Zhang et al., arXiv 2311.02262), as a key bias.

Paper in one paragraph. An instruction-tuned LLM often under-attends to the part of a long
prompt the user cares about (an instruction buried in context, a counterfactual fact). PASTA
lets the user *emphasize* spans and, in a small set of attention heads only, rescales the
attention of every query row: emphasized keys keep their weight, all other prompt keys are
multiplied by ``alpha`` (0.01), and rows are renormalised:

    T(A)_ij = A_ij / C_i          for j in G (emphasized)
            = alpha * A_ij / C_i  for j not in G (prompt),   C_i = sum_G A_ij + alpha * sum_notG A_ij

which is exactly adding ``log(alpha)`` to the pre-softmax scores of non-emphasized prompt
columns (the official code's ``exclude`` mode). Generated-token columns are never scaled; decode
steps are steered too. Which heads to steer matters: the paper profiles single heads per task
(``graphwright.steer.profile``); AutoPASTA (arXiv 2409.10790) does it coarse-to-fine.

Graph change. Each selected layer's ``graphwright.attention`` node gets
``key_bias = steer_key_bias(steer_weights, k_pos, coef)`` with ``coef`` [H] a buffer holding
``log(alpha)`` on the selected heads and 0 elsewhere, and ``steer_weights`` [B, P] one new,
optional graph input (``StepGraph.extra_inputs``) built by the runtime from emphasized spans
(``cm.generate(ids, emphasis=[(start, end)])``). No T x S mask is ever built, and the bias is
indexed by absolute position so it needs no update during decode. Without emphasis the input
is None and the graph runs the base model's exact path. KV state is unchanged.

Arguments: ``alpha`` (default 0.01; alpha = 1 is the exact setting; alpha > 1 de-emphasizes),
``heads`` ({layer: [heads]}, a list of whole layers, a JSON head-set file, ``"all"``, or
``"auto"`` = the head set cached by the last ``profile_heads`` run for this model), ``mode``
(``exclude`` as the paper, or ``include``: +log(alpha) on the spans then -log(alpha) on all
prompt columns, so include(1/alpha) == exclude(alpha) for one span).

Invariants tested (``tests/steer/test_steer_pass.py``, ``test_steer_emphasis.py``): alpha = 1 reproduces logits and tokens;
unselected heads' attention probabilities are bit-identical to the base; selected heads match
T(A); include(1/alpha) == exclude(alpha); decode columns stay unscaled; batches with left
padding and different spans per row; bad spans and bad heads raise.
"""

from __future__ import annotations

import json
import math
import stat
from collections.abc import Mapping
from pathlib import Path

import torch

from ..capture.step_graph import ExtraInput
from ..errors import RecipeError
from ..steer.bias import STEER_INPUT, steer_key_bias
from ..steer.heads import auto_head_path
from ..ops import schema
from .base import Arg, Pass, PassContext, Tunable, register_pass
from .selection import parse_layer_heads


def steerable_nodes(sg) -> list:
    """Attention nodes (any variant) whose op takes a ``key_bias``: dense and latent attention."""
    return [n for n in schema.attention_nodes(sg.gm) if schema.has_arg(n.target, "key_bias")]


MAX_HEAD_FILE_BYTES = 1_000_000  # a head-set file lists at most layers x heads small ints


def _read_head_file(heads: str):
    """The JSON of a head-set file: a regular file of bounded size (never a directory, device or FIFO)."""
    if not heads.strip():
        raise RecipeError("steer: heads='' is empty; give {layer: [heads]}, a list of layers, a JSON head-set file, 'all' or 'auto'")
    path = Path(heads)
    try:
        st = path.stat()
    except (OSError, ValueError):  # missing, unreadable, or a name the OS refuses (NUL byte, too long)
        raise RecipeError(f"steer: heads={heads!r:.200} is neither 'all', 'auto', nor an existing JSON head-set file") from None
    if not stat.S_ISREG(st.st_mode):
        raise RecipeError(f"steer: heads={heads!r:.200} is not a regular file (a directory or device); give a JSON head-set file, "
                          "{layer: [heads]}, a list of layers, 'all' or 'auto'")
    if st.st_size > MAX_HEAD_FILE_BYTES:
        raise RecipeError(f"steer: head-set file {path} is {st.st_size} bytes; at most {MAX_HEAD_FILE_BYTES} are accepted")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_HEAD_FILE_BYTES + 1)  # bounded even if the file grows after the check
        if len(raw) > MAX_HEAD_FILE_BYTES:
            raise RecipeError(f"steer: head-set file {path} is over {MAX_HEAD_FILE_BYTES} bytes")
        return json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise RecipeError(f"steer: cannot read head-set file {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, JSON nested past the parser's stack
        raise RecipeError(f"steer: head-set file {path} is not valid UTF-8 JSON: {str(exc)[:200] or type(exc).__name__}") from None


def parse_heads(heads, num_layers: int, num_heads: int, model_key: str | None = None) -> dict:
    """``{layer: sorted heads}`` from any accepted form; RecipeError naming the valid ranges."""
    if isinstance(heads, str):
        if heads == "all":
            return {layer: list(range(num_heads)) for layer in range(num_layers)}
        if heads == "auto":
            path = auto_head_path(model_key)
            if not path.exists():
                raise RecipeError(f"steer: heads='auto' needs a profiled head set for this model and none is cached at {path}; "
                                  "create one with `graphwright steer profile --task json` or "
                                  "graphwright.steer.profile.profile_heads(cm, task)")
            heads = str(path)
        data = _read_head_file(heads)
        heads = data.get("heads", data) if isinstance(data, dict) else data
    if isinstance(heads, (list, tuple)):  # pastalib's list form: whole layers
        bad = [x for x in heads if isinstance(x, bool) or not isinstance(x, int)]
        if bad:
            raise RecipeError(f"steer: heads as a list names whole layers, so each item must be a layer index; got {bad[0]!r} "
                              f"in heads={list(heads)!r:.80} (valid layers are 0..{num_layers - 1}; for single heads give {{layer: [heads]}})")
        sel = parse_layer_heads("steer", num_layers, num_heads, layers=heads)
    else:
        sel = parse_layer_heads("steer", num_layers, num_heads, heads=heads,
                                heads_form="{layer: [heads]}, a list of layers, a JSON path, 'all' or 'auto'")
    return {layer: list(range(num_heads)) if hs is None else hs for layer, hs in sel.items()}


@register_pass
class Steer(Pass):
    name = "steer"
    needs = frozenset({"attention"})
    produces = frozenset({"key_bias"})
    excludes = {"head_split": "its coefficients are per query head of the layer's one attention node, and a per-head "
                              "window split that node"}
    stage = 90
    examples = {"exact": "steer(heads={0: [0, 1]}, alpha=1.0)", "lossy": "steer(heads={0: [0, 1]}, alpha=0.01)",
                "models": ("tiny-llama", "tiny-qwen2", "tiny-gemma3")}
    exact = False
    args = (
        Arg("alpha", float, 0.01, "scale of non-emphasized prompt attention (1 = no change)", min=1e-9,
            tune=Tunable("float", 1e-3, 1.0, log=True)),
        Arg("heads", (Mapping, list, tuple, str), None, "{layer: [heads]}, [layers], a JSON head-set path, 'all' or 'auto'",
            required=True),
        Arg("mode", str, "exclude", "exclude: scale non-emphasized columns; include: the paper's include mode",
            choices=("exclude", "include")),
    )

    def layer_set(self, info) -> set | None:
        """The steered layers when the head set is written out; None (all) for a file, 'all' or 'auto'."""
        if isinstance(self.heads, Mapping):
            return {int(k) for k in self.heads if str(k).lstrip("-").isdigit()}
        if isinstance(self.heads, (list, tuple)):
            return {int(x) for x in self.heads if isinstance(x, int) and not isinstance(x, bool)}
        return None
    doc = "PASTA attention steering: emphasize user spans in selected heads via a per-key bias."

    def is_identity(self) -> bool:
        return self.alpha == 1.0

    def applies_to(self, sg) -> str | None:
        if not steerable_nodes(sg):
            return "the graph has no attention nodes with a key_bias input to steer"
        if any(x.name == STEER_INPUT for x in getattr(sg, "extra_inputs", [])):
            return "the graph is already steered (apply steer once)"
        return None

    def run(self, sg, ctx: PassContext):
        from ..steer.heads import model_key

        info = sg.info
        heads = parse_heads(self.heads, info.num_layers, info.num_heads, model_key(sg))
        by_layer = {schema.layer_of(n): n for n in steerable_nodes(sg)}
        missing = [layer for layer in heads if layer not in by_layer]
        if missing:
            raise RecipeError(f"steer: layer(s) {missing} have no attention node with a key_bias input to steer "
                              f"(steerable layers: {sorted(k for k in by_layer if k is not None)})")
        gm, graph = sg.gm, sg.gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        with graph.inserting_after(placeholders[-1]):
            weights = graph.placeholder(STEER_INPUT, default_value=None)
        log_alpha = math.log(self.alpha)
        per_layer = {}
        for layer, hs in heads.items():
            node = by_layer[layer]
            if schema.get(node, "key_bias") is not None:
                raise RecipeError(f"steer: layer {layer}'s attention already has a key bias from another pass")
            coef = torch.zeros(info.num_heads, dtype=torch.float32)
            coef[hs] = log_alpha
            buf = f"steer_coef_{layer}"
            gm.register_buffer(buf, coef.to(_device(gm)))
            with graph.inserting_before(node):
                c = graph.get_attr(buf)
                bias = graph.call_function(steer_key_bias, (weights, schema.get(node, "k_pos"), c))
            bias.meta["graphwright"] = {"op": "steer_key_bias", "layer": layer, "module": node.meta.get("graphwright", {}).get("module"),
                                        "variant": "steered"}
            schema.set(node, "key_bias", bias)
            meta = node.meta.setdefault("graphwright", {})
            old = meta.get("variant")
            meta["variant"] = "steered" if old in (None, "", "dense") else f"{old}+steered"
            per_layer[layer] = {"heads": list(hs)}
        graph.lint()
        gm.recompile()
        sg.extra_inputs = [*sg.extra_inputs, ExtraInput(STEER_INPUT, "steer", "PASTA weights [B, P]: multiples of log(alpha) per prompt position",
                                                         {"mode": self.mode, "alpha": self.alpha})]
        sg.notes["steer"] = {
            "per_layer": per_layer,
            "counts": {"layers_steered": len(per_layer), "heads_steered": sum(len(v) for v in heads.values()),
                       "heads_total": info.num_layers * info.num_heads},
            "settings": {"alpha": self.alpha, "mode": self.mode, "log_alpha": log_alpha,
                         "heads_source": self.heads if isinstance(self.heads, str) else "explicit", "input": STEER_INPUT},
        }
        return sg


def _device(gm) -> torch.device:
    for t in gm.parameters():
        return t.device
    return torch.device("cpu")
