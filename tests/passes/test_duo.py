"""``duo`` (DuoAttention): exact settings, the masked-dense oracle, real cache bytes, the retrieval argument forms.

Oracle (ALGORITHMS-2.md section 2): a one-shot prefill is dense causal for every head; each decode
row of a streaming head sees keys j with j < sinks or i - j <= window (the window cached tokens
plus itself). It is built from the dense graph for the prefill and the masking-only ``window``
pass (``size = window + 1``, the streaming query heads) for the decode steps, on one state.
"""

from __future__ import annotations

import functools

import pytest
import torch

import graphwright as gw
from graphwright import RecipeError
from graphwright.heads import HeadSet
from graphwright.runtime.score import stream_logits
from tests.conftest import _compiled, _tiny, left_padded_batch

GEN = dict(eos_token_id=[], pad_token_id=0)
ALL = "[[0, 0], [0, 1], [1, 0], [1, 1]]"  # every KV head of the tiny models (2 layers x 2 KV heads)


def _duo(name: str, recipe: str, backend: str = "torch"):
    """Compiled without the probe verification (each test checks against its own oracle)."""
    return gw.compile(_tiny(name), recipe=recipe, backend=backend, verify=False)


def _prompt(lengths=(30, 22), seed=1):
    return left_padded_batch(256, lengths, seed=seed)


def test_all_heads_retrieval_is_identity():
    ids, mask = _prompt()
    dense, cm = _compiled("tiny-llama"), _duo("tiny-llama", f"duo(retrieval={ALL}, sinks=0, window=1)")
    assert [s.name for s in cm.step_graph.state] == [s.name for s in dense.step_graph.state]
    assert torch.equal(cm.logits(ids, attention_mask=mask), dense.logits(ids, attention_mask=mask))
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=12, **GEN),
                       dense.generate(ids, attention_mask=mask, max_new_tokens=12, **GEN))
    assert cm.step_graph.notes["duo"]["counts"] == {"retrieval_heads": 4, "streaming_heads": 0, "layers_split": 0,
                                                    "layers_streaming": 0}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_window_covering_the_length_is_identity(name):
    ids, mask = _prompt()
    dense, cm = _compiled(name), _duo(name, "duo(retrieval=[[0, 0]], sinks=2, window=40)")  # 30 + 12 <= 42
    real = mask.bool()
    assert (cm.logits(ids, attention_mask=mask) - dense.logits(ids, attention_mask=mask))[real].abs().max().item() <= 1e-5
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=12, **GEN),
                       dense.generate(ids, attention_mask=mask, max_new_tokens=12, **GEN))


ORACLE_PROMPT, PREFILL, SINKS, WINDOW = dict(lengths=(80, 73), seed=3), 20, 2, 5


@functools.lru_cache(maxsize=None)
def _oracle():
    """(logits under the duo mask, plain dense logits): dense prefill, then decode steps with the streaming
    query heads (layer 0's KV head 1, all of layer 1) masked by ``window`` (size = WINDOW + 1, SINKS sinks)."""
    model = _tiny("tiny-llama")
    ids, mask = _prompt(**ORACLE_PROMPT)
    dense = gw.compile(model, backend="reference", verify=False)
    heads = "{0: [2, 3], 1: [0, 1, 2, 3]}"
    masked = gw.compile(model, backend="reference", verify=False, recipe=f"window(size={WINDOW + 1}, sinks={SINKS}, heads={heads})")

    def oracle(i, p, idx, state):
        return (dense._step if i.shape[1] > 1 else masked._step)(i, p, idx, state)

    want, _ = stream_logits(oracle, dense.runtime_graph.state, ids, mask, PREFILL)
    plain, _ = stream_logits(dense._step, dense.runtime_graph.state, ids, mask, PREFILL)
    return want, plain


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_equals_dense_attention_under_the_duo_mask(backend):
    """Layer 0 split (KV head 0 retrieval), layer 1 all streaming; 60 teacher-forced decode steps after a 20-token prefill."""
    ids, mask = _prompt(**ORACLE_PROMPT)
    want, plain = _oracle()
    cm = _duo("tiny-llama", f"duo(retrieval=[[0, 0]], sinks={SINKS}, window={WINDOW})", backend)
    got, state = stream_logits(cm._step, cm.runtime_graph.state, ids, mask, PREFILL)
    real = mask.bool()
    assert (got - want)[real].abs().max().item() <= 1e-4
    assert (got - plain)[real].abs().max().item() > 0.1  # the mask really acts on these steps
    shapes = {s.name: tuple(t.shape) for s, t in zip(cm.runtime_graph.state, state)}
    assert shapes["k0"] == (2, 1, 80, 16) and shapes["duo_k0"] == (2, 1, SINKS + WINDOW, 16)
    assert shapes["k1"] == (2, 2, SINKS + WINDOW, 16) and shapes["key_positions1"] == (2, 2, SINKS + WINDOW)


