"""The decode graph's H2O and StreamingLLM layers on (old slots, new row): no S + 1 copy to cut back, one attention.

``decode_slots.decode_graph`` gives each evicting layer a function of the step graph's S + 1
concatenation (``cat([state, new row])`` of k, v and positions) that scatters the new row into
the first S slots. In ``decode.onnx`` that costs, per layer, two Slices per state tensor (the
first S slots, the new row) and the Shape arithmetic of their bounds; H2O's running score also
recomputed this step's attention probabilities (q.k, mask, Softmax) next to the fused Attention
node that had just computed them. At a 256-token prompt these small nodes cost more than the 75%
of keys eviction saves (``bench/profile_onnx_decode.py``: 2431 nodes run per H2O step vs 805 dense).

``rows(gm)`` rewrites, after ``decode_graph``:

* an H2O layer (token or fraction budget with ``recent_n >= 1``: the new token is recent, never the
  victim) whose attention reads the same concatenations: the attention node and the eviction node
  become one ``h2o_attend_rows`` call. It takes the old state and the new row as they are (the
  concatenation's two inputs), computes the attention once, decomposed (fp32 q.k * scale, mask,
  fp32 Softmax, P @ v: ``attention_reference``'s math, as the torch backend's
  ``decode_probs.attend_slots``) and adds the same probabilities, averaged over each KV head's g
  query heads, to the running score (``eviction_slots.decode_colsum``'s value), then writes the new
  row into its slot: one ScatterElements per state tensor on the old state (``write_rows``);
* a StreamingLLM layer with ``window >= 1`` whose keys are cached at their positions (``streaming_shift.py``):
  its ``shifted_decode_attention`` and its eviction node become one ``streaming_attend_rows`` on (old slots,
  new row), as H2O's: one attention over the S + 1 keys (the leaving token is still attended at this step,
  as in the reference), then the new row written into the slot ``decode_slots.streaming_slot`` picks (one
  Equal, Where, ArgMin with keepdim over the old positions). The query's rotation back by the evicted count
  (``back_rotation`` [B, 1, D, D]) depends only on the step's positions: it is one node of the graph shared
  by every layer (inside each layer's function its identity and rotate-half constants were per-layer
  initializers ORT does not merge: four nodes per layer). With ``SINK_KEYS`` (the default) that layer instead
  keeps the plain ``attention`` op, ONNX's fused ``Attention`` as dense decoding has: the query stays at its
  absolute rotation and the sinks' keys are rotated forward by E (``sink_keys``: their stored keys, at rotation
  = position, gathered, one [sinks, D] x [D, D] MatMul with ``sink_rotation`` = R(+E), made once per step,
  scattered into a copy; the state keeps absolute rotations, nothing accumulates), so every key sits at (cache
  index + E) and the relative angles are the reference's; the eviction becomes ``streaming_rows``. With
  ``SHARED_ROWS`` (the default; session 12) the step's per-layer index arithmetic is made once: StreamingLLM keeps
  the same positions in every KV head of every layer with one (sinks, window) (the same rule applied to the same
  positions since the prompt step), so the slot the new row takes (``slot_index``: ``streaming_slot`` and its
  expanded scatter index), the sinks' slots (``sink_index``) and the attention's key positions (``key_positions``:
  head 0's [B, S + 1], so ONNX's ``Attention`` runs GQA on [B, Hk, S + 1, D] as dense decoding does, one
  [B, 1, 1, S + 1] mask, no Reshapes folding Hk into the batch) come from the first such layer's positions and are
  read by all; each layer keeps ``sink_keys_at`` (gather, [sinks, D] x [D, D] MatMul, scatter) and ``rows_at``
  (three ScatterElements). SmolLM2-135M, prompt 256: 1,657 -> 1,016 nodes run per decode step (dense 805).
  Latent StreamingLLM layers (``decode_latent.streaming_latent_decode``) are not rewritten;
* a StreamingLLM eviction with ``window >= 1`` whose attention is the plain op over its concatenations (keys at
  their own positions, no shift: DuoAttention's streaming heads; duo's ``decode.onnx`` is traced from this graph, not
  swapped, ``decode_swap.swappable`` needs every function to be a partner): with ``DUO_ROWS`` (the default; session
  13) it becomes ``rows_at`` on the step's ``slot_index``, made once per (sinks, window, streaming head count, head
  dim) from the first such layer's positions, and its attention reads the step's ``key_positions`` [B, S + 1], made
  once per (sinks, window): duo's streaming heads keep the same positions in every head and layer (sinks + window of
  the same tokens since the prompt step; a layer's count of streaming heads only changes the index's head dim), so
  ONNX's ``Attention`` runs their GQA with one [B, 1, 1, S + 1] mask as on the retrieval heads. Any other
  StreamingLLM layer with ``window >= 1`` (or ``DUO_ROWS`` off):
  ``streaming_rows`` (the slot write alone; the attention keeps reading the concatenation);
* ``SPLIT_ROWS`` (the default; session 21): no layer above concatenates its cache. H2O's ``h2o_attend_rows`` and
  StreamingLLM's shifted layers (``streaming_attend_slots``, in place of ``sink_keys_at`` + the fused ``Attention`` +
  ``rows_at``) attend with ``attend_split``: one MatMul reads the old keys where they are, one the new row's, only
  the [B, Hk, g, S + 1] scores are concatenated, and P @ V is split the same way; StreamingLLM's sinks are scored
  from their gathered keys rotated by R(E) and written over their slots' scores. The K/V write takes its index
  ``after`` the attention's output (a data dependency), so it is the state's last reader and ONNX Runtime may write
  the row into a donated state's own buffer (``inplace_slots.py``): no per-step copy of the cache (SmolLM2-135M at
  a 4k prompt: 1.23x StreamingLLM, 1.26x H2O decode with the in-place write, ``bench/ab_onnx_switch.py --switch
  inplace_slots``);
* any other attention over per-KV-head slots (a per-head positions concatenation along the slot dim;
  no native window or sinks: SnapKV): ``slot_attention``, the same decomposed attention with the T = 1
  mask, instead of the fused Attention whose translation folds Hk into the batch (four Reshapes) and
  builds the general visibility (five nodes). Only where every such layer has the same KV head count
  (``heads``): duo's streaming heads differ per layer, the stitched function's head dim would be
  dynamic and its reshapes would cost more Shape nodes than the mask saves, so duo keeps the fused one.

Interface (what a derivation of ``decode.onnx`` from ``model.onnx`` must target; per layer, the step graph's
``k_old``/``v_old``/``kp_old`` are the layer's state inputs, ``k_new``/``v_new`` the new token's post-RoPE key and
value [B, Hk, 1, D], ``kp_new`` the query positions expanded to [B, Hk, 1]; these were the inputs of the
``cat``s that fed the attention and the eviction op):

* H2O (``recent_n >= 1``): the layer's ``attention`` node, its eviction node and the three ``cat`` nodes become
  ``h2o_attend_rows(q, k_old, k_new, v_old, v_new, q_pos, kp_old, kp_new, score, scale, heavy_n, heavy_f,
  recent_n, recent_f, key_bias)`` -> (attention output [B, H, 1, Dv], k, v, k_pos, score), the last four the
  next state (shapes of the old state);
* StreamingLLM (``window >= 1``) with the shifted attention: ``shifted_decode_attention``, the eviction node and
  the three ``cat``s become ``streaming_attend_rows(q, k_old, k_new, v_old, v_new, q_pos, kp_old, kp_new, scale,
  key_bias, rot, sinks, window)`` -> (attention output, k, v, k_pos), ``rot = back_rotation(q_pos, inv_freq, sinks,
  window, D)`` once per graph; with ``SINK_KEYS``: ``attention(q, cat(sink_keys(k_old, kp_old, rot, sinks), k_new),
  cat(v_old, v_new), q_pos, cat(kp_old, kp_new), scale, key_bias=key_bias)`` + ``streaming_rows``, ``rot =
  sink_rotation(q, q_pos, inv_freq, sinks, window)`` once per graph; without the shifted attention:
  ``streaming_rows(k_old, k_new, v_old, v_new, q_pos, kp_old, kp_new, sinks, window)`` -> (k, v, k_pos), the
  ``cat``s stay for the attention;
* SnapKV-style per-head attentions (one KV head count in every such layer): ``attention`` ->
  ``slot_attention(q, k, v, k_pos, scale, key_bias)`` -> output (its eviction op is the identity at decode).

At a decode step (T = 1) every cached position precedes the query and a padding query sees every
valid key, so the visibility is ``k_pos >= 0`` (``attention_reference``'s rule reduced; the new row's
position is the query's, -1 on a padding row).

Exact setting: nothing is approximated (same victim rule, same fp32 scores and softmax); the output
differs from the fused ORT Attention by float rounding only. Invariants tested
(``tests/onnx/test_decode_rows.py``): on random slot states (empty slots, ties, padding rows) the row
functions equal ``decode_slots.h2o_decode`` / ``streaming_decode`` on the concatenation and the
attention output equals ``attention_reference`` (H2O) / ``shifted_decode_attention`` (StreamingLLM) (1e-6);
``streaming_slot`` equals its per-head definition (hit, else first empty, else earliest); the plain attention over
``sink_keys`` equals ``shifted_decode_attention`` (1e-5; E = 0 returns every key bit for bit); on states whose heads
share their positions ``slot_index`` + ``rows_at`` = ``streaming_rows`` and ``sink_index`` + ``sink_keys_at`` =
``sink_keys`` bit for bit, the attention over ``key_positions`` = the per-head one (1e-6); ``SPLIT_ROWS``:
``streaming_attend_slots`` = the fused attention over ``sink_keys_at`` + ``rows_at`` (1e-5, the next state bit for
bit), ``h2o_attend_rows`` on = off (1e-6, K/V and positions bit for bit), ``after`` adds zero for finite, infinite
and NaN outputs; ``SHARED_ROWS`` on and off
export artifacts with the reference's kept sets and tokens over 120 steps (``test_onnx_streaming_shift.py``); the
rewrite leaves no H2O attention node in a tiny Llama's decode graph and its eager run equals the unrewritten graph
(StreamingLLM: with and without ``SHARED_ROWS``, every head and layer holding one position row); duo's decode graph
with and without ``DUO_ROWS`` equals the unrewritten one eagerly and its artifacts keep the torch runtime's kept
sets, tokens and logits over 120 steps (``test_duo_decode_onnx.py``); the artifact tests
(``test_onnx_eviction_slots.py``, ``test_onnx_streaming_shift.py``) keep the torch backend's sets.
"""

