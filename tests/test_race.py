"""After building: the plan's measurement, the race against eager and the whole-graph rivals, its verdict and the
cache of that verdict. Most races here are scripted through `dioe.timing.side_by_side`; `opt.race` (a
RaceRecord) is what they are checked on."""

import statistics

import pytest
import torch

import dioe
import dioe.build
import dioe.race
import dioe.timing
from dioe.plan import Choice
from dioe.race import EAGER, PLAN
from dioe.settings import Settings
from dioe.text import round_ms, show_ms

from helpers import assert_matches_eager, eager, five_layers, force_split, prediction_holds

BACKENDS = ["torch", "onnxruntime"]


def _check_record(opt):
    """What every race record holds: each contender's fast half and median come from its own rounds, and the plan
    records the winner's median and eager's, from those same rounds."""
    r = opt.race
    assert r is not None and PLAN in r.rounds and EAGER in r.rounds, r
    assert set(r.fast_ms) == set(r.rounds) <= set(r.median_ms) and r.winner in r.rounds, r
    for k, rounds in r.rounds.items():
        assert r.fast_ms[k] == pytest.approx(dioe.timing.fast_half(rounds)), k
        assert r.median_ms[k] == pytest.approx(statistics.median(rounds)), k
        assert r.fast_ms[k] <= r.median_ms[k], (k, rounds)
    assert opt.plan.eager_ms == round_ms(r.median_ms[EAGER]), (opt.plan.eager_ms, r)
    assert opt.plan.measured_ms == round_ms(r.median_ms[r.winner]), (opt.plan.measured_ms, r)
    assert set(r.extra_rounds) <= set(r.rounds) and len(r.extra_rounds) != 1, r
    return r


def test_the_race_times_eager_beside_the_plan(cpu):
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(4, 32)
    opt = dioe.optimize(model, (x,), backends=BACKENDS, precision="fp32")
    p = opt.plan
    assert p.eager_ms is not None and p.measured_ms is not None
    r = _check_record(opt)
    assert r.reused is None, "a cold optimize races"
    # the winner is the fastest by its faster half of rounds, unless the split margin kept one engine
    assert r.kept_over_split or all(r.fast_ms[r.winner] <= v for k, v in r.fast_ms.items() if k != EAGER), r
    if len(p.partitions) == 1:  # one partition: its time is the plan's, from the same rounds, and so is its forecast
        assert p.partitions[0].measured_ms == p.measured_ms, p.summary()
        assert p.partitions[0].predicted_ms == pytest.approx(p.predicted_ms, rel=1e-3), p.summary()
    assert_matches_eager(eager(model, (x,)), opt(x))


@pytest.mark.parametrize("plan_ms, winner", [(10.0, "onnxruntime"), (9.5, "split")])
def test_a_split_plan_must_clearly_beat_the_best_single_engine(cpu, tmp_path, monkeypatch, plan_ms, winner):
    # The prediction holds, so no re-plan times the split plan's partitions: they are timed alone only if it wins.
    prediction_holds(monkeypatch, force_split(monkeypatch, cpu.id))
    times = {PLAN: plan_ms, "onnxruntime": 10.2, "torch": 10.25, EAGER: 20.0}
    calls = []

    def scripted(runs, flat, *, rounds, repeats, budget_s, warm=False):
        calls.append((sorted(runs), rounds))
        # noisy rounds, with each contender's median where `times` puts it: the close ones' rounds overlap
        return {k: [(times.get(k) or times[k.split("@")[0]]) + d for d in (0.0, 0.5, -0.3)][:rounds] for k in runs}
    monkeypatch.setattr(dioe.timing, "side_by_side", scripted)
    timed_alone, real_time_partitions = [], dioe.race.time_partitions

    def spy(o, *a, **k):
        if len(o.program.steps) > 1:
            timed_alone.append(len(o.program.steps))
        return real_time_partitions(o, *a, **k)
    monkeypatch.setattr(dioe.race, "time_partitions", spy)
    model, x = five_layers()
    settings = Settings(cache_dir=tmp_path)
    opt = dioe.optimize(model, (x,), backends=BACKENDS, settings=settings, precision="fp32")
    r = _check_record(opt)
    # the race, then more rounds for the contenders within 10% of the leader only (eager, 2x behind, is not)
    assert len(calls) == 2 and EAGER in calls[0][0] and EAGER not in calls[1][0], calls
    assert calls[0][1] == settings.race_rounds and calls[1][1] == settings.race_extra, calls
    assert sorted(r.extra_rounds) == calls[1][0] and PLAN in r.extra_rounds, (r, calls)
    assert not opt.plan.replanned, opt.plan.summary()
    ort = Choice(cpu.id, "onnxruntime").label()
    assert ort in r.rounds, r
    if winner == "split":
        assert r.winner == PLAN and not r.kept_over_split, r
        assert len(opt.plan.partitions) > 1 and opt.plan.measured_ms == 9.5
        assert timed_alone == [len(opt.plan.partitions)], timed_alone
        assert all(p.measured_ms is not None for p in opt.plan.partitions), opt.plan.summary()
    else:
        assert r.winner == ort and r.kept_over_split, r
        assert r.fast_ms[PLAN] < r.fast_ms[ort] <= r.fast_ms[PLAN] * (1 + settings.split_margin), r
        assert timed_alone == [], timed_alone
        (p,) = opt.plan.partitions
        assert p.backend == "onnxruntime" and opt.plan.measured_ms == 10.2
        assert p.reason.startswith("kept over the split plan (9.80 ms") and p.runner_up.backend == "torch", p
    assert_matches_eager(eager(model, (x,)), opt(x))


