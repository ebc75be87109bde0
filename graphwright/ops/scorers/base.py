"""What a KV scorer is: a pure-torch function giving each cached token a worth, plus flags.

A ``Scorer`` returns ``s`` [B, Hk, S] fp32, higher = keep, from a ``ScoreInputs`` (this step's
queries, the cache with this step's tokens appended, positions, running state). The generic
eviction op (``ops/policy_scored.py``) adds the schedule (when to evict), the budget rule (how
many to keep), always-kept sinks and recent window, and the top-k (ties: lowest slot, i.e. the
earliest position) and compaction. Flags say what a scorer needs, so that ``evict(...)`` refuses
combinations that cannot work (``passes/evict.py``):

* ``needs_q``: scores with queries (attention); ``stateful``: reads the running per-slot score
  (cumulative attention, accumulated by the op at every step, evicting or not);
* ``shared``: one score per layer, the same for all KV heads, so every head keeps the same set
  (TOVA; ChunkKV's head sum is a selection option, ``chunk_heads``);
* ``rope``: needs the rotary table (Expected Attention: pre-RoPE queries by inverse rotation);
* ``prefill_only``: needs the prompt's queries (an observation window or query statistics);
* ``gqa_pool``: reduces per-query-head scores over the g heads of a KV head with ``pool``;
* ``needs_wo``: reads the layer's ``o_proj`` weight and the head budgets (CriticalKV's value norm);
* ``lagged``: reads the partition size ``lag`` (LagKV); ``filtered``: reads the layer's per-KV-head
  filter ``qfilter`` [Hk, D] (Q-Filters), a constant the pass puts in the graph.

Keys are cached post-RoPE at their original positions (positions travel with the cache as per-head
``k_pos``), so no scorer needs re-rotation; ``evict(..., rerotate=True)`` re-rotates the kept keys after the
eviction op (``ops/rerotate.py``), after scoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from ..eviction_ref import prob_blocks


@dataclass
class ScoreInputs:
    """One layer, one step (shapes as in ``eviction_ref``); ``cand`` [B, Hk, S] the evictable slots."""

    q: Optional[Tensor]
    k: Tensor
    v: Tensor
    q_pos: Tensor
    k_pos: Tensor
    scale: float
    cand: Tensor
    length: Tensor  # [B] tokens seen so far per row
    state: Optional[Tensor] = None  # running cumulative attention [B, Hk, S] (this step included)
    inv_freq: Optional[Tensor] = None
    rope_scaling: float = 1.0
    window: int = 0  # always-kept recent tokens (SnapKV: also the observation window)
    kernel: int = 1
    smooth: str = "avg"
    pool: str = "mean"
    sinks: int = 0
    n_future: int = 512
    eps: float = 0.0
    wo: Optional[Tensor] = None  # the layer's o_proj weight [hidden, H*D] (``needs_wo``: CriticalKV)
    cap: Optional[Tensor] = None  # [B, Hk] tokens each head keeps, sinks and window included
    first: float = 0.5  # CriticalKV: the share of ``cap`` chosen by the base score alone
    lag: int = 128  # LagKV: partition size (``lagged``)
    qfilter: Optional[Tensor] = None  # Q-Filters: this layer's filters [Hk, D] (``filtered``)
    # a latent layer's value up-projection B_V [r_v, Hk*Dv] and bias [Hk*Dv] (or [0]): ``v`` is then the shared
    # payload [B, 1, S, r_k + r_v] whose last r_v columns are c_v, V = c_v B_V + b_V (Expected Attention)
    v_up: Optional[Tensor] = None
    v_bias: Optional[Tensor] = None


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable[[ScoreInputs], Tensor]
    paper: str
    rule: str
    exact: str
    default_when: str = "prefill"
    needs_q: bool = True
    stateful: bool = False
    shared: bool = False
    rope: bool = False
    prefill_only: bool = False
    gqa_pool: bool = False
    smoothing: bool = False  # reads kernel / smooth (SnapKV's 1-D pooling)
    default_sinks: int = 0
    needs_wo: bool = False  # reads the layer's output projection weight (CriticalKV)
    lagged: bool = False  # reads ``lag`` (LagKV)
    filtered: bool = False  # reads ``qfilter`` (Q-Filters)
    chunked: Optional[Callable] = None  # its own chunk= selection (Finch: a budget share per chunk), not ChunkKV's


def gqa_reduce(x: Tensor, pool: str) -> Tensor:
    """[B, Hk, g, S] -> [B, Hk, S] by mean or max over the g query heads of a KV head."""
    return x.amax(dim=2) if pool == "max" else x.mean(dim=2)


def attention_rows(x: ScoreInputs, rows: tuple[int, int]) -> Tensor:
    """[B, Hk, g, S] fp32: softmax attention of query rows ``rows`` summed over those rows, per query head."""
    out = None
    for _, p in prob_blocks(x.q, x.k, x.q_pos, x.k_pos, x.scale, None, rows=rows):
        part = p.sum(dim=3)
        out = part if out is None else out + part
    return out
