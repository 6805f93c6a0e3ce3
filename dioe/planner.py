"""From an assignment of segments to (member, backend, precision) choices to a `Plan`: group segments into
partitions, forecast each, name its runner-up and why it won. `Job` is what every stage after profiling reads.

    >>> plan = make_plan(job, assign(job.segments, job.edges, job.profile, job.pool))   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .bottleneck import stage_loads
from .capture import CapturedGraph, TensorSpec
from .partition import INPUT, OUTPUT, Assignment, Edges, partition_groups, run_as_one_ms, whole_graph_options
from .plan import Choice, Plan, PlanPartition, PlanStage
from .pool import ResourcePool
from .profile import Profile
from .segment import Segment
from .settings import Settings
from .split import Program
from .text import round_ms, show_ms


@dataclass(frozen=True)
class Job:
    """One optimize's model and machine, as every stage after profiling needs them."""

    captured: CapturedGraph
    segments: tuple[Segment, ...]
    edges: Edges
    profile: Profile
    pool: ResourcePool
    # "latency": the partitioner minimises one call's time. "throughput": the time per batch of a stream run as a
    # pipeline across members (its bottleneck stage); the engines get it as their hint (OpenVINO's performance
    # mode) either way, and the plan records it.
    objective: str
    verify: bool                  # check every compiled partition against eager before it is used
    settings: Settings


def edges_of(program: Program, captured: CapturedGraph) -> Edges:
    """Bytes that cross between the program's partitions (one per segment), and from the graph's inputs and to
    its outputs."""
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


def assign_for(job: Job, profile: Profile | None = None) -> Assignment:
    """The partitioner's assignment for the job's objective (`partition.assign`), from `profile` (the job's
    unless given)."""
    from . import partition   # through the module: a test may stand in for assign

    profile = profile or job.profile
    if job.objective == "throughput":
        return partition.assign(job.segments, job.edges, profile, job.pool, objective="throughput")
    return partition.assign(job.segments, job.edges, profile, job.pool)


def make_plan(job: Job, assignment: Assignment, *, profile: Profile | None = None, replanned: bool = False,
              notes: Sequence[str] = ()) -> Plan:
    """The plan of `assignment`: neighbouring segments with the same choice become one partition (fewer calls,
    fewer copies), each forecast as one call of its segments from `profile` (the job's unless given)."""
    profile = profile or job.profile
    groups = partition_groups(job.segments, assignment.options, assignment.edges)
    parts = []
    for i, g in enumerate(groups):
        opt = assignment.options[g[0].id]
        pred = run_as_one_ms([profile.times[s.id][opt].median_ms for s in g], opt)
        alts = {o: run_as_one_ms([profile.times[s.id][o].median_ms for s in g], o)
                for o in set.intersection(*(set(profile.times[s.id]) for s in g)) - {opt}}
        runner = min(alts, key=lambda o: (alts[o], o)) if alts else None
        if runner is None:
            reason = "only legal choice"
        elif alts[runner] >= pred:
            reason = f"fastest measured ({alts[runner] / max(pred, 1e-9):.2f}x faster than the runner-up)"
        else:
            reason = "not fastest alone; saves copies or member time in the whole schedule"
        nodes = tuple(n for s in g for n in s.nodes)
        gflops = sum(s.cost.flops for s in g) / 1e9
        ru = Choice(runner.member, runner.backend, runner.precision, alts[runner]) if runner else None
        parts.append(PlanPartition(f"p{i}", tuple(s.id for s in g), nodes, opt.member, opt.backend, opt.precision,
                                   len(nodes), round(gflops, 4), round_ms(pred), None, ru, reason))
    notes = list(notes) + [f"partitioned by {assignment.method}"]
    if profile.same_as:
        notes.append(f"timed {len(job.segments) - len(profile.same_as)} distinct segment structures; "
                     f"{len(profile.same_as)} of {len(job.segments)} segments repeat one and share its timings")
    notes += [f"moved for capacity: {m}" for m in assignment.moved_for_capacity]
    notes += _thread_notes(job.pool, parts)
    notes = list(dict.fromkeys(notes))  # a rival plan inherits the plan's notes: say each once
    captured = job.captured
    return Plan(captured.name, captured.structure_hash(), job.pool.fingerprint(), job.objective, tuple(parts),
                round_ms(assignment.predicted_ms),
                inputs=tuple(s.to_dict() if s else {} for s in captured.input_specs),
                replanned=replanned, notes=tuple(notes), stages=_stages(job, assignment, profile, groups, parts))


