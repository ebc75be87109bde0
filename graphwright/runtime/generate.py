"""The prefill/decode loop over a step function, with left padding and KV accounting.

One loop serves every backend: anything with ``step(input_ids, positions, logits_index, state)
-> (logits, state)`` and a list of ``StateSpec`` (the torch step graph, an ONNX Runtime session).
The runtime owns the cache: it allocates the empty state, threads each step's state outputs into
the next step, and measures what the state really holds.

Graphs rewritten by passes that need per-request data (steering) take extra named inputs
(``StepGraph.extra_inputs``); ``generate``/``logits`` forward a dict of them, unchanged, to every
step. They are step-invariant by contract (indexed by absolute position), so the loop never has
to rebuild them, and steps that take no extras never see the keyword.
"""

from __future__ import annotations

import time

import torch

from ..capture.step_graph import positions_from_mask, prompt_blocks
from .held_bytes import held_bytes, live_bytes, prefill_peak_bytes
from .inputs import check_attention_mask, check_length
from .sampling import check_sampling, choose_next

state_bytes = live_bytes  # the name the rest of the runtime and the benches import


def kept_tokens_per_head(state, specs, num_layers: int, num_kv_heads: int):
    """Per layer, a [B, H_kv] LongTensor of real tokens the cache holds (None where unknown).

    Read from positions state (-1 = empty or padding slot, never counted): a layer's per-head
    ``key_positions{layer}`` [B, H_kv, S] when an eviction pass gave it one, else the shared
    ``key_positions`` [B, S] (every head holds the same tokens). A layer ``duo`` split holds its
    H_str streaming heads' positions in ``duo_positions{layer}``: its row is then the H_kv - H_str
    retrieval heads (shared positions) followed by the streaming heads (retrieval first, not model order).
    """
    shared, per, streaming = None, {}, {}
    for t, s in zip(state, specs):
        if s.kind == "positions" and s.name.startswith("key_positions"):
            if s.layer is None:
                shared = (t >= 0).sum(dim=-1)[:, None].expand(-1, num_kv_heads)
            else:
                per[s.layer] = (t >= 0).sum(dim=-1)
        elif s.kind == "positions" and s.name.startswith("duo_positions") and s.layer is not None:
            streaming[s.layer] = (t >= 0).sum(dim=-1)
    out = [per.get(i, shared) for i in range(num_layers)]
    for i, counts in streaming.items():
        if out[i] is not None:
            out[i] = torch.cat([out[i][:, :num_kv_heads - counts.shape[1]], counts], dim=1)
    return out


