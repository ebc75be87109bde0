"""``graphwright generate``: generate from a prompt with a compiled model."""

from __future__ import annotations

from .common import add_model_args, add_recipe_arg, compile_model, console, encode, float_arg, int_arg, load, out_file, write_json


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text from a prompt with a compiled model",
                       description="Compile MODEL with RECIPE and generate from PROMPT (greedy unless --sample).")
    add_model_args(p)
    add_recipe_arg(p)
    p.add_argument("prompt", help="the prompt text")
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


def run(args):
    model, tok = load(args)
    cm = compile_model(model, tok, args.recipe, args.backend)
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
