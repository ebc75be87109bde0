"""DuoAttention gate fitting (arXiv 2410.10819, ALGORITHMS-2 §2): which KV heads need the full context.

Technique. One gate ``alpha[l, h]`` in [0, 1] per (layer, KV head), initialised to 1. Every
attention layer computes, for all query heads of a KV group, full causal attention and streaming
attention (causal and ``j < sink or i - j < recent``) and mixes them before ``o_proj``:
``o = alpha * full + (1 - alpha) * stream``. The model's weights are frozen (``requires_grad`` off;
only the gates are optimised). Loss = mean over the labelled (answer) positions of
``mean_d (h_dense - h_mix)^2`` on the final hidden state of the decoder stack (after its last
norm) + ``lam * mean(|alpha|)``. AdamW (lr 0.02, weight decay 0), linear warm-up over the first
steps/5, flat, linear decay over the last steps/5 with a floor of 0.1 lr; gates clamped to [0, 1]
after every step. Data: seeded passkey samples built here (novel haystack with a few passkeys of
random words, then the questions with their answers, which are the labelled positions).

Two choices beyond the paper (``graphwright heads profile --method duo --rows answer --data ruler``;
``--rows answer`` is the profiler's default since session 26, ``fit_gates`` keeps the paper's ``rows="all"``):

* ``rows="answer"`` mixes only the labelled answer rows; the prompt rows attend fully. That is how graphwright's
  ``duo`` pass runs (a dense one-shot prefill; a streaming head drops to sinks + window from the first decoded
  token), so the gates are fitted for the attention they will decide. The prompt's keys and values then never
  depend on the gates: each sample's prompt runs once into a KV cache and a step runs the answer rows only
  (``_PromptCaches``), which is what makes 2k-token samples affordable on CPU (32 samples x 300 steps: 7-13 min).
* ``data="ruler"``: RULER multi-value needle cases (``ruler_samples``) instead of passkeys, on seeds the
  evaluation does not use; a head set fitted on them is calibrated on that task family (say so beside any
  score on it).

Scaled down for CPU (the paper trains 2000 steps on 1k-32k tokens with sink/recent 128/256): a
few hundred steps on a pool of samples of a few hundred tokens, sink/recent 16/64. The dense
teacher's hidden states are computed once per sample (the weights are frozen, so they never
change) instead of the paper's duplicated batch.

Hugging Face modules rather than the graphwright step graph: fitting needs autograd through the
attention mix, and the step graph is a captured inference graph whose attention is a fused op.
The mix runs as a registered attention function (``graphwright_duo``); models with sliding-window
layers or logit softcaps are refused.

Invariants tested on tiny models: the answer rows over the cached prompt equal one whole-sequence pass whose
prompt rows attend fully (any gates); gates move and the loss falls; a KV head whose values are zero
(so its streaming output equals its full output) has its gate driven to 0 by ``lam > 0`` while the
other heads stay higher; with ``recent`` >= the context every output is exact, the MSE is 0 and
all gates fall; :func:`select_gates` follows the spec's tau / target-sparsity rules.
"""

from __future__ import annotations

import random
import time

import torch

from .retrieval_score import route_attention

