"""KVzip (arXiv 2505.23416): question-agnostic eviction by context reconstruction, ``evict(score="kvzip")``.

``evict(score="kvzip", budget=0.25|N, layerwise=False, sinks=4, chunk=2048)`` (``passes/evict.py``'s
``DELEGATES`` runs this pass). After the prompt step (``cm.prefill(context)`` or a plain ``generate``), the
runtime (``runtime/kvzip_replay.py``) runs KVzip's replay passes through the compiled model itself: the
replay prompt "\\n\\nRepeat the previous context exactly." (later chunks: "\\n\\nRepeat the part of the
previous context exactly, starting with" + the previous chunk's last 8 tokens), the chat template's assistant
suffix and the context chunk (``chunk`` tokens, default 2,048, as kvpress ``KVzipPress``), a prompt step on a
copy of the context's cache whose outputs are each layer's replay queries and keys; the replay KV is dropped.
Each context KV pair scores the max over the replay queries and the g query heads of its softmax weight over
[sinks, chunk, replay] (``ops/scorers/kvzip.py``); the chat template's prefix (the tokens before the text that
is repeated, counted by the tokenizer as kvpress does) scores 0, the first ``sinks`` (4) are always kept. The
budget is global over layers and KV heads (``layerwise=False``, the paper's: the bottom int(n x (1 - f)) of all
L x Hk x n scores are pruned) or per layer (``layerwise=True``); in both, the heads of a layer keep different
counts. Each layer holds the packed per-layer cache (``packed_rewrite.py``'s layout: one [B, 1, N, D] buffer,
per-head positions [B, Hk, N]), so the bytes held are the pairs kept (kvpress masks pruned pairs and keeps
its dense tensors). Decode appends.

Cost: the replay is a second prompt step over the context plus ~20 tokens, on a cache of the context (the
packed layout's attention over the cache reads Hk x the slots), and every layer's replay attention is scored in
fp32. The paper (and kvpress's warning) say 2-3x a plain prefill; measured here on SmolLM2-135M, a 996-token
context, one thread: 7.0x (21.8 s vs 3.1 s CPU, loaded machine; README). Decode costs what any packed cache costs.

The replay prompt needs the tokenizer (``gw.compile(..., tokenizer=...)``; a model loaded by name brings its
own). Without one, a byte-level model (vocabulary 256, graphwright's tiny models) uses the UTF-8 bytes of the
prompts; any other model is refused. Exact setting: a fraction budget >= 1.0 (no replay, nothing pruned).
Latent layers (``lowrank_kv`` first: one latent row c_k|c_v per token serves every KV head) keep their dense
latent cache and equal per-head positions; the replay scores their keys rebuilt from the latents
(``graphwright.latent_keys``) per KV head as above, then pools them to one score per token by the max over
heads (``ops/scorers/kvzip.pool_latent``: KVzip's own max over a head's queries, extended to every head
reading the row; under a threshold it keeps the union of the heads' sets, the rule of the other scorers on
latent layers), and the budget counts a latent token as one unit (as one head's pair elsewhere): the
dropped rows leave the latent cache, so its bytes shrink. Refused: the ``compiled`` backend (the replay runs over
the step graph's own cache), emphasis (steering's spans index the prompt, the replay step extends past it).
ONNX export writes the replay step as a second graph (``codegen/onnx/kvzip_export.py``; ``graphwright.load``
runs it, ``runtime/kvzip_onnx.py``), not for latent layers (their replay keys are rebuilt host-side). Invariants tested
(``tests/ops/test_kvzip_ops.py``, ``tests/ops/test_kvzip_model.py``): scores equal a loop oracle built from
Hugging Face's eager attention weights; the allocation equals a brute force (latent layers: a loop over heads,
max, then the brute force); budget 1.0 gives dense logits and tokens (with ``lowrank_kv``: its logits); the
cache holds exactly the kept pairs (latent: the kept rows).
"""

