"""``graphwright generate``: generate from a prompt with a compiled model."""

from __future__ import annotations

from pathlib import Path

from .common import (
    add_model_args,
    add_recipe_arg,
    compile_model,
    console,
    encode,
    encode_split,
    float_arg,
    in_file,
    int_arg,
    load,
    out_file,
    write_json,
)


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text from a prompt with a compiled model",
                       description="Compile MODEL with RECIPE and generate from PROMPT (greedy unless --sample).")
    add_model_args(p)
    add_recipe_arg(p)
    p.add_argument("prompt", nargs="?", default=None, help="the prompt text (not with --context)")
    p.add_argument("--context", type=in_file, default=None, metavar="FILE",
                   help="a long context to compress once and ask each --question about: a text file, or a .safetensors "
                        "context saved with --save-context (same model and recipe)")
    p.add_argument("--question", action="append", default=None, metavar="TEXT",
                   help="a question about --context (repeat for several; the context is prefilled once)")
    p.add_argument("--save-context", type=out_file, default=None, metavar="FILE",
                   help="write the compressed context of a text --context here (.safetensors), to reuse later")
    p.add_argument("--max-new-tokens", type=int_arg(1, 1_000_000), default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float_arg(0, 1e6, lo_open=True), default=0.7)
    p.add_argument("--top-p", type=float_arg(0, 1, lo_open=True), default=0.9)
    p.add_argument("--seed", type=int_arg(0, 2**64 - 1), default=0)
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--emphasis", nargs="*", default=None, metavar="TEXT",
                   help="PASTA steering (needs a steer recipe): substrings of the prompt to emphasize, or no value to "
                        "emphasize the prompt's **marked** parts")
    p.add_argument("--json", type=out_file, default=None, help="also write the result as JSON here")


def _check_args(args) -> None:
    if args.context is None:
        if args.prompt is None:
            raise ValueError("give a prompt, or --context FILE with --question TEXT")
        if args.question or args.save_context:
            raise ValueError("--question and --save-context need --context FILE")
        return
    if args.prompt is not None:
        raise ValueError("give either a prompt or --context with --question, not both")
    if not args.question and not args.save_context:
        raise ValueError("--context needs at least one --question (or --save-context to only compress it)")
    if args.emphasis is not None:
        raise ValueError("--emphasis cannot be combined with --context")
    if args.save_context and Path(args.context).suffix == ".safetensors":
        raise ValueError("--save-context takes a text --context (this one is already a saved context)")


def _answer_questions(args, cm, tok) -> None:
    from ..runtime.context import Context

    saved = Path(args.context).suffix == ".safetensors"
    ctx, text = (Context.load(args.context), None) if saved else (None, Path(args.context).read_text(encoding="utf-8"))
    results = []
    for q in args.question or [""]:
        ids_c, ids_q = encode_split(tok, text or "", q, chat=not args.no_chat)
        if ctx is None:
            ctx = cm.prefill(ids_c)
            console.print(f"[dim]context: {int(ctx.tokens.sum())} tokens prefilled once, KV {ctx.kv_bytes / 2**20:.2f} MiB "
                          f"({cm.last_stats['kv_fraction']:.0%} of dense)[/]")
            if args.save_context:
                console.print(f"[dim]saved the context to {ctx.save(args.save_context)}[/]")
        if not q:
            break
        out = cm.generate(ids_q, context=ctx, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        answer = tok.decode(out[0, ids_q.shape[1]:], skip_special_tokens=True)
        console.print(f"[bold]Q:[/] {q}\n[bold]A:[/] {answer}")
        results.append({"question": q, "text": answer, "stats": cm.last_stats})
    if args.json:
        write_json({"context": str(args.context), "recipe": str(cm.recipe or "identity"), "answers": results}, args.json)


def run(args):
    _check_args(args)
    model, tok = load(args)
    cm = compile_model(model, tok, args.recipe, args.backend)
    if args.context is not None:
        return _answer_questions(args, cm, tok)
    prompt, spans = args.prompt, None
    if args.emphasis is not None:
        from ..steer.spans import encode_with_emphasis, parse_marked

        prompt, emph = parse_marked(args.prompt) if not args.emphasis else (args.prompt, list(args.emphasis))
        if tok is None:
            raise ValueError(f"--emphasis needs a tokenizer and {args.model} has none")
        ids, _, spans = encode_with_emphasis(tok, prompt, emph, chat=not args.no_chat)
    else:
        ids = encode(tok, prompt, chat=not args.no_chat)
    out = cm.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample, emphasis=spans,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    console.print(text)
    stats = cm.last_stats
    console.print(f"[dim]{stats['new_tokens']} tokens, decode {stats['decode_tokens_per_s']:.1f} tok/s, "
                  f"KV {stats['kv_bytes'] / 2**20:.2f} MiB ({stats['kv_fraction']:.0%} of dense)[/]")
    if args.json:
        write_json({"prompt": prompt, "emphasis": spans, "recipe": str(cm.recipe or "identity"), "text": text, "stats": stats}, args.json)
