"""KVzip at run time (arXiv 2505.23416): replay the context through the compiled model, score, compact.

Runs after a prompt step on an empty cache (``Runtime.after_prompt``: ``cm.prefill(context)`` and a plain
``cm.generate(prompt)``) for a model compiled with ``evict(score="kvzip")`` (``passes/kvzip.py``, whose
``notes["kvzip"]`` give the settings, the replay prompt's ids and each layer's state names). The cache then
holds every prompt token in the packed layout (``ops/adakv_ref.py``: head-major slots h * T + t).

1. The *replay graph* is derived once from the runtime graph: its outputs are replaced by each KVzip layer's
   attention inputs q [B, H, T_r, D], k [B, Hk, N + T_r, D] and k_pos (dead code drops the LM head and the
   state outputs), lowered to the model's backend. It is the model itself: every layer's replay queries come
   from hidden states that attended to the whole context cache, as in kvpress.
2. Per row and chunk of ``chunk`` context tokens (after the chat template's ``prefix``): the replay ids
   [prompt (+ the previous chunk's last 8 tokens), suffix, chunk] run as one prompt step on the row's cache at
   positions n, n + 1, ... (n = the row's context length); its state outputs are never read, so the replay KV
   is dropped. ``ops/scorers/kvzip.replay_scores`` scores the row's context keys (sinks = the first
   min(sinks, chunk start) positions, the chunk, the replay tokens, causal); each position keeps the score of
   the chunk that holds it (0 before the first chunk).
3. ``keep_sets`` picks the kept pairs (global or per layer) and ``compact_packed`` gathers them, so the bytes
   held are the pairs kept. A latent (``lowrank_kv``) layer's per-head scores are pooled first
   (``pool_latent``: max over heads, one unit per token) and its dense latent rows c_k, c_v are gathered
   with ``eviction_ref.compact`` (one set for every head). ``last_stats["kvzip"]``: replay time, replay tokens and the pairs kept.
"""

from __future__ import annotations

import time

import torch

from ..codegen.lower import lower
from ..ops.adakv_ref import compact_packed
from ..ops.eviction_ref import compact
from ..ops.kvzip_graph import replay_graph
from ..ops.scorers.kvzip import keep_sets, pool_latent, replay_scores


def chunks_of(ids: list[int], prefix: int, size: int, prompt: dict) -> list[tuple[int, int, list[int]]]:
    """(lo, hi, replay ids) per chunk of one row's context ids (positions lo..hi-1 are replayed)."""
    body = len(ids) - prefix
    out = []
    for i, lo in enumerate(range(prefix, prefix + body, size)):
        hi = min(lo + size, len(ids))
        head = prompt["first"] if i == 0 else prompt["later"] + ids[max(prefix, lo - 8):lo]
        out.append((lo, hi, head + prompt["suffix"] + ids[lo:hi]))
    return out


