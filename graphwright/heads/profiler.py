"""``profile(model, method=...)``: measure a head set (retrieval score or DuoAttention gates) for any model.

``method="retrieval"``: :mod:`graphwright.heads.retrieval_score` on seeded NIAH cases; the default
selection is the paper's rule, score > ``threshold`` (0.1). ``method="mass"``:
:mod:`graphwright.heads.needle_mass` (QRHead-style attention mass on the needles at the model's answer rows)
on seeded RULER multi-value cases at ``lengths`` (seeds from ``seed + 1``); selection: score > ``threshold``.
``method="duo"``:
:mod:`graphwright.heads.duo_gates` on seeded passkey samples; the default selection is a target
sparsity (``sparsity=0.5``: the top half of the gates are retrieval heads, DuoAttention's GQA
deployment) or a fixed ``tau`` (retrieval iff gate >= tau) when given. Both run the model's
Hugging Face modules (see each module for why) and write how they were made into ``settings``
and what was measured (samples kept, steps, wall time, share of heads above 0.1) into ``measured``.
"""

from __future__ import annotations

import time

import torch

from .headset import METHODS, HeadSet

DUO_DATA = {"passkey": "graphwright.heads.duo_gates.passkey_samples",
            "ruler": "graphwright.heads.duo_gates.ruler_samples (RULER niah_multivalue, answer labelled)"}


def _load(model, tokenizer):
    if isinstance(model, torch.nn.Module):
        name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
        return model.eval(), tokenizer, str(name)
    if not isinstance(model, str):
        raise ValueError(f"model must be a built-in name, a path or an nn.Module; got {type(model).__name__}")
    from graphwright.models import load_model

    m, tok = load_model(model)
    return m, tokenizer if tokenizer is not None else tok, model


def _shape(model) -> tuple[int, int, int]:
    cfg = model.config
    L, H = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_attention_heads", None)
    if not L or not H:
        raise ValueError(f"{type(model).__name__} has no num_hidden_layers / num_attention_heads in its config; "
                         "head profiling needs a decoder-only Hugging Face model")
    return L, H, getattr(cfg, "num_key_value_heads", None) or H


def _rounded(t: torch.Tensor) -> tuple:
    return tuple(tuple(round(float(x), 6) for x in row) for row in t)


def _check_cases(cases) -> None:
    if not isinstance(cases, int) or cases < 1:
        raise ValueError(f"cases must be a positive int, got {cases!r}")


def _above(scores: torch.Tensor, threshold: float) -> frozenset:
    """The (layer, KV head) pairs scoring > ``threshold``: the retrieval and mass methods' default selection."""
    return frozenset((i, j) for i in range(scores.shape[0]) for j in range(scores.shape[1]) if float(scores[i, j]) > threshold)


def _top(scores: torch.Tensor, n: int = 10) -> list:
    flat = [(float(scores[i, j]), i, j) for i in range(scores.shape[0]) for j in range(scores.shape[1])]
    flat.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [[i, j, round(s, 4)] for s, i, j in flat[:n]]


