"""Torch-backend eviction without compaction: a KV head's cache is a set of slots.

The references (``ops/eviction_ref.py``) re-score and *compact* the whole cache of every head at
every step (sort, gather of every row, a host sync for the output length), so an evicted model
decoded slower than the dense one. Softmax does not care about slot order: attention reads each
slot with its own position in ``k_pos`` (-1 = empty). So at a decode step (T = 1, the new token
appended at slot S by ``cache_append``) these implementations:

* pick, per (row, KV head), the slot ``j`` the new token goes to, with tensor ops only: the
  policy's victim when the head is over budget, else the first empty slot (-1) of slots 0..S-1,
  else S itself (the token stays where it is);
* copy the new token's row (k, v, position, score, ...) from slot S into slot ``j`` (``scatter_``
  of B*Hk rows: O(D) per head, a no-op where j = S);
* return views of the first S slots over the same storage (``cache_append.keep_prefix``), so the
  next step's append writes right after them, in place. Nothing is gathered or cloned.

Layout (ragged batches): a row under budget keeps its new token in an empty slot (padding of a
shorter row, or a slot an earlier step emptied), so rows of different lengths share S slots with
-1 padding instead of a host sync. Output length: with token-count budgets the capacity
``c`` is static; if S + 1 <= c nothing can be over budget and the appended views are returned as
they are, else every head under budget has an empty slot among 0..S-1 (it holds <= c < S + 1
tokens) and the output has S slots. With fraction budgets the capacity grows with the row's
length: the output keeps S + 1 slots (slot S emptied where the token moved) exactly when some
head under budget has no empty slot: one host read of a [B, Hk] bool per layer and step, the
only sync left (the cache then grows by one slot, like the budget).

Policies: H2O keeps a running score (the step's attention added in place) and drops the argmin
over the non-recent slots (ties: the latest position, as the reference's top-k keeps the earlier
slot of a tie, and its slots are in position order). StreamingLLM drops the slot holding position
``L - 1 - window`` (no scoring). SnapKV's reference already returns its inputs at decode (no
copy), so it keeps it; every prefill (and any T > 1 step, and latent layers, whose one payload
serves all heads) keeps using the references.

FastGen: its frequent set is a top-k over *all* tokens (protected ones included) by a running
score, so several tokens can leave in one step. Each head's keep mask (``fastgen_ref.fastgen_keep``'s
union for its policy: special, +punct, +frequent, +local, full) is computed over the S + 1 slots;
every slot not kept gets position -1 in place, then the new token moves into the first empty
slot (``place_new_token``). The top-k ranks unique int64 keys (fp32 score bits, then the position
reversed), so equal scores go to the earlier position exactly as the reference's position-ordered
top-k: a ``topk`` with static k for token-count budgets, a sort of the [B, Hk, S] keys for
fraction budgets (scores only; k/v are never sorted or gathered). Its capacity is data dependent
(special and punctuation tokens accumulate, full heads keep everything), so the output length
costs the same one host read as H2O's fraction budgets: does some head keep all S + 1 slots.
Slots never shrink: a cache is as wide as the largest kept set so far (the reference compacts
to the current one). Every ladder policy runs on slots; none falls back.

Per-step cost (every layer runs this at every step, so op count is what matters on CPU): the
tensors derived from the step's positions (row lengths, budgets' thresholds, the leaving
StreamingLLM position, the padding-row mask, RoPE inversion angles) are built by the first layer
of a step and reused by the others (``step_memo.py``); the new token's rows move with one
``index_select`` + ``index_copy_`` per tensor on the buffer's flat row view; the first empty slot
is one ``amin`` over slot indices. H2O's prompt step scores each block of query rows over its
causal key range only (``prefill_scores.py``: same values bit for bit, about half the work).

Invariant assumed: the cache entering a decode step is the kept set of the previous step (left
by the reference at prefill or by these functions), so at most one token leaves per step for
H2O and StreamingLLM (any number for FastGen, whose slots are emptied by mask).

Aliasing: the input state is *donated*: the victim's slot is overwritten in place, so a caller
must not reuse a state it has passed to a step (the runtime threads states linearly; see
``cache_append``'s docstring). StreamingLLM's cache index (``rope_cache_index``) becomes each
slot's rank by position among the valid slots (``rope_cache_index_ranked``), equal to the
reference's slot count on a position-ordered cache. On the torch backend a StreamingLLM decode step no
longer calls it: ``streaming_shift.py`` caches keys at their absolute rotation and shifts the query
instead (prompt steps still use it, on keys inverted at their positions).

Invariants tested (``tests/passes/test_eviction_slots.py``): same kept position sets per (row,
head) as the torch backend with the references, after every step with eviction at every step
(tiny Llama, batch 2 left-padded: H2O counts 300 steps, fractions 100, StreamingLLM 200, FastGen
200 with profiled heads covering all five ladder policies), logits within 1e-4, the buffers'
storage stops growing once the budget is reached (FastGen: never wider than the largest kept set
so far; flat at op level when every set is bounded); op level on random attention (recent = 0,
heavy = 0, fractions; FastGen one head per policy with fraction and zero budgets); ranked RoPE
index equals the reference's and is order free; SnapKV decode appends in place. Native sliding
windows (``passes/native_windows.py``) reuse ``streaming_slots`` with sinks = 0.
"""

