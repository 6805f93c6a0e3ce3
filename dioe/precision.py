"""Precision policies: after the fp32 race, try the whole graph at the lower precisions each engine really runs on
its member (int8 through NNCF, ONNX Runtime's quantizer or PT2E for Inductor, bf16 through an engine's hint or
torch's autocast): race each against the fp32 winner, judge those that gain on held-out samples against the budget,
try those that miss it mixed with a higher precision (`dioe.mixed`), and race what meets it again.

    >>> opt = dioe.optimize(model, inputs, precision="auto", accuracy=dioe.Budget(cosine=0.999))  # doctest: +SKIP
    >>> opt.plan.partitions[0].precision, opt.plan.accuracy["met"]                               # doctest: +SKIP
    ('int8', True)

Candidates that race faster are judged, fastest first, against fp32 eager on samples held apart from those they
were calibrated on (one clearly slower than one that met the budget already is not); the plan keeps the report
(each metric's estimate, confidence bound and worst sample), and says why a lower precision was not kept.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import replace
from typing import Any, Iterable, Sequence

import torch

from . import backends as registry
from . import build as building
from . import mixed
from . import partition
from . import timing
from . import tracing as _trace
from .accuracy import AccuracyReport, Budget, evaluate
from .calibration import Samples, split
from .errors import DIOEError
from .optimized import Optimized
from .precision_record import FP32, Candidate, PrecisionRecord, Verdict
from .plan import Choice, Plan
from .planner import Job, whole_graph_plan
from .reload import example_agreement, with_example
from .text import round_ms, show_ms

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8", "live")
# What each `precision=` lets the search try below fp32: "auto" anything the member and engine run; a precision
# caps the search there (int8 still allows the 16-bit floats, which lose less).
_BELOW_FP32 = {"auto": ("int8", "bf16", "fp16"), "int8": ("int8", "bf16", "fp16"), "bf16": ("bf16",),
               "fp16": ("fp16",), "fp32": (), "live": ("int8", "bf16", "fp16")}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise DIOEError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def check_calibration(calibration: Any) -> Any:
    """`calibration` as optimize takes it: None, an iterable of input tuples, or a callable returning one."""
    if calibration is None or callable(calibration) or isinstance(calibration, Iterable) and \
            not isinstance(calibration, (str, bytes, torch.Tensor)):
        return calibration
    raise DIOEError(f"calibration must be None, an iterable of input tuples (like the example inputs) or a callable "
                    f"returning one; got {type(calibration).__name__}")


def check_budget(accuracy: Any) -> Budget | None:
    if accuracy is None or isinstance(accuracy, Budget):
        return accuracy
    raise DIOEError(f"accuracy must be a dioe.Budget (e.g. dioe.Budget(cosine=0.999)) or None; got "
                    f"{type(accuracy).__name__}")


def choose(opt: Optimized, job: Job, *, precision: str, budget: Budget | None, calibration: Any,
           inputs: Inputs | None = None) -> Optimized:
    """The faster of `opt` (the fp32 winner) and every whole-graph lower-precision choice that meets the budget,
    raced side by side; `opt` unchanged when `precision` is "fp32" or nothing below fp32 is legal. `inputs`: the
    budget and samples drawn already from `budget` and `calibration`, if they were."""
    options = candidates(job, precision)
    if not options:
        return opt
    s, captured = job.settings, job.captured
    chosen = budget
    batch = _batch(captured)
    try:
        budget, samples = (inputs or Inputs(job, budget, calibration)).get()
    except DIOEError as e:
        if chosen is not None or calibration is not None:
            raise  # what the caller gave is wrong: say so
        # nothing the caller asked for: what DIOE would pick itself does not fit this model, so fp32 stays
        warnings.warn(f"dioe: precision {precision} not tried: {e}. The plan stays fp32; pass accuracy= and "
                      "calibration= to try lower precisions.", RuntimeWarning, stacklevel=3)
        opt.plan = replace(opt.plan, notes=opt.plan.notes + (f"precision {precision} not tried: {str(e)[:300]}",))
        return opt
    holdout = [list(x) for x in samples.holdout]
    verdict = Verdict(s.cache_dir, job, opt.plan, precision, budget, samples, options)
    if verdict.record is not None:
        from .precision_warm import reuse   # it builds on this module's search
        reused = reuse(opt, job, verdict, samples, inputs)
        if reused is not None:
            return reused
    notes = [f"precision {precision}: budget {budget}, judged on {len(holdout) * batch} held-out samples "
             f"({samples.source} inputs) against fp32 eager; calibrated on {len(samples.calibrate)} others"]
    # a candidate that does not race faster than the fp32 plan loses whatever its accuracy: judging it (64 held-out
    # inputs through it) would only cost time
    tried, fast_ones, speed, raced = screen(opt, job, options, samples)
    reference = eager_outputs(job, holdout)
    missed: dict[str, Optimized] = {}
    built: dict[str, Optimized] = {}
    # fastest first: once one meets the budget, those that raced clearly slower cannot win the final race, and
    # judging them (or mixing them) would only cost time
    for label in sorted(fast_ones, key=speed.get):
        cand, first = fast_ones[label], min(built, key=speed.get) if built else None
        if first and speed[label] > speed[first] * (1 + s.race_close) and not _may_be_high(label, missed):
            cand.runtime.close()
            tried.append(Candidate(Choice.parse(label), None, f"not judged: raced {speed[label] / speed[first]:.2f}x "
                                   f"the time of {first}, which met the budget"))
            continue
        tried.append(_judge_built(Choice.parse(label), cand, budget, reference, holdout, built, missed))
    tried += mix(job, missed, built, samples, budget, reference, speed)
    notes += [f"{c.label}: {c.why}" for c in tried if c.why]

    def keep_fp32(fast: dict) -> Optimized:
        # the fp32 plan's own agreement is measured only where it stays the plan; elsewhere the winner's is reported
        fp32_report = evaluate(budget, reference, _outputs(opt, holdout))
        opt.precision_search = PrecisionRecord(budget, samples.source, tuple(tried), fp32_report, fast, FP32)
        verdict.save(opt.precision_search, notes)
        return _keep_fp32(opt, fp32_report, notes)
    if not built:
        notes.append("no lower precision both gained over the fp32 plan and met the budget on this machine; the plan "
                     "stays fp32")
        return keep_fp32({})
    (only, *more) = built
    if not more and only in raced and speed[only] <= (1 - s.split_margin) / (1 + s.race_close):
        # one contender, clear of the fp32 plan by more than a close race's extra rounds could move it: the
        # screen's race stands (on bert-base, racing it again cost 5 s of a cold optimize)
        best, (fast, med) = only, raced[only]
        said = [f"raced against fp32 (faster half of rounds): {_race_report(fast)}; the only one to meet the "
                f"budget, and clear of the split margin by more than {s.race_close:.0%}: not raced again"]
    else:
        best, fast, med, said = pick(opt, built, job)
    notes += said
    if best == FP32:
        return keep_fp32(fast)
    rec = PrecisionRecord(budget, samples.source, tuple(tried), None, fast, best)
    # in the saved verdict, so that a warm optimize does not measure it again
    rec = rec.with_example(best, example_agreement(built[best], next(c for c in tried if c.label == best)
                                                   .report.to_dict()))
    won = next(c for c in rec.candidates if c.label == best)
    verdict.save(rec, notes)
    return _promote(opt, built[best], won, fast, med, notes, rec)


def prepare(job: Job, budget: Budget | None, calibration: Any) -> tuple[Budget, Samples]:
    """The budget (the caller's, or the default for the model's output) and the calibration and held-out samples;
    a DIOEError where either does not fit the model."""
    captured = job.captured
    budget = budget or Budget.default_for(captured.unflatten_outputs(captured.reference_outputs()))
    with _trace.stage("precision: samples"):
        samples = split(calibration, captured.example_inputs, n_calibrate=job.settings.calibration_samples,
                        n_holdout=budget.holdout_inputs(_batch(captured)))
    return budget, samples


class Inputs:
    """`prepare`'s budget and samples, drawn once per optimize: a one-shot calibration iterator (or a callable that
    draws anew each call) is read once, whichever of the warm start and the search asks first. A DIOEError that
    drawing raised is raised again to each."""

    def __init__(self, job: Job, budget: Budget | None, calibration: Any):
        self._args, self._got = (job, budget, calibration), None
        self.handed: tuple | None = None   # a rebuilt winner, from the warm start to reuse (`precision_warm.hand_on`)

    def get(self) -> tuple[Budget, Samples]:
        if self._got is None:
            try:
                self._got = prepare(*self._args)
            except DIOEError as e:
                self._got = e
        if isinstance(self._got, DIOEError):
            raise self._got
        return self._got


def _batch(captured) -> int:
    return next((x.shape[0] for x in captured.example_inputs if isinstance(x, torch.Tensor) and x.dim()), 1)


def _keep_fp32(opt: Optimized, fp32_report: AccuracyReport, notes: Sequence[str]) -> Optimized:
    opt.plan = replace(opt.plan, accuracy=fp32_report.to_dict(), notes=opt.plan.notes + tuple(notes))
    return opt


def eager_outputs(job: Job, inputs: Sequence[Sequence]) -> list[tuple]:
    """fp32 eager's outputs on `inputs`: what every candidate is judged against."""
    with torch.inference_mode():
        return [tuple(job.captured.gm(*x)) for x in inputs]