from __future__ import annotations

import inspect
import operator

import torch

from ...capture.ops import ATTENTION
from ...ops import schema
from ...ops.rope_index_ref import rope_angles
from ..torch.step_memo import step_info
from .decode_slots import _budget, h2o_decode, slot_probs, streaming_decode, streaming_slot, write_rows
from .streaming_shift import MASKED, rotation_matrix, shifted_decode_attention


def attend_rows(q, k, v, visible, scale, key_bias=None):
    """(output [B, H, 1, Dv] in v's dtype, probabilities [B, Hk, g, S] fp32) of one decode query per row over
    ``k``/``v`` [B, Hk, S, D] where ``visible`` [B, Hk, S] (``attention_reference``'s fp32 math)."""
    p = slot_probs(q, k, visible, scale, key_bias)
    out = torch.matmul(p, v.float()).reshape(*q.shape[:3], v.shape[-1])
    return out.to(v.dtype), p


# The decode graph's evicting layers attend over (old slots, new row) without concatenating them, and write the new row
# only after that attention has read the old slots (``attend_split``, ``after``; session 21): a K/V state's only other
# reader then precedes its write, so ONNX Runtime may write the row into the caller's buffer in place
# (``inplace_slots.py``, a donated state) instead of copying the whole cache per layer per step. False: the S + 1
# concatenations and the out-of-place writes of session 20 (A/B). Listed in ``decode_process.SWITCHES``.
SPLIT_ROWS = True


