"""Live re-planning: the drift detector's hysteresis, swaps under concurrent callers, and the drift drill on two
members pinned to cores of their own."""

import json
import os
import threading
import time

import pytest
import torch

import dioe
from dioe.cores import Hog
from dioe.drift import Detector, Gauge, LiveSettings
from dioe.errors import DIOEError
from dioe.plan import Choice
from dioe.planner import whole_graph_plan
from conftest import POOLS
from helpers import assert_matches_eager


# -- the detector -----------------------------------------------------------------------------------------------
def test_detector_needs_a_held_crossing_and_moves_back_below_the_lower_threshold():
    d = Detector(slow=1.5, recover=1.2, hold=3)
    assert [d.update(r) for r in (1.6, 1.7, 1.0, 1.6, 1.6)] == [None] * 5   # a broken run starts again
    assert d.update(1.9) == "drift" and d.drifted
    # between the thresholds: still drifted, however long it stays there
    assert [d.update(r) for r in (1.4, 1.3, 1.25, 1.4, 1.3, 1.25)] == [None] * 6 and d.drifted
    assert [d.update(r) for r in (1.1, 1.0, 1.15)] == [None, None, "recovered"] and not d.drifted


def test_detector_does_not_flap_on_noise():
    g = torch.Generator().manual_seed(0)
    noise = (0.1 * torch.randn(5000, generator=g)).tolist()
    spikes = (torch.rand(5000, generator=g) < 0.05).tolist()   # one reading in twenty a burst of load, at 3x
    for centre, start in ((1.0, False), (1.35, False), (1.35, True), (1.0, True)):
        d = Detector(slow=1.5, recover=1.2, hold=5, drifted=start)
        changes = [x for x in (d.update(3.0 if s and centre == 1.0 else centre + n)
                               for n, s in zip(noise, spikes)) if x]
        # undisturbed with bursts: never a drift; in the band between the thresholds: never a change either way;
        # drifted and back to 1.0: one recovery, then nothing
        assert changes == (["recovered"] if (centre, start) == (1.0, True) else []), (centre, start, changes)


def test_gauge_reference_is_the_lowest_full_window_and_is_kept_while_drifted():
    g = Gauge(3)
    for t in (2.0, 2.0):
        g.add(t)
    assert g.ratio("w", learn=True) is None            # not a full window yet
    g.add(2.0)
    assert g.ratio("w", learn=True) == 1.0
    for t in (1.0, 1.0, 1.0):
        g.add(t)
    assert g.ratio("w", learn=True) == 1.0 and g.references["w"] == 1.0
    for t in (4.0, 4.0, 4.0):
        g.add(t)
    assert g.ratio("w", learn=False) == 4.0 and g.references["w"] == 1.0
    assert g.ratio("other", learn=False) is None       # no reference for other work


@pytest.mark.parametrize("bad, message", [
    (dict(recover=1.6), "1 < recover < slow"), (dict(window=1), "window"), (dict(hold=0), "hold"),
    (dict(tick_s=0.0), "tick_s"), (dict(slow=float("nan")), "slow"), (dict(replan="yes"), "replan"),
])
def test_bad_live_settings_are_named(bad, message):
    with pytest.raises(DIOEError, match=message):
        LiveSettings(**bad)


# -- swaps under concurrent callers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_member_pool(tmp_path_factory):
    p = tmp_path_factory.mktemp("pool") / "two.yaml"
    p.write_text("pool:\n"
                 "  - {id: a, descriptor: auto, stand_in: true, threads: 1, backends: [onnxruntime]}\n"
                 "  - {id: b, descriptor: auto, stand_in: true, threads: 1, backends: [onnxruntime]}\n")
    return dioe.ResourcePool.discover(p)


@pytest.fixture(scope="module")
def tiny_mlp_opt(two_member_pool):
    model, inputs = dioe.zoo.load("tiny-mlp")
    return model, inputs, dioe.optimize(model, inputs, hardware=two_member_pool, precision="fp32", verify=False)


