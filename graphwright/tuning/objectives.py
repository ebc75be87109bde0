"""What a tuning trial measures: KV bytes held, streamed perplexity and short needle accuracy.

``Evaluator`` captures the model once (``capture``) and keeps the step graph for every trial, so
a trial costs only its own rewrite (``verify.run_recipe`` copies the graph before each pass) and
its evaluation. It scores on one split of the shipped novel: ``"calibration"`` (the first ~60%,
``eval.data.calibration_part``: what the search reads) or ``"heldout"`` (the last ~40%,
``eval.perplexity.heldout_windows``: where the winner is re-measured and reported). Perplexity
is streamed (``eval.perplexity.long_perplexity``: prefill ``prefix`` tokens, then one decode
step per scored token), so cache passes act on every scored token; ``kv_bytes`` is what the
runtime really held after each window (``cm.last_stats``). The dense model's scores on the
same windows are computed once (``base()``) and passed to every trial as plain data.

Decode speed (``speed_ratio``): the candidate's decode tokens/s over the dense model's, both
compiled in the same worker and measured alternately (dense, candidate, dense, ...) for
``rounds`` rounds of ``steps`` greedy decode steps after prefilling the first window's prefix;
the ratio is the median of the per-round ratios (a warm-up call of each is not counted). The
default measure reads the runtime's own decode timing (``last_stats["decode_tokens_per_s"]``,
prefill excluded); ``measure(cm, ids, steps) -> tokens/s`` can be injected (tests use a fake
one, so no test depends on a timing). Timings on a shared machine are noisy: alternation
cancels slow drifts of the load, not bursts, so use several rounds and read a floor as a coarse
filter.
Invariant (tested): the identity recipe scores ``kv_fraction == 1`` and ``ppl_ratio == 1``.
"""

from __future__ import annotations

import math
import time

import torch

SPLITS = ("calibration", "heldout")


def split_windows(tokenizer, split: str, n_windows: int, window: int) -> list:
    """``n_windows`` consecutive [1, window] token windows of the calibration or held-out text."""
    from ..eval.data import calibration_part
    from ..eval.perplexity import encode_text, heldout_windows

    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}; got {split!r}")
    if split == "heldout":
        return heldout_windows(tokenizer, n_windows=n_windows, window=window)
    ids = encode_text(tokenizer, calibration_part(), n_windows * window)
    if ids.shape[1] < n_windows * window:
        raise ValueError(f"the calibration text has {ids.shape[1]} tokens: fewer than {n_windows} windows of {window}")
    return [ids[:, i * window:(i + 1) * window] for i in range(n_windows)]


