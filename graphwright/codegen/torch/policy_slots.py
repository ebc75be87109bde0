"""Slot decode for the generic scored op, Keyformer and Scissorhands (torch backend).

``eviction_slots.py`` puts H2O, StreamingLLM and FastGen on fixed-capacity per-head slots; this
module does the same for the eviction ops that still compacted at every decode step:
``evict_scored``/``evict_scored_acc`` with ``when="decode"`` (``evict(score=..., when="decode")``,
``ops/policy_scored.py``), Keyformer (``ops/policy_keyformer.py``, arXiv 2403.09054) and
Scissorhands (``ops/policy_scissorhands.py``, arXiv 2305.17118). At a decode step (T = 1, the new
token appended at slot S by ``cache_append``) each computes its score over the S + 1 slots, picks
per (row, KV head) at most one victim with tensor ops (an ``amin`` and an ``argmax``: no sort, no
gather of k/v) and moves the new token into the victim's slot or the first empty one
(``eviction_slots.place_new_token``); the references stay the definition and run every prefill
(T > 1) and every step this module cannot take.

Why one victim is enough (the invariant the references keep, checked by the tests over hundreds of
steps): the cache entering a decode step is the kept set of the previous step, the budget of a
row never shrinks (a token count, or count + floor(f * L) with L growing by one), and the always-kept
part (sinks, the recent window) gains at most one position per step, so at most one token leaves.

Per-slot state, per scorer (which is constant per token, which must be recomputed):

* ``h2o`` (cumulative attention, ``evict_scored_acc``): a running sum in the op's state; the
  step's attention is added in place (``eviction_slots.decode_colsum``, the probabilities of the
  layer's own attention when ``scored_attention`` gave it ``attention_sdpa_scored``).
* ``knorm``: -||k|| is a per-token constant. The op has no state to keep it in, so it is
  recomputed over the slots: one norm over [S, D] per head, no softmax (cheaper than the step's
  q.k). A per-slot state would save that read; the op schema (shared with ONNX and the compiled
  backend) is left as it is.
* ``keydiff``: -cos(k, mean unit key) depends on every cached key (the anchor moves when a key
  leaves), so it is recomputed over the slots (two passes over [S, D]).
* ``tova``: the step's last-query attention, averaged over all heads: the step's probabilities,
  shared with the attention; one score per layer, so every KV head holds the same positions in
  the same slots (same victims from the same layout).
* Keyformer: a running sum (noisy attention) in the op's state, updated in place. The Gumbel noise
  is drawn by the reference per *compacted slot index* from a seeded CPU generator; on slots that
  index is each token's rank by position (the new token: the reference's last slot, the widest
  head's count), so one argsort of the [B, Hk, S] positions per layer and step (positions only,
  k/v never move) and one CPU draw of B * H * (S + 1) values (a prefix of the reference's draw: the
  generator fills in order). ``noise="none"`` skips both. The step counter is one host read of
  ``meta`` (as the reference).
* Scissorhands: the ring of indicator bits and the per-slot count are state; the step's bit is
  written in place into one byte column; the importance (ones in the ring / recorded) is
  recomputed (a 256-entry table lookup over [S, ceil(m/8)] bytes): the bit that leaves the ring
  differs per slot, so no running total can be kept without an extra state. One host read of the
  ring index ``step``.

Not on slots (reference, compacting; correct, but each step sorts and gathers): ``when`` other than
``decode`` (``every``/``overflow``/``block`` drop many tokens at once), ``chunk`` > 0 (ChunkKV drops
whole chunks), ``rule="pyramid"`` (its per-layer budgets are Python ints per head: a host loop),
``evict_scored_rope``/``_reuse`` (prefill-only scorers / ChunkKV reuse), latent layers (one
payload for all heads). Ties and tie-breaks are the references': the top-k keeps the earlier
position of equal scores (the victim is the latest), Scissorhands drops the oldest of equal
importance.

Invariants tested (``tests/passes/test_policy_slots.py``): on tiny Llama, batch 2 left-padded, the
torch backend (slots) and the torch backend with the compacting references keep the same position
sets per (row, layer, KV head) after every step over hundreds of decode steps, logits within 1e-4,
the same greedy tokens, for evict(score=h2o/knorm/tova/keydiff, when=decode) with token-count and
fraction budgets, Keyformer (Gumbel noise and none) and Scissorhands; op level on random attention
against the references; buffers flat once the budget is reached.
"""

from __future__ import annotations

import torch

from ...ops.eviction import EVICT_KEYFORMER, EVICT_SCISSORHANDS, EVICT_SCORED, EVICT_SCORED_ACC
from ...ops.eviction_ref import budget
from ...ops.policy_keyformer import keyformer_reference, stream_seed
from ...ops.policy_scissorhands import popcount, ring_bytes, scissorhands_reference
from ...ops.policy_scored import scored_reference
from ...ops.scorers import SCORERS, ScoreInputs
from .cache_append import cache_append
from .decode_probs import step_probs
from .eviction_slots import _slot_decode, decode_colsum, place_new_token, position_rank
from .step_memo import step_info

