"""In-graph decode for the scored policies: ``evict(score=..., when="decode")``, Scissorhands, Keyformer.

``decode_slots.decode_graph`` puts these functions in ``decode.onnx`` in place of the eviction ops
``evict_scored``/``evict_scored_acc`` (scorers h2o, knorm, keydiff, tova with ``when="decode"``,
``ops/policy_scored.py``), ``evict_scissorhands`` (arXiv 2305.17118, ``ops/policy_scissorhands.py``)
and ``evict_keyformer`` with ``noise="none"`` (arXiv 2403.09054, ``ops/policy_keyformer.py``), so a
decode step of those recipes is one ONNX Runtime session run with nothing split. The algorithm is
the torch backend's (``codegen/torch/policy_slots.py``, its docstring says why one victim per step
is enough): per (row, KV head) the step's score over the S + 1 slots (the new token appended at
slot S), at most one victim (an ``amin`` and an ``argmax``), and the new token's row moved into the
victim's slot or the first empty one (``decode_slots.place``: ScatterElements, the first S slots
returned, so the state keeps its shape). The score, budget and victim functions are the torch
backend's own (``scored_victim``, ``keyformer_step_score``/``keyformer_victim``,
``scissorhands_indicators``/``scissorhands_victim``: out of place, shared); what differs here is
what the torch backend does in place or with a host read:

* the running sums (cumulative attention, Keyformer's score) are added out of place;
* Keyformer's step counter and frozen budget are read from its ``meta`` state [B, Hk, 3] as tensors
  (tau = tau_init + t * tau_delta in fp64, then fp32, as Python's float against an fp32 tensor), and a
  zero ``meta`` (a cache that starts at this step: ``pad_to_capacity`` filled it) freezes the budget
  here (``policy_keyformer.frozen_budget``);
* Scissorhands' ring index is read from its ``step`` state as a tensor, so the bit column it writes
  is data dependent: the packed ring [B, Hk, S+1, ceil(m/8)] uint8 is unpacked to its m' = 8 ceil(m/8)
  indicator bits (integer Div and Mod by the 8 bit weights), the step's bit is written where the ring
  slot equals t mod m (Where), the bits are packed back (a weighted ReduceSum) and the importance is
  the unpacked ring's sum (the reference's popcount) over the recorded count.

Capacities (``graphwright.json["decode"]["capacity"]``): a token-count budget gives a fixed slot count,
what the reference keeps at most after a step: ``evict_scored`` max(budget, sinks + window),
Keyformer k - 1, Scissorhands max(budget - 1, sinks + recent); fraction budgets (``budget=0.3``,
``window=0.1``, Keyformer ``kv=0.5``: the budget frozen at each row's prompt length) grow
(``decode_slots`` "grow"). Per-head state (Keyformer's ``meta``, Scissorhands' ``step``) keeps its width.

Left split at decode (runs in torch between session runs; the reason is recorded in
``graphwright.json["decode"]["split"]``): ``evict(when=...)`` other than ``decode`` (several tokens
leave at once, on a schedule), ChunkKV (``chunk`` > 0: whole chunks leave), ``rule="pyramid"``
(per-layer budgets from a host loop over heads), the prefill scorers (no per-slot decode score), and
Keyformer with ``noise="gumbel"``: its noise is drawn from a seeded CPU ``torch.Generator`` (Mersenne
Twister) by *compacted* slot index, the token's rank by position with the widest head's count as the
new token's index; ONNX's RandomUniform cannot reproduce that stream, so the draw stays on the host.

Invariants tested (``tests/onnx/test_onnx_policy_decode.py``): on tiny Llama, batch 2 left-padded,
eviction at every step, 48 decode steps: the exported artifact (prefill split, decode in
``decode.onnx``) keeps the same position sets per (row, layer, KV head) as the torch backend's slots
and the compacting references after every step, the same tokens, logits within 1e-4, no decode split
records, state shapes constant once a token-count budget is reached; op level on random attention,
each function against its reference over 120 steps, a 1-token prompt included.
"""

