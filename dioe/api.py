"""`dioe.optimize`: capture, segment, profile, partition, compile, verify, run. One readable list.

    >>> import dioe
    >>> model, inputs = dioe.zoo.load("minilm")                  # doctest: +SKIP
    >>> opt = dioe.optimize(model, inputs)                       # doctest: +SKIP
    >>> out = opt(*inputs)                                       # same structure as model(*inputs)
    >>> print(opt.plan.summary())                                # where each part runs, and why
    >>> opt.save("minilm.plan.json"); opt2 = dioe.load("minilm.plan.json", model)
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import linecache
import statistics
import time
import warnings
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import backends as registry
from . import cache as _cache
from . import tracing as _trace
from .backend import Compiled, cache_root
from .capture import MISS, CapturedGraph, TensorSpec, capture
from .errors import BackendError, DIOEError
from .partition import (INPUT, OUTPUT, Assignment, Edges, assign, partition_groups, run_as_one_ms,
                        scale_to_measured, whole_graph_options)
from .plan import Choice, Plan, PlanPartition, round_ms, show_ms
from .pool import ResourcePool
from .profile import measure, option_label, parse_option, profile_segments
from .runtime import Runtime, settle, time_call
from .segment import Segment, segment_graph
from .split import Program, split_graph

# Inductor compiles each segment for seconds; it is profiled only when asked for by name.
DEFAULT_BACKENDS = ("torch", "onnxruntime", "openvino")
REPLAN_THRESHOLD = 0.20
# Whole-graph rivals raced against a split plan: the best option of every backend, however far its prediction
# (a backend compiled whole fuses across segment boundaries, so its sum of segment times overstates it: OpenVINO's
# was out of a 1.25x window on mobilenetv2 and tiny-bert, where it was the fastest engine), and up to RIVALS more
# predicted within RIVAL_WINDOW of the best one.
RIVALS, RIVAL_WINDOW = 2, 1.25
RACE_ROUNDS = 3
# Contenders are ranked by the mean of their faster half of rounds: the machine's noise only ever adds time, and a
# slow spell once put OpenVINO's race median on vit-base at 408 ms, against 221 ms in the same bench's own rounds,
# so torch won; the best round alone favoured a split plan whose median was 2% behind OpenVINO's (bert-base, b8).
# Those within RACE_CLOSE of the leader, and those the profile predicted faster than it, get RACE_EXTRA more rounds,
# unless every one of their rounds was slower than every one of the leader's.
# A split plan must then beat the best single engine by SPLIT_MARGIN: within it, the one engine is kept, which runs
# no copies and wakes one thread pool, not several.
RACE_CLOSE, RACE_EXTRA, SPLIT_MARGIN = 0.10, 3, 0.03
# Calls per contender and round, within the round's share of TIMING_BUDGET_S: a 100 ms model gets 3, a 0.5 ms one
# all 200 (five calls of a sub-millisecond model picked torch at 2.4x the best engine in one bench run).
RACE_REPEATS = 200
EAGER = "torch eager"   # the model as captured: timed in the race as the baseline, never chosen
TIMING_BUDGET_S = 1.0   # per timed contender: heavy models at large batches get fewer runs


class Optimized:
    """A model running under a DIOE plan. Call it like the model."""

    def __init__(self, captured: CapturedGraph, plan: Plan, program: Program, runtime: Runtime):
        self.captured, self.plan, self.program, self.runtime = captured, plan, program, runtime
        # The common call of a one-partition plan on the CPU is this model's __call__ itself: see _hot_call. Python
        # looks __call__ up on the type, so the instance takes a class of its own while its engine is on the CPU.
        self._base, self._hot_class, self._engine, self._rebuild = type(self), None, None, None
        io = captured.hot_io()
        hot = _hot_call(io[0], runtime.direct, program.steps[0].partition, one_output=io[2]) \
            if io is not None and runtime.direct is not None else None
        if hot is not None:
            self._rebuild = io[1]
            base = self._base
            self._hot_class = type(base.__name__, (base,), {"__call__": hot, "__module__": base.__module__,
                                                           "__qualname__": base.__qualname__, "__doc__": base.__doc__})
            runtime.on_replace.append(weakref.WeakMethod(self._bind_engine))  # weak: the runtime keeps no model alive
        self._bind_engine()

    @property
    def _hot(self) -> Callable | None:
        """The generated __call__ while this model is bound to it (its engine on the CPU), else None."""
        return self._hot_class.__call__ if type(self) is self._hot_class else None

    def _bind_engine(self) -> None:
        """Bind the hot call to the partition's engine as compiled now; one that takes another device than the
        CPU (none does today) leaves the hot call until one on the CPU replaces it."""
        if self._hot_class is None:
            return
        c = self.runtime.compiled[self.program.steps[0].partition]
        if c.io_device == "cpu":
            self._engine = c
            self.__class__ = self._hot_class
        else:  # the class first: a hot call under way in another thread still finds the engine it started with
            self.__class__ = self._base

    def __call__(self, *args, **kwargs) -> Any:
        return self._call(args, kwargs)

    def _call(self, args: tuple, kwargs: dict) -> Any:
        """The general path: any plan, any call; a trace records the call's partitions and copies."""
        flat = self.captured.flatten_inputs(args, kwargs)
        tr = _trace.active()
        if tr is None:  # each backend runs its partitions under inference mode itself
            return self.captured.unflatten_outputs(self.runtime.run(flat))
        with torch.inference_mode():
            tr.attach(self.runtime.pool, self.plan)
            tr.before_call()
            call = tr.next_call()
            t0 = time.perf_counter()
            out = self.runtime.run(flat, tr, call)
            tr.add("call", call=call, model=self.plan.model, start=t0, end=time.perf_counter(),
                   sequential=tr.ops and self.runtime.concurrent)
            return self.captured.unflatten_outputs(out)

    @property
    def stats(self) -> dict:
        """Run-time fallbacks: how many calls needed one, and why each partition left its first choice."""
        return {"fallback_calls": self.runtime.stats["fallbacks"], "fallbacks": dict(self.runtime.fallbacks)}

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON (a folder gets `<model>.plan.json`)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / f"{self.plan.model}.plan.json"
        self.plan.save(path)
        return path


