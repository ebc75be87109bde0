"""bench_generate returns its documented measurements (speed itself is never asserted)."""

import json

import pytest
import torch

from graphwright.bench import bench_generate, format_bench
from graphwright.bench.generate import METRICS
from tests.bench.bench_scripts import load_bench


def test_bench_generate_reports_medians_and_ratios(tiny, compiled_tiny):
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    r = bench_generate(tiny("tiny-llama"), compiled_tiny("tiny-llama"), ids, max_new_tokens=5, repeats=2,
                       warmup=1, progress=False)
    assert {"batch", "prompt_tokens", "new_tokens", "repeats", "warmup", "hf", "graphwright", "ratios",
            "same_tokens", "runs"} <= set(r)
    assert r["prompt_tokens"] == 12 and r["new_tokens"] == 5 and len(r["runs"]["hf"]) == 2
    timed = [k for k in METRICS if k != "peak_mem_bytes"]  # a tiny model may not grow the process at all
    for side in ("hf", "graphwright"):
        assert all(r[side][k] > 0 for k in timed), side
        assert r[side]["peak_mem_bytes"] >= 0
    assert all(r["ratios"][k] > 0 for k in timed)
    # identity recipe: same greedy tokens and the same dense cache (12 + 5 - 1 slots)
    assert r["same_tokens"] and r["ratios"]["kv_bytes"] == 1.0
    assert r["graphwright"]["kv_bytes"] == r["graphwright"]["kv_bytes_dense"] == 2 * 2 * 2 * 16 * 4 * 16
    table = format_bench(r)
    assert "decode_tokens_per_s" in table and "graphwright/HF" in table
    json.dumps(r)  # plain data