def _race_warm_flags(monkeypatch) -> list:
    """The `warm` flag of every side-by-side timing the race runs, in order; the timings themselves are real."""
    real, seen = dioe.timing.side_by_side, []

    def spy(runs, flat, **k):
        seen.append(k.get("warm", False))
        return real(runs, flat, **k)
    monkeypatch.setattr(dioe.timing, "side_by_side", spy)
    return seen


def test_a_reused_verdict_warms_up_a_plan_verification_did_not_run(cpu, tmp_path, monkeypatch):
    """A plan of one partition on torch at the reference is not run by verification: when a warm optimize reuses
    the race's verdict for it, the race warms it up first."""
    seen = _race_warm_flags(monkeypatch)
    model, x = five_layers()
    first = dioe.optimize(model, (x,), backends=["torch"], cache_dir=tmp_path, precision="fp32")
    assert first.race.reused is None
    seen.clear()
    opt = dioe.optimize(model, (x,), backends=["torch"], cache_dir=tmp_path, precision="fp32")
    assert opt.race.reused is not None and (tmp_path / "profiles" / opt.race.reused).is_file(), opt.race
    assert set(opt.race.rounds) == {PLAN, EAGER} and opt.race.winner == PLAN, opt.race
    assert any(n.startswith(f"race verdict reused from {opt.race.reused}") for n in opt.plan.notes), opt.plan.notes
    assert seen == [False], seen


@pytest.mark.parametrize("rival_rounds, extra", [((10.5, 10.6, 10.7), False), ((10.1, 10.6, 10.7), True)])
def test_a_contender_slower_in_every_round_gets_no_extra_rounds(cpu, tmp_path, monkeypatch, rival_rounds, extra):
    """Within race_close of the leader, a rival still gets the extra rounds only if one of its rounds was as fast
    as one of the leader's."""
    # a split plan, raced against ONNX Runtime over the whole graph; its halved prediction must not trigger a
    # re-plan, which on a busy machine can make the plan ONNX Runtime over the whole graph and leave it no such
    # rival (seen once in CI)
    prediction_holds(monkeypatch, force_split(monkeypatch, cpu.id))
    calls = []

    def scripted(runs, flat, *, rounds, repeats, budget_s, warm=False):
        calls.append(sorted(runs))
        return {k: ([10.0, 10.2, 10.4] if k == PLAN else list(rival_rounds) if k != EAGER
                    else [30.0] * 3)[:rounds] for k in runs}
    monkeypatch.setattr(dioe.timing, "side_by_side", scripted)
    model, x = five_layers()
    opt = dioe.optimize(model, (x,), backends=BACKENDS, cache_dir=tmp_path, precision="fp32")
    ort = Choice(cpu.id, "onnxruntime").label()
    assert ort in calls[0] and len(calls) == (2 if extra else 1), calls
    r = _check_record(opt)
    if extra:
        assert PLAN in calls[1] and EAGER not in calls[1] and len(calls[1]) >= 2, calls
        assert ort in r.extra_rounds and PLAN in r.extra_rounds and len(r.rounds[ort]) == 6, r
        # its faster half over six rounds is within the split margin of the split plan's: it is kept
        assert r.winner == ort and r.kept_over_split, r
    else:
        assert r.extra_rounds == () and len(r.rounds[ort]) == 3, r
        assert r.winner == PLAN and not r.kept_over_split, r
    assert_matches_eager(eager(model, (x,)), opt(x))