def optimize(model: torch.nn.Module, example_inputs: Any, *, example_kwargs: Mapping | None = None,
             hardware: Any = "auto", backends: Sequence[str] | None = None, objective: str = "latency",
             cache_dir: str | Path | None = None, verify: bool = True, tolerance: float | None = None,
             progress: bool = False, name: str | None = None) -> Optimized:
    """Optimize `model` for this machine's pool; see the module docstring."""
    if objective not in ("latency", "throughput"):
        raise DIOEError(f"objective must be 'latency' or 'throughput', got {objective!r}")
    cap = _cache.max_bytes()  # a bad $DIOE_CACHE_MAX fails here, not after the work
    pool = hardware if isinstance(hardware, ResourcePool) else ResourcePool.discover(hardware)
    backends = _check_backends(backends)
    if _trace.active() is not None:
        _trace.active().attach(pool)
    stage = _trace.stage
    # 1. capture: flat ATen graph with shapes, costs and module paths on every node
    with stage("capture"):
        captured = capture(model, example_inputs, example_kwargs, name=name or type(model).__name__)
    # 2. segments: placement units coarse enough that per-call overheads stay small
    with stage("segment"):
        segments = segment_graph(captured.gm)
        program = split_graph(captured.gm, _labeller(segments), captured.example_inputs)
    # 3. live profiling of every segment on every legal (member, backend), cached on disk
    with stage("profile", segments=len(segments), backends=list(backends)):
        profile = profile_segments(program.partitions, segments, pool, backends,
                                   graph_hash=captured.structure_hash(), cache_dir=cache_dir, progress=progress)
    # 4. partition: DP on chains, HEFT on DAGs, within capabilities and memory
    with stage("partition"):
        edges = _edges(program, segments, captured)
        assignment = assign(segments, edges, profile, pool)
        plan = _plan(captured, segments, assignment, profile, pool, objective)
        plan = _unless_split_pays(captured, segments, plan, profile, pool, objective)
    # a warm run reuses the race's verdict for this very plan: it compiles the winner and skips the rivals
    verdict = _Verdict(cache_dir, profile, plan)
    if verdict.winner not in (None, "plan"):
        plan = _whole_graph_plan(captured, segments, verdict.winner, plan.predicted_ms, profile, pool, objective)
    # 5. compile the merged partitions
    with stage("compile", partitions=len(plan.partitions)):
        opt = _build(captured, plan, pool, cache_dir, objective)
    # 6. verify against eager; a failing partition goes to the reference backend
    if verify:
        with stage("verify"):
            opt = _verify(opt, pool, tolerance, cache_dir, objective)
    # 7. measure; re-plan once if the prediction was off by more than 20% (not when the verdict chose the plan)
    with stage("measure"):
        opt = _measure(opt, profile, segments, edges, pool, cache_dir, objective, verify, tolerance,
                       replan=verdict.winner is None)
    # 8. never lose to a single backend it profiled: race the plan, eager and the best whole-graph choices
    with stage("race whole-graph rivals"):
        opt = _race(opt, profile, segments, pool, cache_dir, objective, verify, tolerance, verdict)
    # 9. keep the disk cache under its cap: least recently used artifacts go, never the ones this plan runs
    _cache.trim(cache_dir, max_bytes=cap, keep=[c.artifact for c in opt.runtime.compiled.values()])
    return opt


def load(path: str | Path, model: torch.nn.Module, example_inputs: Any = None, *,
         hardware: Any = "auto", cache_dir: str | Path | None = None) -> Optimized:
    """Rebuild an optimized model from a saved plan, without profiling."""
    plan = Plan.load(path)
    if example_inputs is None:
        example_inputs = tuple(_synthetic(TensorSpec.from_dict(s)) for s in plan.inputs)
    captured = capture(model, example_inputs, name=plan.model)
    if captured.structure_hash() != plan.graph_hash:
        raise DIOEError(f"{path}: this plan was made for a different graph ({plan.graph_hash}); the model captured "
                        f"now hashes to {captured.structure_hash()}. Optimize it again.")
    pool = hardware if isinstance(hardware, ResourcePool) else ResourcePool.discover(hardware)
    missing = [m for m in plan.members() if m not in {x.id for x in pool.members}]
    if missing:
        raise DIOEError(f"{path}: plan uses member(s) {missing} that this pool lacks "
                        f"(pool: {[m.id for m in pool.members]})")
    return _build(captured, plan, pool, cache_dir, plan.objective)


