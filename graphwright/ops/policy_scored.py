"""The generic scored eviction op: a scorer (``ops/scorers``) plus a schedule plus a budget rule.

One reference, ``scored_reference``, defines ``graphwright.evict_scored`` (no state),
``graphwright.evict_scored_acc`` (one fp32 running score per slot, state ``attn_score<layer>``:
the cumulative-attention scorer) and ``graphwright.evict_scored_rope`` (reads the layer's rotary
table ``inv_freq`` as a per-step input: Expected Attention; ``graphwright.evict_scored_rope_values`` also reads a
latent layer's value up-projection ``v_up`` and bias ``v_bias``) and ``graphwright.evict_scored_wo`` (reads the
layer's ``o_proj`` weight ``wo`` as a per-step input and takes ``first`` last: CriticalKV), ``graphwright.evict_scored_lag``
(takes the partition size ``lag`` last: LagKV) and ``graphwright.evict_scored_qfilter`` (reads the layer's
filters ``qfilter`` [Hk, D] as a per-step input: Q-Filters). Per layer and step:

1. (``_acc``) add this step's attention, summed over its query rows and averaged over the g heads
   of a KV head, to the running score (new slots start at 0), evicting or not;
2. schedule ``when``: ``prefill`` (the step whose cache was empty: S == T), ``decode`` (every
   step, prefill included), ``every`` (prefill and the decode steps where the row's length is a
   multiple of ``every``), ``overflow`` (a head holds more than budget + ``slack`` tokens), ``block``
   (KeyDiff's block-wise prefill, arXiv 2504.15364: a prompt step -- the cache was empty, or T > 1
   tokens, a chunk of a prompt the runtime runs in blocks -- whose heads hold more than the budget;
   decode steps of one token append);
3. budget per row: ``budget_n + floor(budget_f * L)`` tokens per KV head (L = the row's length),
   sinks (positions < ``sinks``) and the recent ``window`` included and always kept (a fraction
   window ``window_f``: floor(window_f * L) recent tokens, floored apart from the rest of the
   budget, the way ``h2o(heavy=f, recent=r)`` floors its two parts); rule
   ``pyramid`` (``beta`` > 0): PyramidKV's layer share of the evictable budget
   (``adakv_ref.pyramid_budget``, mean over layers = the uniform budget);
4. scores from the scorer, top-k per KV head of the evictable slots (ties: earliest slot), or
   whole chunks (``chunk`` > 0: ``scorers/chunkkv.py``; a scorer with its own ``chunked`` rule, Finch, uses it);
   ``evict_scored_reuse`` (ChunkKV's layer-wise index reuse, arXiv 2502.00299) skips 3-4 and keeps
   the positions in ``leader_pos`` (an earlier layer's kept positions, [B, Hk, N]) instead;
5. ``eviction_ref.compact`` (positions travel with the slots: keys stay post-RoPE at their
   original positions; ``evict(..., rerotate=True)`` re-rotates after this op, ``ops/rerotate.py``).

Invariants tested (``tests/ops/test_scorers.py``, ``tests/passes/test_evict_scorers.py``): per
scorer the kept set equals a slow loop oracle on random attention; schedules evict only on their
steps; SnapKV / H2O settings keep exactly the preset ops' sets.
"""

from __future__ import annotations

import torch

from .adakv_ref import pyramid_budget
from .eviction_policy import EvictionPolicy, Param, SlotState, StepInput, register_policy
from .eviction_ref import budget, colsum, compact, row_length, topk_mask
from .scorers import SCORERS, ScoreInputs
from .scorers.chunkkv import chunk_keep

WHEN = ("prefill", "decode", "every", "overflow", "block")


def schedule(when: str, every: int, slack: int, S: int, T: int, length, count, cap) -> torch.Tensor:
    """[B, 1, 1] bool: rows that evict at this step (``count`` [B, Hk] valid slots, ``cap`` [B] budget)."""
    B = length.shape[0]
    if when == "prefill":
        do = torch.full((B,), S == T, dtype=torch.bool)
    elif when == "decode":
        do = torch.ones(B, dtype=torch.bool)
    elif when == "every":
        do = torch.full((B,), S == T, dtype=torch.bool) | (length % max(every, 1) == 0)
    elif when == "overflow":
        do = count.amax(dim=1) > cap + slack
    elif when == "block":  # a prompt step (empty cache, or a chunk of T > 1 tokens) that overflows the budget
        do = (count.amax(dim=1) > cap) & torch.tensor(S == T or T > 1, device=cap.device)
    else:
        raise ValueError(f"evict_scored: when={when!r}; allowed: {', '.join(WHEN)}")
    return do.to(length.device)[:, None, None]