def profile(model, method: str = "retrieval", *, tokenizer=None, name: str | None = None, seed: int = 0, pool: str = "max",
            lengths=(512, 1024), cases: int = 16, max_new_tokens: int = 24, threshold: float = 0.1,
            steps: int = 200, samples: int = 16, context: int = 768, sink: int = 16, recent: int = 64,
            lam: float = 0.05, lr: float = 0.02, sparsity: float | None = 0.5, tau: float | None = None,
            data: str = "passkey", rows: str = "answer", progress: bool = True) -> HeadSet:
    """Profile ``model`` (built-in name, path or HF module) and return its :class:`HeadSet`.

    retrieval: ``cases`` NIAH cases per length in ``lengths``; query heads pooled to KV heads by
    ``pool``; retrieval heads = score > ``threshold``. duo: ``steps`` AdamW steps over ``samples``
    samples of ``context`` tokens (``data``: "passkey" samples, or "ruler" multi-value needle cases
    with seeds from ``seed + 1``, never the evaluation's 0) with a ``sink`` + ``recent`` streaming mask on
    ``rows`` ("answer", the default: only the answer rows over a dense prompt, as graphwright's duo
    runs; "all": every row, the paper's fit); gates pooled per KV head by construction; retrieval heads
    by ``tau`` if given, else ``sparsity``. The answer-row fit is the default since session 26: on
    smollm2-135m it gave 0.69 vs the every-row fit's 0.59-0.62 on 2k multi-value needles (dense 0.72).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if tau is not None and not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau!r}")
    if sparsity is not None and not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    m, tok, label = _load(model, tokenizer)
    label = name or label
    H = _shape(m)[1]  # also refuses a model without a decoder config, whatever the method
    t0 = time.perf_counter()
    if method == "mass":
        return _mass(m, tok, label, t0, seed=seed, lengths=tuple(lengths), cases=cases, max_new_tokens=max_new_tokens,
                     threshold=threshold, progress=progress)
    if method == "retrieval":
        return _retrieval(m, tok, label, H, t0, seed=seed, pool=pool, lengths=tuple(lengths), cases=cases,
                          max_new_tokens=max_new_tokens, threshold=threshold, progress=progress)
    if data not in DUO_DATA:
        raise ValueError(f"data must be one of {tuple(DUO_DATA)}, got {data!r}")
    return _duo(m, tok, label, t0, seed=seed, steps=steps, samples=samples, context=context, sink=sink, recent=recent,
                lam=lam, lr=lr, sparsity=sparsity, tau=tau, data=data, rows=rows, progress=progress)


def _retrieval(m, tok, label, H, t0, *, seed, pool, lengths, cases, max_new_tokens, threshold, progress):
    from graphwright.eval.niah import needle_suite

    from .retrieval_score import retrieval_scores

    if tok is None:
        raise ValueError(f"retrieval scoring needs a tokenizer and {label!r} has none (tiny random models); use e.g. smollm2-135m "
                         "or method='duo'")
    _check_cases(cases)
    suite = needle_suite(tok, lengths=lengths, cases=cases, seed=seed)
    res = retrieval_scores(m, tok, suite, pool=pool, max_new_tokens=max_new_tokens, progress=progress)
    s = res["scores"]
    chosen = _above(s, threshold)
    q = res["query_scores"]
    settings = {"source": "arXiv 2404.15574 retrieval score (graphwright.heads.retrieval_score)", "data": "graphwright.eval.niah.needle_suite",
                "lengths": list(lengths), "cases_per_length": cases, "seed": seed, "max_new_tokens": max_new_tokens,
                "keep_if_rouge1_recall_above": 0.5, "copy_span": "needle answer (activity) tokens", "gqa_pool": pool,
                "query_heads": H, "selection": f"score > {threshold}"}
    measured = {"cases": res["cases"], "kept": res["kept"], "wall_seconds": round(time.perf_counter() - t0, 1),
                "fraction_kv_heads_above_0.1": round(float((s > 0.1).float().mean()), 4),
                "fraction_query_heads_above_0.1": round(float((q > 0.1).float().mean()), 4),
                "top_kv_heads": _top(s), "query_scores": [[round(float(x), 4) for x in row] for row in q]}
    return HeadSet(model=label, method="retrieval", scores=_rounded(s), retrieval=chosen, settings=settings, measured=measured)


def _mass(m, tok, label, t0, *, seed, lengths, cases, max_new_tokens, threshold, progress):
    from graphwright.eval.ruler import ruler_cases

    from .needle_mass import NEEDLE_AFTER, NEEDLE_BEFORE, needle_mass_scores

    if tok is None:
        raise ValueError(f"needle mass needs a tokenizer and {label!r} has none (tiny random models: pass tokenizer="
                         "ByteTokenizer()); use e.g. smollm2-135m")
    _check_cases(cases)
    suite = ruler_cases(tok, tasks=("niah_multivalue",), lengths=lengths, cases=cases, seed=seed + 1)
    res = needle_mass_scores(m, tok, suite, max_new_tokens=max_new_tokens, progress=progress)
    s = res["scores"]
    chosen = _above(s, threshold)
    settings = {"source": "needle attention mass at the answer rows (graphwright.heads.needle_mass; QRHead, arXiv 2506.09944, "
                          "adapted)", "data": f"graphwright.eval.ruler niah_multivalue (seed {seed + 1})", "lengths": list(lengths),
                "cases_per_length": cases, "seed": seed, "max_new_tokens": max_new_tokens,
                "needle_span": f"each value's tokens + {NEEDLE_BEFORE} before + {NEEDLE_AFTER} after",
                "score": "mass - |needles| / T, mean over cases, >= 0",
                "gqa_pool": "mean", "selection": f"score > {threshold}"}
    measured = {"cases": res["cases"], "wall_seconds": round(time.perf_counter() - t0, 1),
                "dense_answer_score": round(sum(r["score"] for r in res["rows"]) / len(res["rows"]), 4),
                "fraction_kv_heads_above_0.1": round(float((s > 0.1).float().mean()), 4), "top_kv_heads": _top(s),
                "rows": res["rows"]}
    return HeadSet(model=label, method="mass", scores=_rounded(s), retrieval=chosen, settings=settings, measured=measured)


def _duo(m, tok, label, t0, *, seed, steps, samples, context, sink, recent, lam, lr, sparsity, tau, data, rows, progress):
    from .duo_gates import fit_gates, passkey_samples, ruler_samples, select_gates

    if data == "ruler":
        pool = ruler_samples(tok, samples, context, seed=seed + 1)
    else:
        pool = passkey_samples(tok, samples, context, seed=seed, vocab_size=m.config.vocab_size)
    fit = fit_gates(m, pool, steps=steps, sink=sink, recent=recent, lam=lam, lr=lr, seed=seed, progress=progress, rows=rows)
    g = fit["gates"]
    chosen = select_gates(g, tau=tau, sparsity=None if tau is not None else sparsity)
    rule = f"gate >= tau = {tau}" if tau is not None else f"target sparsity {sparsity} (tau = quantile of the gates)"
    settings = {"source": "arXiv 2410.10819 DuoAttention gate optimisation (graphwright.heads.duo_gates)",
                "data": DUO_DATA[data] + (f" (seed {seed + 1})" if data == "ruler" else ""), "samples": samples,
                "context_tokens": context, "mixed_rows": rows, "seed": seed, "steps": steps, "sink": sink, "recent": recent,
                "lambda": lam, "lr": lr, "optimizer": "AdamW(wd=0)",
                "schedule": "linear warm-up steps/5, flat, linear decay over the last steps/5, floor 0.1 lr", "selection": rule}
    measured = {"wall_seconds": round(time.perf_counter() - t0, 1), "fit_seconds": round(fit["seconds"], 1),
                "loss_first": fit["losses"][0], "loss_last": fit["losses"][-1], "mse_first": fit["mse"][0], "mse_last": fit["mse"][-1],
                "fraction_kv_heads_above_0.1": round(float((g > 0.1).float().mean()), 4), "top_kv_heads": _top(g),
                "loss_every_10": fit["losses"][::10]}
    return HeadSet(model=label, method="duo", scores=_rounded(g), retrieval=chosen, settings=settings, measured=measured)


def top_overlap(a: HeadSet, b: HeadSet, fraction: float = 0.25) -> dict:
    """How far two head sets agree: the shared heads among each one's top ``fraction`` by score (``HeadSet.select``)."""
    a.check_model(b.num_layers, b.num_kv_heads, b.model)
    sa, sb = a.select(fraction), b.select(fraction)
    return {"fraction": fraction, "top": len(sa), "shared": len(sa & sb), "share": len(sa & sb) / max(1, len(sa)),
            "shared_heads": sorted(sa & sb), "chance": fraction}