def test_kv_bytes_are_the_two_caches():
    ids, mask = _prompt()
    cm = _duo("tiny-llama", "duo(retrieval=[[0, 0]], sinks=2, window=4)")
    cm.generate(ids, attention_mask=mask, max_new_tokens=10, **GEN)
    B, S, D, kv = 2, 30 + 9, 16, 2 * 4  # 9 decode steps fed back; K and V, fp32
    ret = 1 * S  # layer 0: one retrieval KV head holds every slot
    stream = 1 * (2 + 4) + 2 * (2 + 4)  # layer 0: one streaming head; layer 1: two
    assert cm.last_stats["kv_bytes"] == B * D * kv * (ret + stream)
    assert cm.last_stats["kv_bytes"] < cm.last_stats["kv_bytes_dense"]
    # real tokens per head (retrieval heads first): rows hold 30 + 9 and 22 + 9 tokens
    assert cm.last_stats["kept_tokens_per_head"] == [[[39, 6], [31, 6]], [[6, 6], [6, 6]]]


def test_head_set_file_and_fraction(tmp_path, monkeypatch):
    ids, mask = _prompt()
    scores = ((0.9, 0.1), (0.2, 0.7))
    hs = HeadSet(model="tiny-llama", method="duo", scores=scores, retrieval=frozenset({(0, 0)}))
    path = hs.save(tmp_path / "tiny-llama_duo.json")
    by_file = _duo("tiny-llama", f"duo(retrieval='{path}', sinks=2, window=4)")
    by_list = _duo("tiny-llama", "duo(retrieval=[[0, 0]], sinks=2, window=4)")
    assert torch.equal(by_file.generate(ids, attention_mask=mask, max_new_tokens=8, **GEN),
                       by_list.generate(ids, attention_mask=mask, max_new_tokens=8, **GEN))
    # a fraction ranks the shipped head set's scores: make this one "shipped" for tiny-llama's shape
    import graphwright.heads.headset as headset
    import graphwright.passes.duo_select as duo_select

    info = by_list.step_graph.info
    monkeypatch.setattr(headset, "SHIPPED", tmp_path)
    monkeypatch.setitem(duo_select.KNOWN_MODELS, "tiny-llama", (info.architecture, 2, 4, 2, 64, 256))
    half = _duo("tiny-llama", "duo(retrieval=0.5, sinks=2, window=4)")
    assert half.step_graph.notes["duo"]["per_layer"] == {0: {"retrieval": [0], "streaming": [1]},
                                                         1: {"retrieval": [1], "streaming": [0]}}
    default = _duo("tiny-llama", "duo(sinks=2, window=4)")  # the shipped set's own selection
    assert default.step_graph.notes["duo"]["per_layer"][1] == {"retrieval": [], "streaming": [0, 1]}


