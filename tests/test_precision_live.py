"""optimize(precision="live"): fp32 serves at once, a lower precision is built from served inputs in the background,
shadow-tested on held-apart ones, promoted when it meets the budget and races faster, and demoted when the inputs
drift. The side-by-side timing is scripted to favour int8 where a test needs a promotion (this CPU's int8 may or
may not win on a model this small); every accuracy judged is real."""

import dataclasses
import threading
import time
import warnings

import pytest
import torch
from helpers import eager, outlier_model, script_int8_faster

import dioe
from dioe import precision as precisions
from dioe.accuracy import evaluate
from dioe.calibration import digest
from dioe.reservoir import Reservoir

BUDGET = dict(cosine=0.99, samples=32)


@pytest.fixture
def int8_is_faster(monkeypatch):
    script_int8_faster(monkeypatch, 0.1)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval(), \
        torch.randn(2, 32)


def _live(model, x, backend, **settings):
    # a short race: the timing is scripted, and every timed round of a tiny model is noise on a loaded machine
    s = dioe.Settings(**{"live_after_calls": 8, "live_shadow_every": 1, "calibration_samples": 16,
                         "timing_budget_s": 0.2, "race_rounds": 2, "race_extra": 0, "race_repeats": 20, **settings})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dioe.optimize(model, (x,), backends=[backend], precision="live", settings=s,
                             accuracy=dioe.Budget(**BUDGET))


def _serve_until(opt, state, inputs, limit=400):
    """Call `opt` on `inputs()` until the live state is `state` (or a build is due); the calls it made."""
    served = []
    for _ in range(limit):
        if opt.live.state != "sampling":
            break
        x = inputs()
        served.append(x)
        opt(x)
    assert opt.live.wait(120), "the background work did not end in time"
    assert opt.live.state == state, opt.stats["precision"]
    return served


def test_serves_fp32_then_promotes_from_served_inputs_and_demotes_a_corrupt_candidate(int8_is_faster):
    model, x = _mlp()
    opt = _live(model, x, "onnxruntime")
    try:
        safe = opt.live.safe
        assert [p.precision for p in opt.plan.partitions] == ["fp32"] and opt.live.state == "sampling"
        torch.testing.assert_close(opt(x), safe.runtime.run([x])[0], rtol=0, atol=0)
        g = torch.Generator().manual_seed(1)
        with dioe.trace() as tr:
            served = _serve_until(opt, "promoted", lambda: torch.randn(2, 32, generator=g))
        # calibrated and shadow-tested on served inputs, never the same one in both
        samples = opt.live.samples
        cal, shadow = {digest(s) for s in samples.calibrate}, {digest(s) for s in samples.holdout}
        assert len(cal) == 16 and len(shadow) == 16 and not cal & shadow
        assert cal | shadow <= {digest((s,)) for s in [x, *served]}
        # what serves now is the int8 candidate: its outputs, and within the budget of eager on fresh inputs
        (p,) = opt.plan.partitions
        assert (p.backend, p.precision) == ("onnxruntime", "int8") and "met the budget" in p.reason, p
        cand = opt.live.candidate
        fresh = [torch.randn(2, 32, generator=g) for _ in range(16)]
        got = [(opt(f),) for f in fresh]
        for f, (y,) in zip(fresh, got):
            torch.testing.assert_close(y, cand.runtime.run([f])[0], rtol=0, atol=0)
        assert evaluate(dioe.Budget(**BUDGET), [(eager(model, (f,)),) for f in fresh], got).met
        stats = opt.stats["precision"]
        assert stats["serving"].endswith("/int8") and stats["state"] == "promoted", stats
        assert [e["event"] for e in stats["events"]] == ["testing", "promoted"], stats["events"]
        assert stats["counts"]["promotions"] == 1 and stats["counts"]["calls_lowp"] >= 16
        events = [r for r in tr.records if r["kind"] == "precision"]
        assert [r["event"] for r in events] == ["testing", "promoted"] and "met the budget" in events[1]["why"]
        assert any(e.get("cat") == "precision" for e in tr.to_chrome()["traceEvents"])
        # an engine that starts computing something else is caught by the shadow checks and demoted
        c = cand.runtime.compiled["p0"]
        cand.runtime.replace("p0", dataclasses.replace(c, fn=lambda *a: [y + 3 * torch.randn_like(y)
                                                                          for y in c.fn(*a)]))
        for _ in range(64):
            opt(torch.randn(2, 32, generator=g))
            if opt.live.state != "promoted":
                break
        assert opt.live.wait(60) and opt.live.state == "sampling", opt.stats["precision"]
        events = opt.stats["precision"]["events"]
        assert events[-1]["event"] == "demoted" and "miss the budget" in events[-1]["why"], events[-1]
        assert [p.precision for p in opt.plan.partitions] == ["fp32"] and opt.live.candidate is None
        torch.testing.assert_close(opt(x), safe.runtime.run([x])[0], rtol=0, atol=0)
    finally:
        opt.close()
    assert not opt.live._thread.is_alive()
    with pytest.raises(dioe.DIOEError, match="this live model is closed"):
        opt(x)


