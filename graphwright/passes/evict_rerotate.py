"""``evict(..., rerotate=True)``: after prefill eviction the kept keys are re-rotated to positions 0..n-1.

Technique: kvpress ``KeyRerotationPress`` over any scorer (``FinchPress``'s default ``rerotate_keys=True``;
Finch: doi 10.1162/tacl_a_00716). The op is ``graphwright.rerotate_keys`` (``ops/rerotate.py``). The pass puts it
after every layer's eviction op, on the op's kept keys and positions. The state then holds keys rotated at
0..n-1 with positions 0..n-1. ``CompiledModel`` gives the runtime the re-rotated layers
(``notes["rerotate"]``), and the runtime continues later tokens at n, n+1, ... (``runtime/rerotate.py``): the
queries and keys of the question (context reuse) and of generated tokens.

There must be one next position per row, so every head of every layer must keep the same count n. Refused, with
the reason:
* a schedule other than ``when='prefill'``: re-rotating mid-generation would move positions under the tokens
  already generated (kvpress re-rotates once, at prefill);
* ``rule='pyramid'`` (layer budgets differ), ``rule='adaptive'`` (head budgets differ), the delegated policies
  (kvzip: one budget over layers and heads; keyformer and scissorhands evict at decode), ``block=``;
* a subset of layers (``layers=``), ``duo`` (its streaming heads keep their positions), latent (``lowrank_kv``)
  layers, models with native sliding-window layers, and layers without a rotary table.
A count that still differs per head at run time (ChunkKV's whole chunks with ``chunk_heads='each'``) is refused
by the runtime when it reads n. ONNX export and the ``compiled`` backend refuse the option (their runtimes do
not continue positions from n).

Exact setting: budget >= length (nothing evicted) gives positions 0..L-1, a rotation by 0 and the dense logits bit
for bit. Invariants tested (``tests/passes/test_evict_rerotate.py``):
* a loop oracle on the HF model (evict the kept sets, re-rotate with HF's rotary table, decode at n, n+1, ...)
  gives the same tokens and logits within 1e-4, on generate, a reusable context and ``score_stream``;
* the refusals above.
"""

from __future__ import annotations

import operator

from ..errors import RecipeError
from ..ops import schema
from ..ops.rerotate import REROTATE_KEYS
from .eviction_common import call, find_sites, positions_name, retrieval_layers, tag

WHY = "kept keys are re-rotated to positions 0..n-1 and later tokens continue at n, one n per row"


def check_rerotate(ev, delegated: bool) -> None:
    """``RecipeError`` for ``evict`` arguments (``ev``: the pass being built) that give heads or layers different kept
    counts, or evict after prefill."""
    v, score = ev.values, ev.values["score"]
    if not v.get("rerotate"):
        return
    if delegated:
        raise RecipeError(f"evict: rerotate=True is refused with score={score!r}: that policy runs its own pass "
                          "(kvzip spreads one budget over layers and heads; keyformer and scissorhands evict at every "
                          f"decode step), and {WHY}; use a scorer of the generic op (e.g. 'snapkv', 'finch', 'knorm')")
    from ..ops.scorers import CHUNKKV, SCORERS
    from .evict import parse_when

    mode = parse_when(v.get("when"), v.get("every"))[0] or SCORERS["snapkv" if score == CHUNKKV else score].default_when
    why = []
    if v.get("rule", "fixed") != "fixed":
        why.append(f"rule={v['rule']!r} gives " + ("layers" if v["rule"] == "pyramid" else "heads") + " different budgets")
    if v.get("block") is not None:
        why.append("block= evicts after every prompt block")
    elif mode != "prefill":
        why.append(f"when={mode!r} evicts after the prompt step too (kvpress re-rotates once, at prefill)")
    if v.get("layers") is not None:
        why.append("layers= leaves other layers at their original positions (every layer must continue from the same n)")
    if why:
        raise RecipeError(f"evict: rerotate=True ({WHY}) is refused: " + "; ".join(why) +
                          ". Use when='prefill', rule='fixed' on every layer, or leave rerotate out")


def rerotate_refusal(sg, layers) -> str | None:
    """Why the graph's layers cannot be re-rotated (duo, latent layers, sliding windows, no rotary table), or None."""
    from .streaming import find_rotary

    if retrieval_layers(sg) is not None:
        return f"rerotate=True after duo is refused: duo's streaming heads keep their positions, and {WHY}"
    if any(sg.info.windows or ()):
        return ("rerotate=True is refused on models with native sliding-window layers: their windows are cut by "
                f"position, and {WHY}; not implemented")
    sites = find_sites(sg, layers)
    if isinstance(sites, str):
        return sites
    if len(sites) != sg.info.num_layers:
        return f"rerotate=True needs every layer evicted ({len(sites)} of {sg.info.num_layers} are): {WHY}"
    if any(s.latent for s in sites):
        return ("rerotate=True is refused on latent (lowrank_kv) layers: not implemented (their keys are rebuilt "
                "from the latents at their positions)")
    rot = find_rotary(sg.gm, [s.attn for s in sites])
    return f"rerotate=True: {rot}" if isinstance(rot, str) else None


def add_rerotation(sg, site, out: dict) -> dict:
    """Insert ``graphwright.rerotate_keys`` on one layer's evicted keys and positions; returns the new outputs."""
    from .streaming import find_rotary

    graph = sg.gm.graph
    inv, _ = find_rotary(sg.gm, site.attn)
    k, k_pos = out[site.k_name], out[positions_name(site.layer)]
    with graph.inserting_after(k_pos):
        node = schema.call(graph, REROTATE_KEYS, k=k, k_pos=k_pos, inv_freq=inv)
    with graph.inserting_after(node):
        k_new = call(graph, operator.getitem, node, 0)
    with graph.inserting_after(k_new):
        pos_new = call(graph, operator.getitem, node, 1)
    tag(node, site, "kv_rerotate", "rerotate")
    return {**out, site.k_name: k_new, positions_name(site.layer): pos_new}


def note(sg, layers) -> None:
    sg.notes["rerotate"] = {"layers": sorted(layers), "technique": "kvpress KeyRerotationPress",
                            "rule_text": "kept keys re-rotated to positions 0..n-1 after prefill; later tokens at n, n+1, ..."}
