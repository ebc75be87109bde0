"""Expected Attention (arXiv 2510.00636) and CriticalKV (arXiv 2502.03805) on latent (``lowrank_kv``) layers.

A latent layer caches one row c_k | c_v per token for every KV head, so ``evict(score='expected_attention')``
rebuilds the per-head values V_h = c_v B_V,h + b_V,h its norms need (``ops/scorers/expected_attention``,
op ``evict_scored_rope_values``). B_V is the attention's ``v_up`` argument (``value_path='reconstruct'``),
or, absorbed into o_proj (the default), the parameter ``lowrank_kv`` keeps for scorers and names in the
attention node's ``meta['graphwright']['value_up']``. CriticalKV multiplies the latent rows c_v by the absorbed
o_proj directly (``ops/scorers/criticalkv.output_values``), so it needs B_V absorbed and no value bias
(``absorbed_without_bias``). Exact settings and invariants: those of the scorers
(``tests/ops/test_scorer_latent_values.py``, ``tests/passes/test_evict_scorers.py``).
"""

from __future__ import annotations

import torch

from .match import attr_tensor


def value_up(sg, site):
    """A latent layer's value up-projection B_V [r_v, Hk*Dv]: the attention's ``v_up`` (value_path='reconstruct')
    or the parameter ``lowrank_kv`` keeps when B_V is folded into o_proj ('absorbed'); None when there is none."""
    up = site.arg("v_up")
    if up is not None:
        return up
    name = ((site.attn.meta.get("graphwright") or {}).get("value_up") or {}).get("v_up")
    return name if name is not None and hasattr(sg.gm, name) else None


def latent_value_inputs(sg, site) -> dict:
    """``v_up`` and ``v_bias`` graph nodes of a latent layer for ``evict_scored_rope_values`` (no value bias: a zero
    buffer, so the op's inputs stay tensors)."""
    graph, up = sg.gm.graph, value_up(sg, site)
    bias = site.arg("v_bias")
    if isinstance(up, str):
        bias = ((site.attn.meta.get("graphwright") or {}).get("value_up") or {}).get("v_bias")
        with graph.inserting_before(site.attn):
            up = graph.get_attr(up)
            bias = None if bias is None else graph.get_attr(bias)
    if bias is None:
        width = attr_tensor(sg.gm, str(up.target)).shape[1]
        device = next((t.device for t in sg.gm.parameters()), torch.device("cpu"))
        sg.gm.register_buffer(f"gw_ea_l{site.layer}_v_bias", torch.zeros(width, device=device))
        with graph.inserting_before(site.attn):
            bias = graph.get_attr(f"gw_ea_l{site.layer}_v_bias")
    return {"v_up": up, "v_bias": bias}


def absorbed_without_bias(site) -> bool:
    """Whether a latent layer's B_V is folded into o_proj (no ``v_up`` argument) and it has no value bias (known from
    the names ``lowrank_kv`` records; unknown counts as no)."""
    names = (site.attn.meta.get("graphwright") or {}).get("value_up")
    return site.arg("v_up") is None and names is not None and "v_bias" not in names