# -- steps ------------------------------------------------------------------------------------------------------
def _check_backends(backends: Sequence[str] | None) -> tuple[str, ...]:
    if backends is None:
        return tuple(b for b in DEFAULT_BACKENDS if registry.unavailable_reason(b) is None)
    unknown = [b for b in backends if b not in registry.names()]
    if unknown:
        raise DIOEError(f"unknown backend(s) {unknown}; known: {', '.join(registry.names())}")
    missing = {b: registry.unavailable_reason(b) for b in backends if registry.unavailable_reason(b)}
    if missing:
        raise DIOEError("requested backend(s) unavailable: " + "; ".join(f"{b}: {r}" for b, r in missing.items()))
    return tuple(backends)


def _labeller(segments: Sequence[Segment]):
    where = {n: s.id for s in segments for n in s.nodes}
    return lambda node: where[node.name]


def _edges(program: Program, segments: Sequence[Segment], captured: CapturedGraph) -> Edges:
    nbytes = {}
    for n in captured.gm.graph.nodes:
        s = n.meta.get("dioe.tensor")
        nbytes[n.name] = s.nbytes if isinstance(s, TensorSpec) else 0
    producer = {v: st.partition for st in program.steps for v in st.outputs}
    out: dict[tuple[str, str], int] = {}
    for st in program.steps:
        for v in st.inputs:
            src = producer.get(v, INPUT)
            out[(src, st.partition)] = out.get((src, st.partition), 0) + nbytes.get(v, 0)
    for v in program.graph_outputs:
        if v is not None and v in producer:
            out[(producer[v], OUTPUT)] = out.get((producer[v], OUTPUT), 0) + nbytes.get(v, 0)
    return Edges(out)


def _plan(captured, segments, assignment, profile, pool, objective, *, replanned=False, notes=()) -> Plan:
    groups = partition_groups(segments, assignment.options, assignment.edges)  # fewer calls, fewer copies
    parts = []
    for i, g in enumerate(groups):
        opt = assignment.options[g[0].id]
        member, backend, prec = parse_option(opt)
        pred = run_as_one_ms([profile.times[s.id][opt].median_ms for s in g], opt)  # one call of its segments
        alts: dict[str, float] = {}
        for o in set.intersection(*(set(profile.times[s.id]) for s in g)) - {opt}:
            alts[o] = run_as_one_ms([profile.times[s.id][o].median_ms for s in g], o)
        runner = min(alts, key=alts.get) if alts else None
        ru = Choice(*parse_option(runner)[:3], predicted_ms=alts[runner]) if runner else None
        if ru is None:
            reason = "only legal choice"
        elif alts[runner] >= pred:
            reason = f"fastest measured ({alts[runner] / max(pred, 1e-9):.2f}x faster than the runner-up)"
        else:
            reason = "not fastest alone; saves copies or member time in the whole schedule"
        nodes = tuple(n for s in g for n in s.nodes)
        gflops = sum(s.cost.flops for s in g) / 1e9
        parts.append(PlanPartition(f"p{i}", tuple(s.id for s in g), nodes, member, backend, prec, len(nodes),
                                   round(gflops, 4), round_ms(pred), None, ru, reason))
    notes = list(notes) + [f"partitioned by {assignment.method}"]
    if profile.same_as:
        notes.append(f"timed {len(segments) - len(profile.same_as)} distinct segment structures; "
                     f"{len(profile.same_as)} of {len(segments)} segments repeat one and share its timings")
    notes += [f"moved for capacity: {m}" for m in assignment.moved_for_capacity]
    notes = list(dict.fromkeys(notes))  # a rival plan inherits the plan's notes: say each once
    return Plan(captured.name, captured.structure_hash(), pool.fingerprint(), objective, tuple(parts),
                round_ms(assignment.predicted_ms),
                inputs=tuple(s.to_dict() if s else {} for s in captured.input_specs),
                replanned=replanned, notes=tuple(notes))


def _unless_split_pays(captured, segments, plan: Plan, profile, pool, objective) -> Plan:
    """The best whole-graph option instead of a split plan predicted to gain less than SPLIT_MARGIN over it. The
    race would keep that one engine unless the split beat it by SPLIT_MARGIN, and segment sums overstate an
    engine compiled whole (it fuses across segment boundaries): such a split has not won a race on one CPU, and
    building it cost bert-base 21 s of its cold optimize."""
    ranked = whole_graph_options(segments, profile, pool)
    if len(plan.partitions) < 2 or not ranked:
        return plan
    option, ms = ranked[0]
    if plan.predicted_ms < ms * (1 - SPLIT_MARGIN):
        return plan
    note = (f"a split plan of {len(plan.partitions)} partitions was predicted at {show_ms(plan.predicted_ms)} ms "
            f"against {show_ms(ms)} ms for {option} over the whole graph; a split must gain {SPLIT_MARGIN:.0%}, so it "
            "was not built")
    return _whole_graph_plan(captured, segments, option, ms, profile, pool, objective, replanned=plan.replanned,
                             notes=tuple(n for n in plan.notes if not n.startswith("partitioned by")) + (note,))


