"""Q-Filters' filters (arXiv 2503.02812) for ``evict(score="qfilter")``: calibrated here, or loaded from a file.

kvpress downloads each model's filters from the Hugging Face hub (``nthngdy/<model>_qfilt``); graphwright
never downloads, so it makes them the way the paper does, from calibration queries:

* calibration text: the first ``QFILTER_TOKENS`` (1,024) tokens of the novel graphwright ships
  (``graphwright/data/northangerabbey.txt``, the text the demo reads), tokenised by the context's
  tokenizer; a model without a tokenizer (the tiny test models) gets seeded random ids;
* the queries: one prefill of the captured step graph itself through an FX ``Interpreter`` that records
  every attention node's ``q`` argument (post-RoPE, after any q-norm: what attention multiplies the
  cached post-RoPE keys with, and what the filter is applied to);
* per layer and KV head: the g query heads' T query vectors stacked ([g*T, D], fp64, not centred), its
  principal right singular vector u, oriented so that the mean projection of those queries on u is
  positive; the filter is f = -u (kvpress's convention: the scorer keeps -<f, k> = <u, k>, so kvpress's
  hub files and ours are interchangeable).

``evict(score="qfilter", filters="PATH")`` loads a safetensors file instead: one tensor ``q_filters`` of
shape [num_layers, num_kv_heads, head_dim] (kvpress's ``QFilters`` parameter name and layout), finite.
``save_filters`` writes that format. Anything else is refused with what was found and what is allowed.
Invariant tested (``tests/passes/test_qfilter_calibrate.py``): the calibrated filter equals an SVD of the
recorded queries computed in the test; a saved file loads back equal; bad files are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import RecipeError
from .eviction_common import find_sites
from .lowrank_calibrate import CALIBRATION_SEED, _Recorder

QFILTER_TOKENS = 1024
KEY = "q_filters"  # kvpress QFilters' parameter name
TEXT = Path(__file__).parents[1] / "data" / "northangerabbey.txt"


def calibration_ids(sg, ctx, n_tokens: int = QFILTER_TOKENS) -> torch.Tensor:
    """[1, T] ids: the first ``n_tokens`` tokens of the shipped novel, or seeded random ids without a tokenizer."""
    tok = getattr(ctx, "tokenizer", None)
    if tok is None:
        g = torch.Generator().manual_seed(CALIBRATION_SEED)
        return torch.randint(0, sg.info.vocab_size, (1, min(n_tokens, 128)), generator=g)
    ids = tok(TEXT.read_text(encoding="utf-8")[: 8 * n_tokens], add_special_tokens=False)["input_ids"][:n_tokens]
    return torch.tensor([ids], dtype=torch.long)


def filters_from_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[Hk, D] fp32 filters from one layer's queries q [H, T, D] (module docstring: f = -u)."""
    H, T, D = q.shape
    g = H // num_kv_heads
    out = torch.empty(num_kv_heads, D, dtype=torch.float64)
    for h in range(num_kv_heads):
        x = q[h * g:(h + 1) * g].reshape(g * T, D).double()
        u = torch.linalg.svd(x, full_matrices=False).Vh[0]
        if float((x @ u).mean()) < 0:
            u = -u
        out[h] = -u
    return out.float()


@torch.inference_mode()
def record_queries(sg, ids: torch.Tensor) -> dict:
    """{layer: q [H, T, D] fp32}: every attention node's ``q`` over one prefill of ``ids`` [1, T]."""
    sites = find_sites(sg)
    if isinstance(sites, str):
        raise RecipeError(f"evict(score='qfilter'): cannot calibrate filters: {sites}")
    nodes = {s.layer: s.arg("q") for s in sites}
    T = ids.shape[1]
    rec = _Recorder(sg.gm, nodes.values())
    rec.run(ids, torch.arange(T)[None], torch.tensor([T - 1]), *sg.init_state(1))
    return {layer: rec.seen[n][0].float() for layer, n in nodes.items()}


def calibrate_filters(sg, ctx=None, n_tokens: int = QFILTER_TOKENS) -> torch.Tensor:
    """[num_layers, num_kv_heads, head_dim] fp32 filters calibrated on the shipped novel (module docstring)."""
    info = sg.info
    qs = record_queries(sg, calibration_ids(sg, ctx, n_tokens))
    missing = sorted(set(range(info.num_layers)) - set(qs))
    if missing:
        raise RecipeError(f"evict(score='qfilter'): layers {missing} have no attention node to calibrate filters on")
    return torch.stack([filters_from_queries(qs[layer], info.num_kv_heads) for layer in range(info.num_layers)])


def save_filters(path, filters: torch.Tensor) -> None:
    """Write ``filters`` [L, Hk, D] as a safetensors file with the one tensor ``q_filters``."""
    from safetensors.torch import save_file

    save_file({KEY: filters.detach().float().contiguous().cpu()}, str(path))


def load_filters(path, info) -> torch.Tensor:
    """[L, Hk, D] fp32 filters from a safetensors file, checked against the model (``RecipeError`` otherwise)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    want = (info.num_layers, info.num_kv_heads, info.head_dim)
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"evict(score='qfilter'): filters={str(path)!r}: no such file; give a safetensors file "
                          f"with one tensor {KEY!r} of shape {list(want)} (layers, KV heads, head dim), or leave "
                          "filters out to calibrate them")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RecipeError(f"evict(score='qfilter'): filters={str(path)!r} is not a safetensors file ({exc}); only "
                          f"safetensors is read, with one tensor {KEY!r} of shape {list(want)}") from None
    if KEY not in tensors:
        raise RecipeError(f"evict(score='qfilter'): filters={str(path)!r} holds {sorted(tensors)}, not {KEY!r}; the "
                          f"file needs one tensor {KEY!r} of shape {list(want)}")
    f = tensors[KEY]
    if tuple(f.shape) != want:
        raise RecipeError(f"evict(score='qfilter'): filters={str(path)!r}: {KEY!r} has shape {list(f.shape)}; this "
                          f"model needs {list(want)} (layers, KV heads, head dim)")
    if not f.is_floating_point() or not bool(torch.isfinite(f).all()):
        raise RecipeError(f"evict(score='qfilter'): filters={str(path)!r}: {KEY!r} must be finite floating point "
                          f"values; got dtype {f.dtype}" + ("" if not f.is_floating_point() else " with inf/nan"))
    return f.float()