class KVzipReplay:
    """``Runtime.after_prompt`` for a KVzip model: ``(ids, mask, positions, state, specs, extras) -> (state, stats)``."""

    def __init__(self, runtime_graph, backend, notes: dict):
        self._bind(notes, runtime_graph.state)
        gm, self.scales = replay_graph(runtime_graph.gm, self.layers, notes.get("head_dim"))
        self._run = lower(gm, backend)

    def _bind(self, notes: dict, state_specs) -> None:
        """The pass's notes (``layers`` rows [layer, k, v, positions state names]; ``latent`` layers) against the state
        the replay reads, in step order; shared with the ONNX replay (``kvzip_onnx.py``), whose run and scales differ."""
        self.notes = notes
        self.layers = [int(row[0]) for row in notes["layers"]]
        spec_index = {s.name: i for i, s in enumerate(state_specs)}
        self.index = {int(row[0]): [spec_index[n] for n in row[1:]] for row in notes["layers"]}  # k, v, positions
        self.latent = set(notes.get("latent", ()))

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask, positions, state, extras=None):
        if extras:
            raise ValueError(f"extra inputs {sorted(extras)} (e.g. emphasis) cannot be combined with evict(score='kvzip'): "
                             "its replay step runs past the prompt that steering's spans index")
        s, prompt = self.notes["settings"], self.notes["replay"]
        if s["budget_f"] >= 1.0:  # the exact setting: nothing is pruned, no replay
            return state, {"kvzip": {"replay_s": 0.0, "replay_tokens": 0, "kept_fraction": 1.0}}
        t0 = time.perf_counter()
        B, T = input_ids.shape
        before = sum(state[i].numel() * state[i].element_size() for layer in self.layers for i in self.index[layer][:2])
        keep_rows, replayed, kept, scored = [], 0, 0, 0
        for b in range(B):
            n = int(attention_mask[b].sum())
            ids = input_ids[b, T - n:].tolist()
            if n <= prompt["prefix"]:
                raise ValueError(f"evict(score='kvzip'): row {b} holds {n} tokens, no more than the chat template's "
                                 f"prefix ({prompt['prefix']} tokens): there is no context to replay")
            scores, count = self.row_scores([t[b:b + 1] for t in state], ids, T)
            replayed += count
            sets = keep_sets([pool_latent(scores[layer]) if layer in self.latent else scores[layer]
                              for layer in self.layers], s["sinks"], s["budget_n"], s["budget_f"], s["layerwise"])
            kept += sum(int(k.sum()) for k in sets)
            scored += sum(k.numel() for k in sets)
            keep_rows.append(sets)
        state = list(state)
        for i, layer in enumerate(self.layers):
            ki, vi, pi = self.index[layer]
            k_pos = state[pi]
            hk = k_pos.shape[1]
            if layer in self.latent:  # one kept set per row: gather the kept latent rows (c_k, c_v, positions)
                keep = torch.zeros(B, T, dtype=torch.bool, device=k_pos.device)
                for b in range(B):
                    pos = k_pos[b, 0]
                    real = pos >= 0
                    keep[b][real] = keep_rows[b][i][0].to(k_pos.device)[pos.clamp(min=0)][real]
                c_k, c_v, state[pi] = compact(keep[:, None].expand(B, hk, T), state[ki][:, None], state[vi][:, None],
                                              k_pos)
                state[ki], state[vi] = c_k[:, 0], c_v[:, 0]
                continue
            keep = torch.zeros(B, hk, T, dtype=torch.bool, device=k_pos.device)
            for b in range(B):
                pos = torch.diagonal(k_pos[b].reshape(hk, hk, T), dim1=0, dim2=1).T  # [Hk, T]: head h's own slots
                real = pos >= 0
                keep[b][real] = keep_rows[b][i].to(k_pos.device).gather(1, pos.clamp(min=0))[real]
            state[ki], state[vi], state[pi] = compact_packed(keep.reshape(B, hk * T), state[ki], state[vi], k_pos)
        return state, {"kvzip": {"replay_s": time.perf_counter() - t0, "replay_tokens": replayed,
                                 "kept_fraction": kept / scored if scored else 1.0, "kv_bytes_before": before}}

    def row_scores(self, row_state, ids: list[int], T: int):
        """({layer: [Hk, n] fp32 scores by position}, replay tokens run) of one row (batch-1 state, n = len(ids))."""
        s, prompt = self.notes["settings"], self.notes["replay"]
        n = len(ids)
        scores = {layer: torch.zeros(int(row_state[self.index[layer][2]].shape[1]), n) for layer in self.layers}
        count = 0
        for lo, hi, rids in chunks_of(ids, prompt["prefix"], s["chunk"], prompt):
            self._score_chunk(row_state, rids, n, T, lo, hi, s["sinks"], scores)
            count += len(rids)
        return scores, count

    def _score_chunk(self, row_state, rids, n, T, lo, hi, sinks, scores):
        device = row_state[0].device
        ids = torch.tensor([rids], device=device)
        q_pos = torch.arange(n, n + len(rids), device=device)[None]
        outs = self._run(ids, q_pos, torch.tensor([len(rids) - 1], device=device), *row_state)
        for i, layer in enumerate(self.layers):
            q, k, k_pos = outs[3 * i:3 * i + 3]
            if layer in self.latent:  # keys rebuilt per KV head over the dense latent rows, shared positions
                keys = k
                kpos = k_pos[:, None].expand(-1, k.shape[1], -1)
                pd = kpos[:, :, :T]
            else:
                hk = k_pos.shape[1]
                N = hk * T
                # the cache part of k is the packed buffer expanded to Hk heads: head h's own slots are h*T .. h*T + T - 1
                kd = torch.stack([k[0, h, h * T:(h + 1) * T] for h in range(hk)])[None]
                pd = torch.stack([k_pos[0, h, h * T:(h + 1) * T] for h in range(hk)])[None]
                keys = torch.cat([kd, k[:, :, N:]], 2)
                kpos = torch.cat([pd, k_pos[:, :, N:]], 2)
            sc = replay_scores(q, keys, q_pos, kpos, self.scales[layer], min(sinks, lo), lo, hi)[0, :, :T]
            chunk = (pd[0] >= lo) & (pd[0] < hi)
            h_idx, t_idx = chunk.nonzero(as_tuple=True)
            scores[layer][h_idx, pd[0][h_idx, t_idx]] = sc[h_idx, t_idx].cpu()
