"""Mixed precision: when the whole graph at a lower precision misses the accuracy budget, run only the parts that
can afford it in that precision and keep the rest at fp32, on the same member and engine.

    >>> mix, opt = search(job, Choice("cpu0", "onnxruntime", "int8"), samples, budget, reference)  # doctest: +SKIP
    >>> [p.precision for p in opt.plan.partitions]                                                 # doctest: +SKIP
    ['int8', 'fp32', 'int8', 'int8']

The graph's segments are cut into `Settings.mixed_parts` contiguous parts of about equal fp32 time. Each part is
compiled once at each precision, so every mix assembles from those engines without compiling again. Then:

1. each part's gain is its two engines timed side by side on its own inputs (so the quantize and dequantize
   at its boundaries are inside what is timed);
2. each part's sensitivity is the share of the budget the model uses with that part alone lowered, judged on
   the first held-out samples;
3. parts go low greedily, least budget used per ms gained first; a part is kept low only if the whole model,
   judged on every held-out sample, still meets the budget (the end-to-end metric decides, not the sum of the
   parts' shares: errors do not add).

What comes out races the fp32 plan and the other candidates like any of them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from . import build as building
from . import timing
from . import tracing as _trace
from .accuracy import METRICS, AccuracyReport, Budget, evaluate
from .calibration import Samples
from .errors import DIOEError
from .optimized import Optimized
from .partition import run_as_one_ms
from .plan import Choice, Plan, PlanPartition, PlanStage
from .planner import Job, whole_graph_plan
from .runtime import Runtime
from .text import round_ms, show_ms

RANK_SAMPLES = 16   # held-out inputs each part's sensitivity is ranked on; acceptance judges on all of them


@dataclass(frozen=True)
class Mix:
    """Which contiguous parts of the graph (segment ids, in order) run at `option`'s precision; the rest fp32."""

    option: Choice                          # the lower precision's (member, backend, precision)
    parts: tuple[tuple[str, ...], ...]      # segment ids of each part
    low: tuple[bool, ...]                   # per part: at option.precision

    def label(self) -> str:
        low = [f"p{i}" for i, x in enumerate(self.low) if x]
        return f"{self.option.label()} on {'+'.join(low) or 'none'} of {len(self.parts)} parts"

    def to_dict(self) -> dict:
        return {"option": self.option.label(), "parts": [list(p) for p in self.parts], "low": list(self.low)}

    @classmethod
    def from_dict(cls, d: dict) -> "Mix":
        parts = tuple(tuple(str(s) for s in p) for p in d["parts"])
        low = tuple(bool(x) for x in d["low"])
        if len(parts) != len(low):
            raise DIOEError(f"a mixed-precision record names {len(parts)} parts but {len(low)} precisions")
        return cls(Choice.parse(d["option"]), parts, low)


def cut(job: Job, fp32: Choice, n: int) -> tuple[tuple[str, ...], ...]:
    """The job's segments in at most `n` contiguous parts of about equal time at `fp32` (from the profile): a part
    per share of the time, so that each part is worth lowering on its own."""
    times = [job.profile.times[s.id][fp32].median_ms for s in job.segments]
    n = min(n, len(times))
    total = sum(times) or 1.0
    parts: list[list[str]] = [[]]
    done = 0.0
    for s, t in zip(job.segments, times):
        # a new part starts once the parts so far hold their share of the time
        if parts[-1] and done >= total * len(parts) / n and len(parts) < n:
            parts.append([])
        parts[-1].append(s.id)
        done += t
    return tuple(tuple(p) for p in parts)