def judge(job: Job, options: Sequence[Choice], samples: Samples, budget: Budget, reference: Sequence, *,
          missed: dict[str, Optimized] | None = None) -> tuple[list[Candidate], dict[str, Optimized]]:
    """Build every option calibrated on `samples.calibrate` and judge it on `samples.holdout` against `reference`
    (fp32 eager's outputs on them): what each did, and the built ones that met the budget, by label. `missed`,
    if given, receives the built ones that missed it (else they are closed)."""
    holdout = [list(x) for x in samples.holdout]
    built: dict[str, Optimized] = {}
    tried: list[Candidate] = []
    for option in options:
        cand = _build(job, option, samples)
        if isinstance(cand, str):
            tried.append(Candidate(option, None, cand))
            continue
        tried.append(_judge_built(option, cand, budget, reference, holdout, built, missed))
    return tried, built


def _judge_built(option: Choice, cand: Optimized, budget: Budget, reference: Sequence, holdout: Sequence,
                 built: dict[str, Optimized], missed: dict[str, Optimized] | None) -> Candidate:
    """`cand` (`option`, built) judged on `holdout`: into `built` when it met the budget, into `missed` (if given,
    else closed) when it missed it, closed when it fell back to torch on the way."""
    why = ""
    report = evaluate(budget, reference, _outputs(cand, holdout))
    if cand.runtime.stats["fallbacks"]:  # its outputs were torch's fp32, not its own
        why = f"failed while judged and fell back to torch: {next(iter(cand.runtime.fallbacks.values()))[:300]}"
        cand.runtime.close()
    elif not report.met:
        why = f"misses the budget: {report.summary()}"
        if missed is None:
            cand.runtime.close()
        else:
            missed[option.label()] = cand
    else:
        built[option.label()] = cand
    return Candidate(option, report, why)