_HOT_CALLS = itertools.count()


def _hot_call(specs: Sequence[tuple], direct: list, pid: str, *, one_output: bool) -> Callable | None:
    """The `__call__` of a model whose plan is one partition on the CPU, generated for its plan: the check of each
    positional input against `specs` ((shape, dtype, device type) each), the engine's own callable (and the
    fallback when it fails) and the output structure (`direct`: Runtime.direct), written out with no loop and no
    call between them. Each layer of the general path is a Python call, 0.1 to 0.2 us after an engine's call has
    left the caches cold: tiny-mlp's 8.1 us engine call took 9.6 us through the five layers of the general path,
    8.8 us through one generated function called by the model's __call__, and 8.6 us as that __call__. Inputs are
    positional-only parameters, so that no tuple is built for them. Any other call (another count, shape, dtype or
    device, keywords, a trace) takes the general path, which says what is wrong. The engine is read from the model
    (`_engine`), so that a replaced one is run at once and the function holds no engine or weights. None where the
    inputs do not allow it."""
    if any(device != "cpu" for _, _, device in specs):
        return None
    names = [f"x{i}" for i in range(len(specs))]
    scope: dict[str, Any] = {"MISS": MISS, "Tensor": torch.Tensor, "pid": pid, "tracing": _trace}
    checks = ["more", "kwargs", "tracing._ACTIVE is not None"]
    for x, (shape, dtype, _) in zip(names, specs):
        scope[f"{x}_shape"], scope[f"{x}_dtype"] = torch.Size(shape), dtype
        # is_cpu reads a flag; x.device.type builds a device object first. A missing input is MISS: no Tensor
        checks.append(f"type({x}) is not Tensor or {x}.shape != {x}_shape or {x}.dtype is not {x}_dtype "
                      f"or not {x}.is_cpu")
    outs = []
    for i, (computed, v) in enumerate(direct):
        if computed:
            outs.append(f"outs[{v}]")
        else:
            scope[f"k{i}"] = v
            outs.append(f"k{i}")
    args = ", ".join(names)
    packed = f"({args}{',' if len(names) == 1 else ''})"
    lines = [f"def __call__(self, {''.join(x + '=MISS, ' for x in names)}/, *more, **kwargs):",
             "    if (" + "\n            or ".join(checks) + "):",
             f"        return self._call(tuple([x for x in {packed} if x is not MISS]) + more, kwargs)",
             "    c = self._engine", "    try:", f"        outs = c.fn({args})", "    except Exception as e:",
             f"        outs = self.runtime._fallback(pid, c, c.failure(e), {packed})",
             f"    return {outs[0]}" if one_output and len(outs) == 1 else
             f"    return self._rebuild(({', '.join(outs)}{',' if len(outs) == 1 else ''}))"]
    source, name = "\n".join(lines) + "\n", f"<dioe hot call {next(_HOT_CALLS)}>"
    exec(compile(source, name, "exec"), scope)  # our own source, built from the plan's specs: no user text
    hot = scope["__call__"]
    # in linecache while it lives, so that a traceback through the call shows its lines, as torch.fx does
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    weakref.finalize(hot, linecache.cache.pop, name, None)
    return hot


def _whole_graph_plan(captured, segments, option: str, predicted_ms: float, profile, pool, objective,
                      **kw) -> Plan:
    """The plan that runs every segment on one (member, backend, precision): a race rival or its winner."""
    return _plan(captured, segments, Assignment({s.id: option for s in segments}, predicted_ms, "whole graph"),
                 profile, pool, objective, **kw)


def _build(captured: CapturedGraph, plan: Plan, pool: ResourcePool, cache_dir, objective: str) -> Optimized:
    where = {n: p.id for p in plan.partitions for n in p.nodes}
    program = split_graph(captured.gm, lambda n: where[n.name], captured.example_inputs)
    compiled: dict[str, Compiled] = {}
    alone = len(plan.partitions) == 1
    for p in plan.partitions:
        member = pool[p.member]
        part = program.partition(p.id)
        try:
            compiled[p.id] = registry.get(p.backend, cache_dir).compile(part, member, p.precision,
                                                                        objective=objective, alone=alone)
        except BackendError as e:
            warnings.warn(f"dioe: {e}. Partition {p.id} runs on torch@{pool.reference.id} instead.", RuntimeWarning)
            compiled[p.id] = registry.get("torch", cache_dir).compile(part, pool.reference, "fp32")
    return Optimized(captured, plan, program, Runtime(program, compiled, pool))


