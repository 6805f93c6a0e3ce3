"""Loading a saved plan with care, for `dioe.load`: the model must be the one the plan was built for, and the model
rebuilt from the plan must compute what eager does before it is handed out. A partition that cannot be rebuilt as
planned, or that computes something else, runs on torch at the reference member, with a warning, and the plan says
so; with `strict=True` either is an error.

    >>> captured = capture_for(plan, model, None, source="tiny-mlp.plan.json")        # doctest: +SKIP
    >>> opt = verify_loaded(build(captured, plan, pool), plan, source="tiny-mlp.plan.json")  # doctest: +SKIP
    >>> [p.backend for p in opt.plan.partitions]          # what runs, after any fallback   # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Sequence

import torch

from . import backends as registry
from . import build as building
from .accuracy import METRICS, AccuracyReport, Budget, evaluate
from .capture import CapturedGraph, TensorSpec, capture
from .errors import DIOEError
from .optimized import Optimized
from .plan import Plan
from .settings import Settings

LOW_REASON = "missed the plan's accuracy against eager when loaded; reference backend"


def example_inputs_for(plan: Plan) -> tuple:
    """Inputs shaped as the plan's flat input specs, for when the caller gives none: seeded normal values for
    floating-point inputs (zeros would hide a wrong weight matrix from the check against eager) and ones for
    integers (a valid token id in any vocabulary). The caller's random stream is left alone."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, d in enumerate(plan.inputs):
        if not d:
            raise DIOEError(f"the plan's input {i} is not a tensor, so no input like it can be made up; pass the "
                            "model's example inputs: dioe.load(path, model, example_inputs)")
        spec = TensorSpec.from_dict(d)
        shape = [s if isinstance(s, int) else 2 for s in spec.shape]   # a dynamic dimension: any small size
        dt = spec.torch_dtype
        out.append(torch.randn(shape, generator=gen).to(dt) if dt.is_floating_point
                   else torch.ones(shape, dtype=dt))
    return tuple(out)


def capture_for(plan: Plan, model: torch.nn.Module, example_inputs: Any, *, source: str) -> CapturedGraph:
    """`model` captured on `example_inputs` (or on inputs like the plan's), checked to be the graph the plan was
    built for. A model that is not gets an error naming the plan's model and both graphs, never the capture
    error that inputs meant for another model would raise deep inside it."""
    given = type(model).__name__
    built_for = f"this plan was built for {plan.model} (graph {plan.graph_hash}, inputs " \
                f"{', '.join(str(TensorSpec.from_dict(d)) if d else 'non-tensor' for d in plan.inputs) or 'none'})"
    try:
        inputs = example_inputs if example_inputs is not None else example_inputs_for(plan)
    except DIOEError as e:
        raise DIOEError(f"{source}: {e}") from None
    try:
        captured = capture(model, inputs, name=plan.model)
    except DIOEError as e:
        what = "the example inputs given" if example_inputs is not None else "inputs like the plan's"
        raise DIOEError(f"{source}: {built_for}; the model given, {given}, could not be captured with {what} "
                        f"({e}). Load the plan with the model it was built for, or optimize {given} again.") from e
    if captured.structure_hash() != plan.graph_hash:
        raise DIOEError(f"{source}: {built_for}; the model given, {given}, captures to graph "
                        f"{captured.structure_hash()} ({len(captured.compute_nodes)} ops): another model, or "
                        f"other input shapes. Load the plan with the model it was built for, or optimize {given} "
                        "again.")
    return captured


def check_as_planned(opt: Optimized, planned: Plan, *, source: str) -> None:
    """An error naming each partition that could not be built as `planned` (it fell back to torch)."""
    fell = [f"{p.id} ({p.choice.label()}: {q.reason})" for p, q in zip(planned.partitions, opt.plan.partitions)
            if p.choice != q.choice]
    if fell:
        raise DIOEError(f"{source}: partition(s) {'; '.join(fell)} could not be built as planned; strict: no "
                        "fallback to torch")


WORST_SLACK = 2.0   # how far past the worst judged sample's error a loaded plan's one check may fall


def verify_loaded(opt: Optimized, planned: Plan, *, source: str, settings: Settings | None = None,
                  strict: bool = False) -> Optimized:
    """One call on the captured example inputs against eager: fp32 partitions within `settings.tolerance`, those
    below fp32 within the plan's accuracy budget (its report's thresholds; the default budget for the model's
    outputs where the plan has no report). A partition that misses runs on torch at the reference member, and
    `opt.plan` says so; with `strict`, a miss, or a partition that already could not be built as planned, is an
    error."""
    settings = settings or Settings()
    if strict:
        check_as_planned(opt, planned, source=source)
    low = [p.id for p in opt.plan.partitions if p.precision != "fp32"]
    opt = building.verify(opt, settings=settings, skip=low, strict=strict)
    if not low:
        return opt
    misses = _accuracy_misses(opt)
    if not misses:
        return opt
    what = f"partition(s) {', '.join(low)} below fp32 miss the plan's accuracy against eager: {'; '.join(misses)}"
    if strict:
        raise DIOEError(f"{source}: {what}; strict: no fallback to torch")
    reference = opt.runtime.pool.reference
    warnings.warn(f"dioe: {source}: {what}. They run on torch@{reference.id} fp32 instead, at fp32 speed.",
                  RuntimeWarning, stacklevel=3)
    torch_engine = registry.get("torch", settings.cache_dir)
    for pid in low:
        opt.runtime.replace(pid, torch_engine.compile(opt.program.partition(pid), reference, "fp32"))
    opt.plan = replace(opt.plan, partitions=tuple(
        replace(p, member=reference.id, backend="torch", precision="fp32", calibration=None, reason=LOW_REASON)
        if p.id in low else p for p in opt.plan.partitions))
    return opt


