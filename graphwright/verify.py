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
"""

from __future__ import annotations

import torch

from .codegen.backends import Backend, get_backend
from .codegen.lower import lower
from .errors import GraphwrightError
from .passes import pipeline
from .runtime import positions_from_mask

PROBE_BATCH, PROBE_LEN, PROBE_PAD, PROBE_SEED = 2, 16, 3, 0
EXACT_TOL = {torch.float32: 1e-4, torch.float64: 1e-4}  # any other dtype (fp16, bf16): LOW_PRECISION_TOL
LOW_PRECISION_TOL = 1e-2


def run_recipe(sg, recipe, model=None, tokenizer=None, verify: bool = True, backend: str | Backend = "torch"):
    """Apply ``recipe`` to ``sg``, verifying each pass on ``backend``; returns ``(new_sg, Recipe, verification)``.

    ``verification`` is plain data: ``{"backend": name, "passes": [{"name", "exact", "max_abs_logit_diff",
    "kl"}, ...], "lowering": {"reference", "max_abs_logit_diff", "kl"}}`` plus ``"fallback"`` (the reason)
    when the probe ran on torch instead of ``backend``; with ``verify=False`` only ``{"passes": [...]}``,
    diff and KL None. Raises ``RecipeError`` for a bad recipe or a pass that does not apply,
    ``GraphwrightError`` for an exact pass, or a backend's lowering, that changed the logits.
    """
    chosen = get_backend(backend)
    probe_backend, fallback = chosen, chosen.unavailable(_device(sg.gm))
    if fallback:
        probe_backend = get_backend("torch")
    verifier = Verifier(make_probe(sg), probe_backend) if verify else None

    def lower_fn(gm):
        return lower(gm, probe_backend)

    sg, parsed, verification = pipeline.run_recipe(sg, recipe, model=model, tokenizer=tokenizer,
                                                   verify_fn=verifier, lower_fn=lower_fn)
    if not verify:
        return sg, parsed, verification
    verification = {"backend": probe_backend.name, **verification,
                    "lowering": check_lowering(sg, verifier.probe, probe_backend, verifier.before)}
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
    record = compare(probe_logits(sg, probe, "reference"), got, probe[1])
    if sg.info.dtype in EXACT_TOL:
        check_exact(f"lowering to backend {backend.name!r} (vs the reference backend)", record["max_abs_logit_diff"],
                    sg.info.dtype)
    return {"reference": "reference", **record}


class Verifier:
    """``verify_fn`` for ``pipeline.run_recipe``: probe logits before/after each pass on one backend."""

    def __init__(self, probe, backend: str | Backend = "torch"):
        self.probe, self.backend = probe, get_backend(backend)
        self.before = None  # logits of the last verified graph (the first call computes the input's)

    def __call__(self, p, old_sg, new_sg, exact: bool) -> dict:
        if self.before is None:
            self.before = probe_logits(old_sg, self.probe, self.backend)
        after = probe_logits(new_sg, self.probe, self.backend)
        record = compare(self.before, after, self.probe[1])
        if exact:
            check_exact(f"pass {p.name}", record["max_abs_logit_diff"], old_sg.info.dtype)
        self.before = after
        return record


def check_exact(what: str, diff: float, dtype) -> None:
    """Raise ``GraphwrightError`` when an exact rewrite (``what``) moved the probe logits past the dtype's tolerance."""
    tol = EXACT_TOL.get(dtype, LOW_PRECISION_TOL)
    if not diff <= tol:  # `not <=` so that NaN fails too
        raise GraphwrightError(f"{what} is exact but changed the probe logits by {diff:.3g} "
                               f"(tolerance {tol:g} for {str(dtype).replace('torch.', '')})")


def make_probe(sg):
    """Seeded ``(input_ids, attention_mask)`` [2, 16]; row 1 left-padded by 3; ids in [3, vocab)."""
    vocab = sg.info.vocab_size
    g = torch.Generator().manual_seed(PROBE_SEED)
    ids = torch.randint(min(3, vocab - 1), vocab, (PROBE_BATCH, PROBE_LEN), generator=g)
    mask = torch.ones(PROBE_BATCH, PROBE_LEN, dtype=torch.long)
    mask[1, :PROBE_PAD] = 0
    pad = sg.info.pad_token_id if sg.info.pad_token_id is not None else 0
    return ids.masked_fill(mask == 0, pad), mask


def _device(gm) -> torch.device:
    for t in gm.parameters():
        return t.device
    for t in gm.buffers():
        return t.device
    return torch.device("cpu")


@torch.inference_mode()
def probe_logits(sg, probe, backend: str | Backend = "torch") -> torch.Tensor:
    """fp32 logits [B, T, V] of ``sg`` on the probe, run through ``backend``."""
    ids, mask = probe
    device = _device(sg.gm)
    ids, mask = ids.to(device), mask.to(device)
    lowered = lower(sg.gm, backend)
    out = lowered(ids, positions_from_mask(mask), torch.arange(ids.shape[1], device=device), *sg.init_state(ids.shape[0], device))
    return out[0].float().cpu()


def compare(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> dict:
    """Max abs logit difference and mean KL(before || after) over real (unpadded) tokens."""
    real = mask.bool()
    b, a = before[real], after[real]
    diff = (b - a).abs().max().item()
    lb, la = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
    kl = (lb.exp() * (lb - la)).sum(-1).mean().item()
    return {"max_abs_logit_diff": diff, "kl": max(kl, 0.0) if kl == kl else kl}  # clamp float round-off below 0
