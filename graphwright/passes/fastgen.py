"""``fastgen``: adaptive per-head KV policies profiled at the end of prefill.

Technique (arXiv 2310.01801, "Model Tells You What to Discard: Adaptive KV Cache Compression for
LLMs"; reproduction AnswerDotAI/cold-compress ``KVCacheHybrid``). Once per prompt, every head is
profiled on the prompt's attention A and given the cheapest policy of the ladder
special -> +punct -> +frequent -> +local -> full whose recovered attention mass reaches ``recovery``
(T). At every later step each head keeps: special tokens, punctuation (from "punct" on), the top
r_f * L tokens by cumulative attention ("frequent"), the r_l * L most recent tokens ("local"), or
everything ("full"), with L the current length. Defaults r_l = r_f = 0.3, T = 0.95.

Setting here (see ``ops/fastgen_ref.py``):

* GQA: one policy per (batch row, KV head); masses and cumulative scores are averaged over the
  g query heads of a KV head (the paper is MHA).
* Recovered mass = mean over the prompt's query rows of the attention a policy keeps, where a
  query always sees itself (as it does at decode). ``criterion="l1"`` uses the paper's literal
  |A - A_C|_1 <= 1 - T, i.e. m >= (1 + T) / 2. ``recovery >= 1`` is full on every head.
* Special ids = ``tokenizer.all_special_ids``; punctuation = ids whose decoded text is only
  punctuation/whitespace. Both come from the tokenizer at compile time as a [vocab] int8 table
  constant in the graph (no tokenizer: both sets empty).
* State per layer: k, v, positions, fp32 cumulative scores, int8 token classes [B, Hk, S_l] and the
  policy id [B, Hk, 1] (empty before prefill: that is how the op knows to profile).
* ``local``/``frequent`` are fractions of the length (float) or fixed counts (int);
  ``force`` gives every head one policy (ablations, tests).

``layers=[...]`` evicts only those layers. On the torch backend decode steps evict on slots
(``codegen/torch/eviction_slots.py``: ``fastgen_slots``, same kept sets as the reference).

Exact setting: ``recovery=1.0`` (or ``force="full"``). Invariants tested
(``tests/passes/test_fastgen.py``): identity at recovery 1.0 (tiny Llama and Qwen2, batch 2
left-padded, 32 tokens); first token equals dense; the recovered mass equals an independent
computation; forcing ``local`` on every head equals sliding-window attention; a ``full`` head
never evicts; budgets hold over 500 steps.
"""

from __future__ import annotations

import string
import unicodedata

import torch

from ..ops.eviction_ref import LADDER, PUNCT, SPECIAL
from ..ops.policy_fastgen import FASTGEN_POLICY
from .base import MAX_TOKENS, Arg, PassContext, register_pass
from .eviction_common import (HEADS_ARG, LAYERS_ARG, EvictionPass, call, evict_pass_build, find_sites, frac_or_count, latent_settings,
                              refuse_adaptive_heads, rewrite_layers)

TABLE = "fastgen_token_class"


def _is_punct(text: str) -> bool:
    return bool(text) and all(ch.isspace() or ch in string.punctuation or unicodedata.category(ch).startswith("P")
                              for ch in text)


def token_class_table(tokenizer, vocab_size: int) -> torch.Tensor:
    """[vocab] int8: 1 = special id, 2 = punctuation/whitespace-only token, 0 = other."""
    table = torch.zeros(vocab_size, dtype=torch.int8)
    if tokenizer is None:
        return table
    n = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    punct = [i for i, t in enumerate(texts) if _is_punct(t)]
    table[punct] = PUNCT
    special = [i for i in getattr(tokenizer, "all_special_ids", []) if 0 <= i < vocab_size]
    table[special] = SPECIAL
    return table


@register_pass
class FastGen(EvictionPass):
    name = "fastgen"
    examples = {"exact": "fastgen(recovery=1.0)", "lossy": "fastgen(recovery=0.9)",
                "models": ("tiny-llama", "tiny-qwen2", "tiny-gemma3"), "first_token_dense": True}
    exact = False
    doc = "FastGen: profile each KV head after prefill; keep special/punct/frequent/local/full per head."
    args = (
        Arg("recovery", float, 0.95, "attention mass a head's policy must recover (1.0 = full everywhere)", min=0.0, max=1.0),
        Arg("local", (int, float), 0.3, "local window: fraction of the length (float) or token count (int)", min=0, max=MAX_TOKENS),
        Arg("frequent", (int, float), 0.3, "heavy hitters: fraction of the length (float) or token count (int)", min=0, max=MAX_TOKENS),
        Arg("criterion", str, "mass", "recovered-mass test", choices=("mass", "l1")),
        Arg("force", str, None, "give every head this policy instead of profiling", choices=LADDER),
        HEADS_ARG,
        LAYERS_ARG,
    )

    def __init__(self, **values):
        super().__init__(**values)
        refuse_adaptive_heads("fastgen", self.heads)

    def is_identity(self) -> bool:
        return self.force == "full" or (self.force is None and self.recovery >= 1.0)

    def run(self, sg, ctx: PassContext):
        ln, lf = frac_or_count(self.local)
        fn, ff = frac_or_count(self.frequent)
        chosen = self.layer_set(sg.info)
        graph = sg.gm.graph
        table = token_class_table(ctx.tokenizer, sg.info.vocab_size)
        sg.gm.register_buffer(TABLE, table)
        ids = next(n for n in graph.nodes if n.op == "placeholder")
        first_attn = find_sites(sg, chosen)[0].attn
        with graph.inserting_before(first_attn):
            # classes of this step's tokens, looked up once for all layers: [B, T] int8
            new_class = call(graph, torch.ops.aten.index.Tensor, graph.get_attr(TABLE), [ids])
        params = {"recovery": float(self.recovery), "local_n": ln, "local_f": lf, "frequent_n": fn, "frequent_f": ff,
                  "criterion": self.criterion, "force": self.force or ""}
        layers = rewrite_layers(sg, "fastgen", evict_pass_build(FASTGEN_POLICY, params, new_class=new_class), chosen)
        per_layer = {layer: {} for layer in layers}
        calib = {}  # KV heads per policy on the calibration text (what the report can say before any prompt)
        for layer, pols in calibration_policies(sg, ctx).items():
            per_layer[layer]["calib_policies"] = ",".join(LADDER[p] for p in pols)
            for p in pols:
                calib[f"calib_{LADDER[p]}"] = calib.get(f"calib_{LADDER[p]}", 0) + 1
        sg.notes["fastgen"] = {
            "per_layer": per_layer,
            "counts": {"layers_evicted": len(layers), "special_ids": int((table == SPECIAL).sum()),
                       "punct_ids": int((table == PUNCT).sum()), **calib},
            "settings": {**self.values, "ladder": list(LADDER), **latent_settings(sg)},
        }
        return sg


@torch.inference_mode()
def calibration_policies(sg, ctx) -> dict:
    """Per layer, the policy each KV head picks on the calibration text (for the report); {} without one."""
    if ctx is None or ctx.calibration_ids is None:
        return {}
    ids = ctx.calibration_ids[:1]
    T = ids.shape[1]
    pos = torch.arange(T, device=ids.device)[None]
    run = ctx.lower(sg.gm) if ctx.lower is not None else sg.gm  # the chosen backend, else the ops' own kernels
    out = run(ids, pos, torch.tensor([T - 1], device=ids.device), *sg.init_state(1, ids.device))
    return {s.layer: out[1 + i][0, :, 0].tolist() for i, s in enumerate(sg.state) if s.name.startswith("fastgen_policy")}
