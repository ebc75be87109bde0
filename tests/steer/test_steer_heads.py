"""Head selection: every ``heads=`` form, coarse-to-fine profiling against direct per-head runs, user tasks."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import graphwright as gw
from graphwright.errors import RecipeError
from graphwright.steer.heads import auto_head_path, load_head_set, model_key, save_head_set
from graphwright.steer.profile import profile_heads
from graphwright.steer.tasks import make_task
from tests.steer.helpers import toy_tokenizer

MAPPING = {0: [1, 3], 1: [2]}


@dataclass
class UserExample:
    prompt: str
    emphasis: tuple


class VowelTask:
    """A user task as a plain object (no graphwright base class): examples + a scorer + a metric."""

    name = "vowels"
    metric = "vowel_frac"

    def __init__(self, examples):
        self.examples = examples

    @staticmethod
    def scorer(generation: str, example) -> dict:
        letters = [c for c in generation.lower() if c.isalpha()]
        vowels = sum(c in "aeiou" for c in letters)
        return {"vowel_frac": vowels / len(letters) if letters else 0.0, "length": len(generation) / 100}


def user_examples(n: int, seed: int, split: str = "train") -> list:
    """Short prompts from the built-in JSON task, with the instruction's first words emphasized."""
    task = make_task("json", n, seed=seed, split=split)
    return [UserExample(e.prompt, (e.emphasis[0][:40],)) for e in task.examples]