def example_accuracy(opt: Optimized, report: dict | None, inputs: Any = None) -> AccuracyReport:
    """`opt`'s agreement with eager on one call of `inputs` (default: its example inputs), under the budget of
    `report` (a plan's accuracy report; the default budget for the model's outputs where there is none)."""
    own = inputs is None
    inputs = list(opt.captured.example_inputs if own else inputs)
    with torch.inference_mode():   # eager on the example inputs is computed once, and kept by the capture
        want = opt.captured.reference_outputs() if own else tuple(opt.captured.gm(*inputs))
        got = tuple(opt.runtime.run(inputs))
    if report is not None and report["results"]:
        judged = AccuracyReport.from_dict(report)
        budget = Budget(**{r.metric: r.threshold for r in judged.results}, confidence=judged.confidence,
                        outputs=sorted({r.output for r in judged.results}))
    else:
        budget = Budget.default_for(want)
    return evaluate(budget, [want], [got])


def with_example(opt: Optimized, report: dict, example: Sequence[dict] | None = None) -> dict:
    """`report` (a plan's accuracy report) with `opt`'s agreement on the inputs `dioe.load` makes up for its plan
    (`example_inputs_for`) as `example`: what a load that is given no inputs checks the plan still gives.
    `example`, where given, is that agreement measured already (`example_agreement`), and is not measured again."""
    example = example if example is not None else example_agreement(opt, report)
    return report if example is None else {**report, "example": list(example)}


def example_agreement(opt: Optimized, report: dict) -> list[dict] | None:
    """`opt`'s agreement, metric by metric, on the inputs `dioe.load` makes up for its plan, under `report`'s
    budget; None where it makes none (an input that is not a tensor: a load must be given inputs)."""
    try:
        inputs = example_inputs_for(opt.plan)
    except DIOEError:
        return None
    return [{"metric": r.metric, "output": r.output, "value": r.value}
            for r in example_accuracy(opt, report, inputs).results]


def _accuracy_misses(opt: Optimized) -> list[str]:
    """Each (metric, output) of the plan's budget that one call on the example inputs misses: its mean over the
    call's samples against the loosest of the threshold, `WORST_SLACK` times the error of the worst sample the
    plan's own judgement saw, and `WORST_SLACK` times the error the plan measured on this very example when it
    was made (`accuracy["example"]`). The budget bounds a mean over held-out samples, and the example may be an
    input unlike them (random token ids beside real sentences): its error says what the engine computed then,
    where an engine that computes something else misses by far more."""
    report = opt.plan.accuracy if opt.plan.accuracy is not None and opt.plan.accuracy["results"] else None
    judged = example_accuracy(opt, report)
    worst = {(r.metric, r.output): r.worst for r in AccuracyReport.from_dict(report).results} if report else {}
    # what the plan gave when made, on the inputs a load given none makes up: only comparable on those same inputs
    then = {(e["metric"], e["output"]): e["value"] for e in (report or {}).get("example", ())} \
        if _made_up(opt) else {}
    misses = []
    for r in judged.results:
        higher = METRICS[r.metric]   # the higher-is-better metrics (cosine, top-1) are at most 1

        def error(v: float) -> float:
            return 1.0 - v if higher else v
        seen = [v for v in (worst.get((r.metric, r.output)), then.get((r.metric, r.output))) if v is not None]
        allowed = max([error(r.threshold)] + [WORST_SLACK * error(v) for v in seen])
        limit = 1.0 - allowed if higher else allowed
        if not (r.value >= limit if higher else r.value <= limit):
            misses.append(f"{r.metric} of output {r.output} {r.value:.10g} {'<' if higher else '>'} {limit:.10g}")
    return misses


def _made_up(opt: Optimized) -> bool:
    """Whether `opt` was captured on the inputs `example_inputs_for` makes up for its plan."""
    try:
        made = example_inputs_for(opt.plan)
    except DIOEError:
        return False
    have = opt.captured.example_inputs
    return len(made) == len(have) and all(isinstance(h, torch.Tensor) and h.dtype == m.dtype and
                                          h.shape == m.shape and torch.equal(h, m) for h, m in zip(have, made))


__all__ = ["capture_for", "check_as_planned", "example_accuracy", "example_inputs_for", "verify_loaded",
           "with_example", "example_agreement"]