def test_no_call_is_lost_or_answered_twice_across_swaps(tiny_mlp_opt):
    model, inputs, opt = tiny_mlp_opt
    live = opt.go_live(tick_s=10.0)   # no readings: the swaps below are the only ones
    try:
        job = live.job
        plans = [whole_graph_plan(job, Choice(m, "onnxruntime", "fp32"), 0.0) for m in ("a", "b")]
        for plan in plans[::-1] + plans:   # built before the callers start: each swap below is the swap alone
            live.swap_to(plan, why="build")
        swapped_before = live.stats["live"]["swaps"]
        per_thread, threads = 200, 4
        results: dict[tuple[int, int], torch.Tensor] = {}
        errors = []

        def caller(t):
            try:
                for i in range(per_thread):
                    x = torch.full((1, 64), float(t * 1000 + i)) / 1000
                    out = live(x)
                    assert (t, i) not in results
                    results[(t, i)] = (x, out)
            except Exception as e:   # reported below, with the test's own assertion
                errors.append(e)

        workers = [threading.Thread(target=caller, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        swaps = 0
        while any(w.is_alive() for w in workers) and swaps < 40:
            live.swap_to(plans[(swaps + 1) % 2], why="test")
            swaps += 1
            time.sleep(0.002)
        for w in workers:
            w.join(timeout=60)
        assert not errors, errors
        assert len(results) == per_thread * threads
        with torch.inference_mode():
            for x, out in results.values():
                assert_matches_eager(model(x), out, rtol=1e-4)
        stats = live.stats["live"]
        assert stats["calls"] == per_thread * threads == sum(stats["calls_per_plan"].values())
        assert stats["swaps"] - swapped_before >= 2 and all(e["why"] in ("build", "test") for e in stats["events"])
    finally:
        live.close()


def test_the_batcher_serves_a_live_model_through_it_and_a_closed_one_refuses_calls(tiny_mlp_opt):
    from dioe.serve import Batcher

    model, inputs, opt = tiny_mlp_opt
    live = opt.go_live(tick_s=10.0)
    try:
        with Batcher(live, model=model, max_batch_size=4, max_queue_delay_ms=1) as b:
            xs = [torch.randn(1, 64) for _ in range(6)]
            outs = [b(x) for x in xs]
        with torch.inference_mode():
            for x, out in zip(xs, outs):
                assert_matches_eager(model(x), out, rtol=1e-4)
        # every batch went through the live model: its calls are counted, per plan, as a direct call's would be
        stats = live.stats["live"]
        assert stats["calls"] >= 1 and stats["calls"] == sum(stats["calls_per_plan"].values())
    finally:
        live.close()
    with pytest.raises(dioe.DIOEError, match="closed"):
        live(*inputs)


def test_swaps_are_events_in_the_trace(tiny_mlp_opt, tmp_path):
    model, inputs, opt = tiny_mlp_opt
    live = opt.go_live(tick_s=10.0)
    try:
        other = next(m for m in ("a", "b") if m not in opt.plan.members())
        with dioe.trace(tmp_path / "t.json"):
            live(*inputs)
            live.swap_to(whole_graph_plan(live.job, Choice(other, "onnxruntime", "fp32"), 0.0), why="trace check")
            live(*inputs)
        events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
        swaps = [e for e in events if e.get("name") == "live swap"]
        assert len(swaps) == 1 and swaps[0]["args"]["why"] == "trace check"
        assert {e["args"]["member"] for e in events if e.get("cat") == "partition"} == set(opt.plan.members()) | {other}
    finally:
        live.close()


def test_go_live_needs_an_optimized_model_with_its_profile(two_member_pool, tiny_mlp_opt, tmp_path):
    model, inputs, opt = tiny_mlp_opt
    loaded = dioe.load(opt.save(tmp_path), model, inputs, hardware=two_member_pool)
    with pytest.raises(DIOEError, match="needs the profile"):
        loaded.go_live()
    with pytest.raises(DIOEError, match=r"unknown live setting\(s\) \['slowness'\]"):
        opt.go_live(slowness=2)
    with pytest.raises(DIOEError, match="live must be"):
        dioe.optimize(model, inputs, hardware=two_member_pool, live="yes")
    with pytest.raises(DIOEError, match="cannot be combined"):
        dioe.optimize(model, inputs, hardware=two_member_pool, live=True, precision="live")


# -- the drill ---------------------------------------------------------------------------------------------------
def _drive(live, inputs, seconds):
    """Call `live` back to back for `seconds`; the latencies (s)."""
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        live(*inputs)
        out.append(time.perf_counter() - t)
    return out


def _events(live):
    return [(e["event"], e.get("member"), e.get("plan_to"), e.get("why", "")[:160]) for e in live.stats["live"]["events"]]


def _until(live, inputs, what, limit_s):
    """Call `live` until an event `what` is recorded; the seconds it took, or None within `limit_s`."""
    t0, seen = time.monotonic(), len(live.stats["live"]["events"])
    while time.monotonic() - t0 < limit_s:
        _drive(live, inputs, 0.2)
        if any(e["event"] == what for e in live.stats["live"]["events"][seen:]):
            return time.monotonic() - t0
    return None


@pytest.mark.models
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or not {0, 1} <= os.sched_getaffinity(0),
                    reason="needs cores 0 and 1")
def test_drift_drill_moves_off_a_taken_core_and_back():
    """Two stand-in members on cores of their own; eight busy processes take the core of the member the plan runs
    on. Thresholds for a machine others load too: a member drifts at 2x, is back at 1.5x of the others."""
    model, inputs = dioe.zoo.load("tiny-mlp", batch=256)
    settings = LiveSettings(slow=2.0, recover=1.5, hold=5, min_dwell_s=1.0)
    live = dioe.optimize(model, inputs, hardware=POOLS / "standin-cores.yaml", precision="fp32", live=settings)
    try:
        first = live.plan.partitions[0].member
        _drive(live, inputs, 2.0)
        with Hog(core=live.pool[first].cores[0], seconds=60, procs=8):
            took = _until(live, inputs, "swap", 20.0)
            events = live.stats["live"]["events"]
            assert took is not None, _events(live)
            assert first not in live.plan.members()
            drift = next(e for e in events if e["event"] == "drift")
            assert drift["member"] == first and drift["ratio"] >= 2.0 and first in drift["why"]
            _drive(live, inputs, 3.0)
            # no flapping: while its core is taken, no plan puts work on it again
            during = live.stats["live"]["events"]
            assert not [e for e in during if e["event"] == "swap" and f"@{first}/" in e["plan_to"]], _events(live)
        t0 = time.monotonic()
        while live.plan.members() != (first,) and time.monotonic() - t0 < 45.0:
            _drive(live, inputs, 0.2)
        assert live.plan.members() == (first,), _events(live)       # back on the plan optimize chose
        back = [e for e in live.stats["live"]["events"] if e["event"] == "recovered" and e["member"] == first]
        assert back and "recovered" in back[0]["why"], _events(live)
        stats = live.stats["live"]
        assert stats["calls"] == sum(stats["calls_per_plan"].values())
        with torch.inference_mode():
            assert_matches_eager(model(*inputs), live(*inputs), rtol=1e-4)
    finally:
        live.close()
