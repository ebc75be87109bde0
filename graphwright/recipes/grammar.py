r"""The recipe string form: a hand-written tokenizer and recursive-descent parser.

Recipes arrive from command lines, config files and notebooks, so the parser treats its
input as untrusted text: it never calls ``eval`` or ``ast.literal_eval``, it bounds the
input's length and nesting, and every failure is a ``RecipeError`` that says at which
character offset what was expected.

Grammar (whitespace between tokens is ignored)::

    recipe  := <empty> | pass ("+" pass)*
    pass    := NAME [ "(" [ kwarg ("," kwarg)* [","] ] ")" ]
    kwarg   := NAME "=" value
    value   := NUMBER | "true" | "false" | STRING | NAME | list | dict
    list    := "[" [ value ("," value)* [","] ] "]"
    dict    := "{" [ key ":" value ("," key ":" value)* [","] ] "}"
    key     := INT | STRING | NAME

    NAME    := [A-Za-z_][A-Za-z0-9_]*          (ASCII only; a bare NAME value is a string;
                                                True/False are accepted as booleans too;
                                                nan/inf/infinity, any case, are refused)
    NUMBER  := -?(D+ ["." D*] | "." D+) [(e|E) [+-] D+]   (an INT has no "." and no exponent)
    STRING  := '...' or "..." with escapes \\ \' \" \n \t \r \0 \xHH \uHHHH \UHHHHHHHH

The parser returns plain Python data, ``[(name, [(arg, value), ...]), ...]`` with lists and
dicts as ``list``/``dict``; ``recipe.py`` turns that into a ``Recipe`` value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import RecipeError

MAX_LENGTH = 100_000  # characters in one recipe string; every Recipe's canonical string form is held to it too (recipe.py)
MAX_DEPTH = 16  # nesting of lists/dicts inside one argument value
MAX_INT = 2**63 - 1  # ints beyond int64 are almost surely a typo, and torch cannot hold them

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_WS = " \t\r\n"
_PUNCT = "()[]{},=:+"
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t", "r": "\r", "0": "\0"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_BOOLS = {"true": True, "false": False, "True": True, "False": False}
_NON_FINITE = ("nan", "inf", "infinity")


@dataclass(frozen=True)
class Token:
    kind: str  # "name" | "int" | "float" | "string" | "punct" | "end"
    value: object
    offset: int
    text: str  # the source text, for messages


def show_char(c: str) -> str:
    """A character as it should appear in an error message (control and junk characters as U+XXXX)."""
    if c.isprintable() and c.isascii():
        return repr(c)
    return f"{c!r} (U+{ord(c):04X})" if c.isprintable() else f"U+{ord(c):04X}"


def fail(text: str, offset: int, message: str) -> RecipeError:
    """A RecipeError naming the offset, with a one-line excerpt and a caret under the spot."""
    lo = max(0, offset - 30)
    excerpt = "".join(c if c.isprintable() else "?" for c in text[lo:offset + 30])
    caret = " " * (offset - lo) + "^"
    return RecipeError(f"recipe string: at offset {offset}: {message}\n    {excerpt}\n    {caret}")


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into tokens; raises RecipeError at the first character that starts none."""
    tokens = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _WS:
            i += 1
        elif c in _PUNCT:
            tokens.append(Token("punct", c, i, c))
            i += 1
        elif c in "'\"":
            value, end = _read_string(text, i)
            tokens.append(Token("string", value, i, text[i:end]))
            i = end
        elif c.isascii() and (c.isdigit() or c in "-."):
            tokens.append(_read_number(text, i))
            i += len(tokens[-1].text)
        elif (m := _NAME.match(text, i)) is not None:
            tokens.append(Token("name", m.group(), i, m.group()))
            i = m.end()
        else:
            raise fail(text, i, f"unexpected character {show_char(c)}; expected a pass name, a value or one of ( ) [ ] {{ }} , = : +")
    tokens.append(Token("end", None, n, "end of input"))
    return tokens


def _read_number(text: str, i: int) -> Token:
    m = _NUMBER.match(text, i)
    word = _NAME.match(text, i + 1) if text[i] == "-" else None
    if word is not None and word.group().lower() in _NON_FINITE:
        raise fail(text, i, f"{text[i:word.end()]} is not allowed; numbers must be finite")
    if m is None:
        raise fail(text, i, f"malformed number starting with {show_char(text[i])}; expected digits")
    s = m.group()
    end = m.end()
    if end < len(text) and (text[end].isalnum() or text[end] in "_."):
        raise fail(text, i, f"malformed number {text[i:end + 1]!r}; a number must be followed by a separator")
    if "." in s or "e" in s or "E" in s:
        value = float(s)
        if value in (float("inf"), float("-inf")):
            raise fail(text, i, f"number {s} is too large (it overflows a float)")
        return Token("float", value, i, s)
    digits = s.lstrip("-").lstrip("0")
    if len(digits) > 19 or abs(int(s)) > MAX_INT:  # length check first: int() of 5000 digits is refused by Python
        raise fail(text, i, f"integer {s[:40]}{'...' if len(s) > 40 else ''} is out of range (at most {MAX_INT} in magnitude)")
    return Token("int", int(s), i, s)


