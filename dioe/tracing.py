"""Traces: where every millisecond went, on which member. Chrome Trace Event JSON, which Perfetto UI and
chrome://tracing open as they are.

    >>> with dioe.trace("run.json"):                     # doctest: +SKIP
    ...     opt(*inputs)
    >>> dioe.trace_summary("run.json")                   # doctest: +SKIP  (or: dioe trace summary run.json)

Layout of the file: one process lane per pool member (plus one for DIOE itself: calls and optimize stages), one
thread lane per backend on that member, a lane for the copies into it and lanes for the profiling runs. Each
partition run is an `X` slice (args: partition, backend, precision, ops, bytes in and out, dependencies); each
copy is a slice on the destination's copy lane; flow events (`s`/`f`, bound to the enclosing slices) tie a
producer to its consumer on another member, through the copy when there is one. Counter tracks (`C`) carry the
members' utilization, memory and power, sampled while the trace records. The plans that ran are embedded under
`otherData.plans`. With `ops=True`, torch.profiler also records the ATen ops inside each torch partition, and
they appear nested under that partition's slice (ONNX Runtime and OpenVINO run their own kernels, out of its
sight). torch.profiler watches only the thread that started it, so while it records, partitions run one after
another in the calling thread instead of concurrently on their members' workers.

Recording is off unless a `trace` is active: the hot path then reads one module attribute per call. When it is
on, each partition run adds two clock reads and one small dict.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import DIOEError

TRACE_FORMAT = "dioe-trace/1"

_ACTIVE: "Trace | None" = None   # the recording trace, read once per call by the runtime
PARTITION_MARK = "dioe.partition:"   # + "<call>:<partition>": torch.profiler's name for a torch partition's run


def active() -> "Trace | None":
    return _ACTIVE


def nbytes(values) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


class Trace:
    """Records calls, partition runs, copies, optimize stages, profiling runs and telemetry while active.

    Use it as a context manager (`dioe.trace(path)`); the file is written when the block exits, also when the
    block raised, so the trace of a failing run is kept."""

    def __init__(self, path: str | Path | None = None, *, telemetry_interval_s: float = 0.05, ops: bool = False):
        self.path = Path(path) if path is not None else None
        self.interval = telemetry_interval_s
        self.ops = ops                 # record torch.profiler's ops in optimized calls (from the first one on)
        self._profiler = None          # running while ops are recorded
        self.records: list[dict] = []
        self._lock = threading.Lock()
        self._pools: dict[int, Any] = {}
        self._plans: dict[int, dict] = {}
        self._calls = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self.origin = time.perf_counter()
        self.wall_origin = time.time()

    # -- lifecycle --------------------------------------------------------------------------------------------
    def __enter__(self) -> "Trace":
        global _ACTIVE
        if _ACTIVE is not None:
            raise DIOEError(f"a trace is already recording (to {_ACTIVE.path}); traces do not nest")
        self.origin, self.wall_origin = time.perf_counter(), time.time()
        _ACTIVE = self
        self._stop.clear()
        self._sampler = threading.Thread(target=self._sample_loop, name="dioe-trace-telemetry", daemon=True)
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = None
        self._stop.set()
        try:
            if self._sampler is not None:
                self._sampler.join(timeout=5)
            if self._profiler is not None:
                self._collect_ops()
            self._sample_once()
        finally:  # the trace of a failing run is the one most worth keeping
            if self.path is not None:
                self.save(self.path)

    # -- what the rest of DIOE reports --------------------------------------------------------------------------
    def add(self, kind: str, **fields) -> None:
        fields["kind"] = kind
        with self._lock:
            self.records.append(fields)

    def next_call(self) -> int:
        with self._lock:
            self._calls += 1
            return self._calls - 1

    def attach(self, pool=None, plan=None) -> None:
        """Remember the pool (for lane names and telemetry) and the plan (embedded in the file)."""
        with self._lock:
            if pool is not None:
                self._pools.setdefault(id(pool), pool)
            if plan is not None and id(plan) not in self._plans:
                self._plans[id(plan)] = plan.to_dict()

    @contextmanager
    def stage(self, name: str, **args) -> Iterator[None]:
        """A slice on DIOE's own lane: an optimize stage such as capture, profile or compile."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add("stage", name=name, start=t0, end=time.perf_counter(), args=args)

    # -- torch.profiler's ops, nested under their partitions ------------------------------------------------------
    @contextmanager
    def record_ops(self) -> Iterator[None]:
        """Record torch.profiler's ops in the optimized calls of this block only."""
        was = self.ops
        self.ops = True
        try:
            yield
        finally:
            self.ops = was
            if not was and self._profiler is not None:
                self._collect_ops()

    def before_call(self) -> None:
        """Called by each traced optimized call: starts torch.profiler at the first call that wants ops, so that
        optimize()'s own profiling runs, inside the same block, are neither slowed nor recorded by it."""
        if self.ops and self._profiler is None:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU])
            prof.__enter__()
            self._profiler = prof

    def _collect_ops(self, max_depth: int = 2) -> None:
        """Each ATen op run inside a torch partition's marker, at most `max_depth` levels below the partition's
        top-level ops, as an `op` record timed from the start of that marker: the writer places it on the
        partition's own slice, so no mapping between torch.profiler's clock and ours is needed."""
        prof, self._profiler = self._profiler, None
        prof.__exit__(None, None, None)
        for e in prof.events():
            if e.name.startswith(PARTITION_MARK):
                continue
            depth, parent = 0, e.cpu_parent
            while parent is not None and not parent.name.startswith(PARTITION_MARK):
                depth, parent = depth + 1, parent.cpu_parent
            if parent is None or depth > max_depth:
                continue
            call, partition = parent.name[len(PARTITION_MARK):].split(":", 1)
            self.add("op", name=e.name, call=int(call), partition=partition, depth=depth,
                     offset_s=(e.time_range.start - parent.time_range.start) / 1e6,
                     dur_s=(e.time_range.end - e.time_range.start) / 1e6)

    # -- telemetry --------------------------------------------------------------------------------------------
    def _sample_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample_once()

    def _sample_once(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            now = time.perf_counter()
            for member, s in pool.sample().items():
                self.add("sample", member=member, time=now, utilization_pct=s.utilization_pct,
                         memory_used_bytes=s.memory_used_bytes, power_w=s.power_w)

    # -- output -----------------------------------------------------------------------------------------------
    def to_chrome(self) -> dict:
        with self._lock:
            records = list(self.records)
            pools = list(self._pools.values())
            plans = list(self._plans.values())
        return ChromeWriter(self.origin, self.wall_origin, pools, plans).write(records)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_chrome(), separators=(",", ":")))
        return path


