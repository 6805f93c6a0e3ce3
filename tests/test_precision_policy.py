"""optimize(precision=..., accuracy=..., calibration=...): lower precisions chosen under an accuracy budget, the
budget's verdict kept in the plan, and an int8 plan saved and loaded again without calibrating anew."""

import importlib.util
import warnings

import pytest
import torch
from helpers import assert_matches_eager, eager, script_int8_faster

import dioe
from dioe import integrity
from dioe.accuracy import AccuracyReport
from dioe.precision import FP32


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval(), \
        torch.randn(2, 32)


def test_unknown_precision_and_budget_are_clear_errors():
    model, x = _mlp()
    with pytest.raises(dioe.DIOEError,
                       match=r"precision must be one of auto, fp32, bf16, fp16, int8, live; got 'fp64'"):
        dioe.optimize(model, (x,), precision="fp64")
    with pytest.raises(dioe.DIOEError, match=r"accuracy must be a dioe.Budget"):
        dioe.optimize(model, (x,), accuracy="cosine>=0.999")
    with pytest.raises(dioe.DIOEError, match=r"top1, cosine, rel_l2"):
        dioe.Budget(sqnr=30)


def test_a_budget_no_lower_precision_meets_keeps_fp32_and_says_why(tmp_path, monkeypatch):
    model, x = _mlp()
    script_int8_faster(monkeypatch)   # so that int8 races faster than fp32 and is judged
    calib = [(torch.randn(2, 32),) for _ in range(64)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dioe.optimize(model, (x,), backends=["onnxruntime"], precision="int8", cache_dir=tmp_path,
                            accuracy=dioe.Budget(rel_l2=1e-5, samples=32), calibration=calib)
    search = opt.precision_search
    assert search is not None and search.source == "given" and search.winner == FP32
    assert search.candidates and not search.kept, search
    whole = [c for c in search.candidates if not c.why.startswith("mixed with fp32: ")]
    for c in whole:
        assert c.report is not None and not c.report.met and c.why.startswith("misses the budget"), c
    # each whole graph that missed was also tried mixed with fp32: no mix met it
    assert len(search.candidates) == 2 * len(whole) and all(c.mix is None for c in search.candidates), search
    assert [p.precision for p in opt.plan.partitions] == ["fp32"]
    assert AccuracyReport.from_dict(opt.plan.accuracy).met, "the fp32 plan itself meets it"
    assert any(n.startswith("no lower precision both gained over the fp32 plan and met the budget")
               for n in opt.plan.notes), opt.plan.notes
    assert_matches_eager(eager(model, (x,)), opt(x))


@pytest.mark.parametrize("backend", ["openvino"] + (["inductor"] if importlib.util.find_spec("torchao") else []))
def test_an_int8_plan_round_trips_and_reloads_without_calibrating(backend, tmp_path, monkeypatch):
    """int8 made the winner by scripting the side-by-side timing (its accuracy is real): the plan keeps its
    accuracy report and calibration key, and a reload reuses the quantized artifact instead of calibrating."""
    model, x = _mlp()
    script_int8_faster(monkeypatch)
    calib = [(torch.randn(2, 32),) for _ in range(64)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dioe.optimize(model, (x,), backends=[backend], precision="int8", cache_dir=tmp_path,
                            accuracy=dioe.Budget(cosine=0.99, samples=32), calibration=calib)
    (p,) = opt.plan.partitions
    assert (p.backend, p.precision) == (backend, "int8") and p.calibration, opt.plan.summary()
    assert opt.precision_search.winner == p.choice.label()
    (c,) = opt.runtime.compiled.values()
    assert c.applied.startswith("int8") and c.notes["quantized_ops"] > 0, (c.applied, c.notes)
    report = AccuracyReport.from_dict(opt.plan.accuracy)
    assert report.met and all(r.metric == "cosine" for r in report.results)
    plan = dioe.Plan.from_dict(opt.plan.to_dict())
    assert plan == opt.plan and plan.to_dict() == opt.plan.to_dict()
    path = opt.save(tmp_path / "mlp.plan.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: the artifact is found by its key
        again = dioe.load(path, model, (x,), hardware=opt.runtime.pool, cache_dir=tmp_path)
    (c2,) = again.runtime.compiled.values()
    assert (c2.precision, c2.notes["calibration_samples"]) == ("int8", 0), c2.notes
    torch.testing.assert_close(again(x), opt(x), rtol=0, atol=0)
    # with the artifact gone, the reload says so and runs the partition on torch rather than calibrate blind
    with pytest.warns(RuntimeWarning, match=r"int8 model this plan was calibrated for .* is not in the cache"):
        fresh = dioe.load(path, model, (x,), hardware=opt.runtime.pool, cache_dir=tmp_path / "empty")
    assert_matches_eager(eager(model, (x,)), fresh(x))


def test_the_main_job_shows_fp32_eager_and_dioe_with_its_accuracy(tmp_path, capsys):
    from dioe.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["optimize", "tiny-mlp", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "torch eager fp32" in out and "DIOE " in out, out
    assert "accuracy against fp32 eager on held-out inputs:" in out, out
    plan = dioe.Plan.load(tmp_path / "tiny-mlp.plan.json")
    assert plan.accuracy is not None and AccuracyReport.from_dict(plan.accuracy).met


def test_what_optimize_picks_itself_never_fails_a_model_that_fp32_serves(tmp_path):
    """A single score per row has no top-1 to agree on, and a constant example input gives no distinct inputs to
    generate: the default budget and generated inputs adapt, or the stage steps aside with a warning."""
    one_score = torch.nn.Linear(16, 1).eval()
    x = torch.randn(8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dioe.optimize(one_score, (x,), backends=["onnxruntime"], cache_dir=tmp_path)
    assert opt.precision_search is not None and "top1" not in opt.precision_search.budget.metrics
    assert_matches_eager(eager(one_score, (x,)), opt(x), rtol=0.1)
    model, _ = _mlp()
    zeros = torch.zeros(2, 32)
    with pytest.warns(RuntimeWarning, match=r"precision auto not tried: calibration data has 1 distinct item"):
        opt = dioe.optimize(model, (zeros,), backends=["onnxruntime"], cache_dir=tmp_path)
    assert [p.precision for p in opt.plan.partitions] == ["fp32"] and opt.precision_search is None
    assert_matches_eager(eager(model, (zeros,)), opt(zeros))


def test_bad_calibration_and_positional_budget_are_clear_errors():
    model, x = _mlp()
    with pytest.raises(dioe.DIOEError, match=r"calibration must be None, an iterable of input tuples"):
        dioe.optimize(model, (x,), calibration=5)
    with pytest.raises(dioe.DIOEError, match=r"Budget takes keywords"):
        dioe.Budget(0.999)
    with pytest.raises(dioe.DIOEError, match=r"Settings.race_rounds must be a whole number"):
        dioe.Settings(race_rounds=2.5)


def test_a_warm_optimize_reuses_the_precision_verdict_and_searches_again_when_it_no_longer_holds(tmp_path,
                                                                                                  monkeypatch):
    """The second optimize of the same model, budget and calibration judges nothing again: it rebuilds the
    winner from its cached artifact, checks one held-out input against what the search measured, and times it.
    A verdict whose measured worst sample the engine no longer reproduces is searched again."""
    import json

    from dioe import precision as precisions
    from dioe import precision_warm, reload
    model, x = _mlp()
    # far faster: the warm start times the winner beside eager and checks it against the fp32 plan's searched time
    script_int8_faster(monkeypatch, factor=0.01)
    calib = [(torch.randn(2, 32),) for _ in range(64)]
    kw = dict(backends=["onnxruntime"], precision="int8", cache_dir=tmp_path,
              accuracy=dioe.Budget(cosine=0.99, samples=32), calibration=calib)
    judged = []
    real_evaluate = precisions.evaluate
    for module in (precisions, precision_warm):
        monkeypatch.setattr(module, "evaluate",
                            lambda b, ref, got: judged.append(len(ref)) or real_evaluate(b, ref, got))
    examples = []   # calls on the inputs a load makes up: the search measures them once, in the verdict
    real_example = reload.example_accuracy
    monkeypatch.setattr(reload, "example_accuracy", lambda *a: examples.append(1) or real_example(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cold = dioe.optimize(model, (x,), **kw)
        cold_judged, judged[:] = list(judged), []
        assert examples == [1] and cold.plan.accuracy["example"], cold.plan.accuracy
        with dioe.trace(None) as tr:
            warm = dioe.optimize(model, (x,), **kw)
    assert examples == [1], "the warm optimize measured the example agreement again"
    stages = [r["name"] for r in tr.records if r["kind"] == "stage"]
    assert "precision: warm start" in stages and "compile" not in stages, f"the fp32 plan was built again: {stages}"
    assert warm.plan.eager_ms and warm.plan.measured_ms and warm.race.reused
    assert cold.precision_search.reused is None and max(cold_judged) > 1
    assert warm.precision_search.reused and warm.precision_search.winner == cold.precision_search.winner
    assert judged == [1], "a warm optimize judges one held-out input, not the held-out set"
    assert [p.choice for p in warm.plan.partitions] == [p.choice for p in cold.plan.partitions]
    assert warm.plan.accuracy == cold.plan.accuracy and any("verdict reused" in n for n in warm.plan.notes)
    torch.testing.assert_close(warm(x), cold(x), rtol=0, atol=0)
    # a verdict saved before winners recorded their example agreement: measured once, then kept in it
    (path,) = (tmp_path / "profiles").glob("*.precision.json")
    data = json.loads(path.read_text())
    for c in data["record"]["candidates"]:
        c.pop("example", None)
    path.write_text(integrity.dumps_checked(data))
    examples[:] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            again = dioe.optimize(model, (x,), **kw)
            assert again.precision_search.reused and again.plan.accuracy == cold.plan.accuracy
    assert examples == [1], examples
    # a verdict whose worst sample the engine cannot reproduce (here: claimed better than exact) is not trusted
    data = json.loads(path.read_text())
    for c in data["record"]["candidates"]:
        for r in (c["report"] or {"results": []})["results"]:
            r["worst"] = 2.0
    path.write_text(integrity.dumps_checked(data))  # whole by its checksum: the engine's check is what refuses it
    judged[:] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = dioe.optimize(model, (x,), **kw)
    assert again.precision_search.reused is None and max(judged) > 1


def test_a_winner_the_warm_start_steps_aside_from_is_raced_by_the_search_without_being_built_again(tmp_path,
                                                                                                   monkeypatch):
    """Timed beside eager, the rebuilt winner is scripted slower than the fp32 plan's searched time, so the warm
    start steps aside; raced against the compiled fp32 plan it is scripted faster, so the search's reuse keeps it.
    It is rebuilt and checked once, by the warm start, and handed on."""
    from dioe import precision_warm, timing
    model, x = _mlp()
    calib = [(torch.randn(2, 32),) for _ in range(64)]
    kw = dict(backends=["onnxruntime"], precision="int8", cache_dir=tmp_path,
              accuracy=dioe.Budget(cosine=0.99, samples=32), calibration=calib)
    script_int8_faster(monkeypatch, factor=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cold = dioe.optimize(model, (x,), **kw)
    assert cold.precision_search.winner != FP32, cold.plan.summary()
    scripted = timing.side_by_side

    def beside_eager_slow(runs, flat, **kw2):
        got = scripted(runs, flat, **kw2)
        if "torch eager" in got and any("/int8" in k for k in got):
            return {k: [1e3] * len(v) if "/int8" in k else v for k, v in got.items()}
        return got
    monkeypatch.setattr(timing, "side_by_side", beside_eager_slow)
    rebuilt = []
    real_rebuilt = precision_warm._rebuilt
    monkeypatch.setattr(precision_warm, "_rebuilt", lambda *a: rebuilt.append(1) or real_rebuilt(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with dioe.trace(None) as tr:
            warm = dioe.optimize(model, (x,), **kw)
    stages = [r["name"] for r in tr.records if r["kind"] == "stage"]
    assert "precision: warm start" in stages and "compile" in stages, stages
    assert rebuilt == [1], "the winner was built and checked again after the warm start"
    assert warm.precision_search.reused and warm.precision_search.winner == cold.precision_search.winner
    assert [p.choice for p in warm.plan.partitions] == [p.choice for p in cold.plan.partitions]
    torch.testing.assert_close(warm(x), cold(x), rtol=0, atol=0)


def test_a_one_shot_calibration_iterator_is_read_once_when_the_warm_start_steps_aside(tmp_path):
    """A warm optimize draws its samples once, whether the warm start or the search asks first: here the cached
    verdict kept fp32 (a budget int8 cannot meet), so the warm start steps aside and the search reuses the verdict
    from the same samples, not from the iterator's next items."""
    from dioe.precision_record import FP32
    model, x = _mlp()
    calib = [(torch.randn(2, 32),) for _ in range(64)]
    kw = dict(backends=["onnxruntime"], precision="int8", cache_dir=tmp_path,
              accuracy=dioe.Budget(cosine=0.9999999, samples=32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cold = dioe.optimize(model, (x,), calibration=iter(calib), **kw)
        warm = dioe.optimize(model, (x,), calibration=iter(calib), **kw)
    assert cold.precision_search.winner == FP32 and cold.precision_search.reused is None
    assert warm.precision_search.winner == FP32 and warm.precision_search.reused