def _read_string(text: str, start: int) -> tuple[str, int]:
    quote = text[start]
    out = []
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == quote:
            return "".join(out), i + 1
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = text[i + 1] if i + 1 < len(text) else ""
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e in _HEX_ESCAPES:
            width = _HEX_ESCAPES[e]
            digits = text[i + 2:i + 2 + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise fail(text, i, f"bad escape: \\{e} needs {width} hex digits")
            code = int(digits, 16)
            if code > 0x10FFFF:
                raise fail(text, i, f"bad escape: \\{e}{digits} is beyond the last unicode code point")
            out.append(chr(code))
            i += 2 + width
        else:
            shown = show_char(e) if e else "end of input"
            raise fail(text, i, f"unknown escape \\ followed by {shown}; valid escapes: \\\\ \\' \\\" \\n \\t \\r \\0 \\xHH \\uHHHH \\UHHHHHHHH")
    raise fail(text, start, f"unterminated string: no closing {quote}")


class Parser:
    """Recursive descent over the token list; one method per grammar rule."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0

    # -- token helpers -------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.tokens[self.pos]

    def error(self, expected: str, tok: Token | None = None) -> RecipeError:
        tok = tok or self.tok
        found = "end of input" if tok.kind == "end" else repr(tok.text[:40])
        return fail(self.text, tok.offset, f"expected {expected}; found {found}")

    def at(self, punct: str) -> bool:
        return self.tok.kind == "punct" and self.tok.value == punct

    def expect(self, punct: str, expected: str) -> Token:
        if not self.at(punct):
            raise self.error(expected)
        self.pos += 1
        return self.tokens[self.pos - 1]

    # -- rules ---------------------------------------------------------------------------
    def recipe(self) -> list:
        passes = []
        if self.tok.kind == "end":
            return passes
        passes.append(self.pass_())
        while self.at("+"):
            self.pos += 1
            passes.append(self.pass_())
        if self.tok.kind != "end":
            raise self.error("'+' between passes or end of input")
        return passes

    def pass_(self) -> tuple:
        tok = self.tok
        if tok.kind != "name" or tok.value in _BOOLS:
            raise self.error("a pass name (letters, digits, _)")
        self.pos += 1
        args: list = []
        if not self.at("("):
            return tok.value, args
        self.pos += 1
        seen: dict = {}
        while not self.at(")"):
            name_tok = self.tok
            if name_tok.kind != "name":
                raise self.error(f"an argument name or ')' closing {tok.value}(")
            if name_tok.value in seen:
                raise fail(self.text, name_tok.offset, f"duplicate argument {name_tok.value!r} in pass {tok.value!r}")
            seen[name_tok.value] = True
            self.pos += 1
            self.expect("=", f"'=' after argument name {name_tok.value!r} (arguments are keyword only: name=value)")
            args.append((name_tok.value, self.value(depth=0)))
            if not self.at(","):
                break
            self.pos += 1
        self.expect(")", f"',' or ')' closing {tok.value}(")
        return tok.value, args

    def value(self, depth: int):
        tok = self.tok
        if tok.kind in ("int", "float", "string"):
            self.pos += 1
            return tok.value
        if tok.kind == "name":
            if tok.value.lower() in _NON_FINITE:  # a user writing keep=nan means the number, not the string
                raise fail(self.text, tok.offset, f"{tok.value} is not allowed; numbers must be finite (quote it for the string)")
            self.pos += 1
            return _BOOLS.get(tok.value, tok.value)
        if self.at("["):
            return self.list_(depth)
        if self.at("{"):
            return self.dict_(depth)
        raise self.error("a value (number, true/false, string, name, [list] or {dict})")

    def nest(self, depth: int):
        """Enter a list/dict at ``depth`` enclosing brackets; refuse what would exceed MAX_DEPTH."""
        if depth >= MAX_DEPTH:
            raise fail(self.text, self.tok.offset, f"value nested deeper than {MAX_DEPTH} levels of lists/dicts")
        self.pos += 1

    def list_(self, depth: int) -> list:
        self.nest(depth)
        items = []
        while not self.at("]"):
            items.append(self.value(depth + 1))
            if not self.at(","):
                break
            self.pos += 1
        self.expect("]", "',' or ']' closing a list")
        return items

    def dict_(self, depth: int) -> dict:
        self.nest(depth)
        out: dict = {}
        while not self.at("}"):
            tok = self.tok
            if tok.kind not in ("int", "string", "name") or (tok.kind == "name" and tok.value in _BOOLS):
                raise self.error("a dict key (integer, string or name) or '}'")
            if tok.value in out:
                raise fail(self.text, tok.offset, f"duplicate dict key {tok.value!r}")
            self.pos += 1
            self.expect(":", "':' after a dict key")
            out[tok.value] = self.value(depth + 1)
            if not self.at(","):
                break
            self.pos += 1
        self.expect("}", "',' or '}' closing a dict")
        return out


def parse_string(text: str) -> list:
    """``"a(x=1) + b"`` -> ``[("a", [("x", 1)]), ("b", [])]``; raises RecipeError on bad input."""
    if not isinstance(text, str):
        raise RecipeError(f"recipe string must be str; got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise RecipeError(f"recipe string is {len(text)} characters long; at most {MAX_LENGTH} are accepted")
    return Parser(text).recipe()
