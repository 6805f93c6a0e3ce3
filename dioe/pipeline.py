"""`dioe.optimize`: capture, segment, profile, partition, compile, verify, measure, race. One readable list.

    >>> import dioe
    >>> model, inputs = dioe.zoo.load("minilm")                  # doctest: +SKIP
    >>> opt = dioe.optimize(model, inputs)                       # doctest: +SKIP
    >>> out = opt(*inputs)                                       # same structure as model(*inputs)
    >>> print(opt.plan.summary())                                # where each part runs, and why
    >>> opt.save("minilm.plan.json"); opt2 = dioe.load("minilm.plan.json", model)
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import backends as registry
from . import build as building
from . import cache as _cache
from . import precision as precisions
from . import precision_live
from . import precision_warm
from . import race as racing
from . import reload
from . import tracing as _trace
from .accuracy import Budget
from .capture import CapturedGraph, capture
from .drift import LiveSettings
from .errors import DIOEError
from .live import Live, go_live
from .optimized import Optimized
from .plan import Plan
from .planner import Job, assign_for, edges_of, make_plan, unless_split_pays, whole_graph_plan
from .pool import ResourcePool
from .profile import profile_segments
from .segment import segment_graph
from .settings import Settings
from .split import split_graph


def optimize(model: torch.nn.Module, example_inputs: Any, *, example_kwargs: Mapping | None = None,
             hardware: Any = "auto", backends: Sequence[str] | None = None, objective: str = "latency",
             cache_dir: str | Path | None = None, verify: bool = True, tolerance: float | None = None,
             progress: bool = False, name: str | None = None, precision: str = "auto",
             accuracy: Budget | None = None, calibration: Any = None, settings: Settings | None = None,
             live: bool | LiveSettings = False) -> Optimized | Live:
    """Optimize `model` for this machine's pool; see the module docstring.

    `precision`: "auto" tries every precision the member and engine run below fp32, under the `accuracy` budget
    (a `dioe.Budget`; by default one picked from the model's output and documented on `Budget.default_for`);
    "fp32" keeps every partition fp32; "bf16", "fp16" or "int8" cap the search there; "live" serves fp32 and
    switches to a lower precision once served inputs show it meets the budget (`dioe.precision_live`).
    `calibration`: input tuples (or a callable returning them) to calibrate int8 on and to judge accuracy with,
    held apart; without it, DIOE
    generates inputs like the example's and says so. `settings` holds every knob (the environment's cache folder
    and cap by default); `cache_dir` and `tolerance`, when given, override its own. `live` (True or a
    `dioe.LiveSettings`) returns the model under live re-planning (`dioe.live`): close it when done."""
    if objective not in ("latency", "throughput"):
        raise DIOEError(f"objective must be 'latency' or 'throughput', got {objective!r}")
    precisions.check_precision(precision)
    precisions.check_budget(accuracy)
    precisions.check_calibration(calibration)
    if not isinstance(live, (bool, LiveSettings)):
        raise DIOEError(f"live must be True, False or a dioe.LiveSettings, got {live!r}")
    if live and precision == "live":
        raise DIOEError("live re-planning (live=...) and precision='live' cannot be combined yet: choose one")
    if precision == "live":
        precision_live.check_options(calibration=calibration)
    settings = _settings(settings, cache_dir=cache_dir, tolerance=tolerance)  # a bad $DIOE_CACHE_MAX fails here
    pool = _pool(hardware)
    backends = check_backends(backends, settings)
    if _trace.active() is not None:
        _trace.active().attach(pool)
    stage = _trace.stage
    # 1. capture: flat ATen graph with shapes, costs and module paths on every node
    with stage("capture"):
        captured = capture(model, example_inputs, example_kwargs, name=name or type(model).__name__)
    # 2. segments: placement units coarse enough that per-call overheads stay small
    with stage("segment"):
        segments = segment_graph(captured.gm, target=settings.segment_target, max_segments=settings.segment_max,
                                 min_share=settings.segment_min_share)
        where = {n: s.id for s in segments for n in s.nodes}
        program = split_graph(captured.gm, lambda node: where[node.name], captured.example_inputs)
    # 3. live profiling of every segment on every legal (member, backend), cached on disk
    with stage("profile", segments=len(segments), backends=list(backends)):
        profile = profile_segments(program.partitions, segments, pool, backends,
                                   graph_hash=captured.structure_hash(), cache_dir=settings.cache_dir,
                                   progress=progress)
    job = Job(captured, tuple(segments), edges_of(program, captured), profile, pool, objective, verify, settings)
    # 4. partition: DP on chains, HEFT on DAGs (for throughput: the least bottleneck of a pipeline of stages),
    #    within capabilities and memory; no split that would not pay
    with stage("partition"):
        plan = make_plan(job, assign_for(job))
        plan = unless_split_pays(job, plan)
    # a warm run reuses the race's verdict for this very plan: it compiles the winner and skips the rivals
    verdict = racing.Verdict(settings.cache_dir, profile, plan)
    if verdict.winner not in (None, racing.PLAN):
        plan = whole_graph_plan(job, verdict.winner, plan.predicted_ms)
    # a warm optimize whose precision verdict for this plan is cached builds what it chose, and not the fp32 plan
    opt, inputs = None, precisions.Inputs(job, accuracy, calibration)
    if precision not in ("fp32", "live") and verdict.winner is not None:
        with stage("precision: warm start", precision=precision):
            opt = precision_warm.warm_start(job, plan, verdict, precision=precision, inputs=inputs)
    if opt is None:
        try:
            opt = _fp32_then_lower(job, plan, verdict, precision=precision, budget=accuracy,
                                   calibration=calibration, inputs=inputs)
        finally:
            precision_warm.release(inputs)   # a rebuilt winner the warm start handed on and the search did not take
    # 10. keep the disk cache under its cap: least recently used artifacts go, never the ones this plan runs
    try:
        _cache.trim(settings.cache_dir, max_bytes=settings.cache_max_bytes,
                    keep=[c.artifact for c in opt.runtime.compiled.values()])
    except DIOEError as e:  # a cache folder DIOE does not own: the model is optimized all the same
        warnings.warn(f"dioe: the cache was not trimmed to its cap: {e}", RuntimeWarning, stacklevel=2)
    if isinstance(opt, Optimized):
        opt.job = job   # live re-planning runs the planner again on this profile
    if live:
        return go_live(opt, live if isinstance(live, LiveSettings) else None)
    return opt


def _fp32_then_lower(job: Job, plan: Plan, verdict: racing.Verdict, *, precision: str, budget: Budget | None,
                     calibration: Any, inputs: precisions.Inputs) -> Optimized:
    """Steps 5-9 of optimize: the fp32 plan compiled, verified, measured and raced; then the lower precisions."""
    stage, settings = _trace.stage, job.settings
    # 5. compile the merged partitions
    with stage("compile", partitions=len(plan.partitions)):
        opt = building.build(job.captured, plan, job.pool, settings=settings, objective=job.objective)
    # 6. verify against eager; a failing partition goes to the reference backend
    if job.verify:
        with stage("verify"):
            opt = building.verify(opt, settings=settings)
    # 7. measure; re-plan once if the prediction was off (not when the verdict chose the plan)
    with stage("measure"):
        opt = racing.measure_plan(opt, job, replan=verdict.winner is None)
    # 8. never lose to a single backend it profiled: race the plan, eager and the best whole-graph choices
    with stage("race whole-graph rivals"):
        opt = racing.race(opt, job, verdict)
    # 9. below fp32: each engine's lower precisions that meet the accuracy budget, raced against the winner so far
    if precision == "live":  # fp32 serves now; a lower precision is built from served inputs in the background
        opt = precision_live.serve(opt, job, budget=budget)
    elif precision != "fp32":
        with stage("precision", precision=precision):
            opt = precisions.choose(opt, job, precision=precision, budget=budget, calibration=calibration,
                                    inputs=inputs)
    return opt


def load(path: str | Path, model: torch.nn.Module, example_inputs: Any = None, *,
         hardware: Any = "auto", cache_dir: str | Path | None = None, settings: Settings | None = None,
         verify: bool = True, strict: bool = False) -> Optimized:
    """Rebuild an optimized model from a saved plan, without profiling.

    The plan file is checked field by field (`dioe.PlanError`), and the model must capture to the graph the plan
    was built for. `verify` (the default) runs one call on `example_inputs` (or inputs like the plan's) against
    eager: a partition that computes something else runs on torch, with a warning, so `load` never returns a model
    that silently computes wrong values; `opt.plan` names what runs. `strict=True` makes any fallback an error."""
    source = str(path)
    plan = Plan.load(path)
    captured: CapturedGraph = reload.capture_for(plan, model, example_inputs, source=source)
    pool = _pool(hardware)
    missing = [m for m in plan.members() if m not in {x.id for x in pool.members}]
    if missing:
        raise DIOEError(f"{path}: plan uses member(s) {missing} that this pool lacks "
                        f"(pool: {[m.id for m in pool.members]})")
    if not pool.same_machine(plan.pool_fingerprint):   # a share of the plan's machine's cores runs it as planned
        warnings.warn(f"dioe: {path} was made for another pool ({plan.pool_fingerprint}, this one is "
                      f"{pool.fingerprint()}): it runs as planned, but its timings and choices were measured there; "
                      "optimize again for the best plan here.", RuntimeWarning, stacklevel=2)
    settings = _settings(settings, cache_dir=cache_dir)
    opt = building.build(captured, plan, pool, settings=settings, objective=plan.objective)
    if verify:
        opt = reload.verify_loaded(opt, plan, source=source, settings=settings, strict=strict)
    elif strict:
        reload.check_as_planned(opt, plan, source=source)
    return opt


def check_backends(backends: Sequence[str] | None, settings: Settings) -> tuple[str, ...]:
    """The backends to profile: those named, each known and installed, or the settings' default ones that are
    installed."""
    if backends is None:
        return tuple(b for b in settings.backends if registry.unavailable_reason(b) is None)
    unknown = [b for b in backends if b not in registry.names()]
    if unknown:
        raise DIOEError(f"unknown backend(s) {unknown}; known: {', '.join(registry.names())}")
    missing = {b: registry.unavailable_reason(b) for b in backends if registry.unavailable_reason(b)}
    if missing:
        raise DIOEError("requested backend(s) unavailable: " + "; ".join(f"{b}: {r}" for b, r in missing.items()))
    return tuple(backends)


def _settings(settings: Settings | None, *, cache_dir=None, tolerance: float | None = None) -> Settings:
    settings = settings or Settings()
    if cache_dir is not None:
        settings = replace(settings, cache_dir=Path(cache_dir))
    if tolerance is not None:
        settings = replace(settings, tolerance=tolerance)
    return settings


def _pool(hardware: Any) -> ResourcePool:
    return hardware if isinstance(hardware, ResourcePool) else ResourcePool.discover(hardware)
