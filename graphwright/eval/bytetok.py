"""A byte-level tokenizer for models that ship none (the built-in tiny models): ids are UTF-8 bytes.

The tiny seeded models have a 256-token vocabulary and no tokenizer, so text tasks (needles,
RULER-style prompts, perplexity over the novel) could not run on them. ``ByteTokenizer`` maps
text to its UTF-8 bytes (ids 0-255, no special tokens, no chat template) with the subset of the
Hugging Face tokenizer interface the evaluation uses: ``__call__`` on a string or a list of
strings (``.input_ids``, ``offset_mapping`` per byte), ``decode`` and ``eos_token_id``.
Invariant (tested): ``decode(tokenizer(s).input_ids) == s`` and every byte's offset span covers
the character it belongs to.
"""

from __future__ import annotations


class _Encoding(dict):
    __getattr__ = dict.__getitem__


class ByteTokenizer:
    """UTF-8 bytes as token ids; ``eos_token_id`` is 0 (the NUL byte, absent from real text)."""

    chat_template = None
    eos_token_id = 0
    pad_token_id = 0
    vocab_size = 256

    def _one(self, text: str, offsets: bool):
        ids, offs = [], []
        for i, ch in enumerate(text):
            b = ch.encode("utf-8")
            ids += list(b)
            offs += [(i, i + 1)] * len(b)
        return ids, offs

    def __call__(self, text, add_special_tokens: bool = False, return_offsets_mapping: bool = False, **kw):
        if kw.get("return_tensors"):
            raise ValueError("ByteTokenizer returns lists; build tensors with torch.tensor(...)")
        if isinstance(text, (list, tuple)):
            got = [self._one(t, return_offsets_mapping) for t in text]
            enc = _Encoding(input_ids=[g[0] for g in got])
            if return_offsets_mapping:
                enc["offset_mapping"] = [g[1] for g in got]
            return enc
        ids, offs = self._one(text, return_offsets_mapping)
        enc = _Encoding(input_ids=ids)
        if return_offsets_mapping:
            enc["offset_mapping"] = offs
        return enc

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i != self.eos_token_id]
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