ATTN_NAME = "graphwright_duo"
PASSKEYS = 3
PASSKEY_WORDS = 6
ROWS = ("all", "answer")  # which rows mix full and streaming attention while fitting (fit_gates)
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def stream_mask(length: int, sink: int, recent: int) -> torch.Tensor:
    """[T, T] bool: causal and (key among the first ``sink`` or within ``recent`` of the query, itself included)."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return (j <= i) & ((j < sink) | (i - j < recent))


class _Mixer:
    """Attention function mixing full and streaming SDPA per KV head with the current gates."""

    def __init__(self, gates: torch.Parameter, sink: int, recent: int):
        self.gates, self.sink, self.recent = gates, sink, recent
        self._mask: torch.Tensor | None = None
        self._causal: torch.Tensor | None = None

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if kwargs.get("softcap") is not None or kwargs.get("sinks") is not None or getattr(module, "sliding_window", None):
            raise ValueError("DuoAttention gate fitting supports plain full-attention layers (no sliding window, softcap or sinks)")
        T, S = query.shape[2], key.shape[2]
        if T > S:
            raise ValueError(f"DuoAttention gate fitting: {T} query rows over {S} keys")
        if self._mask is None or self._mask.shape != (T, S):
            self._mask = stream_mask(S, self.sink, self.recent)[S - T:]  # the last T rows: a chunk after a cached prompt
            self._causal = None if T == S else torch.ones(S, S, dtype=torch.bool).tril()[S - T:]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        gqa = query.shape[1] != key.shape[1]
        if self._causal is None:
            full = sdpa(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            full = sdpa(query, key, value, attn_mask=self._causal, scale=scaling, enable_gqa=gqa)
        stream = sdpa(query, key, value, attn_mask=self._mask, scale=scaling, enable_gqa=gqa)
        g = query.shape[1] // key.shape[1]
        a = self.gates[module.layer_idx].repeat_interleave(g).to(query.dtype)[None, :, None, None]
        out = stream + a * (full - stream)
        return out.transpose(1, 2).contiguous(), None




def _words(rng: random.Random, n: int) -> list[str]:
    from graphwright.eval.ruler import word_list

    pool = word_list("adjectives") + word_list("nouns")
    return [rng.choice(pool) for _ in range(n)]


def passkey_samples(tokenizer, count: int, context: int, seed: int = 0, vocab_size: int | None = None,
                    passkeys: int = PASSKEYS, words: int = PASSKEY_WORDS) -> list[dict]:
    """``count`` seeded samples ``{"input_ids": [1, T], "labels": [T] bool}`` of ``context`` tokens.

    With a tokenizer: novel sentences with ``passkeys`` sentences "... it's the {n-th} passkey to
    the vault: w1 ... wk." at random depths (0.05-0.95), then for each "What is the {n-th} passkey?
    w1 ... wk." (the labelled Q/A segment). Without one (tiny models): the same layout in random
    token ids (haystack ids, passkey ids, a marker id before each answer).
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"samples must be a positive int, got {count!r}")
    if not isinstance(context, int) or context < 32:
        raise ValueError(f"context must be an int >= 32 tokens, got {context!r}")
    if not 1 <= passkeys <= len(ORDINALS):
        raise ValueError(f"passkeys must be in [1, {len(ORDINALS)}], got {passkeys!r}")
    rng = random.Random(f"graphwright-duo-passkey-{seed}-{context}")
    make = _text_sample if tokenizer is not None else _token_sample
    if tokenizer is None and not vocab_size:
        raise ValueError("passkey samples without a tokenizer need vocab_size")
    return [make(tokenizer or vocab_size, rng, context, passkeys, words) for _ in range(count)]


def _token_sample(vocab: int, rng: random.Random, context: int, passkeys: int, words: int) -> dict:
    keys = [[rng.randrange(4, vocab) for _ in range(words)] for _ in range(passkeys)]
    qa: list[int] = []
    for k in keys:
        qa += [3] + k
    hay = [rng.randrange(4, vocab) for _ in range(context - len(qa) - passkeys * (words + 1))]
    for k in keys:
        at = int(rng.uniform(0.05, 0.95) * len(hay))
        hay[at:at] = [3] + k
    ids = hay + qa
    labels = [False] * len(hay) + [True] * len(qa)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor(labels)}


