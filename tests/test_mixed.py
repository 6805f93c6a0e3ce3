"""Mixed precision (`dioe.mixed`): when the whole graph in int8 misses the budget, the parts that can afford it
run in int8 and the sensitive ones stay fp32; the mix round-trips through JSON and reloads without calibrating."""

import re
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from helpers import eager, outlier_model, script_int8_faster

import dioe
from dioe import mixed
from dioe.accuracy import AccuracyReport, MetricResult
from dioe.plan import Choice
from dioe.precision import FP32, Candidate, PrecisionRecord
from dioe.settings import Settings


def _optimize(model, x, calib, tmp_path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dioe.optimize(model, (x,), backends=["onnxruntime"], precision="int8", cache_dir=tmp_path,
                             accuracy=dioe.Budget(cosine=0.999, samples=32), calibration=calib, **kw)


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min().item()


def test_the_sensitive_part_stays_fp32_and_the_mix_reloads_without_calibrating(tmp_path, monkeypatch):
    """int8 is made to win the timing (its accuracy is real): the whole graph in int8 misses the budget, the
    part holding the wide-range block stays fp32, the others run int8, and the plan says why for each."""
    model, x, calib = outlier_model()
    script_int8_faster(monkeypatch)
    opt = _optimize(model, x, calib, tmp_path)
    whole, mix = opt.precision_search.candidates
    assert whole.mix is None and whole.why.startswith("misses the budget"), whole
    assert mix.mix is not None and not mix.why and mix.report.met, mix
    assert opt.precision_search.winner == mix.label
    parts = opt.plan.partitions
    assert len(parts) == len(mix.mix.parts) >= 2 and all((p.member, p.backend) == ("cpu0", "onnxruntime")
                                                         for p in parts), opt.plan.summary()
    sensitive = next(p for p in parts if any(s.endswith(":2.fc") for s in p.segments))
    assert sensitive.precision == "fp32" and sensitive.reason.startswith("fp32: at int8 alone it used"), sensitive
    low = [p for p in parts if p.precision == "int8"]
    assert low and all(p.calibration and p.reason.startswith("int8: alone it used") for p in low), parts
    # what each engine applied, read back from it
    assert [c.applied.split()[0] for c in opt.runtime.compiled.values()] == [p.precision for p in parts], \
        [c.applied for c in opt.runtime.compiled.values()]
    assert AccuracyReport.from_dict(opt.plan.accuracy).met
    assert any(n.startswith("mixed precision: ") for n in opt.plan.notes), opt.plan.notes
    y = opt(x)
    assert _cosine(y, eager(model, (x,))) > 0.999
    # round trip, and a reload that finds every int8 part by its calibration key
    plan = dioe.Plan.from_dict(opt.plan.to_dict())
    assert plan == opt.plan
    path = opt.save(tmp_path / "mix.plan.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = dioe.load(path, model, (x,), hardware=opt.runtime.pool, cache_dir=tmp_path)
    assert [(c.precision, c.notes.get("calibration_samples", 0)) for c in again.runtime.compiled.values()] == \
        [(p.precision, 0) for p in parts]
    torch.testing.assert_close(again(x), y, rtol=0, atol=0)
    # a warm optimize reuses the verdict and rebuilds the same mix from the cache
    warm = _optimize(model, x, calib, tmp_path)
    assert warm.precision_search.reused
    assert [(p.precision, p.reason, p.calibration) for p in warm.plan.partitions] == \
        [(p.precision, p.reason, p.calibration) for p in parts]
    torch.testing.assert_close(warm(x), y, rtol=0, atol=0)


def test_a_part_whose_int8_engine_fails_stays_fp32_and_says_why(tmp_path, monkeypatch):
    """The int8 engine of the first part raises on every call: the search goes on without it, and the mix it
    keeps runs that part in fp32, saying why; nothing fails and no call falls back."""
    model, x, calib = outlier_model()
    script_int8_faster(monkeypatch)
    real = mixed._engines

    def first_int8_part_fails(*args):
        low, high, broken = real(*args)
        c = low.runtime.compiled["p0"]

        def boom(*_):
            raise RuntimeError("engine lost")
        low.runtime.compiled["p0"] = replace(c, fn=boom)
        return low, high, broken
    monkeypatch.setattr(mixed, "_engines", first_int8_part_fails)
    opt = _optimize(model, x, calib, tmp_path)
    p0 = opt.plan.partitions[0]
    assert p0.precision == "fp32" and p0.reason.startswith("fp32: its int8 engine failed while timed: BackendError"), \
        p0
    assert "int8" in [p.precision for p in opt.plan.partitions], opt.plan.summary()
    assert _cosine(opt(x), eager(model, (x,))) > 0.999 and not opt.runtime.stats["fallbacks"]


def test_a_part_whose_int8_engine_fails_to_compile_stays_fp32_and_says_why(tmp_path, monkeypatch):
    """The build runs a part that failed to compile on torch, and writes its plan as such: the search must see
    that from what it asked for, not from that plan, or it would time and judge torch fp32 as the part's int8."""
    from dioe.backends.onnxruntime import OnnxruntimeBackend
    from dioe.errors import BackendError

    model, x, calib = outlier_model()
    script_int8_faster(monkeypatch)
    real = OnnxruntimeBackend.compile_fn

    def p1_int8_fails(self, part, member, precision, **kw):
        if precision == "int8" and part.id == "p1":
            raise BackendError("injected: no int8 kernel for this part")
        return real(self, part, member, precision, **kw)
    monkeypatch.setattr(OnnxruntimeBackend, "compile_fn", p1_int8_fails)
    opt = _optimize(model, x, calib, tmp_path)
    p1 = opt.plan.partitions[1]
    assert (p1.backend, p1.precision) == ("onnxruntime", "fp32"), p1
    assert p1.reason == "fp32: its int8 engine fell back to torch while compiling", p1
    assert "int8" in [p.precision for p in opt.plan.partitions], opt.plan.summary()
    assert [(c.backend, c.precision) for c in opt.runtime.compiled.values()] == \
        [(p.backend, p.precision) for p in opt.plan.partitions]


def test_a_slower_precision_is_neither_judged_nor_mixed_and_mixing_can_be_off(tmp_path, monkeypatch):
    model, x, calib = outlier_model()
    script_int8_faster(monkeypatch, factor=3.0)   # int8 three times slower than anything else
    judged = []
    real = mixed.evaluate
    monkeypatch.setattr("dioe.precision.evaluate", lambda b, ref, got: judged.append(len(ref)) or real(b, ref, got))
    opt = _optimize(model, x, calib, tmp_path)
    (whole,) = opt.precision_search.candidates
    # int8 is scripted at 3x the fastest round of any rival; the fp32 plan's time (the mean of its faster half of
    # rounds) sits above that fastest round by however much the machine's load spreads its rounds, so the ratio is
    # 1/3 or somewhat more, never near 1
    speed = re.match(r"not judged: raced ([0-9.]+)x the fp32 plan's speed", whole.why or "")
    assert whole.report is None and speed and float(speed.group(1)) < 0.9, whole
    assert len(judged) == 1, "only the fp32 plan is judged, for the plan's own report"
    assert [p.precision for p in opt.plan.partitions] == ["fp32"]
    script_int8_faster(monkeypatch)
    off = _optimize(model, x, calib, tmp_path / "off", settings=Settings(cache_dir=tmp_path / "off", mixed_parts=0))
    (whole,) = off.precision_search.candidates
    assert whole.mix is None and whole.why.startswith("misses the budget"), whole


def test_a_precision_close_to_the_bar_is_timed_again_over_more_rounds(tmp_path, monkeypatch):
    """int8 scripted 1% faster than the fp32 plan: inside `race_close` of the 3% a lower precision must gain, so
    the screen times it again over `race_rounds + race_extra` rounds before leaving it unjudged."""
    from dioe import timing
    model, x, calib = outlier_model()
    real, rounds = timing.side_by_side, []

    def scripted(runs, flat, **kw):
        got = real(runs, flat, **kw)
        if "fp32 plan" not in got:
            return got
        rounds.append(kw["rounds"])
        return {k: [0.99 if "/int8" in k else 1.0] * len(v) if k == "fp32 plan" or "/int8" in k else v
                for k, v in got.items()}
    monkeypatch.setattr(timing, "side_by_side", scripted)
    opt = _optimize(model, x, calib, tmp_path)
    s = Settings()
    assert rounds == [s.race_rounds, s.race_rounds + s.race_extra], rounds
    (whole,) = opt.precision_search.candidates
    assert whole.why.startswith("not judged: raced 1.01x the fp32 plan's speed"), whole


def _script_low_faster(monkeypatch):
    """int8 contenders time at half, bf16 ones at 0.8 of the fastest fp32 one (of the fastest overall where none
    is fp32), so that the order never depends on the machine's load; accuracy stays real."""
    from dioe import timing
    real = timing.side_by_side

    def scripted(runs, flat, **kw):
        got = real(runs, flat, **kw)
        fp32 = [t for k, v in got.items() if "/int8" not in k and "/bf16" not in k for t in v]
        base = min(fp32 or [t for v in got.values() for t in v])
        return {k: [0.5 * base] * len(v) if "/int8" in k else [0.8 * base] * len(v) if "/bf16" in k else v
                for k, v in got.items()}
    monkeypatch.setattr(timing, "side_by_side", scripted)


def test_int8_mixes_with_bf16_where_bf16_met_the_budget_whole(tmp_path, monkeypatch):
    """Inductor on a member that runs fp32, bf16 and int8: bf16 meets the budget over the whole graph and int8
    misses it, so the parts that stay out of int8 run bf16, not fp32; the mix wins, reloads without calibrating,
    and a warm optimize rebuilds it. A model whose int8 meets the budget is not judged at bf16 at all: bf16 raced
    slower than what already met it."""
    from conftest import POOLS
    pytest.importorskip("torchao")
    # no residual add: torchao's x86 fusion pass fails on linear -> relu -> add in int8 (a build failure DIOE
    # reports as such), which is not what this test is about
    model, x, calib = outlier_model(residual=False)
    _script_low_faster(monkeypatch)
    pool = dioe.ResourcePool.discover(POOLS / "standin-inductor-lowp.yaml")

    def optimize(m, cache):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dioe.optimize(m, (x,), hardware=pool, backends=["inductor"], precision="int8", cache_dir=cache,
                                 accuracy=dioe.Budget(cosine=0.999, samples=32), calibration=calib,
                                 settings=Settings(cache_dir=cache, mixed_parts=2))
    opt = optimize(model, tmp_path)
    by = {c.label: c for c in opt.precision_search.candidates}
    assert by["inductor@cpu0/int8"].why.startswith("misses the budget"), by
    assert by["inductor@cpu0/bf16"].report.met, by
    mix = next(c for c in by.values() if c.mix)
    assert mix.mix.high == "bf16" and mix.label.endswith("of 2 parts (rest bf16)"), mix
    assert opt.precision_search.winner == mix.label, opt.plan.summary()
    parts = opt.plan.partitions
    assert sorted(p.precision for p in parts) == ["bf16", "int8"], opt.plan.summary()
    sensitive = next(p for p in parts if any(s.endswith(":2.fc") for s in p.segments))
    assert sensitive.precision == "bf16" and sensitive.reason.startswith("bf16: at int8 alone it used"), sensitive
    assert [c.applied.split()[0] for c in opt.runtime.compiled.values()] == [p.precision for p in parts]
    y = opt(x)
    assert _cosine(y, eager(model, (x,))) > 0.999
    assert dioe.Plan.from_dict(opt.plan.to_dict()) == opt.plan
    path = opt.save(tmp_path / "mix.plan.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = dioe.load(path, model, (x,), hardware=pool, cache_dir=tmp_path)
    assert [c.precision for c in again.runtime.compiled.values()] == [p.precision for p in parts]
    torch.testing.assert_close(again(x), y)
    warm = optimize(model, tmp_path)
    assert warm.precision_search.reused and [(p.precision, p.reason) for p in warm.plan.partitions] == \
        [(p.precision, p.reason) for p in parts]
    # no outlier: int8 meets the budget whole, and bf16, raced 1.6x its time, is not judged
    plain, _, _ = outlier_model(residual=False, outlier=None)
    opt = optimize(plain, tmp_path / "plain")
    by = {c.label: c for c in opt.precision_search.candidates}
    assert by["inductor@cpu0/int8"].report.met and opt.plan.partitions[0].precision == "int8", by
    assert by["inductor@cpu0/bf16"].report is None and by["inductor@cpu0/bf16"].why == \
        "not judged: raced 1.60x the time of inductor@cpu0/int8, which met the budget", by


def _job(times):
    segs = [SimpleNamespace(id=f"s{i}") for i in range(len(times))]
    fp32 = Choice("cpu0", "onnxruntime")
    profile = SimpleNamespace(times={s.id: {fp32: SimpleNamespace(median_ms=t)} for s, t in zip(segs, times)})
    return SimpleNamespace(segments=segs, profile=profile), fp32


@pytest.mark.parametrize("times, n, want", [
    ([1, 1, 1, 1, 1, 1, 1, 1], 4, [["s0", "s1"], ["s2", "s3"], ["s4", "s5"], ["s6", "s7"]]),
    ([8, 1, 1, 1, 1, 1, 1, 1, 1], 2, [["s0"], ["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"]]),
    ([1, 1, 1], 4, [["s0"], ["s1"], ["s2"]]),
    ([0, 0, 5], 3, [["s0", "s1"], ["s2"]]),
    ([1, 1, 1, 10], 4, [["s0", "s1", "s2"], ["s3"]]),   # a heavy head makes a part of its own
])
def test_parts_are_contiguous_cover_every_segment_and_split_the_time(times, n, want):
    job, fp32 = _job(times)
    assert [list(p) for p in mixed.cut(job, fp32, n)] == want


def test_budget_used_is_the_largest_share_of_any_allowance():
    def r(metric, value, threshold):
        return MetricResult(metric, 0, value, value, value, threshold, 10, 10, True)
    report = AccuracyReport((r("cosine", 0.9995, 0.999), r("rel_l2", 0.01, 0.05), r("top1", 0.995, 0.99)), 0.95)
    assert mixed.budget_used(report) == pytest.approx(0.5)
    assert mixed.budget_used(AccuracyReport((r("rel_l2", 0.1, 0.05),), 0.95)) == pytest.approx(2.0)


def test_a_mix_record_round_trips_and_a_bad_one_is_a_clear_error():
    m = mixed.Mix(Choice("cpu0", "openvino", "int8"), (("s0", "s1"), ("s2",)), (True, False), (1.5, 2.0),
                  ("int8: cheap", "fp32: sensitive"))
    assert mixed.Mix.from_dict(m.to_dict()) == m and m.label() == "openvino@cpu0/int8 on p0 of 2 parts"
    with pytest.raises(dioe.DIOEError, match="names 2 parts but 1 precisions"):
        mixed.Mix.from_dict({**m.to_dict(), "low": [True]})
    report = AccuracyReport((MetricResult("cosine", 0, 0.9995, 0.9994, 0.999, 0.999, 8, 8, True),), 0.95)
    record = PrecisionRecord(dioe.Budget(cosine=0.999), "given",
                             (Candidate(m.option, report, "misses the budget: x"), Candidate(m.option, report, "", m)),
                             report, {FP32: 2.0, m.label(): 1.0}, m.label())
    again = PrecisionRecord.from_dict(record.to_dict(), record.budget, "verdict.json")
    assert again == replace(record, reused="verdict.json") and again.candidates[1].label == m.label()
    # the rest at bf16; a low precision that won keeps no fp32 report, and the fp32 plan cannot win without one
    bf = replace(m, high="bf16")
    assert mixed.Mix.from_dict(bf.to_dict()) == bf and bf.label() == "openvino@cpu0/int8 on p0 of 2 parts (rest bf16)"
    with pytest.raises(dioe.DIOEError, match="higher precision must be one of fp32, bf16, fp16; got 'int8'"):
        mixed.Mix.from_dict({**m.to_dict(), "high": "int8"})
    won = replace(record, fp32=None)
    assert PrecisionRecord.from_dict(won.to_dict(), record.budget, "v.json") == replace(won, reused="v.json")
    with pytest.raises(dioe.DIOEError, match="the fp32 plan won but the record has no accuracy report"):
        PrecisionRecord.from_dict(replace(won, winner=FP32).to_dict(), record.budget, "v.json")


def test_a_16_bit_float_that_a_missed_int8_of_its_engine_could_mix_with_is_judged_whatever_its_speed():
    from dioe.precision import _may_be_high
    assert _may_be_high("openvino@cpu0/bf16", ["openvino@cpu0/int8"])
    assert not _may_be_high("openvino@cpu0/bf16", ["onnxruntime@cpu0/int8"])   # another engine: no mix
    assert not _may_be_high("torch@cpu0/bf16", [])
    assert not _may_be_high("onnxruntime@cpu0/int8", ["onnxruntime@cpu0/int8"])
