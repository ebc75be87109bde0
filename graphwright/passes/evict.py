"""``evict``: KV eviction as data -- a scorer, a schedule and a budget rule (issue 20 item 1).

``evict(score=..., when=..., budget=..., rule=..., sinks=..., window=..., pool=..., ...)`` inserts
the generic scored eviction op (``ops/policy_scored.py``) after every chosen layer's attention:

* ``score``: a scorer of ``ops/scorers`` (``snapkv``, ``h2o`` = cumulative attention, ``knorm``,
  ``tova``, ``keydiff``, ``expected_attention``, ``criticalkv`` = SnapKV re-weighted in two stages by
  ||v W_O||_1, arXiv 2502.03805, ``first``/``eps``, reading each layer's ``o_proj`` weight; ``lagkv``, arXiv
  2504.04704, ``lag``, after prefill only; ``qfilter``, arXiv 2503.02812, ``filters`` = a safetensors file or
  calibrated, ``passes/qfilter_calibrate.py``), ``finch`` (SnapKV whose window is the question, rows weighted by
  query position, doi 10.1162/tacl_a_00716: ``window`` = the question's token count, required; ``chunk=N`` is its
  per-chunk budget share; ``passes/evict_finch.py``) or ``chunkkv`` (SnapKV scores in chunks of 20;
  ``chunk=N`` wraps any scorer), or a name in ``DELEGATES`` (policies with their own op);
* ``when``: ``"prefill"`` (once after the prompt), ``"decode"`` (after prefill and every step),
  ``"every:N"`` or ``every=N`` (after prefill and at decode steps where the row's length is a
  multiple of N), ``"overflow"`` (when a head holds more than budget + ``slack``: back to budget);
  default: the scorer's own (TOVA and H2O every step, the others after prefill);
* ``budget``: tokens per KV head (int) or a fraction of the row's current length (float),
  sinks and window included; ``rule``: ``"fixed"``, ``"pyramid"`` (PyramidKV layer budgets,
  arXiv 2406.02069, ``beta``, the paper's 20) or ``"adaptive"`` (Ada-KV, arXiv 2407.11550, packed
  per-layer cache: once after prefill for the per-head prompt scorers, SnapKV through
  ``snapkv(heads="adaptive")``'s path; ``criticalkv`` runs CriticalAdaKV, kvpress ``CriticalAdaKVPress``'s
  rule: kvpress's Ada-KV split, then the two stages per head, ``ops/adakv_critical.py``; at every step for
  ``h2o`` and per-head ``tova`` with ``when="decode"``, ``ops/adakv_decode.py``, floor = 1 keeps the uniform sets)
  or ``"scores"`` (head-score shares, the rule of ``snapkv(heads="scores")`` over any per-head prompt scorer: the
  model's L*Hk*budget tokens spread over every (layer, KV head) by the head set's (score + ``share_eps``)^``gamma``,
  each head keeping its own top tokens by the scorer; same op and packed cache; gamma = 0 is ``"fixed"``);
* ``sinks`` (first positions always kept), ``window`` (recent tokens always kept; SnapKV's
  observation window), ``pool`` (GQA mean|max), ``kernel``/``smooth`` (SnapKV's 1-D pooling),
  ``chunk``/``chunk_heads`` (ChunkKV), ``chunk_reuse=L`` (ChunkKV's layer-wise index reuse: the
  first of every L evicted layers selects chunks, the next L-1 keep the same positions through
  ``evict_scored_reuse``; after prefill, head-summed chunks, fixed budgets only; 1 = today), ``n_future``/``eps`` (Expected Attention), ``slack``;
* ``block=N`` (KeyDiff's block-wise prefill, arXiv 2504.15364, ALGORITHMS-2 §6d): the pass records
  ``notes["prefill_chunk"] = N`` and ``CompiledModel``'s runtime runs the prompt as steps of N tokens
  (``runtime.generate.prompt_blocks``: cut from the prompt's end, the first block holds the
  remainder, since left padding aligns rows at their end; an ONNX export records it as
  ``graphwright.json["prefill_chunk"]`` and ``graphwright.load`` runs the same blocks, its export
  verification too); after each block every head evicts back to
  the budget (schedule ``block``), so a head never holds more than budget + N; decode appends.
  Prompt-query scorers (snapkv, expected_attention) and ``rule='adaptive'`` are refused with it.

Keys stay post-RoPE at their original positions by default: positions travel with the cache as per-head
``k_pos`` and attention masks by them. ``rerotate=True`` (default False; ``passes/evict_rerotate.py``, kvpress
``KeyRerotationPress``, ``FinchPress``'s default) re-rotates the kept keys to positions 0..n-1 after prefill
eviction and the runtime continues later tokens at n: ``when='prefill'``, ``rule='fixed'``, every layer
(otherwise refused with the reason; not exported to ONNX). StreamingLLM re-rotates by cache index at every step
(``streaming``).

Presets keep their own passes, ops and fast paths: ``snapkv(budget=B, window=w)`` is
``evict(score="snapkv", when="prefill", budget=B, window=w)`` and ``h2o(heavy=H, recent=R)``
(counts) is ``evict(score="h2o", when="decode", budget=H+R, window=R)``: same kept sets (tested).
A policy that has its own pass is one entry in the ``DELEGATES`` literal below (``a`` = this pass's
argument values -> that pass); the name joins the ``score`` choices and ``run`` delegates to it:
``evict(score="keyformer", budget=k, window=w)`` is ``keyformer(kv=k, recent=w / k)`` (arXiv
2403.09054) and ``evict(score="scissorhands", budget=B, window=r, sinks=s)`` is
``scissorhands(budget=B, recent=r, sinks=s)`` (arXiv 2305.17118); both run every decode step and
refuse the arguments they do not read (tested: same tokens and state shapes as the pass itself).

Refused with the reason: a scorer that needs the prompt's queries (SnapKV window, Expected
Attention statistics) on a schedule other than ``prefill``; arguments a scorer does not read;
``adaptive`` with a shared score (TOVA) after prefill, with the cumulative score other than
``when='decode'``, or with another scorer at decode; Expected Attention and CriticalKV on latent
(``lowrank_kv``) layers after ``duo``, CriticalKV on latent layers with value_path='reconstruct' or a value
bias (it reads the absorbed o_proj W_O'_h = W_O,h B_V,h^T with the latent rows c_v). On latent layers Expected
Attention runs ``evict_scored_rope_values``: per-head value norms of V = c_v B_V + b_V rebuilt from the shared
payload with the layer's value up-projection (its attention's ``v_up``, or the parameter ``lowrank_kv`` keeps
when B_V is absorbed into o_proj; ``evict_latent_values.py``).
After ``duo`` (``also_on = retrieval_part``): the op evicts the retrieval heads' cache (``rule='adaptive'``:
packed over the retrieval heads); refused there: the delegated scorers, ``rule='pyramid'``,
``chunk_reuse`` and ``block=`` (``tests/passes/test_duo_h2o.py``, ``test_duo_snapkv_adaptive.py``).
Exact setting: a fraction budget >= 1.0. Backends: ``reference``/``torch`` run the op; the
``compiled`` backend runs it eagerly after its compiled decode graph (``codegen/torch/static_fallback.py``;
``rule='adaptive'``'s packed cache stays refused there); ONNX export splits it to the runtime side like
every eviction op (``rule='adaptive'`` and ``chunk_reuse`` included).

Invariants tested (``tests/passes/test_evict_scorers.py``): identity at budget=1.0 on tiny Llama
and Qwen2 (logits and 32 greedy tokens); SnapKV/H2O equivalences; schedules; composition with
``lowrank_kv`` and ``steer``; refusals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import RecipeError
from ..ops.adakv_decode import DECODE_SCORERS, EVICT_ADAKV_DECODE
from ..ops.adakv_critical import describe
from ..ops.adakv_scored import EVICT_ADAKV_SCORED
from ..ops.policy_scored import SCORED_REUSE_POLICY, SCORED_ROPE_VALUES_POLICY, policy_for
from ..ops.scorers import CHUNKKV, SCORERS
from ..ops.scorers.lagkv import DEFAULT_LAG
from .base import MAX_TOKENS, Arg, Pass, PassContext, Tunable, register_pass
from .packed_rewrite import rewrite_packed
from .eviction_common import (
    LAYERS_ARG,
    EvictionPass,
    find_sites,
    frac_or_count,
    insert_policy,
    latent_settings,
    RETRIEVAL_PART,
    positions_name,
    retrieval_layers,
    rewrite_layers,
)
from .evict_finch import check_finch
from .evict_latent_values import absorbed_without_bias, latent_value_inputs, value_up
from .evict_rerotate import add_rerotation, check_rerotate, note as note_rerotate, rerotate_refusal
from .keyformer import Keyformer
from .scissorhands import Scissorhands
from .streaming import find_rotary

def o_proj_weight(attn):
    """The weight node [hidden, H*D] of the o_proj linear the attention output reaches, or None."""
    from .duo_permute import _o_proj
    from .match import linear_parts

    lin, _ = _o_proj(attn)
    return None if lin is None else linear_parts(lin)[1]


def _only(score: str, a: dict, allowed: tuple, when: tuple) -> None:
    """Refuse evict arguments a delegated policy does not read, and schedules it does not run on."""
    unset = {"rule": "fixed", "rerotate": False}  # defaults that are not None
    extra = sorted(k for k, v in a.items()
                   if v is not None and v != unset.get(k) and k not in allowed + ("score", "budget", "when", "layers"))
    if extra:
        raise RecipeError(f"evict: score={score!r} does not read {extra}; it takes budget" +
                          "".join(f", {k}" for k in allowed) + f" (and its own pass {score}(...) takes the rest)")
    if a.get("when") is not None and a["when"] not in when:
        raise RecipeError(f"evict: score={score!r} runs when={when[0]!r} (its schedule is fixed); got when={a['when']!r}")


def _keyformer(a: dict) -> Pass:
    """``evict(score="keyformer", budget=k, window=w)`` = ``keyformer(kv=k, recent=w / k)`` (k: count or prompt fraction)."""
    _only("keyformer", a, ("window",), ("decode",))
    budget, window = a["budget"], a["window"]
    if window is not None and type(window) is not type(budget):
        raise RecipeError("evict: score='keyformer' needs window of the same kind as budget (both token counts or both "
                          f"fractions of the prompt); got budget={budget!r}, window={window!r}")
    recent = 0.3 if window is None else window / budget
    if not 0.0 <= recent <= 1.0:
        raise RecipeError(f"evict: score='keyformer': window={window!r} must be <= budget={budget!r}")
    return Keyformer(kv=budget, recent=recent, layers=a.get("layers"))


def _scissorhands(a: dict) -> Pass:
    """``evict(score="scissorhands", budget=B, window=r, sinks=s)`` = ``scissorhands(budget=B, recent=r, sinks=s)``."""
    _only("scissorhands", a, ("window", "sinks"), ("decode",))
    if not isinstance(a["budget"], int) or isinstance(a["budget"], bool):
        raise RecipeError(f"evict: score='scissorhands' takes an int budget (tokens per KV head); got {a['budget']!r}")
    if isinstance(a["window"], float):
        raise RecipeError(f"evict: score='scissorhands' takes an int window (recent tokens kept); got {a['window']!r}")
    extra = {k: v for k, v in (("recent", a["window"]), ("sinks", a["sinks"])) if v is not None}
    return Scissorhands(budget=a["budget"], layers=a.get("layers"), **extra)


def _kvzip(a: dict) -> Pass:
    """``evict(score="kvzip", budget=B, layerwise=, sinks=, chunk=)``: KVzip's context-replay scores (arXiv 2505.23416,
    ``passes/kvzip.py``; the replay runs after the prompt step, ``runtime/kvzip_replay.py``)."""
    _only("kvzip", a, ("layerwise", "sinks", "chunk"), ("prefill",))
    from .kvzip import KVzip

    return KVzip(**{k: a[k] for k in ("budget", "layerwise", "sinks", "chunk", "layers") if a.get(k) is not None})


# score name -> (evict argument values -> Pass): policies with their own op, run by their own pass
DELEGATES: dict[str, Callable] = {"keyformer": _keyformer, "scissorhands": _scissorhands, "kvzip": _kvzip}
CHUNKKV_CHUNK = 20  # kvpress ChunkKVPress default
OBSERVATION_WINDOW = ("snapkv", "criticalkv")  # scorers whose window is SnapKV's observation window (default 32)
HEAD_RULES = ("adaptive", "scores")  # per-head budgets on the packed cache, split once after prefill


def parse_when(when, every) -> tuple[str | None, int]:
    """("prefill"|"decode"|"every"|"overflow"|None, N) from ``when`` and ``every``; RecipeError when they disagree."""
    n = 0
    if isinstance(when, str) and when.startswith("every"):
        tail = when[len("every"):]
        if tail.startswith(":"):
            if not tail[1:].isdigit() or int(tail[1:]) < 1:
                raise RecipeError(f"evict: when={when!r}: N in 'every:N' must be an integer >= 1")
            n = int(tail[1:])
        elif tail:
            raise RecipeError(f"evict: when={when!r}; allowed: 'prefill', 'decode', 'every:N' (or every=N), 'overflow'")
        when = "every"
    elif when is not None and when not in ("prefill", "decode", "overflow"):
        raise RecipeError(f"evict: when={when!r}; allowed: 'prefill', 'decode', 'every:N' (or every=N), 'overflow'")
    if every is not None:
        if when not in (None, "every") or (n and n != every):
            raise RecipeError(f"evict: every={every} contradicts when={when!r}; give when='every:{every}' or every={every} alone")
        when, n = "every", every
    if when == "every" and not n:
        raise RecipeError("evict: when='every' needs N: when='every:N' or every=N")
    return when, n


@register_pass
class Evict(EvictionPass):
    name = "evict"
    examples = {"exact": "evict(score='tova', budget=1.0)", "lossy": "evict(score='tova', when='decode', budget=6)",
                "models": ("tiny-llama", "tiny-qwen2", "tiny-gemma3"), "first_token_dense": True}
    exact = False
    doc = "KV eviction as scorer x schedule x budget rule: evict(score='tova', when='decode', budget=0.25)."
    args = (
        Arg("score", str, None, "what each cached token is worth (required)",
            choices=tuple(sorted(SCORERS)) + (CHUNKKV,) + tuple(sorted(DELEGATES))),
        Arg("budget", (int, float), None, "tokens kept per KV head (int) or fraction of the row's length (float), "
            "sinks and window included (required)", min=0, max=MAX_TOKENS,
            tune=Tunable("float", 0.05, 0.95, scope="layer")),
        Arg("when", str, None, "prefill | decode | every:N | overflow (default: the scorer's own)"),
        Arg("every", int, None, "evict at decode steps where the row length is a multiple of N", min=1, max=MAX_TOKENS),
        Arg("rule", str, "fixed", "budget rule: fixed, pyramid (PyramidKV layer budgets), adaptive (Ada-KV head "
            "budgets from this prompt's scores) or scores (the model's L*Hk*budget spread over (layer, KV head) by "
            "head-set retrieval score, as snapkv(heads='scores'))", choices=("fixed", "pyramid", "adaptive", "scores")),
        Arg("beta", float, None, "PyramidKV beta (rule='pyramid'; default 20)", min=1.0, max=1e6),
        Arg("floor", float, None, "Ada-KV safeguard alpha (rule='adaptive'; default 0.2); rule='scores': each head "
            "keeps at least round(floor * budget) tokens, sinks and window at least (default 0.2)", min=0.0, max=1.0),
        Arg("gamma", float, None, "rule='scores': share exponent, budget_h ~ (score_h + share_eps)^gamma (0 = "
            "rule='fixed'; default 1)", min=0.0, max=64.0),
        Arg("headset", str, None, "rule='scores': the head scores, 'shipped' (the model's retrieval head set, "
            "default), 'shipped:<method>' ('shipped:mass', 'shipped:duo') or a head-set file (graphwright heads profile)"),
        Arg("share_eps", float, None, "rule='scores': added to every head score before the power (default 0.01)",
            min=1e-6, max=1.0),
        Arg("sinks", int, None, "first positions always kept (default 0; expected_attention 4)", min=0, max=MAX_TOKENS),
        Arg("window", (int, float), None, "recent tokens always kept, a count or (with a fraction budget) a fraction "
            "of the row's length floored on its own like h2o's recent (snapkv: the observation window, default "
            "min(32, budget // 2)); default 0", min=0, max=MAX_TOKENS),
        Arg("pool", str, None, "GQA pooling over a KV head's query heads", choices=("mean", "max")),
        Arg("kernel", int, None, "snapkv 1-D pooling width (odd, default 5)", min=1, max=1023),
        Arg("smooth", str, None, "snapkv 1-D pooling (default avg)", choices=("avg", "max")),
        Arg("chunk", int, None, "ChunkKV chunk size (chunkkv: 20)", min=1, max=MAX_TOKENS),
        Arg("chunk_heads", str, None, "ChunkKV: sum chunk scores over KV heads (one set) or each head", choices=("sum", "each")),
        Arg("chunk_reuse", int, None, "ChunkKV layer-wise index reuse: the chunks one layer keeps are kept by the next "
            "N-1 evicted layers (1 = each layer selects its own)", min=1, max=MAX_TOKENS),
        Arg("first", float, None, "criticalkv: share of the budget chosen by attention alone (stage 1; default 0.5, "
            "1 = SnapKV)", min=0.0, max=1.0),
        Arg("n_future", int, None, "expected_attention: future positions averaged (default 512)", min=1, max=1 << 20),
        Arg("eps", float, None, "expected_attention / criticalkv: added to the attention before the value norm "
            "(default 0 / 1e-4)", min=0.0, max=1e6),
        Arg("block", int, None, "KeyDiff block-wise prefill: the runtime runs the prompt in blocks of N tokens and each "
            "block evicts back to budget (peak cache <= budget + N per head)", min=2, max=MAX_TOKENS),
        Arg("slack", int, None, "overflow: evict when a head holds more than budget + slack (default 0)", min=0, max=MAX_TOKENS),
        # LagKV (``ops/scorers/lagkv.py``) and Q-Filters (``ops/scorers/qfilter.py``, ``qfilter_calibrate.py``)
        Arg("lag", int, None, "lagkv: partition size (default 128; no compression below sinks + 2 * lag)", min=1,
            max=MAX_TOKENS),
        Arg("filters", str, None, "qfilter: a safetensors file with one tensor 'q_filters' [layers, KV heads, head "
            "dim] (default: calibrated from the shipped novel)"),
        Arg("layerwise", bool, None, "kvzip: the same budget per layer (default: one over all layers and heads)"),
        # kvpress KeyRerotationPress / FinchPress(rerotate_keys=True): passes/evict_rerotate.py, ops/rerotate.py
        Arg("rerotate", bool, False, "re-rotate the kept keys to positions 0..n-1 after prefill eviction; later tokens "
            "continue at n (when='prefill', rule='fixed', every layer; default False: keys keep their positions)"),
        LAYERS_ARG,
    )

    def __init__(self, **values):
        super().__init__(**values)
        v = self.values
        for name in ("score", "budget"):
            if v[name] is None:
                raise RecipeError(f"evict: argument {name!r} is required, e.g. evict(score='tova', when='decode', budget=0.25)")
        if isinstance(self.budget, bool) or self.budget <= 0:
            raise RecipeError(f"evict: budget={self.budget!r} must be > 0 (int tokens per head or a float fraction)")
        self.delegate = None
        check_rerotate(self, self.score in DELEGATES)  # equal kept counts, prefill only (evict_rerotate.py)
        if self.score in DELEGATES:
            self.delegate = DELEGATES[self.score](dict(v))
            return
        chunkkv = self.score == CHUNKKV
        self.scorer = SCORERS["snapkv" if chunkkv else self.score]
        s = self.scorer
        when, self.every_n = parse_when(self.when, self.every)
        self.mode = when or s.default_when
        if v["block"] is not None:
            self._check_block(v, when, s)
            self.mode = "block"
        if s.prefill_only and self.mode != "prefill":
            raise RecipeError(f"evict: score={self.score!r} needs the prompt's queries ({s.rule}), so it runs only "
                              f"when='prefill'; got when={self.mode!r}. For per-step eviction use score='tova' "
                              "(last query) or 'h2o' (cumulative attention), or a key-only scorer ('knorm', 'keydiff')")
        self._refuse_unused(v, s, chunkkv)
        if s.name == "finch":  # the question window is required (passes/evict_finch.py)
            check_finch(v, self.rule)
        n, f = frac_or_count(self.budget)
        window, window_f = v["window"], 0.0
        if isinstance(window, float):
            window, window_f, f = self._fraction_window(window, f, s)
        if window is None:
            window = (min(32, max(1, n // 2)) if n else 32) if s.name in OBSERVATION_WINDOW else 0
        if s.name in OBSERVATION_WINDOW and window < 1:
            raise RecipeError(f"evict: score={s.name!r} needs window >= 1 (the observation window of prompt queries)")
        if n and window + (v["sinks"] or 0) > n:
            raise RecipeError(f"evict: sinks + window = {window + (v['sinks'] or 0)} exceed budget={n}; "
                              f"keep them <= budget")
        chunk = v["chunk"] or (CHUNKKV_CHUNK if chunkkv else 0)
        self.params = {
            "scorer": s.name, "when": self.mode, "every": self.every_n, "slack": v["slack"] or 0,
            "budget_n": n, "budget_f": f, "sinks": s.default_sinks if v["sinks"] is None else v["sinks"],
            "window": window, "kernel": v["kernel"] or 5, "smooth": v["smooth"] or "avg", "pool": v["pool"] or "mean",
            "chunk": chunk, "chunk_heads": v["chunk_heads"] or "sum", "beta": 0.0, "layer": 0, "num_layers": 1,
            "n_future": v["n_future"] or 512, "rope_scaling": 1.0, "window_f": window_f,
            "eps": (1e-4 if s.needs_wo else 0.0) if v["eps"] is None else float(v["eps"]),
        }
        if s.needs_wo:
            self.params["first"] = 0.5 if v["first"] is None else float(v["first"])
        self._lag_and_filters(v, s)
        self.reuse = v["chunk_reuse"] or 1
        if self.reuse > 1:
            self._check_reuse(v, chunk, s)
        if self.rule == "pyramid":
            self.params["beta"] = float(v["beta"] if v["beta"] is not None else 20.0)
        self.floor_alpha = 0.2 if v["floor"] is None else float(v["floor"])
        if self.rule in HEAD_RULES:  # Ada-KV (may delegate to snapkv(heads='adaptive')) or head-score shares
            self.delegate = self._adaptive(v, n) if self.rule == "adaptive" else self._check_scores(v)

    def _lag_and_filters(self, v, s):
        """LagKV's ``lag`` and schedule, Q-Filters' ``filters``: refuse what a scorer does not read or cannot run."""
        for arg, owner, reads in (("lag", "lagkv", s.lagged), ("filters", "qfilter", s.filtered)):
            if v[arg] is not None and not reads:
                raise RecipeError(f"evict: {arg}= is read only by score={owner!r}; leave it out with score={self.score!r}")
        if (s.lagged or s.filtered) and (self.rule in HEAD_RULES or (v["chunk_reuse"] or 1) > 1):
            raise RecipeError(f"evict: score={s.name!r} with " + (f"rule={self.rule!r}" if self.rule in HEAD_RULES else
                              "chunk_reuse") + " is not implemented (that op does not carry its partition size or "
                              "filters); use rule='fixed' or 'pyramid' without chunk_reuse")
        if s.lagged:
            if self.mode != "prefill":
                raise RecipeError(f"evict: score='lagkv' runs when='prefill' only: its lag partitions are the prompt's, "
                                  "and once evicted the cache no longer holds whole partitions to score against the "
                                  f"next; got when={self.mode!r}" + (" (block=)" if self.mode == "block" else ""))
            self.params["lag"] = DEFAULT_LAG if v["lag"] is None else v["lag"]
        self.filters_path = v["filters"]
        if self.filters_path is not None and not Path(self.filters_path).is_file():
            raise RecipeError(f"evict: filters={self.filters_path!r}: no such file; give a safetensors file with one "
                              "tensor 'q_filters' [layers, KV heads, head dim], or leave filters out to calibrate them")

    def _qfilters(self, sg, ctx):
        """(filters [L, Hk, D], where they came from): loaded from ``filters=`` or calibrated (``qfilter_calibrate``)."""
        from .qfilter_calibrate import QFILTER_TOKENS, calibrate_filters, load_filters

        if self.filters_path is not None:
            return load_filters(self.filters_path, sg.info), f"file {self.filters_path}"
        f = calibrate_filters(sg, ctx)
        text = "northangerabbey.txt" if getattr(ctx, "tokenizer", None) is not None else "seeded random ids"
        return f, f"calibrated: SVD of post-RoPE queries over up to {QFILTER_TOKENS} tokens of {text}"

    def _fraction_window(self, w: float, f: float, s):
        """(0, w, f - w): a fraction window keeps floor(w * L) recent tokens and the rest of the budget
        floor((f - w) * L), each floored on its own, exactly as ``h2o(heavy=f - w, recent=w)`` does."""
        if not f:
            raise RecipeError(f"evict: window={w} (a fraction) needs a fraction budget too (e.g. budget=0.5); with "
                              f"budget={self.budget!r} give the window as a token count")
        if s.name in OBSERVATION_WINDOW or (self.rule in HEAD_RULES and not self._decode_adaptive()):
            raise RecipeError("evict: a fraction window is refused with score='snapkv' (its window is the observation "
                              f"window, a count of prompt queries) and with rule={self.rule!r} after prefill; give window "
                              "as an int")
        if w > f:
            raise RecipeError(f"evict: window={w} exceeds budget={f}; keep the window fraction <= the budget")
        return 0, w, round(f - w, 12)

    def _check_reuse(self, v, chunk, s):
        why = []
        if not chunk or (v["chunk_heads"] or "sum") != "sum":
            why.append("it reuses ChunkKV's shared chunk set (score='chunkkv' or chunk=N, chunk_heads='sum')")
        if self.mode != "prefill":
            why.append(f"when={self.mode!r}: the layers' caches hold the same positions only right after prefill")
        if self.rule != "fixed":
            why.append(f"rule={self.rule!r} gives layers different budgets")
        if s.stateful:
            why.append("a stateful scorer's running score would not be kept by the reusing layers")
        if why:
            raise RecipeError(f"evict: chunk_reuse={v['chunk_reuse']} is refused: " + "; ".join(why))

    def _check_block(self, v, when, s):
        if when not in (None, "prefill"):
            raise RecipeError(f"evict: block={v['block']} is a prefill schedule (the prompt in blocks, each evicted back "
                              f"to budget; decode appends); it cannot be combined with when={when!r}")
        if s.prefill_only:
            raise RecipeError(f"evict: block= with score={self.score!r} is refused: it scores with the whole prompt's "
                              "queries (observation window / query statistics), which a block does not have; use a "
                              "key-only scorer ('keydiff', the paper's, or 'knorm') or 'tova'/'h2o'")
        if self.rule in HEAD_RULES:
            raise RecipeError(f"evict: block= with rule={self.rule!r} is refused: the packed per-head cache is split "
                              "once, on an empty cache, and cannot be re-split block by block")

    def _refuse_unused(self, v, s, chunkkv):
        def no(arg, why):
            if v[arg] is not None:
                raise RecipeError(f"evict: {arg}= is not read by score={self.score!r} ({why}); leave it out")
        if not s.gqa_pool:
            no("pool", "it has no per-query-head scores to pool" if not s.shared else "TOVA averages over all heads")
        if not s.smoothing:
            no("kernel", "only snapkv smooths its scores")
            no("smooth", "only snapkv smooths its scores")
        if s.name != "expected_attention":
            no("n_future", "only expected_attention averages future rotations")
        if s.name != "expected_attention" and not s.needs_wo:
            no("eps", "only expected_attention and criticalkv")
        no("layerwise", "only score='kvzip' spreads one budget over layers")
        if not s.needs_wo:
            no("first", "only criticalkv selects in two stages")
        else:
            if v["chunk"] or v["chunk_reuse"]:
                raise RecipeError(f"evict: score={self.score!r} does not take chunk= / chunk_reuse= (ChunkKV selects "
                                  "whole chunks); use rule='fixed', 'pyramid' or 'adaptive'")
        if not (chunkkv or v["chunk"]):
            no("chunk_heads", "it applies to chunk= / chunkkv only")
        if self.mode != "overflow":
            no("slack", "slack applies to when='overflow'")
        if self.rule != "pyramid":
            no("beta", "beta applies to rule='pyramid'")
        if self.rule not in HEAD_RULES:
            no("floor", "floor applies to rule='adaptive' and rule='scores'")
        if self.rule != "scores":
            for arg in ("gamma", "headset", "share_eps"):
                no(arg, f"{arg} applies to rule='scores'")
        if v["kernel"] is not None and v["kernel"] % 2 == 0:
            raise RecipeError(f"evict: kernel={v['kernel']} must be odd (centred pooling)")

    def _decode_adaptive(self) -> bool:
        """rule='adaptive' re-split at every step (``ops/adakv_decode.py``): h2o or per-head tova, when='decode'."""
        return self.rule == "adaptive" and self.score in DECODE_SCORERS and self.mode == "decode"

    def _adaptive(self, v, n):
        """Ada-KV: snapkv after prefill runs ``snapkv(heads='adaptive')`` (same op and fast paths); any other
        per-head scorer runs ``evict_adakv_scored`` on the same packed cache (``run``); h2o and tova at every
        decode step run ``evict_adakv_decode`` (``_run_adaptive_decode``)."""
        if self._decode_adaptive():
            if v["chunk"]:
                raise RecipeError("evict: rule='adaptive' with when='decode' does not take chunk= (ChunkKV selects "
                                  "chunks once, after prefill)")
            return None
        if self.scorer.shared:
            raise RecipeError(f"evict: rule='adaptive' needs per-head scores, and score={self.score!r} gives every KV "
                              "head the same set (one score per layer), so there is nothing to spread across heads; "
                              "use rule='fixed' or a per-head scorer (snapkv, knorm, keydiff, expected_attention, chunkkv)")
        if self.scorer.stateful:
            raise RecipeError(f"evict: rule='adaptive' with score={self.score!r} and when={self.mode!r} is refused: "
                              "the cumulative score is running per-slot state that the one-shot (after prefill) Ada-KV "
                              "split does not carry; use when='decode' (head budgets re-split at every step) or "
                              "score='snapkv' for Ada-KV after prefill")
        if self.mode != "prefill":
            raise RecipeError(f"evict: rule='adaptive' (Ada-KV, arXiv 2407.11550) with score={self.score!r} splits a "
                              f"layer's budget once, after prefill, into a packed ragged cache; got when={self.mode!r}. "
                              f"Use when='prefill', or score in {DECODE_SCORERS} with when='decode' (re-split every step)")
        if (self.score == "snapkv" and n and not self.params["budget_f"] and not v["sinks"] and not v["chunk"]
                and v["pool"] != "max"):
            from .snapkv import SnapKV

            return SnapKV(budget=n, window=self.params["window"], kernel=self.params["kernel"], pool=self.params["smooth"],
                          heads="adaptive", floor=self.floor_alpha, layers=v["layers"])
        return None

    def _check_scores(self, v):
        """rule='scores': head-score shares (``ops/head_shares.layer_counts``) split once after prefill, per-head
        scorers only (the same refusals as rule='adaptive' after prefill)."""
        s = self.scorer
        why = None
        if self.mode != "prefill":
            why = (f"splits the model's budget once, after prefill, into a packed ragged cache; got when={self.mode!r} "
                   "(use when='prefill')")
        elif s.shared:
            why = f"needs per-head scores, and score={self.score!r} gives every KV head of a layer the same set"
        elif s.stateful:
            why = f"does not carry score={self.score!r}'s running per-slot state (use when='prefill' scorers)"
        elif s.needs_wo:
            why = f"score={self.score!r} runs its own two-stage rule (CriticalKV); use rule='fixed' or 'adaptive'"
        if why:
            raise RecipeError(f"evict: rule='scores' {why}")
        self.share_args = {"gamma": 1.0 if v["gamma"] is None else float(v["gamma"]),
                           "headset": v["headset"] or "shipped",
                           "eps": 0.01 if v["share_eps"] is None else float(v["share_eps"])}
        return None  # no delegate: the generic packed op runs the shares

    def _run_adaptive(self, sg):
        p = self.params
        params = {k: p[k] for k in ("scorer", "budget_n", "budget_f", "sinks", "window", "kernel", "smooth", "pool",
                                    "chunk", "chunk_heads", "n_future", "eps")}
        params["floor"] = self.floor_alpha
        params["first"] = p.get("first", 0.5)  # CriticalAdaKV (``ops/adakv_critical.py``); the others ignore it
        slots, weights = {}, None
        if self.rule == "scores":
            from .snapkv import head_share_weights

            a = self.share_args
            slots, weights = head_share_weights(a["headset"], sg.info, sorted(self.target_layers(sg)), a["gamma"], a["eps"],
                                                who="evict(rule='scores')")
            params["weights"] = weights

        tables = {}  # the rotary tables, matched before the packed rewrite changes what attention reads
        if self.scorer.rope:
            for site in find_sites(sg, self.target_layers(sg)):
                inv, scaling = find_rotary(sg.gm, site.attn)
                tables[site.layer] = {"inv_freq": inv, "rope_scaling": float(scaling)}

        def site_values(sg, site):
            extra = {"wo": o_proj_weight(site.attn) if self.scorer.needs_wo else None}
            if weights is not None:
                extra["slot"] = slots[site.layer]
            return {**tables.get(site.layer, {"inv_freq": None, "rope_scaling": 1.0}), **extra}

        layers = rewrite_packed(sg, "evict", params, self.target_layers(sg), op=EVICT_ADAKV_SCORED,
                                site_values=site_values)
        self.note_on_duo(sg, layers, f"the retrieval heads' cache, packed (Ada-KV over {self.scorer.name} scores)")
        if weights is not None:
            rule_text = (f"head-score shares ({self.share_args['headset']} head set, (score + {self.share_args['eps']})"
                         f"^{self.share_args['gamma']}, water-filled over every evicted KV head) over {self.scorer.rule}")
        elif self.scorer.needs_wo:
            rule_text = describe(self.floor_alpha, p["first"])
        else:
            rule_text = f"Ada-KV (arXiv 2407.11550) head budgets over {self.scorer.rule}"
        hk = sg.info.num_kv_heads
        sg.notes["evict"] = {
            "per_layer": {layer: {"budget": self.budget} for layer in layers},
            "counts": {"layers_evicted": len(layers)},
            "settings": {**self.values, "scorer": self.scorer.name, "paper": self.scorer.paper, "when": self.mode,
                         "rule_text": rule_text, "floor": self.floor_alpha, "packed": True},
            **({"shares": {**self.share_args, "weights": {layer: weights[slots[layer] * hk:(slots[layer] + 1) * hk]
                                                          for layer in layers}}} if weights is not None else {}),
        }
        return sg

    def _run_adaptive_decode(self, sg):
        p = self.params
        params = {"scorer": self.scorer.name, "budget_n": p["budget_n"], "budget_f": p["budget_f"],
                  "floor": self.floor_alpha, "sinks": p["sinks"], "window": p["window"], "window_f": p["window_f"]}
        layers = rewrite_packed(sg, "evict", params, self.target_layers(sg), op=EVICT_ADAKV_DECODE,
                                slot_state=(("score", "attn_score", torch.float32),), layer_args=False)
        rule = ("H2O cumulative attention" if self.scorer.name == "h2o"
                else "TOVA last-query attention per KV head (mean over its query heads)")
        sg.notes["evict"] = {
            "per_layer": {layer: {"budget": self.budget} for layer in layers},
            "counts": {"layers_evicted": len(layers)},
            "settings": {**self.values, "scorer": self.scorer.name, "paper": self.scorer.paper, "when": self.mode,
                         "rule_text": f"Ada-KV (arXiv 2407.11550) head budgets re-split every step over {rule}",
                         "floor": self.floor_alpha, "packed": True},
        }
        return sg

    def is_identity(self) -> bool:
        return isinstance(self.budget, float) and self.budget >= 1.0

    also_on = RETRIEVAL_PART  # after duo: the scored op evicts the retrieval heads' cache
    removes = EvictionPass.removes | {"retrieval_part"}

    def _duo_refusal(self, sg) -> str | None:
        """What of evict does not compose with duo's retrieval part, and why (None: it does, or duo has not run)."""
        if retrieval_layers(sg) is None:
            return None
        if self.score in DELEGATES:
            return (f"evict(score={self.score!r}) after duo is not implemented: it runs the {self.score} pass, which does "
                    "not evict a head subset; use a scorer of the generic op (e.g. score='h2o', 'tova', 'snapkv', 'knorm')")
        why = []
        if self.rule == "pyramid":
            why.append("rule='pyramid' (PyramidKV's layer schedule assumes every layer evicts the same heads)")
        if self.reuse > 1:
            why.append("chunk_reuse (the layers' retrieval caches hold different head subsets)")
        if self.mode == "block":
            why.append("block= (duo's streaming heads are cut once after a one-shot prefill)")
        if self._decode_adaptive():
            why.append("rule='adaptive' with when='decode' (not implemented on duo's retrieval part)")
        if self.scorer.filtered:
            why.append("score='qfilter' (its filters are per KV head of the whole layer; duo's retrieval part holds a "
                       "subset of the heads)")
        if self.rule == "scores":
            why.append("rule='scores' (duo already decides per head who keeps everything; the shares would spread over "
                       "its retrieval heads only)")
        if self.rule == "adaptive" and self.scorer.needs_wo:
            why.append("score='criticalkv' with rule='adaptive' (CriticalAdaKV's value norm reads every query head's "
                       "o_proj columns, not a retrieval-head subset)")
        if why:
            return "evict after duo refuses " + "; ".join(why) + "; leave it out to evict duo's retrieval heads"
        return None

    def applies_to(self, sg) -> str | None:
        duo_why = self._duo_refusal(sg)
        if duo_why:
            return duo_why
        if self.delegate is not None:
            return self.delegate.applies_to(sg)
        why = super().applies_to(sg)
        if why:
            return why
        if self.values["rerotate"]:
            why = rerotate_refusal(sg, self.target_layers(sg))
            if why:
                return why
        if self.scorer.needs_wo:
            sites = find_sites(sg, self.target_layers(sg))
            if isinstance(sites, str):
                return sites
            if any(o_proj_weight(s.attn) is None for s in sites):
                return (f"evict(score={self.score!r}) weights values by the layer's output projection, and some layer's "
                        "attention does not reach an o_proj linear with a weight parameter (fused or permuted outputs); "
                        "evict those layers with another scorer")
            if any(s.latent for s in sites) and retrieval_layers(sg) is not None:
                return (f"evict(score={self.score!r}) on latent (lowrank_kv) layers after duo is not implemented: duo "
                        "re-factors a split layer's output projection per head group")
            latent = [s.layer for s in sites if s.latent and not absorbed_without_bias(s)]
            if latent:
                return (f"evict(score={self.score!r}) on latent (lowrank_kv) layers {latent} weights the latent values "
                        "by the absorbed output projection (W_O B_V^T), which needs value_path='absorbed' (the default) "
                        "and no value bias (it is folded into o_proj's bias, outside the per-token norm); use those "
                        "settings or evict those layers with another scorer")
            return None
        if not self.scorer.rope:
            return why
        sites = find_sites(sg, self.target_layers(sg))
        latent = [] if isinstance(sites, str) else [s.layer for s in sites if s.latent]
        if latent and retrieval_layers(sg) is not None:
            return ("evict(score='expected_attention') on latent (lowrank_kv) layers after duo is not implemented: duo "
                    "re-factors a split layer's values per head group, and the scorer rebuilds per-head value norms "
                    "from the layer's own value up-projection")
        missing = [s.layer for s in ([] if isinstance(sites, str) else sites) if s.latent and value_up(sg, s) is None]
        if missing:
            return (f"evict(score='expected_attention') rebuilds the per-head value norms of latent layers {missing} "
                    "from their value up-projection B_V, and the graph holds none for them (lowrank_kv keeps it as "
                    "gw_lowrank_l<layer>_v_up); evict those layers with another scorer")
        rot = find_rotary(sg.gm, sites[0].attn) if sites and not isinstance(sites, str) else find_rotary(sg.gm)
        return rot if isinstance(rot, str) else None

    def run(self, sg, ctx: PassContext):
        if self.delegate is not None:
            sg = self.delegate.run(sg, ctx)
            sg.notes["evict"] = {"settings": dict(self.values), "delegated_to": self.delegate.name,
                                 "counts": {"layers_evicted": len(self.delegate.target_layers(sg))}}
            return sg
        why = self.applies_to(sg)
        if why:
            raise RecipeError(f"evict: {why}")
        if self._decode_adaptive():
            return self._run_adaptive_decode(sg)
        if self.rule in HEAD_RULES:
            return self._run_adaptive(sg)
        policy = policy_for(self.scorer.name)
        num_layers = sg.info.num_layers
        filters, filters_from = self._qfilters(sg, ctx) if self.scorer.filtered else (None, None)
        done, leader = [], {}

        def build(sg, ed, site, kp_all):
            params = dict(self.params, layer=site.layer, num_layers=num_layers)
            if len(done) % self.reuse:  # ChunkKV index reuse: keep the leader layer's positions
                done.append(site.layer)
                return insert_policy(sg, ed, site, SCORED_REUSE_POLICY, params, leader_pos=leader["pos"])
            inputs = {}
            if self.scorer.rope:
                inv, scaling = find_rotary(sg.gm, site.attn)
                params["rope_scaling"] = float(scaling)
                inputs["inv_freq"] = inv
            if self.scorer.needs_wo:
                inputs["wo"] = o_proj_weight(site.attn)
                if site.latent:  # the absorbed o_proj weight is read after the attention: read it again before the op
                    with sg.gm.graph.inserting_before(site.attn):
                        inputs["wo"] = sg.gm.graph.get_attr(inputs["wo"].target)
            if filters is not None:  # Q-Filters: this layer's filters as a graph constant
                device = next((t.device for t in sg.gm.parameters()), torch.device("cpu"))
                sg.gm.register_buffer(f"gw_qfilter_l{site.layer}", filters[site.layer].to(device))
                with sg.gm.graph.inserting_before(site.attn):
                    inputs["qfilter"] = sg.gm.graph.get_attr(f"gw_qfilter_l{site.layer}")
            op_policy = policy
            if self.scorer.rope and site.latent:  # Expected Attention: value norms rebuilt from the latent rows
                op_policy = SCORED_ROPE_VALUES_POLICY
                inputs.update(latent_value_inputs(sg, site))
            out = insert_policy(sg, ed, site, op_policy, params, **inputs)
            leader["pos"] = out[positions_name(site.layer)]
            done.append(site.layer)
            return out

        evict_layer = build
        if self.values["rerotate"]:  # kvpress KeyRerotationPress: after each layer's op (passes/evict_rerotate.py)
            def evict_layer(sg, ed, site, kp_all):
                return add_rerotation(sg, site, build(sg, ed, site, kp_all))

        layers = rewrite_layers(sg, f"evict_{self.scorer.name}", evict_layer, self.target_layers(sg))
        if self.values["rerotate"]:
            note_rerotate(sg, layers)
        self.note_on_duo(sg, layers, f"the retrieval heads' cache ({self.scorer.name} scores, when={self.mode!r})")
        if self.mode == "block":
            sg.notes["prefill_chunk"] = self.block  # CompiledModel's runtime runs the prompt in these blocks
        sg.notes["evict"] = {
            "per_layer": {layer: {"budget": self.budget} for layer in layers},
            "counts": {"layers_evicted": len(layers)},
            "settings": {**self.values, "scorer": self.scorer.name, "paper": self.scorer.paper, "when": self.mode,
                         "every": self.every_n, "rule_text": self.scorer.rule, **latent_settings(sg),
                         **({"filters_from": filters_from} if filters_from else {})},
        }
        return sg