def trace(path: str | Path | None = None, *, telemetry_interval_s: float = 0.05, ops: bool = False) -> Trace:
    """Record a Chrome trace of everything DIOE runs inside the `with` block; written to `path` at its end.
    `ops=True` adds torch.profiler's ATen ops under each torch partition (at torch.profiler's own cost)."""
    return Trace(path, telemetry_interval_s=telemetry_interval_s, ops=ops)


@contextmanager
def stage(name: str, **args) -> Iterator[None]:
    """An optimize stage on the active trace, if one is recording; nothing otherwise."""
    t = _ACTIVE
    if t is None:
        yield
    else:
        with t.stage(name, **args):
            yield


# -- the Chrome Trace Event writer ------------------------------------------------------------------------------
DIOE_PID = 1


class ChromeWriter:
    """Turns DIOE's records into Trace Event Format JSON: lanes named and ordered, times in microseconds from the
    start of the trace, flows between the slices they connect."""

    def __init__(self, origin: float, wall_origin: float, pools, plans):
        self.origin, self.wall_origin = origin, wall_origin
        self.pools, self.plans = pools, plans
        self.events: list[dict] = []
        self.meta: list[dict] = []
        self.pids: dict[str, int] = {}
        self.tids: dict[tuple[int, str], int] = {}
        self._flow = 0

    def us(self, t: float) -> float:
        return round((t - self.origin) * 1e6, 3)

    def pid(self, member: str) -> int:
        if member not in self.pids:
            pid = DIOE_PID + 1 + len(self.pids)
            self.pids[member] = pid
            label = member
            for pool in self.pools:
                m = next((m for m in pool.members if m.id == member), None)
                if m is not None:
                    label = f"{m.id} — {m.name}" + (" [stand-in]" if m.stand_in else "")
                    break
            self.meta += [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": label}},
                          {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                           "args": {"sort_index": pid}}]
        return self.pids[member]

    def tid(self, pid: int, lane: str, order: int) -> int:
        key = (pid, lane)
        if key not in self.tids:
            tid = 1 + sum(1 for p, _ in self.tids if p == pid)
            self.tids[key] = tid
            self.meta += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": lane}},
                          {"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                           "args": {"sort_index": order * 100 + tid}}]
        return self.tids[key]

    def slice(self, name: str, cat: str, pid: int, tid: int, start: float, end: float, args: dict) -> dict:
        ev = {"name": name, "cat": cat, "ph": "X", "pid": pid, "tid": tid, "ts": self.us(start),
              "dur": max(round((end - start) * 1e6, 3), 0.001), "args": args}
        self.events.append(ev)
        return ev

    def flow(self, a: dict, b: dict, name: str) -> None:
        """A flow arrow from slice a (at its end) to slice b (at its start), bound to both enclosing slices."""
        self._flow += 1
        ea = min(0.5, a["dur"] / 2)
        eb = min(0.5, b["dur"] / 2)
        self.events.append({"name": name, "cat": "flow", "ph": "s", "id": self._flow, "pid": a["pid"],
                            "tid": a["tid"], "ts": round(a["ts"] + a["dur"] - ea, 3), "bp": "e"})
        self.events.append({"name": name, "cat": "flow", "ph": "f", "id": self._flow, "pid": b["pid"],
                            "tid": b["tid"], "ts": round(b["ts"] + eb, 3), "bp": "e"})

    def write(self, records: list[dict]) -> dict:
        self.meta += [{"ph": "M", "name": "process_name", "pid": DIOE_PID, "tid": 0, "args": {"name": "dioe"}},
                      {"ph": "M", "name": "process_sort_index", "pid": DIOE_PID, "tid": 0, "args": {"sort_index": 0}}]
        for pool in self.pools:
            for m in pool.members:
                self.pid(m.id)  # every member gets its lane, busy or not: idle members are the point
        parts: dict[tuple[int, str], dict] = {}
        copies: dict[tuple[int, str], list[tuple[dict, dict]]] = {}
        ops: list[dict] = []
        for r in sorted(records, key=lambda r: r.get("start", r.get("time", 0.0))):
            k = r["kind"]
            if k == "call":
                # pipelined batches overlap: each in-flight slot gets its own lane, so the slices stay apart
                lane = f"pipelined batches, slot {r['slot']}" if r.get("pipelined") else "calls"
                self.slice(r["model"], "call", DIOE_PID, self.tid(DIOE_PID, lane, 0), r["start"], r["end"],
                           {"call": r["call"], "model": r["model"],
                            **({"pipelined": True} if r.get("pipelined") else {}),
                            **({"sequential": "op tracing ran its partitions one after another"}
                               if r.get("sequential") else {})})
            elif k == "stage":
                self.slice(r["name"], "optimize", DIOE_PID, self.tid(DIOE_PID, "optimize", 1), r["start"],
                           r["end"], dict(r["args"]))
            elif k == "partition":
                pid = self.pid(r["member"])
                args = {key: r[key] for key in ("call", "partition", "backend", "precision", "ops", "bytes_in",
                                                "bytes_out", "deps", "thread", "stage") if key in r}
                if r.get("fallback"):
                    args["fallback"] = True
                parts[(r["call"], r["partition"])] = self.slice(
                    f"{r['partition']} {r['backend']}", "partition", pid, self.tid(pid, r["backend"], 1),
                    r["start"], r["end"], {**args, "member": r["member"]})
            elif k == "copy":
                pid = self.pid(r["to"])
                ev = self.slice(f"copy {r['value']}", "copy", pid, self.tid(pid, "copies in", 2), r["start"], r["end"],
                                {"call": r["call"], "value": r["value"], "bytes": r["bytes"], "from": r["from"],
                                 "to": r["to"], "producer": r["producer"], "consumer": r["consumer"]})
                copies.setdefault((r["call"], r["consumer"]), []).append((ev, r))
            elif k == "profile":
                pid = self.pid(r["member"])
                self.slice(f"{r['phase']} {r['segment']}", "profile", pid,
                           self.tid(pid, f"profiling: {r['backend']}", 3), r["start"], r["end"],
                           {key: r[key] for key in ("segment", "backend", "precision", "phase", "median_ms", "error")
                            if r.get(key) is not None})
            elif k == "precision":  # a live precision switch, or an attempt at one, with its reason
                self.events.append({"name": f"precision {r['event']}", "cat": "precision", "ph": "i", "s": "p",
                                    "pid": DIOE_PID, "tid": self.tid(DIOE_PID, "precision", 2),
                                    "ts": self.us(r["start"]),
                                    "args": {key: r[key] for key in ("model", "event", "why", "serving", "plan")
                                             if key in r}})
            elif k == "op":
                ops.append(r)
            elif k == "live":   # a drift, recovery or plan swap of live re-planning: an instant on DIOE's lane
                self.events.append({"name": f"live {r['event']}", "cat": "live", "ph": "i", "s": "p",
                                    "pid": DIOE_PID, "tid": self.tid(DIOE_PID, "calls", 0), "ts": self.us(r["start"]),
                                    "args": {key: v for key, v in r.items() if key not in ("kind", "start")}})
            elif k == "sample":
                pid = self.pid(r["member"])
                ts = self.us(r["time"])
                for name, key, unit in (("utilization", "utilization_pct", "%"),
                                        ("memory used", "memory_used_bytes", "bytes"), ("power", "power_w", "W")):
                    if r.get(key) is not None:
                        self.events.append({"name": name, "cat": "telemetry", "ph": "C", "pid": pid, "tid": 0,
                                            "ts": ts, "args": {unit: r[key]}})
        self._flows(parts, copies)
        self._ops(ops, parts)
        self.events.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        return {"traceEvents": self.meta + self.events, "displayTimeUnit": "ms",
                "otherData": {"format": TRACE_FORMAT, "generator": "dioe",
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.wall_origin)),
                              "members": {m: p for m, p in self.pids.items()},
                              "plans": self.plans}}

    def _ops(self, ops: list[dict], parts: dict) -> None:
        """torch.profiler's ops on their partition's lane, inside its slice. The slice's clock reads bracket the
        marker's by a microsecond or two; clamping keeps a child that pokes out by that much nested in a viewer."""
        for r in ops:
            parent = parts.get((r["call"], r["partition"]))
            if parent is None:
                continue
            lo, hi = parent["ts"], parent["ts"] + parent["dur"]
            ts = min(lo + r["offset_s"] * 1e6, hi)
            end = min(ts + r["dur_s"] * 1e6, hi)
            self.events.append({"name": r["name"], "cat": "op", "ph": "X", "pid": parent["pid"],
                                "tid": parent["tid"], "ts": round(ts, 3), "dur": round(end - ts, 3),
                                "args": {"call": r["call"], "partition": r["partition"], "depth": r["depth"]}})

    def _flows(self, parts: dict, copies: dict) -> None:
        for (call, pid_), ev in parts.items():
            member = ev["args"]["member"]
            via = {r["producer"]: c for c, r in copies.get((call, pid_), [])}
            for dep in ev["args"].get("deps", ()):
                src = parts.get((call, dep))
                if src is None:
                    continue
                if dep in via:
                    self.flow(src, via[dep], f"{dep} → {pid_}")
                    self.flow(via[dep], ev, f"{dep} → {pid_}")
                elif src["args"]["member"] != member:
                    self.flow(src, ev, f"{dep} → {pid_}")