def _verify(opt: Optimized, pool, tolerance, cache_dir, objective) -> Optimized:
    tol = tolerance if tolerance is not None else 1e-4
    reference = pool.reference
    changed = False
    # A plan of one partition that reads the graph's inputs computes the graph's outputs: its partition is checked
    # against the eager reference, computed once per model, and that check is the whole plan's (on bert-base it
    # saves an eager call and a call of the plan, 0.6 s, for the plan and for each whole-graph rival).
    whole = _whole_graph_view(opt)
    for step in opt.program.steps:
        c = opt.runtime.compiled[step.partition]
        if c.backend == "torch" and c.member == reference.id:
            continue
        part = opt.program.partition(step.partition)
        with torch.inference_mode():
            want = whole if whole is not None else part.gm(*part.example_inputs)
            got = c(*registry.get(c.backend, cache_dir).to_io(part.example_inputs, pool[c.member]))
        err = _rel_error(want, got)
        if err > tol:
            warnings.warn(f"dioe: partition {step.partition} on {c.backend}@{c.member} differs from eager by "
                          f"{err:.2e} (> {tol:.0e}); it runs on torch@{reference.id} instead.", RuntimeWarning)
            opt.runtime.replace(step.partition,
                                registry.get("torch", cache_dir).compile(part, reference, "fp32"))
            changed = True
    if changed:
        now = opt.runtime.compiled
        parts = tuple(replace(p, member=now[p.id].member, backend=now[p.id].backend, precision=now[p.id].precision,
                              reason=p.reason if now[p.id].backend == p.backend
                              else "verification failed on the first choice; reference backend")
                      for p in opt.plan.partitions)
        opt.plan = replace(opt.plan, partitions=parts)
    if whole is not None:
        return opt
    flat = opt.captured.example_inputs
    want = opt.captured.reference_outputs()
    with torch.inference_mode():
        got = opt.runtime.run(flat)
    err = _rel_error(want, got)
    if err > tol * 10:
        raise DIOEError(f"optimized {opt.plan.model} differs from eager by {err:.2e} although every partition "
                        f"passed at {tol:.0e}; please report this plan: {opt.plan.to_dict()['partitions']}")
    return opt


def _whole_graph_view(opt: Optimized) -> list | None:
    """The eager reference as the outputs of the plan's one partition, when the plan is one partition that reads
    the graph's inputs and whose every output is a graph output; else None."""
    direct = opt.runtime.direct
    if direct is None:
        return None
    step = opt.program.steps[0]
    want = [None] * len(step.outputs)
    for ref, (computed, j) in zip(opt.captured.reference_outputs(), direct):
        if computed:
            want[j] = ref
    return None if any(w is None for w in want) else want


def _rel_error(want, got) -> float:
    worst = 0.0
    for w, g in zip(want, got):
        if isinstance(w, torch.Tensor) and w.numel():
            w64, g64 = w.detach().double().cpu(), g.detach().double().cpu()
            worst = max(worst, ((w64 - g64).abs().max() / max(w64.abs().max().item(), 1e-6)).item())
    return worst


def _measure(opt: Optimized, profile, segments, edges, pool, cache_dir, objective, verify, tolerance, *,
             replan: bool = True) -> Optimized:
    if not replan:  # the race times the whole plan, side by side with eager, and a plan of one partition with it
        if len(opt.program.steps) > 1:
            opt.plan = opt.plan.with_measurements(_per_partition_ms(opt, cache_dir, pool, warm=verify),
                                                  opt.plan.measured_ms)
        return opt
    flat = opt.captured.example_inputs
    with torch.inference_mode():
        total_ms = time_call(opt.runtime.run, flat, budget_s=TIMING_BUDGET_S, warmup=0 if verify else 2)
    if opt.plan.replanned or abs(total_ms - opt.plan.predicted_ms) <= REPLAN_THRESHOLD * max(opt.plan.predicted_ms,
                                                                                              1e-9):
        # The prediction held. A split plan's partitions are timed alone after the race, and only if it wins:
        # at batch 8 that is three calls of seconds each per partition, spent on a plan that a rival often beats.
        opt.plan = opt.plan.with_measurements(_one_partition_ms(opt, total_ms), round_ms(total_ms))
        return opt
    plan = opt.plan.with_measurements(_per_partition_ms(opt, cache_dir, pool, warm=True, whole_ms=total_ms),
                                      round_ms(total_ms))
    opt.plan = plan
    # The prediction missed: let what the merged partitions measured replace the sums of their segments, in a
    # copy, so that the race below still ranks every option by what its segments measured.
    scaled = copy.deepcopy(profile)
    for p in plan.partitions:
        if p.measured_ms is None:
            continue
        option = option_label(p.member, p.backend, p.precision)
        timed = {sid: t for sid in p.segments if (t := scaled.times[sid].get(option)) is not None}
        # scaled so that the partition, forecast again as one call of its segments, comes to what it measured
        scale = scale_to_measured(p.measured_ms, [t.median_ms for t in timed.values()], option)
        for sid, t in timed.items():
            scaled.times[sid][option] = type(t)(t.median_ms * scale, t.p25_ms * scale, t.p75_ms * scale, t.runs)
    assignment = assign(segments, edges, scaled, pool)
    new_plan = _plan(opt.captured, segments, assignment, scaled, pool, objective, replanned=True,
                     notes=(f"first plan predicted {show_ms(plan.predicted_ms)} ms, measured {show_ms(total_ms)} ms; "
                            "re-planned with partition-level measurements",))
    new_plan = _unless_split_pays(opt.captured, segments, new_plan, scaled, pool, objective)
    if [(p.nodes, p.member, p.backend) for p in new_plan.partitions] == \
            [(p.nodes, p.member, p.backend) for p in plan.partitions]:
        opt.plan = replace(plan, replanned=True, notes=new_plan.notes)
        return opt
    new = _build(opt.captured, new_plan, pool, cache_dir, objective)
    if verify:
        new = _verify(new, pool, tolerance, cache_dir, objective)
    with torch.inference_mode():
        new_ms = time_call(new.runtime.run, flat, budget_s=TIMING_BUDGET_S, warmup=1 if verify else 2)
    if new_ms >= total_ms:  # keep the better of the two, measured side by side
        new.runtime.close()
        opt.plan = replace(plan, replanned=True,
                           notes=new_plan.notes + ("the re-plan measured slower; kept the first",))
        return opt
    opt.runtime.close()
    new.plan = new.plan.with_measurements(_per_partition_ms(new, cache_dir, pool, warm=True, whole_ms=new_ms),
                                          round_ms(new_ms))  # as verified: a partition may have moved to torch
    return new