def _rest_for(low: Choice, c: Choice) -> bool:
    """Whether `c` could run the parts of a mix of `low` that stay out of it: a 16-bit float on the same member and
    engine."""
    return c.precision in mixed.HIGH[1:] and (c.member, c.backend) == (low.member, low.backend)


def _may_be_high(label: str, missed: Iterable[str]) -> bool:
    """Whether `label` is a 16-bit float that a faster candidate of the same member and engine, which missed the
    budget, could be mixed with (`mix`): then it is judged whatever its speed."""
    return any(_rest_for(m, Choice.parse(label)) for m in map(Choice.parse, missed))


def screen(fp32: Optimized, job: Job, options: Sequence[Choice],
           samples: Samples) -> tuple[list[Candidate], dict[str, Optimized], dict[str, float], dict[str, tuple]]:
    """Build every option (calibrated) and race it against `fp32` (the fp32 plan): those that gain `split_margin`
    go on to be judged, by label; the others are out, closed, each saying why. Also each one's time over the fp32
    plan's in the race it was timed in, by label, and the times of both in that race (fast half, median)."""
    s = job.settings
    tried: list[Candidate] = []
    built: dict[str, Optimized] = {}
    # work an engine does in a process of its own (NNCF's calibration) starts first, and its candidate is built
    # last: the others build meanwhile
    calib = [list(x) for x in samples.calibrate]
    started, stops = {}, []
    try:
        for option in options:
            started[option], stop = building.prepare(job.captured, _plan_for(job, option), job.pool,
                                                     settings=s, calibration=calib)
            stops.append(stop)
        for option in sorted(options, key=started.get):
            cand = _build(job, option, samples)
            if isinstance(cand, str):
                tried.append(Candidate(option, None, cand))
            else:
                built[option.label()] = cand
    finally:
        for stop in stops:
            stop()
    if not built:
        return tried, {}, {}, {}
    fast, med = _race({FP32: fp32, **built}, job, s.race_rounds)
    # each candidate's times and the fp32 plan's, from the same race (fast half, median)
    raced = {k: ({FP32: fast[FP32], k: v}, {FP32: med[FP32], k: med[k]}) for k, v in fast.items() if k != FP32}
    bar = 1 - s.split_margin
    # one within `race_close` of the bar is timed again over more rounds, as the race does for close contenders:
    # the verdict is cached, so one noisy spell would otherwise keep fp32 for as long as it lasts
    close = {k: c for k, c in built.items() if k in fast and bar < fast[k] / fast[FP32] <= bar * (1 + s.race_close)}
    if close and s.race_extra:
        again, again_med = _race({FP32: fp32, **close}, job, s.race_rounds + s.race_extra)
        for k in close:
            if k in again:
                raced[k] = ({FP32: again[FP32], k: again[k]}, {FP32: again_med[FP32], k: again_med[k]})
            else:
                raced.pop(k, None)   # it fell back while timed again
    vs = {k: (f[k], f[FP32]) for k, (f, _) in raced.items()}
    keep = {}
    for label, cand in built.items():
        if label not in vs:
            why = f"fell back to torch while timed: {next(iter(cand.runtime.fallbacks.values()), '')[:300]}"
        elif vs[label][0] > vs[label][1] * bar:
            why = (f"not judged: raced {vs[label][1] / vs[label][0]:.2f}x the fp32 plan's speed, and a lower "
                   f"precision must gain {s.split_margin:.0%}")
        else:
            keep[label] = cand
            continue
        cand.runtime.close()
        tried.append(Candidate(Choice.parse(label), None, why))
    return tried, keep, {k: t / t32 for k, (t, t32) in vs.items()}, raced