from __future__ import annotations

import threading

import torch

from ...ops.eviction import EVICT_FASTGEN, EVICT_H2O, EVICT_STREAMING, ROPE_CACHE_INDEX, ROPE_INVERT
from ...ops.eviction_ref import PUNCT, SPECIAL, budget, h2o_reference, streaming_reference
from ...ops.fastgen_ref import FULL, fastgen_reference
from ...ops.rope_index_ref import _rotate, rope_angles, rope_invert_reference
from .cache_append import _owned_tail, _view, cache_append, keep_prefix
from .decode_probs import step_probs
from .prefill_scores import h2o_prompt
from .rope_table import rope_cos_sin, rotate_rows
from .step_memo import arange, memo, memo_tensor, rows_full, slot_memo, step_info


def _slot_decode(q_pos, k, v, k_pos, extras=()) -> bool:
    """A single-token step over a cache with one head set (no latent payload): slots apply."""
    T, S1 = q_pos.shape[1], k_pos.shape[2]
    return T == 1 and S1 > 1 and k_pos.dim() == 3 and v.shape[1] == k_pos.shape[1] == k.shape[1] \
        and all(e.shape[2] == S1 for e in extras)


def _first(mask: torch.Tensor) -> torch.Tensor:
    """[B, Hk] index of the first True along the last dim (0 when none)."""
    return mask.to(torch.uint8).argmax(dim=-1)