def attend_split(q, k_old, k_new, v_old, v_new, vis_old, vis_new, scale, key_bias=None, patch=None):
    """``attend_rows`` over the S old slots and the new row without their [S + 1] concatenation: the old keys and
    values are read where they are (one MatMul each: ONNX Runtime fuses the transpose, nothing is copied), only the
    [B, Hk, g, S + 1] scores are concatenated. ``vis_old`` [B, Hk, S] / ``vis_new`` [B, Hk, 1]: visibility; ``patch``:
    (index [B, Hk, g, s], scores [B, Hk, g, s]) written over the old slots' scores (StreamingLLM's sinks, scored with
    their keys rotated: ``streaming_attend_slots``). -> (output [B, H, 1, Dv] in v's dtype, probabilities
    [B, Hk, g, S + 1] fp32): ``attention_reference``'s fp32 math, the same values as ``attend_rows`` on the
    concatenation up to float summation order."""
    B, H, _, D = q.shape
    Hk, S = k_old.shape[1], k_old.shape[2]
    g = H // Hk
    qf = q.float().reshape(B, Hk, g, D)
    s_old = torch.matmul(qf, k_old.float().transpose(-1, -2)) * scale
    if patch is not None:
        s_old = s_old.scatter(3, patch[0], patch[1])
    s = torch.cat([s_old, torch.matmul(qf, k_new.float().transpose(-1, -2)) * scale], dim=-1)
    if key_bias is not None:
        s = s + key_bias.float().reshape(B, Hk, g, S + 1)
    visible = torch.cat([vis_old, vis_new], dim=2)[:, :, None]
    p = torch.softmax(torch.where(visible, s, MASKED), dim=-1)
    out = torch.matmul(p[..., :S], v_old.float()) + p[..., S:] * v_new.float()
    return out.reshape(B, H, 1, v_old.shape[-1]).to(v_old.dtype), p


def after(index, out):
    """``index`` plus a zero computed from ``out`` (one element compared with +inf: never true, NaN included), so the
    scatter reading it runs after ``out``'s kernels: a data dependency the optimizers cannot fold (a shape-derived
    zero would fold under ``torch.export``). The K/V writes of a layer wait for its attention this way
    (``inplace_slots.py`` checks the order in the saved graph)."""
    return index + (out.reshape(-1)[:1] > float("inf")).to(index.dtype)


def write_after(olds, news, j, out):
    """``decode_slots.write_rows`` with the K/V index (the first two tensors) taken ``after`` ``out``; the other
    state (positions, scores: small, written out of place) as before."""
    k, v = olds[0], olds[1]
    jk = after(j if j.dim() == 3 else j[:, :, None], out)
    idx = jk[..., None].expand(-1, -1, -1, k.shape[-1])
    rest = write_rows(olds[2:], news[2:], j) if len(olds) > 2 else ()
    return (k.scatter(2, idx, news[0]), v.scatter(2, idx if v.shape[-1] == k.shape[-1] else jk[..., None].expand(
        -1, -1, -1, v.shape[-1]), news[1]), *rest)


def streaming_attend_slots(q, k_old, k_new, v_old, v_new, kp_old, kp_new, sinks_idx, rot, j, scale, key_bias=None):
    """``SPLIT_ROWS``: one StreamingLLM layer's decode step (keys cached at their absolute rotations,
    ``streaming_shift.py``): the ``SINK_KEYS`` attention (sinks' keys rotated forward by E, every other key as
    stored) and ``rows_at``'s write, without copying the cache. The sinks' scores are computed from their gathered,
    rotated keys (``sinks_idx`` = ``sink_index``, ``rot`` = ``sink_rotation``) and written over those slots'
    scores (``attend_split``'s patch); the new row then takes slot ``j`` (``slot_index``) ``after`` the attention.
    -> (output [B, H, 1, Dv], k, v, k_pos)."""
    B, H, _, D = q.shape
    Hk = k_old.shape[1]
    g = H // Hk
    ks = rotated_sinks(k_old, sinks_idx, rot)  # [B, Hk, s, D]: the sinks at rotation + E
    s_sink = torch.matmul(q.float().reshape(B, Hk, g, D), ks.transpose(-1, -2)) * scale  # [B, Hk, g, s]
    where = sinks_idx[..., 0][:, :, None].expand(-1, -1, g, -1)  # [B, Hk, g, s]: the sinks' slots
    out, _ = attend_split(q, k_old, k_new, v_old, v_new, kp_old >= 0, kp_new >= 0, scale, key_bias, (where, s_sink))
    return (out, *write_after((k_old, v_old, kp_old), (k_new, v_new, kp_new), j, out))


# The per-KV-head attention rewrite below is off by default: its gain is unmeasured (SnapKV's decode.onnx is derived
# from model.onnx and never uses it; duo's differing head counts skip it), and with ``think`` the keys' and positions'
# cache lengths are different symbols that torch.export cannot prove equal (tests/onnx/test_registry_onnx.py snapkv+think).
SLOT_ATTENTION = False


def slot_attention(q, k, v, k_pos, scale, key_bias=None):
    """``attention`` at a decode step (T = 1) over per-KV-head slots ``k``/``v`` [B, Hk, S, D], ``k_pos`` [B, Hk, S]
    (no window, no sinks): the visibility is ``k_pos >= 0`` (module docstring). [B, H, 1, Dv]."""
    return attend_rows(q, k, v, k_pos >= 0, scale, key_bias)[0]