def _the_first_plan_loses(monkeypatch):
    """Script the race: the first plan 10 ms, eager 6 ms, each whole-graph rival 4 ms, 4.5 ms, ... (distinct)."""
    def scripted(runs, flat, *, rounds, repeats, budget_s, warm=False):
        rivals = sorted(k for k in runs if k not in (PLAN, EAGER))
        ms = {PLAN: 10.0, EAGER: 6.0, **{k: 4.0 + 0.5 * i for i, k in enumerate(rivals)}}
        return {k: [ms[k]] * rounds for k in runs}
    monkeypatch.setattr(dioe.timing, "side_by_side", scripted)


def test_a_race_winner_says_why_with_the_race_times(cpu, tmp_path, monkeypatch):
    """The partition's runner-up and reason come from the race that chose it, not from segment sums: the
    runner-up is the fastest of the race's other single choices, and the reason quotes both race times."""
    _the_first_plan_loses(monkeypatch)
    raced, real_race = [], dioe.race.race
    monkeypatch.setattr(dioe.race, "race", lambda opt, *a, **k: raced.append(opt.plan) or real_race(opt, *a, **k))
    model, x = five_layers()
    opt = dioe.optimize(model, (x,), backends=BACKENDS, cache_dir=tmp_path, precision="fp32")
    r = _check_record(opt)
    assert r.winner != PLAN and r.fast_ms[r.winner] == min(r.fast_ms.values()), r
    # each contender's option: the plan's own where it was one partition, eager's where it stands for torch at
    # the reference (torch was not the plan's own option), each rival's by its label
    (first,) = raced
    own = first.partitions[0].choice.option() if len(first.partitions) == 1 else None
    ref = Choice(cpu.id, "torch")
    option = {PLAN: own, EAGER: ref if own != ref else None,
              **{k: Choice.parse(k) for k in r.rounds if k not in (PLAN, EAGER)}}
    chosen = {k: o for k, o in option.items() if o is not None}
    (p,) = opt.plan.partitions
    assert chosen[r.winner] == p.choice.option(), (r, opt.plan.summary())
    runner = min((k for k in chosen if k != r.winner), key=r.fast_ms.get)
    assert p.runner_up is not None and p.runner_up.option() == chosen[runner], (runner, opt.plan.summary())
    assert p.reason == (f"fastest raced side by side: {show_ms(r.fast_ms[r.winner])} ms (faster half of rounds) "
                        f"against {show_ms(r.fast_ms[runner])} ms for the runner-up "
                        f"({r.fast_ms[runner] / r.fast_ms[r.winner]:.2f}x)"), p.reason
    assert_matches_eager(eager(model, (x,)), opt(x))


@pytest.mark.parametrize("verify", [True, False])
def test_the_race_spends_no_warm_up_call_on_verified_contenders(cpu, tmp_path, monkeypatch, verify):
    """Verification has run every contender once, so the race's first round times them at once; unverified,
    each gets one warm-up call first. The extra rounds never warm up."""
    seen = _race_warm_flags(monkeypatch)
    model, x = five_layers()
    opt = dioe.optimize(model, (x,), backends=BACKENDS, cache_dir=tmp_path, verify=verify, precision="fp32")
    assert seen and seen[0] is verify and all(seen[1:]), seen
    assert len(seen) == (2 if opt.race.extra_rounds else 1), (seen, opt.race)
    assert_matches_eager(eager(model, (x,)), opt(x))


def test_side_by_side_warms_up_a_cold_contender_once():
    """A cold contender costs exactly one call more than a warm one; each round gets its `repeats` calls at most,
    and rounds rotate which contender goes first."""
    calls, order = dict.fromkeys(["cold", "warm", "a", "b"], 0), []

    def counter(key):
        def run(xs):
            calls[key] += 1
            order.append(key)
        return run
    x = torch.randn(2, 2)
    cold = dioe.timing.side_by_side({"cold": counter("cold")}, (x,), rounds=2, repeats=2, budget_s=1.0)
    warm = dioe.timing.side_by_side({"warm": counter("warm")}, (x,), rounds=2, repeats=2, budget_s=1.0, warm=True)
    assert len(cold["cold"]) == len(warm["warm"]) == 2
    assert (calls["cold"], calls["warm"]) == (5, 4), calls
    order.clear()
    dioe.timing.side_by_side({"a": counter("a"), "b": counter("b")}, (x,), rounds=2, repeats=1, budget_s=1.0,
                             warm=True)
    assert order == ["a", "b", "b", "a"], order
    assert dioe.timing.fast_half([3.0, 1.0, 2.0]) == 1.5 and dioe.timing.fast_half([5.0]) == 5.0