from __future__ import annotations

import torch

from ...ops import schema
from ...ops.eviction import EVICT_KEYFORMER, EVICT_SCISSORHANDS, EVICT_SCORED, EVICT_SCORED_ACC
from ...ops.policy_keyformer import frozen_budget
from ...ops.policy_scissorhands import ring_bytes
from ..torch.eviction_slots import decode_colsum
from ..torch.policy_slots import SLOT_SCORERS, keyformer_step_score, keyformer_victim, scissorhands_indicators, scissorhands_victim, scored_victim
from ..torch.step_memo import step_info
from .decode_slots import place

KEYFORMER_NOISE_REASON = ("Keyformer noise='gumbel': the noise is drawn from a seeded CPU torch.Generator by compacted "
                          "slot index (the reference's layout); ONNX RandomUniform cannot reproduce that stream")
_BITS = (1, 2, 4, 8, 16, 32, 64, 128)  # the weight of bit i of a ring byte (ring slot 8 * byte + i)


def scored_split_reason(scorer: str, when: str, chunk: int, beta: float) -> str | None:
    """Why an ``evict_scored(_acc)`` setting stays split at decode (None: it runs in the graph)."""
    if when != "decode":
        return (f"evict(when={when!r}) evicts on its schedule (several tokens at once, or none): only when='decode' "
                "(at most one token per step) runs on slots")
    if chunk > 0:
        return "ChunkKV (chunk > 0) keeps whole chunks: several tokens leave at once"
    if beta > 0:
        return "rule='pyramid': its per-layer budgets come from a host loop over heads (adakv_ref.pyramid_budget)"
    if scorer not in SLOT_SCORERS:
        return f"score={scorer!r} is a prefill scorer: no per-slot score at a decode step"
    return None


def translation(node):
    """(decode function, fixed slot count or None when it grows, None), (None, None, why it stays split), or
    None when ``node`` is not one of this module's ops.

    A translated node's ``layer`` argument (read only by the pyramid rule and the Gumbel stream, both left
    split) is set to 0, so that every layer calls one slot function (``slot_functions.py`` keys by constants)."""
    t = node.target
    if t in (EVICT_SCORED, EVICT_SCORED_ACC):
        p = {n: schema.get(node, n) for n in ("scorer", "when", "chunk", "beta", "budget_n", "budget_f", "sinks", "window",
                                              "window_f")}
        why = scored_split_reason(p["scorer"], p["when"], int(p["chunk"]), float(p["beta"]))
        if why is not None:
            return None, None, why
        fixed = not p["budget_f"] and not p["window_f"]
        c = max(int(p["budget_n"]), int(p["sinks"]) + int(p["window"]), 1) if fixed else None
        schema.set(node, "layer", 0)
        return (scored_acc_decode if t is EVICT_SCORED_ACC else scored_decode), c, None
    if t is EVICT_KEYFORMER:
        if schema.get(node, "noise") != "none":
            return None, None, KEYFORMER_NOISE_REASON
        kv_n, kv_f = int(schema.get(node, "kv_n")), float(schema.get(node, "kv_f"))
        schema.set(node, "layer", 0)
        return keyformer_decode, (max(kv_n - 1, 1) if not kv_f else None), None
    if t is EVICT_SCISSORHANDS:
        b, r, s = (int(schema.get(node, n)) for n in ("budget", "recent", "sinks"))
        return scissorhands_decode, max(b - 1, r + s, 1), None
    return None


def scored_decode(q, k, v, q_pos, k_pos, scale, scorer, when, every, slack, budget_n, budget_f, sinks, window, kernel,
                  smooth, pool, chunk, chunk_heads, beta, layer, num_layers, n_future, eps, rope_scaling, window_f,
                  key_bias=None):
    """``evict_scored`` (knorm, keydiff, tova; ``when="decode"``) at a decode step over S >= capacity slots. -> (k, v, k_pos)."""
    over, victim = scored_victim(q, k, v, q_pos, k_pos, None, scale, scorer, budget_n, budget_f, sinks, window, window_f)
    return place((k, v, k_pos), k_pos, over, victim)


