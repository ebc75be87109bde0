"""``graphwright demo``: what the compiler is for, on the built-in real model.

A long prompt (``--context-tokens`` of the shipped novel, then a question about it): the original
model (HF ``generate``), the compiled one and its ONNX Runtime artifact side by side: the answer,
prefill seconds, decode tokens/s, KV bytes held. Then a short prompt with the same recipe, where
the table says honestly that KV compression does not pay (the cache is tiny beside the weights).
``--steer`` adds the PASTA steering example. ``demo.json`` keeps every number.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from .common import add_model_args, add_recipe_arg, compile_model, console, encode, int_arg, load, out_dir, write_json

# The richest composed recipe (the ONNX tests and bench_onnx use it): lowrank_kv at 0.8 (+8%
# perplexity; 0.6 starts repeating itself in a story) and H2O on top: about 48% of the dense KV.
DEMO_RECIPE = "lowrank_kv(keep=0.8) + h2o(heavy=0.25, recent=0.25)"
DEMO_RECIPE_MOE = "fuse_moe + " + DEMO_RECIPE
DEMO_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


# The long-context part (the demo's headline): a few thousand tokens of the shipped novel and a
# question about them. Question-aware SnapKV (the observation window is the question) keeps a quarter
# of the prompt's cache per head and answers like the dense model.
LONG_RECIPE = "snapkv(budget={budget})"
LONG_QUESTION = "What was the name of Catherine Morland's father?"
LONG_ANSWER = "Richard"  # chapter 1: "his name was Richard"


def add_parser(sub):
    p = sub.add_parser("demo", help="load SmolLM2-135M, compile it, compare it with the original on a long and a short prompt",
                       description="A long prompt (a few thousand tokens of the shipped novel and a question about it): "
                                   "the original model vs the compiled one (answer, prefill, decode tokens/s, KV bytes), "
                                   "the ONNX artifact beside them; then a short prompt, where KV compression does not pay.")
    add_model_args(p)
    add_recipe_arg(p, default=None)
    p.add_argument("--context-tokens", type=int_arg(16, 10_000_000), default=3000,
                   help="tokens of the novel before the question (default: %(default)s)")
    p.add_argument("--question", default=LONG_QUESTION)
    p.add_argument("--prompt", default=DEMO_PROMPT, help="the short prompt")
    p.add_argument("--max-new-tokens", type=int_arg(1, 1_000_000), default=32)
    p.add_argument("--out", type=out_dir, default="out/demo", help="folder for demo.json (and the ONNX artifact in <out>/onnx)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the ONNX artifact (export takes about a minute)")
    p.add_argument("--reexport", action="store_true",
                   help="export the ONNX artifact even when <out>/onnx holds one from the same weights, recipe and code")
    p.add_argument("--steer", action="store_true", help="also run the PASTA steering example (smollm2-135m only)")


def _hf_generate(model, ids, n):
    """The original model with Hugging Face's own generate and cache: tokens, prefill s, decode tok/s, KV bytes."""
    import torch
    from transformers import LogitsProcessorList

    from ..bench.timing import cache_bytes, step_timer

    timer = step_timer()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                             logits_processor=LogitsProcessorList([timer]))
    end = time.perf_counter()
    steps = len(timer.stamps) - 1
    return out.sequences, {"prefill_s": timer.stamps[0] - t0,
                           "decode_tokens_per_s": steps / (end - timer.stamps[0]) if steps else 0.0,
                           "kv_bytes": cache_bytes(out.past_key_values)}


