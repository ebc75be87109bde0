"""Which heads to steer: profile them on a task (PASTA's per-head search, AutoPASTA's coarse-to-fine).

PASTA steers a *small* set of heads; steering the wrong ones (or all of them) wrecks fluency.
The paper ranks single heads by task accuracy on ~1000 training examples -- L x H generations
per example, far too many for a CPU. AutoPASTA's coarse-to-fine search is what we run by default:

1. *coarse*: steer every head of one layer at a time, score the task, rank the layers;
2. *fine*: inside the ``top_layers`` best layers, steer one head at a time, rank the heads;
3. keep the ``top_heads`` best heads as the head set (and score that set too, for the record).

Ranking is by the task's primary metric, ties broken by the mean of all its metrics. The result
is a head-set JSON ``{"heads": {layer: [heads]}, "scores": ..., "settings": ...}`` written to
``out`` and cached where ``steer(heads='auto')`` finds it.

All configurations share one compiled graph: the model is steered on every head once and the
per-layer ``steer_coef_<layer>`` buffers (log(alpha) or 0 per head) are rewritten in place
between runs, so profiling never recompiles.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from .bias import STEER_INPUT
from .heads import auto_head_path, model_key, save_head_set
from .tasks import evaluate_task, subset, task_metric


def steerable(cm, tokenizer=None):
    """A CompiledModel steered on all heads (``cm`` itself when it is already steered)."""
    from ..compiled import CompiledModel

    if not hasattr(cm, "step_graph"):  # an HF model
        from ..compile import compile as compile_model

        cm = compile_model(cm, tokenizer=tokenizer)
    if any(x.name == STEER_INPUT for x in cm.step_graph.extra_inputs):
        return cm
    from ..passes.base import PassContext
    from ..passes.steer import Steer

    sg = Steer(heads="all").run(cm.step_graph.copy(), PassContext())
    return CompiledModel(sg, tokenizer=tokenizer or cm.tokenizer, backend=cm.backend_object, source=cm.source)


def _coef_modules(cm):
    mods = [cm.step_graph.gm]
    if getattr(cm, "_lowered", None) is not None:
        mods.append(cm._lowered)
    return mods


@contextmanager
def steering_heads(cm, heads: dict, alpha: float = 0.01):
    """Temporarily steer exactly ``heads`` ({layer: [heads]}) at ``alpha`` on a model steered
    on a superset of them (e.g. by ``steerable``); the original buffers come back afterwards."""
    steered = {int(k): v["heads"] for k, v in cm.step_graph.notes["steer"]["per_layer"].items()}
    for layer, hs in heads.items():
        if not set(hs) <= set(steered.get(layer, [])):
            raise ValueError(f"layer {layer} heads {hs} are not all steerable in this graph (steerable: {steered.get(layer, [])})")
    saved = {}
    for mod in _coef_modules(cm):
        for layer in steered:
            buf = getattr(mod, f"steer_coef_{layer}")
            saved.setdefault(id(buf), (buf, buf.clone()))
            new = torch.zeros_like(buf)
            if heads.get(layer):
                new[list(heads[layer])] = math.log(alpha)
            buf.copy_(new)
    try:
        yield cm
    finally:
        for buf, old in saved.values():
            buf.copy_(old)


def run_task(cm, task, heads=None, alpha: float = 0.01, batch_size: int = 8, max_new_tokens: int = 48,
             chat: bool = True, emphasize: bool = True) -> tuple:
    """(mean scores, generations) of ``task`` on ``cm``; ``heads=None`` or ``emphasize=False`` = unsteered."""
    gens = []
    exs = task.examples
    for i in range(0, len(exs), batch_size):
        chunk = exs[i:i + batch_size]
        emph = [list(e.emphasis) for e in chunk] if (emphasize and heads) else None
        prompts = [e.prompt for e in chunk]
        if emph is None:
            gens += cm.generate_text(prompts, max_new_tokens=max_new_tokens, chat=chat)
        else:
            with steering_heads(cm, heads, alpha):
                gens += cm.generate_text(prompts, emphasis=emph, max_new_tokens=max_new_tokens, chat=chat)
    return evaluate_task(task, gens), gens


def _rank_key(task, scores: dict):
    return (scores[task_metric(task, scores)], sum(scores.values()) / len(scores))


def profile_heads(model_or_cm, task, examples: int | None = None, mode: str = "coarse_to_fine", top_layers: int = 3,
                  top_heads: int = 4, alpha: float = 0.01, max_new_tokens: int = 48, batch_size: int = 8,
                  out=None, tokenizer=None, chat: bool = True, progress: bool = True) -> dict:
    """Profile heads for ``task`` (a ``tasks.Task``); returns the head-set record (also written to ``out``).

    ``mode``: ``"coarse_to_fine"`` (layers, then heads in the best ``top_layers``; when no single
    head beats the unsteered baseline but the best layer does, that whole layer), ``"layers"``
    (whole layers only: the head set is the ``top_layers`` best layers) or ``"heads"`` (every
    single head, as the paper; L x H task runs).
    """
    from rich.progress import Progress

    if mode not in ("coarse_to_fine", "layers", "heads"):
        raise ValueError(f"mode must be 'coarse_to_fine', 'layers' or 'heads'; got {mode!r}")
    cm = steerable(model_or_cm, tokenizer)
    if examples is not None:
        task = subset(task, examples)
    L, H = cm.info.num_layers, cm.info.num_heads
    n_runs = 2 + (L if mode != "heads" else 0) + (min(top_layers, L) * H if mode == "coarse_to_fine" else 0) + (L * H if mode == "heads" else 0)
    kw = dict(alpha=alpha, batch_size=batch_size, max_new_tokens=max_new_tokens, chat=chat)
    record = {"baseline": None, "layers": {}, "heads": {}, "final": None}
    with Progress(disable=not progress, transient=False) as bar:
        job = bar.add_task(f"profiling {getattr(task, 'name', 'task')} heads", total=n_runs)

        def run(heads):
            scores, _ = run_task(cm, task, heads, **kw)
            bar.advance(job)
            return scores

        record["baseline"] = run(None)
        if mode != "heads":
            for layer in range(L):
                record["layers"][layer] = run({layer: list(range(H))})
            ranked_layers = sorted(range(L), key=lambda l: _rank_key(task, record["layers"][l]), reverse=True)
        if mode == "layers":
            best = {layer: list(range(H)) for layer in ranked_layers[:top_layers]}
        else:
            layers = ranked_layers[:top_layers] if mode == "coarse_to_fine" else range(L)
            for layer in layers:
                for h in range(H):
                    record["heads"][f"{layer}.{h}"] = run({layer: [h]})
            ranked = sorted(record["heads"], key=lambda k: _rank_key(task, record["heads"][k]), reverse=True)
            best: dict = {}
            for k in ranked[:top_heads]:
                layer, h = map(int, k.split("."))
                best.setdefault(layer, []).append(h)
            if mode == "coarse_to_fine" and ranked:
                # the coarse stage found a layer that helps but no single head of it does (a small
                # model often needs several heads at once): keep the whole layer, not arbitrary ties
                base, top = _rank_key(task, record["baseline"]), ranked_layers[0]
                if _rank_key(task, record["heads"][ranked[0]]) <= base < _rank_key(task, record["layers"][top]):
                    best = {top: list(range(H))}
                    record["whole_layer"] = top
        record["final"] = run(best)
    best = {layer: sorted(hs) for layer, hs in sorted(best.items())}
    settings = {"task": getattr(task, "name", type(task).__name__), "metric": task_metric(task, record["baseline"]),
                "examples": len(task.examples), "mode": mode,
                "top_layers": top_layers, "top_heads": top_heads, "alpha": alpha, "max_new_tokens": max_new_tokens,
                "chat": chat, "model_key": model_key(cm.step_graph)}
    result = {"heads": best, "scores": record, "settings": settings}
    if out is not None:
        save_head_set(out, best, scores=record, settings=settings)
    save_head_set(auto_head_path(settings["model_key"]), best, scores=record, settings=settings)
    return result