def test_bench_runtime_script(tmp_path, capsys):
    mod = load_bench("bench_runtime")
    out = tmp_path / "b.json"
    mod.main(["--model", "tiny-llama", "--prompt", "8", "--new", "3", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert "graphwright/HF decode tokens/s = " in capsys.readouterr().out
    assert json.loads(out.read_text())["new_tokens"] == 3


def test_peak_memory_sees_a_transient_allocation():
    from graphwright.bench.memory import PeakMemory

    with PeakMemory() as m:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched so it is resident
        x.add_(1)
        import time

        time.sleep(0.05)  # several poll intervals
        del x
    assert 48 * 2**20 <= m.peak_bytes <= 256 * 2**20, m.peak_bytes
    with PeakMemory() as small:
        pass
    assert small.peak_bytes < 16 * 2**20


def test_machine_load_counts_only_other_processes():
    from graphwright.bench.load import MachineLoad

    with MachineLoad() as load:
        t = torch.randn(256, 256)
        end = __import__("time").process_time() + 0.3
        while __import__("time").process_time() < end:  # our own CPU time must not count as foreign
            t = t @ t.T / 256
    d = load.as_dict()
    assert d["own_cpu_s"] >= 0.25 and d["foreign_cpu_s"] >= 0 and 0 <= d["foreign_share"]
    assert d["busy"] == (d["foreign_share"] > 0.10 or d["load_before"][0] > 0.5)
    with MachineLoad(max_foreign=-1.0) as strict:  # any share is "busy" under a negative threshold
        pass
    assert strict.busy


def test_machine_load_judges_the_start_by_the_foreign_share_before_it_when_given():
    """A block that compiled its sides just before measuring has a high load average of its own; the share of the
    machine other processes used before it (``wait_for_quiet``) is what says whether something else was running."""
    from graphwright.bench.load import MachineLoad, foreign_share, wait_for_quiet

    with MachineLoad(max_load_before=-1.0, foreign_before=0.02) as quiet_start:  # load average "high", share low
        pass
    assert quiet_start.busy == (quiet_start.foreign_share > 0.10) and quiet_start.as_dict()["foreign_before"] == 0.02
    with MachineLoad(max_load_before=100.0, foreign_before=0.5) as busy_start:  # load average "low", share high
        pass
    assert busy_start.busy
    t = __import__("time").perf_counter()
    share = foreign_share(0.2)
    assert 0.0 <= share <= 1.0 and __import__("time").perf_counter() - t >= 0.2
    got = wait_for_quiet(max_foreign=1.0, timeout_s=0, poll_s=0.1)  # every share passes a threshold of 100%
    assert got is not None and 0.0 <= got <= 1.0
    assert wait_for_quiet(max_foreign=-1.0, timeout_s=0, poll_s=0.1) > -1.0  # none passes a negative one: times out


def test_bench_decode_script_tables_every_side(tmp_path, capsys):
    mod = load_bench("bench_decode")
    out = tmp_path / "d"
    rc = mod.main(["--model", "tiny-llama", "--prompts", "12", "--new", "3", "--repeats", "1", "--warmup", "0",
                   "--recipes", "identity", "streaming25", "--runtimes", "torch", "--out", str(out),
                   "--wait-quiet", "0", "--allow-busy", "--steps", "4"])
    assert rc == 0
    r = json.loads(out.with_suffix(".json").read_text())
    block = r["prompts"]["12"]
    assert set(block["median"]) == {"original/hf", "identity/torch", "streaming25/torch"}
    assert block["recipes"]["streaming25"] == "streaming(sinks=4, window=1)"  # a quarter of 12 tokens, minus sinks
    assert block["same_tokens"]["identity/torch"]  # identity = HF's greedy tokens
    assert block["ratios"]["identity/torch"]["decode_vs_dense_same_runtime"] == 1.0
    assert block["median"]["streaming25/torch"]["kv_bytes"] < block["median"]["identity/torch"]["kv_bytes"]
    assert "busy" in block["load"] and out.with_suffix(".png").stat().st_size > 0
    # decode steps interleaved side by side: every side timed, ratios to HF and to dense of the same steps
    steps = block["steps"]
    assert set(steps) == set(block["median"]) and all(s["steps"] == 4 and s["ms"] > 0 for s in steps.values())
    assert steps["identity/torch"]["vs_dense"] == 1.0 and steps["streaming25/torch"]["vs_hf"] > 0
    assert "vs_hf" not in steps["original/hf"] and block["hf_steps_by_runtime"]["torch"] == steps["original/hf"]
    md = out.with_suffix(".md").read_text()
    assert "step ms (interleaved)" in md
    assert "prompt 12 tokens" in md and "streaming(sinks=4, window=1)" in md
    # one HF row per runtime block (every ratio is to the HF run of its own process), before that block's rows
    assert block["hf_by_runtime"]["torch"] == block["median"]["original/hf"]
    rows = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ")]
    assert rows.index("| original") < rows.index("| identity") and "hf (torch block)" in md


def test_alternate_runs_every_function_once_per_round_in_order():
    from graphwright.bench.timing import alternate

    calls = []
    times = alternate({"base": lambda: calls.append("base"), "cand": lambda: calls.append("cand")}, 3)
    assert calls == ["base", "cand"] * 3
    assert list(times) == ["base", "cand"] and all(len(v) == 3 and min(v) >= 0 for v in times.values())


def test_alternate_rotate_starts_each_round_with_the_next_side():
    from graphwright.bench.timing import alternate, rotated

    assert [rotated(["a", "b", "c"], i) for i in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                              ["a", "b", "c"]]
    assert rotated([], 3) == []
    calls = []
    times = alternate({k: (lambda k=k: calls.append(k)) for k in "abc"}, 3, rotate=True)
    assert calls == list("abc" + "bca" + "cab")
    assert list(times) == ["a", "b", "c"] and all(len(v) == 3 for v in times.values())


def test_bench_decode_ratios_pair_sides_within_each_round():
    """A host that runs round 1 twice as fast as round 0 must not move a ratio: each round's side is divided by
    the same round's HF / dense, and the median of those is reported with its min-max."""
    mod = load_bench("bench_decode")

    def row(tps):
        return {"decode_tokens_per_s": tps, "prefill_tokens_per_s": 1.0, "kv_bytes": 4, "peak_mem_bytes": 0,
                "kv_bytes_dense": 4}

    runs = {"original/hf": [row(10.0), row(20.0)], "identity/torch": [row(12.0), row(24.0)],
            "h2o25/torch": [row(6.0), row(36.0)]}
    med = {k: {m: sorted(r[m] for r in v)[0] for m in ("decode_tokens_per_s", "prefill_tokens_per_s", "kv_bytes")}
           for k, v in runs.items()}
    r = mod.ratios(med, runs)
    assert r["identity/torch"]["decode_vs_hf"] == pytest.approx(1.2)
    assert r["identity/torch"]["decode_vs_hf_range"] == pytest.approx([1.2, 1.2])
    assert r["h2o25/torch"]["decode_vs_dense_same_runtime"] == pytest.approx((0.5 + 1.5) / 2)
    assert r["h2o25/torch"]["decode_vs_dense_same_runtime_range"] == pytest.approx([0.5, 1.5])
    assert mod._ratio_cell(r["h2o25/torch"], "decode_vs_dense_same_runtime") == "1.00 (0.50-1.50)"
    assert "decode_vs_hf_range" not in mod.ratios(med)["identity/torch"]  # no raw rounds: ratio of medians


def _decode_run(P: int, busy: bool, spin: str, steps: dict, ratios: dict) -> dict:
    """A bench_decode.py result with one prompt block: ``steps`` {side: (vs_hf, vs_dense)}, ``ratios`` {side: (vs_hf,
    vs_dense, kv fraction)}."""
    med = {"original/hf": {}, **{k: {} for k in ratios}}
    return {"ort_spin": spin, "prompts": {str(P): {
        "load": {"busy": busy}, "median": med, "recipes": {},
        "steps": {k: {"ms": 10.0, "vs_hf": a, "vs_dense": b} for k, (a, b) in steps.items()},
        "ratios": {k: {"decode_vs_hf": a, "decode_vs_dense_same_runtime": b, "kv_fraction_of_hf": kv}
                   for k, (a, b, kv) in ratios.items()}}}}


def test_plot_decode_runs_lays_out_ratios_by_length(tmp_path):
    """Interleaved-step ratios where a run has them, the rounds' where not (and for ONNX Runtime sides of a run whose
    ORT threads spun); a later run wins a side at a length, sides only an earlier run has stay; busy blocks are left
    out unless asked."""
    mod = load_bench("plot_decode_runs")
    a = _decode_run(256, False, "on", {"identity/torch": (1.1, 1.0), "h2o25/torch": (0.9, 0.8), "identity/onnx": (3.0, 1.0)},
                    {"identity/torch": (1.05, 1.0, 1.0), "h2o25/torch": (0.95, 0.9, 0.25), "identity/onnx": (1.5, 1.0, 1.0)})
    b = _decode_run(4096, True, "off", {"identity/torch": (1.3, 1.0)}, {"identity/torch": (1.2, 1.0, 1.0)})
    c = _decode_run(256, False, "off", {"identity/torch": (1.2, 1.0)}, {"identity/torch": (1.1, 1.0, 1.0)})
    paths = []
    for name, run in (("a", a), ("b", b), ("c", c)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(run))
    table = mod.collect(paths[:2])
    assert list(table) == [256]  # the busy 4k block is left out
    assert table[256]["sides"]["h2o25/torch"] == {"vs_hf": 0.9, "vs_dense": 0.8, "ms": 10.0, "source": "steps"}
    assert table[256]["sides"]["identity/onnx"]["vs_hf"] == 1.5  # spun ORT threads: the rounds' ratio
    assert table[256]["sides"]["identity/onnx"]["source"] == "rounds"
    md = mod.markdown(table)
    assert "| h2o25/torch | 0.90, 0.80 (0.25) |" in md and "| identity/onnx | 1.50, 1.00 (1.00) r |" in md
    table = mod.collect(paths, allow_busy=True)
    assert list(table) == [256, 4096] and table[4096]["busy"] and "BUSY" in mod.markdown(table)
    assert table[256]["run"] == "a.json, c.json" and table[256]["sides"]["identity/torch"]["vs_hf"] == 1.2  # last file wins
    assert table[256]["sides"]["h2o25/torch"]["vs_hf"] == 0.9 and table[256]["kv"]["h2o25/torch"] == 0.25  # a's stays
    assert mod.main([str(paths[0]), "--out", str(tmp_path / "by_length")]) == 0
    assert (tmp_path / "by_length.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no such result file"):
        mod.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")])


def test_bench_decode_names_the_quality_works_best_quarter_recipe():
    mod = load_bench("bench_decode")
    assert mod.recipe_text("mass25", 2048) == 'snapkv(budget=512, heads="scores", gamma=1.0, headset="shipped:mass")'
    assert mod.recipe_text("identity", 2048) is None and "mass25" in mod.DEFAULT_RECIPES


def test_plot_decode_runs_lists_the_absolute_figures_beside_the_ratios(tmp_path):
    """Issue 17's table: prefill and decode tokens/s, KV bytes and peak RSS of each side, HF once per runtime block,
    beside the step ratios; the plot gains a panel of decode tokens/s by prompt length."""
    mod = load_bench("plot_decode_runs")
    run = _decode_run(2048, False, "off", {"identity/torch": (1.5, 1.0), "h2o25/torch": (1.8, 1.2)},
                      {"identity/torch": (1.4, 1.0, 1.0), "h2o25/torch": (1.7, 1.1, 0.25)})
    block = run["prompts"]["2048"]
    fig = {"prefill_tokens_per_s": 500.0, "decode_tokens_per_s": 20.0, "kv_bytes": 8_000_000, "peak_mem_bytes": 3_000_000}
    block["median"] = {"original/hf": dict(fig), "identity/torch": {**fig, "decode_tokens_per_s": 30.0},
                       "h2o25/torch": {**fig, "decode_tokens_per_s": 36.0, "kv_bytes": 2_000_000}}
    block["hf_by_runtime"] = {"torch": dict(fig)}
    (tmp_path / "r.json").write_text(json.dumps(run))
    table = mod.collect([tmp_path / "r.json"])
    assert set(table[2048]["figures"]) == {"hf@torch", "identity/torch", "h2o25/torch"}
    md = mod.figures_markdown(table)
    assert "| 2048 | hf@torch | 500 | 20.0 | 1.00 |  | 8.0 | 1.00 | 3 |" in md
    assert "| 2048 | h2o25/torch | 500 | 36.0 | 1.80 | 1.20 | 2.0 | 0.25 | 3 |" in md
    assert md.index("hf@torch") < md.index("identity/torch") < md.index("h2o25/torch")
    assert mod.main([str(tmp_path / "r.json"), "--out", str(tmp_path / "o")]) == 0
    assert "Absolute figures" in (tmp_path / "o.md").read_text() and (tmp_path / "o.png").stat().st_size > 0