def test_an_int8_graph_that_misses_the_budget_whole_is_promoted_as_a_mix(int8_is_faster, tmp_path):
    """Live, as at optimize: int8 over the whole graph misses the budget on the shadow samples, so the part holding
    the wide-range block stays fp32 and the others run int8; that mix is what is promoted."""
    model, x, _ = outlier_model()
    s = dioe.Settings(live_after_calls=8, live_shadow_every=1, calibration_samples=16, timing_budget_s=0.2,
                      race_rounds=2, race_extra=0, race_repeats=20, cache_dir=tmp_path)
    budget = dioe.Budget(cosine=0.999, samples=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dioe.optimize(model, (x,), backends=["onnxruntime"], precision="live", settings=s, accuracy=budget)
    try:
        g = torch.Generator().manual_seed(1)
        _serve_until(opt, "promoted", lambda: torch.randn(2, 64, generator=g))
        parts = opt.plan.partitions
        assert len(parts) >= 2 and {p.precision for p in parts} == {"int8", "fp32"}, opt.plan.summary()
        sensitive = next(p for p in parts if any(seg.endswith(":2.fc") for seg in p.segments))
        assert sensitive.precision == "fp32", opt.plan.summary()
        stats = opt.stats["precision"]
        assert stats["events"][-1]["event"] == "promoted" and "mixed precision" in stats["events"][-1]["why"]
        assert stats["serving"] == f"{len(parts)}-partition fp32+int8 plan", stats["serving"]
        fresh = [torch.randn(2, 64, generator=g) for _ in range(16)]
        assert evaluate(budget, [(eager(model, (f,)),) for f in fresh], [(opt(f),) for f in fresh]).met
    finally:
        opt.close()


def test_inputs_that_drift_from_the_int8_calibration_demote_it(int8_is_faster):
    """OpenVINO's int8 (NNCF) fixes activation ranges from the calibration samples: inputs forty times larger
    saturate them, and the shadow checks see it."""
    model, x = _mlp()
    opt = _live(model, x, "openvino")
    try:
        g = torch.Generator().manual_seed(2)
        _serve_until(opt, "promoted", lambda: torch.randn(2, 32, generator=g))
        assert opt.plan.partitions[0].precision == "int8"
        for _ in range(64):
            opt(40 * torch.randn(2, 32, generator=g))
            if opt.live.state != "promoted":
                break
        assert opt.live.wait(60), opt.stats["precision"]
        stats = opt.stats["precision"]
        assert stats["counts"]["demotions"] == 1 and stats["events"][-1]["event"] == "demoted", stats
        assert "drifted" in stats["events"][-1]["why"] and "NOT met" in stats["events"][-1]["why"]
        assert opt.plan.partitions[0].precision == "fp32"
        torch.testing.assert_close(opt(x), eager(model, (x,)), rtol=1e-4, atol=1e-5)
    finally:
        opt.close()


def test_callers_keep_being_served_during_the_build_and_get_each_answer_once_across_the_switch(
        int8_is_faster, monkeypatch):
    real_judge = precisions.judge
    gate = threading.Event()

    def held(*args, **kwargs):  # the build waits until the test has seen calls served meanwhile
        assert gate.wait(120)
        return real_judge(*args, **kwargs)
    monkeypatch.setattr(precisions, "judge", held)
    model, x = _mlp()
    opt = _live(model, x, "onnxruntime", live_shadow_every=4)
    answers, failures = [], []
    deadline = time.monotonic() + 180

    def caller(k):
        g = torch.Generator().manual_seed(100 + k)
        after = 0
        try:
            while after < 20 and time.monotonic() < deadline:
                xi = torch.randn(2, 32, generator=g)
                answers.append((xi, opt(xi)))
                after += opt.live.state == "promoted"
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(e)
    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        while opt.live.state == "sampling" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert opt.live.state == "testing"
        n = len(answers)
        while len(answers) < n + 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(answers) >= n + 20 and opt.live.state == "testing", "calls waited for the build"
        gate.set()
        for t in threads:
            t.join(200)
        assert not failures, failures
        assert opt.live.state == "promoted", opt.stats["precision"]
        counts = opt.stats["precision"]["counts"]
        assert counts["calls"] == len(answers) and 0 < counts["calls_lowp"] < len(answers), counts
        for xi, y in answers:  # each caller's answer is its own input's, within int8's error of eager
            ref = eager(model, (xi,))
            cos = torch.nn.functional.cosine_similarity(y, ref, dim=-1)
            assert (cos > 0.98).all(), cos
    finally:
        gate.set()
        opt.close()


def test_bad_arguments_are_clear_errors():
    model, x = _mlp()
    with pytest.raises(dioe.DIOEError, match=r"precision='live' calibrates on the inputs it serves"):
        dioe.optimize(model, (x,), precision="live", calibration=[(x,)])
    with pytest.raises(dioe.DIOEError, match=r"precision must be one of .*live; got 'lve'"):
        dioe.optimize(model, (x,), precision="lve")
    for knob in ("live_after_calls", "live_shadow_every", "live_attempts"):
        with pytest.raises(dioe.DIOEError, match=rf"Settings.{knob} must be"):
            dioe.Settings(**{knob: 0})
    with pytest.raises(dioe.DIOEError, match=r"16 calls to calibrate and 16 to shadow-test on, 256 B each: 8.0 KiB, "
                                             r"over the cap of 1.0 KiB \(Settings.live_sample_bytes\)"):
        Reservoir((x,), n_calibrate=16, n_shadow=16, max_bytes=1024)


def test_the_reservoir_stays_bounded_uniform_and_disjoint():
    x = torch.zeros(2, 4)
    r = Reservoir((x,), n_calibrate=8, n_shadow=4, max_bytes=2 ** 20, seed=3)
    for i in range(2000):
        r.offer(lambda: (torch.full((2, 4), float(i % 1000)),))   # every item seen twice
    s = r.snapshot()
    assert (len(s.calibrate), len(s.holdout)) == (8, 4) and r.stats()["bytes"] == 12 * x.numel() * 4
    values = [int(t[0][0, 0]) for t in s.calibrate + s.holdout]
    assert len(set(values)) == 12, "the two parts share no input, and neither holds one twice"
    assert max(values) >= 500, "a reservoir keeps late calls too, not the first ones only"
    r.reset()
    assert not r.full and r.stats()["offered"] == 0


def test_the_batcher_serves_a_live_model_through_its_switching(int8_is_faster):
    """The batcher runs its stacked batches through `opt.runtime.run`: they are sampled, and promoted, the same
    way as direct calls."""
    from dioe.serve import Batcher

    model, x = _mlp()
    opt = _live(model, x, "onnxruntime")
    try:
        g = torch.Generator().manual_seed(3)
        with Batcher(opt, max_batch_size=2, preferred_batch_sizes=(2,)) as b:
            for _ in range(400):
                xi = torch.randn(2, 32, generator=g)
                torch.testing.assert_close(b(xi), opt.live.serving.runtime.run([xi])[0], rtol=0, atol=0)
                if opt.live.state != "sampling":
                    break
            assert opt.live.wait(120) and opt.live.state == "promoted", opt.stats["precision"]
            assert opt.stats["precision"]["counts"]["sampled"] >= 32
            torch.testing.assert_close(b(x), opt.live.candidate.runtime.run([x])[0], rtol=0, atol=0)
    finally:
        opt.close()


def test_a_live_model_dropped_unclosed_stops_its_thread():
    import gc

    model, x = _mlp()
    opt = _live(model, x, "onnxruntime")
    thread = opt.live._thread
    opt(x)
    assert thread.is_alive()
    del opt
    gc.collect()
    thread.join(30)
    assert not thread.is_alive()
