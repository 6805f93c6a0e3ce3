"""After building: measure the plan and re-plan once if it missed its forecast, then race it side by side with
torch eager and the best whole-graph choice of every other backend, and keep the fastest. `RaceRecord` is what the
race measured and decided (`opt.race`); the plan's notes say the same in words. A race's verdict is cached beside
the profile (`Verdict`), so that a warm optimize compiles only the winner.
"""

from __future__ import annotations

import copy
import hashlib
import statistics
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch

from . import backends as registry
from . import build as building
from . import integrity
from . import partition
from . import timing
from . import tracing as _trace
from .backend import cache_root
from .files import write_text
from .optimized import Optimized
from .plan import Choice, Plan
from .planner import Job, assign_for, inherited_notes, make_plan, unless_split_pays, whole_graph_plan
from .profile import Profile
from .text import round_ms, show_ms

EAGER = "torch eager"   # the model as captured: timed in the race as the baseline, never chosen
PLAN = "plan"           # the race's name for the plan it was given


@dataclass(frozen=True)
class RaceRecord:
    """What one race measured and decided. Contenders are named by PLAN, EAGER or an option's label."""

    rounds: Mapping[str, tuple[float, ...]]     # contender -> its median ms in each round
    fast_ms: Mapping[str, float]                # contender -> mean of its faster half of rounds: what ranks it
    median_ms: Mapping[str, float]              # contender -> median over its rounds: what the plan records
    winner: str                                 # the contender that runs now
    extra_rounds: tuple[str, ...] = ()          # contenders given more rounds for being close to the leader
    kept_over_split: bool = False               # a split plan was faster, but by less than the split margin
    absent: tuple[str, ...] = ()                # rivals that could not race, each with why
    reused: str | None = None                   # the verdict file whose winner was reused instead of racing


# -- measuring, and re-planning once --------------------------------------------------------------------------------
def measure_plan(opt: Optimized, job: Job, *, replan: bool = True) -> Optimized:
    """Time the plan; if it missed its forecast by more than `settings.replan_threshold`, re-plan once from what
    its partitions measured and keep the faster of the two. Without `replan` (a reused verdict; the race times the
    plan anyway), only a split plan's partitions are timed."""
    s = job.settings
    if not replan:
        if len(opt.program.steps) > 1:
            opt.plan = opt.plan.with_measurements(time_partitions(opt, job, warm=job.verify), opt.plan.measured_ms)
        return opt
    flat = opt.captured.example_inputs
    with torch.inference_mode():
        total_ms = timing.time_call(opt.runtime.run, flat, budget_s=s.timing_budget_s, warmup=0 if job.verify else 2)
    if opt.plan.replanned or abs(total_ms - opt.plan.predicted_ms) <= s.replan_threshold * max(opt.plan.predicted_ms,
                                                                                                1e-9):
        # The prediction held. A split plan's partitions are timed alone after the race, and only if it wins:
        # at batch 8 that is three calls of seconds each per partition, spent on a plan that a rival often beats.
        opt.plan = opt.plan.with_measurements(_one_partition_ms(opt, total_ms), round_ms(total_ms))
        return opt
    plan = opt.plan.with_measurements(time_partitions(opt, job, warm=True, whole_ms=total_ms), round_ms(total_ms))
    opt.plan = plan
    # The prediction missed: let what the merged partitions measured replace the sums of their segments, in a
    # copy, so that the race below still ranks every option by what its segments measured.
    scaled = _scaled(job.profile, plan)
    assignment = assign_for(job, scaled)
    new_plan = make_plan(job, assignment, profile=scaled, replanned=True,
                         notes=(f"first plan predicted {show_ms(plan.predicted_ms)} ms, measured {show_ms(total_ms)} "
                                "ms; re-planned with partition-level measurements",))
    new_plan = unless_split_pays(job, new_plan, profile=scaled)
    if [(p.nodes, p.member, p.backend) for p in new_plan.partitions] == \
            [(p.nodes, p.member, p.backend) for p in plan.partitions]:
        opt.plan = replace(plan, replanned=True, notes=new_plan.notes)
        return opt
    new = _built(job, new_plan)
    with torch.inference_mode():
        new_ms = timing.time_call(new.runtime.run, flat, budget_s=s.timing_budget_s, warmup=1 if job.verify else 2)
    if new_ms >= total_ms:  # keep the better of the two, measured side by side
        new.runtime.close()
        opt.plan = replace(plan, replanned=True,
                           notes=new_plan.notes + ("the re-plan measured slower; kept the first",))
        return opt
    opt.runtime.close()
    new.plan = new.plan.with_measurements(time_partitions(new, job, warm=True, whole_ms=new_ms),
                                          round_ms(new_ms))  # as verified: a partition may have moved to torch
    return new