SLOT_SCORERS = ("h2o", "knorm", "keydiff", "tova")  # decode scorers whose score is per slot (order free)


def victim_latest(score, cand, k_pos):
    """[B, Hk] the candidate slot with the lowest score, the latest position among ties (top-k keeps the earlier).

    Out of place (shared with the ONNX decode graph, ``codegen/onnx/decode_policies.py``)."""
    s = torch.where(cand, score, float("inf"))
    return torch.where(s == s.amin(dim=-1, keepdim=True), k_pos, -1).argmax(dim=-1)


# ----------------------------------------------------------------------------------- evict(score=...)
def scored_decodes_on_slots(scorer: str, when: str, chunk: int, beta: float) -> bool:
    """The static settings this module takes at decode (the rest runs the compacting reference)."""
    return when == "decode" and chunk == 0 and beta == 0 and scorer in SLOT_SCORERS


def _scored_slots(q, k, v, q_pos, k_pos, score, rest, acc: bool):
    (scale, scorer, when, every, slack, budget_n, budget_f, sinks, window, kernel, smooth, pool, chunk, chunk_heads,
     beta, layer, num_layers, n_future, eps, rope_scaling, window_f, *bias) = rest
    S1 = k_pos.shape[2]
    B, Hk = k_pos.shape[:2]
    if acc:
        score = cache_append(score, score.new_zeros(B, Hk, 1), 2)
        score.add_(decode_colsum(q, k, q_pos, k_pos, scale))  # the reference scores without key_bias
    static = budget_f == 0 and window_f == 0
    if static and S1 <= budget_n:  # nothing can be over a token-count budget
        return (k, v, k_pos, score) if acc else (k, v, k_pos)
    over, victim = scored_victim(q, k, v, q_pos, k_pos, score, scale, scorer, budget_n, budget_f, sinks, window, window_f)
    # token counts: sinks + window <= budget (the pass refuses more), so a head under budget has an empty slot
    tensors = (k, v, k_pos, score) if acc else (k, v, k_pos)
    return tuple(place_new_token(tensors, k_pos, over, victim, static))


def scored_victim(q, k, v, q_pos, k_pos, score, scale, scorer: str, budget_n: int, budget_f: float, sinks: int,
                  window: int, window_f: float):
    """(over [B, Hk] bool, victim [B, Hk] slot) of ``evict_scored(_acc)`` with ``when="decode"`` at a decode step.

    ``k_pos`` [B, Hk, S+1] (the new token at slot S), ``score`` the running sum with this step's attention
    added (``_acc``; None otherwise). Out of place: the ONNX decode graph calls it too (``decode_policies.py``)."""
    info = step_info(q_pos)
    length = info.length
    win_f = budget(0, window_f, length)
    cap = budget(budget_n, budget_f, length) + win_f  # [B]
    valid = k_pos >= 0
    protected = valid & ((k_pos < sinks) | (k_pos >= (length - window - win_f)[:, None, None]))
    cand = valid & ~protected
    count = (cap[:, None] - protected.sum(-1)).clamp(min=0)  # [B, Hk] evictable tokens kept
    over = cand.sum(-1) > count
    if scorer == "tova":  # the step's probabilities (the attention's), mean over g then over every KV head
        a = step_probs(q, k, q_pos, k_pos, scale).mean(dim=2) * info.real
        s = a.mean(dim=1, keepdim=True).expand_as(a)
    else:
        x = ScoreInputs(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, scale=scale, cand=cand, length=length, state=score)
        s = SCORERS[scorer].fn(x)
    return over, victim_latest(s, cand, k_pos)


def _scored_entry(q, k, v, q_pos, k_pos, rest, acc: bool):
    score = rest[0] if acc else None
    params = rest[1:] if acc else rest
    scorer, when, chunk, beta = params[1], params[2], params[12], params[14]
    S1 = k_pos.shape[2]
    ok = _slot_decode(q_pos, k, v, k_pos) and scored_decodes_on_slots(scorer, when, chunk, beta)
    if ok and acc:
        ok = score.shape[2] == S1 - 1 and score.dtype == torch.float32
    if not ok:
        return scored_reference(q, k, v, q_pos, k_pos, *rest, acc=acc)
    return _scored_slots(q, k, v, q_pos, k_pos, score, params, acc)


def scored_slots(q, k, v, q_pos, k_pos, *rest):
    """``evict_scored`` on slots at decode (knorm, keydiff, tova with ``when="decode"``); else the reference."""
    return _scored_entry(q, k, v, q_pos, k_pos, rest, acc=False)