def needle_seed(split: str, seed: int = 0) -> str:
    """The ``needle_suite`` seed of a split's needles: its own namespace, never the long suite's integer seeds.

    The long-context suite (``eval.suite.run_suite``, ``bench/long_headline.py``) draws its needles with
    integer seeds (0 by default), so calibration needles drawn with seed 0 at the suite's length would be
    the suite's own cases. Calibration (``"tune-calibration-<seed>"``) and held-out (``"tune-heldout-<seed>"``)
    needles use string seeds of their own: other haystacks, cities, activities and template order
    (tested: no calibration prompt equals a suite prompt at the same length).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}; got {split!r}")
    return f"tune-{split}-{seed}"


class Evaluator:
    """Scores recipes on one split; the captured graph and the windows are built once."""

    def __init__(self, model, tokenizer, split: str = "calibration", windows: int = 2, window: int = 256, prefix: int = 128,
                 niah_cases: int = 0, niah_length: int = 256, backend: str = "torch", seed: int = 0):
        from ..capture import capture

        if tokenizer is None:
            raise ValueError("tuning needs a tokenizer (tiny built-in models: graphwright.eval.bytetok.ByteTokenizer)")
        if not (isinstance(prefix, int) and 1 <= prefix <= window - 2):
            raise ValueError(f"prefix must be an int in [1, window - 2 = {window - 2}]; got {prefix!r}")
        if not (isinstance(niah_cases, int) and niah_cases >= 0):
            raise ValueError(f"niah_cases must be an int >= 0; got {niah_cases!r}")
        self.model, self.tokenizer, self.backend, self.split = model, tokenizer, backend, split
        self.prefix = prefix
        self.windows = split_windows(tokenizer, split, windows, window)
        self.niah = []
        if niah_cases:
            from ..eval.niah import needle_suite

            self.niah = needle_suite(tokenizer, lengths=(niah_length,), cases=niah_cases, seed=needle_seed(split, seed))
        self.sg = capture(model)

    def compiled(self, recipe):
        """A ``CompiledModel`` of ``recipe`` built from the cached step graph (no new capture)."""
        from ..codegen.backends import get_backend
        from ..compiled import CompiledModel
        from ..verify import run_recipe

        chosen = get_backend(self.backend)
        sg, parsed, verification = run_recipe(self.sg, recipe, model=self.model, tokenizer=self.tokenizer, verify=False, backend=chosen)
        cm = CompiledModel(sg, tokenizer=self.tokenizer, recipe=parsed, backend=chosen, source=self.model)
        cm.verification = verification
        return cm

    def _windows(self, cm, windows):
        from ..eval.perplexity import long_perplexity

        return long_perplexity(cm, windows, prefix=self.prefix, progress=False)

    def base(self) -> dict:
        """The dense model's scores on these windows and needles (plain data; computed once per study)."""
        return self.evaluate(None)

    def first_window(self, recipe, base: dict) -> dict:
        """Scores of ``recipe`` on the first window only (what the proxies read; the ratio against base's first window)."""
        t0 = time.perf_counter()
        cm = self.compiled(recipe)
        return self._summary([self._windows(cm, self.windows[:1])], base, None, t0, proxy=True)

    def speed_ratio(self, cm, steps: int = 16, rounds: int = 3, measure=None) -> float:
        """Median over ``rounds`` of (candidate decode tokens/s) / (dense decode tokens/s), measured alternately."""
        if not (isinstance(steps, int) and steps >= 1 and isinstance(rounds, int) and rounds >= 1):
            raise ValueError(f"speed steps and rounds must be ints >= 1; got steps={steps!r}, rounds={rounds!r}")
        measure = measure or decode_tokens_per_s
        if getattr(self, "_dense_cm", None) is None:
            self._dense_cm = self.compiled(None)
        ids = self.windows[0][:, :self.prefix]
        measure(self._dense_cm, ids, steps), measure(cm, ids, steps)  # warm-up, not counted
        ratios = []
        for _ in range(rounds):
            dense = measure(self._dense_cm, ids, steps)
            cand = measure(cm, ids, steps)
            if not (dense > 0 and cand > 0):
                raise ValueError(f"a decode speed measure returned a non-positive tokens/s (dense {dense}, candidate {cand})")
            ratios.append(cand / dense)
        ratios.sort()
        mid = len(ratios) // 2
        return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2

    def evaluate(self, recipe, base: dict | None = None, proxy_check=None, speed: dict | None = None, measure=None) -> dict:
        """Scores of ``recipe`` (None: dense). ``proxy_check(partial)`` runs after the first window and may raise to stop.

        Returns ``{"kv_bytes", "kv_fraction", "ppl", "nll", "ppl_ratio", "niah", "tokens_per_s", "speed_ratio", "seconds"}``;
        the fraction and ratio are against ``base`` (None when no base is given). ``speed``
        (``{"steps", "rounds"}``): also measure ``speed_ratio`` (None otherwise) with ``measure``.
        """
        t0 = time.perf_counter()
        cm = self.compiled(recipe)
        first = self._windows(cm, self.windows[:1])
        if proxy_check is not None:
            proxy_check(self._summary([first], base, None, t0, proxy=True))
        parts = [first] + ([self._windows(cm, self.windows[1:])] if len(self.windows) > 1 else [])
        niah = None
        if self.niah:
            from ..eval.niah import run_niah

            niah = run_niah(cm, self.tokenizer, self.niah, max_new_tokens=8, progress=False)["accuracy"]
        out = self._summary(parts, base, niah, t0)
        out["speed_ratio"] = self.speed_ratio(cm, measure=measure, **speed) if speed else None
        return out

    def _summary(self, parts, base, niah, t0, proxy: bool = False) -> dict:
        nll = [x for p in parts for x in p["nll"]]
        kv = [x for p in parts for x in p["kv_bytes"]]
        mean_nll = sum(nll) / len(nll)
        tokens, seconds = sum(p["tokens"] for p in parts), sum(p["seconds"] for p in parts)
        out = {"kv_bytes": sum(kv) / len(kv), "nll": mean_nll, "ppl": math.exp(mean_nll), "niah": niah,
               "tokens_per_s": tokens / seconds if seconds > 0 else None, "windows": len(nll), "proxy": proxy,
               "seconds": time.perf_counter() - t0}
        out["kv_fraction"] = out["kv_bytes"] / base["kv_bytes"] if base else None
        # ratio of perplexities on the same windows (the proxy uses the first window's base NLL)
        base_nll = None if not base else (base["nll_per_window"][0] if proxy else base["nll"])
        out["ppl_ratio"] = math.exp(mean_nll - base_nll) if base_nll is not None else None
        out["nll_per_window"] = nll
        return out


def decode_tokens_per_s(cm, ids, steps: int) -> float:
    """Greedy decode tokens/s of ``cm`` for ``steps`` new tokens after ``ids`` (the runtime's decode timing; prefill excluded)."""
    cm.generate(ids, max_new_tokens=steps)
    tps = cm.last_stats.get("decode_tokens_per_s")
    if not tps:
        raise ValueError(f"the runtime reported no decode tokens/s for {steps} steps (last_stats: {sorted(cm.last_stats)})")
    return float(tps)


def set_threads(n: int | None) -> None:
    """Pin torch's intra-op threads (workers use 1 each so several share the cores, and results match a serial run)."""
    if n is not None:
        torch.set_num_threads(int(n))
