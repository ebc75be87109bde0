"""Shared CLI helpers: model loading with a spinner, JSON output, rich console."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console

console = Console(stderr=False, highlight=False)


def add_model_args(p, default="smollm2-135m"):
    p.add_argument("--model", default=default, help=f"built-in name, HF folder or .gguf file (default: {default})")
    p.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")


def add_recipe_arg(p, default=None):
    from ..codegen.backends import BACKENDS

    p.add_argument("--recipe", default=default,
                   help='recipe string like "lowrank_kv(keep=0.5) + noop", or a .toml file (default: %(default)s)')
    # the live registry: a backend registered before the parser is built is a valid choice
    p.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="kernels for the graph's ops: " + "; ".join(f"{b.name}: {b.doc}" for b in BACKENDS.values()))


def load(args):
    import graphwright as gw

    with console.status(f"loading {args.model} ..."):
        return gw.load_model(args.model, dtype=args.dtype)


def compile_model(model, tok, recipe, backend="torch"):
    import graphwright as gw

    with console.status(f"capturing and compiling (recipe: {recipe or 'identity'}) ..."):
        return gw.compile(model, recipe=recipe, tokenizer=tok, backend=backend)


def encode(tok, prompt: str, chat: bool = True):
    """Token ids for a prompt; instruct models get their chat template."""
    if tok is None:
        raise SystemExit("this model has no tokenizer: give a model with one (e.g. smollm2-135m)")
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tok(text, return_tensors="pt").input_ids
    return tok(prompt, return_tensors="pt").input_ids


def write_json(data, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def print_error(msg) -> None:
    """Print an error unwrapped (paths stay copy-pasteable) and without markup parsing."""
    from rich.text import Text

    console.print(Text.assemble(("error: ", "bold red"), str(msg)), soft_wrap=True)


def fail(msg: str) -> None:
    print_error(msg)
    sys.exit(2)