def scored_acc_slots(q, k, v, q_pos, k_pos, *rest):
    """``evict_scored_acc`` (cumulative attention) on slots at decode with ``when="decode"``; else the reference."""
    return _scored_entry(q, k, v, q_pos, k_pos, rest, acc=True)


# ----------------------------------------------------------------------------------- Keyformer
def reference_slot_index(k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [B, Hk, S+1], width) of each slot in the reference's compacted layout of this step.

    The reference's cache entering the step holds each head's kept tokens in position order, padded
    to the widest head's count W; the new token is its slot W. So a cached slot's index is its rank
    by position among its head's valid slots, the new token's is W (a 0-dim tensor; width = W + 1).
    """
    S = k_pos.shape[2] - 1
    prev = k_pos[..., :S]
    width = (prev >= 0).sum(dim=-1).amax()
    idx = torch.cat([position_rank(prev), width.expand(*k_pos.shape[:2], 1)], dim=-1)
    return idx, width + 1


def slot_gumbel(seed: int, layer: int, step: int, k_pos, H: int) -> torch.Tensor:
    """[B, Hk, g, S+1] fp32: the reference's Gumbel draw for each slot's token (``gumbel_noise``, one decode query)."""
    B, Hk, S1 = k_pos.shape
    g = torch.Generator().manual_seed(stream_seed(seed, layer, step))
    fi = torch.finfo(torch.float32)
    n = B * H * S1  # >= B * H * width: the reference's draw is a prefix of this one
    u = torch.rand(n, generator=g, dtype=torch.float32).clamp_(fi.tiny, 1.0 - fi.eps)
    zeta = -torch.log(-torch.log(u))
    idx, width = reference_slot_index(k_pos.cpu())
    gh = H // Hk
    heads = torch.arange(B * H).view(B, Hk, gh, 1)
    flat = (heads * width + idx[:, :, None, :]).clamp(max=n - 1)  # empty slots: any value (masked)
    return zeta[flat].to(k_pos.device)


def keyformer_slots(q, k, v, q_pos, k_pos, score, meta, scale, kv_n, kv_f, recent, tau_init, tau_delta,
                    seed, layer, noise, key_bias=None):
    """``evict_keyformer`` on slots at decode (reference at the first step). -> (k, v, k_pos, score, meta)."""
    S1 = k_pos.shape[2]
    if not _slot_decode(q_pos, k, v, k_pos) or meta.shape[-1] != 3 or noise not in ("gumbel", "none") \
            or score.shape[2] != S1 - 1 or score.dtype != torch.float32:
        return keyformer_reference(q, k, v, q_pos, k_pos, score, meta, scale, kv_n, kv_f, recent, tau_init, tau_delta,
                                   seed, layer, noise, key_bias)
    B, Hk = k_pos.shape[:2]
    step = int(meta[0, 0, 2])  # the step counter (one host read, as the reference)
    tau = tau_init + step * tau_delta
    score = cache_append(score, score.new_zeros(B, Hk, 1), 2)
    zeta = slot_gumbel(seed, layer, step, k_pos, q.shape[1]) if noise == "gumbel" else None
    score.add_(keyformer_step_score(q, k, q_pos, k_pos, scale, tau, key_bias, zeta))
    over, victim = keyformer_victim(score, k_pos, step_info(q_pos).length, meta[:, 0, 0], meta[:, 0, 1])
    out = place_new_token((k, v, k_pos, score), k_pos, over, victim, False)  # per-row budgets: may grow
    return (*out, meta + _META_STEP.to(meta.device))


def keyformer_step_score(q, k, q_pos, k_pos, scale, tau, key_bias=None, zeta=None) -> torch.Tensor:
    """[B, Hk, S] fp32: ``noisy_colsum`` for one decode query over unordered slots: softmax((x + zeta) / tau)
    over the visible slots, summed over the g query heads (a padding row adds 0).

    ``tau``: a float, or a tensor broadcasting to [B, Hk, 1, 1] (the ONNX decode graph reads the step from
    its state); ``zeta`` [B, Hk, g, S] or None. Out of place (shared with ``codegen/onnx/decode_policies.py``)."""
    B, H, _, D = q.shape
    Hk, S1 = k.shape[1], k.shape[2]
    x = torch.bmm(q.float().reshape(B * Hk, H // Hk, D), k.float().flatten(0, 1).transpose(1, 2))
    x = x.view(B, Hk, H // Hk, S1) * scale
    if key_bias is not None:
        x = x + key_bias.float().view(B, Hk, H // Hk, S1)
    if zeta is not None:
        x = x + zeta
    info = step_info(q_pos)
    visible = (k_pos >= 0) & (k_pos <= info.q_lift)
    x = torch.where(visible[:, :, None], x / tau, torch.finfo(torch.float32).min)
    return torch.softmax(x, dim=-1).sum(dim=2) * info.real


def keyformer_victim(score, k_pos, length, kb, wb):
    """(over, victim) [B, Hk] of ``keyformer_keep`` at a decode step: the last w - 1 positions are kept, at most
    k - 1 - that many older ones; over budget, the older slot with the lowest score (ties: the latest) leaves.
    ``kb``, ``wb`` [B]: the budget frozen at the first step. Out of place (shared with the ONNX decode graph)."""
    rec = (wb - 1).clamp(min=0)
    cand = (k_pos >= 0) & (k_pos < (length - rec)[:, None, None])
    over = cand.sum(-1) > (kb - 1 - rec).clamp(min=0)[:, None]
    return over, victim_latest(score, cand, k_pos)


_META_STEP = torch.tensor([0, 0, 1])


# ----------------------------------------------------------------------------------- Scissorhands
def scissorhands_slots(q, k, v, q_pos, k_pos, bits, count, step, scale, budget_, history, recent, sinks, key_bias=None):
    """``evict_scissorhands`` on slots at decode (reference at the first step). -> (k, v, k_pos, bits, count, step)."""
    S1 = k_pos.shape[2]
    W = ring_bytes(history)
    if not _slot_decode(q_pos, k, v, k_pos) or step.shape[-1] != 1 or bits.shape[2] != S1 - 1 \
            or count.shape[2] != S1 - 1 or bits.shape[-1] != W:
        return scissorhands_reference(q, k, v, q_pos, k_pos, bits, count, step, scale, budget_, history, recent, sinks,
                                      key_bias)
    B, Hk = k_pos.shape[:2]
    t = int(step[0, 0, 0])  # the ring index (one host read, as the reference)
    bits = cache_append(bits, bits.new_zeros(B, Hk, 1, W), 2)
    count = cache_append(count, count.new_zeros(B, Hk, 1), 2)
    valid = k_pos >= 0
    u, n = scissorhands_indicators(q, k, q_pos, k_pos, scale, key_bias)
    r = t % history
    col = bits[..., r // 8]  # a strided view: written in place
    mask = 1 << (r % 8)
    col.copy_(torch.where(valid, (col & (255 - mask)) | (u.to(torch.uint8) * mask), col))
    count.copy_(torch.where(valid, (count + 1).clamp(max=history), count))
    new_step = step + 1
    if S1 <= budget_ - 1:  # nothing is over the budget
        return k, v, k_pos, bits, count, new_step
    imp = popcount(bits).double() / count.clamp(min=1)
    over, victim = scissorhands_victim(imp, k_pos, step_info(q_pos).length, n, budget_, recent, sinks)
    static = sinks + recent <= budget_ - 1  # a head that is not over holds <= budget - 1 < S + 1 tokens
    return (*place_new_token((k, v, k_pos, bits, count), k_pos, over, victim, static), new_step)


def scissorhands_indicators(q, k, q_pos, k_pos, scale, key_bias=None):
    """(u [B, Hk, S] bool, n [B, Hk, 1]): this decode step's indicators u[j] = A[j] >= 1 / n (one query row, so
    the mean over the rows that see j is A[j] itself; n = the head's valid slots, the new token included).
    Out of place (shared with ``codegen/onnx/decode_policies.py``)."""
    valid = k_pos >= 0
    seen = valid & (k_pos <= q_pos[:, -1:, None]) & (q_pos[:, -1:, None] >= 0)
    total = decode_colsum(q, k, q_pos, k_pos, scale, key_bias)
    n = valid.sum(dim=-1, keepdim=True)
    return seen & (total.double() * n >= 1.0), n


def scissorhands_victim(imp, k_pos, length, n, budget_: int, recent: int, sinks: int):
    """(over, victim) [B, Hk] of ``scissorhands_keep`` at a decode step: a head holding more than budget - 1 slots
    drops its lowest-importance slot that is neither a sink nor recent (ties: the oldest). Out of place."""
    protected = (k_pos < sinks) | (k_pos >= (length - recent)[:, None, None])
    cand = (k_pos >= 0) & ~protected
    over = (n[..., 0] > budget_ - 1) & cand.any(dim=-1)
    s = torch.where(cand, imp, float("inf"))
    big = torch.iinfo(k_pos.dtype).max
    victim = torch.where(s == s.amin(dim=-1, keepdim=True), k_pos, big).argmin(dim=-1)  # ties: the oldest leaves
    return over, victim


POLICY_SLOT_OVERRIDES = {
    EVICT_SCORED: scored_slots,
    EVICT_SCORED_ACC: scored_acc_slots,
    EVICT_KEYFORMER: keyformer_slots,
    EVICT_SCISSORHANDS: scissorhands_slots,
}