def check_prompt(input_ids, attention_mask, vocab_size: int):
    """``(input_ids, attention_mask)`` as LongTensors [B, T]; ``ValueError`` for bad ids or a mask that is not
    0/1, left-padded and shaped like the ids (``inputs.check_attention_mask``)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a LongTensor [batch, seq]; got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be [batch, seq] with seq >= 1; got shape {list(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be integer token ids; got dtype {input_ids.dtype}")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}); got range [{int(input_ids.min())}, {int(input_ids.max())}]")
    return input_ids.long(), check_attention_mask(attention_mask, input_ids)


FROM_INFO = object()  # Runtime's default position limit: the model's own max_positions


class Runtime:
    """Generation and scoring over a step function with explicit state."""

    def __init__(self, step, specs, info, max_positions=FROM_INFO, recipe=None, prefill_chunk: int | None = None):
        """``max_positions``: how many positions a generation may reach (``inputs.check_length``); by
        default ``info.max_positions``, None for no limit (graphs whose attention sees cache indices only).
        ``prefill_chunk``: run a prompt as steps of at most N tokens (``prompt_blocks``; set by
        ``evict(block=N)``, KeyDiff's block-wise prefill); None: one prompt step."""
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 2):
            raise ValueError(f"prefill_chunk must be an int >= 2 (a one-token chunk reads as a decode step); "
                             f"got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self.step = step
        self.specs = specs
        self.info = info
        self.max_positions = info.max_positions if max_positions is FROM_INFO else max_positions
        self.last_stats: dict = {}
        self.recipe = recipe  # recorded in a Context's layout (a context is only reused under the same recipe)
        # (ids, mask, positions, state, extras) -> (state, stats): run after a prompt step on an empty cache by
        # prefill and generate (not logits); evict(score='kvzip')'s replay and compaction (``kvzip_replay.py``)
        self.after_prompt = None
        self.rerotated_layers = None  # evict(..., rerotate=True): layers whose kept keys sit at 0..n-1 (CompiledModel)

    def _prompt_step(self, input_ids, attention_mask, extras, allow_long, logits_index, dense_fn, source: str):
        """One checked prompt step from empty state; ``last_stats`` gets the cache it held. -> (logits, state, positions, mask)."""
        input_ids, attention_mask = check_prompt(input_ids, attention_mask, self.info.vocab_size)
        check_length(self.info, int(attention_mask.sum(dim=1).max()), 0, self.max_positions, allow_long)
        B, T = input_ids.shape
        positions = positions_from_mask(attention_mask)
        state = [s.empty(B, input_ids.device) for s in self.specs]
        logits, state = self._prompt(input_ids, positions, logits_index(T, input_ids.device), state, extras or {})
        hook = {}
        if self.after_prompt is not None and source == "prefill":
            state, hook = self.after_prompt(input_ids, attention_mask, positions, state, extras)
        kv, dense = state_bytes(state, self.specs), dense_fn(B, T)
        self.last_stats = {"batch": B, "prompt_tokens": int(attention_mask.sum()), "new_tokens": 0, "kv_bytes": kv,
                           **held_bytes(state, self.specs), "kv_peak_bytes": prefill_peak_bytes(state, self.specs, B, T),
                           "kv_bytes_dense": dense, "kv_fraction": kv / dense if dense else 0.0, "source": source, **hook}
        return logits, state, positions, attention_mask

    def _next_positions(self, state, positions, extras):
        """[B, 1] positions after a prompt step: the prompt's last + 1, or n, the kept count, when the recipe re-rotates
        the kept keys to 0..n-1 (``evict(..., rerotate=True)``, ``runtime/rerotate.py``)."""
        if self.rerotated_layers is None:
            return positions[:, -1:] + 1
        if extras:
            raise ValueError(f"extra inputs {sorted(extras)} (e.g. emphasis) index prompt positions, which "
                             "evict(..., rerotate=True) renumbers; leave rerotate out to use them")
        from .rerotate import next_positions

        return next_positions(state, self.specs, self.rerotated_layers).to(positions.device)

    def _prompt(self, input_ids, positions, logits_index, state, extras):
        """The prompt as one step, or (``prefill_chunk``) as blocks; logits at ``logits_index`` of the prompt."""
        T = input_ids.shape[1]
        if self.prefill_chunk is None or T <= self.prefill_chunk:
            return self.step(input_ids, positions, logits_index, state, **extras)
        if extras:
            raise ValueError(f"extra inputs {sorted(extras)} cannot be fed to a prompt run in blocks (prefill_chunk="
                             f"{self.prefill_chunk}); compile without evict(block=...) to use them")
        parts = []
        for a, b in prompt_blocks(T, self.prefill_chunk):
            idx = logits_index[(logits_index >= a) & (logits_index < b)] - a
            out, state = self.step(input_ids[:, a:b], positions[:, a:b], idx if idx.numel() else
                                   torch.tensor([b - a - 1], device=input_ids.device), state)
            if idx.numel():
                parts.append(out)
        return torch.cat(parts, dim=1), state

    @torch.inference_mode()
    def logits(self, input_ids, attention_mask=None, extras: dict | None = None, allow_long: bool = False) -> torch.Tensor:
        """Logits [B, T, V] for every prompt position (one prefill step); ``last_stats`` gets the cache it held."""
        return self._prompt_step(input_ids, attention_mask, extras, allow_long, lambda T, dev: torch.arange(T, device=dev),
                                 lambda B, T: self.info.dense_kv_bytes_per_token() * B * T, "logits")[0]

    @torch.inference_mode()
    def prefill(self, input_ids, attention_mask=None, extras: dict | None = None, allow_long: bool = False, recipe=None):
        """Run the prompt step on a context and return it as a reusable ``Context`` (``runtime/context.py``); the
        state is the step's own (nothing else holds it), so it is not copied here (``generate`` copies it per question)."""
        from .context import Context, layout

        logits, state, positions, mask = self._prompt_step(input_ids, attention_mask, extras, allow_long,
                                                           lambda T, dev: torch.tensor([T - 1], device=dev), self.info.dense_kv_bytes, "prefill")
        return Context(state, mask.clone(), self._next_positions(state, positions, extras), logits[:, -1].clone(),
                       layout(self.specs, self.info, recipe))

    def _check_context(self, context, input_ids, attention_mask, extras):
        """Real context tokens per row (zeros without a context); ``ValueError`` for a context that does not fit."""
        if context is None:
            return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        from .context import Context

        if not isinstance(context, Context):
            raise ValueError(f"context must be a Context from prefill(); got {type(context).__name__}")
        context.check(self.specs, self.info, self.recipe)
        if context.batch != input_ids.shape[0]:
            raise ValueError(f"the context has {context.batch} row(s) but input_ids has {input_ids.shape[0]}")
        if not bool(attention_mask.all()):
            raise ValueError("questions that continue a context cannot be padded: give every row the same length "
                             "(or one question per call)")
        if extras:
            raise ValueError(f"extra inputs {sorted(extras)} (e.g. emphasis) cannot be combined with a context")
        return context.tokens.to(input_ids.device)

    def _continue(self, context, input_ids):
        """Feed ``input_ids`` after a copy of ``context``'s state, one decode step per token."""
        state = [t.clone() for t in context.state]
        pos = context.next_positions.to(input_ids.device)
        zero = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        peak = held_bytes(state, self.specs)["kv_storage_bytes"]
        logits = None
        for t in range(input_ids.shape[1]):
            logits, state = self.step(input_ids[:, t:t + 1], pos, zero, state)
            pos = pos + 1
            peak = max(peak, held_bytes(state, self.specs)["kv_storage_bytes"])
        return logits, state, pos, peak

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens: int = 32, attention_mask=None, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, seed: int | None = None,
                 eos_token_id=None, pad_token_id=None, extras: dict | None = None, allow_long: bool = False,
                 context=None) -> torch.Tensor:
        """Token ids [B, T + n] like Hugging Face ``generate``: prompt, then new tokens (greedy by default).

        Stops when every row has produced an EOS or after ``max_new_tokens``; finished rows are
        filled with ``pad_token_id``. ``extras``: named extra graph inputs fed to every step.
        Raises ``ValueError`` before any step when the longest row plus ``max_new_tokens`` exceeds
        the model's ``max_positions``; ``allow_long=True`` runs a rotary model past it with a warning
        (``inputs.check_length``). ``context``: a ``Context`` from ``prefill``; ``input_ids`` (the question,
        unpadded) continue it through decode steps and the context is left unchanged (``runtime/context.py``).
        """
        extras = extras or {}
        do_sample, temperature, top_k, top_p, seed = check_sampling(do_sample, temperature, top_k, top_p, seed)
        input_ids, attention_mask = check_prompt(input_ids, attention_mask, self.info.vocab_size)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
        before = self._check_context(context, input_ids, attention_mask, extras)
        check_length(self.info, int((attention_mask.sum(dim=1) + before).max()), max_new_tokens, self.max_positions, allow_long)
        eos = self.info.eos_token_id if eos_token_id is None else (
            (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (self.info.pad_token_id if self.info.pad_token_id is not None else (eos[0] if eos else 0))
        gen = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
        B, T = input_ids.shape
        device = input_ids.device
        eos_t = torch.tensor(eos, device=device) if eos else None
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        tokens = [input_ids]

        t0 = time.perf_counter()
        hook = {}
        if context is None:
            positions = positions_from_mask(attention_mask)
            state = [s.empty(B, device) for s in self.specs]
            logits, state = self._prompt(input_ids, positions, torch.tensor([T - 1], device=device), state, extras)
            if self.after_prompt is not None:
                state, hook = self.after_prompt(input_ids, attention_mask, positions, state, extras)
            held = held_bytes(state, self.specs)
            peak = max(prefill_peak_bytes(state, self.specs, B, T), held["kv_storage_bytes"])
            next_pos = self._next_positions(state, positions, extras)
        else:
            logits, state, next_pos, peak = self._continue(context, input_ids)
            held = held_bytes(state, self.specs)
        prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        steps = 0
        donate = {"donate_state": True} if getattr(self.step, "takes_donated_state", False) else {}
        for i in range(max_new_tokens):
            nxt = choose_next(logits[:, -1], do_sample, temperature, top_k, top_p, gen)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt[:, None])
            if eos_t is not None:
                finished = finished | torch.isin(nxt, eos_t)
            if i == max_new_tokens - 1 or bool(finished.all()):
                break
            # the state is this loop's own (its prompt step's, or its copy of a context): an ONNX step may write it in
            # place (codegen/onnx/inplace_slots.py)
            logits, state = self.step(nxt[:, None], next_pos, torch.zeros(1, dtype=torch.long, device=device), state,
                                      **extras, **donate)
            next_pos = next_pos + 1
            steps += 1
            held = held_bytes(state, self.specs)
            peak = max(peak, held["kv_storage_bytes"])
        decode_s = time.perf_counter() - t1
        out = torch.cat(tokens, dim=1)
        kv = state_bytes(state, self.specs)
        seq_len = T + steps + (context.attention_mask.shape[1] if context is not None else 0)
        dense = self.info.dense_kv_bytes(B, seq_len)  # what the original model's cache holds (sliding layers: their window)
        kept = kept_tokens_per_head(state, self.specs, self.info.num_layers, self.info.num_kv_heads)
        # real tokens each head of layer l would hold without eviction: the row's prompt plus the fed-back
        # tokens, at most w - 1 in a layer with a native sliding window w (what the original model's cache keeps)
        rows = attention_mask.sum(dim=1) + steps + before
        windows = self.info.windows or (0,) * len(kept)
        known = [k for k in kept if k is not None]
        real_known = sum(float((rows.clamp(max=w - 1) if w else rows).sum()) for k, w in zip(kept, windows) if k is not None)
        self.last_stats = {
            "batch": B,
            "prompt_tokens": int(attention_mask.sum() + (before.sum() if context is not None else 0)),
            "new_tokens": out.shape[1] - T,
            "kv_bytes": kv,
            "kv_bytes_dense": dense,
            "kv_fraction": kv / dense if dense else 0.0,
            "kv_storage_bytes": held["kv_storage_bytes"],
            "kv_state_bytes": held["kv_state_bytes"],
            "kv_peak_bytes": peak,
            "kv_index_bytes": state_bytes(state, self.specs, "positions"),
            "kv_summary_bytes": state_bytes(state, self.specs, "summary"),
            "kept_tokens_per_head": [k.tolist() if k is not None else None for k in kept],
            "kept_fraction": (sum(float(k.sum()) for k in known) / (real_known * self.info.num_kv_heads)
                              if known and real_known else None),
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "prefill_tokens_per_s": int(attention_mask.sum()) / prefill_s if prefill_s > 0 else 0.0,
            **({"context_tokens": int(before.sum())} if context is not None else {}),
            "decode_tokens_per_s": B * steps / decode_s if steps and decode_s > 0 else 0.0,
            **hook,
        }
        return out