from __future__ import annotations

import torch

from ..capture.step_graph import StateSpec
from ..errors import RecipeError
from ..ops import schema
from ..ops.policy_adakv import PACKED_POSITIONS
from .base import MAX_TOKENS, Arg, PassContext
from .eviction_common import (LAYERS_ARG, EvictionPass, StateEditor, call, find_sites, frac_or_count, positions_name,
                              positions_node, retrieval_layers, site_kv_heads)
from .packed_rewrite import _pack_cache

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
PREV_TAIL = 8  # tokens of the previous chunk that start a later chunk's prompt (kvpress ``prev_postfix_size``)


def _encode(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        return list(text.encode("utf-8"))
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def replay_prompt(tokenizer, vocab_size: int) -> dict:
    """The replay's token ids, as kvpress ``KVzipPress`` builds them: ``first``/``later`` prompts, the assistant
    ``suffix`` of the chat template and ``prefix`` (tokens of the template before the user's text)."""
    if tokenizer is None and vocab_size != 256:
        raise RecipeError("evict(score='kvzip') needs the tokenizer to build its replay prompt ('Repeat the previous "
                          "context exactly.'): compile with tokenizer=... (a model loaded by name brings its own); "
                          f"only byte-level models (vocabulary 256) run without one, this one has {vocab_size}")
    if getattr(tokenizer, "chat_template", None):
        dummy = "dummy context"
        sep = "\n" + "#" * len(dummy)
        text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + sep}], add_generation_prompt=True,
                                             tokenize=False, enable_thinking=False)
        head, suffix = text.split(sep)
        prefix = head.split(dummy)[0]
        source = "chat template"
    else:
        prefix, suffix, source = "", "\n", "no chat template" if tokenizer is not None else "UTF-8 bytes"
    out = {"first": _encode(tokenizer, FIRST_PROMPT), "later": _encode(tokenizer, LATER_PROMPT),
           "suffix": _encode(tokenizer, suffix), "prefix": len(_encode(tokenizer, prefix)) if prefix else 0,
           "source": source}
    bad = [i for k in ("first", "later", "suffix") for i in out[k] if not 0 <= i < vocab_size]
    if bad:
        raise RecipeError(f"evict(score='kvzip'): the tokenizer gives ids {bad[:3]} outside the model's vocabulary "
                          f"[0, {vocab_size}); compile with the model's own tokenizer")
    return out


