"""The throughput cost model. A plan run as a pipeline (see `pipelining`) takes in a new batch as often as its
busiest member can take one: its cost is the bottleneck, the largest of its members' loads (each member's
compute plus the copies into its stages and out to the caller), not the sum along the critical path.

`pipeline_dp` cuts the segments, in order, into stages on distinct members so that the bottleneck is least: a
split that balances two members wins over one member doing everything, where copies allow.

    >>> chosen = pipeline_dp(segments, edges, options, profile, "cpu")       # doctest: +SKIP
    >>> loads = stage_loads(segments, edges, chosen, options, profile, "cpu")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .partition import INPUT, OUTPUT, Edges, continued_ms, partition_groups, run_as_one_ms
from .pipelining import group_stages
from .plan import Choice
from .profile import Profile
from .segment import Segment


@dataclass(frozen=True)
class StageLoad:
    member: str
    segments: tuple[str, ...]
    ms: float           # the stage's partitions, one call each, plus the copies into it and out to the caller


def stage_loads(segments: Sequence[Segment], edges: Edges, chosen: Mapping[str, Choice],
                options: Mapping[str, Mapping[Choice, float]], profile: Profile, reference: str) -> list[StageLoad]:
    """The pipeline's stages of an assignment (runs of consecutive segments on one member) with their loads:
    each partition as one call (`run_as_one_ms`), each copy charged to the stage that receives it (the runtime
    copies a value in the consumer's thread), and the stage's outputs copied back to the caller on `reference`."""
    member = {s.id: chosen[s.id].member for s in segments}
    out = []
    for stage in group_stages(list(segments), lambda s: member[s.id]):
        m = member[stage[0].id]
        inside = {s.id for s in stage}
        ms = sum(run_as_one_ms([options[s.id][chosen[s.id]] for s in run], chosen[run[0].id])
                 for run in partition_groups(stage, chosen))
        for (a, b), n in edges.bytes.items():
            if b in inside and a not in inside:
                ms += profile.copy_ms(reference if a == INPUT else member[a], m, n)
            elif a in inside and b == OUTPUT:
                ms += profile.copy_ms(m, reference, n)
        out.append(StageLoad(m, tuple(s.id for s in stage), ms))
    return out


def member_loads(loads: Sequence[StageLoad]) -> dict[str, float]:
    """Each member's load per batch: the sum of its stages (its one worker thread runs them all)."""
    out: dict[str, float] = {}
    for s in loads:
        out[s.member] = out.get(s.member, 0.0) + s.ms
    return out


def bottleneck_ms(loads: Sequence[StageLoad]) -> float:
    """The pipeline's time per batch in steady state: its busiest member's load."""
    return max(member_loads(loads).values(), default=0.0)


def pipeline_dp(segments: Sequence[Segment], edges: Edges, options: Mapping[str, Mapping[Choice, float]],
                profile: Profile, reference: str) -> dict[str, Choice]:
    """The assignment whose bottleneck is least among those that cut the segments (in topological order) into
    consecutive stages, one option each, on distinct members; ties go to the least total work. Exact for that
    family: the state is (segments done, members used, the last stage's member), and a stage longer than the
    best complete cut found so far is not extended (a stage's load only grows with its length). A stage's copies
    in are charged as if they all came from the stage before it (exact where only neighbouring stages exchange
    values)."""
    n = len(segments)
    idx = {s.id: i for i, s in enumerate(segments)}
    opts = sorted({o for s in segments for o in options[s.id]}, key=lambda o: o.label())
    # prefix sums per option: a segment's time continuing a call, and how many segments it cannot run
    alone = {o: [options[s.id].get(o) for s in segments] for o in opts}
    cont = {o: _prefix([continued_ms(t, o) if t is not None else 0.0 for t in alone[o]]) for o in opts}
    illegal = {o: _prefix([1.0 if t is None else 0.0 for t in alone[o]]) for o in opts}
    cut = [0] * (n + 1)            # bytes made before segment j and read at j or later
    into = [0.0] * n                # bytes each segment reads from the graph's inputs
    outof = [0.0] * n               # bytes each segment hands back as graph outputs
    for (a, b), nb in edges.bytes.items():
        if a == INPUT:
            into[idx[b]] += nb
        elif b == OUTPUT:
            outof[idx[a]] += nb
        elif a in idx and b in idx:
            for j in range(idx[a] + 1, idx[b] + 1):
                cut[j] += nb
    into_p, out_p = _prefix(into), _prefix(outof)
    members = sorted({o.member for o in opts} | {reference})
    link = {(a, b): profile.link(a, b) for a in members for b in members if a != b}

    def copy(a: str, b: str, nbytes: float) -> float:
        return link[(a, b)].ms(int(nbytes)) if nbytes and a != b else 0.0

    def stage_ms(j: int, k: int, o: Choice, prev: str | None) -> float | None:
        if illegal[o][k] - illegal[o][j]:
            return None
        m = o.member
        return (alone[o][j] + cont[o][k] - cont[o][j + 1] + copy(reference, m, into_p[k] - into_p[j])
                + copy(m, reference, out_p[k] - out_p[j]) + (copy(prev, m, cut[j]) if prev is not None else 0.0))

    # by_end[k][(used, member)] = ((bottleneck, total), option of the last stage, key of the state before)
    by_end: list[dict] = [{} for _ in range(n + 1)]
    bound = float("inf")   # the least bottleneck of a complete cut so far

    def extend(j: int, used: frozenset, prev: str | None, cost: tuple[float, float], back) -> None:
        nonlocal bound
        for o in opts:
            if o.member in used:
                continue
            for k in range(j + 1, n + 1):
                ms = stage_ms(j, k, o, prev)
                if ms is None or max(cost[0], ms) > bound:
                    break   # a segment it cannot run, or a stage already slower than a complete cut: longer is too
                new = (max(cost[0], ms), cost[1] + ms)
                key = (used | {o.member}, o.member)
                if key not in by_end[k] or new < by_end[k][key][0]:
                    by_end[k][key] = (new, o, back)
                    if k == n:
                        bound = min(bound, new[0])

    extend(0, frozenset(), None, (0.0, 0.0), None)
    for j in range(1, n):
        for (used, m), (cost, _, _) in list(by_end[j].items()):
            if cost[0] <= bound:
                extend(j, used, m, cost, (j, used, m))
    final = min(by_end[n], key=lambda key: (by_end[n][key][0], by_end[n][key][1].label()))
    chosen: dict[str, Choice] = {}
    k, key = n, final
    while True:
        _, o, back = by_end[k][key]
        j = back[0] if back else 0
        for s in segments[j:k]:
            chosen[s.id] = o
        if back is None:
            return chosen
        k, key = back[0], back[1:]


def _prefix(xs: Sequence[float]) -> list[float]:
    out = [0.0]
    for x in xs:
        out.append(out[-1] + x)
    return out