def h2o_attend_rows(q, k_old, k_new, v_old, v_new, q_pos, kp_old, kp_new, score, scale,
                    heavy_n, heavy_f, recent_n, recent_f, key_bias=None):
    """``attention`` + ``decode_slots.h2o_decode`` of one layer at a decode step, ``recent_n >= 1``.

    ``k_old``/``v_old`` [B, Hk, S, D], ``kp_old``/``score`` [B, Hk, S]: the state; ``k_new``/``v_new``
    [B, Hk, 1, D], ``kp_new`` [B, Hk, 1]: the new token's row. -> (attention output, k, v, k_pos, score)."""
    if recent_n < 1:
        raise ValueError(f"h2o_attend_rows needs recent_n >= 1 (the new token never leaves); got {recent_n}")
    seen = kp_old >= 0
    if SPLIT_ROWS:  # the old slots read in place, the K/V write after the attention
        out, p = attend_split(q, k_old, k_new, v_old, v_new, seen, kp_new >= 0, scale, key_bias)
    else:
        visible = torch.cat([seen, kp_new >= 0], dim=2)  # T = 1: k_pos >= 0 (module docstring)
        out, p = attend_rows(q, torch.cat([k_old, k_new], 2), torch.cat([v_old, v_new], 2), visible, scale, key_bias)
    info = step_info(q_pos)
    col = p.mean(dim=2) * info.real  # [B, Hk, S + 1]: decode_colsum (a padding row adds nothing)
    score = score + col[..., :-1]
    length = info.length
    cand = seen & (kp_old < (length - _budget(recent_n, recent_f, length))[:, None, None])
    over = cand.sum(dim=-1, keepdim=True) > _budget(heavy_n, heavy_f, length)[:, None, None]
    s = torch.where(cand, score, float("inf"))
    tie = s == s.amin(dim=-1, keepdim=True)  # only candidates, or no candidate at all: then not over, the victim unused
    victim = torch.where(tie, kp_old, -1).argmax(dim=-1, keepdim=True)  # lowest score, latest position
    # else the first empty slot (0 when none); [B, Hk, 1] (keepdim: the scatter index needs no Unsqueeze)
    j = torch.where(over, victim, seen.to(torch.int32).argmin(dim=-1, keepdim=True))
    olds, news = (k_old, v_old, kp_old, score), (k_new, v_new, kp_new, col[..., -1:])
    return (out, *(write_after(olds, news, j, out) if SPLIT_ROWS else write_rows(olds, news, j)))


def streaming_rows(k_old, k_new, v_old, v_new, q_pos, kp_old, kp_new, sinks, window):
    """``decode_slots.streaming_decode`` (``window >= 1``) on (old slots, new row). -> (k, v, k_pos)."""
    if window < 1:
        raise ValueError(f"streaming_rows needs window >= 1 (the new token never leaves); got {window}")
    return write_rows((k_old, v_old, kp_old), (k_new, v_new, kp_new), streaming_slot(kp_old, q_pos, sinks, window))


def back_rotation(q, q_pos, inv_freq, sinks: int, window: int):
    """[B, 1, D, D] fp32 (D = ``q``'s last dim; ``q`` [B, H, 1, D] is read for its shape only): ``x @ M`` rotates
    x back by E = max(0, L - 1 - sinks - window), the tokens a StreamingLLM row has evicted
    (``shifted_decode_attention``'s R(-E), same fp32 angles). It depends only on the step's positions: the
    rewrite computes it once per decode step for every layer (``rows``); inside each layer's function its two
    constant matrices (identity, rotate-half) were per-layer initializers that ORT does not merge, four nodes
    per layer. A slot function of its own (``slot_functions.py``): those constants stay inside it (as in the
    per-layer function), not large initializers of the decode graph, whose weights must all be
    ``model.onnx``'s to share its data file (``shared_weights.py``)."""
    evicted = (q_pos.max(dim=1).values - sinks - window).clamp(min=0)
    cos, sin = rope_angles(evicted, inv_freq)
    return rotation_matrix(cos, -sin, q.shape[-1])[:, None]


def streaming_attend_rows(q, k_old, k_new, v_old, v_new, q_pos, kp_old, kp_new, scale, key_bias, rot,
                          sinks: int, window: int):
    """``shifted_decode_attention`` + ``decode_slots.streaming_decode`` of one StreamingLLM layer at a decode
    step, ``window >= 1``, keys cached rotated at their positions (``streaming_shift.py``).

    ``k_old``/``v_old`` [B, Hk, S, D], ``kp_old`` [B, Hk, S]: the state; ``k_new``/``v_new`` [B, Hk, 1, D],
    ``kp_new`` [B, Hk, 1]: the new row; ``rot`` [B, 1, D, D]: ``back_rotation`` of this step (shared by the
    layers). The attention reads the S + 1 keys (the previous kept set and the new token: the leaving token
    is still attended at this step, as in the reference), the new row then takes the leaving token's slot
    (``decode_slots.streaming_slot``). -> (output [B, H, 1, Dv] in v's dtype, k, v, k_pos)."""
    if window < 1:
        raise ValueError(f"streaming_attend_rows needs window >= 1 (the new token never leaves); got {window}")
    B, H, _, D = q.shape
    Hk = k_old.shape[1]
    g = H // Hk
    kt = torch.cat([k_old, k_new], 2).float().transpose(-1, -2)  # [B, Hk, D, S + 1]
    kp = torch.cat([kp_old, kp_new], 2)[:, :, None]  # [B, Hk, 1, S + 1]: one Unsqueeze for both masks
    qf = q.float().reshape(B, Hk, g, D)
    s_window = torch.matmul(qf, kt) * scale  # window keys: q_abs . k_abs
    s_sink = torch.matmul(torch.matmul(qf, rot), kt) * scale  # sink keys: R(-E) q_abs . k_abs
    s = torch.where(kp < sinks, s_sink, s_window)
    if key_bias is not None:
        s = s + key_bias.float().reshape(B, Hk, g, kt.shape[-1])
    p = torch.softmax(torch.where(kp >= 0, s, MASKED), dim=-1)  # T = 1: visible = k_pos >= 0 (module docstring)
    out = torch.matmul(p, torch.cat([v_old, v_new], 2).float()).reshape(B, H, 1, v_old.shape[-1]).to(v_old.dtype)
    return (out, *write_rows((k_old, v_old, kp_old), (k_new, v_new, kp_new), streaming_slot(kp_old, q_pos, sinks, window)))


