"""A warm optimize whose precision verdict is cached: the precision the search chose is rebuilt from its cached
artifacts, checked on one held-out input against what the search measured, and timed again. `warm_start` runs
before the fp32 plan is compiled, and where the verdict holds, the fp32 plan is never compiled: on bert-base,
compiling, verifying and timing it took more than half of a warm optimize, to produce a runner-up the verdict had
already beaten. `reuse` runs after it (the precision stage of a plan that fell back while verified, or of a
verdict that kept fp32).

    >>> opt = dioe.optimize(model, inputs, precision="auto")    # doctest: +SKIP   (searches, caches the verdict)
    >>> opt = dioe.optimize(model, inputs, precision="auto")    # doctest: +SKIP   (this module: no search)
    >>> opt.precision_search.reused                             # doctest: +SKIP
    'f00d...precision.json'

Whatever does not hold (no verdict for these keys, fp32 won it, the artifact is gone, the engine no longer
reproduces the judged values, the winner falls back to torch) returns None, and optimize takes its usual path:
fp32 plan, race, and the precision stage, which searches again where the verdict does not hold.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import torch

from . import mixed
from . import precision as precisions
from . import race as racing
from . import timing
from . import tracing as _trace
from .accuracy import METRICS, AccuracyReport, evaluate
from .calibration import Samples
from .errors import DIOEError
from .optimized import Optimized
from .plan import Plan
from .planner import Job
from .precision_record import FP32, Candidate, Verdict
from .text import round_ms, show_ms


def warm_start(job: Job, plan: Plan, race_verdict: racing.Verdict, *, precision: str,
               inputs: precisions.Inputs) -> Optimized | None:
    """The model the cached precision verdict for `plan` (the fp32 plan the cached `race_verdict` chose, not
    compiled) names, built and timed beside eager; None where the verdict is missing, kept fp32, or does not hold
    here. `inputs`: the budget and samples, drawn once for this optimize."""
    options = precisions.candidates(job, precision)
    if not options:
        return None
    try:
        budget, samples = inputs.get()
    except DIOEError:
        return None  # the usual path says what is wrong with the budget or the calibration data
    verdict = Verdict(job.settings.cache_dir, job, plan, precision, budget, samples, options)
    rec = verdict.record
    if rec is None or rec.winner == FP32 or not {FP32, rec.winner} <= set(rec.fast_ms):
        return None
    got = _rebuilt(job, verdict, samples)
    if got is None:
        return None
    won, cand = got
    s = job.settings
    # The two share one contender's timing budget. Eager is timed only for the report beside the winner, and a
    # heavy call needs one run a round for its median; the winner's time is held against the search's fp32 time,
    # which it beat by at least the split margin. At a full budget each, this timing was half of a warm optimize.
    with _trace.stage("precision: time beside eager", contenders=[won.label, racing.EAGER]):
        rounds = timing.side_by_side({won.label: cand.runtime.run, racing.EAGER: lambda xs: job.captured.gm(*xs)},
                                     job.captured.example_inputs, rounds=s.race_rounds, repeats=s.race_repeats,
                                     budget_s=s.timing_budget_s / s.race_rounds / 2, warm=True)
    rounds = {racing.PLAN: rounds[won.label], racing.EAGER: rounds[racing.EAGER]}
    med = {k: statistics.median(v) for k, v in rounds.items()}
    fast = {k: timing.fast_half(v) for k, v in rounds.items()}
    # the fp32 plan's time is the search's: it was not built, and the verdict says by how much it lost. The winner
    # must still beat that time by the split margin (another load on the machine, a changed engine): else search
    searched = {FP32: rec.fast_ms[FP32], won.label: rec.fast_ms[won.label]}
    if cand.runtime.stats["fallbacks"]:
        cand.runtime.close()
        return None
    if fast[racing.PLAN] > searched[FP32] * (1 - s.split_margin):
        hand_on(inputs, verdict.path, won, cand)   # the full path races it against the fp32 plan itself
        return None
    notes = list(verdict.notes) + [
        f"race verdict reused from {race_verdict.path.name} ({race_verdict.report}) and precision verdict reused "
        f"from {verdict.path.name}: the fp32 plan was not built, and its time is the search's "
        f"({precisions._race_report(searched)})",
        f"timed again side by side: {won.label} {show_ms(med[racing.PLAN])} ms, torch eager "
        f"{show_ms(med[racing.EAGER])} ms"]
    # the search kept fast-half times only: the fp32 plan's stands for its median as the runner-up's time
    promoted = precisions.promoted_plan(plan, cand, won, searched, {**searched, won.label: med[racing.PLAN]}, notes)
    _keep_example(verdict, won, promoted)
    cand.plan = replace(promoted, eager_ms=round_ms(med[racing.EAGER]))
    cand.race = racing.RaceRecord({k: tuple(v) for k, v in rounds.items()}, fast, med, racing.PLAN,
                                  reused=race_verdict.path.name)
    cand.precision_search = rec
    return cand


def reuse(opt: Optimized, job: Job, verdict: Verdict, samples: Samples,
          inputs: precisions.Inputs | None = None) -> Optimized | None:
    """A warm optimize: the precision an earlier search chose, rebuilt from its cached artifact and checked on one
    held-out input against what the search measured (or as the warm start handed it on through `inputs`, rebuilt
    and checked already), then timed again against the fp32 plan. None when the check fails (the engine or its
    artifact no longer computes what was judged): the caller searches again."""
    rec = verdict.record
    notes = list(verdict.notes) + [f"precision verdict reused from {verdict.path.name}"]
    if rec.winner == FP32:
        opt.precision_search = rec
        return precisions._keep_fp32(opt, rec.fp32, notes)
    got = (_take(inputs, verdict.path) if inputs is not None else None) or _rebuilt(job, verdict, samples)
    if got is None:
        return None
    won, cand = got
    fast, med = precisions._race({FP32: opt, rec.winner: cand}, job, job.settings.race_rounds)
    if rec.winner not in fast or fast[rec.winner] > fast[FP32] * (1 - job.settings.split_margin):
        cand.runtime.close()
        return None  # it no longer wins here (another load on the machine, a changed engine): search again
    notes.append(f"timed again against fp32 (faster half of rounds): {precisions._race_report(fast)}")
    got = precisions._promote(opt, cand, won, fast, med, notes, replace(rec, fast_ms=fast))
    _keep_example(verdict, won, got.plan)
    return got


def _keep_example(verdict: Verdict, won: Candidate, plan: Plan) -> None:
    """Where the verdict (saved before winners recorded it) lacks the winner's agreement on the inputs a load
    makes up, which `plan` has just measured, save it in, so that the next warm optimize does not measure it."""
    example = (plan.accuracy or {}).get("example")
    if won.example is not None or example is None:
        return
    verdict.save(verdict.record.with_example(won.label, example), verdict.notes)


def hand_on(inputs: precisions.Inputs, verdict_path, won: Candidate, cand: Optimized) -> None:
    """Keep the winner the warm start rebuilt and checked, then stepped aside from, for the search's `reuse` of
    the same verdict: it races it against the fp32 plan without building and checking it again."""
    release(inputs)
    inputs.handed = (verdict_path, won, cand)


def release(inputs: precisions.Inputs) -> None:
    """Close what was handed on and not taken."""
    _take(inputs, None)


def _take(inputs: precisions.Inputs, verdict_path) -> tuple[Candidate, Optimized] | None:
    """(candidate, model) handed on for `verdict_path`, once; one handed on for another verdict is closed."""
    got, inputs.handed = inputs.handed, None
    if got is None:
        return None
    if got[0] == verdict_path:
        return got[1], got[2]
    got[2].runtime.close()
    return None


def _rebuilt(job: Job, verdict: Verdict, samples: Samples) -> tuple[Candidate, Optimized] | None:
    """The verdict's winner (not fp32) and its model, rebuilt from the artifacts cached under the same samples'
    key and checked on one held-out input (`reproduces`); None where that fails."""
    rec = verdict.record
    won = next((c for c in rec.candidates if c.label == rec.winner and c.report), None)
    if won is None:
        return None
    cand = mixed.rebuild(job, won.mix, samples) if won.mix else precisions._build(job, won.option, samples)
    if isinstance(cand, str) or not reproduces(job, verdict, won, cand, samples):
        return None
    return won, cand


def reproduces(job: Job, verdict: Verdict, won: Candidate, cand: Optimized, samples: Samples) -> bool:
    """Whether `cand`, rebuilt for a reused verdict, computes on one held-out input what the search judged (`won`)
    without falling back; it is closed where not."""
    first = [list(samples.holdout[0])]
    with torch.inference_mode():
        spot = evaluate(verdict.budget, [tuple(job.captured.gm(*first[0]))], precisions._outputs(cand, first))
    if _within(spot, won.report) and not cand.runtime.stats["fallbacks"]:
        return True
    cand.runtime.close()
    return False


def _within(spot: AccuracyReport, judged: AccuracyReport, slack: float = 1e-4) -> bool:
    """Whether one held-out input, judged again, is no worse than the worst sample the search saw: it was one of
    them, so a deterministic engine gives the same values; `slack` allows a threaded reduction's reordering."""
    worst = {(r.metric, r.output): r.worst for r in judged.results}
    for r in spot.results:
        w = worst.get((r.metric, r.output))
        if w is None or (r.worst < w - slack if METRICS[r.metric] else r.worst > w + slack):
            return False
    return True