def mixed_plan(job: Job, mix: Mix, *, part_ms: Sequence[float] | None = None,
               reasons: Sequence[str] | None = None) -> Plan:
    """The plan that runs each part of `mix` as one partition on the option's member and engine, low or fp32;
    neighbours at the same precision stay apart, so that every mix runs the same compiled engines."""
    fp32 = replace(mix.option, precision="fp32")
    base = whole_graph_plan(job, fp32, 0.0)
    seg = {s.id: s for s in job.segments}
    parts = []
    for i, (ids, low) in enumerate(zip(mix.parts, mix.low)):
        ss = [seg[x] for x in ids]
        nodes = tuple(n for s in ss for n in s.nodes)
        ms = part_ms[i] if part_ms else run_as_one_ms([job.profile.times[x][fp32].median_ms for x in ids], fp32)
        parts.append(PlanPartition(f"p{i}", ids, nodes, fp32.member, fp32.backend,
                                   mix.option.precision if low else "fp32", len(nodes),
                                   round(sum(s.cost.flops for s in ss) / 1e9, 4), round_ms(ms),
                                   reason=reasons[i] if reasons else ""))
    total = round_ms(sum(p.predicted_ms for p in parts))
    return replace(base, partitions=tuple(parts), predicted_ms=total,
                   stages=(PlanStage(fp32.member, tuple(p.id for p in parts), total),))


def budget_used(report: AccuracyReport) -> float:
    """The largest share of its allowance any (metric, output) used, on point estimates: 0 for exact agreement,
    1 at the threshold. Shares compare across metrics where raw margins (cosine's 1e-3, top-1's 1e-2) do not."""
    used = 0.0
    for r in report.results:
        if METRICS[r.metric]:   # higher is better, 1 is exact
            share = (1 - r.value) / max(1 - r.threshold, 1e-12)
        else:                   # lower is better, 0 is exact
            share = r.value / max(r.threshold, 1e-12)
        used = max(used, share)
    return used


def search(job: Job, option: Choice, samples: Samples, budget: Budget,
           reference: Sequence) -> tuple[Mix | None, AccuracyReport | None, Optimized | None, str]:
    """The mix of `option` (a lower precision whose whole graph missed the budget) and fp32 found as the module
    docstring says: (mix, its report on every held-out sample, the model, what happened); the model is None,
    with the reason, when no part can run low within the budget, or the parts could not be built."""
    s = job.settings
    fp32 = replace(option, precision="fp32")
    parts = cut(job, fp32, s.mixed_parts)
    if len(parts) < 2:
        return None, None, None, "the graph makes one part only: nothing to mix"
    holdout = [list(x) for x in samples.holdout]
    with _trace.stage("precision: mixed", option=option.label(), parts=len(parts)):
        engines, why = _engines(job, option, parts, samples)
        if engines is None:
            return None, None, None, why
        low, high, program = engines
        pids = [f"p{i}" for i in range(len(parts))]
        gain = _gains(program, pids, low, high, job)
        rank = max(1, min(RANK_SAMPLES, len(holdout)))
        used: dict[int, float] = {}
        for i in (i for i in range(len(parts)) if gain[i] > 0):
            mix = Mix(option, parts, tuple(j == i for j in range(len(parts))))
            used[i] = budget_used(evaluate(budget, reference[:rank], _outputs(_assemble(job, program, mix, low, high),
                                                                               holdout[:rank])))
        chosen: list[int] = []
        report = None
        # a part that alone spends the whole budget cannot join any mix that keeps it (errors seldom cancel)
        for i in sorted((i for i in used if used[i] < 1), key=lambda i: (used[i] / gain[i], i)):
            trial = Mix(option, parts, tuple(j in chosen or j == i for j in range(len(parts))))
            got = evaluate(budget, reference, _outputs(_assemble(job, program, trial, low, high), holdout))
            if got.met:
                chosen.append(i)
                report = got
    if not gain or max(gain) <= 0:
        return None, None, None, f"no part ran faster at {option.precision} than at fp32 on its own"
    if not chosen:
        return None, None, None, f"no part at {option.precision} kept the model within the budget"
    mix = Mix(option, parts, tuple(j in chosen for j in range(len(parts))))
    reasons = [(f"{option.precision}: alone it used {used[i]:.0%} of the budget for {show_ms(gain[i])} ms gained"
                if i in chosen else
                f"fp32: at {option.precision} it missed the budget with the others (alone it used {used[i]:.0%} of "
                f"it, for {show_ms(gain[i])} ms gained)" if i in used else
                f"fp32: not faster at {option.precision} ({show_ms(-gain[i])} ms slower)")
               for i in range(len(parts))]
    opt = _assemble(job, program, mix, low, high, reasons=reasons)
    return mix, report, opt, ""