@pytest.mark.parametrize("recipe,words", [
    ("duo()", ["none ships", "graphwright heads profile"]),
    ("duo(retrieval=0.5)", ["needs a head set with scores", "none ships"]),
    ("duo(retrieval=[[0, 2]])", ["[0, 2]", "2 layers x 2 KV heads"]),
    ("duo(retrieval=[[0, 0], [0, 0]])", ["listed twice"]),
    ("duo(retrieval=[0, 1])", ["[layer, kv_head] integer pairs"]),
    ("duo(retrieval=1.5)", ["[0, 1]"]),
    ("duo(retrieval='no/such/file.json')", ["not found"]),
])
def test_bad_retrieval_is_a_clear_error(recipe, words):
    with pytest.raises(RecipeError) as err:
        _duo("tiny-llama", recipe)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_head_set_of_another_shape_is_refused(tmp_path):
    hs = HeadSet(model="other", method="duo", scores=((0.5,) * 3,) * 30, retrieval=frozenset())
    path = hs.save(tmp_path / "other.json")
    with pytest.raises(RecipeError, match="30 layers x 3 KV heads"):
        _duo("tiny-llama", f"duo(retrieval='{path}')")


@pytest.mark.parametrize("other", ["fastgen()", "streaming(window=8)"])  # snapkv, h2o, evict, lowrank_kv compose (own tests)
def test_refused_compositions_name_both_passes(other):
    with pytest.raises(RecipeError) as err:
        _duo("tiny-llama", f"duo(retrieval=[[0, 0]]) + {other}")
    msg = str(err.value)
    assert "duo" in msg and other.split("(")[0] in msg, msg


@pytest.mark.slow
def test_smollm2_default_reads_the_shipped_head_set(tmp_path, monkeypatch):
    """``duo(sinks=4, window=8)`` as written on smollm2-135m, with a provisional head set "shipped" in a tmp dir
    (every third KV head retrieval; says nothing about quality); the caches hold exactly the two sizes."""
    import graphwright.heads.headset as headset

    retrieval = frozenset((layer, layer % 3) for layer in range(30))
    HeadSet(model="smollm2-135m", method="duo", scores=tuple((1.0, 0.0, 0.0) for _ in range(30)),
            retrieval=retrieval).save(tmp_path / "smollm2-135m_duo.json")
    monkeypatch.setattr(headset, "SHIPPED", tmp_path)
    cm = gw.compile("smollm2-135m", recipe="duo(sinks=4, window=8)", verify=False)
    assert cm.step_graph.notes["duo"]["settings"]["retrieval"]["source"] == "shipped head set for smollm2-135m"
    ids = torch.randint(100, 40000, (1, 40), generator=torch.Generator().manual_seed(0))
    cm.generate(ids, max_new_tokens=3, eos_token_id=[])
    per_token = 2 * 64 * 4  # K and V, head dim 64, fp32
    assert cm.last_stats["kv_bytes"] == 30 * per_token * (1 * 42 + 2 * 12)  # per layer: 1 retrieval head, 2 streaming


def test_auto_profiles_the_source_model_at_compile_time(monkeypatch, compiled_tiny):
    """retrieval='auto' calls graphwright.heads.profile on the model compile() was given (stubbed here: the
    profilers have their own tests) and keeps its selection; without a source model it is a clear error."""
    from graphwright.heads import HeadSet, profiler
    from graphwright.verify import run_recipe

    calls = []

    def fake_profile(model, method, tokenizer=None, progress=True):
        calls.append(method)
        return HeadSet(model="tiny", method="duo", scores=((0.9, 0.1), (0.2, 0.8)), retrieval=frozenset({(0, 0), (1, 1)}))

    monkeypatch.setattr(profiler, "profile", fake_profile)
    cm = _duo("tiny-llama", "duo(retrieval='auto', sinks=2, window=4)")
    assert calls == ["duo"]  # no tokenizer: DuoAttention gates on token-id passkeys
    assert cm.step_graph.notes["duo"]["per_layer"] == {0: {"retrieval": [0], "streaming": [1]}, 1: {"retrieval": [1], "streaming": [0]}}
    with pytest.raises(RecipeError, match="profiles the source model"):
        run_recipe(compiled_tiny("tiny-llama").step_graph, "duo(retrieval='auto')", verify=False)