def demo_recipe(model) -> str:
    """The demo recipe for this model: MoE models also get their dispatch fused."""
    cfg = getattr(model, "config", None)
    is_moe = any(getattr(cfg, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts"))
    return DEMO_RECIPE_MOE if is_moe else DEMO_RECIPE


def long_recipe(model, context_tokens: int) -> str:
    recipe = LONG_RECIPE.format(budget=max(16, context_tokens // 4))
    return "fuse_moe + " + recipe if demo_recipe(model) == DEMO_RECIPE_MOE else recipe


def long_prompt(tok, context_tokens: int, question: str):
    """Chat-formatted ids: the first ``context_tokens`` tokens of the shipped novel, then the question."""
    text = (Path(__file__).parents[1] / "data" / "northangerabbey.txt").read_text(encoding="utf-8")
    context = tok.decode(tok(text[: 8 * context_tokens]).input_ids[:context_tokens])
    return encode(tok, f"{context}\n\nAnswer the question about the text above in a few words.\nQuestion: {question}")


def _side(name, tok, ids, out, stats) -> dict:
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return {"side": name, "text": text, "prefill_s": stats["prefill_s"],
            "decode_tokens_per_s": stats["decode_tokens_per_s"], "kv_bytes": stats["kv_bytes"], "tokens": out[0].tolist()}


def _compare(title, tok, ids, rows, note=None) -> None:
    hf = rows[0]
    table = Table(title=title, caption=note, expand=True)
    table.add_column("", no_wrap=True)
    table.add_column("answer", overflow="fold", ratio=1, min_width=24)
    for col in ("prefill s", "decode tok/s", "decode / HF", "KV MiB", "KV / HF", "= HF"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(r["side"], " ".join(r["text"].split()), f"{r['prefill_s']:.2f}", f"{r['decode_tokens_per_s']:.1f}",
                      f"{r['decode_tokens_per_s'] / hf['decode_tokens_per_s']:.2f}", f"{r['kv_bytes'] / 2**20:.1f}",
                      f"{r['kv_bytes'] / hf['kv_bytes']:.2f}", "yes" if r["tokens"] == hf["tokens"] else "no")
    console.print(table)


def run(args):
    model, tok = load(args)
    recipe = args.recipe if args.recipe is not None else long_recipe(model, args.context_tokens)
    console.print(f"recipe: [bold]{recipe}[/]")
    cm = compile_model(model, tok, recipe, args.backend)
    console.print(cm.report())
    result = {"model": args.model, "recipe": str(cm.recipe or "identity"), "backend": args.backend}

    ids = long_prompt(tok, args.context_tokens, args.question)
    with console.status(f"long prompt ({ids.shape[1]} tokens): original model ..."):
        out, hf = _hf_generate(model, ids, args.max_new_tokens)
    rows = [_side("HF (before)", tok, ids, out, hf)]
    with console.status("long prompt: compiled model ..."):
        out = cm.generate(ids, max_new_tokens=args.max_new_tokens)
    rows.append(_side(f"gw {args.backend}", tok, ids, out, cm.last_stats))
    if args.onnx:
        rows.append(_onnx_side(cm, model, tok, ids, args, result))
    for r in rows:
        r["correct"] = LONG_ANSWER.lower() in r["text"].lower() if args.question == LONG_QUESTION else None
    _compare(f"long prompt: {ids.shape[1]} tokens of Northanger Abbey + \"{args.question}\"", tok, ids, rows)
    result["long"] = {"prompt_tokens": ids.shape[1], "question": args.question, "sides": rows}

    ids = encode(tok, args.prompt)
    out, hf = _hf_generate(model, ids, args.max_new_tokens)
    short = [_side("HF (before)", tok, ids, out, hf)]
    out = cm.generate(ids, max_new_tokens=args.max_new_tokens)
    short.append(_side(f"gw {args.backend}", tok, ids, out, cm.last_stats))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    note = (f"At {ids.shape[1]} prompt tokens the whole dense cache is {hf['kv_bytes'] / 2**20:.1f} MiB beside "
            f"{weights / 2**20:.0f} MiB of weights read at every step: KV compression cannot make this faster "
            "(and the recipe may keep everything: its budget is larger than the prompt).")
    _compare(f"short prompt: {ids.shape[1]} tokens", tok, ids, short, note)
    result["short"] = {"prompt_tokens": ids.shape[1], "prompt": args.prompt, "sides": short, "note": note}
    result["report"] = cm.report().to_dict()
    path = write_json(result, f"{args.out}/demo.json")
    console.print(f"[dim]written {path}[/]")
    if args.steer and args.model == "smollm2-135m":
        _steering(model, tok, args.out)


def _onnx_side(cm, model, tok, ids, args, result) -> dict:
    """Export the compiled model (verified in ONNX Runtime), load the artifact and run the long prompt on it.

    An artifact a previous run exported from the same weights, recipe and code is reused
    (``demo_cache.py``) unless ``--reexport``."""
    import graphwright as gw

    from .demo_cache import artifact_key, cached, forget, remember

    out_dir = f"{args.out}/onnx"
    key = artifact_key(model, result["recipe"])
    runner = None if args.reexport else cached(out_dir, key)
    if runner is not None:
        result["onnx"] = {"path": out_dir, "export_s": None, "reused": True}
        console.print(f"ONNX artifact: [bold]{out_dir}[/] (reused: exported by an earlier run from the same weights, "
                      "recipe and graphwright code; --reexport exports it again)")
    else:
        forget(out_dir)
        t0 = time.perf_counter()
        with console.status(f"exporting ONNX to {out_dir} ..."):
            path = gw.export_onnx(cm, out_dir)  # replaces a previous export; refuses a foreign non-empty folder
        remember(out_dir, key)
        result["onnx"] = {"path": str(path), "export_s": time.perf_counter() - t0, "reused": False}
        console.print(f"ONNX artifact: [bold]{path}[/] ({result['onnx']['export_s']:.0f} s; run it with "
                      f"graphwright.load({str(path)!r}).generate(...))")
        runner = gw.load(path, verify_hashes=False)  # export_onnx just wrote and hashed these files
    out = runner.generate(ids, max_new_tokens=args.max_new_tokens)
    return _side("gw ONNX Runtime", tok, ids, out, runner.last_stats)


def _steering(model, tok, out: str) -> None:
    """PASTA on a held-out JSON-formatting example: the buried instruction emphasized in the heads
    profiled for that task (the head set ships with graphwright; ``graphwright steer profile`` makes one)."""
    import json

    import graphwright as gw

    from ..steer.headsets import headset_path
    from ..steer.tasks import Task, make_splits

    heads = headset_path("smollm2-135m", "pronoun")
    alpha = json.loads(heads.read_text()).get("settings", {}).get("alpha", 0.01)  # the alpha it was profiled at
    _, test = make_splits("pronoun", 1, 4, seed=0)
    task = Task(test.name, test.examples[:1], test.scorer, test.metric)  # one held-out example
    ex = task.examples[0]
    recipe = f"steer(alpha={alpha}, heads='{heads}')"
    with console.status("steering example (PASTA) ..."):
        cm = gw.compile(model, recipe=recipe, tokenizer=tok)
        plain = cm.generate_text(ex.prompt, max_new_tokens=48)
        steered = cm.generate_text(ex.prompt, emphasis=list(ex.emphasis), max_new_tokens=48)
    table = Table(title=f"PASTA steering on smollm2-135m  (recipe: steer(alpha={alpha}, heads=<pronoun task head set>))")
    table.add_column("")
    table.add_column("text", overflow="fold")
    table.add_row("prompt", ex.prompt)
    table.add_row("emphasized", " / ".join(ex.emphasis))
    for name, text in (("unsteered", plain), ("steered", steered)):
        score = task.evaluate([text])
        table.add_row(f"{name} ({', '.join(f'{k}={v:.0f}' for k, v in score.items())})", text)
    console.print(table)
    write_json({"recipe": recipe, "prompt": ex.prompt, "emphasis": list(ex.emphasis), "unsteered": plain,
                "steered": steered}, f"{out}/steering.json")