def place_new_token(tensors, k_pos, over, victim, static: bool, plan: dict | None = None):
    """Move slot S (the new token) into the victim's slot (``over``) or the first empty one.

    ``tensors``: k, v [B, Hk, S+1, D] and per-slot state [B, Hk, S+1] (k_pos among them), written
    in place. ``over`` [B, Hk] bool, ``victim`` [B, Hk] long (may be S: the new token itself is
    dropped). ``static``: the caller knows every head under budget has an empty slot (token-count
    budgets), so no sync. Returns the views to hand back (S or S + 1 slots).

    Each tensor's rows are moved in its buffer seen as a flat [rows, ...] view (row (b * Hk + h) * cap + slot):
    one ``index_select`` of the B*Hk new rows and one ``index_copy_`` into their slots (a no-op copy
    where j = S), instead of a broadcast index per tensor. The first empty slot is one ``amin`` over
    slot indices (S when there is none, or when only slot S itself is empty: a padding row's new token).
    ``plan``: a dict shared by layers with equal ``k_pos`` (``step_memo.slot_memo``; static budgets only): the
    destination slots and flat rows are computed by the first of them (``over``/``victim`` may then be None).
    ``over`` None with a ``victim``: every head is over budget (``j = victim``).
    """
    B, Hk, S1 = k_pos.shape
    S = S1 - 1
    j = plan.get("j") if plan else None
    if j is None and over is None:  # the caller knows every head is over budget
        j = victim
    elif j is None:
        free = torch.where(k_pos < 0, arange(S1, k_pos.device), S).amin(dim=-1)  # first empty of 0..S-1, else S
        j = torch.where(over, victim, free)
        if plan is not None and static:
            plan["j"], plan["rows"] = j, {}
    n = S
    if not static:
        grow = (j == S) & ~over  # heads keeping the new token where it is
        n = S if not bool(grow.any()) else S1  # the one sync, fraction budgets only
    rows = plan["rows"] if plan and static else {}  # cap -> (destination rows, source rows)
    out = []
    for x in tensors:
        buf = _owned_tail(x, 2)
        base = buf if buf is not None and buf.is_contiguous() else (x if x.is_contiguous() else None)
        if base is None:  # a strided view this function cannot flatten: per-head index
            bi, hi = _heads(B, Hk, x.device)
            x[bi, hi, j] = x[:, :, S]
            out.append(keep_prefix(x, 2, n))
            continue
        cap = base.shape[2]
        if cap not in rows:
            rows[cap] = ((_row_starts(B, Hk, cap, x.device) + j).view(-1), _new_rows(B, Hk, cap, S, x.device))
        dst, src = rows[cap]
        flat = base.view(B * Hk * cap, *x.shape[3:])
        flat.index_copy_(0, dst, flat.index_select(0, src))
        out.append(x if n == S1 else (_view(buf, 2, n) if buf is not None else x.narrow(2, 0, n)))
    if n == S1:
        k_pos[..., S].masked_fill_(~grow, -1)
    return out


def _row_starts(B: int, Hk: int, cap: int, device) -> torch.Tensor:
    """[B, Hk] long: the flat row of slot 0 of each (row, head) in a contiguous [B, Hk, cap, ...] buffer."""
    return memo_tensor(("row_starts", B, Hk, cap, str(device)), lambda: arange(B * Hk, device).view(B, Hk) * cap)


def _new_rows(B: int, Hk: int, cap: int, S: int, device) -> torch.Tensor:
    """[B * Hk] long: the flat row of slot S (the new token) of each (row, head), kept per shape."""
    return memo_tensor(("new_rows", B, Hk, cap, S, str(device)), lambda: _row_starts(B, Hk, cap, device).view(-1) + S)


_HEADS: dict = {}


def _head_index(B: int, Hk: int, device):
    return torch.arange(B, device=device)[:, None].expand(B, Hk), torch.arange(Hk, device=device)[None].expand(B, Hk)


def _heads(B: int, Hk: int, device):
    """(row, head) index tensors [B, Hk] pairing with a per-head slot index (kept per shape)."""
    key = (B, Hk, device)
    hit = _HEADS.get(key)
    if torch.compiler.is_compiling():
        return _head_index(B, Hk, device)
    if hit is None:
        if len(_HEADS) > 256:
            _HEADS.clear()
        with torch.inference_mode(False):  # plain tensors: made under inference_mode they could not serve a later step run with autograd
            hit = _HEADS[key] = _head_index(B, Hk, device)
    return hit


def decode_colsum(q, k, q_pos, k_pos, scale, key_bias=None, real: bool = True) -> torch.Tensor:
    """``eviction_ref.colsum`` for one query per row: [B, Hk, S] fp32 attention each slot received, mean over g.

    The g query heads of a KV head are one [g, D] x [D, S] product against the cache as it lies (a
    view with spare room is not copied, unlike the reference's broadcast); same mask and fp32 softmax
    (``decode_probs.slot_probs``), reused from the layer's attention when it computed them.
    ``real=False``: the caller knows no row is padding (the padding-row factor is 1 and is skipped).
    """
    # the probabilities the same layer's attention computed on these tensors, if it did (decode_probs.py)
    p = step_probs(q, k, q_pos, k_pos, scale, key_bias)  # [B, Hk, g, S]
    return p.mean(dim=2) * step_info(q_pos).real if real else p.mean(dim=2)


