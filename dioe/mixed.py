"""Mixed precision: when the whole graph at a lower precision misses the accuracy budget, run only the parts that
can afford it in that precision and keep the rest higher, on the same member and engine: at a 16-bit float that met
the budget over the whole graph where there is one (int8 with bf16 on a CPU that has both), else at fp32.

    >>> mix, opt = search(job, Choice("cpu0", "onnxruntime", "int8"), samples, budget, reference)  # doctest: +SKIP
    >>> [p.precision for p in opt.plan.partitions]                                                 # doctest: +SKIP
    ['int8', 'fp32', 'int8', 'int8']

The graph's segments are cut into `Settings.mixed_parts` contiguous parts of about equal fp32 time. Each part is
compiled once at each of the two precisions, so every mix assembles from those engines without compiling again. Then:

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
HIGH = ("fp32", "bf16", "fp16")   # what the parts that stay higher may run at


@dataclass(frozen=True)
class Mix:
    """Which contiguous parts of the graph (segment ids, in order) run at `option`'s precision; the rest at
    `high`."""

    option: Choice                          # the lower precision's (member, backend, precision)
    parts: tuple[tuple[str, ...], ...]      # segment ids of each part
    low: tuple[bool, ...]                   # per part: at option.precision
    # what the search measured, for the plan: each part's time alone at its precision, and why it runs at it
    part_ms: tuple[float, ...] = ()
    reasons: tuple[str, ...] = ()
    high: str = "fp32"                      # the precision of the parts not at option.precision

    def label(self) -> str:
        low = [f"p{i}" for i, x in enumerate(self.low) if x]
        rest = "" if self.high == "fp32" else f" (rest {self.high})"
        return f"{self.option.label()} on {'+'.join(low) or 'none'} of {len(self.parts)} parts{rest}"

    def to_dict(self) -> dict:
        return {"option": self.option.label(), "parts": [list(p) for p in self.parts], "low": list(self.low),
                "part_ms": list(self.part_ms), "reasons": list(self.reasons), "high": self.high}

    @classmethod
    def from_dict(cls, d: dict) -> "Mix":
        parts = tuple(tuple(str(s) for s in p) for p in d["parts"])
        low = tuple(bool(x) for x in d["low"])
        part_ms = tuple(float(x) for x in d.get("part_ms", ()))
        reasons = tuple(str(x) for x in d.get("reasons", ()))
        high = str(d.get("high", "fp32"))
        if len(parts) != len(low) or any(len(x) not in (0, len(parts)) for x in (part_ms, reasons)):
            raise DIOEError(f"a mixed-precision record names {len(parts)} parts but {len(low)} precisions, "
                            f"{len(part_ms)} times and {len(reasons)} reasons")
        if high not in HIGH:
            raise DIOEError(f"a mixed-precision record's higher precision must be one of {', '.join(HIGH)}; got "
                            f"{high!r}")
        return cls(Choice.parse(d["option"]), parts, low, part_ms, reasons, high)


def cut(job: Job, fp32: Choice, n: int) -> tuple[tuple[str, ...], ...]:
    """The job's segments in at most `n` contiguous parts of about equal time at `fp32` (from the profile): a part
    per share of the time, so that each part is worth lowering on its own. A segment heavier than a share (a
    model's large head) makes a part of its own."""
    times = [job.profile.times[s.id][fp32].median_ms for s in job.segments]
    n = min(n, len(times))
    total = sum(times) or 1.0
    parts: list[list[str]] = [[]]
    done = 0.0
    for s, t in zip(job.segments, times):
        # a segment whose middle lies past the parts' shares so far starts a new part
        if parts[-1] and done + t / 2 >= total * len(parts) / n and len(parts) < n:
            parts.append([])
        parts[-1].append(s.id)
        done += t
    return tuple(tuple(p) for p in parts)


def mixed_plan(job: Job, mix: Mix) -> Plan:
    """The plan that runs each part of `mix` as one partition on the option's member and engine, low or high;
    neighbours at the same precision stay apart, so that every mix runs the same compiled engines. Each part's
    forecast is its measured time at its precision where the search measured it, else the profile's fp32 sum."""
    fp32 = replace(mix.option, precision="fp32")
    base = whole_graph_plan(job, fp32, 0.0)
    seg = {s.id: s for s in job.segments}
    parts = []
    for i, (ids, low) in enumerate(zip(mix.parts, mix.low)):
        ss = [seg[x] for x in ids]
        nodes = tuple(n for s in ss for n in s.nodes)
        ms = mix.part_ms[i] if mix.part_ms else \
            run_as_one_ms([job.profile.times[x][fp32].median_ms for x in ids], fp32)
        parts.append(PlanPartition(f"p{i}", ids, nodes, fp32.member, fp32.backend,
                                   mix.option.precision if low else mix.high, len(nodes),
                                   round(sum(s.cost.flops for s in ss) / 1e9, 4), round_ms(ms),
                                   reason=mix.reasons[i] if mix.reasons else ""))
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


def search(job: Job, option: Choice, samples: Samples, budget: Budget, reference: Sequence,
           high: str = "fp32") -> tuple[Mix | None, AccuracyReport | None, Optimized | None, str]:
    """The mix of `option` (a lower precision whose whole graph missed the budget) and `high` found as the module
    docstring says: (mix, its report on every held-out sample, the model, what happened); the model is None,
    with the reason, when no part can run low within the budget, or the parts could not be built."""
    parts = cut(job, replace(option, precision="fp32"), job.settings.mixed_parts)
    if len(parts) < 2:
        return None, None, None, "the graph makes one part only: nothing to mix"
    none = Mix(option, parts, (False,) * len(parts), high=high)
    with _trace.stage("precision: mixed", option=option.label(), high=high, parts=len(parts)):
        low, up, broken = _engines(job, none, samples)
        if low is None:
            return None, None, None, broken   # why the parts could not be built
        try:
            return _greedy(job, none, low, up, budget, reference, [list(x) for x in samples.holdout], broken)
        except DIOEError as e:   # a high part failed while timed: no mix can run without it
            return None, None, None, str(e)[:300]
        finally:
            low.runtime.close()
            up.runtime.close()


def _greedy(job: Job, none: Mix, low: Optimized, up: Optimized, budget: Budget, reference: Sequence,
            holdout: list, broken: dict[int, str]):
    """Steps 1-3 of the module docstring over the compiled parts, from `none` (no part low); `broken`: parts whose
    low engine failed to compile, by index, with why."""
    n, prec, high = len(none.parts), none.option.precision, none.high

    def lowered(chosen) -> Mix:
        return replace(none, low=tuple(j in chosen for j in range(n)))
    high_ms, low_ms, broken = _times(job, none, low, up, broken)
    gain = {i: high_ms[i] - low_ms[i] for i in low_ms}
    rank = max(1, min(RANK_SAMPLES, len(holdout)))
    used: dict[int, float] = {}
    for i in sorted(i for i in gain if gain[i] > 0):
        got = _judge(job, lowered({i}), low, up, budget, reference[:rank], holdout[:rank])
        if got is None:
            broken[i] = "fell back to torch while judged"
        else:
            used[i] = budget_used(got)
    if not used:
        return None, None, None, f"no part ran faster at {prec} than at {high} on its own" if not broken else \
            f"no part ran faster at {prec} than at {high} on its own, or its {prec} engine failed: " + \
            "; ".join(f"p{i} {w}" for i, w in broken.items())
    chosen: list[int] = []
    report = None
    # a part that alone spends the whole budget cannot join a mix that keeps it (errors seldom cancel)
    for i in sorted((i for i in used if used[i] < 1), key=lambda i: (used[i] / gain[i], i)):
        got = _judge(job, lowered({*chosen, i}), low, up, budget, reference, holdout)
        if got is not None and got.met:
            chosen.append(i)
            report = got
    if not chosen:
        return None, None, None, f"no part at {prec} kept the model within the budget"

    def reason(i: int) -> str:
        if i in broken:
            return f"{high}: its {prec} engine {broken[i]}"
        if i in chosen:
            return f"{prec}: alone it used {used[i]:.0%} of the budget, for {show_ms(gain[i])} ms gained"
        if i in used and used[i] >= 1:
            return f"{high}: at {prec} alone it used {used[i]:.0%} of the budget"
        if i in used:
            return (f"{high}: at {prec} it missed the budget with the parts lowered before it (alone it used "
                    f"{used[i]:.0%} of it, for {show_ms(gain[i])} ms gained)")
        return f"{high}: not faster at {prec} alone ({show_ms(-gain[i])} ms slower)"
    mix = replace(lowered(chosen), part_ms=tuple(round_ms(low_ms[i] if i in chosen else high_ms[i]) for i in range(n)),
                  reasons=tuple(reason(i) for i in range(n)))
    return mix, report, _assemble(job, mix, low, up), ""


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
    if _fell_back(opt, mix):
        opt.runtime.close()
        return "a part fell back while compiling"
    return opt


def _engines(job: Job, none: Mix, samples: Samples):
    """Every part of `none` compiled at its option's precision (calibrated) and at its high precision, from one
    build each: (the low model, the high model, the low parts that fell back to torch while compiling, by index,
    with why); or (None, None, why) when a build failed or a high part fell back (then no mix can run the engines
    it was timed with)."""
    calib = [list(x) for x in samples.calibrate]
    every = replace(none, low=(True,) * len(none.parts))
    built = {}
    for mix in (every, none):
        try:
            # the engines' warnings (a quantizer's pre-processing that failed on a part) are the parts', not the
            # plan's: what falls back is checked below, and a mix that keeps the budget is judged end to end
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built[mix is every] = building.build(job.captured, mixed_plan(job, mix), job.pool,
                                                     settings=job.settings, objective=job.objective,
                                                     calibration=calib if mix is every else None)
        except DIOEError as e:
            for o in built.values():
                o.runtime.close()
            return None, None, f"its parts could not be built: {str(e)[:300]}"
    low, up = built[True], built[False]
    if _fell_back(up, none):
        low.runtime.close()
        up.runtime.close()
        return None, None, f"a part fell back to torch while compiling at {none.high}"
    return low, up, {int(pid[1:]): "fell back to torch while compiling" for pid in _fell_back(low, every)}


def _fell_back(opt: Optimized, mix: Mix) -> list[str]:
    """The partitions of `opt`, built for `mix`, that do not run as `mix` says. Not read from `opt.plan`: the build
    rewrites a partition that failed to compile as the torch partition it became."""
    want = {f"p{i}": (mix.option.member, mix.option.backend, mix.option.precision if x else mix.high)
            for i, x in enumerate(mix.low)}
    return [pid for pid, c in opt.runtime.compiled.items() if (c.member, c.backend, c.precision) != want[pid]]


def _times(job: Job, none: Mix, low: Optimized, up: Optimized, broken: dict[int, str]):
    """Each part's high and low engines timed side by side on the part's own inputs (mean of the faster half of
    rounds): (high ms by part, low ms by the parts whose low engine ran, `broken` with those that failed)."""
    from . import backends as registry

    s = job.settings
    n = len(none.parts)
    broken = dict(broken)
    runs = {}
    for i in range(n):
        pid = f"p{i}"
        for tag, opt in (("high", up), ("low", low)):
            c = opt.runtime.compiled[pid]
            if tag == "low" and i in broken:
                continue
            args = registry.get(c.backend, s.cache_dir).to_io(low.program.partition(pid).example_inputs,
                                                              job.pool[c.member])
            try:
                c(*args)   # a failing engine is out before the timing, which would not survive it
            except Exception as e:  # noqa: BLE001 -- any engine error: the part stays high, and says why
                if tag == "high":
                    raise DIOEError(f"partition {pid} failed at {none.high} while timed: {type(e).__name__}: "
                                    f"{e}") from e
                broken[i] = f"failed while timed: {type(e).__name__}: {str(e)[:200]}"
                continue
            # keys carry the engine's label, which the timing reports as it does any contender's
            runs[f"{pid} {Choice(c.member, c.backend, c.precision).label()}"] = lambda _, c=c, a=args: c(*a)
    times = timing.side_by_side(runs, (), rounds=s.race_rounds, repeats=s.race_repeats, warm=True,
                                budget_s=s.timing_budget_s / s.race_rounds / n)
    fast = {k: timing.fast_half(v) for k, v in times.items()}
    high_ms, low_ms = {}, {}
    for k, ms in fast.items():
        pid, label = k.split(" ", 1)
        (low_ms if Choice.parse(label).precision == none.option.precision else high_ms)[int(pid[1:])] = ms
    return high_ms, low_ms, broken


def _judge(job: Job, mix: Mix, low: Optimized, up: Optimized, budget: Budget, reference: Sequence,
           inputs: Sequence) -> AccuracyReport | None:
    """`mix`, assembled from the compiled parts, judged on `inputs` against `reference`; None when a part fell
    back to torch on the way (its outputs would be torch's fp32, not the mix's)."""
    opt = _assemble(job, mix, low, up)
    try:
        with torch.inference_mode():
            got = [tuple(opt.runtime.run(x)) for x in inputs]
        return None if opt.runtime.stats["fallbacks"] else evaluate(budget, reference, got)
    finally:
        opt.runtime.close()


def _assemble(job: Job, mix: Mix, low: Optimized, up: Optimized) -> Optimized:
    """The model that runs each part of `mix` on the engine already compiled for its precision."""
    compiled = {f"p{i}": (low if x else up).runtime.compiled[f"p{i}"] for i, x in enumerate(mix.low)}
    keys = {p.id: p.calibration for p in low.plan.partitions}
    plan = mixed_plan(job, mix)
    plan = replace(plan, partitions=tuple(replace(p, calibration=keys[p.id] if x else None)
                                          for p, x in zip(plan.partitions, mix.low)))
    return Optimized(job.captured, plan, low.program,
                     Runtime(low.program, compiled, job.pool, cache_dir=job.settings.cache_dir))
