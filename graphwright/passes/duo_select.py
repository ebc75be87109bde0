"""Which KV heads ``duo`` keeps in full: the recipe's ``retrieval=`` value -> a set of (layer, kv_head).

``retrieval`` is one of:

* ``None`` (default): the head set shipped for the model (``graphwright.heads.shipped_headset``),
  its default selection; a model without one gets a ``RecipeError`` saying how to make one;
* a path to a head-set file (``HeadSet.save`` / ``graphwright heads profile``): its default selection;
* a fraction in [0, 1]: the top ``round(fraction * L * Hk)`` heads by the shipped head set's scores
  (``HeadSet.select``); 0 = every head streaming, 1 = every head retrieval;
* a list of ``[layer, kv_head]`` pairs (an empty list: every head streaming);
* ``"auto"``: profile the source model now with ``graphwright.heads.profile`` (handed down by
  ``compile`` as ``ctx.extra["profile_heads"]``): the retrieval score on needle prompts when the model
  has a tokenizer, else DuoAttention gates on token-id passkeys; minutes on CPU for a 135M model.

The model's name (for the shipped file) is recognised from its shape (``KNOWN_MODELS``): a
different checkpoint of the same shape would pick up the same head set, so pass a file for one.
"""

from __future__ import annotations

from ..errors import RecipeError

# name -> (architecture, layers, query heads, KV heads, hidden size, vocab size) of the built-in real models
KNOWN_MODELS = {"smollm2-135m": ("LlamaForCausalLM", 30, 9, 3, 576, 49152)}
HOW_TO_MAKE = ("make one with `graphwright heads profile --model <model> --out heads.json` (or HeadSet(...).save) and pass "
               "retrieval='heads.json', or list the heads: retrieval=[[layer, kv_head], ...]")


def model_name(info) -> str | None:
    """The built-in name of the captured model, recognised by shape; None when it is not one of ``KNOWN_MODELS``."""
    sig = (info.architecture, info.num_layers, info.num_heads, info.num_kv_heads, info.hidden_size, info.vocab_size)
    return next((name for name, known in KNOWN_MODELS.items() if known == sig), None)


def _shipped(info, what: str):
    from ..heads.headset import shipped_headset  # lazy: graphwright.heads also holds the profilers (app layer)

    name = model_name(info)
    hs = shipped_headset(name) if name else None
    if hs is None:
        model = name or f"{info.architecture} ({info.num_layers} layers x {info.num_kv_heads} KV heads)"
        raise RecipeError(f"duo: {what} needs a head set with scores, and none ships for {model}; {HOW_TO_MAKE}")
    return hs, name


def _checked(hs, info, source: str):
    try:
        hs.check_model(info.num_layers, info.num_kv_heads)
    except ValueError as err:
        raise RecipeError(f"duo: retrieval={source}: {err}") from None
    return hs


def _pairs(value, info) -> frozenset:
    out = set()
    for p in value:
        ok = isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
        if not ok:
            raise RecipeError(f"duo: retrieval list entries must be [layer, kv_head] integer pairs; got {p!r}")
        layer, head = p
        if not (0 <= layer < info.num_layers and 0 <= head < info.num_kv_heads):
            raise RecipeError(f"duo: retrieval head {list(p)} is outside the model's {info.num_layers} layers x "
                              f"{info.num_kv_heads} KV heads (layers 0..{info.num_layers - 1}, KV heads 0..{info.num_kv_heads - 1})")
        if (layer, head) in out:
            raise RecipeError(f"duo: retrieval head {list(p)} is listed twice")
        out.add((layer, head))
    return frozenset(out)


def _auto(info, ctx) -> tuple[frozenset, dict]:
    profile = (ctx.extra.get("profile_heads") if ctx is not None else None)
    if profile is None or ctx.model is None:
        raise RecipeError("duo: retrieval='auto' profiles the source model's heads now, which needs graphwright.compile "
                          "(with the model) to run it; pass a head-set file, a fraction of the shipped head set, or a list "
                          "of [layer, kv_head] pairs")
    method = "retrieval" if ctx.tokenizer is not None else "duo"
    hs = _checked(profile(ctx.model, method=method, tokenizer=ctx.tokenizer, progress=False), info, "'auto'")
    return hs.retrieval, {"source": f"profiled at compile time ({method})", "method": hs.method, "measured": hs.measured}


def resolve_retrieval(value, info, ctx=None) -> tuple[frozenset, dict]:
    """(retrieval (layer, kv_head) pairs, a plain-data note of where they came from); RecipeError naming what is wrong."""
    if value is None:
        hs, name = _shipped(info, "the default retrieval (the shipped head set)")
        return _checked(hs, info, "default").retrieval, {"source": f"shipped head set for {name}", "method": hs.method}
    if isinstance(value, str):
        if value == "auto":
            return _auto(info, ctx)
        from ..heads.headset import load_headset

        try:
            hs = load_headset(value)
        except (FileNotFoundError, ValueError) as err:
            raise RecipeError(f"duo: retrieval={value!r}: {err} (retrieval is a head-set file, a fraction 0..1, "
                              "'auto' or a list of [layer, kv_head] pairs)") from None
        return _checked(hs, info, repr(value)).retrieval, {"source": str(value), "method": hs.method}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0.0 <= value <= 1.0:
            raise RecipeError(f"duo: retrieval fraction must be in [0, 1]; got {value!r}")
        hs, name = _shipped(info, f"retrieval={value!r} (a fraction of heads by score)")
        return _checked(hs, info, repr(value)).select(float(value)), {"source": f"top {value!r} of the shipped head set for {name}",
                                                                       "method": hs.method}
    if isinstance(value, (list, tuple)):
        return _pairs(value, info), {"source": "listed"}
    raise RecipeError(f"duo: retrieval must be a head-set file path, a fraction 0..1, 'auto' or a list of [layer, kv_head] "
                      f"pairs; got {value!r} ({type(value).__name__})")
