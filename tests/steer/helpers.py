"""Shared helpers for the steering tests: attention recording, the closed-form oracle, a toy tokenizer."""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from graphwright.capture.ops import attention_reference, visible_mask
from graphwright.codegen.torch.attention import attention_sdpa

TOY_CHAT = "<s>user: {{ messages[0]['content'] }}\nassistant:"


@contextmanager
def record_attention(cm):
    """Record every attention call of ``cm``'s lowered graph: a list of dicts per call
    (``layer`` plus the op's arguments), in call order. The graph is restored afterwards."""
    calls = []
    impls = (attention_sdpa, attention_reference)
    nodes = [n for n in cm._lowered.graph.nodes if n.op == "call_function" and n.target in impls]
    assert nodes, "no attention nodes in the lowered graph"
    saved = {n: n.target for n in nodes}
    for n in nodes:
        layer, impl = n.meta["graphwright"]["layer"], n.target

        def rec(q, k, v, q_pos, k_pos, scale, window=0, key_bias=None, _layer=layer, _impl=impl):
            out = _impl(q, k, v, q_pos, k_pos, scale, window, key_bias)
            calls.append({"layer": _layer, "q": q, "k": k, "v": v, "q_pos": q_pos, "k_pos": k_pos, "scale": scale,
                          "window": window, "key_bias": key_bias, "out": out})
            return out

        n.target = rec
    cm._lowered.recompile()
    try:
        yield calls
    finally:
        for n, t in saved.items():
            n.target = t
        cm._lowered.recompile()


def probs(call, bias=True) -> torch.Tensor:
    """[B, H, T, S] attention probabilities of one recorded call, as the reference op computes them."""
    q, k = call["q"], call["k"]
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk
    scores = torch.matmul(q.reshape(B, Hk, g * T, D).float(), k.float().transpose(-1, -2)).view(B, Hk, g, T, S) * call["scale"]
    if bias and call["key_bias"] is not None:
        scores = scores + call["key_bias"].float().view(B, Hk, g, 1, S)
    scores = scores.masked_fill(~visible_mask(call["q_pos"], call["k_pos"], call["window"]), torch.finfo(torch.float32).min)
    return torch.softmax(scores, dim=-1).view(B, H, T, S)


def closed_form(A: torch.Tensor, scaled: torch.Tensor, alpha: float) -> torch.Tensor:
    """PASTA's T(A): columns in ``scaled`` ([B, S] bool) times alpha, rows renormalised (ALGORITHMS.md 3)."""
    w = torch.where(scaled[:, None, None, :], alpha, 1.0).to(torch.float64)
    num = A.double() * w
    return num / num.sum(-1, keepdim=True)


@functools.lru_cache(maxsize=None)
def toy_tokenizer(vocab_size: int = 256):
    """A fast BPE tokenizer (with offsets and a chat template) trained on the steering tasks' text,
    with ids < ``vocab_size`` so it drives the 256-token tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from graphwright.steer import tasks

    corpus = [e.prompt for name in tasks.TASKS for split in tasks.make_splits(name, 20, 20, seed=1) for e in split.examples]
    corpus += ["Question: Which sentence answers? Answer briefly. Copy that one sentence exactly."] * 3
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                        limit_alphabet=120))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = TOY_CHAT
    assert len(tok) <= vocab_size
    return tok
