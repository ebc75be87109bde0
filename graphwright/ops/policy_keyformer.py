"""Keyformer as an eviction policy (arXiv 2403.09054): reference ``keyformer_reference``.

Technique (``../shared/ALGORITHMS-2.md`` §7; code d-matrix-ai/keyformer-llm
``scaled_multihead_dot_product_attention``): every step (prefill included) adds a noisy attention
score to each cached key, f = softmax((x + zeta) / tau_t) with x = q k^T * scale over the visible
keys, zeta ~ Gumbel(0, 1) i.i.d. per (row, query head, query, slot), tau_t = tau_init + t * tau_delta
(t = 0 at the first step, +1 per step). Then, per (batch row, KV head), the cache keeps the last
w - 1 positions plus the k - w highest accumulated scores among the older ones, so the next step
attends to at most k tokens (its own token fills the w-th recent slot, as in the source's mask).

Setting here (deviations from the source, which masks MHA heads with a batch-summed score):

* **Budget frozen at the first step**: k = kv_n + floor(kv_f * S_prompt) (an int count or a
  fraction of the row's real prompt length; at least 1), w = floor(k * recent); stored per row in
  the head state ``meta`` [B, Hk, 3] = (k, w, t) (empty before the first step: that is how the op
  knows the first step). A prompt fed in chunks freezes k at its first chunk.
* **Real eviction**: dropped slots are removed from k, v and the score (``compact``), so the mask
  is monotone by construction (a dropped token has no slot to come back to) and bytes shrink.
* **Per-sample scores**: each batch row accumulates only its own rows (the source's sum over the
  batch couples samples; we do not).
* **GQA**: a KV head's score is the *sum* of its g query heads' f (the source is MHA; the spec
  leaves GQA pooling unconfirmed and names the group sum).
* **Noise stream**: ``noise="gumbel"`` draws U ~ Uniform(0, 1) fp32 on the CPU from a
  ``torch.Generator`` seeded with ``stream_seed(seed, layer, t)``, in row chunks of ``ROW_CHUNK``
  queries, each chunk a [B, H, t, S] draw in order; U is clamped to [tiny, 1 - eps] and
  zeta = -log(-log(U)). So a run is reproducible for the same seed, layer, step and batch shape
  (padding changes S, hence the draw). ``noise="none"`` uses zeta = 0.

Exact setting: k >= S_prompt + max_new_tokens (an int ``kv``): nothing is ever dropped. kv = 1.0
(a fraction) is *not* exact for decode: k is frozen at the prompt length, so eviction starts at the
first new token. Oracles (``tests/passes/test_keyformer.py``): noise "none", tau 1 equals H2O's
accumulation (g times its mean score) and H2O's kept set; with a fixed injected noise table the
kept sets equal a per-step Python loop over hundreds of steps (batch 2, ragged).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..capture.ops import visible_mask
from .eviction_policy import EvictionPolicy, HeadState, Param, SlotState, register_policy
from .eviction_ref import ROW_CHUNK, compact, row_length, topk_mask

NOISES = ("gumbel", "none")
NoiseFn = Callable[[int, int, tuple], torch.Tensor]  # (step t, first row t0, shape [B, H, rows, S]) -> zeta fp32


def stream_seed(seed: int, layer: int, step: int) -> int:
    """The generator seed of one (seed, layer, step) noise stream."""
    return ((int(seed) * 1_000_003 + int(layer)) * 1_000_003 + int(step)) % (2 ** 63 - 1)


def gumbel_noise(seed: int, layer: int) -> NoiseFn:
    """zeta ~ Gumbel(0, 1) fp32 from the (seed, layer, step) stream; chunks must be asked for in row order."""
    gens: dict = {}

    def noise(step, t0, shape):
        g = gens.get(step)
        if g is None or t0 == 0:
            g = gens[step] = torch.Generator().manual_seed(stream_seed(seed, layer, step))
        fi = torch.finfo(torch.float32)
        u = torch.rand(shape, generator=g, dtype=torch.float32).clamp_(fi.tiny, 1.0 - fi.eps)
        return -torch.log(-torch.log(u))

    return noise


def noisy_colsum(q, k, q_pos, k_pos, scale, tau: float, noise: Optional[NoiseFn], step: int, key_bias=None):
    """[B, Hk, S] fp32: sum over real query rows and the g query heads of softmax((x + zeta) / tau)."""
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk
    kf = k.float().transpose(-1, -2)
    out = q.new_zeros(B, Hk, S, dtype=torch.float32)
    low = torch.finfo(torch.float32).min
    for t0 in range(0, T, ROW_CHUNK):
        t1 = min(t0 + ROW_CHUNK, T)
        x = torch.matmul(q[:, :, t0:t1].float().reshape(B, Hk, g, t1 - t0, D), kf[:, :, None]) * scale
        if key_bias is not None:
            x = x + key_bias.float().view(B, Hk, g, 1, S)
        if noise is not None:
            x = x + noise(step, t0, (B, H, t1 - t0, S)).to(x.device).view(B, Hk, g, t1 - t0, S)
        qp = q_pos[:, t0:t1]
        x = (x / tau).masked_fill(~visible_mask(qp, k_pos), low)
        p = torch.softmax(x, dim=-1) * (qp >= 0)[:, None, None, :, None]
        out = out + p.sum(dim=(2, 3))
    return out


def keyformer_keep(score, k_pos, length, k, w):
    """[B, Hk, S] bool: the last max(w - 1, 0) positions plus the k - 1 - that many best older scores (k, w: [B])."""
    valid = k_pos >= 0
    recent = (w - 1).clamp(min=0)
    is_recent = valid & (k_pos >= (length - recent)[:, None, None])
    return is_recent | topk_mask(score, valid & ~is_recent, (k - 1 - recent).clamp(min=0))


def frozen_budget(kv_n: int, kv_f: float, recent: float, length: torch.Tensor):
    """(k, w) [B] long, frozen at the first step: k = max(kv_n + floor(kv_f * L), 1), w = floor(k * recent)."""
    kb = (kv_n + torch.floor(kv_f * length.double() + 1e-9).long()).clamp(min=1)
    return kb, torch.floor(kb.double() * recent + 1e-9).long()


def keyformer_step(q, k, v, q_pos, k_pos, score, meta, scale, kv_n, kv_f, recent, tau_init, tau_delta,
                   noise: Optional[NoiseFn], key_bias=None):
    """One step with an explicit noise function (None: zeta = 0) -> (k, v, k_pos, score, meta)."""
    B, Hk, S = k.shape[:3]
    length = row_length(q_pos)
    if meta.shape[-1] == 0:  # first step: freeze the budget at the prompt length
        kb, wb = frozen_budget(kv_n, kv_f, recent, length)
        step = 0
    else:
        kb, wb, step = meta[:, 0, 0], meta[:, 0, 1], int(meta[0, 0, 2])
    tau = tau_init + step * tau_delta
    score = torch.cat([score.float(), score.new_zeros(B, Hk, S - score.shape[2], dtype=torch.float32)], dim=2)
    score = score + noisy_colsum(q, k, q_pos, k_pos, scale, tau, noise, step, key_bias)
    keep = keyformer_keep(score, k_pos, length, kb, wb)
    new_meta = torch.stack([kb, wb, torch.full_like(kb, step + 1)], dim=-1)[:, None, :].expand(B, Hk, 3).contiguous()
    return (*compact(keep, k, v, k_pos, (score,)), new_meta)


def keyformer_reference(q, k, v, q_pos, k_pos, score, meta, scale, kv_n, kv_f, recent, tau_init, tau_delta,
                        seed, layer, noise, key_bias=None):
    """Accumulate this step's noisy score, then keep recent + key tokens -> (k, v, k_pos, score, meta)."""
    if noise not in NOISES:
        raise ValueError(f"keyformer: noise must be one of {NOISES}; got {noise!r}")
    fn = gumbel_noise(seed, layer) if noise == "gumbel" else None
    return keyformer_step(q, k, v, q_pos, k_pos, score, meta, scale, kv_n, kv_f, recent, tau_init, tau_delta, fn, key_bias)


KEYFORMER_POLICY = EvictionPolicy(
    name="keyformer",
    reference=keyformer_reference,
    slot_state=(SlotState("score", torch.float32, state="keyformer_score"),),
    head_state=(HeadState("meta", torch.long, width=3, state="keyformer_meta"),),
    params=(Param("kv_n", "int"), Param("kv_f", "float"), Param("recent", "float"), Param("tau_init", "float"),
            Param("tau_delta", "float"), Param("seed", "int"), Param("layer", "int"), Param("noise", "str")),
    doc="Keyformer: keep a recent window plus key tokens by an accumulated Gumbel-softmax score.",
)
EVICT_KEYFORMER = register_policy(KEYFORMER_POLICY)