class _Verdict:
    """What the race decided for one plan, cached beside the profile it was made from: "plan" (the split plan
    won) or the winning whole-graph option. Keyed by the plan's partitions, so a changed plan races again."""

    def __init__(self, cache_dir, profile, plan: Plan):
        key = repr([(p.nodes, p.member, p.backend, p.precision) for p in plan.partitions]).encode()
        self.plan_key = hashlib.blake2b(key, digest_size=8).hexdigest()
        self.path = cache_root(cache_dir) / "profiles" / f"{profile.graph_hash}-{profile.fingerprint}.race.json"
        self.winner, self.report = None, ""
        try:
            data = json.loads(self.path.read_text())
            if data.get("plan") == self.plan_key:
                self.winner, self.report = data["winner"], data.get("report", "")
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no verdict, or an unreadable one: race again

    def save(self, winner: str, report: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"plan": self.plan_key, "winner": winner, "report": report}))


def _race(opt: Optimized, profile, segments, pool, cache_dir, objective, verify, tolerance,
          verdict: _Verdict) -> Optimized:
    """Time the split plan side by side with torch eager and every other backend's best single (member, backend)
    choice compiled over the whole graph, in interleaved rounds; keep the fastest. Its latency and eager's, from
    those same rounds, are what the plan records. With a cached verdict, only the plan it chose and eager are
    timed."""
    if verdict.winner is not None:
        # verification skips a partition on torch at the reference, and a plan of one such partition has not run
        ran = verify and (len(opt.program.steps) > 1 or any(
            (c.backend, c.member) != ("torch", pool.reference.id) for c in opt.runtime.compiled.values()))
        med = {k: statistics.median(v) for k, v in _time_side_by_side(
            {"plan": opt.runtime.run, EAGER: lambda xs: opt.captured.gm(*xs)}, opt.captured.example_inputs,
            warm=ran).items()}
        note = (f"race verdict reused from {verdict.path.name} ({verdict.report}); timed again side by side: "
                f"plan {show_ms(med['plan'])} ms, torch eager {show_ms(med[EAGER])} ms")
        plan = opt.plan.with_measurements(_one_partition_ms(opt, med["plan"]), round_ms(med["plan"]),
                                          round_ms(med[EAGER]))
        (part, *more) = plan.partitions
        if not more and option_label(part.member, part.backend, part.precision) == verdict.winner and \
                _runs_as(opt, verdict.winner):
            plan = replace(plan, partitions=(replace(part, reason="won an earlier optimize's race, kept in "
                                                     f"{verdict.path.name}"),))
        opt.plan = replace(plan, notes=plan.notes + (note,))
        return opt
    ranked = whole_graph_options(segments, profile, pool)
    single = opt.plan.partitions[0] if len(opt.plan.partitions) == 1 else None
    own = option_label(single.member, single.backend, single.precision) if single else None
    # torch on the reference over the whole graph runs the captured graph as it is: eager, which the race times
    # anyway as the baseline, stands for it, and it is built only if it wins.
    ref = option_label(pool.reference.id, "torch", "fp32")
    eager_as = ref if ref != own and ref in dict(ranked) else None
    # The best option of each backend, then options predicted within the window of the best, or below what the
    # plan measured.
    others = [(o, ms) for o, ms in ranked if o not in (own, ref)]
    picks = dict(next((o, ms) for o, ms in others if parse_option(o)[1] == b)
                 for b in dict.fromkeys(parse_option(o)[1] for o, _ in others))
    limit = max(ranked[0][1] * RIVAL_WINDOW, opt.plan.measured_ms or 0.0) if ranked else 0.0
    picks.update([(o, ms) for o, ms in others if ms <= limit and o not in picks][:RIVALS])
    rivals: dict[str, Optimized] = {}
    absent: list[str] = []  # notes on the rivals that could not race, and why: never silently dropped
    # ONNX Runtime's rivals first: OpenVINO converts from the ONNX file they export, except where the graph has
    # attention (its PyTorch frontend keeps that fused; the file is then the way in only if that frontend fails)
    for option, predicted in sorted(picks.items(), key=lambda kv: (parse_option(kv[0])[1] != "onnxruntime", kv[1])):
        plan = _whole_graph_plan(opt.captured, segments, option, predicted, profile, pool, objective,
                                 replanned=opt.plan.replanned,
                                 notes=tuple(n for n in opt.plan.notes if not n.startswith("partitioned by")))
        try:
            with warnings.catch_warnings(record=True) as caught, _trace.stage("build rival", option=option):
                warnings.simplefilter("always")
                rival = _build(opt.captured, plan, pool, cache_dir, objective)
                if verify:
                    rival = _verify(rival, pool, tolerance, cache_dir, objective)
        except DIOEError as e:
            absent.append(f"rival {option} could not be built or verified: {str(e)[:300]}")
            continue
        if not _runs_as(rival, option):
            rival.runtime.close()  # it fell back while compiling or verifying: it would race under a false name
            why = next((str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)), "it fell back")
            absent.append(f"rival {option} fell back to torch while compiling or verifying: {why[:300]}")
            continue
        rivals[option] = rival
    if absent:
        opt.plan = replace(opt.plan, notes=opt.plan.notes + tuple(absent))
    runs = {"plan": opt.runtime.run, **{k: r.runtime.run for k, r in rivals.items()},
            EAGER: lambda xs: opt.captured.gm(*xs)}
    predicted = {"plan": opt.plan.predicted_ms, **{k: picks[k] for k in rivals}}
    if eager_as:
        predicted[EAGER] = dict(ranked)[eager_as]
    flat = opt.captured.example_inputs
    with _trace.stage("time side by side", contenders=list(runs)):
        rounds = _time_side_by_side(runs, flat, warm=verify)
        fast = {k: _fast_half(v) for k, v in rounds.items()}
        lead = min(predicted, key=fast.get)
        # eager joins the extra rounds only when it is close: its rounds are the slowest, and it seldom wins. A
        # contender slower in every round than the leader in any round is out: with three rounds each, two equals
        # split that cleanly one time in twenty, and at batch 8 the extra rounds cost 2-3 s a call.
        again = [k for k in predicted if (fast[k] <= fast[lead] * (1 + RACE_CLOSE)
                 or (k != EAGER and predicted[k] < predicted[lead]))
                 and (k == lead or min(rounds[k]) <= max(rounds[lead]))]
        if len(again) > 1:
            with _trace.stage("more rounds for the close ones", contenders=again):
                more = _time_side_by_side({k: runs[k] for k in again}, flat, rounds=RACE_EXTRA, warm=True)
            for k in again:
                rounds[k] += more[k]
    for k, r in rivals.items():
        if r.runtime.stats["fallbacks"]:
            rounds.pop(k)  # it failed while racing: its times are torch's, not its own
            predicted.pop(k)
    fast = {k: _fast_half(v) for k, v in rounds.items()}
    med = {k: statistics.median(v) for k, v in rounds.items()}
    best = min(predicted, key=fast.get)
    split = own is None
    plan_name = "split plan" if split else f"{own} (the plan)"
    why = f"beat the {plan_name}" if split else f"beat {plan_name}"
    if best == "plan" and split:
        runner = min((k for k in predicted if k != "plan"), key=fast.get, default=None)
        if runner is not None and fast[runner] <= fast["plan"] * (1 + SPLIT_MARGIN):
            best, why = runner, f"was kept: the split plan was less than {SPLIT_MARGIN:.0%} faster"

    labels = {"plan": own, EAGER: eager_as}

    def name(k):
        return {"plan": plan_name, EAGER: f"{EAGER} (= {eager_as})" if eager_as else EAGER}.get(k, k)
    report = ", ".join(f"{name(k)} {show_ms(v)} ms (median {show_ms(med[k])})"
                       for k, v in sorted(fast.items(), key=lambda kv: kv[1]))
    report = f"faster half of {RACE_ROUNDS} rounds (of {RACE_ROUNDS + RACE_EXTRA} for {len(again)})" + \
        f": {report}" if len(again) > 1 else f"faster half of {RACE_ROUNDS} rounds: {report}"
    eager_ms = round_ms(med[EAGER])
    if best == "plan":
        # The verdict is keyed by the first plan, which a re-plan may have replaced: a plan of one partition is
        # saved as its option, which a warm run rebuilds whole; a re-planned split is raced again next time.
        if own is not None:
            verdict.save(own, report)
        elif not opt.plan.replanned:
            verdict.save(best, report)
        for r in rivals.values():
            r.runtime.close()
        # a split plan's partitions are timed alone now, unless re-planning timed them already
        unmeasured = len(opt.program.steps) > 1 and any(p.measured_ms is None for p in opt.plan.partitions)
        plan = opt.plan.with_measurements(_per_partition_ms(opt, cache_dir, pool, warm=True) if unmeasured
                                          else _one_partition_ms(opt, med["plan"]), round_ms(med["plan"]), eager_ms)
        opt.plan = replace(_raced_reason(plan, "plan", fast, predicted, labels),
                           notes=plan.notes + (f"raced side by side, {report}",))
        return opt
    raced = best  # its key in the race's times
    if best == EAGER:  # the captured graph as it is wins: torch on the reference, nothing to verify
        best = eager_as
        rivals[best] = _build(opt.captured, _whole_graph_plan(
            opt.captured, segments, best, predicted[EAGER], profile, pool, objective, replanned=opt.plan.replanned,
            notes=tuple(n for n in opt.plan.notes if not n.startswith("partitioned by") and n not in absent)),
            pool, cache_dir, objective)
        med[best] = med[EAGER]
    verdict.save(best, report)
    winner = rivals.pop(best)
    for o in [opt, *rivals.values()]:
        o.runtime.close()
    plan = winner.plan.with_measurements(_per_partition_ms(winner, cache_dir, pool, warm=True, whole_ms=med[best]),
                                         round_ms(med[best]), eager_ms)
    plan = _raced_reason(plan, raced, fast, predicted, labels)
    winner.plan = replace(plan, notes=plan.notes + tuple(absent) +
                          (f"whole graph on {best} {why}, raced side by side, {report}",))
    return winner


