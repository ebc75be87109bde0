"""Activation scales for ``lowrank_kv(scaling="activation")`` (ASVD, arXiv 2312.05821).

Plain weight SVD (LoRC as published) treats every input channel of W_K / W_V alike. Real models
do not feed them alike: SmolLM2's attention inputs have a few channels 25x louder than the median
(RMS 3.3 vs 0.13 in layer 3), and the smallest singular directions of W_V line up with them, so
dropping even 2 of 192 value directions in every layer takes perplexity from 29.9 to 742
(measured with HF weights directly, so not a graphwright artefact). ASVD's fix keeps the method
training-free: factor W diag(s) instead of W, with s the per-channel RMS of the projection's
input on a little calibration text, and put diag(1/s) back on the down projection:

    W^T ~= diag(1/s) U_r S_r V_r^T      (SVD of diag(s) W^T)

so at full rank it is still exact and at rank r it minimises the error on typical activations.

The inputs are read by running the captured step graph itself (one prefill through an FX
``Interpreter`` that records the K/V projections' input nodes), so it works for every
architecture ``lowrank_kv`` supports without model-specific hooks. Calibration tokens are the
context's calibration text (``passes.pipeline.calibration_ids``, 200 tokens); a model without a
tokenizer gets seeded random token ids.
"""

from __future__ import annotations

import torch

CALIBRATION_SEED = 0
RANDOM_TOKENS = 128


class _Recorder(torch.fx.Interpreter):
    """Runs the graph once, keeping the values of ``wanted`` nodes."""

    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted = set(wanted)
        self.seen: dict = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted:
            self.seen[n] = out.detach()
        return out


def calibration_tokens(sg, ctx) -> torch.Tensor:
    """[1, T] ids: the context's calibration text, or seeded random ids when there is none."""
    if ctx is not None and ctx.calibration_ids is not None:
        return ctx.calibration_ids[:1].cpu()
    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    return torch.randint(0, sg.info.vocab_size, (1, RANDOM_TOKENS), generator=g)


@torch.inference_mode()
def input_rms(sg, nodes, ctx) -> dict:
    """Per node, the RMS over calibration tokens of each channel of its (last-dim) value, fp64."""
    ids = calibration_tokens(sg, ctx)
    T = ids.shape[1]
    rec = _Recorder(sg.gm, nodes)
    rec.run(ids, torch.arange(T)[None], torch.tensor([T - 1]), *sg.init_state(1))
    out = {}
    for n in nodes:
        v = rec.seen[n].double()
        out[n] = v.reshape(-1, v.shape[-1]).pow(2).mean(0).sqrt()
    return out


def scaled_svd(w_t: torch.Tensor, s: torch.Tensor | None):
    """SVD factors (U', S, Vh) of W^T [d, out] such that W^T ~= U'_r S_r Vh_r is the ASVD truncation.

    ``s`` None is plain SVD. Channels with zero activation keep a floor scale (1e-6 of the
    largest) so diag(1/s) stays finite; their columns then barely matter, as they should.
    """
    w_t = w_t.double()
    if s is None:
        return torch.linalg.svd(w_t, full_matrices=False)
    s = s.clamp_min(1e-6 * float(s.max().clamp_min(1e-30)))
    u, sig, vh = torch.linalg.svd(s[:, None] * w_t, full_matrices=False)
    return u / s[:, None], sig, vh