def _scaled(profile: Profile, plan: Plan) -> Profile:
    """A copy of `profile` whose segment times are scaled so that each measured partition, forecast again as one
    call of its segments, comes to what it measured."""
    scaled = copy.deepcopy(profile)
    for p in plan.partitions:
        if p.measured_ms is None:
            continue
        option = p.choice.option()
        timed = {sid: t for sid in p.segments if (t := scaled.times[sid].get(option)) is not None}
        k = partition.scale_to_measured(p.measured_ms, [t.median_ms for t in timed.values()], option)
        for sid, t in timed.items():
            scaled.times[sid][option] = type(t)(t.median_ms * k, t.p25_ms * k, t.p75_ms * k, t.runs)
    return scaled


def _built(job: Job, plan: Plan) -> Optimized:
    """`plan` compiled, and verified when the job verifies."""
    opt = building.build(job.captured, plan, job.pool, settings=job.settings, objective=job.objective)
    return building.verify(opt, settings=job.settings) if job.verify else opt


def time_partitions(opt: Optimized, job: Job, *, warm: bool = False,
                    whole_ms: float | None = None) -> dict[str, float]:
    """Each partition's median ms, timed alone. `warm`: every partition has run already (verified, or raced), so
    no call is spent on warming up (at batch 8 a call of a whole transformer takes one to two seconds).
    `whole_ms`: the plan's own time, which a plan of one partition takes for its partition's instead of timing it
    again (three more calls: 0.75 s on bert-base)."""
    if whole_ms is not None and len(opt.program.steps) == 1:
        return _one_partition_ms(opt, whole_ms)
    out = {}
    for step in opt.program.steps:
        c = opt.runtime.compiled[step.partition]
        part = opt.program.partition(step.partition)
        inputs = registry.get(c.backend, job.settings.cache_dir).to_io(part.example_inputs, job.pool[c.member])
        with torch.inference_mode():
            out[step.partition] = round_ms(timing.measure(c, inputs, warmup=0 if warm else 2, min_runs=3,
                                                          max_runs=10, budget_s=0.2).median_ms)
    return out


def _one_partition_ms(opt: Optimized, whole_ms: float) -> dict[str, float]:
    """A plan of one partition: that partition's time is the plan's, timed already. {} for other plans."""
    steps = opt.program.steps
    return {steps[0].partition: round_ms(whole_ms)} if len(steps) == 1 else {}


# -- the verdict of an earlier race -----------------------------------------------------------------------------------
class Verdict:
    """What the race decided for one plan, cached beside the profile it was made from: PLAN (the split plan won)
    or the winning whole-graph option. Keyed by the plan's partitions, so a changed plan races again. A verdict
    whose option the profile no longer times on every segment (it failed when the profile was measured again) is
    stale: it is discarded with a warning and the race runs again."""

    def __init__(self, cache_dir, profile: Profile, plan: Plan):
        key = repr([(p.nodes, p.member, p.backend, p.precision) for p in plan.partitions]).encode()
        self.plan_key = hashlib.blake2b(key, digest_size=8).hexdigest()
        self.path = cache_root(cache_dir) / "profiles" / f"{profile.graph_hash}-{profile.fingerprint}.race.json"
        self.winner: Choice | str | None = None   # PLAN, an option, or None: no verdict for this plan
        self.report = ""
        data = integrity.load_checked(self.path, "race verdict") or {}
        if data.get("plan") != self.plan_key:
            return
        try:
            w = data["winner"]
            winner, report = (PLAN if w == PLAN else Choice.parse(w)), str(data.get("report", ""))
        except (ValueError, KeyError, TypeError) as e:
            integrity.forget(self.path, "race verdict", f"it does not read as one ({type(e).__name__}: {e})")
            return
        missing = [] if winner == PLAN else [s for s in sorted(set(profile.times) | set(profile.failures))
                                             if winner not in profile.times.get(s, {})]
        if missing:
            why = profile.failures.get(missing[0], {}).get(winner, "it was not timed there")
            warnings.warn(f"dioe: the race verdict in {self.path.name} names {winner}, which the profile no longer "
                          f"times on {len(missing)} segment(s) (first {missing[0]}: {why[:200]}); the verdict is "
                          "stale, discarded, and the race runs again", RuntimeWarning, stacklevel=2)
            self.path.unlink(missing_ok=True)
            return
        self.winner, self.report = winner, report

    def save(self, winner: Choice | str, report: str) -> None:
        write_text(self.path, integrity.dumps_checked({"plan": self.plan_key, "winner": str(winner),
                                                       "report": report}))