def _runs_as(opt: Optimized, option: str) -> bool:
    """Every partition of `opt` runs compiled for `option`: none fell back to torch while compiling or verifying."""
    return all((c.member, c.backend, c.precision) == parse_option(option) for c in opt.runtime.compiled.values())


def _raced_reason(plan: Plan, key: str, fast: Mapping[str, float], predicted: Mapping[str, float],
                  labels: Mapping[str, str | None]) -> Plan:
    """A one-partition plan chosen by the race says so: its runner-up is the next fastest of the race's other
    single-option contenders and its reason quotes the race's times (mean of each one's faster half of rounds),
    not the segment sums the partitioner ranked, which overstate an engine compiled whole. `predicted` holds the
    contenders that could have been chosen; `labels` names the race's own ("plan", torch eager) as options, or
    None where one is not a single option (a split plan; eager where torch was not a choice)."""
    if len(plan.partitions) != 1:
        return plan
    part = plan.partitions[0]
    others = [k for k in predicted if k != key and labels.get(k, k) is not None]
    runner = min(others, key=fast.get) if others else None
    ru = None
    if runner is not None:
        member, backend, prec = parse_option(labels.get(runner, runner))[:3]
        ru = Choice(member, backend, prec, round_ms(predicted[runner]))
        against = f"against {show_ms(fast[runner])} ms for the runner-up ({fast[runner] / max(fast[key], 1e-9):.2f}x)"
    if key != "plan" and labels.get("plan") is None and "plan" in fast and fast["plan"] < fast[key]:
        reason = (f"kept over the split plan ({show_ms(fast['plan'])} ms, less than {SPLIT_MARGIN:.0%} faster): "
                  f"{show_ms(fast[key])} ms raced side by side" + (f", {against}" if ru else ""))
    elif ru is not None:
        reason = f"fastest raced side by side: {show_ms(fast[key])} ms (faster half of rounds) {against}"
    else:
        return plan
    return replace(plan, partitions=(replace(part, runner_up=ru, reason=reason),))


