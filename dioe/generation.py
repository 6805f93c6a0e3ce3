"""What live re-planning swaps: a built plan as the live model runs it (`Generation`), and the planner's inputs
and outputs adjusted for a live model (`scale_members`, `sequential`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from . import partition
from .pipelining import group_stages
from .plan import Plan
from .planner import inherited_notes, whole_graph_plan

if TYPE_CHECKING:
    from .optimized import Optimized
    from .planner import Job
    from .profile import Profile


def plan_key(plan: Plan) -> tuple:
    """What a plan runs where: two plans with the same key compute on the same engines in the same places."""
    return tuple((p.nodes, p.member, p.backend, p.precision) for p in plan.partitions)


class Generation:
    """One built plan as the live model runs it: its steps in order, grouped into runs of one member each."""

    def __init__(self, opt: Optimized):
        self.opt, self.key = opt, plan_key(opt.plan)
        compiled = opt.runtime.compiled
        def member_of(step) -> str:
            return compiled[step.partition].member
        self.runs: list[tuple[str, list]] = [(member_of(run[0]), run)
                                             for run in group_stages(opt.program.steps, member_of)]
        nodes = {p.id: p.nodes for p in opt.plan.partitions}
        # what each member computes under this plan: its gauge's reference is kept per kind of work
        self.work: dict[str, tuple] = {}
        for step in opt.program.steps:
            c = compiled[step.partition]
            self.work[c.member] = self.work.get(c.member, ()) + ((nodes[step.partition], c.backend, c.precision),)
        self.calls = 0

    def members(self) -> list[str]:
        return list(dict.fromkeys(m for m, _ in self.runs))

    def summary(self) -> str:
        return ", ".join(f"{p.id} {p.backend}@{p.member}/{p.precision}" for p in self.opt.plan.partitions)


def sequential(job: Job, plan: Plan, profile: Profile) -> Plan:
    """`plan`, or the best whole-graph plan where `plan` splits the graph and the sum of its partitions' forecasts
    does not beat that by the split margin: a live model runs its partitions one after another, so the overlap of
    partitions on different members that the partitioner counts on is not there."""
    ranked = partition.whole_graph_options(job.segments, profile, job.pool)
    if len(plan.partitions) < 2 or not ranked:
        return plan
    option, ms = ranked[0]
    if sum(p.predicted_ms for p in plan.partitions) < ms * (1 - job.settings.split_margin):
        return plan
    return whole_graph_plan(job, option, ms, profile=profile, replanned=True,
                            notes=inherited_notes(plan) + ("live: partitions run one after another; whole graph",))


def scale_members(profile: Profile, factors: dict[str, float]) -> Profile:
    """A copy of `profile` whose times for each member in `factors` are multiplied by its factor."""
    scaled = copy.deepcopy(profile)
    for options in scaled.times.values():
        for option, t in list(options.items()):
            k = factors.get(option.member)
            if k is not None:
                options[option] = type(t)(t.median_ms * k, t.p25_ms * k, t.p75_ms * k, t.runs)
    return scaled
