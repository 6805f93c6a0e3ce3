"""Partitioning: choose (member, backend, precision) per segment to minimise predicted end-to-end latency,
copies and per-call costs included, within each member's capabilities and memory.

- a chain of segments (no two can run at once): exact dynamic program over the segments;
- a DAG with parallel branches: earliest-finish-time list scheduling by upward rank (HEFT), which places
  independent branches on different members when that finishes sooner;
- either way, a member whose weights plus peak activations would exceed its capacity loses the segment that
  costs least to move, and the search runs again, until everything fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import PoolError
from .pool import ResourcePool
from .plan import Choice
from .profile import Profile
from .segment import Segment

INPUT, OUTPUT = "<input>", "<output>"


@dataclass(frozen=True)
class Edges:
    """Bytes crossing between segments, and from graph inputs / to graph outputs."""

    bytes: Mapping[tuple[str, str], int]

    def into(self, seg: str) -> dict[str, int]:
        return {a: n for (a, b), n in self.bytes.items() if b == seg}

    def preds(self, seg: str) -> list[str]:
        return [a for (a, b) in self.bytes if b == seg and a != INPUT]

    def succs(self, seg: str) -> list[str]:
        return [b for (a, b) in self.bytes if a == seg and b != OUTPUT]


@dataclass(frozen=True)
class Assignment:
    options: Mapping[str, Choice]       # segment id -> where and how it runs
    predicted_ms: float
    method: str                         # "dp" | "heft"
    moved_for_capacity: tuple[str, ...] = ()
    edges: Edges | None = None          # what the partitions are grouped by (partition_groups)


def partition_groups(segments: Sequence[Segment], chosen: Mapping[str, Choice],
                     edges: Edges | None = None) -> list[list[Segment]]:
    """The plan's partitions: runs of neighbouring segments (in order) with the same option, each run one call.
    A segment stays out of the run before it where joining would make work wait (`_holds_back`): a branch on
    another member that could have started while it ran, or the run itself waiting for another member's result
    that only this segment needs. On a chain, or on one member, nothing waits. Without `edges`, by option alone."""
    after = _descendants(segments, edges) if edges is not None else None
    groups: list[list[Segment]] = []
    for s in segments:
        run = groups[-1] if groups else None
        if run and chosen[run[-1].id] == chosen[s.id] and \
                (after is None or not _holds_back(run, s, chosen, edges, after)):
            run.append(s)
        else:
            groups.append([s])
    return groups


def _descendants(segments: Sequence[Segment], edges: Edges) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in reversed(segments):  # segments are in topological order
        out[s.id] = set().union(*({y} | out.get(y, set()) for y in edges.succs(s.id)))
    return out


def _holds_back(run: Sequence[Segment], s: Segment, chosen: Mapping[str, Choice], edges: Edges,
                after: Mapping[str, set[str]]) -> bool:
    """Whether `s` joining `run` delays work: a consumer of the run on another member that does not need `s`
    would wait for it, or `s` needs a segment of another member that the run's first segment does not, and the
    whole partition (which starts when all its inputs are ready) would wait for that one."""
    inside = {x.id for x in run} | {s.id}
    member = _member(chosen[s.id])
    if any(y not in inside and _member(chosen[y]) != member and y not in after[s.id]
           for x in run for y in edges.succs(x.id)):
        return True
    return any(p not in inside and _member(chosen[p]) != member and run[0].id not in after[p]
               for p in edges.preds(s.id))


def call_overhead_ms(option: Choice) -> float:
    """The fixed cost of one call of the option's backend, which every segment timed alone has paid once."""
    from . import backends as registry

    return registry.backend_class(option.backend).call_overhead_us / 1e3


def continued_ms(ms: float, option: Choice) -> float:
    """A segment's time when it runs in the same call as the segment before it (the same option, next in order:
    one partition): its time alone less the per-call overhead it no longer pays, never below half of it (the
    overheads are constants per backend; a fast machine pays less)."""
    return max(ms - call_overhead_ms(option), ms / 2)


def run_as_one_ms(times: Sequence[float], option: Choice) -> float:
    """Predicted time of consecutive segments run as one call of `option`, from their times alone."""
    return times[0] + sum(continued_ms(t, option) for t in times[1:]) if times else 0.0


