"""The benchmark suite: `dioe bench --quick` completes and writes valid results (CI checks nothing about speed);
ratios and roof fractions are derived as documented."""

import json
import subprocess
import time

import torch

import dioe
from dioe.bench import (ENGINES, FP32_ENGINES, Canary, canary_text, derive, markdown, merge_roofs, paired_ratio, ratio_changes,
                        reproducibility)

from helpers import dioe_command


def test_quick_bench_completes_and_writes_valid_json(tmp_path):
    p = subprocess.run(dioe_command() + ["bench", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((tmp_path / "quick.json").read_text())
    assert data["command"].startswith("dioe bench --quick")
    assert data["machine"]["cores"] >= 1 and data["machine"]["versions"]["torch"]
    assert data["roof"]["fp32"]["gflops"] > 0
    assert data["roof"]["fp32"]["gflops"] == max(c["gflops"] for c in data["roof"]["fp32"]["candidates"])
    (model,) = data["models"]
    assert set(model["batches"]) == {"1", "8"}
    assert model["batches"]["1"]["probe_gflops"] > 0
    rows = model["batches"]["1"]["engines"]
    assert set(rows) == set(ENGINES)
    assert set(model["batches"]["8"]["engines"]) == set(FP32_ENGINES), "quick: lower precisions at batch 1 only"
    # every engine but eager itself is judged against fp32 eager on held-out inputs, beside its latency
    for e, r in rows.items():
        if e != "torch" and "error" not in r:
            acc = r["accuracy"]
            assert "error" in acc or (isinstance(acc["met"], bool) and 0 < acc["cosine"]["worst"] <= 1.0 + 1e-6), e
    assert rows["dioe"]["accuracy"]["met"] and rows["dioe"]["accuracy"]["cosine"]["worst"] > 0.9999
    assert rows["dioe-auto"]["plan"], "DIOE's own choice of precision records the plan it ran"
    d = rows["dioe"]
    assert d["median_ms"] > 0 and d["p90_ms"] >= d["median_ms"] and d["best_peer"] in ENGINES
    assert d["plan"] and all("@" in p for p in d["plan"]), "the DIOE row records the plan it ran"
    # DIOE's partitions were timed bare beside it at batch 1 only: its runtime overhead, a share of its latency
    assert 0 < d["partitions_ms"] < 2 * d["median_ms"] and -1 < d["runtime_overhead"] < 1
    assert "partitions_ms" not in model["batches"]["8"]["engines"]["dioe"]
    md = (tmp_path / "quick.md").read_text()
    assert md.startswith("# DIOE benchmark") and "| runtime overhead |" in md
    assert "## Precision: latency beside accuracy (batch 1)" in md
    assert (tmp_path / "quick.png").stat().st_size > 10_000


def test_a_plans_precision_reads_lowest_first_and_once_each():
    from dioe.bench.engines import plan_precision
    from dioe.plan import Plan, PlanPartition

    def plan(*precisions):
        parts = tuple(PlanPartition(f"p{i}", (f"s{i}",), (f"n{i}",), "cpu0", "openvino", prec, 1, 0.0, 0.01, 0.01,
                                    None, "fastest") for i, prec in enumerate(precisions))
        return Plan("tiny", "h", "", "latency", parts, 0.01, 0.01, 0.01)
    assert plan_precision(plan("int8", "int8")) == "int8", "one precision when the partitions agree"
    assert plan_precision(plan("fp32", "int8", "bf16", "int8")) == "int8+bf16+fp32"
    assert plan_precision(plan("fp8", "fp32", "fp16")) == "fp16+fp32+fp8", "one outside the list goes last"


def test_ratios_compare_within_a_precision_class():
    def row(ms, prec="fp32"):
        return {"median_ms": ms, "p90_ms": ms, "precision": prec, "gflops_per_s": 10.0 / (ms / 1e3) / 1e0,
                "per_s": 1e3 / ms, "compile_s": 1.0, "added_rss_mb": 1, "peak_rss_mb": 2}
    results = {"roof": {"fp32": {"gflops": 100.0}, "bf16": {"gflops": 400.0}},
               "models": [{"model": "m", "batches": {"1": {"gflop": 10.0, "engines": {
                   "torch": row(20.0), "openvino-f32": row(10.0), "openvino-default": row(4.0, "bf16"),
                   "dioe": {**row(8.0), "partitions_ms": 7.6, "runtime_overhead": 0.05}}}}}],
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
    assert "| m | 10.00 | openvino-f32 | 10.00 | 8.00 | **0.80** | - | +5.0% (bare 7.60 ms) |" in md


def test_accuracy_is_judged_by_the_budget_optimize_picks_for_the_output():
    """A model returning one named hidden state (batch, seq, width) is judged by cosine and relative L2, as
    optimize judges it, not by argmax agreement as a bare 3-D tensor would be."""
    from transformers.modeling_outputs import BaseModelOutput

    from dioe.bench.measurement import _accuracy

    class Hidden(torch.nn.Module):
        def forward(self, x):
            return BaseModelOutput(last_hidden_state=x * 2)
    x = torch.randn(1, 4, 8)
    model = Hidden().eval()
    captured = dioe.capture(model, (x,))
    held_out = [(torch.randn(1, 4, 8),) for _ in range(4)]
    row = _accuracy({"dioe": (lambda *a: model(*a), None)}, captured, held_out)["dioe"]
    assert row["budget"].startswith("cosine>=0.999, rel_l2<=0.05") and row["met"] and "top1" not in row, row


def test_zoo_wide_precision_figures_are_geometric_means_per_batch():
    from dioe.bench.report import geomeans
    results = {"models": [
        {"model": "a", "batches": {"1": {"engines": {"dioe-auto": {"speedup_over_openvino_default": 2.0,
                                                                   "speedup_over_eager": 4.0}}},
                                   "8": {"engines": {"dioe-auto": {"speedup_over_openvino_default": 1.5}}}}},
        {"model": "b", "batches": {"1": {"engines": {"dioe-auto": {"speedup_over_openvino_default": 0.5,
                                                                   "paired_over_openvino_default": 0.8,
                                                                   "speedup_over_eager": 9.0}}}}}]}
    assert geomeans(results) == ["batch 1, dioe-auto over OpenVINO's default: 1.00x (2 models)",
                                 "batch 1, dioe-auto over OpenVINO's default, paired: 0.80x (1 models)",
                                 "batch 1, dioe-auto over torch eager: 6.00x (2 models)",
                                 "batch 8, dioe-auto over OpenVINO's default: 1.50x (1 models)"]


def test_the_paired_ratio_compares_blocks_of_the_same_round():
    """Two overall medians can pair one engine's quiet rounds with the other's busy ones; the paired ratio divides
    each round's blocks, timed seconds apart, and takes the median of those."""
    def row(ms, rounds):
        return {"median_ms": ms, "p90_ms": ms, "precision": "fp32", "gflops_per_s": 1.0, "per_s": 1.0,
                "round_ms": rounds}
    # the machine was slow in rounds 1, 2 and 4 (every engine twice as slow), and DIOE's one bad round fell in 4
    results = {"roof": {"fp32": {"gflops": 100.0}}, "models": [{"model": "m", "batches": {"1": {"gflop": 1.0,
               "engines": {"onnxruntime": row(20.0, [10.0, 20.0, 20.0, 10.0, 20.0]),
                           "dioe": row(18.0, [9.0, 18.0, 18.0, 9.0, 36.0])}}}}]}
    derive(results)
    d = results["models"][0]["batches"]["1"]["engines"]["dioe"]
    assert d["ratio_to_best_peer"] == 0.9 and d["paired_ratio"] == 0.9 and d["paired_ratio_range"] == [0.9, 1.8]
    peer = results["models"][0]["batches"]["1"]["engines"]["onnxruntime"]
    assert peer["paired_ratio"] == 1.0   # the best peer against itself
    assert paired_ratio([1.0, 2.0], [1.0]) is None and paired_ratio(None, [1.0]) is None   # rounds must match
    # a later run beside an earlier one that recorded no rounds: both ratios tabulated, paired where known
    old = {"command": "dioe bench", "date": "d", "models": [{"model": "m", "batches": {"1": {"engines": {
        "dioe": {"median_ms": 20.0, "best_peer": "openvino-f32", "ratio_to_best_peer": 1.05}}}}}]}
    lines = ratio_changes(old, results)
    assert "| m | 1 | openvino-f32 | 1.05 | - | onnxruntime | 0.90 | 0.90 (0.90-1.80) |" in lines


def test_reproducibility_separates_the_machine_drift_from_an_engines_own():
    def run(torch_ms, ov_ms, dioe_ms, probe):
        return {"command": "dioe bench", "date": "d", "models": [{"model": "m", "batches": {"1": {
            "probe_gflops": probe, "engines": {"torch": {"median_ms": torch_ms}, "openvino-f32": {"median_ms": ov_ms},
                                               "dioe": {"median_ms": dioe_ms}}}}}]}
    # every engine 15% slower, as when the machine slows: three raw moves, none of an engine's own
    lines = reproducibility(run(100.0, 50.0, 40.0, 200.0), run(115.0, 57.5, 46.0, 174.0))
    assert lines[-1] == ("3 of 3 medians moved by more than 10%; 0 of 3 did once the shift shared by every "
                         "engine of the same model and batch is taken out.")
    assert "| m | 1 | dioe | 40.00 | 46.00 | +15.0% **>10%** | +15.0% | +0.0% | +14.9% |" in lines
    # only DIOE 20% slower: the shared shift is the median, 0%, and DIOE's own move stands out
    lines = reproducibility(run(100.0, 50.0, 40.0, 200.0), run(100.0, 50.0, 48.0, 200.0))
    assert lines[-1].startswith("1 of 3 medians moved by more than 10%; 1 of 3")
    assert not any("not on the same machine" in line for line in lines)
    # runs on two different machines are said to be so, with what differs
    old, new = run(100.0, 50.0, 40.0, 200.0), run(100.0, 50.0, 48.0, 200.0)
    old["machine"] = {"cpu": "X", "cores": 2, "isa": ["avx2", "avx512f"], "versions": {"torch": "2.13.0"}}
    new["machine"] = {"cpu": "X", "cores": 2, "isa": ["avx2"], "versions": {"torch": "2.14.0"}}
    said = next(line for line in reproducibility(old, new) if "not on the same machine" in line)
    assert "ISA without avx512f now" in said and "torch 2.13.0 then, 2.14.0 now" in said and "cores" not in said


def test_a_gemm_with_no_fast_kernel_is_timed_once_and_not_at_larger_sizes(monkeypatch):
    from dioe.bench import machine

    calls = []

    def slow_gemm(n, dt):
        def call():
            calls.append((n, dt))
            time.sleep(machine.SLOW_GEMM_S + 0.05)
        return call
    monkeypatch.setattr(machine, "torch_gemm", slow_gemm)
    monkeypatch.setattr(machine, "openvino_gemm", lambda n, dt: None)
    roof = machine.gemm_roof(sizes=(64, 128), runs=5)
    assert [(c["op"], c["n"]) for c in roof["fp32"]["candidates"]] == [("torch.mm", 64)]
    assert sorted({n for n, _ in calls}) == [64] and len(calls) == 3, "one call per dtype, none at n=128"


def test_roof_is_the_best_gemm_of_the_run():
    start = {"fp32": {"gflops": 150.0, "op": "torch.mm", "n": 2048,
                      "candidates": [{"op": "torch.mm", "n": 2048, "gflops": 150.0},
                                     {"op": "openvino MatMul", "n": 2048, "gflops": 140.0}]},
             "int8": {"gflops": None, "error": "no VNNI"}}
    end = {"fp32": {"gflops": 160.0, "candidates": [{"op": "openvino MatMul", "n": 1024, "gflops": 160.0}]},
           "int8": {"gflops": None, "error": "no VNNI"}}
    roof = merge_roofs(start, end, [("probe before m b1", 180.0), ("canary in m b1", 190.0),
                                    ("probe before m b8", None)])
    assert roof["fp32"]["gflops"] == 190.0 and roof["fp32"]["when"] == "canary in m b1"
    assert len(roof["fp32"]["candidates"]) == 5
    assert merge_roofs(start, end, [("probe before m b1", 120.0)])["fp32"] == {
        "op": "openvino MatMul", "n": 1024, "gflops": 160.0, "when": "end", "candidates": [
            {"op": "torch.mm", "n": 2048, "gflops": 150.0, "when": "start"},
            {"op": "openvino MatMul", "n": 2048, "gflops": 140.0, "when": "start"},
            {"op": "openvino MatMul", "n": 1024, "gflops": 160.0, "when": "end"},
            {"op": "torch.mm", "n": 1024, "gflops": 120.0, "when": "probe before m b1"}]}
    assert roof["int8"] == {"gflops": None, "error": "no VNNI"}  # none measured: the error stays


def test_inductor_peer_compiles_in_the_runs_own_cache(tmp_path):
    """Inductor's on-disk caches outlive the process: the peer compiles into the run's folder, so that a second
    run does not report a warm compile, and later compiles do not go on using that folder."""
    import os

    import torch

    import dioe
    from dioe.bench import build

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    x = torch.randn(2, 8)
    captured = dioe.capture(model, (x,))
    built = build("inductor", model, (x,), captured, tmp_path)
    assert built.precision == "fp32" and torch.allclose(built.fn(x)[0], model(x), atol=1e-5)
    assert any(p.suffix == ".py" for p in (tmp_path / "peers" / "inductor").rglob("*")), "no inductor code there"
    after = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # torch itself sets its default there on first use
    assert after == before or not after.startswith(str(tmp_path)), after


class _ScriptedCanary(Canary):
    """A canary reading a script instead of timing a GEMM: the last reading repeats once the script ends."""

    def __init__(self, readings):
        super().__init__()
        self.script = list(readings)

    def read(self):
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


def _two_engines(calls):
    def engine(name):
        def fn():
            calls[name] += 1
            time.sleep(0.001)
        return fn, ()
    return {"a": engine("a"), "b": engine("b")}


def _steady(monkeypatch):
    """The bench's rounds with no idle wait and every engine's pace taken as 1 ms a call: the calls per block (3 at a
    10 ms budget over 3 rounds) no longer hang on how long a sleep took on a loaded machine."""
    from dioe.bench import rounds

    monkeypatch.setattr(rounds, "settle", lambda: 0.0)
    monkeypatch.setattr(rounds, "estimate", lambda fn, args: 0.001)
    return rounds


def test_blocks_timed_while_the_canary_reads_slow_are_timed_again(monkeypatch):
    method = _steady(monkeypatch)
    calls = {"a": 0, "b": 0}
    # readings between blocks: a slow one after the second block disturbs the second and the third
    canary = _ScriptedCanary([180.0, 180.0, 100.0, 180.0])
    samples, by_round, rounds, seen = method.interleaved(_two_engines(calls), rounds=3, budget_s=0.01,
                                                         canary=canary)
    assert rounds == 3 and canary.nominal == 180.0
    assert seen == {"nominal_gflops": 180.0, "blocks": 6, "disturbed": 2, "retimed": 2, "left_disturbed": 0,
                    "left_by_engine": {}, "fastest_gflops": 180.0}
    # each engine keeps one block of 3 calls a round: the disturbed blocks' samples were replaced, not added to
    assert len(samples["a"]) == len(samples["b"]) == 9
    assert calls["a"] + calls["b"] == 18 + 2 * 3   # and the re-timed blocks ran their 3 calls each
    assert "2 of 6 blocks disturbed, 2 re-timed, 0 left" == method.disturbance_text(seen)
    # each round's entry is the median of that engine's block in the round, a re-timed block's in its own round
    import statistics
    for e in "ab":
        assert by_round[e] == [statistics.median(samples[e][3 * r:3 * r + 3]) for r in range(3)]


def test_a_disturbance_that_outlasts_the_retime_budget_is_kept_and_counted(monkeypatch):
    method = _steady(monkeypatch)
    monkeypatch.setattr(method, "RETIME_S", 0.05)
    monkeypatch.setattr(method, "QUIET_WAIT_S", 0.01)
    calls = {"a": 0, "b": 0}
    samples, _, _, seen = method.interleaved(_two_engines(calls), rounds=3, budget_s=0.01,
                                          canary=_ScriptedCanary([180.0, 180.0, 100.0]))
    # the first block is quiet on both sides; every later one has the slow machine on one side at least
    assert seen["disturbed"] == 5 and seen["retimed"] == 0 and seen["left_disturbed"] == 5
    assert seen["left_by_engine"] == {"a": 2, "b": 3}   # blocks a, b, b, a, a, b: all but the first
    assert len(samples["a"]) == len(samples["b"]) > 0
    results = {"models": [{"model": "m", "batches": {"1": {"canary": seen}}}]}
    assert canary_text(results)[0].endswith("5 blocks are kept disturbed: m b1 (5).")


def test_settle_waits_for_spinning_workers_and_no_longer():
    import threading

    from dioe.timing import SETTLE_SLICE_S, settle

    assert settle() < 10 * SETTLE_SLICE_S   # nothing spins: a slice or two

    def spin(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    worker = threading.Thread(target=spin, args=(0.15,))
    worker.start()
    try:
        assert settle() >= 0.1       # it waited for the worker to stop
    finally:
        worker.join()
    worker = threading.Thread(target=spin, args=(1.0,))
    worker.start()
    try:
        assert 0.05 <= settle(max_s=0.05) < 0.5   # a worker that never stops: at most max_s, and a slice
    finally:
        worker.join()


def test_the_engine_with_the_most_disturbed_blocks_is_timed_again_first(monkeypatch):
    method = _steady(monkeypatch)
    monkeypatch.setattr(method, "RETIME_S", 0.5)   # two re-timings of 3 ms each fit, even on a loaded machine
    monkeypatch.setattr(method, "QUIET_WAIT_S", 0.01)
    calls = {"a": 0, "b": 0}
    # blocks a, b, b, a, a, b; slow readings after the first two disturb a's first block and b's first two. The
    # first re-timing reads quiet, the second ends on a slow reading, and the machine stays busy until time runs out
    canary = _ScriptedCanary([180.0, 100.0, 100.0, 180.0, 180.0, 180.0, 180.0, 180.0, 100.0])
    _, _, _, seen = method.interleaved(_two_engines(calls), rounds=3, budget_s=0.01, canary=canary)
    assert seen["disturbed"] == 3 and seen["retimed"] == 2
    # b's block went first, then a's: one each is left. In block order, a's then b's, b would keep both of its own.
    assert seen["left_by_engine"] == {"a": 1, "b": 1}


def test_the_openvino_peer_converts_from_torch_not_from_the_onnx_runtime_peers_file(tmp_path, monkeypatch):
    import openvino
    import torch

    import dioe
    from dioe.bench import build

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    x = torch.randn(2, 8)
    captured = dioe.capture(model, (x,))
    import onnxruntime

    public, run = [], onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run",
                        lambda self, *a, **k: public.append(a) or run(self, *a, **k))
    fn = build("onnxruntime", model, (x,), captured, tmp_path).fn
    assert list(tmp_path.rglob("*.onnx")), "the ONNX Runtime peer exported nothing"
    assert torch.allclose(fn(x)[0], model(x), atol=1e-5)
    assert public, "the ONNX Runtime peer is called through its public API, as a user calls it"
    converted, real = [], openvino.convert_model

    def spy(source, *a, **k):
        converted.append(source)
        return real(source, *a, **k)
    monkeypatch.setattr(openvino, "convert_model", spy)
    for engine in ("openvino-f32", "openvino-default"):
        built = build(engine, model, (x,), captured, tmp_path)
        fn, precision = built.fn, built.precision
        # OpenVINO's own default is bf16 on a CPU with AVX-512 BF16 or AMX, fp32 elsewhere
        assert precision == "fp32" or engine == "openvino-default" and precision == "bf16"
        assert torch.allclose(fn(x)[0], model(x), atol=1e-5 if precision == "fp32" else 3e-2), precision
    # one conversion, shared by the two OpenVINO peers, from torch.export's program: no peer's build is
    # shortened by another's export (DIOE's OpenVINO reads its ONNX Runtime rival's file; the peers must not)
    assert len(converted) == 1 and isinstance(converted[0], torch.export.ExportedProgram), converted
