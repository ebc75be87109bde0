"""Per-step tensors derived from a decode step's query positions, computed once for all layers.

Every layer of a decode step receives the same ``q_pos`` tensor object (the step graph's
``positions`` input), and each layer's slot eviction (``eviction_slots.py``), scored attention
(``decode_probs.py``) and RoPE inversion (``rope_invert_fast``) derive the same small tensors from
it: the row lengths, the padding-row mask, the query position with padding rows lifted past every
key, per-budget thresholds, cos/sin rows. Rebuilt per layer they were a dozen tiny ops each (30
layers for SmolLM2-135M); here the first layer of a step builds them and the others reuse them,
found by the identity of ``q_pos`` (a held tensor cannot be freed, so its id cannot be reused
while it is held; nothing in place ever writes a step's positions).

Values are exactly the expressions they replace (``eviction_ref.row_length``, ``budget``; the same
integer and boolean ops), so kept sets and scores are bit-identical. Nothing is memoised under
``torch.compile`` (the compiled backend traces the plain expressions). Tested through the slot
tests (``tests/passes/test_eviction_slots.py``) and ``tests/codegen/test_step_memo.py``.
"""

from __future__ import annotations

import threading

import torch


class StepInfo:
    """Derived tensors of one step's ``q_pos`` [B, T]; ``extra`` holds per-key memos (budgets, cos/sin)."""

    __slots__ = ("q_pos", "length", "real", "q_lift", "extra")

    def __init__(self, q_pos: torch.Tensor):
        self.q_pos = q_pos
        self.length = q_pos.max(dim=1).values + 1  # [B] eviction_ref.row_length
        self.real = (q_pos[:, -1] >= 0).view(-1, 1, 1)  # [B, 1, 1] bool: the row's last query is real (T = 1: not padding)
        last = q_pos[:, -1].view(-1, 1, 1)
        # a padding query (-1) sees every valid key: lift it past every position
        self.q_lift = torch.where(last < 0, torch.iinfo(q_pos.dtype).max, last)
        self.extra = {}


class _Memo(threading.local):
    """Per thread (concurrent generations on one model): the last step's ``StepInfo``."""
    info: StepInfo | None = None


_MEMO = _Memo()


def step_info(q_pos: torch.Tensor) -> StepInfo:
    """The ``StepInfo`` of ``q_pos``, built once per step (every call under ``torch.compile``)."""
    if torch.compiler.is_compiling():
        return StepInfo(q_pos)
    m = _MEMO.info
    if m is not None and m.q_pos is q_pos:
        return m
    m = _MEMO.info = StepInfo(q_pos)
    return m


def memo(info: StepInfo, key, make):
    """``info.extra[key]``, made by ``make()`` the first time in a step."""
    hit = info.extra.get(key)
    if hit is None:
        hit = info.extra[key] = make()
    return hit


_CONST: dict = {}


def memo_tensor(key, make) -> torch.Tensor:
    """A constant tensor (index ranges, row offsets) made once per ``key`` by ``make()``: never written, only read."""
    if torch.compiler.is_compiling():
        return make()
    a = _CONST.get(key)
    if a is None:
        if len(_CONST) > 4096:
            _CONST.clear()
        with torch.inference_mode(False):  # a plain tensor: made under inference_mode it could not be saved for backward later
            a = _CONST[key] = make()
    return a


def arange(n: int, device) -> torch.Tensor:
    """``torch.arange(n)`` (long) on ``device``, kept per (n, device)."""
    return memo_tensor(("arange", n, str(device)), lambda: torch.arange(n, device=device))


def rows_full(info: StepInfo, c: int) -> bool:
    """Every row has held ``c`` tokens before this step (L - 1 >= c), so a token-count budget of ``c`` keeps
    exactly c per head and the appended cache holds c + 1 valid slots per head. One host read per step,
    on CPU only (free there; elsewhere, and under ``torch.compile``, False: the general path)."""
    if torch.compiler.is_compiling() or info.q_pos.device.type != "cpu":
        return False
    return memo(info, ("rows_full", c), lambda: bool((info.length > c).all()))


def slot_memo(info: StepInfo, key, k_pos: torch.Tensor) -> dict:
    """A per-step dict shared by the layers whose ``k_pos`` holds the same values as the first one's.

    StreamingLLM keeps the same positions in the same slots in every layer (same rule, same inputs),
    so what depends only on ``k_pos`` and the step (the attention's mask, the slot the new token goes
    to) is computed by the first layer and reused after one ``torch.equal`` per layer against a copy
    taken before any in-place write. A layer whose positions differ gets a fresh dict (and becomes the
    reference for the next ones). The tensor last matched is remembered for one more call: a layer looks
    twice with the same ``k_pos`` object (its attention, then its eviction, which writes it only after
    looking), and the second look skips the comparison. Never shared under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return {}
    hit = info.extra.get(key)
    if hit is not None and hit.pop("seen", None) is k_pos:  # the layer's second look (attention, then eviction)
        return hit
    if hit is not None and hit["k_pos"].shape == k_pos.shape and torch.equal(hit["k_pos"], k_pos):
        hit["seen"] = k_pos
        return hit
    hit = info.extra[key] = {"k_pos": k_pos.clone(), "seen": k_pos}
    return hit