def scale_to_measured(measured_ms: float, times: Sequence[float], option: Choice) -> float:
    """The factor k for which segments of `times`, each k times slower, forecast as one call (`run_as_one_ms`)
    come to `measured_ms`. The per-call overheads they no longer pay are constants, except where a segment is so
    short that its floor of half its time applies, so k is found by bisection: the forecast grows with k."""
    if not times or sum(times) <= 0:
        return 1.0
    lo, hi = 0.0, measured_ms / (times[0] + sum(times[1:]) / 2)   # the forecast at hi is at least measured_ms
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if run_as_one_ms([mid * t for t in times], option) < measured_ms else (lo, mid)
    return hi


def is_chain(segments: Sequence[Segment], edges: Edges) -> bool:
    """True when every segment (after the first) depends on its predecessor: nothing can run concurrently."""
    ids = [s.id for s in segments]
    return all(ids[i - 1] in edges.preds(ids[i]) for i in range(1, len(ids)))


def assign(segments: Sequence[Segment], edges: Edges, profile: Profile, pool: ResourcePool, *,
           objective: str = "latency") -> Assignment:
    """`objective="latency"`: least predicted time of one call. `"throughput"`: least bottleneck of the plan run
    as a pipeline of stages on distinct members (`bottleneck.pipeline_dp`), the time per batch of a stream."""
    from .bottleneck import pipeline_dp   # it builds on this module's forecasts

    reference = pool.reference.id
    forbidden: set[tuple[str, str]] = set()  # (segment, member) pairs taken away for capacity
    moved: list[str] = []
    chain = is_chain(segments, edges) or len({m.id for m in pool.members}) == 1
    for _ in range(len(segments) * max(len(pool.members), 1) + 1):
        options = {s.id: {o: t.median_ms for o, t in profile.times.get(s.id, {}).items()
                          if (s.id, o.member) not in forbidden} for s in segments}
        empty = [s for s, o in options.items() if not o]
        if empty:
            raise PoolError(f"no member can run segment {empty[0]} within its memory capacity and capabilities; "
                            f"failures: {profile.failures.get(empty[0], {})}")
        if objective == "throughput":
            chosen = pipeline_dp(segments, edges, options, profile, reference)
        elif chain:
            chosen = _dp(segments, edges, options, profile, reference)
        else:
            chosen = _heft(segments, edges, options, profile, reference)
        over = _over_capacity(segments, chosen, pool)
        if not over:
            return Assignment(chosen, simulate(segments, edges, chosen, options, profile, reference),
                              "pipeline dp" if objective == "throughput" else "dp" if chain else "heft",
                              tuple(moved), edges)
        member, segs = over
        # move the segment whose best alternative elsewhere costs least
        def penalty(s: Segment) -> float:
            alts = [t for o, t in options[s.id].items() if o.member != member]
            return (min(alts) if alts else float("inf")) - options[s.id][chosen[s.id]]
        victim = min(segs, key=penalty)
        forbidden.add((victim.id, member))
        moved.append(f"{victim.id} off {member}")
    raise PoolError("could not fit the model into the pool's memory")


def _member(option: Choice) -> str:
    return option.member


def _dp(segments, edges: Edges, options, profile: Profile, reference: str) -> dict[str, Choice]:
    """Exact over a chain: state = option of the current segment; inputs from older segments are charged
    as if they sat where the previous segment ran (exact for pure chains)."""
    best: list[dict[str, tuple[float, str | None]]] = []
    for i, seg in enumerate(segments):
        incoming = edges.into(seg.id)
        row: dict[str, tuple[float, str | None]] = {}
        for o, t in options[seg.id].items():
            m = _member(o)
            cost_in = profile.copy_ms(reference, m, incoming.get(INPUT, 0))
            if i == 0:
                row[o] = (t + cost_in, None)
                continue
            cands = []
            for po, (pc, _) in best[-1].items():
                pm = _member(po)
                copies = sum(profile.copy_ms(pm, m, n) for src, n in incoming.items() if src != INPUT)
                # the same option as the segment before: one partition, one call
                cands.append((pc + copies + (continued_ms(t, o) if po == o else t), po))
            pc, po = min(cands)
            row[o] = (pc + cost_in, po)
        if i == len(segments) - 1:  # results go back to the caller on the reference member
            out = sum(n for (a, b), n in edges.bytes.items() if b == OUTPUT)
            row = {o: (c + profile.copy_ms(_member(o), reference, out), p) for o, (c, p) in row.items()}
        best.append(row)
    chosen: dict[str, Choice] = {}
    o = min(best[-1], key=lambda k: best[-1][k][0])
    for i in range(len(segments) - 1, -1, -1):
        chosen[segments[i].id] = o
        o = best[i][o][1]
    return chosen