def rebuild(job: Job, mix: Mix, samples: Samples) -> Optimized | str:
    """`mix` compiled again, as a warm optimize reuses a verdict: its low parts come from the cache by the same
    calibration key. Or why not."""
    calib = [list(x) for x in samples.calibrate]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # as when it was searched: what fell back is checked below
            opt = building.build(job.captured, mixed_plan(job, mix), job.pool, settings=job.settings,
                                 objective=job.objective, calibration=calib)
    except DIOEError as e:
        return f"could not be built: {str(e)[:300]}"
    if not _runs_as_planned(opt):
        opt.runtime.close()
        return "a part fell back while compiling"
    return opt


def _engines(job: Job, option: Choice, parts, samples: Samples):
    """Every part compiled at `option`'s precision (calibrated) and at fp32, from one build each: (low engines,
    fp32 engines, the program), or None and why."""
    calib = [list(x) for x in samples.calibrate]
    built = {}
    for low in (True, False):
        mix = Mix(option, parts, (low,) * len(parts))
        try:
            # the engines' warnings (a quantizer's pre-processing that failed on a part) are the parts', not the
            # plan's: what falls back is checked below, and a mix that keeps the budget is judged end to end
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = building.build(job.captured, mixed_plan(job, mix), job.pool, settings=job.settings,
                                     objective=job.objective, calibration=calib if low else None)
        except DIOEError as e:
            return None, f"its parts could not be built: {str(e)[:300]}"
        if not _runs_as_planned(opt):
            opt.runtime.close()
            return None, "a part fell back to torch while compiling"
        opt.runtime.close()
        built[low] = opt
    return (built[True], built[False], built[True].program), ""


def _runs_as_planned(opt: Optimized) -> bool:
    want = {p.id: (p.member, p.backend, p.precision) for p in opt.plan.partitions}
    return all((c.member, c.backend, c.precision) == want[pid] for pid, c in opt.runtime.compiled.items())


def _gains(program, pids: Sequence[str], low: Optimized, high: Optimized, job: Job) -> list[float]:
    """Per part, its fp32 engine's time less its low engine's, timed side by side on the part's own inputs."""
    s = job.settings
    runs = {}
    for pid in pids:
        args = program.partition(pid).example_inputs
        for name, opt in (("fp32", high), (low.plan.partitions[0].precision, low)):
            c = opt.runtime.compiled[pid]
            runs[f"{pid} {c.member}/{c.backend}/{name}"] = lambda _, c=c, args=args: c(*args)
    times = timing.side_by_side(runs, (), rounds=s.race_rounds, repeats=s.race_repeats,
                                budget_s=s.timing_budget_s / s.race_rounds / len(pids))
    fast = {k: timing.fast_half(v) for k, v in times.items()}
    out = []
    for pid in pids:
        mine = {k.rsplit("/", 1)[1]: v for k, v in fast.items() if k.split(" ", 1)[0] == pid}
        lowp = next(k for k in mine if k != "fp32")
        out.append(mine["fp32"] - mine[lowp])
    return out


def _assemble(job: Job, program, mix: Mix, low: Optimized, high: Optimized, *,
              reasons: Sequence[str] | None = None) -> Optimized:
    """The model that runs each part of `mix` on the engine already compiled for its precision."""
    compiled = {f"p{i}": (low if x else high).runtime.compiled[f"p{i}"] for i, x in enumerate(mix.low)}
    keys = {p.id: p.calibration for p in low.plan.partitions}
    plan = mixed_plan(job, mix, reasons=reasons)
    plan = replace(plan, partitions=tuple(replace(p, calibration=keys[p.id] if x else None)
                                          for p, x in zip(plan.partitions, mix.low)))
    return Optimized(job.captured, plan, program,
                     Runtime(program, compiled, job.pool, cache_dir=job.settings.cache_dir))


def _outputs(opt: Optimized, inputs: Sequence[Sequence]) -> list[tuple]:
    with torch.inference_mode():
        return [tuple(opt.runtime.run(x)) for x in inputs]
