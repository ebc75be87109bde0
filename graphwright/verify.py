"""Compile-time verification: every pass is checked on a probe input, on the chosen backend.

``passes.pipeline.run_recipe`` applies the passes and calls a ``verify_fn`` after each one; this
module (above codegen and runtime, so it may lower and run graphs) provides that callback and the
verifying ``run_recipe`` that ``compile`` and other callers use.

Verification compares the logits of the graph before and after every pass on a small seeded probe
(two rows, one left-padded, so padding handling is exercised too), each *lowered to the backend the
user chose* (a broken kernel fails at compile time, not in production): an exact pass that moves
the logits is a bug and raises ``GraphwrightError``; a lossy pass gets its measured deviation
recorded. When the backend cannot run on the model's device (Triton on a CPU model without the
interpreter) the probe runs on the torch backend instead and ``verification["fallback"]`` says why.

The probe is a prefill plus ``PROBE_DECODE`` teacher-forced decode steps through the runtime's own
state threading (``runtime.score.stream_logits``, on the graph the backend runs: ``Backend.runtime_graph``
then ``lower``), so KV eviction, which acts after prefill and at every decode step, changes the
logits verification compares (a prefill-only probe saw eviction passes as lossless). The probe's
prompt is longer than every pass's budget (``passes.budgets``: the budget plus a few tokens, at
least ``PROBE_LEN``, at most ``PROBE_MAX_LEN``), so eviction acts; each record says how much of the
fed tokens the cache still held (``kv_kept``). The compiled backend's ``torch.compile``d decode step
is not run here (its kernels are the torch backend's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codegen.backends import Backend, get_backend
from .codegen.lower import lower
from .errors import GraphwrightError
from .passes import pipeline
from .passes.budgets import budget_reach
from .runtime.generate import kept_tokens_per_head
from .runtime.score import stream_logits

PROBE_BATCH, PROBE_LEN, PROBE_PAD, PROBE_SEED = 2, 16, 3, 0
PROBE_DECODE = 4  # teacher-forced decode steps after the prefill (eviction acts at each)
PROBE_MAX_LEN = 128  # cap on the probe's prompt: a larger budget is not exceeded (kv_kept then says 1.0)
PROBE_MARGIN = 4  # tokens past the largest budget
EXACT_TOL = {torch.float32: 1e-4, torch.float64: 1e-4}  # any other dtype (fp16, bf16): LOW_PRECISION_TOL
# a backend's kernels vs the reference backend: same math, another accumulation order (the torch
# backend's decode GEMVs over transposed weights moved SmolLM2-MoE's probe logits by 1.25e-4 over
# 4 decode steps); still 20x below what a 1% attention-scale error moves them
KERNEL_TOL = {torch.float32: 5e-4, torch.float64: 1e-4}
LOW_PRECISION_TOL = 1e-2


@dataclass(frozen=True)
class Probe:
    """Seeded probe: ``ids``/``mask`` [2, prefill + decode]; row 1 left-padded by ``PROBE_PAD``; the first
    ``prefill`` tokens are one prefill step, every later one a decode step."""

    ids: torch.Tensor
    mask: torch.Tensor
    prefill: int

    @property
    def decode(self) -> int:
        return self.ids.shape[1] - self.prefill


def probe_length(recipe, max_tokens: int | None = None) -> int:
    """Prompt length of the probe for ``recipe``: the largest pass budget (``passes.budgets``) + PAD + MARGIN,
    clamped to [PROBE_LEN, max_tokens] (default ``PROBE_MAX_LEN``)."""
    cap = PROBE_MAX_LEN if max_tokens is None else max_tokens
    return min(cap, max([PROBE_LEN, *(a + PROBE_PAD + PROBE_MARGIN for a in budget_reach(recipe).values())]))


def run_recipe(sg, recipe, model=None, tokenizer=None, verify: bool = True, backend: str | Backend = "torch",
               verify_tokens: int | None = None):
    """Apply ``recipe`` to ``sg``, verifying each pass on ``backend``; returns ``(new_sg, Recipe, verification)``.

    ``verification`` is plain data: ``{"backend": name, "passes": [{"name", "exact", "max_abs_logit_diff",
    "kl", "decode_max_abs_logit_diff", "decode_kl", "kv_kept"}, ...], "probe": {"batch", "prompt_tokens",
    "decode_steps", "left_padding"}, "lowering": {"reference", "max_abs_logit_diff", "kl", ...}}`` plus
    ``"fallback"`` (the reason) when the probe ran on torch instead of ``backend``; diff and KL cover every
    probe token (prefill and decode), ``decode_*`` the decode steps only; a near-zero budget adds
    ``"warning"`` (``passes.budgets``). With ``verify=False`` only ``{"passes": [...]}``, diff and KL None.
    ``verify_tokens`` caps the probe's prompt (default ``PROBE_MAX_LEN``): budgets at or above it are not
    exceeded at compile time and are listed under ``probe.uncrossed``; raise it to exercise them.
    Raises ``RecipeError`` for a bad recipe, a pass that does not apply or a setting that keeps no token,
    ``GraphwrightError`` for an exact pass, or a backend's lowering, that changed the logits.
    """
    chosen = get_backend(backend)
    probe_backend, fallback = chosen, chosen.unavailable(_device(sg.gm))
    if fallback:
        probe_backend = get_backend("torch")
    if verify_tokens is not None and (isinstance(verify_tokens, bool) or not isinstance(verify_tokens, int)
                                      or not PROBE_LEN <= verify_tokens <= 1 << 16):
        raise ValueError(f"verify_tokens must be an int in [{PROBE_LEN}, 65536] (the probe's prompt length cap); got {verify_tokens!r}")
    verifier = Verifier(make_probe(sg, probe_length(recipe, verify_tokens)), probe_backend) if verify else None

    def lower_fn(gm):
        return lower(gm, probe_backend)

    from .heads.profiler import profile as profile_heads  # duo(retrieval="auto") profiles the source model

    sg, parsed, verification = pipeline.run_recipe(sg, recipe, model=model, tokenizer=tokenizer,
                                                   verify_fn=verifier, lower_fn=lower_fn, extra={"profile_heads": profile_heads})
    if not verify:
        return sg, parsed, verification
    probe = verifier.probe
    verification = {"backend": probe_backend.name, **verification,
                    "probe": {"batch": PROBE_BATCH, "prompt_tokens": probe.prefill, "decode_steps": probe.decode, "left_padding": PROBE_PAD,
                              "uncrossed": {k: v for k, v in budget_reach(parsed).items() if v > probe.prefill - PROBE_PAD}},
                    "lowering": check_lowering(sg, probe, probe_backend, verifier.before)}
    if fallback:
        verification["fallback"] = f"verified on backend 'torch', not {chosen.name!r}: {fallback}"
    return sg, parsed, verification


def check_lowering(sg, probe, backend: Backend, logits=None) -> dict:
    """Lowering is an exact rewrite: ``backend``'s probe logits of the final graph vs the reference backend's.

    Every kernel the final graph calls is checked this way at compile time (a pass-by-pass check
    on one backend cannot see a kernel that is wrong the same way before and after). Raises
    ``GraphwrightError`` past the exact tolerance in fp32/fp64; in fp16/bf16 kernels legitimately
    round differently from the reference, so the deviation is recorded, not enforced.
    """
    if backend.name == "reference":
        return {"reference": "reference", "max_abs_logit_diff": 0.0, "kl": 0.0}
    got = logits if logits is not None else probe_logits(sg, probe, backend)
    record = compare(probe_logits(sg, probe, "reference"), got, probe)
    if sg.info.dtype in EXACT_TOL:
        check_exact(f"lowering to backend {backend.name!r} (vs the reference backend)", record["max_abs_logit_diff"],
                    sg.info.dtype, KERNEL_TOL[sg.info.dtype])
    return {"reference": "reference", **record}


class Verifier:
    """``verify_fn`` for ``pipeline.run_recipe``: probe logits before/after each pass on one backend."""

    def __init__(self, probe: Probe, backend: str | Backend = "torch"):
        self.probe, self.backend = probe, get_backend(backend)
        self.before = None  # logits of the last verified graph (the first call computes the input's)

    def __call__(self, p, old_sg, new_sg, exact: bool) -> dict:
        if self.before is None:
            self.before = probe_logits(old_sg, self.probe, self.backend)
        after, kept = run_probe(new_sg, self.probe, self.backend)
        record = {**compare(self.before, after, self.probe), "kv_kept": kept}
        if exact:
            check_exact(f"pass {p.name}", record["max_abs_logit_diff"], old_sg.info.dtype)
        self.before = after
        return record


def check_exact(what: str, diff: float, dtype, tol: float | None = None) -> None:
    """Raise ``GraphwrightError`` when an exact rewrite (``what``) moved the probe logits past the dtype's tolerance."""
    tol = EXACT_TOL.get(dtype, LOW_PRECISION_TOL) if tol is None else tol
    if not diff <= tol:  # `not <=` so that NaN fails too
        raise GraphwrightError(f"{what} is exact but changed the probe logits by {diff:.3g} "
                               f"(tolerance {tol:g} for {str(dtype).replace('torch.', '')})")