def scored_acc_decode(q, k, v, q_pos, k_pos, score, scale, scorer, when, every, slack, budget_n, budget_f, sinks, window,
                      kernel, smooth, pool, chunk, chunk_heads, beta, layer, num_layers, n_future, eps, rope_scaling,
                      window_f, key_bias=None):
    """``evict_scored_acc`` (cumulative attention, ``when="decode"``) at a decode step. -> (k, v, k_pos, score)."""
    B, Hk, _ = k_pos.shape
    # the running sum: this step's attention (the reference scores without key_bias)
    score = torch.cat([score, score.new_zeros(B, Hk, 1)], 2) + decode_colsum(q, k, q_pos, k_pos, scale)
    over, victim = scored_victim(q, k, v, q_pos, k_pos, score, scale, scorer, budget_n, budget_f, sinks, window, window_f)
    return place((k, v, k_pos, score), k_pos, over, victim)


def keyformer_decode(q, k, v, q_pos, k_pos, score, meta, scale, kv_n, kv_f, recent, tau_init, tau_delta, seed, layer,
                     noise, key_bias=None):
    """``evict_keyformer`` with ``noise="none"`` at a decode step. -> (k, v, k_pos, score, meta)."""
    B, Hk, _ = k_pos.shape
    length = step_info(q_pos).length
    first = meta[:, 0, 0] == 0  # k >= 1 once frozen: zeros are a cache that starts at this step (padded meta)
    k0, w0 = frozen_budget(kv_n, kv_f, recent, length)
    kb, wb = torch.where(first, k0, meta[:, 0, 0]), torch.where(first, w0, meta[:, 0, 1])
    step = meta[:, 0, 2]  # [B] the step counter (equal in every row; 0 at a first step)
    tau = (tau_init + step.double() * tau_delta).float().view(B, 1, 1, 1)
    score = torch.cat([score, score.new_zeros(B, Hk, 1)], 2) + keyformer_step_score(q, k, q_pos, k_pos, scale, tau, key_bias)
    over, victim = keyformer_victim(score, k_pos, length, kb, wb)
    meta = torch.stack([kb, wb, step + 1], dim=-1)[:, None, :].expand(B, Hk, 3).contiguous()
    return (*place((k, v, k_pos, score), k_pos, over, victim), meta)


def scissorhands_decode(q, k, v, q_pos, k_pos, bits, count, step, scale, budget, history, recent, sinks, key_bias=None):
    """``evict_scissorhands`` at a decode step (ring index from the ``step`` state). -> (k, v, k_pos, bits, count, step)."""
    B, Hk, _ = k_pos.shape
    W = ring_bytes(history)
    bits = torch.cat([bits, bits.new_zeros(B, Hk, 1, W)], 2)
    count = torch.cat([count, count.new_zeros(B, Hk, 1)], 2)
    valid = k_pos >= 0
    u, n = scissorhands_indicators(q, k, q_pos, k_pos, scale, key_bias)
    t = step[..., :1]  # [B, Hk, 1] the ring index t (0 at a first step: the padded state)
    weight = torch.tensor(_BITS, dtype=torch.int32, device=bits.device)
    ring = torch.div(bits.to(torch.int32)[..., None], weight, rounding_mode="floor") % 2  # [B, Hk, S+1, W, 8]
    ring_slot = torch.arange(W * 8, device=bits.device).view(W, 8)
    write = valid[..., None, None] & (ring_slot == (t % history)[..., None, None])
    ring = torch.where(write, u[..., None, None].to(torch.int32), ring)
    bits = (ring * weight).sum(dim=-1).to(torch.uint8)
    count = torch.where(valid, (count + 1).clamp(max=history), count)
    imp = ring.sum(dim=(-2, -1)).double() / count.clamp(min=1)
    over, victim = scissorhands_victim(imp, k_pos, step_info(q_pos).length, n, budget, recent, sinks)
    return (*place((k, v, k_pos, bits, count), k_pos, over, victim), t + 1)