# -- the race ---------------------------------------------------------------------------------------------------------
def race(opt: Optimized, job: Job, verdict: Verdict) -> Optimized:
    """Time the plan side by side with torch eager and every other backend's best single (member, backend)
    choice compiled over the whole graph, in interleaved rounds; keep the fastest. Its latency and eager's, from
    those same rounds, are what the plan records; `opt.race` keeps the rounds. With a cached verdict, only the plan
    it chose and eager are timed."""
    if verdict.winner is not None:
        return _reuse(opt, job, verdict)
    s, pool = job.settings, job.pool
    ranked = partition.whole_graph_options(job.segments, job.profile, pool)
    single = opt.plan.partitions[0] if len(opt.plan.partitions) == 1 else None
    own = single.choice.option() if single else None
    # torch on the reference over the whole graph runs the captured graph as it is: eager, which the race times
    # anyway as the baseline, stands for it, and it is built only if it wins.
    ref = Choice(pool.reference.id, "torch", "fp32")
    eager_as = ref if ref != own and ref in dict(ranked) else None
    picks = _rival_picks(ranked, own, ref, opt.plan.measured_ms, s)
    rivals: dict[str, Optimized] = {}
    options: dict[str, Choice | None] = {PLAN: own, EAGER: eager_as}
    absent: list[str] = []  # the rivals that could not race, and why: never silently dropped
    # ONNX Runtime's rivals first: OpenVINO converts from the ONNX file they export, except where the graph has
    # attention (its PyTorch frontend keeps that fused; the file is then the way in only if that frontend fails)
    for option, predicted in sorted(picks.items(), key=lambda kv: (kv[0].backend != "onnxruntime", kv[1])):
        plan = whole_graph_plan(job, option, predicted, replanned=opt.plan.replanned,
                                notes=inherited_notes(opt.plan))
        attempt = building.build_as(option, lambda plan=plan: _built(job, plan), stage="build rival")
        if attempt.built is None:
            absent.append(f"rival {option} fell back to torch while compiling or verifying: {attempt.why}"
                          if attempt.fell_back else f"rival {option} could not be built or verified: {attempt.why}")
            continue
        rivals[option.label()] = attempt.built
        options[option.label()] = option
    if absent:
        opt.plan = replace(opt.plan, notes=opt.plan.notes + tuple(absent))
    runs = {PLAN: opt.runtime.run, **{k: r.runtime.run for k, r in rivals.items()},
            EAGER: lambda xs: opt.captured.gm(*xs)}
    predicted = {PLAN: opt.plan.predicted_ms, **{k: picks[options[k]] for k in rivals}}
    if eager_as:
        predicted[EAGER] = dict(ranked)[eager_as]
    stream = job.objective == "throughput" and opt.runtime.pipeline().pipelined
    if stream:
        runs[PLAN] = streamed(opt)
        predicted[PLAN] = opt.plan.bottleneck_ms or opt.plan.predicted_ms
    rounds, again = _rounds(runs, predicted, opt.captured.example_inputs, s, warm=job.verify)
    if stream:
        rounds[PLAN] = [ms / STREAM for ms in rounds[PLAN]]
    for k, r in rivals.items():
        if r.runtime.stats["fallbacks"]:
            rounds.pop(k)  # it failed while racing: its times are torch's, not its own
            predicted.pop(k)
    fast = {k: timing.fast_half(v) for k, v in rounds.items()}
    med = {k: statistics.median(v) for k, v in rounds.items()}
    best = min(predicted, key=fast.get)
    kept = False
    if best == PLAN and own is None:
        runner = min((k for k in predicted if k != PLAN), key=fast.get, default=None)
        if runner is not None and fast[runner] <= fast[PLAN] * (1 + s.split_margin):
            best, kept = runner, True
    report = _report(fast, med, own, eager_as, s, again)
    if stream:
        report += (f"; the split plan's ms are per batch of a stream of {STREAM}, its stages pipelined across its "
                   "members")
    record = RaceRecord({k: tuple(v) for k, v in rounds.items()}, dict(fast), dict(med), best, tuple(again), kept,
                        tuple(absent))   # copies: the winner's own entry is added to `med` below
    if best == PLAN:
        # The verdict is keyed by the first plan, which a re-plan may have replaced: a plan of one partition is
        # saved as its option, which a warm run rebuilds whole; a re-planned split is raced again next time.
        if own is not None:
            verdict.save(own, report)
        elif not opt.plan.replanned:
            verdict.save(PLAN, report)
        for r in rivals.values():
            r.runtime.close()
        # a split plan's partitions are timed alone now, unless re-planning timed them already
        unmeasured = len(opt.program.steps) > 1 and any(p.measured_ms is None for p in opt.plan.partitions)
        plan = opt.plan.with_measurements(time_partitions(opt, job, warm=True) if unmeasured
                                          else _one_partition_ms(opt, med[PLAN]), round_ms(med[PLAN]),
                                          round_ms(med[EAGER]))
        opt.plan = replace(_raced_reason(plan, PLAN, fast, predicted, options, s),
                           notes=plan.notes + (f"raced side by side, {report}",))
        opt.race = record
        return opt
    raced = best  # its key in the race's times
    winner_option = options[best]
    if best == EAGER:  # the captured graph as it is wins: torch on the reference, nothing to verify
        best = eager_as.label()
        rivals[best] = building.build(job.captured, whole_graph_plan(
            job, eager_as, predicted[EAGER], replanned=opt.plan.replanned,
            notes=tuple(n for n in inherited_notes(opt.plan) if n not in absent)),
            pool, settings=s, objective=job.objective)
        med[best] = med[EAGER]
    verdict.save(winner_option, report)
    winner = rivals.pop(best)
    for o in [opt, *rivals.values()]:
        o.runtime.close()
    plan = winner.plan.with_measurements(time_partitions(winner, job, warm=True, whole_ms=med[best]),
                                         round_ms(med[best]), round_ms(med[EAGER]))
    plan = _raced_reason(plan, raced, fast, predicted, options, s)
    why = (f"was kept: the split plan was less than {s.split_margin:.0%} faster" if kept
           else "beat the split plan" if own is None else f"beat {own} (the plan)")
    winner.plan = replace(plan, notes=plan.notes + tuple(absent) +
                          (f"whole graph on {winner_option} {why}, raced side by side, {report}",))
    winner.race = record
    return winner


