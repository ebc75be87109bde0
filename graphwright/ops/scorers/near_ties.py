"""Near ties of a key-only score: candidates whose scores differ by less than a rounding error are tied.

Why (issue 20, ONNX knorm): a key-only score of two tokens with the same id at layer 0 is
mathematically tied (the same pre-RoPE key; RoPE is a rotation, so ||k|| is the same at any
position), but the cached keys are post-RoPE and fp32, so the two norms differ by rounding, and
by a different rounding on each backend: ONNX Runtime's keys differ from torch's by an ulp (its
MatMul and rotary arithmetic are not torch's), up to 4.5e-7 relative in the norm on tiny Llama.
Greedy decoding repeats tokens, so which of two equal-norm tokens leaves was decided by that
rounding: torch saw an exact tie (the latest position leaves), ORT one ulp of order (the other).

The rule: sort the candidates' scores, chain neighbours whose gap is at most ``REL`` times the
larger magnitude into one cluster, and give every member the cluster's lowest score, so the
top-k's position tie-break decides inside a cluster on every backend. ``REL`` = 1e-5 is about 20x
the cross-backend noise measured and far below the gap of any two distinct tokens seen (none under
1e-5 in 48 decode steps of the test prompt); exact setting: ``rel=0`` (only exact ties share a value).

Tensor ops only (sort -> TopK, cumsum, scatter/gather), so the ONNX decode graph runs the same
arithmetic (``codegen/onnx/decode_policies.py``). Tested: ``tests/ops/test_scorers.py`` (clusters
against a python oracle, order independence), ``tests/onnx/test_onnx_policy_decode.py[knorm]``.
"""

from __future__ import annotations

import torch

REL = 1e-5


def snap_near_ties(s: torch.Tensor, cand: torch.Tensor, rel: float = REL) -> torch.Tensor:
    """[B, Hk, S] ``s`` with each chain of near-equal candidate scores set to the chain's lowest value
    (non-candidates keep theirs). Depends only on the values, not on the slot order."""
    S = s.shape[-1]
    if S < 2:
        return s
    x = torch.where(cand, s, float("inf"))
    v, order = torch.sort(x, dim=-1)  # ascending; non-candidates last
    c = torch.gather(cand, -1, order)
    a, b = v[..., :-1], v[..., 1:]
    near = (b - a) <= rel * torch.maximum(a.abs(), b.abs())
    start = torch.cat([torch.ones_like(c[..., :1]), ~(near & c[..., 1:])], dim=-1)  # a chain starts here
    cid = start.long().cumsum(dim=-1) - 1  # chain index of each sorted element
    slot = torch.where(start, cid, torch.full_like(cid, S))  # only chain starts write; the rest go to a spare slot
    first = torch.full_like(v[..., :1], float("inf")).expand(*v.shape[:-1], S + 1).contiguous().scatter(-1, slot, v)
    snapped = torch.gather(first, -1, cid)  # the chain's lowest value, in sorted order
    out = torch.empty_like(v).scatter(-1, order, snapped)
    return torch.where(cand, out, s)