# ----------------------------------------------------------------------------------- H2O
def h2o_slots(q, k, v, q_pos, k_pos, score, scale, heavy_n, heavy_f, recent_n, recent_f, key_bias=None):
    """``evict_h2o`` on slots at decode (reference at prefill). -> (k, v, k_pos, score)."""
    S1 = k_pos.shape[2]
    if not _slot_decode(q_pos, k, v, k_pos) or score.shape[2] != S1 - 1 or score.dtype != torch.float32:
        if q_pos.shape[1] > 1 and score.shape[2] == 0:  # a prompt from an empty cache: causal-range scores (same values)
            return h2o_prompt(q, k, v, q_pos, k_pos, score, scale, heavy_n, heavy_f, recent_n, recent_f, key_bias)
        return h2o_reference(q, k, v, q_pos, k_pos, score, scale, heavy_n, heavy_f, recent_n, recent_f, key_bias)
    B, Hk = k_pos.shape[:2]
    info = step_info(q_pos)  # per-step tensors shared by every layer (step_memo.py)
    static = heavy_f == 0 and recent_f == 0
    # every head holds c + 1 valid slots (no empty one) and is over budget: no emptiness test, no budget count;
    # every row is real (length > c >= 0), so the padding-row factor of the colsum is 1
    full = static and S1 == heavy_n + recent_n + 1 and rows_full(info, heavy_n + recent_n)
    score = cache_append(score, _zeros(B, Hk, score.device), 2)
    score.add_(decode_colsum(q, k, q_pos, k_pos, scale, key_bias, real=not full))  # the running sum: this step's attention
    if static and S1 <= heavy_n + recent_n:
        return k, v, k_pos, score  # under budget everywhere: the appended views as they are
    if static:  # token counts: the budgets are the counts themselves (no per-row budget tensors)
        first_recent = memo(info, ("h2o", recent_n), lambda: (info.length - recent_n)[:, None, None])
        heavy = heavy_n
    else:
        first_recent, heavy = memo(info, ("h2o", heavy_n, heavy_f, recent_n, recent_f), lambda: (
            info.length[:, None, None] - budget(recent_n, recent_f, info.length)[:, None, None],
            budget(heavy_n, heavy_f, info.length)[:, None]))
    cand = (k_pos < first_recent) if full else (k_pos >= 0) & (k_pos < first_recent)
    over = None if full else cand.sum(dim=-1) > heavy
    s = torch.where(cand, score, float("inf"))
    # lowest score, latest position (a head without candidates is not over budget: its victim is unused)
    victim = torch.where(s == s.amin(dim=-1, keepdim=True), k_pos, -1).argmax(dim=-1)
    return tuple(place_new_token((k, v, k_pos, score), k_pos, over, victim, static))


def _zeros(B: int, Hk: int, device) -> torch.Tensor:
    """[B, Hk, 1] fp32 zeros, kept per shape (only ever read: the new slot's initial score)."""
    return memo_tensor(("zeros", B, Hk, str(device)), lambda: torch.zeros(B, Hk, 1, device=device))


# ----------------------------------------------------------------------------------- StreamingLLM
def streaming_slots(k, v, q_pos, k_pos, sinks, window):
    """``evict_streaming`` on slots at decode: the oldest non-sink token leaves. -> (k, v, k_pos)."""
    if not _slot_decode(q_pos, k, v, k_pos):
        return streaming_reference(k, v, q_pos, k_pos, sinks, window)
    if k_pos.shape[2] <= sinks + window:
        return k, v, k_pos
    info = step_info(q_pos)

    def leaving():  # position L - 1 - window, or -2 (no slot) where it is a sink
        old = (info.length - 1 - window)[:, None, None]
        return torch.where(old >= sinks, old, -2)

    plan = slot_memo(info, ("slots", sinks, window), k_pos)  # every layer holds the same positions in the same slots
    if "j" in plan:
        return tuple(place_new_token((k, v, k_pos), k_pos, None, None, static=True, plan=plan))
    hit = k_pos == memo(info, ("streaming", sinks, window), leaving)
    return tuple(place_new_token((k, v, k_pos), k_pos, hit.any(dim=-1), _first(hit), static=True, plan=plan))


