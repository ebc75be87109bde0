"""Text spans -> token spans, through the tokenizer's offset mapping (and the chat template).

Users emphasize *text* (a substring, or ``(char_start, char_end)``); the steered graph wants
*token* spans of the prompt. A token belongs to a span when its character range overlaps it
(zero-width special tokens never do). This agrees with pastalib's ``find_token_range`` except
at one edge: pastalib compares with ``<=`` on both ends, so a token that merely *ends* where the
span starts (or a zero-width BOS at offset 0) is pulled in too.

With ``chat=True`` the prompt is wrapped in the tokenizer's chat template first; the user's
text appears verbatim inside the templated string, so spans are shifted by where it starts and
then mapped with the offsets of the templated text — the template's own tokens are never
emphasized by accident.
"""

from __future__ import annotations

import torch


def char_spans(text: str, emphasis) -> list:
    """``[(char_start, char_end)]`` for substrings (first occurrence) or explicit char spans."""
    out = []
    for item in emphasis or []:
        if isinstance(item, str):
            start = text.find(item) if item else -1
            if start < 0:
                raise ValueError(f"emphasis substring {item!r} does not occur in the prompt ({len(text)} characters)")
            out.append((start, start + len(item)))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(v, int) for v in item):
            s, e = int(item[0]), int(item[1])
            if not 0 <= s < e <= len(text):
                raise ValueError(f"emphasis span {tuple(item)} is empty or outside the prompt, which has {len(text)} characters")
            out.append((s, e))
        else:
            raise ValueError(f"emphasis items must be substrings or (char_start, char_end) pairs; got {item!r}")
    return out


def token_spans(offsets, spans) -> list:
    """Map char spans to ``(token_start, token_end)`` (end exclusive) with an offset mapping."""
    offsets = [tuple(int(v) for v in o) for o in offsets]
    out = []
    for cs, ce in spans:
        hit = [i for i, (ts, te) in enumerate(offsets) if te > ts and te > cs and ts < ce]
        if not hit:
            raise ValueError(f"emphasis span ({cs}, {ce}) covers no token of the prompt")
        out.append((hit[0], hit[-1] + 1))
    return out


def wrap_chat(tok, prompt: str, chat: bool = True) -> tuple[str, int]:
    """(text to tokenize, character offset of ``prompt`` inside it)."""
    if not chat or not getattr(tok, "chat_template", None):
        return prompt, 0
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    at = text.rfind(prompt)
    if at < 0:
        raise ValueError("the chat template changed the prompt text, so emphasis offsets cannot be mapped; use chat=False")
    return text, at


def encode_one(tok, prompt: str, emphasis=None, chat: bool = True) -> tuple[list, list]:
    """(token ids, token spans) of one prompt."""
    spans = char_spans(prompt, emphasis)
    text, at = wrap_chat(tok, prompt, chat)
    enc = tok(text, return_offsets_mapping=True)
    return list(enc["input_ids"]), token_spans(enc["offset_mapping"], [(s + at, e + at) for s, e in spans])


def encode_with_emphasis(tok, prompt, emphasis=None, chat: bool = True):
    """``(input_ids [B, T] left-padded, attention_mask, token spans per row)`` for a prompt or a list.

    For one prompt ``emphasis`` is a list of substrings / char spans; for a list of prompts, one
    such list per prompt. Token spans index each row's unpadded tokens, as ``cm.generate`` wants.
    """
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
    if isinstance(prompt, (list, tuple)):
        per_row = list(emphasis) if emphasis is not None else [None] * len(prompts)
        if len(per_row) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_row)} emphasis lists")
    else:
        per_row = [emphasis]
    encoded = [encode_one(tok, p, e, chat) for p, e in zip(prompts, per_row)]
    T = max(len(ids) for ids, _ in encoded)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(encoded), T), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for b, (row, _) in enumerate(encoded):
        ids[b, T - len(row):] = torch.tensor(row)
        mask[b, T - len(row):] = 1
    spans = [s for _, s in encoded]
    return ids, mask, (spans if emphasis is not None else None)


MARK = "**"


def parse_marked(text: str) -> tuple[str, list]:
    """``("plain text", [(char_start, char_end)])`` from text with ``**emphasized**`` parts (the CLI form).

    Markers must pair up and enclose something; the returned spans index the text without them.
    """
    parts = text.split(MARK)
    if len(parts) == 1:
        raise ValueError("--emphasis with no substrings wants the prompt to mark emphasized parts as **...**; none found")
    if len(parts) % 2 == 0:
        raise ValueError(f"unbalanced {MARK} markers in the prompt: {len(parts) - 1} found, they must come in pairs")
    plain, spans, at = [], [], 0
    for i, part in enumerate(parts):
        if i % 2 == 1:
            if not part:
                raise ValueError(f"an empty {MARK}{MARK} emphasis at character {at} of the prompt")
            spans.append((at, at + len(part)))
        plain.append(part)
        at += len(part)
    return "".join(plain), spans
