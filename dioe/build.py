"""Compile a plan into an `Optimized` model, and verify it against eager: a partition that cannot be compiled, or
that computes something else, runs on torch at the reference member instead, with a warning that says so.

    >>> opt = build(captured, plan, pool)                   # doctest: +SKIP
    >>> opt = verify(opt)                                   # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Callable, Collection, Sequence

import torch

from . import backends as registry
from . import tracing as _trace
from .backend import Backend, Compiled
from .calibration import fingerprint
from .capture import CapturedGraph
from .errors import BackendError, DIOEError
from .masking import probe_reference
from .optimized import Optimized
from .plan import Plan
from .quantization import CalibrationKey
from .pool import ResourcePool
from .runtime import Runtime
from .settings import Settings
from .split import example_values, split_graph


def build(captured: CapturedGraph, plan: Plan, pool: ResourcePool, *, settings: Settings | None = None,
          objective: str | None = None, calibration: Sequence[Sequence] | None = None) -> Optimized:
    """Compile every partition of `plan` with its backend for its member. A partition whose backend fails to
    compile it runs on torch at the reference member, with a warning.

    `calibration`: the graph's flat inputs to calibrate lower-precision partitions on; each such partition is
    calibrated on its own inputs as the fp32 graph computes them, and the plan keeps their fingerprint. Without
    it, a partition the plan says was calibrated reuses the artifact that fingerprint keys (a saved plan loads
    without calibrating again)."""
    settings = settings or Settings()
    where = {n: p.id for p in plan.partitions for n in p.nodes}
    program = split_graph(captured.gm, lambda n: where[n.name], captured.example_inputs)
    compiled: dict[str, Compiled] = {}
    alone = len(plan.partitions) == 1
    low = [p for p in plan.partitions if p.precision == "int8"]   # the precisions that calibrate
    data = _partition_inputs(captured, program, [p.id for p in low], calibration) if calibration and low else {}
    keys: dict[str, str] = {}
    fell: dict[str, str] = {}   # partition -> why its backend could not compile it
    for p in plan.partitions:
        part = program.partition(p.id)
        calib = data.get(p.id) or (CalibrationKey(p.calibration) if p.calibration else None)
        try:
            compiled[p.id] = registry.get(p.backend, settings.cache_dir).compile(
                part, pool[p.member], p.precision, objective=objective or plan.objective, alone=alone,
                calibration=calib)
            if p.id in data:
                keys[p.id] = fingerprint(data[p.id])
        except BackendError as e:
            warnings.warn(f"dioe: {e}. Partition {p.id} runs on torch@{pool.reference.id} instead.", RuntimeWarning)
            compiled[p.id] = registry.get("torch", settings.cache_dir).compile(part, pool.reference, "fp32")
            fell[p.id] = f"{p.backend}@{p.member}/{p.precision} failed to compile it; reference backend"
    if keys or fell:
        # the plan says what runs: a partition that fell back is torch's at the reference, and says why
        plan = replace(plan, partitions=tuple(
            replace(p, member=pool.reference.id, backend="torch", precision="fp32", calibration=None,
                    reason=fell[p.id]) if p.id in fell else replace(p, calibration=keys.get(p.id, p.calibration))
            for p in plan.partitions))
    return Optimized(captured, plan, program, Runtime(program, compiled, pool, cache_dir=settings.cache_dir))


def prepare(captured: CapturedGraph, plan: Plan, pool: ResourcePool, *, settings: Settings,
            calibration: Sequence[Sequence]) -> tuple[bool, Callable[[], None]]:
    """Start the out-of-process work of `plan`'s calibrated partitions (`Backend.prepare`), for a later `build` of
    the same plan and calibration to collect: whether any started, and what stops those that no build collected."""
    engines = {p.backend: registry.get(p.backend, settings.cache_dir) for p in plan.partitions}
    # only engines that do work apart: the partitions' inputs are the fp32 graph run over every calibration item
    low = [p for p in plan.partitions if p.precision == "int8" and type(engines[p.backend]).prepare is not
           Backend.prepare]
    started: list[tuple] = []
    if low and calibration:
        where = {n: p.id for p in plan.partitions for n in p.nodes}
        program = split_graph(captured.gm, lambda n: where[n.name], captured.example_inputs)
        data = _partition_inputs(captured, program, [p.id for p in low], calibration)
        for p in low:
            token = engines[p.backend].prepare(program.partition(p.id), pool[p.member], p.precision,
                                               calibration=data[p.id])
            if token is not None:
                started.append((engines[p.backend], token))
    return bool(started), lambda: [engine.release_prepared(token) for engine, token in started]


def _partition_inputs(captured: CapturedGraph, program, pids: Sequence[str],
                      calibration: Sequence[Sequence]) -> dict[str, list[tuple]]:
    """For each partition in `pids`, its inputs for every calibration item, as the fp32 graph computes them."""
    steps = {st.partition: st for st in program.steps if st.partition in pids}
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    wanted = {nodes[v] for st in steps.values() for v in st.inputs}
    out: dict[str, list[tuple]] = {pid: [] for pid in steps}
    for item in calibration:
        values = example_values(captured.gm, list(item), wanted)
        for pid, st in steps.items():
            out[pid].append(tuple(values[nodes[v]] for v in st.inputs))
    return out


def verify(opt: Optimized, *, settings: Settings | None = None, skip: Collection[str] = (),
           strict: bool = False) -> Optimized:
    """Check each partition against eager on its example inputs, within `settings.tolerance` (relative to the
    largest eager value); one that misses runs on torch at the reference from then on, and the plan says so. A
    plan of several partitions is then checked whole, at ten times the tolerance.

    A model with an attention mask input of 0s and 1s is checked on a second input too: the example with one
    sample's mask all 0 (`masking.fully_masked_probe`). Example masks are all ones, as a rule, and an engine that
    gets a fully padded sample wrong (NaN, or the mean of the values where torch gives 0) passes on them.

    `skip`: partitions judged otherwise (below fp32, against an accuracy budget); the whole-plan check is then
    the caller's. `strict`: a partition that misses is an error instead of a fallback."""
    settings = settings or Settings()
    tol, pool = settings.tolerance, opt.runtime.pool
    reference = pool.reference
    changed = False
    # A plan of one partition that reads the graph's inputs computes the graph's outputs: its partition is checked
    # against the eager reference, computed once per model, and that check is the whole plan's (on bert-base it
    # saves an eager call and a call of the plan, 0.6 s, for the plan and for each whole-graph rival).
    whole = _whole_graph_view(opt)
    checked = [st for st in opt.program.steps
               if (opt.runtime.compiled[st.partition].backend, opt.runtime.compiled[st.partition].member)
               != ("torch", reference.id) and st.partition not in skip]
    probe = probe_reference(opt.captured) if checked else None
    probe_inputs = _step_inputs(opt, probe[0]) if probe is not None else {}
    failed: dict[str, str] = {}   # partition -> on what it differed: "" the example, else the probe
    for step in checked:
        c = opt.runtime.compiled[step.partition]
        part = opt.program.partition(step.partition)
        cases = [("", part.example_inputs, whole)]
        if probe is not None:
            cases.append((f" on {probe[1]}", probe_inputs[step.partition],
                          _whole_view(opt, probe[2]) if whole is not None else None))
        io = registry.get(c.backend, settings.cache_dir)
        for what, inputs, ref in cases:
            with torch.inference_mode():
                want = ref if ref is not None else part.gm(*inputs)
                got = c(*io.to_io(inputs, pool[c.member]))
            err = rel_error(want, got)
            if err > tol and strict:
                raise DIOEError(f"partition {step.partition} on {c.backend}@{c.member} differs from eager by "
                                f"{err:.2e} (> {tol:.0e}){what}; strict: no fallback to torch")
            if err > tol:
                warnings.warn(f"dioe: partition {step.partition} on {c.backend}@{c.member} differs from eager by "
                              f"{err:.2e} (> {tol:.0e}){what}; it runs on torch@{reference.id} instead.",
                              RuntimeWarning)
                opt.runtime.replace(step.partition,
                                    registry.get("torch", settings.cache_dir).compile(part, reference, "fp32"))
                failed[step.partition] = what
                changed = True
                break
    if changed:
        now = opt.runtime.compiled
        parts = tuple(replace(p, member=now[p.id].member, backend=now[p.id].backend, precision=now[p.id].precision,
                              reason=p.reason if now[p.id].backend == p.backend
                              else f"verification failed{failed.get(p.id) or ' on the first choice'}; reference "
                                   "backend")
                      for p in opt.plan.partitions)
        opt.plan = replace(opt.plan, partitions=parts)
    if whole is not None or skip:
        return opt
    checks = [("", opt.captured.example_inputs, opt.captured.reference_outputs())]
    if probe is not None:
        checks.append((f" on {probe[1]}", probe[0], probe[2]))
    for what, inputs, want in checks:
        with torch.inference_mode():
            got = opt.runtime.run(inputs)
        err = rel_error(want, got)
        if err > tol * 10:
            raise DIOEError(f"optimized {opt.plan.model} differs from eager by {err:.2e}{what} although every "
                            f"partition passed at {tol:.0e}; please report this plan: "
                            f"{opt.plan.to_dict()['partitions']}")
    return opt


