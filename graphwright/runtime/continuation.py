"""Teacher-forced scoring of a continuation in multi-token steps over the prefilled (compressed) cache.

``score_stream`` scores every token after the prefix by one decode step: 2,047 steps for a 4,096-token
perplexity window. A policy that compresses the prompt once, after the step that found the cache empty, and
then only appends (SnapKV, uniform and every head-budget variant; ``evict(when="prefill")``) keeps exactly the
same cache whether the continuation arrives one token per step or many per step: attention masks keys by
position (``0 <= k_pos <= q_pos``), so the queries of a multi-token step see the compressed prefix plus the
continuation causally, exactly what each single decode step sees. ``score_continuation`` therefore feeds the
continuation as steps of up to ``block`` tokens (default: one step), with logits at every position.

DuoAttention's streaming heads do evict at every later step, but a window mask on their attention makes a
multi-token step exact (``duo_continuation.py``): continuation steps run that masked copy of the graph, and the
final check expects sinks + window tokens on those heads.

Otherwise the graph must append only after the prompt step (``append_only_refusal``): an eviction op that can act at a
later step (H2O, TOVA, StreamingLLM, duo's streaming heads on a latent cache, Scissorhands, Keyformer, FastGen,
per-step Ada-KV, ``evict`` with ``when`` other than ``prefill``), ThinK's cache split, block-sparse attention
(dense for a multi-token step, sparse at decode), GemFilter and a block-wise prompt (``evict(block=N)``) are
refused with the reason, and a backend that owns its cache layout too. After scoring, every layer without a
native sliding window must hold exactly its prompt-step tokens plus the continuation (``ValueError`` otherwise),
so an op that evicted anyway cannot go unnoticed.

Invariant tested (``tests/runtime/test_continuation.py``): on tiny Llama the per-token NLL equals
``score_stream``'s within 1e-5 for the dense graph, uniform SnapKV, head-score shares and three duo recipes (one
step and blocks of 5 and 1), with the same ``kv_bytes``; the refused policies raise before any step.
"""

from __future__ import annotations

import torch

from ..ops import schema
from ..ops.block_sparse import BLOCK_SPARSE_ATTENTION
from ..ops.eviction import EVICT_ADAKV, EVICT_ADAKV_SCORED, EVICT_ADAKV_SHARES, EVICT_OPS, EVICT_SNAPKV, THINK_PRUNE
from ..ops.policy_scored import EVICT_SCORED, EVICT_SCORED_ACC, EVICT_SCORED_REUSE, EVICT_SCORED_ROPE, EVICT_SCORED_ROPE_VALUES, EVICT_SCORED_WO
from .duo_continuation import streaming_evictions, windowed_step
from .generate import kept_tokens_per_head, state_bytes
from .held_bytes import held_bytes
from .rerotate import continued
from .score import scoring_start, token_nll

# compress only at the step whose cache was empty, append at every later step (their references' first test)
PROMPT_ONLY = (EVICT_SNAPKV, EVICT_ADAKV, EVICT_ADAKV_SHARES, EVICT_ADAKV_SCORED)
# the generic scored ops: prompt-only when their schedule is when="prefill"
SCHEDULED = (EVICT_SCORED, EVICT_SCORED_ACC, EVICT_SCORED_ROPE, EVICT_SCORED_ROPE_VALUES, EVICT_SCORED_REUSE,
             EVICT_SCORED_WO)


def _name(target) -> str:
    return target._schema.name.replace("::", ".")


def append_only_refusal(step_graph, ignore=frozenset()) -> str | None:
    """Why ``step_graph`` may change its cache at a step after the prompt step other than by appending, or None.

    ``ignore``: names of eviction nodes the caller makes exact otherwise (duo's streaming heads, ``duo_continuation``)."""
    notes = step_graph.notes
    if "gemfilter" in notes:
        return "gemfilter selects prompt tokens with the question in view (its runtime re-runs the prompt)"
    if notes.get("prefill_chunk"):
        return (f"evict(block={notes['prefill_chunk']}) evicts after every multi-token step (a block-wise prompt), "
                "so a continuation step would be evicted too")
    for node in step_graph.gm.graph.nodes:
        if node.op != "call_function" or node.name in ignore:
            continue
        t = node.target
        if t in PROMPT_ONLY:
            continue
        if t in SCHEDULED:
            when = schema.get(node, "when")
            if when == "prefill":
                continue
            return (f"{_name(t)} (evict(..., when={when!r})) evicts at steps after the prompt, so a multi-token "
                    "continuation step would not equal one decode step per token")
        if t in EVICT_OPS:
            return (f"{_name(t)} evicts at decode steps (the policy re-selects the cache as tokens arrive: H2O, TOVA, "
                    "StreamingLLM and duo's streaming heads, Scissorhands, Keyformer, FastGen, per-step Ada-KV), so a "
                    "multi-token continuation step would not equal one decode step per token")
        if t == THINK_PRUNE:
            return "think splits the key cache by step kind (prompt vs decode); a multi-token continuation is not shown equal"
        if t == BLOCK_SPARSE_ATTENTION:
            return "block-sparse attention is dense for a multi-token step and sparse at a decode step"
    return None