def mix(job: Job, missed: dict[str, Optimized], built: dict[str, Optimized], samples: Samples, budget: Budget,
        reference: Sequence, speed: dict[str, float]) -> list[Candidate]:
    """For each lower precision whose whole graph raced faster than the fp32 plan but missed the budget (`missed`,
    by label, closed here), the mix of it and a higher precision over parts of the graph that meets it
    (`dioe.mixed`), added to `built` by label; what each search found. The higher precision is the fastest 16-bit
    float of the same member and engine that met the budget whole, else (or where that finds no mix) fp32. One whose
    whole graph did not race `split_margin` faster than a candidate that met the budget is not mixed: a mix is
    slower than its whole graph. `speed`: each label's time over the fp32 plan's, as screened."""
    out = []
    margin = job.settings.split_margin
    for label, whole in sorted(missed.items(), key=lambda kv: speed[kv[0]]):
        whole.runtime.close()
        if job.settings.mixed_parts < 2:
            continue
        option = Choice.parse(label)
        # a mix runs no faster than its whole graph low: one that cannot beat what already met the budget is out
        met = [k for k in built if speed.get(k) is not None]
        first = min(met, key=speed.get) if met else None
        if first and speed[label] > speed[first] * (1 - margin):
            out.append(Candidate(option, None, f"not mixed: its whole graph raced {speed[label] / speed[first]:.2f}x "
                                 f"the time of {first}, which met the budget whole, and a mix must gain "
                                 f"{margin:.0%} on it"))
            continue
        high = min((c for c in map(Choice.parse, met) if _rest_for(option, c)), key=lambda c: speed[c.label()],
                   default=None)
        # with fp32 as the rest too where the 16-bit float's mix found nothing: its own error leaves the int8 parts
        # less of the budget, and one of its engines may fail where fp32's does not
        for rest in dict.fromkeys((high.precision if high else "fp32", "fp32")):
            found, report, opt, why = mixed.search(job, option, samples, budget, reference, high=rest)
            if opt is not None:
                break
            out.append(Candidate(option, None, f"mixed with {rest}: {why}"))
        if opt is None:
            continue
        built[found.label()] = opt
        out.append(Candidate(option, report, "", found))
    return out


def pick(opt: Optimized, built: dict[str, Optimized], job: Job) -> tuple[str, dict, dict, list[str]]:
    """Race `opt` (the fp32 plan) and the `built` candidates side by side: the winner's label (`FP32` unless one
    gains more than `split_margin`), each one's fast-half and median times, and what the race said. Every loser
    among `built` is closed."""
    s = job.settings
    notes = []
    fast, med = _race({FP32: opt, **built}, job, s.race_rounds + s.race_extra)
    for k in list(built):
        if k not in fast:  # it failed while racing: its times are torch's
            built.pop(k).runtime.close()
    best = min(fast, key=fast.get)
    report = _race_report(fast)
    # a lower precision must gain what a split must: within the margin, fp32 loses nothing to keep
    if best != FP32 and fast[best] > fast[FP32] * (1 - s.split_margin):
        notes.append(f"lower precisions raced within {s.split_margin:.0%} of fp32 ({report}); kept fp32")
        best = FP32
    for k, c in built.items():
        if k != best:
            c.runtime.close()
    notes.append(f"raced against fp32 (faster half of rounds): {report}")
    return best, fast, med, notes


