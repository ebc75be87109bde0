"""Shared CLI helpers: model loading with a spinner, JSON output, rich console."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from rich.console import Console

# Piped output (a log file, CI) gets 120 columns instead of rich's 80, so report tables do not wrap
# mid-word; a terminal or an explicit COLUMNS keeps its own width.
PIPED_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
console = Console(stderr=False, highlight=False, width=PIPED_WIDTH)
err_console = Console(stderr=True, highlight=False, width=PIPED_WIDTH)

MAX_COUNT = 2**31 - 1  # upper bound of count options (tokens, examples, batch): past anything a run can hold


def int_arg(lo: int, hi: int = MAX_COUNT):
    """An argparse type: an integer in [lo, hi]; a bad value is argparse's one-line error naming the option."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}]; got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}]; got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_arg(lo: float, hi: float, lo_open: bool = False):
    """An argparse type: a finite number in [lo, hi] (``(lo, hi]`` with ``lo_open``)."""
    span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {span}; got {text!r}") from None
        if not math.isfinite(value) or value < lo or (lo_open and value == lo) or value > hi:
            raise argparse.ArgumentTypeError(f"must be a number in {span}; got {text}")
        return value

    parse.__name__ = "float"
    return parse


def out_file(text: str) -> str:
    """An argparse type for a file to write: not an existing directory, and no parent that is a file."""
    path = Path(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a file path; got ''")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file path")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{parent} is a file, so {text} cannot be created under it")
    return text


def in_file(text: str) -> str:
    """An argparse type for a file to read: an existing regular file (not a directory, device or FIFO)."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing regular file")
    return text


def out_dir(text: str) -> str:
    """An argparse type for a folder to write into: not an existing file, and no parent that is a file."""
    path = Path(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a folder path; got ''")
    hit = next((p for p in (path, *path.parents) if p.exists()), None)
    if hit is not None and not hit.is_dir():
        raise argparse.ArgumentTypeError(f"{hit} is a file; give a folder path" if hit == path else
                                         f"{hit} is a file, so {text} cannot be created under it")
    return text


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


def encode_split(tok, context: str, question: str, chat: bool = True):
    """(context ids [1, Tc], question ids [1, Tq]) whose concatenation is the prompt "CONTEXT\n\nQUESTION"
    (chat-templated for instruct models): the context part ends where the user's text of the question
    starts, so one context prefix serves every question."""
    if tok is None:
        raise SystemExit("this model has no tokenizer: give a model with one (e.g. smollm2-135m)")
    marker = "\u2063GRAPHWRIGHT_QUESTION\u2063"
    text = f"{context}\n\n{marker}"
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    head, tail = text.split(marker)
    ids_c = tok(head, return_tensors="pt").input_ids
    ids_q = tok(question + tail, return_tensors="pt", add_special_tokens=False).input_ids
    return ids_c, ids_q


def write_json(data, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def print_error(msg) -> None:
    """Print an error unwrapped (paths stay copy-pasteable) and without markup parsing."""
    from rich.text import Text

    err_console.print(Text.assemble(("error: ", "bold red"), str(msg)), soft_wrap=True)


def fail(msg: str) -> None:
    print_error(msg)
    sys.exit(2)