# StreamingLLM's decode step through the fused Attention (``sink_keys``; ``rows``): True: the sink keys are rotated
# forward by E and the layer's attention is the plain ``attention`` op (ONNX ``Attention``); False: the query is
# rotated back (``streaming_attend_rows``, decomposed attention). Listed in ``decode_process.SWITCHES``.
SINK_KEYS = True


def sink_rotation(q, q_pos, inv_freq, sinks: int, window: int):
    """[B, 1, D, D] fp32: ``x @ M`` rotates x FORWARD by E = max(0, L - 1 - sinks - window), the tokens a
    StreamingLLM row has evicted (``back_rotation``'s transpose: R(+E) from the same fp32 angles). ``q`` is
    read for its shape only. Made once per decode step and shared by every layer (``rows``)."""
    evicted = (q_pos.max(dim=1).values - sinks - window).clamp(min=0)
    cos, sin = rope_angles(evicted, inv_freq)
    return rotation_matrix(cos, sin, q.shape[-1])[:, None]


def sink_keys(k_old, kp_old, rot, sinks: int):
    """The keys ``k_old`` [B, Hk, S, D] (rotated at their absolute positions ``kp_old`` [B, Hk, S]) with each
    sink's key (position i < ``sinks``) rotated forward by E (``rot`` = ``sink_rotation``), out of place.

    StreamingLLM's reference rotates a key by its cache index and the query by its own: a window key at
    position p has index p - E and the query (position L - 1) L - 1 - E, so q_abs . k_abs has the reference's
    relative angle L - 1 - p; a sink's index is its position i, its relative angle L - 1 - E - i, which the
    query at its absolute rotation sees on the key at rotation i + E = R(E) k_abs. Every key is then at
    (cache index + E), and one plain attention (the fused ``Attention`` node dense decoding uses; slot order
    does not matter to softmax) gives the reference's scores. The rotation is applied to the stored key (at
    rotation i) afresh at every step and never written back: the state keeps absolute rotations, nothing
    accumulates. Cost per layer: a gather of ``sinks`` rows per KV head, one [sinks, D] x [D, D] MatMul, one
    ScatterElements; no key outside the sinks is touched.

    The slot of sink i: ArgMax of ``kp_old == i`` over the slots (slot 0 when absent). StreamingLLM's state
    invariant makes that exact: a row that has evicted (E > 0) holds all its sinks (positions < ``sinks`` never
    leave, ``streaming_keep`` / ``streaming_slot``), and a row with E = 0 has ``rot`` = R(0), the exact identity
    (cos 1, sin 0), so every write, an absent sink's duplicate index 0 included, puts back the slot's own key.
    On a state breaking the invariant (E > 0 and a sink missing) slot 0's key would be rotated: not exact there."""
    return sink_keys_at(k_old, sink_index(kp_old, sinks, k_old.shape[-1]), rot)


# StreamingLLM's step arithmetic made once per step (``SHARED_ROWS``, on with ``SINK_KEYS``): every StreamingLLM
# layer with one (sinks, window) keeps the same positions in every KV head (the same rule on the same positions from
# the prompt step on), so the slot a step writes, the sinks' slots and the attention's key positions are computed
# from the first such layer's positions and read by all of them. False: each layer computes its own (the graph of
# session 11). Listed in ``decode_process.SWITCHES``.
SHARED_ROWS = True
# DuoAttention's streaming heads (session 13): each StreamingLLM eviction whose attention is the plain op over its
# concatenations (keys at their own positions, no shift) writes its row at the step's shared slot index and its
# attention reads one shared [B, S + 1] key-position row (``_shared_plain``). False: per-layer ``streaming_rows`` and
# per-head key positions (the graph of session 12). Listed in ``decode_process.SWITCHES``.
DUO_ROWS = True


def sink_index(kp_old, sinks: int, D: int):
    """[B, Hk, sinks, D] int64: the slot of sink i (position i) of ``kp_old`` [B, Hk, S] (ArgMax of ``kp_old == i``
    over the slots, slot 0 when absent), expanded over the head dim ``D``: the gather/scatter index of
    ``sink_keys_at``."""
    want = torch.arange(sinks, dtype=kp_old.dtype, device=kp_old.device)
    hit = kp_old[:, :, :, None] == want  # [B, Hk, S, s]
    j = hit.to(torch.int32).argmax(dim=2, keepdim=True).transpose(2, 3)  # [B, Hk, s, 1]: slot of sink i (0 if absent)
    return j.expand(-1, -1, -1, D)


def rotated_sinks(k_old, idx, rot):
    """[B, Hk, sinks, D] fp32: the sinks' rows of ``k_old`` (slot index ``idx`` = ``sink_index``) gathered and
    rotated forward by E (one [sinks, D] x [D, D] MatMul with ``rot`` = ``sink_rotation``)."""
    return torch.matmul(k_old.gather(2, idx).float(), rot)