def _step_inputs(opt: Optimized, graph_inputs: Sequence) -> dict[str, tuple]:
    """Each step's inputs when the graph runs on `graph_inputs`, as eager computes them."""
    nodes = {n.name: n for n in opt.captured.gm.graph.nodes}
    wanted = {nodes[v] for st in opt.program.steps for v in st.inputs}
    values = example_values(opt.captured.gm, list(graph_inputs), wanted)
    return {st.partition: tuple(values[nodes[v]] for v in st.inputs) for st in opt.program.steps}


@dataclass(frozen=True)
class Attempt:
    """A contender built for one option (`built`), or why not: the build's error, or what it fell back for."""

    built: Optimized | None
    why: str = ""
    fell_back: bool = False     # it built, but some partition runs on torch instead of the option


def build_as(option, make: Callable[[], Optimized], *, stage: str) -> Attempt:
    """`make()`'s model when every partition of it runs as `option` (a Choice); a contender that fell back would
    race or be judged under a false name, so it is closed and the warning that said why is returned instead."""
    try:
        with warnings.catch_warnings(record=True) as caught, _trace.stage(stage, option=str(option)):
            warnings.simplefilter("always")
            opt = make()
    except DIOEError as e:
        return Attempt(None, str(e)[:300])
    if not runs_as(opt, option):
        opt.runtime.close()
        why = next((str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)), "it fell back")
        return Attempt(None, why[:300], fell_back=True)
    return Attempt(opt)