def _stages(job: Job, assignment: Assignment, profile: Profile, groups, parts) -> tuple[PlanStage, ...]:
    """The plan's pipeline stages: its partitions grouped by member in order, each with its predicted load."""
    options = {s.id: {o: t.median_ms for o, t in profile.times[s.id].items()} for s in job.segments}
    loads = stage_loads(job.segments, assignment.edges or job.edges, assignment.options, options, profile,
                        job.pool.reference.id)
    owner = {s.id: p.id for g, p in zip(groups, parts) for s in g}
    return tuple(PlanStage(ld.member, tuple(dict.fromkeys(owner[s] for s in ld.segments)), round_ms(ld.ms))
                 for ld in loads)


THREADS_NOTE = "thread budget: "


def thread_budget_gaps(pool: ResourcePool, parts: Sequence[PlanPartition]) -> dict[str, tuple[tuple[str, ...], int]]:
    """Members of `parts` whose thread budget some of their backends do not keep to: member -> (those backends,
    the budget). torch's intra-op pool is one per process, so torch and Inductor partitions run on it
    (torch.get_num_threads() threads) whatever the member's budget."""
    from . import backends as registry

    shared = torch.get_num_threads()
    out = {}
    for m in dict.fromkeys(p.member for p in parts):
        budget = pool[m].threads
        ignoring = tuple(sorted({p.backend for p in parts if p.member == m and
                                 not registry.backend_class(p.backend).thread_budget}))
        if ignoring and budget is not None and budget != shared:
            out[m] = (ignoring, budget)
    return out


def _thread_notes(pool: ResourcePool, parts: Sequence[PlanPartition]) -> list[str]:
    shared = torch.get_num_threads()
    return [f"{THREADS_NOTE}on {m}, {' and '.join(b)} run on torch's process-wide pool of {shared} thread(s), not "
            f"the member's {budget}" for m, (b, budget) in thread_budget_gaps(pool, parts).items()]


def whole_graph_plan(job: Job, option: Choice, predicted_ms: float, *, profile: Profile | None = None,
                     replanned: bool = False, notes: Sequence[str] = ()) -> Plan:
    """The plan that runs every segment on one (member, backend, precision): a race rival or its winner."""
    assignment = Assignment({s.id: option for s in job.segments}, predicted_ms, "whole graph")
    return make_plan(job, assignment, profile=profile, replanned=replanned, notes=notes)


def inherited_notes(plan: Plan) -> tuple[str, ...]:
    """The notes a plan made in place of `plan` keeps: all but how `plan` was partitioned and what its members'
    thread budgets were, which the new plan says for itself."""
    return tuple(n for n in plan.notes if not n.startswith(("partitioned by", THREADS_NOTE)))


def unless_split_pays(job: Job, plan: Plan, *, profile: Profile | None = None) -> Plan:
    """The best whole-graph option instead of a split plan predicted to gain less than the split margin over it.
    The race would keep that one engine unless the split beat it by the margin, and segment sums overstate an
    engine compiled whole (it fuses across segment boundaries): such a split has not won a race on one CPU, and
    building it cost bert-base 21 s of its cold optimize."""
    profile = profile or job.profile
    ranked = whole_graph_options(job.segments, profile, job.pool)
    margin = job.settings.split_margin
    if len(plan.partitions) < 2 or not ranked:
        return plan
    option, ms = ranked[0]
    # a throughput plan is judged by its time per batch in a stream: the bottleneck of its pipeline
    own = plan.bottleneck_ms if job.objective == "throughput" and plan.stages else plan.predicted_ms
    if own < ms * (1 - margin):
        return plan
    what = "a batch every " if job.objective == "throughput" else ""
    note = (f"a split plan of {len(plan.partitions)} partitions was predicted at {what}{show_ms(own)} ms "
            f"against {show_ms(ms)} ms for {option} over the whole graph; a split must gain {margin:.0%}, so it "
            "was not built")
    return whole_graph_plan(job, option, ms, profile=profile, replanned=plan.replanned,
                            notes=inherited_notes(plan) + (note,))