def sink_keys_at(k_old, idx, rot):
    """``sink_keys`` given its slot index ``idx`` = ``sink_index`` (made once per step with ``SHARED_ROWS``): the
    sinks' rows gathered, rotated (``rotated_sinks``), scattered into a copy of ``k_old``."""
    return k_old.scatter(2, idx, rotated_sinks(k_old, idx, rot).to(k_old.dtype))


def slot_index(kp_old, q_pos, sinks: int, window: int, D: int):
    """(j [B, Hk, 1], j expanded to [B, Hk, 1, D]): ``decode_slots.streaming_slot`` and the key/value scatter index
    of ``write_rows``, made once per step with ``SHARED_ROWS`` and read by every StreamingLLM layer's ``rows_at``."""
    j = streaming_slot(kp_old, q_pos, sinks, window)
    return j, j[..., None].expand(-1, -1, -1, D)


def rows_at(k_old, k_new, v_old, v_new, kp_old, kp_new, j, jd):
    """``streaming_rows`` given the step's slot (``slot_index``): the new row written into slot ``j`` of each state
    tensor, three ScatterElements. -> (k, v, k_pos)."""
    return k_old.scatter(2, jd, k_new), v_old.scatter(2, jd, v_new), kp_old.scatter(2, j, kp_new)


def key_positions(kp_old, kp_new):
    """[B, S + 1]: the attention's key positions, head 0's (every head of a StreamingLLM layer holds the same):
    with [B, S] positions ONNX's ``Attention`` runs on the [B, Hk, S + 1, D] keys as dense decoding does (its GQA
    heads, one [B, 1, 1, S + 1] mask) instead of folding Hk into the batch (four Reshapes per layer, a per-head mask)."""
    return torch.cat([kp_old[:, 0], kp_new[:, 0]], dim=1)


def _cat_parts(node):
    """(old, new) of a two-input ``cat`` along dim 2 (the slot dim), else None."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is torch.ops.aten.cat.default):
        return None
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    val = parts[0].meta.get("val") if isinstance(parts[0], torch.fx.Node) else None
    if len(parts) != 2 or (dim % val.dim() if val is not None and dim < 0 else dim) != 2:
        return None
    return tuple(parts)


def _bound(node) -> dict:
    b = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    b.apply_defaults()
    return dict(b.arguments)


def _attention_of(evict, a: dict):
    """The plain ``graphwright.attention`` reading the eviction's q, k, v, q_pos, k_pos (no window, sinks), else None."""
    for user in a["k"].users:
        if user.op != "call_function" or user.target is not ATTENTION:
            continue
        got = {n: schema.get(user, n) for n in ("q", "k", "v", "q_pos", "k_pos", "scale", "window", "key_bias", "sinks")}
        if all(got[n] is a[n] for n in ("q", "k", "v", "q_pos", "k_pos", "key_bias")) and got["scale"] == a["scale"] \
                and not got["window"] and not got["sinks"]:
            return user
    return None


def _shifted_of(a: dict):
    """The ``shifted_decode_attention`` reading the StreamingLLM eviction's k, v, q_pos, k_pos concatenations
    with its sinks and window (``streaming_shift.shift_streaming``'s decode attention), else None."""
    for user in a["k"].users:
        if user.op == "call_function" and user.target is shifted_decode_attention:
            b = _bound(user)
            if all(b[n] is a[n] for n in ("k", "v", "q_pos", "k_pos")) and (b["sinks"], b["window"]) == (a["sinks"], a["window"]) \
                    and isinstance(b["q"], torch.fx.Node) and b["q"].meta.get("val") is not None:
                return user
    return None


def _fold_streaming(graph, node, attn, a: dict, parts: dict, rots: dict) -> str:
    """Replace ``attn`` (``shifted_decode_attention``) and ``node`` (``streaming_decode``) by one
    ``streaming_attend_rows`` on (old slots, new row); the step's ``back_rotation`` is made once per
    (positions, inv_freq, sinks, window, D) in ``rots`` and shared by the layers."""
    b = _bound(attn)
    inv = b["inv_freq"]
    D = int(b["q"].meta["val"].shape[-1])
    key = (b["q_pos"], ("attr", inv.target) if isinstance(inv, torch.fx.Node) and inv.op == "get_attr" else inv,
           int(b["sinks"]), int(b["window"]), D)
    key = (*key, SINK_KEYS)
    if key not in rots:  # before the first such layer's attention, on its query (read for D only): every later layer follows
        with graph.inserting_before(attn):
            rots[key] = graph.call_function(sink_rotation if SINK_KEYS else back_rotation,
                                            (b["q"], b["q_pos"], inv, int(b["sinks"]), int(b["window"])))
    (k_old, k_new), (v_old, v_new), (kp_old, kp_new) = parts["k"], parts["v"], parts["k_pos"]
    if SINK_KEYS:
        return _fused_streaming(graph, node, attn, a, parts, rots, b, key, inv)
    with graph.inserting_before(attn):
        new = graph.call_function(streaming_attend_rows, (b["q"], k_old, k_new, v_old, v_new, b["q_pos"], kp_old, kp_new,
                                                          b["scale"], b["key_bias"], rots[key], int(b["sinks"]), int(b["window"])))
    _take_over(graph, node, attn, new, a)
    return "streaming_attend_rows"