def _race(contenders: dict[str, Optimized], job: Job, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """The contenders timed side by side: each one's mean of its faster half of rounds, and its median; one that
    fell back to torch while timed is left out (its times are torch's)."""
    s = job.settings
    runs = {k: o.runtime.run for k, o in contenders.items()}
    with _trace.stage("precision: time side by side", contenders=list(runs)):
        times = timing.side_by_side(runs, job.captured.example_inputs, rounds=rounds, repeats=s.race_repeats,
                                    budget_s=s.timing_budget_s / s.race_rounds)
    times = {k: v for k, v in times.items() if k == FP32 or not contenders[k].runtime.stats["fallbacks"]}
    return ({k: timing.fast_half(v) for k, v in times.items()}, {k: statistics.median(v) for k, v in times.items()})


def _race_report(fast: dict[str, float]) -> str:
    return ", ".join(f"{k} {show_ms(v)} ms" for k, v in sorted(fast.items(), key=lambda kv: kv[1]))


def _promote(opt: Optimized, winner: Optimized, won: Candidate, fast: dict, med: dict, notes: Sequence[str],
             record: PrecisionRecord) -> Optimized:
    """`winner` (a lower precision that met the budget and beat the fp32 plan) in place of `opt`, its plan saying
    why, with the fp32 plan as its runner-up."""
    opt.runtime.close()
    winner.plan = promoted_plan(opt.plan, winner, won, fast, med, notes)
    winner.race = opt.race
    winner.precision_search = record
    return winner


def promoted_plan(fp32: Plan, winner: Optimized, won: Candidate, fast: dict, med: dict, notes: Sequence[str]):
    """`winner`'s plan saying why it won over the `fp32` plan (its runner-up), the fp32 plan's notes and eager time
    carried over; its accuracy report adds its agreement on the example inputs (`reload.with_example`)."""
    best, fp32_parts = won.label, fp32.partitions
    said = (f"{won.option.precision} met the budget ({won.report.summary()}) and raced "
            f"{fast[FP32] / fast[best]:.2f}x faster than the fp32 plan")
    if won.mix:   # each part says why it runs at its precision; the whole says why the mix won
        parts = winner.plan.partitions
        notes = tuple(notes) + (f"mixed precision: {won.label}: {said}",)
    else:
        (part,) = winner.plan.partitions
        runner = replace(fp32_parts[0].choice, predicted_ms=round_ms(med[FP32])) if len(fp32_parts) == 1 else None
        parts = (replace(part, measured_ms=round_ms(med[best]), runner_up=runner, reason=said),)
    return replace(winner.plan, partitions=parts, predicted_ms=round_ms(med[best]), measured_ms=round_ms(med[best]),
                   eager_ms=fp32.eager_ms, accuracy=with_example(winner, won.report.to_dict(), won.example),
                   notes=fp32.notes + tuple(notes))


def candidates(job: Job, precision: str) -> list[Choice]:
    """Each backend's best whole-graph member, at every lower precision both it and the member run."""
    below = _BELOW_FP32[check_precision(precision)]
    if not below:
        return []
    out = []
    seen = set()
    for option, _ in partition.whole_graph_options(job.segments, job.profile, job.pool):
        if option.backend in seen:
            continue
        seen.add(option.backend)
        member = job.pool[option.member]
        engine = registry.backend_class(option.backend)
        out += [Choice(member.id, option.backend, p) for p in below
                if p in engine.precisions and p in member.descriptor.precisions
                and engine.precision_reason(member, p) is None]
    return out


def _build(job: Job, option: Choice, samples: Samples) -> Optimized | str:
    """The whole graph compiled at `option`'s precision, calibrated on the calibration samples; or why not."""
    plan = _plan_for(job, option)
    calib = [list(x) for x in samples.calibrate]
    attempt = building.build_as(option, lambda: building.build(job.captured, plan, job.pool, settings=job.settings,
                                                               objective=job.objective, calibration=calib),
                                stage="precision: build")
    return attempt.built if attempt.built is not None else f"could not be built: {attempt.why}"


def _plan_for(job: Job, option: Choice):
    """The fp32 plan of the same engine and member, at `option`'s precision: the profile timed fp32 only, so the
    forecast is fp32's until a race measures it."""
    fp32 = whole_graph_plan(job, replace(option, precision="fp32"), 0.0)
    return replace(fp32, partitions=tuple(replace(p, precision=option.precision) for p in fp32.partitions))


def _outputs(opt: Optimized, holdout: Sequence[Sequence]) -> list[tuple]:
    with torch.inference_mode():
        return [tuple(opt.runtime.run(x)) for x in holdout]