def _text_sample(tok, rng: random.Random, context: int, passkeys: int, words: int) -> dict:
    from graphwright.eval.niah import filler_sentences

    keys = [" ".join(_words(rng, words)) for _ in range(passkeys)]
    needles = [f"Remember this, it's the {ORDINALS[n]} passkey to the vault: {k}." for n, k in enumerate(keys)]
    qa = "".join(f" What is the {ORDINALS[n]} passkey? {k}." for n, k in enumerate(keys))
    qa_ids = tok(qa, add_special_tokens=False).input_ids
    need = sum(len(tok(" " + s, add_special_tokens=False).input_ids) for s in needles) + len(qa_ids)
    if need + 16 > context:
        raise ValueError(f"context {context} is too short for {passkeys} passkeys of {words} words; use >= {need + 16}")
    pool, sents, n = filler_sentences(), [], 0
    while n < context - need:
        s = rng.choice(pool)
        sents.append(s)
        n += len(tok(" " + s, add_special_tokens=False).input_ids)
    for s in needles:
        sents.insert(int(rng.uniform(0.05, 0.95) * len(sents)), s)
    hay_ids = tok(" ".join(sents), add_special_tokens=False).input_ids[: context - len(qa_ids)]
    ids = hay_ids + qa_ids
    labels = [False] * len(hay_ids) + [True] * len(qa_ids)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor(labels)}


def ruler_samples(tokenizer, count: int, context: int, seed: int = 1, task: str = "niah_multivalue") -> list[dict]:
    """``count`` RULER ``task`` cases of ``context`` tokens (``graphwright.eval.ruler``, seeded) with their answer as the
    labelled suffix: ":\n\n1. v1\n2. v2 ..." in the order the values stand in the text (how the dense model lists them).

    Fit on seeds other than the evaluation's (``graphwright eval`` uses 0 for RULER); the cases share the task's
    templates, so a head set fitted here is calibrated on the task family, not on its evaluation cases."""
    from graphwright.eval.niah import encode
    from graphwright.eval.ruler import ruler_cases

    if tokenizer is None:
        raise ValueError("ruler samples need the model's tokenizer (a built-in real model such as smollm2-135m)")
    out = []
    for case in ruler_cases(tokenizer, tasks=(task,), lengths=(context,), cases=count, seed=seed):
        refs = sorted(case["references"], key=case["prompt"].find)
        answer = ":\n\n" + "\n".join(f"{i + 1}. {v}" for i, v in enumerate(refs))
        p_ids = encode(tokenizer, case["prompt"]).input_ids
        a_ids = tokenizer(answer, add_special_tokens=False).input_ids
        ids = list(p_ids) + list(a_ids)
        out.append({"input_ids": torch.tensor([ids]), "labels": torch.tensor([False] * len(p_ids) + [True] * len(a_ids))})
    return out


