"""``lowrank_kv``: LoRC, low-rank compression of the KV cache through the K/V weights.

Technique (arXiv 2410.03111, "LoRC: Low-Rank Compression for LLMs KV Cache with a Progressive
Compression Strategy"). Training- and data-free. Per layer, the key and value projections
(all KV heads jointly) are replaced by their truncated SVD, W = A B with A = U_r S_r [d x r]
(the "down" projection) and B = V_r^T [r x H_kv*D] (the "up" projection), and the cache stores
the r-dimensional latents C = x A instead of K and V. Biases are kept exactly:
K = (x A) B + b_K (Qwen2 has k/v biases).

* Keys: RoPE sits between B_K and the dot product, so B_K cannot be folded into the queries;
  the new ``graphwright.latent_attention`` op rebuilds K = RoPE_{k_pos}(C_K B_K + b_K) at the
  keys' absolute positions every step (memory falls, key compute does not).
* Values, ``value_path="absorbed"`` (default): the op attends over C_V directly (output
  [B, H, T, r_v]) and B_V is folded into o_proj: W_O'[:, h-block] = W_O[:, h-block] B_V,kv(h)^T
  ([hidden, H*r_v]); b_V is folded into o_proj's bias (exact: softmax rows sum to 1).
  ``value_path="reconstruct"`` rebuilds V = C_V B_V + b_V inside the op (used to test the fold).
* Ranks: ``schedule="progressive"`` (default) gives shallow layers more rank from cumulative
  condition numbers; ``"uniform"`` the same fraction everywhere; the total meets ``keep`` (the
  fraction of dense KV bytes kept over the whole model) within 1%. See ``lowrank_ranks.py``.
  Per layer: ``keep=[k_0, ..., k_{L-1}]`` (one fraction per attention layer, in layer order) sets
  each layer's ranks directly, r = round(k_l * width) for K and V alike, clipped to [1, full rank]
  (``lowrank_ranks.layer_ranks``); ``schedule``/``min_keep``/``max_keep`` do not apply then and are
  refused if given. This is the form ``graphwright tune --scope layer`` searches (one parameter per
  layer). A list whose length is not the model's layer count is refused when the pass runs.

* Scaling: ``scaling="activation"`` (default) factors W diag(s), s the per-channel RMS of the
  projection's input on 200 calibration tokens (ASVD, arXiv 2312.05821; ``lowrank_calibrate.py``
  says why: on SmolLM2 plain SVD at keep=0.9 gives perplexity 1.6k instead of 37 because a few
  loud input channels meet W_V's smallest directions). ``scaling="none"`` is LoRC's plain weight
  SVD, exactly as published. Both are exact at full rank.

Exact setting: ``keep=1.0`` (full rank r = min(d, H_kv*D)): W = A B up to fp64 round-off, so
logits match the dense graph (fp32, 1e-4) and greedy tokens are identical. Per layer: ``keep=[1.0] * L``
is the same full-rank rewrite (tested: dense logits and greedy tokens).

Invariants tested (``tests/passes/test_lowrank_kv.py``, ``tests/models/test_gemma3.py``): full rank reproduces logits and greedy
tokens (batch 2, left padding); absorbed and reconstruct agree at any rank; one projection's
spectral error equals sigma_{r+1} (of W, or of W diag(s) with activation scaling); progressive ranks are non-increasing with depth; cache bytes
equal sum_l (r_k + r_v) * B * S * elsize and kv_bytes / kv_bytes_dense is the planned fraction;
the realised keep is within 1% of ``keep``; the pass does not apply twice; op reference vs fake.

Supported: Llama-style models with separate k_proj/v_proj (Llama, Mistral, Qwen2, SmolLM2), a
fused qkv_proj (Phi-3) or GPT-2's fused Conv1D ``c_attn`` (sliced into its K and V columns; the
dead K/V columns are dropped so c_attn computes only q), Gemma-3 / Qwen3 (a per-head key RMSNorm
before RoPE: W_K is factored before the norm and the op re-applies it as ``k_norm`` = the effective
multiplier, Gemma's 1 + weight in fp32, with its eps; a sliding layer keeps its ``window`` and
``sinks``). Each layer's keys are rotated by that layer's own rotary table (``match.rotary_table``;
Gemma-3 has a local and a global one), full or partial, and rebuilt unrotated when it has none (GPT-2's learned absolute
positions are added to the hidden state, not the keys; ``applies_to`` checks that nothing but
reshapes sits between the key projection and the cache). Refused with the reason: a second
lowrank_kv, attention carrying a steering ``key_bias`` (apply lowrank_kv before steer), other
key transforms. Not done: folding B_K into the queries for no-RoPE models (keys are rebuilt).
"""