def test_a_rival_that_cannot_race_is_named_in_the_plan(cpu, tmp_path, monkeypatch):
    from dioe.backends import backend_class

    model, x = five_layers()
    whole = len(dioe.capture(model, (x,)).compute_nodes)
    cls = backend_class("onnxruntime")
    real = cls.compile_fn

    def whole_graph_fails(self, part, *a, **k):
        if part.op_count == whole:
            raise RuntimeError("exporter ran out of luck")
        return real(self, part, *a, **k)
    monkeypatch.setattr(cls, "compile_fn", whole_graph_fails)
    force_split(monkeypatch, cpu.id)
    opt = dioe.optimize(model, (x,), backends=BACKENDS, cache_dir=tmp_path, precision="fp32")
    ort = Choice(cpu.id, "onnxruntime").label()
    said = [a for a in opt.race.absent if a.startswith(f"rival {ort} fell back")]
    assert len(said) == 1 and "exporter ran out of luck" in said[0], opt.race.absent
    assert set(opt.race.absent) <= set(opt.plan.notes), "the plan tells the user too"
    assert ort not in opt.race.rounds, "it must not race under a false name"
    assert_matches_eager(eager(model, (x,)), opt(x))


def test_a_warm_optimize_reuses_the_race_verdict(tmp_path, monkeypatch):
    _the_first_plan_loses(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8)).eval()
    x = torch.randn(2, 48)
    first = dioe.optimize(model, (x,), backends=BACKENDS, cache_dir=tmp_path, precision="fp32")
    assert first.race.reused is None and first.race.winner != PLAN, first.race
    built = []
    real_build = dioe.build.build
    monkeypatch.setattr(dioe.build, "build", lambda *a, **k: built.append(a[1]) or real_build(*a, **k))
    second = dioe.optimize(model, (x,), backends=BACKENDS, cache_dir=tmp_path, precision="fp32")
    assert len(built) == 1, "a warm run compiles the race's winner only"
    assert [(p.member, p.backend, p.nodes) for p in second.plan.partitions] == \
        [(p.member, p.backend, p.nodes) for p in first.plan.partitions]
    r = second.race
    assert r.reused is not None and set(r.rounds) == {PLAN, EAGER} and r.winner == PLAN, r
    assert any(n.startswith(f"race verdict reused from {r.reused}") for n in second.plan.notes), second.plan.notes
    (p,) = second.plan.partitions  # a whole-graph rival won the scripted race
    assert p.reason.startswith("won an earlier optimize's race"), second.plan.summary()
    assert second.plan.measured_ms == round_ms(r.median_ms[PLAN]) and second.plan.eager_ms == 6.0
    assert_matches_eager(eager(model, (x,)), second(x))


def test_a_verdict_naming_an_option_the_profile_no_longer_has_is_raced_again(tmp_path):
    """A verdict outlives the profile it was made from when the profile is measured again (an engine that timed a
    segment then could not compile it now): it names an option no segment has times for."""
    import json

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    x = torch.randn(2, 16)
    first = dioe.optimize(model, (x,), backends=BACKENDS, cache_dir=tmp_path, precision="fp32")
    (path,) = (tmp_path / "profiles").glob("*.race.json")
    data = json.loads(path.read_text())
    gone = Choice(first.plan.partitions[0].member, "openvino", "fp32")  # never profiled: BACKENDS lack it
    data["winner"] = gone.label()
    if "sha256" in data:  # a verdict DIOE wrote whole: this one says what a stale one says
        from dioe import integrity

        data = json.loads(integrity.dumps_checked(data))
    path.write_text(json.dumps(data))

    with pytest.warns(RuntimeWarning, match=rf"names {gone.label()}, which the profile no longer times .* stale"):
        second = dioe.optimize(model, (x,), backends=BACKENDS, cache_dir=tmp_path, precision="fp32")
    assert second.race.reused is None, "raced again"
    assert {p.backend for p in second.plan.partitions} <= set(BACKENDS)
    assert_matches_eager(eager(model, (x,)), second(x), rtol=1e-4)
    assert json.loads(path.read_text())["winner"] != gone.label(), "the new race's verdict replaced it"