class KVzip(EvictionPass):
    """Run by ``evict(score='kvzip', ...)`` (not a registered pass of its own)."""

    name = "kvzip"
    exact = False
    args = (
        Arg("budget", (int, float), None, "pairs kept: a fraction of all scored pairs (float) or tokens per KV head "
            "on average (int)", min=0, max=MAX_TOKENS),
        Arg("layerwise", bool, False, "the same budget per layer (default: one budget over all layers and heads)"),
        Arg("sinks", int, 4, "first positions always kept", min=0, max=MAX_TOKENS),
        Arg("chunk", int, 2048, "context tokens replayed per replay pass", min=1, max=MAX_TOKENS),
        LAYERS_ARG,
    )

    def __init__(self, **values):
        super().__init__(**values)
        if self.budget is None or isinstance(self.budget, bool) or self.budget <= 0:
            raise RecipeError(f"evict(score='kvzip'): budget={self.budget!r} must be > 0 (a float fraction of the "
                              "scored pairs or int tokens per KV head)")
        self.budget_n, self.budget_f = frac_or_count(self.budget)

    def is_identity(self) -> bool:
        return isinstance(self.budget, float) and self.budget >= 1.0

    def applies_to(self, sg) -> str | None:
        why = super().applies_to(sg)
        if why:
            return why
        if retrieval_layers(sg) is not None:
            return "evict(score='kvzip') after duo is not implemented (the replay scores every KV head's context)"
        return None

    def run(self, sg, ctx: PassContext):
        why = self.applies_to(sg)
        if why:
            raise RecipeError(f"evict: {why}")
        prompt = replay_prompt(ctx.tokenizer, sg.info.vocab_size)
        sites = find_sites(sg, self.target_layers(sg))
        ed = StateEditor(sg)
        graph = sg.gm.graph
        pos = positions_node(sg)
        layers = []
        latent = []
        for site in sites:
            hk = site_kv_heads(sg, ed, site)
            kp_in = ed.add(StateSpec(positions_name(site.layer), "positions", (-1, hk, 0), torch.long, seq_dim=2,
                                     layer=site.layer))
            if site.latent:  # one shared latent row per token: dense c_k/c_v, equal per-head positions
                with graph.inserting_before(site.attn):
                    per_head = call(graph, torch.ops.aten.expand.default,
                                    call(graph, torch.ops.aten.unsqueeze.default, pos, 1), [-1, hk, -1])
                    kp_all = call(graph, torch.ops.aten.cat.default, [kp_in, per_head], 2)
                    kp_att = call(graph, torch.ops.aten.select.int, kp_all, 1, 0)  # [B, S]: the rows' positions
                schema.set(site.attn, "k_pos", kp_att)
                ed.set_output(site.k_name, site.k_cat)
                ed.set_output(site.v_name, site.v_cat)
                ed.set_output(positions_name(site.layer), kp_all)
                meta = site.attn.meta.setdefault("graphwright", {})
                meta["variant"] = f"{meta['variant']}+kvzip" if meta.get("variant") else "kvzip"
                layers.append([site.layer, site.k_name, site.v_name, positions_name(site.layer)])
                latent.append(site.layer)
                continue
            with graph.inserting_before(site.attn):
                kp_all = call(graph, torch.ops.aten.cat.default, [kp_in, call(graph, PACKED_POSITIONS, pos, hk)], 2)
                per_head = call(graph, torch.ops.aten.expand.default,
                                call(graph, torch.ops.aten.unsqueeze.default, pos, 1), [-1, hk, -1])
                kp_att = call(graph, torch.ops.aten.cat.default, [kp_in, per_head], 2)
            schema.set(site.attn, "k", _pack_cache(graph, ed, site, site.k_cat, site.k_name, hk))
            schema.set(site.attn, "v", _pack_cache(graph, ed, site, site.v_cat, site.v_name, hk))
            schema.set(site.attn, "k_pos", kp_att)
            ed.set_output(site.k_name, site.k_cat)
            ed.set_output(site.v_name, site.v_cat)
            ed.set_output(positions_name(site.layer), kp_all)
            site.attn.meta.setdefault("graphwright", {})["variant"] = "kvzip"
            layers.append([site.layer, site.k_name, site.v_name, positions_name(site.layer)])
        ed.finish()
        settings = {"budget": self.budget, "budget_n": self.budget_n, "budget_f": self.budget_f,
                    "layerwise": self.layerwise, "sinks": self.sinks, "chunk": self.chunk}
        sg.notes["kvzip"] = {"settings": settings, "layers": layers, "replay": prompt, "latent": latent,
                             "head_dim": sg.info.head_dim}
        sg.notes["evict"] = {
            "per_layer": {row[0]: {"budget": self.budget} for row in layers},
            "counts": {"layers_evicted": len(layers)},
            "settings": {"score": "kvzip", **settings, "scorer": "kvzip", "paper": "arXiv 2505.23416",
                         "when": "prefill", "packed": len(layers) > len(latent),
                         "rule_text": "KVzip: max softmax weight of context-replay queries; bottom-k pruned "
                                      + ("per layer" if self.layerwise else "over all layers and heads")
                                      + ("; latent layers: max over heads, one unit per token" if latent else ""),
                         **({"latent_layers": len(latent)} if latent else {})},
        }
        return sg