from __future__ import annotations

import contextlib
import time

import torch

from ..capture.ops import ATTENTION
from ..ops.latent_attention import LATENT_ATTENTION
from .base import Arg, Pass, PassContext, Tunable, register_pass
from .lowrank_calibrate import input_rms, scaled_svd
from .lowrank_ranks import allocate_ranks, default_bounds, layer_ranks
from .lowrank_rewrite import LayerSite, lowrank_site, rewrite_layer, set_fake_vals, shrink_fused_qkv


@contextlib.contextmanager
def single_thread():
    """Small fp64 LAPACK calls run ~20x faster on one thread than on a contended pool (measured:
    a 576x192 SVD took 1.4 s on 2 busy threads, 0.05 s on one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _one_or_list(values: set, empty):
    """A setting shared by every layer as one value, else the sorted distinct values."""
    return empty if not values else next(iter(values)) if len(values) == 1 else sorted(values)


@register_pass
class LowRankKV(Pass):
    name = "lowrank_kv"
    needs = frozenset({"dense_attention", "dense_cache"})
    produces = frozenset({"latent_cache"})
    removes = frozenset({"dense_attention", "dense_cache"})
    forbids = frozenset({"key_bias"})  # steering's bias is added to the latent attention afterwards
    excludes = {"head_split": "it rewrites one attention node per layer, and a per-head window split the layer into "
                              "several (window whole layers instead)"}
    stage = 40
    examples = {"exact": "lowrank_kv(keep=1.0)", "lossy": "lowrank_kv(keep=0.5)",
                "models": ("tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gemma3")}
    exact = False
    doc = "LoRC: cache SVD latents of W_K/W_V (progressive per-layer ranks), rebuild K, absorb V into o_proj."
    args = (
        Arg("keep", (float, list), 0.5, "fraction of dense KV bytes kept over the whole model (met within 1%), "
            "or a list: one fraction per layer, in layer order", min=1e-6, max=1.0,
            tune=Tunable("float", 0.1, 1.0, scope="layer", layer_form="list")),
        Arg("schedule", str, "progressive", "per-layer rank schedule", choices=("progressive", "uniform")),
        Arg("min_keep", float, None, "lower bound of a layer's keep fraction (progressive)", min=0.0, max=1.0),
        Arg("max_keep", float, None, "upper bound of a layer's keep fraction (progressive)", min=0.0, max=1.0),
        Arg("value_path", str, "absorbed", "fold B_V into o_proj or rebuild V", choices=("absorbed", "reconstruct")),
        Arg("scaling", str, "activation", "SVD of W (none: LoRC as published) or of W diag(input RMS) (activation: ASVD)",
            choices=("activation", "none")),
    )

    def __init__(self, **values):
        super().__init__(**values)
        from ..errors import RecipeError

        if isinstance(self.values["keep"], list):
            keep = self.values["keep"]
            if not keep or not all(isinstance(k, (int, float)) and not isinstance(k, bool) and 0 < k <= 1 for k in keep):
                raise RecipeError(f"lowrank_kv: a per-layer keep must be a non-empty list of fractions in (0, 1], one per layer; got {keep!r}")
            self.values["keep"] = [float(k) for k in keep]
            given = sorted(k for k in ("schedule", "min_keep", "max_keep") if values.get(k) is not None)
            if given:
                raise RecipeError(f"lowrank_kv: {', '.join(given)} shape(s) the ranks of one whole-model keep; a per-layer keep list "
                                  "sets every layer's ranks itself: pass either keep=<fraction> with them or keep=[...] alone")
            return
        if self.values["keep"] <= 0:
            raise RecipeError("lowrank_kv: argument 'keep' must be in (0, 1]")
        lo, hi = default_bounds(self.keep, self.min_keep, self.max_keep)
        if self.schedule == "progressive" and not (lo <= self.keep <= hi):
            raise RecipeError(f"lowrank_kv: keep={self.keep} must lie within [min_keep, max_keep] = [{lo}, {hi}]")

    def is_identity(self) -> bool:
        return all(k >= 1.0 for k in self.keep) if isinstance(self.keep, list) else self.keep >= 1.0

    def applies_to(self, sg) -> str | None:
        if sg.nodes(LATENT_ATTENTION):
            return "the graph already has low-rank (latent) attention; lowrank_kv applies once"
        attn = sg.nodes(ATTENTION)
        if not attn:
            return "the graph has no graphwright.attention nodes to rewrite"
        for node in attn:
            site = lowrank_site(sg, node)
            if not site:
                return site.reason
            if self.value_path == "absorbed" and site.proj.o_linear is None:
                return (f"layer {site.layer}: attention output does not reach an o_proj linear through reshapes; "
                        "use value_path='reconstruct'")
        return None

    def run(self, sg, ctx: PassContext):
        t0 = time.perf_counter()
        reason = self.applies_to(sg)
        n = len(sg.nodes(ATTENTION))
        if not reason and isinstance(self.keep, list) and len(self.keep) != n:
            reason = f"keep lists {len(self.keep)} per-layer fractions but the model has {n} attention layers (one fraction per layer)"
        if reason:
            from ..errors import RecipeError

            raise RecipeError(f"lowrank_kv does not apply to {sg.info.architecture}: {reason}")
        gm = sg.gm
        sites: list[LayerSite] = sorted((lowrank_site(sg, n) for n in sg.nodes(ATTENTION)), key=lambda s: s.layer)
        # fp64 SVD of W^T = U S V^T (or of diag(s) W^T, ASVD) per layer and projection, all KV heads jointly
        rms = input_rms(sg, [s.proj.x for s in sites], ctx) if self.scaling == "activation" else {}
        with single_thread():
            svd_k = [scaled_svd(s.proj.w_k.T, rms.get(s.proj.x)) for s in sites]
            svd_v = [scaled_svd(s.proj.w_v.T, rms.get(s.proj.x)) for s in sites]
        sig_k, sig_v = [s[1] for s in svd_k], [s[1] for s in svd_v]
        width_k, width_v = sites[0].proj.w_k.shape[0], sites[0].proj.w_v.shape[0]
        if isinstance(self.keep, list):
            plan = layer_ranks(sig_k, sig_v, width_k, width_v, self.keep)
        else:
            plan = allocate_ranks(sig_k, sig_v, width_k, width_v, self.keep, self.schedule, self.min_keep, self.max_keep)
        elsize = torch.empty((), dtype=sg.info.dtype).element_size()
        per_layer = {}
        for i, site in enumerate(sites):
            r_k, r_v = plan.r_k[i], plan.r_v[i]
            with single_thread():
                rewrite_layer(sg, site, svd_k[i], svd_v[i], r_k, r_v, absorbed=self.value_path == "absorbed")
            sk, sv = svd_k[i][1], svd_v[i][1]
            per_layer[site.layer] = {
                "r_k": r_k, "r_v": r_v,
                "keep": round((r_k + r_v) / (plan.width_k + plan.width_v), 4),
                "kv_bytes_per_token": (r_k + r_v) * elsize,
                "sigma_k_next": float(sk[r_k]) if r_k < sk.numel() else 0.0,
                "sigma_v_next": float(sv[r_v]) if r_v < sv.numel() else 0.0,
                "kappa_k": round(plan.kappa_k[i], 3), "kappa_v": round(plan.kappa_v[i], 3),
                "rope_table": None if site.proj.rope is None else str(site.proj.rope.node.target),
                "k_norm": site.proj.k_norm is not None,
            }
        gm.graph.eliminate_dead_code()
        for site in sites:
            shrink_fused_qkv(sg, site)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        set_fake_vals(gm, [n for site in sites for n in site.touched if n.graph is gm.graph and not n._erased])
        sg.notes["lowrank_kv"] = {
            "per_layer": per_layer,
            "show": ["r_k", "r_v"],  # report column; the rest is in .to_dict()
            "counts": {"attention_rewritten": len(sites), "latent_dims": sum(plan.r_k) + sum(plan.r_v),
                       "dense_dims": plan.dense},
            "settings": {**{k: v for k, v in self.values.items()}, **plan.settings,
                         "realised_keep": plan.realised_keep, "target_dims": plan.target,
                         "rope_scaling": _one_or_list({s.proj.rope.scaling for s in sites if s.proj.rope is not None}, None),
                         "rope_dims": _one_or_list({2 * int(s.proj.rope.inv_freq_shape) for s in sites if s.proj.rope is not None}, 0),
                         "rope_tables": len({s.proj.rope.node.target for s in sites if s.proj.rope is not None}),
                         "seconds": round(time.perf_counter() - t0, 2)},
        }
        return sg