def _fast_half(rounds: Sequence[float]) -> float:
    """Mean of the faster half of a contender's rounds (the faster two of three)."""
    fast = sorted(rounds)[:(len(rounds) + 1) // 2]
    return sum(fast) / len(fast)


def _time_side_by_side(runs: Mapping[str, Any], flat, *, rounds: int = RACE_ROUNDS,
                       warm: bool = False) -> dict[str, list[float]]:
    """Each callable's median ms per round, timed in interleaved rounds so that drift in the machine's state hits
    every contender alike. The order rotates each round, so that no contender always follows the same one.
    `warm`: every callable has run already (verification ran each contender, and eager for its reference), so no
    call is spent on warming up: at batch 8 a warm-up call of a whole transformer took 1.6-3 s per contender."""
    samples: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    with torch.inference_mode():
        for r in range(rounds):
            for k in order[r % len(order):] + order[:r % len(order)]:
                # An engine called straight after torch ran up to 20% slower (OpenVINO on minilm: 21.0 ms against
                # 17.7 ms; 18.1 ms after a 10 ms pause): without this the race ranks whoever follows eager too low.
                settle()
                samples[k].append(time_call(runs[k], flat, repeats=RACE_REPEATS, min_runs=1,
                                            warmup=0 if warm or r else 1,
                                            budget_s=TIMING_BUDGET_S / RACE_ROUNDS))
    return samples


def _one_partition_ms(opt: Optimized, whole_ms: float) -> dict[str, float]:
    """A plan of one partition: that partition's time is the plan's, timed already. {} for other plans."""
    steps = opt.program.steps
    return {steps[0].partition: round_ms(whole_ms)} if len(steps) == 1 else {}


def _per_partition_ms(opt: Optimized, cache_dir, pool, *, warm: bool = False,
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
        inputs = registry.get(c.backend, cache_dir).to_io(part.example_inputs, pool[c.member])
        with torch.inference_mode():
            out[step.partition] = round_ms(measure(c, inputs, warmup=0 if warm else 2, min_runs=3, max_runs=10,
                                                   budget_s=0.2).median_ms)
    return out


def _synthetic(spec: TensorSpec) -> torch.Tensor:
    shape = [s if isinstance(s, int) else 2 for s in spec.shape]
    dt = spec.torch_dtype
    return torch.ones(shape, dtype=dt) if not dt.is_floating_point else torch.zeros(shape, dtype=dt)
