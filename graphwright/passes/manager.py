"""The pass manager: a recipe is a *set* of techniques; the compiler orders them.

Every pass declares, on its class, what it needs of the graph and what it does to it, as *facts*
that hold per layer (``FACTS`` below says what each means):

* ``needs``    -- facts that must hold on the pass's layers when it runs;
* ``produces`` -- facts it establishes there;
* ``removes``  -- facts it ends there;
* ``forbids``  -- facts that must not hold yet when it runs (it must come before whoever produces them);
* ``excludes`` -- ``{fact: reason}``: it cannot share a layer with a pass producing that fact, in
  either order (the reason says why);
* ``also_on``  -- ``{fact: reason}``: it also applies to a layer holding that fact in place of its
  ``needs``, after the pass producing it, and neither pass's ``excludes`` holds between the two
  (``snapkv``, ``h2o``, ``evict`` on ``duo``'s retrieval part: the fact ``retrieval_part``);

and ``layer_set(info)`` says which layers it touches (``None``: all, or none in particular for a
model-level pass). From those, for every two passes whose layers overlap:

* ``A`` before ``B`` when ``B`` needs (or is ``also_on``) what ``A`` produces, ``B`` removes what ``A``
  needs, or ``A`` forbids what ``B`` produces;
* a ``RecipeError`` naming both and the reason when each must precede the other, or one excludes
  what the other produces.

The order is a topological sort whose ties are broken by the passes' declared ``stage`` and then
by name and arguments, so every permutation of a recipe yields the same order and the same
graph. Finally the facts are simulated layer by layer over the ordered recipe from what the
captured graph offers (``initial_facts``), so a pass whose need no earlier pass and no model
provides is refused, naming the need -- all before any graph surgery. The decisions are kept as
plain data (``plan.to_dict()``, shown by ``cm.report()``).

Invariant tested (``tests/passes/test_manager.py``, ``test_registry_suite.py``): every
permutation of a recipe gives the same order and identical logits; conflicting pairs raise
``RecipeError`` naming both passes before any pass runs.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from ..errors import RecipeError
from ..ops import schema
from ..ops.graph_match import cache_concat, is_cat

FACTS = {
    "attention": "the layer's attention is a graphwright attention node whose key bias / mask arguments can be set",
    "dense_attention": "the layer's attention is the captured graphwright.attention op (not latent, not block-sparse)",
    "dense_cache": "keys/values are cat([cache, new]) of a dense cache of rotated keys, as captured",
    "shared_positions": "the layer reads the model-wide [B, S] key positions (no per-head cache yet)",
    "rotary": "the layer's keys are rotated by a rotary table (RoPE)",
    "native_window": "the model itself gives the layer a sliding window",
    "moe_experts": "the model has MoE expert blocks as captured",
    "fused_moe": "MoE routing and experts are one fused node",
    "window": "a sliding window (with sinks) was added to the layer's attention",
    "head_split": "the layer's attention was split into several nodes over subsets of heads",
    "latent_cache": "the layer caches low-rank latents instead of keys and values",
    "block_sparse": "the layer attends to top-k key blocks selected from page summaries",
    "evicted": "an eviction policy decides which tokens the layer's cache keeps",
    "key_bias": "a pre-softmax key bias (steering) is added to the layer's attention",
    "channel_pruned": "old keys are stored with a subset of their channels (ThinK); attention reads them re-expanded",
    "prompt_selection": "the prompt is filtered by an early layer before the model runs",
    "retrieval_part": "duo split the layer: its retrieval heads are an attention node of their own over a dense "
                      "cache and the shared key positions (an eviction pass may evict it: snapkv, h2o, evict)",
}


@dataclass
class Plan:
    """The ordered passes and why: plain data for reports."""

    passes: list
    written: list  # the recipe's order as given
    reasons: list = field(default_factory=list)  # "a before b: ..." for every constraint used

    def to_dict(self) -> dict:
        return {"order": [p.name for p in self.passes], "written": self.written, "constraints": self.reasons}


def _layers(p, info) -> frozenset | None:
    got = p.layer_set(info)
    return None if got is None else frozenset(got)


def _overlap(a, b) -> bool:
    return a is None or b is None or bool(a & b)


def _constraint(a, b) -> str | None:
    """Why ``a`` must run before ``b`` (None when it need not)."""
    if a.produces & b.needs:
        return f"{b.name} needs {sorted(a.produces & b.needs)}, which {a.name} provides"
    if a.produces & set(b.also_on):
        return f"{b.name} acts on {sorted(a.produces & set(b.also_on))}, which {a.name} provides"
    if a.needs & b.removes and not b.produces & set(a.also_on):  # b leaves a a part of the layer that has them
        return f"{a.name} needs {sorted(a.needs & b.removes)}, which {b.name} removes"
    if a.forbids & b.produces:
        return f"{a.name} must see the layer before {sorted(a.forbids & b.produces)} is added by {b.name}"
    return None


def _exclusion(a, b) -> str | None:
    if a.produces & set(b.also_on) or b.produces & set(a.also_on):
        return None  # one acts on the part of the layer the other leaves to it (``also_on``)
    for x, y in ((a, b), (b, a)):
        for fact, reason in x.excludes.items():
            if fact in y.produces:
                return f"{x.name} and {y.name} cannot share a layer: {reason}"
    return None


def _sort_key(p) -> tuple:
    return (p.stage, p.name, repr(sorted(p.values.items(), key=lambda kv: kv[0])))


def order_passes(passes: list, sg) -> Plan:
    """Order ``passes`` (Pass objects) for ``sg``; RecipeError for conflicts, before any surgery."""
    info = sg.info
    written = [p.name for p in passes]
    layers = [_layers(p, info) for p in passes]
    n = len(passes)
    after = {i: set() for i in range(n)}  # i -> passes that must follow i
    indegree = [0] * n
    reasons = []
    for i in range(n):
        for j in range(i + 1, n):
            if not _overlap(layers[i], layers[j]):
                continue
            a, b = sorted((passes[i], passes[j]), key=_sort_key)  # name the pair the same way in any written order
            if a.name == b.name:
                raise RecipeError(f"{a.name} is in the recipe twice{_where(layers[i], layers[j], passes[i], passes[j])}: a pass applies once "
                                  "to a layer (and is already there after the first)")
            excl = _exclusion(a, b)
            if excl:
                where = _where(layers[i], layers[j], passes[i], passes[j])
                raise RecipeError(f"{a.name} + {b.name}: {excl}{where}")
            ab, ba = _constraint(passes[i], passes[j]), _constraint(passes[j], passes[i])
            if ab and ba:
                raise RecipeError(f"{a.name} + {b.name}: each must run before the other ({ab}; {ba})")
            for (x, y, why) in ((i, j, ab), (j, i, ba)):
                if why and y not in after[x]:
                    after[x].add(y)
                    indegree[y] += 1
                    reasons.append((x, f"{passes[x].name} before {passes[y].name}: {why}"))
    ready = [(_sort_key(passes[i]), i) for i in range(n) if indegree[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for j in sorted(after[i]):
            indegree[j] -= 1
            if indegree[j] == 0:
                heapq.heappush(ready, (_sort_key(passes[j]), j))
    if len(order) != n:  # cannot happen with pairwise checks on a set, but never loop forever
        stuck = [passes[i].name for i in range(n) if i not in order]
        raise RecipeError(f"passes {stuck} constrain each other in a cycle; they cannot be combined")
    ordered = [passes[i] for i in order]
    _simulate(ordered, [layers[i] for i in order], sg)
    rank = {i: k for k, i in enumerate(order)}  # reasons listed in the order their first pass runs
    return Plan(ordered, written, [text for _, text in sorted(reasons, key=lambda r: (rank[r[0]], r[1]))])


def _where(a, b, pa, pb) -> str:
    if a is None and b is None:
        return " (both apply to every layer)"
    common = sorted((a or b) if (a is None or b is None) else (a & b))
    # a pass with no layers/heads argument acts on every layer: no choice of layers can separate the two
    fixed = [p.name for p, s in ((pa, a), (pb, b)) if s is None and not {"layers", "heads"} & {x.name for x in p.args}]
    if fixed:
        return f" (both apply to layer(s) {common}, and {fixed[0]} acts on every layer, so they cannot be combined)"
    return f" (both apply to layer(s) {common}; give them disjoint layers=[...] to combine them)"


def initial_facts(sg) -> tuple[dict, set]:
    """({layer: facts}, model-level facts) that the captured graph offers."""
    per_layer = {}
    has_rotary = any(n.op == "get_attr" and str(n.target).endswith("inv_freq") for n in sg.gm.graph.nodes)
    for node in schema.attention_nodes(sg.gm):
        layer = schema.layer_of(node)
        facts = per_layer.setdefault(layer, set())
        facts.update({"attention"})
        if node.target is schema.ATTENTION:
            facts.add("dense_attention")
            if cache_concat(schema.get(node, "k")):
                facts.add("dense_cache")
            if is_cat(schema.get(node, "k_pos")):
                facts.add("shared_positions")
            if schema.get(node, "window"):
                facts.add("native_window")
        if has_rotary:
            facts.add("rotary")
    model = {"moe_experts"} if sg.info.is_moe else set()
    return per_layer, model


def _simulate(ordered, layer_sets, sg) -> None:
    per_layer, model = initial_facts(sg)
    all_layers = sorted(per_layer)
    for p, ls in zip(ordered, layer_sets):
        targets = all_layers if ls is None else sorted(ls)
        if p.model_level:
            missing = p.needs - model
            if missing:
                raise RecipeError(f"{p.name} needs {sorted(missing)} ({'; '.join(FACTS[m] for m in sorted(missing))}); "
                                  f"{sg.info.architecture} has none")
            model = (model - p.removes) | p.produces
            continue
        for layer in targets:
            if layer not in per_layer:
                continue  # not an attention layer of this model: the pass's own argument check names the range
            facts = per_layer[layer]
            missing = p.needs - facts
            if missing and not facts & set(p.also_on):
                what = "; ".join(FACTS.get(m, m) for m in sorted(missing))
                raise RecipeError(f"{p.name} cannot apply to layer {layer}: it needs {sorted(missing)} ({what}), "
                                  "which neither the model nor an earlier pass of the recipe provides")
            per_layer[layer] = (facts - p.removes) | p.produces