def scored_keep(x: ScoreInputs, scorer: str, when: str, every: int, slack: int, budget_n: int, budget_f: float,
                chunk: int, chunk_heads: str, beta: float, layer: int, num_layers: int, window_f: float = 0.0):
    """[B, Hk, S] bool keep set, or None when no row evicts at this step."""
    valid = x.k_pos >= 0
    S, T = x.k.shape[2], x.q_pos.shape[1]
    win_f = budget(0, window_f, x.length)  # [B] a fraction window, floored on its own (as h2o floors recent)
    cap = budget(budget_n, budget_f, x.length) + win_f  # [B]
    do = schedule(when, every, slack, S, T, x.length, valid.sum(-1), cap)
    if not bool(do.any()):
        return None
    L = x.length[:, None, None]
    protected = valid & ((x.k_pos < x.sinks) | (x.k_pos >= L - x.window - win_f[:, None, None]))
    x.cand = valid & ~protected
    count = (cap[:, None] - protected.sum(-1)).clamp(min=0)  # [B, Hk] evictable tokens kept
    if beta > 0:
        n_cand = x.cand.sum(-1)
        count = torch.tensor([[pyramid_budget(int(c), int(n), 0, layer, num_layers, beta) for c, n in zip(cr, nr)]
                              for cr, nr in zip(count.tolist(), n_cand.tolist())], dtype=torch.long, device=count.device)
    x.cap = count + protected.sum(-1)
    score = SCORERS[scorer].fn(x)
    if chunk > 0 and SCORERS[scorer].chunked is not None:  # the scorer's own chunked rule (Finch)
        chosen = SCORERS[scorer].chunked(score, x, protected, cap, chunk)
    elif chunk > 0:
        fits = (count >= x.cand.sum(-1))[..., None]  # whole chunks could overshoot: a head that fits keeps all
        chosen = torch.where(fits, x.cand, chunk_keep(score, x.cand, x.k_pos, count, chunk, chunk_heads == "sum"))
    else:
        chosen = topk_mask(score, x.cand, count)
    return torch.where(do, protected | chosen, valid)


def reuse_keep(k_pos, leader_pos, do):
    """ChunkKV layer-wise index reuse: keep the positions the leader layer kept (per row and head)."""
    valid = k_pos >= 0
    member = (k_pos[..., :, None] == leader_pos[..., None, :]).any(-1)
    return torch.where(do, valid & member, valid)


def scored_reference(q, k, v, q_pos, k_pos, *rest, acc: bool = False, rope: bool = False, reuse: bool = False,
                     wo=None, first: float = 0.5, lag: int = 128, qfilter=None, v_up=None, v_bias=None):
    """-> (k, v, k_pos[, score]): the op's definition (argument order in ``_args``)."""
    rest = list(rest)
    state = rest.pop(0) if acc else None
    inv_freq = rest.pop(0) if rope else None
    leader_pos = rest.pop(0) if reuse else None
    (scale, scorer, when, every, slack, budget_n, budget_f, sinks, window, kernel, smooth, pool, chunk, chunk_heads,
     beta, layer, num_layers, n_future, eps, rope_scaling, window_f, *bias) = rest
    length = row_length(q_pos)
    if acc:
        B, Hk, S = k.shape[:3]
        state = torch.cat([state.float(), state.new_zeros(B, Hk, S - state.shape[2])], dim=2)
        state = state + colsum(q, k, q_pos, k_pos, scale)
    x = ScoreInputs(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, scale=scale, cand=k_pos >= 0, length=length, state=state,
                    inv_freq=inv_freq, rope_scaling=rope_scaling, window=window, kernel=kernel, smooth=smooth, pool=pool,
                    sinks=sinks, n_future=n_future, eps=eps, wo=wo, first=first, lag=lag, qfilter=qfilter,
                    v_up=v_up, v_bias=v_bias)
    if reuse:  # the leader's kept positions, on the same schedule (its sets are the same at prefill)
        S, T = k.shape[2], q_pos.shape[1]
        valid = k_pos >= 0
        cap = budget(budget_n, budget_f, length) + budget(0, window_f, length)
        do = schedule(when, every, slack, S, T, length, valid.sum(-1), cap)
        keep = reuse_keep(k_pos, leader_pos, do) if bool(do.any()) else None
    else:
        keep = scored_keep(x, scorer, when, every, slack, budget_n, budget_f, chunk, chunk_heads, beta, layer,
                           num_layers, window_f)
    extras = (state,) if acc else ()
    if keep is None:
        return (k, v, k_pos, *extras)
    return compact(keep, k, v, k_pos, extras)


PARAMS = (Param("scorer", "str"), Param("when", "str"), Param("every", "int"), Param("slack", "int"),
          Param("budget_n", "int"), Param("budget_f", "float"), Param("sinks", "int"), Param("window", "int"),
          Param("kernel", "int"), Param("smooth", "str"), Param("pool", "str"), Param("chunk", "int"),
          Param("chunk_heads", "str"), Param("beta", "float"), Param("layer", "int"), Param("num_layers", "int"),
          Param("n_future", "int"), Param("eps", "float"), Param("rope_scaling", "float"), Param("window_f", "float"))


def _plain(q, k, v, q_pos, k_pos, *rest):
    return scored_reference(q, k, v, q_pos, k_pos, *rest)


def _acc(q, k, v, q_pos, k_pos, *rest):
    return scored_reference(q, k, v, q_pos, k_pos, *rest, acc=True)


def _rope(q, k, v, q_pos, k_pos, *rest):
    return scored_reference(q, k, v, q_pos, k_pos, *rest, rope=True)


