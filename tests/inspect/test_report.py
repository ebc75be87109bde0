"""cm.report(): one row per layer with variant, KV bytes vs dense, MoE and per-pass decisions."""

from __future__ import annotations

import json

import graphwright.inspect as gi
from graphwright.inspect.report import compact


def test_identity_report_one_dense_row_per_layer(compiled_tiny):
    cm = compiled_tiny("tiny-llama")
    report = cm.report()
    assert isinstance(report, gi.Report)
    assert [r["layer"] for r in report.rows] == list(range(cm.info.num_layers))
    dense = 2 * cm.info.num_kv_heads * cm.info.head_dim * 4  # fp32
    for row in report.rows:
        assert row["attention"] == "dense"
        assert row["module"] == f"model.layers.{row['layer']}.self_attn"
        assert row["kv_bytes_per_token"] == row["dense_kv_bytes_per_token"] == dense
        assert row["kv_ratio"] == 1.0
        assert row["moe"] is None
    s = report.summary
    assert s["recipe"] == "identity" and s["kv_ratio"] == 1.0
    assert s["kv_bytes_per_token"] == cm.info.dense_kv_bytes_per_token()
    assert s["node_counts"]["attention"] == cm.info.num_layers
    assert s["node_counts"]["total"] == len(cm.graph.graph.nodes)


def test_to_dict_is_json_and_str_is_a_plain_table(compiled_tiny):
    report = compiled_tiny("tiny-llama").report()
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["columns"][:3] == ["layer", "module", "attention"]
    assert len(data["rows"]) == 2
    text = str(report)
    for header in ("Layer", "Module", "Attention", "KV B/tok", "Dense B/tok", "Ratio", "identity", "LlamaForCausalLM"):
        assert header in text
    assert "\x1b[" not in text  # no colour codes in files
    assert max(len(line) for line in text.splitlines()) <= 120


def test_pass_notes_become_columns_and_override_kv_bytes(compiled_tiny):
    sg = compiled_tiny("tiny-llama").step_graph.copy()
    sg.notes["lowrank_kv"] = {"per_layer": {0: {"r_k": 12, "r_v": 8, "kv_bytes_per_token": 80}}, "counts": {}}
    sg.notes["fastgen"] = {"per_layer": {"1": {"policy": ["special", "local"] * 3}}, "counts": {}}
    report = gi.build_report(sg)
    assert [k for k, _ in report.columns][-2:] == ["lowrank_kv", "fastgen"]
    r0, r1 = report.rows
    assert r0["lowrank_kv"] == "r_k=12 r_v=8" and r1["lowrank_kv"] is None
    assert r0["kv_bytes_per_token"] == 80 and r0["kv_ratio"] == 80 / r0["dense_kv_bytes_per_token"]
    assert r1["fastgen"].startswith("policy=[special,local,")
    assert report.summary["kv_bytes_per_token"] == 80 + r1["kv_bytes_per_token"]
    text = str(report)
    assert "lowrank_kv" in text and "r_k=12 r_v=8" in text


def test_show_key_limits_the_column_not_the_data(compiled_tiny):
    sg = compiled_tiny("tiny-llama").step_graph.copy()
    sg.notes["lowrank_kv"] = {"per_layer": {0: {"r_k": 12, "r_v": 8, "sigma_k_next": 0.25}}, "show": ["r_k"]}
    report = gi.build_report(sg)
    assert report.rows[0]["lowrank_kv"] == "r_k=12"
    assert report.to_dict()["notes"]["lowrank_kv"]["per_layer"]["0"]["sigma_k_next"] == 0.25


def test_variant_tag_shows_in_report(compiled_tiny):
    sg = compiled_tiny("tiny-llama").step_graph.copy()
    attn = [n for n in sg.gm.graph.nodes if (n.meta.get("graphwright") or {}).get("op") == "attention"]
    attn[1].meta["graphwright"] = {**attn[1].meta["graphwright"], "variant": "latent"}
    report = gi.build_report(sg)
    assert [r["attention"] for r in report.rows] == ["dense", "latent"]


def test_moe_rows(compiled_tiny):
    report = compiled_tiny("tiny-mixtral").report()
    assert "moe" in [k for k, _ in report.columns]
    assert [r["moe"] for r in report.rows] == ["loop", "loop"]
    assert report.summary["node_counts"]["moe_experts"] == 2
    assert "MoE" in str(report) and "loop" in str(report)


def test_compact_formats():
    assert compact({"r_k": 96, "r_v": 80}) == "r_k=96 r_v=80"
    assert compact({"a": 0.123456, "on": True}) == "a=0.123 on=true"
    assert compact(list(range(10))) == "[0,1,2,3,…(10)]"