def user_splits(n_train: int, n_test: int, seed: int) -> tuple:
    """The ``module:function`` form of ``graphwright steer --task``."""
    return VowelTask(user_examples(n_train, seed)), VowelTask(user_examples(n_test, seed, "test"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHWRIGHT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _heads(cm) -> dict:
    return {int(k): v["heads"] for k, v in cm.step_graph.notes["steer"]["per_layer"].items()}


def _ids(n=14, seed=5):
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def test_heads_as_mapping_json_list_all_and_auto(tiny, tmp_path, cache):
    m = tiny("tiny-llama")
    ids, span = _ids(), [(3, 8)]
    by_map = gw.compile(m, recipe=f"steer(heads={MAPPING})")
    assert _heads(by_map) == MAPPING
    ref = by_map.logits(ids, emphasis=span)

    path = save_head_set(tmp_path / "heads.json", MAPPING, settings={"note": "test"})
    by_file = gw.compile(m, recipe=f"steer(heads='{path}')")
    assert _heads(by_file) == MAPPING
    assert torch.equal(by_file.logits(ids, emphasis=span), ref)
    bare = tmp_path / "bare.json"  # the PASTA repo's bare {layer: [heads]} form
    bare.write_text(json.dumps({"0": [1, 3], "1": [2]}))
    assert _heads(gw.compile(m, recipe=f"steer(heads='{bare}')")) == MAPPING

    every = gw.compile(m, recipe="steer(heads='all')")
    assert _heads(every) == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    as_list = gw.compile(m, recipe="steer(heads=[0, 1])")  # whole layers
    assert torch.equal(as_list.logits(ids, emphasis=span), every.logits(ids, emphasis=span))
    assert (every.logits(ids, emphasis=span) - ref).abs().max() > 1e-4  # a different head set steers differently

    with pytest.raises(RecipeError, match="heads='auto' needs a profiled head set for this model"):
        gw.compile(m, recipe="steer(heads='auto')")
    key = model_key(by_map.step_graph)
    assert auto_head_path(key).parent == cache / "steer_heads"
    save_head_set(auto_head_path(key), MAPPING)
    auto = gw.compile(m, recipe="steer(heads='auto')")
    assert _heads(auto) == MAPPING and auto.step_graph.notes["steer"]["settings"]["heads_source"] == "auto"
    assert torch.equal(auto.logits(ids, emphasis=span), ref)
    # another model never picks this head set up
    other = gw.compile(tiny("tiny-mistral"))
    assert model_key(other.step_graph) != key


def _direct_scores(m, tok, task, heads, max_new_tokens):
    """Task scores with a model compiled on exactly ``heads`` (no buffer rewriting), one batch."""
    cm = gw.compile(m, recipe=f"steer(heads={heads})", tokenizer=tok)
    prompts = [e.prompt for e in task.examples]
    gens = cm.generate_text(prompts, emphasis=[list(e.emphasis) for e in task.examples], max_new_tokens=max_new_tokens)
    rows = [task.scorer(g, e) for g, e in zip(gens, task.examples)]
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def _ranked(scores: dict, metric: str) -> list:
    return sorted(scores, key=lambda k: (scores[k][metric], sum(scores[k].values()) / len(scores[k])), reverse=True)


def test_profile_coarse_to_fine_matches_direct_per_head_runs(tiny, tmp_path, cache):
    m, tok = tiny("tiny-llama"), toy_tokenizer()
    task = VowelTask(user_examples(3, seed=4))
    n_new = 6
    res = profile_heads(gw.compile(m, tokenizer=tok), task, mode="coarse_to_fine", top_layers=1, top_heads=2,
                        max_new_tokens=n_new, out=tmp_path / "heads.json", progress=False)
    rec = res["scores"]

    layers = {layer: _direct_scores(m, tok, task, [layer], n_new) for layer in range(2)}
    for layer, scores in layers.items():
        assert rec["layers"][layer] == pytest.approx(scores, abs=1e-9)
    best_layer = _ranked(layers, "vowel_frac")[0]
    heads = {f"{best_layer}.{h}": _direct_scores(m, tok, task, {best_layer: [h]}, n_new) for h in range(4)}
    assert set(rec["heads"]) == set(heads)  # fine stage only inside the best layer
    for k, scores in heads.items():
        assert rec["heads"][k] == pytest.approx(scores, abs=1e-9)
    assert len({s["vowel_frac"] for s in heads.values()}) > 1  # the ranking is not decided by ties
    top = sorted(int(k.split(".")[1]) for k in _ranked(heads, "vowel_frac")[:2])
    assert res["heads"] == {best_layer: top}

    assert load_head_set(tmp_path / "heads.json") == {best_layer: top}
    saved = json.loads((tmp_path / "heads.json").read_text())
    assert saved["settings"]["task"] == "vowels" and saved["settings"]["metric"] == "vowel_frac"
    assert rec["final"] == pytest.approx(_direct_scores(m, tok, task, {best_layer: top}, n_new), abs=1e-9)
    # the profile is what heads='auto' finds for this model
    assert load_head_set(auto_head_path(res["settings"]["model_key"])) == {best_layer: top}
    auto = gw.compile(m, recipe="steer(heads='auto')", tokenizer=tok)
    assert _heads(auto) == {best_layer: top}


def test_profile_modes_and_builtin_task_subset(tiny, cache):
    m, tok = tiny("tiny-llama"), toy_tokenizer()
    task = make_task("pronoun", 4, seed=3)
    res = profile_heads(gw.compile(m, tokenizer=tok), task, examples=2, mode="layers", top_layers=1,
                        max_new_tokens=3, progress=False)
    assert res["settings"]["examples"] == 2 and len(task.examples) == 4  # the caller's task is not cut
    assert list(res["heads"].values()) == [[0, 1, 2, 3]] and res["scores"]["heads"] == {}
    assert set(res["scores"]["final"]) == {"pron_occ_acc", "pron_sub_acc", "pron_all_acc"}
    with pytest.raises(ValueError, match="mode must be 'coarse_to_fine', 'layers' or 'heads'"):
        profile_heads(gw.compile(m, tokenizer=tok), task, mode="rows", progress=False)


def test_task_without_evaluate_or_scorer_is_a_clear_error(tiny, cache):
    from graphwright.steer.tasks import evaluate_task

    class NoScorer:
        examples = user_examples(1, seed=0)

    with pytest.raises(ValueError, match="needs an evaluate\\(generations\\) method or a scorer"):
        evaluate_task(NoScorer(), ["x"])
    with pytest.raises(ValueError, match="2 generations for 1 examples"):
        evaluate_task(VowelTask(user_examples(1, seed=0)), ["a", "b"])


def test_coarse_to_fine_keeps_the_whole_layer_when_no_single_head_helps(tiny, cache, monkeypatch):
    """Layer 1 steered as a whole helps, no single head does: the profile returns layer 1, not tied heads."""
    import graphwright.steer.profile as profile

    def fake_run_task(cm, task, heads=None, **kw):
        score = 1.0 if heads == {1: [0, 1, 2, 3]} else 0.0
        return {"vowel_frac": score}, []

    monkeypatch.setattr(profile, "run_task", fake_run_task)
    m, tok = tiny("tiny-llama"), toy_tokenizer()
    res = profile_heads(gw.compile(m, tokenizer=tok), VowelTask(user_examples(2, seed=1)), mode="coarse_to_fine",
                        top_layers=2, top_heads=2, progress=False)
    assert res["heads"] == {1: [0, 1, 2, 3]} and res["scores"]["whole_layer"] == 1
    assert res["scores"]["final"] == {"vowel_frac": 1.0}
