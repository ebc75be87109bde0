"""Per-layer rank allocation for ``lowrank_kv`` (LoRC, arXiv 2410.03111, section "progressive").

Inputs: each layer's singular values of W_K and W_V (fp64), the dense per-token widths
(H_kv*D for K, H_kv*Dv for V) and the global budget ``keep`` = fraction of dense KV bytes kept.

Rule (``progressive``)
----------------------
1. Condition number per layer and projection: kappa = sigma_max / sigma_min over the full-rank
   spectrum (sigma_min floored at ``eps * sigma_max * n`` so a rank-deficient W stays finite).
2. Cumulative sensitivity c_l = sum_{j >= l} log kappa_j: an error made at layer l is amplified
   by every later layer, so c_l is largest at the first layer and non-increasing with depth.
3. Normalise u_l = (c_l - c_{L-1}) / (c_0 - c_{L-1}) in [0, 1] (u_0 = 1, u_{L-1} = 0).
4. Keep fraction rho_l = min_keep + (max_keep - min_keep) * u_l ** gamma. The endpoints are
   pinned to the declared bounds (first layer keeps ``max_keep``, last ``min_keep``) and gamma
   (> 0) bends the curve between them; the total is monotone in gamma, so bisection on
   log(gamma) meets any budget strictly inside the bounds. Each K and V has its own u (its own
   spectra) but they share gamma, so the budget is split across K and V by the same rule.
5. Integer ranks r = floor(rho * width) clipped to [1, full rank], then a greedy +/-1 fix-up
   to the exact integer budget round(keep * dense width): +1 goes to the first layer of a
   plateau (largest fractional remainder first), -1 to the last layer of a plateau, so ranks
   stay non-increasing with depth and the realised keep is within 1/dense_width of ``keep``.

Why this form: the paper (and reviewers) leave the normalisation open; an affine map of u
needs a second free parameter to hit a budget and can drive deep layers to rank 0, whereas the
exponent form keeps every layer inside [min_keep, max_keep] by construction, keeps the
monotonicity structural (u is monotone, rho is monotone in u) and has a one-dimensional,
monotone solve. Default bounds: [keep - spread, keep + spread] with spread = min(keep / 2,
1 - keep, 0.25), a moderate tilt around uniform that never asks a layer for more than full
rank or less than half the budget (see ``default_bounds``).

``uniform``: rho_l = keep for every layer and projection (then the same integer fix-up, which
gives the +1 remainders to the shallowest layers).

When the full ranks (min(d, width)) cannot hold the budget (d < width), every layer gets its
full rank: the rewrite is then exact and the realised keep is below ``keep``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DEFAULT_SPREAD = 0.25


def default_bounds(keep: float, min_keep: float | None, max_keep: float | None) -> tuple[float, float]:
    """Bounds of the per-layer keep fraction; a symmetric tilt of at most ``DEFAULT_SPREAD``."""
    spread = min(keep / 2, 1.0 - keep, DEFAULT_SPREAD)
    lo = keep - spread if min_keep is None else min_keep
    hi = keep + spread if max_keep is None else max_keep
    return lo, hi


def log_condition(sigma: torch.Tensor) -> float:
    """log(sigma_max / sigma_min) of a (descending) spectrum, with a rank-deficiency floor."""
    s = sigma.double()
    smax = float(s[0])
    if smax <= 0:
        return 0.0
    floor = torch.finfo(torch.float64).eps * smax * s.numel()
    return math.log(smax / max(float(s[-1]), floor))


def cumulative_sensitivity(sigmas: list) -> list[float]:
    """c_l = sum_{j >= l} log kappa_j (non-increasing in l)."""
    logk = [log_condition(s) for s in sigmas]
    out, acc = [], 0.0
    for v in reversed(logk):
        acc += v
        out.append(acc)
    return out[::-1]


def normalise(c: list[float]) -> list[float]:
    span = c[0] - c[-1]
    if len(c) == 1 or span <= 0:
        return [1.0] * len(c)
    return [(x - c[-1]) / span for x in c]


@dataclass
class RankPlan:
    r_k: list
    r_v: list
    rho_k: list  # continuous per-layer keep fraction before rounding
    rho_v: list
    kappa_k: list
    kappa_v: list
    width_k: int
    width_v: int
    target: int  # integer budget in latent dims (sum of r_k + r_v)
    dense: int  # dense width summed over layers (sum of width_k + width_v)
    settings: dict = field(default_factory=dict)

    @property
    def realised_keep(self) -> float:
        return (sum(self.r_k) + sum(self.r_v)) / self.dense


def _fix_up(ranks: dict, resid: dict, caps: dict, target: int) -> None:
    """Move sum(ranks) to ``target`` by +/-1 steps that keep every sequence non-increasing."""
    total = sum(sum(r) for r in ranks.values())
    while total != target:
        best = None
        for key, r in ranks.items():
            L = len(r)
            for l in range(L):
                if total < target:
                    ok = r[l] < caps[key][l] and (l == 0 or r[l - 1] > r[l])  # first of a plateau
                    score = resid[key][l]
                else:
                    ok = r[l] > 1 and (l == L - 1 or r[l + 1] < r[l])  # last of a plateau
                    score = -resid[key][l]
                if ok and (best is None or score > best[0] + 1e-12):
                    best = (score, key, l)
        if best is None:
            return  # saturated (all at caps or all at 1)
        _, key, l = best
        step = 1 if total < target else -1
        ranks[key][l] += step
        resid[key][l] -= step
        total += step


def allocate_ranks(sig_k: list, sig_v: list, width_k: int, width_v: int, keep: float,
                   schedule: str = "progressive", min_keep: float | None = None,
                   max_keep: float | None = None) -> RankPlan:
    """Per-layer (r_k, r_v) meeting ``keep`` of the dense width (see module docstring)."""
    L = len(sig_k)
    caps = {"k": [min(int(s.numel()), width_k) for s in sig_k], "v": [min(int(s.numel()), width_v) for s in sig_v]}
    widths = {"k": width_k, "v": width_v}
    dense = L * (width_k + width_v)
    target = int(round(keep * dense))
    kappa = {"k": [math.exp(log_condition(s)) for s in sig_k], "v": [math.exp(log_condition(s)) for s in sig_v]}
    settings = {"schedule": schedule, "keep": keep}
    if schedule == "uniform":
        rho = {x: [keep] * L for x in "kv"}
    elif schedule == "progressive":
        lo, hi = default_bounds(keep, min_keep, max_keep)
        u = {"k": normalise(cumulative_sensitivity(sig_k)), "v": normalise(cumulative_sensitivity(sig_v))}

        def profile(gamma):
            return {x: [lo + (hi - lo) * (ul ** gamma if ul > 0 else 0.0) for ul in u[x]] for x in "kv"}

        def total(gamma):
            p = profile(gamma)
            return sum(min(p[x][l] * widths[x], caps[x][l]) for x in "kv" for l in range(L))

        a, b = -12.0, 12.0  # log(gamma); total(gamma) decreases as gamma grows
        for _ in range(100):
            m = (a + b) / 2
            if total(math.exp(m)) > target:
                a = m
            else:
                b = m
        gamma = math.exp((a + b) / 2)
        rho = profile(gamma)
        settings.update({"min_keep": lo, "max_keep": hi, "gamma": gamma,
                         "cum_log_kappa_k": cumulative_sensitivity(sig_k),
                         "cum_log_kappa_v": cumulative_sensitivity(sig_v)})
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose 'progressive' or 'uniform'")
    ranks, resid = {}, {}
    for x in "kv":
        exact = [rho[x][l] * widths[x] for l in range(L)]
        ranks[x] = [max(1, min(caps[x][l], math.floor(exact[l] + 1e-9))) for l in range(L)]
        # uniform: equal remainders, so break ties towards shallow layers (earlier index wins)
        resid[x] = [exact[l] - ranks[x][l] for l in range(L)]
    _fix_up(ranks, resid, caps, min(target, sum(caps["k"]) + sum(caps["v"])))
    return RankPlan(r_k=ranks["k"], r_v=ranks["v"], rho_k=rho["k"], rho_v=rho["v"], kappa_k=kappa["k"],
                    kappa_v=kappa["v"], width_k=width_k, width_v=width_v, target=target, dense=dense, settings=settings)


def layer_ranks(sig_k: list, sig_v: list, width_k: int, width_v: int, keeps: list) -> RankPlan:
    """Per-layer ranks from one keep fraction per layer (``lowrank_kv(keep=[...])``, the per-layer tuning form).

    r = round(keep_l * width) for K and V alike, clipped to [1, full rank min(d, width)]; no schedule
    and no budget fix-up: the caller chose every layer. ``keeps`` of 1.0 give every layer its full rank.
    """
    L = len(sig_k)
    if len(keeps) != L:
        raise ValueError(f"layer_ranks: {len(keeps)} keep fractions for {L} layers (one per layer)")
    caps = {"k": [min(int(s.numel()), width_k) for s in sig_k], "v": [min(int(s.numel()), width_v) for s in sig_v]}
    widths = {"k": width_k, "v": width_v}
    ranks = {x: [max(1, min(caps[x][l], int(math.floor(keeps[l] * widths[x] + 0.5)))) for l in range(L)] for x in "kv"}
    kappa = {"k": [math.exp(log_condition(s)) for s in sig_k], "v": [math.exp(log_condition(s)) for s in sig_v]}
    return RankPlan(r_k=ranks["k"], r_v=ranks["v"], rho_k=list(keeps), rho_v=list(keeps), kappa_k=kappa["k"], kappa_v=kappa["v"],
                    width_k=width_k, width_v=width_v, target=sum(ranks["k"]) + sum(ranks["v"]), dense=L * (width_k + width_v),
                    settings={"schedule": "per_layer", "keep": list(keeps)})