def _upward_rank(segments, edges: Edges, options) -> dict[str, float]:
    rank: dict[str, float] = {}
    for seg in reversed(segments):
        avg = sum(options[seg.id].values()) / len(options[seg.id])
        rank[seg.id] = avg + max((rank[s] for s in edges.succs(seg.id) if s in rank), default=0.0)
    return rank


def _heft(segments, edges: Edges, options, profile: Profile, reference: str) -> dict[str, Choice]:
    rank = _upward_rank(segments, edges, options)
    order = sorted(segments, key=lambda s: -rank[s.id])
    finish: dict[str, float] = {}
    where: dict[str, str] = {}   # segment -> member
    free: dict[str, float] = {}
    chosen: dict[str, Choice] = {}
    for seg in order:
        incoming = edges.into(seg.id)
        best = None
        for o, t in options[seg.id].items():
            m = _member(o)
            ready = max([finish[p] + profile.copy_ms(where[p], m, incoming[p]) for p in incoming if p != INPUT]
                        + [profile.copy_ms(reference, m, incoming.get(INPUT, 0))])
            eft = max(ready, free.get(m, 0.0)) + t
            if best is None or eft < best[0]:
                best = (eft, o, m)
        eft, o, m = best
        chosen[seg.id], finish[seg.id], where[seg.id], free[m] = o, eft, m, eft
    return chosen


def simulate(segments, edges: Edges, chosen: Mapping[str, Choice], options, profile: Profile,
             reference: str) -> float:
    """Predicted makespan of an assignment: segments in order, each member one at a time, copies on edges; a
    segment that joins the partition of the one before it (partition_groups) runs in the same call, without a
    call's overhead of its own."""
    finish: dict[str, float] = {}
    free: dict[str, float] = {}
    continued = {s.id for run in partition_groups(segments, chosen, edges) for s in run[1:]}
    for seg in segments:
        o = chosen[seg.id]
        m = _member(o)
        incoming = edges.into(seg.id)
        ready = max([finish[p] + profile.copy_ms(_member(chosen[p]), m, incoming[p]) for p in incoming
                     if p != INPUT] + [profile.copy_ms(reference, m, incoming.get(INPUT, 0))])
        t = options[seg.id][o]
        finish[seg.id] = max(ready, free.get(m, 0.0)) + (continued_ms(t, o) if seg.id in continued else t)
        free[m] = finish[seg.id]
    outs = [(a, n) for (a, b), n in edges.bytes.items() if b == OUTPUT]
    return max([finish[a] + profile.copy_ms(_member(chosen[a]), reference, n) for a, n in outs]
               + list(finish.values()) + [0.0])


def _over_capacity(segments, chosen: Mapping[str, Choice], pool: ResourcePool):
    """(member, its segments) for the first member whose weights + peak activation exceed its capacity."""
    for member in pool.members:
        mine = [s for s in segments if _member(chosen[s.id]) == member.id]
        if not mine or member.memory_bytes is None:
            continue
        need = sum(s.weight_bytes for s in mine) + max(s.activation_bytes for s in mine)
        if need > member.memory_bytes:
            return member.id, mine
    return None


def whole_graph_options(segments, profile: Profile, pool: ResourcePool) -> list[tuple[Choice, float]]:
    """Options that can run every segment within capacity, with the predicted time of running the whole graph in
    one call, best first: the single-backend plans a split plan has to beat."""
    ids = [s.id for s in segments]
    common = set.intersection(*(set(profile.times.get(i, {})) for i in ids)) if ids else set()
    out = []
    for o in common:
        if _over_capacity(segments, {i: o for i in ids}, pool) is None:
            out.append((o, run_as_one_ms([profile.times[i][o].median_ms for i in ids], o)))
    return sorted(out, key=lambda kv: (kv[1], kv[0].label()))


def member_load(segments, chosen: Mapping[str, Choice]) -> dict[str, int]:
    """Bytes of weights plus peak activation placed on each member."""
    out: dict[str, int] = {}
    for m in {_member(o) for o in chosen.values()}:
        mine = [s for s in segments if _member(chosen[s.id]) == m]
        out[m] = sum(s.weight_bytes for s in mine) + max(s.activation_bytes for s in mine)
    return out
