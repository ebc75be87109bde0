"""Shared fixtures: tiny models are built once per session; the real model loads from the cache."""

from __future__ import annotations

import functools

import pytest
import torch

import graphwright as gw


@functools.lru_cache(maxsize=None)
def _tiny(name):
    # built outside inference mode even when the first caller runs under it (a test decorated with
    # torch.inference_mode): inference-tensor weights would make every later export of the shared model fail
    with torch.inference_mode(False):
        model, _ = gw.load_model(name)
    return model


@functools.lru_cache(maxsize=None)
def _compiled(name):
    with torch.inference_mode(False):  # as _tiny: the shared compiled model holds no inference tensors
        return gw.compile(_tiny(name))


@pytest.fixture
def tiny():
    """tiny("tiny-llama") -> the seeded HF model (shared; do not modify)."""
    return _tiny


@pytest.fixture
def compiled_tiny():
    """compiled_tiny("tiny-llama") -> identity CompiledModel of the shared tiny model."""
    return _compiled


def left_padded_batch(vocab: int, lengths, seed: int = 0, pad_id: int = 0):
    """A left-padded batch of random prompts with the given real lengths; ids avoid 0..2."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    return ids.masked_fill(mask == 0, pad_id), mask


def hf_positions(mask):
    return (mask.cumsum(1) - 1).clamp(min=0)
