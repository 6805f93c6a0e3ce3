"""Live profiling: time each segment on each legal (member, backend, precision), and each link's copies.

Results are a `Profile`, JSON on disk keyed by the graph's structure hash and the pool's fingerprint, so a
second `optimize()` of the same model on the same machine measures nothing. The file carries a sha256 of its
content; a damaged one is deleted with a warning and measured again.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch

from . import backends as registry
from . import integrity
from . import tracing as _trace
from .backend import Partition, cache_root
from .errors import BackendError
from .files import write_text
from .pool import ResourcePool
from .plan import Choice
from .segment import Segment
from .timing import Timing, measure

PROFILE_VERSION = 2


@dataclass(frozen=True)
class LinkCost:
    """Copy cost between two devices: latency + bytes / bandwidth."""

    latency_us: float
    gbps: float
    source: str = "measured"   # measured | descriptor (stand-ins) | shared memory

    def ms(self, nbytes: int) -> float:
        if self.gbps == float("inf"):
            return 0.0
        return self.latency_us / 1e3 + nbytes / (self.gbps * 1e9) * 1e3


@dataclass
class Profile:
    graph_hash: str
    fingerprint: str
    times: dict[str, dict[Choice, Timing]] = field(default_factory=dict)   # segment id -> option -> timing
    failures: dict[str, dict[Choice, str]] = field(default_factory=dict)   # segment id -> option -> why
    links: dict[str, LinkCost] = field(default_factory=dict)               # "a->b" (member ids) -> cost
    seconds: float = 0.0
    version: int = PROFILE_VERSION
    # segment id -> the segment of the same structure whose timings it shares (it was not timed itself)
    same_as: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: options as their labels."""
        return {"graph_hash": self.graph_hash, "fingerprint": self.fingerprint,
                "times": {s: {o.label(): asdict(t) for o, t in opts.items()} for s, opts in self.times.items()},
                "failures": {s: {o.label(): why for o, why in f.items()} for s, f in self.failures.items()},
                "links": {k: asdict(v) for k, v in self.links.items()}, "seconds": self.seconds,
                "version": self.version, "same_as": dict(self.same_as)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Profile":
        return cls(d["graph_hash"], d["fingerprint"],
                   {s: {Choice.parse(o): Timing(**t) for o, t in opts.items()} for s, opts in d["times"].items()},
                   {s: {Choice.parse(o): why for o, why in f.items()} for s, f in d.get("failures", {}).items()},
                   {k: LinkCost(**v) for k, v in d["links"].items()}, d.get("seconds", 0.0), d["version"],
                   dict(d.get("same_as", {})))

    def link(self, a: str, b: str) -> LinkCost:
        return LinkCost(0.0, float("inf"), "same member") if a == b else self.links[f"{a}->{b}"]

    def copy_ms(self, a: str, b: str, nbytes: int) -> float:
        """Predicted ms to move `nbytes` from member `a` to member `b` (nothing within one member)."""
        return self.link(a, b).ms(nbytes) if nbytes and a != b else 0.0


def legal_options(part: Partition, pool: ResourcePool, backends: Sequence[str], *, cache_dir=None,
                  precisions: Sequence[str] = ("fp32",)) -> tuple[list[Choice], dict[Choice, str]]:
    """The choices of (member, backend, precision) that may run every node of `part`, and why the others may
    not."""
    ok, why = [], {}
    for m in pool.members:
        for b in backends:
            if registry.unavailable_reason(b) is not None:
                continue
            be = registry.get(b, cache_dir)
            for prec in precisions:
                option = Choice(m.id, b, prec)
                reason = be.member_reason(m)
                if reason is None and prec not in m.descriptor.precisions:
                    reason = f"{m.id} does not list {prec}"
                if reason is None and prec not in be.precisions:
                    reason = f"{b} does not run {prec}"
                if reason is None:
                    support = be.supports(m)
                    bad = [n for n in part.gm.graph.nodes
                           if n.op == "call_function" and not support.is_node_supported({}, n)]
                    if bad:
                        reason = f"{len(bad)} node(s) not supported, first {bad[0].target}"
                if reason:
                    why[option] = reason
                else:
                    ok.append(option)
    return ok, why


def profile_segments(parts: Sequence[Partition], segments: Sequence[Segment], pool: ResourcePool,
                     backends: Sequence[str], *, graph_hash: str, cache_dir=None, progress: bool = True,
                     use_cache: bool = True) -> Profile:
    """Profile every segment partition on every legal option; reuse a cached profile when one matches.
    Segments of one structure (a transformer's layers) are timed once: the first of them is measured, and the
    others share its timings, recorded in `Profile.same_as`."""
    fp = hashlib.blake2b((pool.fingerprint() + "|" + ",".join(sorted(backends))).encode(),
                         digest_size=8).hexdigest()
    path = cache_root(cache_dir) / "profiles" / f"{graph_hash}-{fp}.json"
    data = integrity.load_checked(path, "profile") if use_cache else None
    if data is not None:
        try:
            prof = Profile.from_dict(data)
            if prof.version == PROFILE_VERSION and set(prof.times) | set(prof.failures) >= {s.id for s in segments}:
                return prof
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            # whole, by its checksum, but not a profile this DIOE reads: measured again, never trusted
            integrity.forget(path, "profile", f"it does not read as a profile ({type(e).__name__}: {e})")
    start = time.perf_counter()
    prof = Profile(graph_hash, fp)
    jobs = []
    first: dict[str, Segment] = {}
    for part, seg in zip(parts, segments):
        rep = first.setdefault(part.structure, seg)
        if rep is not seg:
            prof.same_as[seg.id] = rep.id
            continue
        options, why = legal_options(part, pool, backends, cache_dir=cache_dir)
        prof.failures[seg.id] = dict(why)
        jobs.extend((part, seg, o) for o in options)
    bar = _progress(len(jobs), progress)
    # An engine that compiled a segment and then failed twice while timed may have met a passing condition (memory,
    # another process): this plan does without it, but the profile is not cached, so the next optimize tries it
    # again instead of ruling it out for good. A failure to compile is the engine's verdict on the segment: kept.
    transient: list[str] = []
    for part, seg, option in jobs:
        member, backend, prec = pool[option.member], option.backend, option.precision
        bar.set_postfix_str(f"{seg.id[:28]} {backend}@{member.id}", refresh=False)
        tr = _trace.active()
        t0 = time.perf_counter()
        phase, error, timing = "compile", None, None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = registry.get(backend, cache_dir).compile(part, member, prec)
            inputs = registry.get(backend, cache_dir).to_io(part.example_inputs, member)
            if tr is not None:
                tr.add("profile", phase="compile", segment=seg.id, member=member.id, backend=backend,
                       precision=prec, start=t0, end=time.perf_counter())
            phase, t0 = "measure", time.perf_counter()
            timing = prof.times.setdefault(seg.id, {})[option] = _measure_twice(compiled, inputs)
        except BackendError as e:
            error = prof.failures[seg.id][option] = str(e)[:500]
            if phase == "measure":
                transient.append(f"{option} on {seg.id}: {error[:200]}")
        if tr is not None:
            tr.add("profile", phase=phase, segment=seg.id, member=member.id, backend=backend, precision=prec,
                   start=t0, end=time.perf_counter(), median_ms=timing.median_ms if timing else None, error=error)
        bar.update(1)
    bar.close()
    for sid, rep_id in prof.same_as.items():
        prof.times[sid] = dict(prof.times.get(rep_id, {}))
        prof.failures[sid] = dict(prof.failures.get(rep_id, {}))
    prof.links = profile_links(pool)
    prof.seconds = time.perf_counter() - start
    if transient:
        warnings.warn(f"dioe: {len(transient)} option(s) compiled but failed twice while timed, and are left out of "
                      f"this plan; the profile is not cached, so they are tried again next time: "
                      + "; ".join(transient[:3]), RuntimeWarning, stacklevel=2)
    else:
        write_text(path, integrity.dumps_checked(prof.to_dict(), indent=1))
    return prof


def _measure_twice(compiled, inputs) -> Timing:
    """`measure`, once more if the first try raised: one failed call is not yet an engine that cannot run."""
    try:
        return measure(compiled, inputs)
    except BackendError:
        return measure(compiled, inputs)


def profile_links(pool: ResourcePool, sizes: Sequence[int] = (1 << 12, 1 << 18, 1 << 22)) -> dict[str, LinkCost]:
    """Fit latency + bytes/bandwidth per ordered member pair. Members sharing memory copy nothing; a stand-in
    is charged its descriptor's link so plans for it look like plans for the real device."""
    out: dict[str, LinkCost] = {}
    for a in pool.members:
        for b in pool.members:
            if a.id == b.id:
                continue
            dev_a, dev_b = (a.device or "cpu"), (b.device or "cpu")
            if a.stand_in or b.stand_in:
                d = (b if b.stand_in else a).descriptor.link
                out[f"{a.id}->{b.id}"] = LinkCost(d.latency_us, d.bandwidth_gbps, "descriptor (stand-in)")
            elif dev_a == dev_b or (a.device is None or b.device is None):
                out[f"{a.id}->{b.id}"] = LinkCost(0.0, float("inf"), "shared memory")
            else:
                out[f"{a.id}->{b.id}"] = _measure_copy(dev_a, dev_b, sizes)
    return out


def _measure_copy(src: str, dst: str, sizes: Sequence[int]) -> LinkCost:
    xs, ys = [], []
    for n in sizes:
        t = torch.empty(n // 4, dtype=torch.float32, device=src)
        sync = (lambda: torch.cuda.synchronize()) if "cuda" in (src + dst) else (lambda: None)
        for _ in range(2):
            t.to(dst)
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            t.to(dst)
        sync()
        xs.append(n)
        ys.append((time.perf_counter() - t0) / 5 * 1e6)
    # least squares: us = latency + bytes * k
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-9)
    latency = max(my - k * mx, 0.0)
    gbps = 1e-3 / k if k > 0 else float("inf")
    return LinkCost(latency, gbps, "measured")


class _NoBar:
    def set_postfix_str(self, *a, **k):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="dioe: profiling", unit="run", dynamic_ncols=True, leave=False)