def _check(cm) -> tuple[str | None, set]:
    """(why ``score_continuation`` refuses ``cm``, or None; duo's streaming eviction nodes it windows)."""
    rt, graph = getattr(cm, "_runtime", None), getattr(cm, "runtime_graph", None)
    if rt is None or graph is None:
        raise TypeError(f"score_continuation needs a CompiledModel (its graph is checked); got {type(cm).__name__}")
    if getattr(cm, "_backend_step", None) is not None:
        return (f"backend {cm.backend!r} owns its cache layout; score_continuation runs on the torch, reference and "
                "triton backends"), set()
    step_graph = getattr(cm, "step_graph", graph)  # the notes (gemfilter, prefill_chunk) live on the compiled graph
    duo, why_not = streaming_evictions(cm)  # duo's streaming heads: exact with a window mask (duo_continuation.py)
    why = append_only_refusal(step_graph, duo) or (append_only_refusal(graph, duo) if graph is not step_graph else None)
    return why_not or why, duo


def continuation_refusal(cm) -> str | None:
    """Why ``score_continuation`` would refuse the compiled model ``cm`` (then score it with ``score_stream``), or
    None when its multi-token continuation steps equal decode steps."""
    return _check(cm)[0]


def _runtime_parts(cm):
    why, duo = _check(cm)
    if why is not None:
        raise ValueError(f"score_continuation needs a graph that only appends after the prompt step: {why}. "
                         "Score it with score_stream (one decode step per token) instead.")
    rt = cm._runtime
    return rt, (windowed_step(cm) if duo else rt.step)


@torch.inference_mode()
def score_continuation(cm, input_ids: torch.Tensor, prefix_len: int, block: int | None = None, progress=None,
                       allow_long: bool = False) -> torch.Tensor:
    """NLL of tokens 1..T-1 of ``input_ids`` [B, T] (or [T]): the prefix as one prompt step, the rest in steps.

    Same result and layout as ``score_stream`` ([B, T-1] float32, entry t = -log p(ids[t+1] | ids[:t+1])) for a
    graph that only appends after the prompt step; the continuation (tokens prefix_len..T-2 fed) runs as steps of
    up to ``block`` tokens (None: one step; memory grows with block x (cache + block)). ``progress``: a tqdm bar
    advanced per scored continuation token. ``last_stats`` as after ``score_stream`` (``source``
    "score_continuation", ``continuation_steps``). Raises ``ValueError`` for a graph that may evict later
    (``append_only_refusal``) or, after the fact, when a layer lost a token.
    """
    rt, cont_step = _runtime_parts(cm)
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block must be a positive int (tokens per continuation step) or None; got {block!r}")
    ids, squeeze, state, positions = scoring_start(rt, input_ids, prefix_len, allow_long, "score_continuation")
    B, T = ids.shape
    device = ids.device
    logits, state = rt.step(ids[:, :prefix_len], positions[:, :prefix_len], torch.arange(prefix_len, device=device), state)
    positions = continued(rt, state, positions, prefix_len)  # evict(..., rerotate=True): later tokens from n
    n = min(prefix_len, T - 1)
    nll = [token_nll(logits[:, :n], ids[:, 1:n + 1])]
    del logits
    L, hk = rt.info.num_layers, rt.info.num_kv_heads
    before = kept_tokens_per_head(state, rt.specs, L, hk)
    cont = max(0, T - 1 - prefix_len)
    size = cont if block is None else block
    steps = 0
    for a in range(prefix_len, T - 1, max(size, 1)):
        b = min(a + size, T - 1)
        logits, state = cont_step(ids[:, a:b], positions[:, a:b], torch.arange(b - a, device=device), state)
        nll.append(token_nll(logits, ids[:, a + 1:b + 1]))
        del logits
        steps += 1
        if progress is not None:
            progress.update(b - a)
    after = kept_tokens_per_head(state, rt.specs, L, hk)
    windows = rt.info.windows or (0,) * L
    duo = cm.step_graph.notes.get("duo") if cont_step is not rt.step else None
    for layer, (k0, k1, w) in enumerate(zip(before, after, windows)):
        if k0 is None or k1 is None or w:
            continue
        want = k0 + cont
        if duo is not None and duo["per_layer"].get(layer, {}).get("streaming"):  # streaming heads last: sinks + window
            n = len(duo["per_layer"][layer]["streaming"])
            want[:, -n:] = want[:, -n:].clamp(max=duo["settings"]["sinks"] + duo["settings"]["window"])
        if not torch.equal(k1, want):
            raise ValueError(f"score_continuation: layer {layer} holds {k1.tolist()} tokens per head after the "
                             f"continuation, not {want.tolist()} (prompt step + {cont}): an op evicted after the "
                             "prompt step; score this graph with score_stream")
    out = torch.cat(nll, dim=1)
    kv = state_bytes(state, rt.specs)
    dense = rt.info.dense_kv_bytes_per_token() * B * (T - 1)
    rt.last_stats = {"batch": B, "prompt_tokens": prefix_len * B, "scored_tokens": (T - 1) * B, "decode_steps": 0,
                     "continuation_steps": steps, "kv_bytes": kv, **held_bytes(state, rt.specs), "kv_bytes_dense": dense,
                     "kv_fraction": kv / dense if dense else 0.0, "source": "score_continuation"}
    return out[0] if squeeze else out