def _reuse(opt: Optimized, job: Job, verdict: Verdict) -> Optimized:
    """A warm optimize: the plan an earlier race chose, timed again side by side with eager, not raced."""
    s = job.settings
    # verification skips a partition on torch at the reference, and a plan of one such partition has not run
    ran = job.verify and (len(opt.program.steps) > 1 or any(
        (c.backend, c.member) != ("torch", job.pool.reference.id) for c in opt.runtime.compiled.values()))
    stream = job.objective == "throughput" and opt.runtime.pipeline().pipelined
    rounds = timing.side_by_side({PLAN: streamed(opt) if stream else opt.runtime.run,
                                  EAGER: lambda xs: opt.captured.gm(*xs)},
                                 opt.captured.example_inputs, rounds=s.race_rounds, repeats=s.race_repeats,
                                 budget_s=s.timing_budget_s / s.race_rounds, warm=ran)
    if stream:
        rounds[PLAN] = [ms / STREAM for ms in rounds[PLAN]]
    med = {k: statistics.median(v) for k, v in rounds.items()}
    note = (f"race verdict reused from {verdict.path.name} ({verdict.report}); timed again side by side: "
            f"plan {show_ms(med[PLAN])} ms, torch eager {show_ms(med[EAGER])} ms")
    plan = opt.plan.with_measurements(_one_partition_ms(opt, med[PLAN]), round_ms(med[PLAN]), round_ms(med[EAGER]))
    (part, *more) = plan.partitions
    if not more and part.choice.option() == verdict.winner and building.runs_as(opt, verdict.winner):
        plan = replace(plan, partitions=(replace(part, reason="won an earlier optimize's race, kept in "
                                                 f"{verdict.path.name}"),))
    opt.plan = replace(plan, notes=plan.notes + (note,))
    opt.race = RaceRecord({k: tuple(v) for k, v in rounds.items()}, {k: timing.fast_half(v) for k, v in rounds.items()},
                          med, PLAN, reused=verdict.path.name)
    return opt


# Batches per timed run of a pipelined plan when the objective is throughput: enough for a pipeline of a few
# stages to spend a small share of the time filling and draining. Its times are then per batch of the stream.
STREAM = 8


def streamed(opt: Optimized) -> Callable:
    """The plan's timed run for objective throughput: a stream of STREAM batches through its pipeline. Every
    other contender serves a stream one call after another, so one call's time is already its time per batch."""
    pipe = opt.runtime.pipeline()
    return lambda xs: list(pipe.map([xs] * STREAM))