def lr_at(step: int, steps: int, lr: float) -> float:
    """Warm-up over the first steps/5, flat, linear decay over the last steps/5; never below 0.1 lr."""
    warm = max(1, steps // 5)
    if step < warm:
        f = (step + 1) / warm
    elif step >= steps - warm:
        f = (steps - step) / warm
    else:
        f = 1.0
    return lr * max(0.1, f)


def _final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    return base(input_ids=ids, use_cache=False).last_hidden_state[0]


def _answer_start(sample: dict) -> int:
    """Where the labelled suffix starts; ``rows="answer"`` needs the labels to be one run ending the sample."""
    labels = sample["labels"]
    n = int(labels.sum())
    if n == 0 or not bool(labels[-n:].all()):
        raise ValueError("rows='answer' needs each sample's labelled positions to be one run at its end (the answer)")
    return labels.shape[0] - n


class _PromptCaches:
    """Each sample's prompt run once, dense and without gradients, into a KV cache; the answer runs on top of it.

    With ``rows="answer"`` only the answer rows mix full and streaming attention (graphwright's ``duo`` prefills the
    prompt densely and streams from the first decoded token), so the prompt's keys and values never depend on the
    gates: computing them once is exact, and a step costs the answer's rows only. The caches stay resident for the
    whole fit: 2 x layers x KV heads x prompt tokens x head dim floats per sample (94 MB at 2k for smollm2-135m)."""

    def __init__(self, model, samples):
        from transformers import DynamicCache

        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model
        self.items = []
        with torch.no_grad():
            for s in samples:
                p = _answer_start(s)
                cache = DynamicCache(config=model.config)
                self.base(input_ids=s["input_ids"][:, :p], cache=cache, use_cache=True)
                self.items.append((s["input_ids"][:, p:], cache, [(layer.keys, layer.values) for layer in cache.layers]))

    def hidden(self, k: int) -> torch.Tensor:
        ids, cache, prompt = self.items[k]
        try:
            return self.base(input_ids=ids, cache=cache, use_cache=True).last_hidden_state[0]
        finally:  # back to the prompt's own tensors (a crop would keep a view into the step's graph)
            for layer, (keys, values) in zip(cache.layers, prompt):
                layer.keys, layer.values = keys, values


def fit_gates(model, samples: list[dict], steps: int = 200, sink: int = 16, recent: int = 64, lam: float = 0.05,
              lr: float = 0.02, seed: int = 0, progress: bool = True, rows: str = "all") -> dict:
    """Fit the [L, Hk] gates on ``samples`` (one per step, cycled); returns gates, losses, MSEs and seconds.

    ``rows="all"``: every position mixes full and streaming attention (the paper's training). ``rows="answer"``: only
    the labelled answer rows do, over the prompt's dense cache (how graphwright's ``duo`` runs: a dense prefill, then
    streaming heads from the first decoded token); each sample's prompt runs once, so a step costs its answer only."""
    from tqdm.auto import tqdm

    for nm, v, lo in (("steps", steps, 1), ("sink", sink, 0), ("recent", recent, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{nm} must be an int >= {lo}, got {v!r}")
    if not lam >= 0 or not lr > 0:
        raise ValueError(f"lam must be >= 0 and lr > 0; got lam={lam!r}, lr={lr!r}")
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    cfg = model.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise ValueError(f"DuoAttention gate fitting supports full-attention models; {type(model).__name__} has sliding_window="
                         f"{cfg.sliding_window}")
    L = cfg.num_hidden_layers
    Hk = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    t0 = time.perf_counter()
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    if rows == "answer":
        caches = _PromptCaches(model, samples)
        with torch.no_grad():
            teacher = [caches.hidden(k) for k in range(len(samples))]

        def hidden(k):
            return caches.hidden(k)
    else:
        with torch.no_grad():
            teacher = [_final_hidden(model, s["input_ids"])[s["labels"]] for s in samples]

        def hidden(k):
            return _final_hidden(model, samples[k]["input_ids"])[samples[k]["labels"]]
    gates = torch.nn.Parameter(torch.ones(L, Hk, dtype=torch.float32))
    opt = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    losses, mses = [], []
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(samples), generator=g).tolist()
    try:
        with route_attention(model, ATTN_NAME, _Mixer(gates, sink, recent)):
            for step in tqdm(range(steps), desc="duo gates", unit="step", disable=not progress, leave=False):
                k = order[step % len(samples)]
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, steps, lr)
                h = hidden(k)
                mse = ((h - teacher[k]) ** 2).mean(-1).mean()
                loss = mse + lam * gates.abs().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    gates.clamp_(0.0, 1.0)
                losses.append(round(float(loss.detach()), 6))
                mses.append(round(float(mse.detach()), 6))
    finally:
        for p, req in frozen:
            p.requires_grad_(req)
    return {"gates": gates.detach().clone(), "losses": losses, "mse": mses, "seconds": time.perf_counter() - t0}


def select_gates(gates: torch.Tensor, tau: float | None = None, sparsity: float | None = None) -> frozenset:
    """Retrieval heads: gate >= ``tau``; or with a target ``sparsity`` s, tau = quantile(gates, s)
    (s >= 1: all streaming, s <= 0: all retrieval), as ``sparsify_attention_heads``."""
    if (tau is None) == (sparsity is None):
        raise ValueError("give exactly one of tau (fixed gate threshold) or sparsity (target share of streaming heads)")
    flat = gates.detach().flatten().double()
    if sparsity is not None:
        if sparsity >= 1:
            return frozenset()
        if sparsity <= 0:
            tau = float("-inf")
        else:
            tau = float(torch.quantile(flat, sparsity))
    return frozenset((i, j) for i in range(gates.shape[0]) for j in range(gates.shape[1]) if float(gates[i, j]) >= tau)