def _rope_values(q, k, v, q_pos, k_pos, inv_freq, v_up, v_bias, scale, *rest):
    """Expected Attention on a latent layer: the rotary table plus the value up-projection ``v_up`` and bias
    ``v_bias`` ([0]: none), so the scorer rebuilds per-head value norms from the shared latent payload ``v``."""
    return scored_reference(q, k, v, q_pos, k_pos, inv_freq, scale, *rest, rope=True, v_up=v_up, v_bias=v_bias)


def _reuse(q, k, v, q_pos, k_pos, *rest):
    return scored_reference(q, k, v, q_pos, k_pos, *rest, reuse=True)


def _wo(q, k, v, q_pos, k_pos, wo, scale, *rest):
    """CriticalKV's variant: the o_proj weight ``wo`` as a per-step input, ``first`` after the shared params."""
    n = len(PARAMS)
    return scored_reference(q, k, v, q_pos, k_pos, scale, *rest[:n], *rest[n + 1:], wo=wo, first=rest[n])


def _lag(q, k, v, q_pos, k_pos, scale, *rest):
    """LagKV's variant: the partition size ``lag`` after the shared params."""
    n = len(PARAMS)
    return scored_reference(q, k, v, q_pos, k_pos, scale, *rest[:n], *rest[n + 1:], lag=rest[n])


def _qfilter(q, k, v, q_pos, k_pos, qfilter, scale, *rest):
    """Q-Filters' variant: the layer's filters ``qfilter`` [Hk, D] as a per-step input."""
    return scored_reference(q, k, v, q_pos, k_pos, scale, *rest, qfilter=qfilter)


SCORED_POLICY = EvictionPolicy(name="scored", reference=_plain, params=PARAMS,
                               doc="A scorer + schedule + budget rule (``policy_scored``); no state.")
SCORED_ACC_POLICY = EvictionPolicy(name="scored_acc", reference=_acc, params=PARAMS,
                                   slot_state=(SlotState("score", torch.float32, state="attn_score"),),
                                   doc="A scorer + schedule + budget rule over the running cumulative attention.")
SCORED_ROPE_POLICY = EvictionPolicy(name="scored_rope", reference=_rope, params=PARAMS,
                                    step_inputs=(StepInput("inv_freq", torch.float32),),
                                    doc="A scorer + schedule + budget rule that reads the layer's rotary table.")
SCORED_ROPE_VALUES_POLICY = EvictionPolicy(name="scored_rope_values", reference=_rope_values, params=PARAMS,
                                           step_inputs=(StepInput("inv_freq", torch.float32),
                                                        StepInput("v_up", torch.float32),
                                                        StepInput("v_bias", torch.float32)),
                                           doc="scored_rope on a latent layer: reads the value up-projection too.")
SCORED_REUSE_POLICY = EvictionPolicy(name="scored_reuse", reference=_reuse, params=PARAMS,
                                     step_inputs=(StepInput("leader_pos", torch.long),),
                                     doc="ChunkKV index reuse: keep the positions an earlier layer's op kept.")
SCORED_WO_POLICY = EvictionPolicy(name="scored_wo", reference=_wo, params=PARAMS + (Param("first", "float"),),
                                  step_inputs=(StepInput("wo", torch.float32),),
                                  doc="A scorer + schedule + budget rule that reads the layer's o_proj weight (CriticalKV).")
SCORED_LAG_POLICY = EvictionPolicy(name="scored_lag", reference=_lag, params=PARAMS + (Param("lag", "int"),),
                                   doc="A scorer + schedule + budget rule with a partition size (LagKV).")
SCORED_QFILTER_POLICY = EvictionPolicy(name="scored_qfilter", reference=_qfilter, params=PARAMS,
                                       step_inputs=(StepInput("qfilter", torch.float32),),
                                       doc="A scorer + schedule + budget rule that reads the layer's filters (Q-Filters).")
EVICT_SCORED = register_policy(SCORED_POLICY)
EVICT_SCORED_LAG = register_policy(SCORED_LAG_POLICY)
EVICT_SCORED_QFILTER = register_policy(SCORED_QFILTER_POLICY)
EVICT_SCORED_WO = register_policy(SCORED_WO_POLICY)
EVICT_SCORED_REUSE = register_policy(SCORED_REUSE_POLICY)
EVICT_SCORED_ACC = register_policy(SCORED_ACC_POLICY)
EVICT_SCORED_ROPE = register_policy(SCORED_ROPE_POLICY)
EVICT_SCORED_ROPE_VALUES = register_policy(SCORED_ROPE_VALUES_POLICY)


def policy_for(scorer: str) -> EvictionPolicy:
    """The op variant a scorer needs: running state, rotary table, output projection, or neither."""
    s = SCORERS[scorer]
    if s.needs_wo:
        return SCORED_WO_POLICY
    if s.lagged:
        return SCORED_LAG_POLICY
    if s.filtered:
        return SCORED_QFILTER_POLICY
    return SCORED_ACC_POLICY if s.stateful else SCORED_ROPE_POLICY if s.rope else SCORED_POLICY