def make_probe(sg, prefill: int = PROBE_LEN, decode: int = PROBE_DECODE) -> Probe:
    """Seeded ``Probe`` [2, prefill + decode]; row 1 left-padded by 3; ids in [3, vocab)."""
    vocab = sg.info.vocab_size
    g = torch.Generator().manual_seed(PROBE_SEED)
    ids = torch.randint(min(3, vocab - 1), vocab, (PROBE_BATCH, prefill + decode), generator=g)
    mask = torch.ones(PROBE_BATCH, prefill + decode, dtype=torch.long)
    mask[1, :PROBE_PAD] = 0
    pad = sg.info.pad_token_id if sg.info.pad_token_id is not None else 0
    return Probe(ids.masked_fill(mask == 0, pad), mask, prefill)


def _device(gm) -> torch.device:
    for t in gm.parameters():
        return t.device
    for t in gm.buffers():
        return t.device
    return torch.device("cpu")


def probe_logits(sg, probe: Probe, backend: str | Backend = "torch") -> torch.Tensor:
    """fp32 logits [B, T, V] of ``sg`` on the probe (prefill, then decode steps), run through ``backend``."""
    return run_probe(sg, probe, backend)[0]


@torch.inference_mode()
def run_probe(sg, probe: Probe, backend: str | Backend = "torch") -> tuple[torch.Tensor, float | None]:
    """``(fp32 logits [B, T, V], kv_kept)``: the probe streamed through the graph ``backend`` runs
    (``runtime_graph``, lowered) with the runtime's state threading; ``kv_kept`` = real tokens the final
    cache holds / tokens fed, over layers and KV heads (None when the state has no positions to count)."""
    backend = get_backend(backend)
    device = _device(sg.gm)
    ids, mask = probe.ids.to(device), probe.mask.to(device)
    rg = backend.runtime_graph(sg)
    lowered = lower(rg.gm, backend)

    def step(input_ids, positions, logits_index, state):
        out = lowered(input_ids, positions, logits_index, *state)
        return out[0], list(out[1:])

    logits, state = stream_logits(step, rg.state, ids, mask, probe.prefill,
                                  rerotated_layers=sg.notes.get("rerotate", {}).get("layers"))  # later tokens from n
    info = sg.info
    kept = [k for k in kept_tokens_per_head(state, rg.state, info.num_layers, info.num_kv_heads) if k is not None]
    fed = float(mask.sum()) * info.num_kv_heads * len(kept)
    return logits.float().cpu(), (sum(float(k.sum()) for k in kept) / fed if kept and fed else None)


def compare(before: torch.Tensor, after: torch.Tensor, probe: Probe) -> dict:
    """Max abs logit difference and mean KL(before || after) over real (unpadded) probe tokens, and over the
    decode steps alone (``decode_*``, None without decode steps)."""
    real = probe.mask.bool()
    out = _deviation(before[real], after[real])
    decode = {"max_abs_logit_diff": None, "kl": None}
    if probe.decode:
        decode = _deviation(before[:, probe.prefill:].flatten(0, 1), after[:, probe.prefill:].flatten(0, 1))
    return {**out, "decode_max_abs_logit_diff": decode["max_abs_logit_diff"], "decode_kl": decode["kl"]}


def _deviation(b: torch.Tensor, a: torch.Tensor) -> dict:
    diff = (b - a).abs().max().item()
    lb, la = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
    kl = (lb.exp() * (lb - la)).sum(-1).mean().item()
    return {"max_abs_logit_diff": diff, "kl": max(kl, 0.0) if kl == kl else kl}  # clamp float round-off below 0