def runs_as(opt: Optimized, option) -> bool:
    """Every partition of `opt` runs compiled for `option` (a Choice): none fell back to torch while compiling or
    verifying."""
    return all((c.member, c.backend, c.precision) == (option.member, option.backend, option.precision)
               for c in opt.runtime.compiled.values())


def _whole_graph_view(opt: Optimized) -> list | None:
    """The eager reference as the outputs of the plan's one partition, when the plan is one partition that reads
    the graph's inputs and whose every output is a graph output; else None."""
    return _whole_view(opt, opt.captured.reference_outputs())


def _whole_view(opt: Optimized, graph_outputs: Sequence) -> list | None:
    """`graph_outputs` (the graph's outputs on some input) as the outputs of the plan's one partition (see
    `_whole_graph_view`); None where the plan is not such a partition."""
    direct = opt.runtime.direct
    if direct is None:
        return None
    step = opt.program.steps[0]
    want = [None] * len(step.outputs)
    for ref, (computed, j) in zip(graph_outputs, direct):
        if computed:
            want[j] = ref
    return None if any(w is None for w in want) else want


def rel_error(want, got) -> float:
    """The largest |want - got| over the largest |want|, worst over the tensors of two flat output lists. A NaN or
    infinity where eager has another value is an infinite error (a NaN would otherwise compare as no error)."""
    worst = 0.0
    for w, g in zip(want, got):
        if isinstance(w, torch.Tensor) and w.numel():
            w64, g64 = w.detach().double().cpu(), g.detach().double().cpu()
            same = (w64 == g64) | (w64.isnan() & g64.isnan())
            diff = torch.where(same, 0.0, (w64 - g64).abs())
            if not bool(diff.isfinite().all()):
                return float("inf")
            finite = w64[w64.isfinite()]
            scale = max(finite.abs().max().item() if finite.numel() else 0.0, 1e-6)
            worst = max(worst, diff.max().item() / scale)
    return worst