def _fused_streaming(graph, node, attn, a: dict, parts: dict, rots: dict, b: dict, key, inv) -> str:
    """``SINK_KEYS``: ``shifted_decode_attention`` -> ``attention(q, cat(sink_keys(k_old), k_new), v, q_pos, k_pos)``
    (the plain op: ONNX's fused ``Attention``), the eviction -> ``streaming_rows`` (the slot write on the old state,
    whose keys stay at their absolute rotations)."""
    (k_old, k_new), (v_old, v_new), (kp_old, kp_new) = parts["k"], parts["v"], parts["k_pos"]
    shared = _shared_index(graph, attn, a, parts, rots, b, key) if SHARED_ROWS else None
    if shared is not None and SPLIT_ROWS:
        with graph.inserting_before(attn):
            new = graph.call_function(streaming_attend_slots, (b["q"], k_old, k_new, v_old, v_new, kp_old, kp_new,
                                                               shared["sinks"], rots[key], shared["j"], b["scale"],
                                                               b["key_bias"]))
        _take_over(graph, node, attn, new, a)
        return "streaming_attend_slots"
    with graph.inserting_before(attn):
        if shared is None:
            ks = graph.call_function(sink_keys, (k_old, kp_old, rots[key], int(b["sinks"])))
        else:
            ks = graph.call_function(sink_keys_at, (k_old, shared["sinks"], rots[key]))
        kcat = graph.call_function(torch.ops.aten.cat.default, ([ks, k_new], 2))
        new = graph.call_function(ATTENTION, (b["q"], kcat, a["v"], b["q_pos"], a["k_pos"] if shared is None else shared["kp"],
                                              b["scale"]), {"key_bias": b["key_bias"]} if b["key_bias"] is not None else {})
    for n, like in ((ks, k_old), (kcat, a["k"])):
        if "val" in like.meta:
            n.meta["val"] = like.meta["val"]
    new.meta = dict(attn.meta)
    attn.replace_all_uses_with(new)
    graph.erase_node(attn)
    if shared is None:
        node.target = streaming_rows
        node.args, node.kwargs = (k_old, k_new, v_old, v_new, a["q_pos"], kp_old, kp_new, a["sinks"], a["window"]), {}
    else:
        node.target = rows_at
        node.args, node.kwargs = (k_old, k_new, v_old, v_new, kp_old, kp_new, shared["j"], shared["jd"]), {}
    for cat in (a["k"], a["k_pos"]):
        if not cat.users:
            graph.erase_node(cat)
    return "sink_keys" if shared is None else "sink_keys_at"


def _shared_index(graph, attn, a: dict, parts: dict, rots: dict, b: dict, key):
    """``SHARED_ROWS``: {"j", "jd" (``slot_index``), "sinks" (``sink_index``), "kp" (``key_positions``)} of this
    step ("jd" and "kp" only without ``SPLIT_ROWS``: ``streaming_attend_slots`` reads neither), made before the first
    StreamingLLM layer of this (sinks, window, KV heads, head dim) from its positions and
    shared by the later ones (``rots`` holds them); None (the per-layer graph) when the positions' shape is unknown."""
    (k_old, _), _, (kp_old, kp_new) = parts["k"], parts["v"], parts["k_pos"]
    kval = k_old.meta.get("val")  # the keys' [B, Hk, S, D] (the positions placeholder carries no value)
    if kval is None or not isinstance(kval.shape[1], int) or not isinstance(kval.shape[-1], int):
        return None
    D = int(kval.shape[-1])
    skey = ("shared", key, str(kval.shape))
    if skey not in rots:
        with graph.inserting_before(attn):
            idx = graph.call_function(slot_index, (kp_old, a["q_pos"], int(a["sinks"]), int(a["window"]), D))
            rots[skey] = {"j": graph.call_function(operator.getitem, (idx, 0)),
                          "sinks": graph.call_function(sink_index, (kp_old, int(b["sinks"]), D))}
            if not SPLIT_ROWS:
                rots[skey]["jd"] = graph.call_function(operator.getitem, (idx, 1))
                rots[skey]["kp"] = graph.call_function(key_positions, (kp_old, kp_new))
    return rots[skey]


def _plain_attention(a: dict):
    """The plain ``graphwright.attention`` (no window, sinks or key bias) reading the StreamingLLM eviction's k, v and
    k_pos concatenations and its q_pos (DuoAttention's streaming heads: keys at their own positions), else None."""
    for user in a["k"].users:
        if user.op != "call_function" or user.target is not ATTENTION:
            continue
        got = {n: schema.get(user, n) for n in ("k", "v", "q_pos", "k_pos", "window", "sinks", "key_bias")}
        if all(got[n] is a[n] for n in ("k", "v", "q_pos", "k_pos")) and not got["window"] and not got["sinks"] \
                and got["key_bias"] is None:
            return user
    return None


def _shared_plain(graph, node, a: dict, parts: dict, rots: dict, shapes: dict) -> bool:
    """``DUO_ROWS``: a StreamingLLM eviction whose attention is the plain op over its concatenations (DuoAttention's
    streaming heads) becomes ``rows_at`` on the step's shared slot index (``slot_index``, one per (sinks, window,
    streaming head count, head dim)), and that attention reads the step's shared ``key_positions`` [B, S + 1] (one per
    (sinks, window)) instead of the layer's per-head [B, Hk, S + 1]. False (nothing changed) when the attention is
    not found or the keys' head count or head dim is unknown (``shapes``: ``_state_shapes``)."""
    attn = _plain_attention(a)
    (k_old, k_new), (v_old, v_new), (kp_old, kp_new) = parts["k"], parts["v"], parts["k_pos"]
    shape = shapes.get(k_old) if isinstance(k_old, torch.fx.Node) else None
    if attn is None or shape is None or len(shape) != 4 or not all(isinstance(x, int) and x > 0 for x in (shape[1], shape[3])):
        return False
    sinks, window, D = int(a["sinks"]), int(a["window"]), int(shape[3])
    skey, pkey = ("plain_slot", sinks, window, int(shape[1]), D), ("plain_kp", sinks, window)
    with graph.inserting_before(attn):  # the first such layer's inputs precede its attention; later layers follow
        if skey not in rots:
            idx = graph.call_function(slot_index, (kp_old, a["q_pos"], sinks, window, D))
            rots[skey] = (graph.call_function(operator.getitem, (idx, 0)), graph.call_function(operator.getitem, (idx, 1)))
        if pkey not in rots:
            rots[pkey] = graph.call_function(key_positions, (kp_old, kp_new))
    schema.set(attn, "k_pos", rots[pkey])
    node.target = rows_at
    node.args, node.kwargs = (k_old, k_new, v_old, v_new, kp_old, kp_new, *rots[skey]), {}
    if not a["k_pos"].users:
        graph.erase_node(a["k_pos"])
    return True


