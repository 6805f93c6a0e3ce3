"""The benchmark suite: `dioe bench --quick` completes and writes valid results (CI checks nothing about speed);
ratios and roof fractions are derived as documented."""

import json
import subprocess

from dioe.bench import ENGINES, derive, markdown

from helpers import dioe_command


def test_quick_bench_completes_and_writes_valid_json(tmp_path):
    p = subprocess.run(dioe_command() + ["bench", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((tmp_path / "quick.json").read_text())
    assert data["command"].startswith("dioe bench --quick")
    assert data["machine"]["cores"] >= 1 and data["machine"]["versions"]["torch"]
    assert data["roof"]["fp32"]["gflops"] > 0
    (model,) = data["models"]
    assert set(model["batches"]) == {"1", "8"}
    rows = model["batches"]["1"]["engines"]
    assert set(rows) == set(ENGINES)
    d = rows["dioe"]
    assert d["median_ms"] > 0 and d["p90_ms"] >= d["median_ms"] and d["best_peer"] in ENGINES
    assert (tmp_path / "quick.md").read_text().startswith("# DIOE benchmark")
    assert (tmp_path / "quick.png").stat().st_size > 10_000


def test_ratios_compare_within_a_precision_class():
    def row(ms, prec="fp32"):
        return {"median_ms": ms, "p90_ms": ms, "precision": prec, "gflops_per_s": 10.0 / (ms / 1e3) / 1e0,
                "per_s": 1e3 / ms, "compile_s": 1.0, "added_rss_mb": 1, "peak_rss_mb": 2}
    results = {"roof": {"fp32": {"gflops": 100.0}, "bf16": {"gflops": 400.0}},
               "models": [{"model": "m", "batches": {"1": {"gflop": 10.0, "engines": {
                   "torch": row(20.0), "openvino-f32": row(10.0), "openvino-default": row(4.0, "bf16"),
                   "dioe": row(8.0)}}}}],
               "machine": {"cpu": "x", "cores": 2, "machine": "x86_64", "isa": [], "versions": {}},
               "command": "dioe bench", "date": "today", "seconds": 1.0}
    derive(results)
    rows = results["models"][0]["batches"]["1"]["engines"]
    assert rows["dioe"]["best_peer"] == "openvino-f32" and rows["dioe"]["ratio_to_best_peer"] == 0.8
    assert rows["openvino-f32"]["ratio_to_best_peer"] == 1.0 and rows["torch"]["ratio_to_best_peer"] == 2.0
    assert rows["openvino-default"]["best_peer"] == "openvino-default"   # bf16 is its own class
    assert rows["torch"]["speedup_over_eager"] == 1.0 and rows["dioe"]["speedup_over_eager"] == 2.5
    assert rows["openvino-default"]["roof_fraction"] == round(10.0 / 0.004 / 400.0, 3)
    md = markdown(results)
    assert "| m | 10.00 | openvino-f32 | 10.00 | 8.00 | **0.80** |" in md