def _rival_picks(ranked, own: Choice | None, ref: Choice, measured_ms: float | None, s) -> dict[Choice, float]:
    """The whole-graph rivals: the best option of each backend, however far its prediction (a backend compiled
    whole fuses across segment boundaries, so its sum of segment times overstates it: OpenVINO's was out of a
    1.25x window on mobilenetv2 and tiny-bert, where it was the fastest engine), then up to `s.rivals` more
    predicted within `s.rival_window` of the best, or below what the plan measured."""
    others = [(o, ms) for o, ms in ranked if o not in (own, ref)]
    picks = {}
    for o, ms in others:
        if not any(p.backend == o.backend for p in picks):
            picks[o] = ms
    limit = max(ranked[0][1] * s.rival_window, measured_ms or 0.0) if ranked else 0.0
    picks.update([(o, ms) for o, ms in others if ms <= limit and o not in picks][:s.rivals])
    return picks


def _rounds(runs: Mapping[str, Callable], predicted: Mapping[str, float], flat, s, *,
            warm: bool) -> tuple[dict[str, list[float]], list[str]]:
    """Every contender's rounds: `s.race_rounds` each, then `s.race_extra` more for the close ones."""
    with _trace.stage("time side by side", contenders=list(runs)):
        rounds = timing.side_by_side(runs, flat, rounds=s.race_rounds, repeats=s.race_repeats,
                                     budget_s=s.timing_budget_s / s.race_rounds, warm=warm)
        fast = {k: timing.fast_half(v) for k, v in rounds.items()}
        lead = min(predicted, key=fast.get)
        # eager joins the extra rounds only when it is close: its rounds are the slowest, and it seldom wins. A
        # contender slower in every round than the leader in any round is out: with three rounds each, two equals
        # split that cleanly one time in twenty, and at batch 8 the extra rounds cost 2-3 s a call.
        again = [k for k in predicted if (fast[k] <= fast[lead] * (1 + s.race_close)
                 or (k != EAGER and predicted[k] < predicted[lead]))
                 and (k == lead or min(rounds[k]) <= max(rounds[lead]))]
        if len(again) > 1:
            with _trace.stage("more rounds for the close ones", contenders=again):
                more = timing.side_by_side({k: runs[k] for k in again}, flat, rounds=s.race_extra,
                                           repeats=s.race_repeats, budget_s=s.timing_budget_s / s.race_rounds,
                                           warm=True)
            for k in again:
                rounds[k] += more[k]
    return rounds, again if len(again) > 1 else []


def _report(fast, med, own: Choice | None, eager_as: Choice | None, s, again) -> str:
    """The race's times in words, fastest first."""
    def name(k):
        if k == PLAN:
            return "split plan" if own is None else f"{own} (the plan)"
        return f"{EAGER} (= {eager_as})" if k == EAGER and eager_as else k
    times = ", ".join(f"{name(k)} {show_ms(v)} ms (median {show_ms(med[k])})"
                      for k, v in sorted(fast.items(), key=lambda kv: kv[1]))
    if again:
        return f"faster half of {s.race_rounds} rounds (of {s.race_rounds + s.race_extra} for {len(again)}): {times}"
    return f"faster half of {s.race_rounds} rounds: {times}"


def _raced_reason(plan: Plan, key: str, fast: Mapping[str, float], predicted: Mapping[str, float],
                  options: Mapping[str, Choice | None], s) -> Plan:
    """A one-partition plan chosen by the race says so: its runner-up is the next fastest of the race's other
    single-option contenders and its reason quotes the race's times (mean of each one's faster half of rounds),
    not the segment sums the partitioner ranked, which overstate an engine compiled whole. `predicted` holds the
    contenders that could have been chosen; `options` names each contender's option, or None where it is not a
    single option (a split plan; eager where torch was not a choice)."""
    if len(plan.partitions) != 1:
        return plan
    part = plan.partitions[0]
    others = [k for k in predicted if k != key and options.get(k) is not None]
    runner = min(others, key=fast.get) if others else None
    ru = None
    if runner is not None:
        o = options[runner]
        ru = Choice(o.member, o.backend, o.precision, round_ms(predicted[runner]))
        against = f"against {show_ms(fast[runner])} ms for the runner-up ({fast[runner] / max(fast[key], 1e-9):.2f}x)"
    if key != PLAN and options.get(PLAN) is None and PLAN in fast and fast[PLAN] < fast[key]:
        reason = (f"kept over the split plan ({show_ms(fast[PLAN])} ms, less than {s.split_margin:.0%} faster): "
                  f"{show_ms(fast[key])} ms raced side by side" + (f", {against}" if ru else ""))
    elif ru is not None:
        reason = f"fastest raced side by side: {show_ms(fast[key])} ms (faster half of rounds) {against}"
    else:
        return plan
    return replace(plan, partitions=(replace(part, runner_up=ru, reason=reason),))
