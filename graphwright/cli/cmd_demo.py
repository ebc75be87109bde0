"""``graphwright demo``: the built-in real model before and after the richest working recipe."""

from __future__ import annotations

import time

from rich.table import Table

from .common import add_model_args, add_recipe_arg, compile_model, console, encode, load, write_json

# The richest recipe that works today on each kind of model; each pass issue adds its pass here.
# lowrank_kv at 0.8 (+8% perplexity; 0.6 starts repeating itself in the story) and H2O, the best
# eviction policy of the README's frontier table, on top: about 48% of the dense KV cache.
DEMO_RECIPE = "lowrank_kv(keep=0.8) + h2o(heavy=0.25, recent=0.25)"
DEMO_RECIPE_MOE = "fuse_moe + " + DEMO_RECIPE
DEMO_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def add_parser(sub):
    p = sub.add_parser("demo", help="load SmolLM2-135M, compile it with the demo recipe, compare before/after",
                       description="Generate from a prompt with the original model and the compiled one; "
                                   "show the report, KV memory and speed side by side.")
    add_model_args(p)
    add_recipe_arg(p, default=None)
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", default="out/demo", help="folder for demo.json (and the ONNX artifact in <out>/onnx)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip writing the ONNX artifact")
    p.add_argument("--no-steer", dest="steer", action="store_false",
                   help="skip the PASTA steering example (smollm2-135m only)")


def _hf_generate(model, ids, n):
    """The original model with Hugging Face's own generate and cache, for the 'before' column."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
    seconds = time.perf_counter() - t0
    cache = out.past_key_values
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return out.sequences, seconds, kv


def demo_recipe(model) -> str:
    """The demo recipe for this model: MoE models also get their dispatch fused."""
    cfg = getattr(model, "config", None)
    is_moe = any(getattr(cfg, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts"))
    return DEMO_RECIPE_MOE if is_moe else DEMO_RECIPE


def run(args):
    model, tok = load(args)
    recipe = args.recipe if args.recipe is not None else demo_recipe(model)
    console.print(f"recipe: [bold]{recipe}[/]")
    cm = compile_model(model, tok, recipe, args.backend)
    console.print(cm.report())
    ids = encode(tok, args.prompt)
    before, hf_s, hf_kv = _hf_generate(model, ids, args.max_new_tokens)
    after = cm.generate(ids, max_new_tokens=args.max_new_tokens)
    stats = cm.last_stats
    our_s = stats["prefill_s"] + stats["decode_s"]
    n_before, n_after = before.shape[1] - ids.shape[1], after.shape[1] - ids.shape[1]
    text_before = tok.decode(before[0, ids.shape[1]:], skip_special_tokens=True)
    text_after = tok.decode(after[0, ids.shape[1]:], skip_special_tokens=True)

    table = Table(title=f"{args.model}: before vs after  (recipe: {cm.recipe or 'identity'})")
    table.add_column("")
    table.add_column("HF model (before)", overflow="fold")
    table.add_column("graphwright (after)", overflow="fold")
    table.add_row("text", text_before, text_after)
    table.add_row("new tokens", str(n_before), str(n_after))
    table.add_row("tokens/s (prefill+decode)", f"{n_before / hf_s:.1f}", f"{n_after / our_s:.1f}")
    table.add_row("KV cache", f"{hf_kv / 2**20:.2f} MiB", f"{stats['kv_bytes'] / 2**20:.2f} MiB ({stats['kv_fraction']:.0%} of dense)")
    table.add_row("same tokens", "", "yes" if before.shape == after.shape and bool((before == after).all()) else "no")
    console.print(table)
    path = write_json({
        "model": args.model, "recipe": str(cm.recipe or "identity"), "prompt": args.prompt,
        "before": {"text": text_before, "new_tokens": n_before, "seconds": hf_s, "kv_bytes": hf_kv},
        "after": {"text": text_after, "new_tokens": n_after, "stats": stats},
        "report": cm.report().to_dict(),
    }, f"{args.out}/demo.json")
    console.print(f"[dim]written {path}[/]")
    if args.steer and args.model == "smollm2-135m":
        _steering(model, tok, args.out)
    if args.onnx:
        _export(cm, f"{args.out}/onnx")


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


def _export(cm, out: str) -> None:
    """Write the compiled model as an ONNX artifact (verified in ONNX Runtime) and say where."""
    import graphwright as gw

    with console.status(f"exporting ONNX to {out} ..."):
        path = gw.export_onnx(cm, out)  # replaces a previous export; refuses a foreign non-empty folder
    console.print(f"ONNX artifact: [bold]{path}[/] (run it with graphwright.load({str(path)!r}).generate(...))")