# ----------------------------------------------------------------------------------- FastGen
def rank_key(score: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[B, Hk, S] int64 keys ordering slots by (score descending, position ascending); empty slots -1.

    Scores are >= 0 (sums of probabilities), so their fp32 bit patterns order like their values;
    the position fills the low 32 bits reversed. Keys are unique per head: a top-k over them has
    no ties and picks the earlier position of equal scores, as ``topk_mask`` does on the
    reference's position-ordered slots.
    """
    bits = (score.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    key = bits * (1 << 32) + ((1 << 32) - 1 - k_pos)
    return torch.where(k_pos >= 0, key, torch.full_like(key, -1))


def frequent_slots(score, k_pos, count: int, frac: float, length) -> torch.Tensor:
    """[B, Hk, S] bool: ``fastgen_ref``'s frequent set (``topk_mask`` over every valid slot) on unordered slots.

    Token-count budget: one ``topk`` with a static k. Fraction budget (k differs per row): the k-th
    largest key per row from a descending sort of the [B, Hk, S] keys (scores only; k/v are not touched).
    """
    key = rank_key(score, k_pos)
    S = key.shape[-1]
    if frac == 0:
        n = min(count, S)
        if n == 0:
            return torch.zeros_like(k_pos, dtype=torch.bool)
        thr = torch.topk(key, n, dim=-1).values[..., -1:]
        return (key >= thr) & (k_pos >= 0)
    kb = budget(count, frac, length).view(-1, 1, 1).expand(*key.shape[:2], 1)
    ordered = key.sort(dim=-1, descending=True).values
    thr = ordered.gather(-1, (kb - 1).clamp(0, S - 1))
    return (key >= thr) & (kb > 0) & (k_pos >= 0)


def fastgen_slots(q, k, v, q_pos, k_pos, score, token_class, new_class, policy, scale, recovery,
                  local_n, local_f, frequent_n, frequent_f, criterion, force, key_bias=None):
    """``evict_fastgen`` on slots at decode (reference at prefill). -> (k, v, k_pos, score, token_class, policy).

    Every slot a head no longer keeps gets position -1 in place (several may leave in one step:
    the frequent top-k is re-ranked over all tokens); the new token then moves into the first
    empty slot, or stays at slot S (the cache grows) when the head keeps all S + 1.
    """
    S1 = k_pos.shape[2]
    if not _slot_decode(q_pos, k, v, k_pos) or policy.shape[-1] != 1 or score.shape[2] != S1 - 1 \
            or token_class.shape[2] != S1 - 1 or score.dtype != torch.float32:
        return fastgen_reference(q, k, v, q_pos, k_pos, score, token_class, new_class, policy, scale, recovery,
                                 local_n, local_f, frequent_n, frequent_f, criterion, force, key_bias)
    B, Hk = k_pos.shape[:2]
    score = cache_append(score, score.new_zeros(B, Hk, 1), 2)
    score.add_(decode_colsum(q, k, q_pos, k_pos, scale, key_bias))  # the running sum: this step's attention
    cls = cache_append(token_class, new_class.to(token_class.dtype)[:, None, :].expand(B, Hk, 1), 2)
    length = q_pos.max(dim=1).values + 1
    p = policy  # [B, Hk, 1]
    keep = (cls == SPECIAL) | ((p >= 1) & (cls == PUNCT)) | (p >= FULL)
    keep |= (p >= 2) & frequent_slots(score, k_pos, frequent_n, frequent_f, length)
    local = (length[:, None, None] - 1 - k_pos) < budget(local_n, local_f, length)[:, None, None]
    keep |= (p >= 3) & local
    k_pos.masked_fill_(~keep, -1)  # every leaving token's slot is empty now (the new token's included)
    S = S1 - 1
    dropped = k_pos[..., S] < 0  # the new token left (or the row is padding): nothing to move
    out = place_new_token((k, v, k_pos, score, cls), k_pos, dropped, torch.full_like(dropped, S, dtype=torch.long), False)
    return (*out, policy)


# ----------------------------------------------------------------------------------- RoPE by cache index
def position_rank(k_pos: torch.Tensor) -> torch.Tensor:
    """[B, Hk, S] long: each valid slot's rank by position among its head's valid slots (empty slots
    get ranks past them). Equals ``rope_index_ref.cache_index`` on valid slots of a position-ordered cache."""
    key = torch.where(k_pos >= 0, k_pos, torch.iinfo(k_pos.dtype).max)
    order = key.argsort(dim=-1)
    ar = torch.arange(k_pos.shape[-1], device=k_pos.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


class _RankMemo(threading.local):
    """Per thread: (copy of the last ``k_pos``, inv_freq, scaling, cos, sin, inference mode) of ``rope_cache_index_ranked``.

    Every layer of a StreamingLLM step holds the same positions in its own ``key_positions`` state, so
    the ranks (an argsort per head) and their cos/sin rows are computed by the first layer and
    reused by the next ones after a value comparison of ``k_pos`` (inference tensors carry no
    version counter, so identity is not enough)."""
    entry: tuple = ()


_RANK_MEMO = _RankMemo()


def _ranked_cos_sin(k_pos, inv_freq, scaling: float):
    if torch.compiler.is_compiling():
        return rope_cos_sin(position_rank(k_pos), inv_freq, scaling)
    m = _RANK_MEMO.entry
    mode = torch.is_inference_mode_enabled()  # rows made under inference_mode are not reused outside it
    if (m and m[1] is inv_freq and m[2] == scaling and m[5] == mode and m[0].shape == k_pos.shape
            and torch.equal(m[0], k_pos)):
        return m[3], m[4]
    cos, sin = rope_cos_sin(position_rank(k_pos), inv_freq, scaling)  # [B, Hk, S, R/2], scaling folded in
    _RANK_MEMO.entry = (k_pos.clone(), inv_freq, scaling, cos, sin, mode)
    return cos, sin


def rope_cache_index_ranked(q, k, k_pos, inv_freq, scaling: float):
    """``rope_cache_index`` with the cache index taken by position rank (slots may be in any order).

    The step's T queries are the last T slots (cache_append puts new tokens there). -> (q_rot, k_rot).
    StreamingLLM re-rotates every cached key at every step (its keys stay pre-RoPE): cos/sin come
    from ``rope_table`` (rows gathered once per step and reused by every layer whose positions are
    equal, ranks included: ``_RankMemo``), and the query heads of a KV head share its rows.
    """
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    cos, sin = _ranked_cos_sin(k_pos, inv_freq, scaling)
    qg = q.view(B, Hk, H // Hk, T, D)
    q_rot = rotate_rows(qg, cos[:, :, None, S - T:], sin[:, :, None, S - T:]).view(B, H, T, D)
    return q_rot, rotate_rows(k, cos, sin)


# ----------------------------------------------------------------------------------- RoPE inversion
def rope_invert_fast(x, pos, inv_freq, scaling: float):
    """``rope_index_ref.rope_invert_reference`` with the angles of the step's positions computed once per step.

    Every StreamingLLM layer inverts its query and new key at the same ``pos`` (the step's positions
    tensor): the first call of a step computes cos/sin (``rope_angles``, the reference's own function,
    so the result is bit-identical) and the others reuse them (``step_memo``)."""
    if torch.compiler.is_compiling():
        return rope_invert_reference(x, pos, inv_freq, scaling)
    info = step_info(pos)
    hit = info.extra.get(("rope_invert", id(inv_freq)))
    if hit is None or hit[0] is not inv_freq:
        cos, sin = rope_angles(pos, inv_freq)
        hit = info.extra[("rope_invert", id(inv_freq))] = (inv_freq, cos[:, None], -sin[:, None])
    return _rotate(x, hit[1], hit[2], 1.0 / scaling)


SLOT_OVERRIDES = {
    EVICT_H2O: h2o_slots,
    EVICT_STREAMING: streaming_slots,
    EVICT_FASTGEN: fastgen_slots,
    ROPE_CACHE_INDEX: rope_cache_index_ranked,
    ROPE_INVERT: rope_invert_fast,
}