def _take_over(graph, node, attn, new, a) -> None:
    """``new`` (inserted before ``attn``) returns (attention output, *the eviction node's outputs*): it replaces
    both nodes, and the state concatenations only they read go too."""
    with graph.inserting_after(new):
        out = graph.call_function(operator.getitem, (new, 0))
    new.meta = dict(node.meta)
    out.meta = dict(attn.meta)
    for i, g in _getitems(node).items():
        g.args = (new, i + 1)
    attn.replace_all_uses_with(out)
    graph.erase_node(attn)
    graph.erase_node(node)
    for cat in (a["k"], a["v"], a["k_pos"]):
        if not cat.users:
            graph.erase_node(cat)


def _getitems(node) -> dict:
    return {u.args[1]: u for u in node.users if u.op == "call_function" and u.target is operator.getitem}


def _reads_sink_keys(attn) -> bool:
    parts = _cat_parts(schema.get(attn, "k"))
    return parts is not None and isinstance(parts[0], torch.fx.Node) and parts[0].target is sink_keys


def heads(kp_old, gm, specs):
    """The KV head count of a per-head positions state placeholder (its ``StateSpec`` shape [B, Hk, S]), else None.
    The step graph's placeholders are (input_ids, positions, logits_index, *state, *extras) in ``specs`` order."""
    if specs is None or not isinstance(kp_old, torch.fx.Node) or kp_old.op != "placeholder":
        return None
    names = [n for n in gm.graph.nodes if n.op == "placeholder"][3:3 + len(specs)]
    spec = dict(zip(names, specs)).get(kp_old)
    return spec.shape[1] if spec is not None and len(spec.shape) == 3 and spec.shape[1] > 0 else None


def _state_shapes(gm, specs) -> dict:
    """{node: shape} of the graph's tensors with a recorded value, and of the state placeholders from their ``StateSpec``
    (a state a pass added, such as duo's streaming caches, carries no value)."""
    out = {n: tuple(n.meta["val"].shape) for n in gm.graph.nodes if hasattr(n.meta.get("val"), "shape")}
    if specs is not None:
        names = [n for n in gm.graph.nodes if n.op == "placeholder"][3:3 + len(specs)]
        for n, spec in zip(names, specs):
            out.setdefault(n, tuple(spec.shape))
    return out


def rows(gm: torch.fx.GraphModule, specs=None) -> list:
    """Rewrite the decode graph ``gm`` in place (module docstring); returns the rewritten layers' functions' names."""
    graph, done, rots = gm.graph, [], {}
    shapes = _state_shapes(gm, specs)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (h2o_decode, streaming_decode):
            continue
        a = _bound(node)
        parts = {n: _cat_parts(a[n]) for n in ("k", "v", "k_pos")}
        if any(p is None for p in parts.values()):
            continue
        (k_old, k_new), (v_old, v_new), (kp_old, kp_new) = parts["k"], parts["v"], parts["k_pos"]
        if node.target is streaming_decode:
            if a["window"] < 1:
                continue
            attn = _shifted_of(a)
            if attn is not None:
                done.append(_fold_streaming(graph, node, attn, a, parts, rots))
                continue
            if DUO_ROWS and _shared_plain(graph, node, a, parts, rots, shapes):
                done.append("rows_at")
                continue
            node.target = streaming_rows
            node.args, node.kwargs = (k_old, k_new, v_old, v_new, a["q_pos"], kp_old, kp_new, a["sinks"], a["window"]), {}
            done.append("streaming_rows")
            continue
        attn = _attention_of(node, a)
        if attn is None or a["recent_n"] < 1:
            continue
        with graph.inserting_before(attn):  # every input precedes the attention (it reads their concatenations)
            new = graph.call_function(h2o_attend_rows, (a["q"], k_old, k_new, v_old, v_new, a["q_pos"], kp_old, kp_new,
                                                        a["score"], a["scale"], a["heavy_n"], a["heavy_f"], a["recent_n"],
                                                        a["recent_f"], a["key_bias"]))
        _take_over(graph, node, attn, new, a)
        done.append("h2o_attend_rows")
    # the other per-KV-head attentions (duo's streaming heads, SnapKV): the T = 1 mask, where every such layer has the
    # same KV head count (``heads``); with counts differing per layer (duo) the stitched function's head dim is
    # dynamic and its reshapes cost Shape arithmetic that the fused Attention's translation does not have
    cands = [n for n in graph.nodes if SLOT_ATTENTION and n.op == "call_function" and n.target is ATTENTION and not schema.get(n, "window")
             and not schema.get(n, "sinks") and schema.get(n, "key_bias") is None  # a key bias (think, steer) keeps
             and _cat_parts(schema.get(n, "k_pos")) is not None                    # the fused Attention
             and not _reads_sink_keys(n)]  # StreamingLLM's SINK_KEYS attention: fused by design
    if len({heads(_cat_parts(schema.get(n, "k_pos"))[0], gm, specs) for n in cands}) == 1 and None not in {
            heads(_cat_parts(schema.get(n, "k_pos"))[0], gm, specs) for n in cands}:
        for node in cands:
            with graph.inserting_before(node):
                new = graph.call_function(slot_attention, tuple(schema.get(node, n) for n in ("q", "k", "v", "k_pos", "scale", "key_bias")))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            done.append("slot_attention")
    graph.lint()
    gm.recompile()
    return done
