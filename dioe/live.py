"""Live re-planning: an optimized model that watches each member's run times while it serves, re-plans in the
background when a member drifts from what it ran undisturbed (another process took its cores, a GPU got busy),
swaps the new plan in between calls, and moves back when the drift goes.

    >>> live = dioe.optimize(model, inputs, hardware="pool.yaml", live=True)     # doctest: +SKIP
    >>> out = live(*inputs)                     # like the model; each call runs on exactly one plan
    >>> live.stats["live"]["events"]            # every drift, recovery and swap, with the why  # doctest: +SKIP
    >>> live.close()

Each member's partitions run on the caller's thread, pinned to the member's cores when the pool file names them
(`cores:`; the thread stays there between calls, and `close` gives it its affinity back), and timed with
`perf_counter`. A reader thread compares each member's recent mean with its
undisturbed reference (`dioe.drift`): a drifted member's profile times are scaled by its slowdown and the planner
runs again on that profile; a plan seen before is reused as built. A drifted member is probed with the work it
drifted on, on the reader thread pinned to its cores, each tick, so that its recovery is seen wherever the plan has
put that work since; when no member drifts any more, the plan optimize chose comes back. The swap is one reference
assignment: a call reads the plan once, at its start, and finishes on it.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from . import build as building
from . import partition
from . import tracing as _trace
from .cores import pin, schedstat, waited
from .drift import Detector, Gauge, LiveSettings
from .errors import DIOEError
from .generation import Generation, plan_key, scale_members, sequential
from .plan import Plan
from .planner import make_plan, unless_split_pays
from .runtime import RoutedRuntime

if TYPE_CHECKING:
    from .optimized import Optimized
    from .planner import Job


# A probe runs a drifted member's work back to back for PROBE_S (longer than a time slice of the OS, so that the
# wait another process makes it shows), once every PROBE_EVERY ticks, and recovery is read from the median of the
# last PROBE_WINDOW probes: with the default tick, a twentieth of the member's core, and a recovery seen within
# about 3 s. Only while the member drifts. Rarely, not more: a probe is Python between its runs, and a thread the OS
# keeps off a taken core while it holds the GIL stalls every other thread of the process until it runs again.
PROBE_S, PROBE_EVERY, PROBE_WINDOW = 0.01, 4, 7


class Live:
    """An optimized model under live re-planning; see the module docstring. Made by `go_live`."""

    def __init__(self, opt: Optimized, job: Job, settings: LiveSettings):
        self.job, self.settings, self.pool = job, settings, job.pool
        origin = Generation(opt)
        self._origin, self._gen = origin, origin
        self._gens: dict[tuple, Generation] = {origin.key: origin}
        self._cores = {m.id: set(m.cores) for m in self.pool.members}
        self._pinning = any(self._cores.values())
        self._where = threading.local()               # the cores this thread was last pinned to
        self._homes: dict[int, set] = {}              # native id of each thread pinned -> its affinity before
        s = settings
        self._gauges = {m.id: Gauge(s.window) for m in self.pool.members}
        self._detectors = {m.id: Detector(s.slow, s.recover, s.hold) for m in self.pool.members}
        self._probes: dict[str, Gauge] = {}           # drifted member -> its probes' times
        self._ticks = 0
        # (on a core or waiting for one, on a core) nanoseconds, from the kernel's schedstat: of the threads that
        # call the model, per tick, and of each drifted member's probes; their ratio is how long a thread there
        # waited for a core (and not for this process's GIL, which a wall clock over CPU time would count)
        self._callers_ran: deque = deque(maxlen=PROBE_WINDOW * PROBE_EVERY)
        self._caller_stat: dict[int, tuple[int, int]] = {}
        self._probed: dict[str, deque] = {}
        self._probers: dict[str, ThreadPoolExecutor] = {}   # drifted member -> its probe thread, pinned there
        self._probing: dict[str, Future] = {}
        self._seen: dict[tuple, int] = {}             # (member, drifted) -> the gauge count last read
        self._ratios: dict[str, float] = {}
        self._factors: dict[str, float] = {}         # drifted member -> the slowdown its profile is scaled by
        self._probe_of: dict[str, Generation] = {}   # drifted member -> the plan it drifted under
        self._pending: str | None = None             # why a re-plan waits for the dwell time to pass
        self._swapped_at = time.monotonic()
        self._lock = threading.Lock()
        self._planning = threading.Lock()   # one re-plan or swap at a time: the reader's, or an operator's
        self._closed = False
        self.events: deque[dict] = deque(maxlen=256)
        self.calls = 0
        self._own_telemetry = not self.pool.telemetry_running   # stopped on close only if started here
        self.pool.start_telemetry(max(s.tick_s, 0.1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dioe-live", daemon=True)
        self._thread.start()

    # -- calls -------------------------------------------------------------------------------------------------
    @property
    def current(self) -> Optimized:
        """The optimized model calls run on now."""
        return self._gen.opt

    @property
    def plan(self) -> Plan:
        return self._gen.opt.plan

    @property
    def runtime(self) -> RoutedRuntime:
        """The current plan's runtime, as `opt.runtime`, except that `run` goes through the live model: a caller
        of `opt.runtime.run`, such as the batcher, is timed and re-planned for like a call of the model."""
        return RoutedRuntime(self.run_flat, lambda: self.current.runtime)

    def __call__(self, *args, **kwargs) -> Any:
        gen = self._gen   # read once: this call runs on this plan to its end, whatever is swapped in meanwhile
        flat = gen.opt.captured.flatten_inputs(args, kwargs)
        return gen.opt.captured.unflatten_outputs(self.run_flat(flat, gen))

    def run_flat(self, flat, gen: Generation | None = None) -> tuple:
        """One call on flat inputs (checked already), on `gen` or the plan that serves now; flat outputs."""
        if self._closed:
            raise DIOEError("this live model is closed: calls after close() are refused")
        gen = gen or self._gen
        opt = gen.opt
        env = dict(zip(opt.program.graph_inputs, flat))
        tr, call, t0 = _trace.active(), 0, time.perf_counter()
        if tr is not None:
            tr.attach(self.pool, opt.plan)
            tr.before_call()
            call = tr.next_call()
        shares, start = [], t0
        for member, steps in gen.runs:
            if self._pinning:
                self._pin(member)
            for step in steps:
                opt.runtime._run_step(step, env, tr, call)
            end = time.perf_counter()
            shares.append((member, end - start))
            start = end
        if tr is not None:
            tr.add("call", call=call, model=opt.plan.model, start=t0, end=time.perf_counter())
        with self._lock:
            gen.calls += 1
            self.calls += 1
        outs = opt.runtime.outputs(env)
        # Each member's share of the call: from where the last one ended (the call's start, for the first) to the
        # end of its partitions; the call's tail goes to the last. The whole call, not the runs alone: the OS lets
        # a thread that another process keeps off its core run at once, on credit, and the wait falls on the
        # caller's next steps instead, on the core it was left on (on a core taken by three busy processes, 1.7 ms
        # runs took 1.7 ms and the calls around them 15 to 56 ms).
        member, last = shares[-1]
        shares[-1] = (member, last + time.perf_counter() - start)
        for member, seconds in shares:
            self._gauges[member].add(seconds)
        return outs

    def _pin(self, member: str) -> None:
        """Pin the calling thread to `member`'s cores, and leave it there after the call: moving a running thread
        to another core waits for that core's next scheduler tick (a 1.7 ms call took 4 ms when its thread was
        pinned for the call and given its affinity back after it). `close` gives each thread its affinity back."""
        cores = self._cores[member]
        if not cores or getattr(self._where, "cores", None) == cores:
            return
        tid = threading.get_native_id()
        with self._lock:
            self._homes.setdefault(tid, os.sched_getaffinity(0))
        pin(cores)
        self._where.cores = cores

    # -- watching ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        warned = False
        while not self._stop.wait(self.settings.tick_s):
            try:
                self._tick()
            except Exception as e:  # the model keeps serving on its plan; the failure is an event, said once
                self._event("error", why=f"{type(e).__name__}: {e}")
                if not warned:
                    warnings.warn(f"dioe: live re-planning failed ({type(e).__name__}: {e}); calls keep running on "
                                  f"{self._gen.summary()}", RuntimeWarning)
                    warned = True

    def _tick(self) -> None:
        self._probe()
        gen, changes = self._gen, []
        # how much slower than their references the plan's undisturbed members run now: load that slows every
        # core alike. A drifted member is back when it is no slower than they are (by `recover`), not only when
        # the whole machine is as quiet as when its reference was taken
        peers = sorted(r for m, r in self._ratios.items() if m in gen.work and not self._detectors[m].drifted)
        machine = max(1.0, peers[len(peers) // 2]) if peers else 1.0
        plan_wait = self._callers_wait()
        for m, detector in self._detectors.items():
            # an undisturbed member is read from the runs of its work in the plan; a drifted one from probes of
            # the work it drifted on, whose undisturbed reference is known, wherever the plan has put it since
            if detector.drifted:
                drifted_under = self._probe_of.get(m)   # read once: a failing probe removes it from its own thread
                if drifted_under is None:   # its probe failed: it stays scaled, as it drifted
                    continue
                gauge, key = self._probes[m], drifted_under.work[m]
            else:
                gauge, key = self._gauges[m], gen.work.get(m)
            if key is None or gauge.count == self._seen.get((m, detector.drifted)):
                continue
            self._seen[(m, detector.drifted)] = gauge.count
            probed = self._probed.get(m) if detector.drifted else None
            if probed is not None and len(probed) == probed.maxlen and plan_wait is not None:
                # a drifted member is back when its probes wait for its cores (by `recover`) no more than the plan's
                # calls wait for theirs: load that slows every core alike does not keep it drifted
                # the median probe: one probe in a few waits out someone's whole time slice, and says nothing
                ratio = statistics.median(w / max(r, 1) for w, r in probed) / plan_wait
                self._ratios[m] = ratio
                if detector.update(ratio) is not None:
                    changes.append(self._changed(m, "recovered", ratio, None, None, gen, plan_wait))
                continue
            else:
                if detector.drifted:   # probes alone: against the member's own reference, as fast as the plan's
                    gauge.references = self._gauges[m].references
                ratio = gauge.ratio(key, learn=not detector.drifted)
                now, ref = (gauge.mean(), gauge.references[key]) if ratio is not None else (None, None)
                scale = machine if detector.drifted else 1.0
            if ratio is None:
                continue
            self._ratios[m] = ratio
            what = detector.update(ratio / scale)
            if what is not None:
                changes.append(self._changed(m, what, ratio, now, ref, gen, scale))
        if changes:
            self._pending = "; ".join(changes)
        if self._pending and time.monotonic() - self._swapped_at >= self.settings.min_dwell_s:
            why, self._pending = self._pending, None
            if self.settings.replan:
                self._replan(why)

    def _callers_wait(self) -> float | None:
        """How long the threads that call the model waited for a core per nanosecond on one, over the last ticks
        (`waited`); None until they ran 20 ms in all, or where the kernel keeps no schedstat."""
        for tid in list(self._homes):
            now = schedstat(tid)
            if now is None:
                continue
            before = self._caller_stat.get(tid)
            self._caller_stat[tid] = now
            if before is not None:
                ran, waited_ = now[0] - before[0], now[1] - before[1]
                self._callers_ran.append((ran + waited_, ran))
        if sum(r for _, r in self._callers_ran) < 20e6:
            return None
        return waited(self._callers_ran)

    def _changed(self, m: str, what: str, ratio: float, now_s: float | None, ref_s: float | None, gen: Generation,
                 machine: float) -> str:
        util = self._utilization(m)
        how = "drifted: ran" if what == "drift" else "recovered: runs"
        why = (f"{m} {how} {ratio:.2f}x its undisturbed time ({now_s * 1e3:.3f} ms against {ref_s * 1e3:.3f} ms, "
               f"mean of its last {self.settings.window} runs) for {self.settings.hold} readings" if now_s is not None
               else f"{m} recovered: its probes waited for its cores {ratio:.2f}x as much as the model's callers wait "
                    f"for theirs ({machine:.2f} ns on or waiting for a core per ns on one), for {self.settings.hold} "
                    "readings")
        why = (why
               + (f", with the plan's members at {machine:.2f}x theirs" if what == "recovered" and machine > 1 and now_s is not None else "")
               + (f"; its cores {util:.0f}% busy" if util is not None else ""))
        if what == "drift":
            # the profile is scaled by the larger of the drift and the member's live time over its forecast: the
            # profile was timed once, unpinned, and a rival member it once timed slower on a busy machine would
            # otherwise keep the plan where it is
            planned_s = sum(p.predicted_ms for p in gen.opt.plan.partitions if p.member == m) / 1e3
            self._factors[m] = max(ratio, now_s / planned_s) if now_s is not None and planned_s > 0 else ratio
            self._probe_of[m] = gen
            self._probes[m] = Gauge(PROBE_WINDOW)
            self._probed.pop(m, None)
        else:
            self._factors.pop(m, None)
            self._probe_of.pop(m, None)
            self._gauges[m].clear()   # its runs while drifted are not its undisturbed times
        self._event(what, member=m, ratio=round(ratio, 3), machine_ratio=round(machine, 3),
                    mean_ms=None if now_s is None else round(now_s * 1e3, 4),
                    reference_ms=None if ref_s is None else round(ref_s * 1e3, 4), utilization_pct=util, why=why)
        return why

    def _utilization(self, member: str) -> float | None:
        try:
            return self.pool.telemetry(member).utilization_pct
        except Exception:   # telemetry is context for the why; a reading that fails leaves it out
            return None

    def _probe(self) -> None:
        """Probe the work each drifted member drifted on, every PROBE_EVERY ticks, on a thread of its own that stays
        pinned to the member's cores (moving a thread there for each probe would make it wait for the core's next
        scheduler tick, each time: 4 ms of a 10 ms probe); not while the last probe is still running."""
        self._ticks += 1
        if self._ticks % PROBE_EVERY:
            return
        for m, gen in list(self._probe_of.items()):
            if m not in self._probers:
                self._probers[m] = ThreadPoolExecutor(1, thread_name_prefix=f"dioe-live-probe-{m}", initializer=pin,
                                                      initargs=(self._cores[m],))
            f = self._probing.get(m)
            if f is None or f.done():
                self._probing[m] = self._probers[m].submit(self._probe_run, m, gen)

    def _probe_run(self, member: str, gen: Generation) -> None:
        """`member`'s work in `gen`, run back to back for PROBE_S on its probe thread: a probe as short as one run
        is let onto a taken core at once, on credit, and would call the member recovered while it is not."""
        opt = gen.opt
        steps = [(opt.runtime.compiled[s.partition], opt.program.partition(s.partition).example_inputs)
                 for m, run in gen.runs if m == member for s in run]
        t0, runs, stat0 = time.perf_counter(), 0, schedstat(threading.get_native_id())
        try:
            while not runs or time.perf_counter() - t0 < PROBE_S:
                for c, inputs in steps:
                    c(*[x.to(c.io_device) if isinstance(x, torch.Tensor) else x for x in inputs])
                runs += 1
        except Exception as e:   # a probe that cannot run cannot show recovery: stop probing, and say so
            self._probe_of.pop(member, None)
            self._event("probe failed", member=member, why=f"{type(e).__name__}: {str(e)[:300]}")
            return
        wall, stat1 = time.perf_counter() - t0, schedstat(threading.get_native_id())
        self._probes[member].add(wall / runs)
        if stat0 is not None and stat1 is not None:
            ran, waited_ = stat1[0] - stat0[0], stat1[1] - stat0[1]
            self._probed.setdefault(member, deque(maxlen=PROBE_WINDOW)).append((ran + waited_, ran))

    # -- re-planning ---------------------------------------------------------------------------------------------
    def _replan(self, why: str) -> None:
        with self._planning:
            if not self._stop.is_set():
                self._replan_now(why)

    def _replan_now(self, why: str) -> None:
        t0 = time.perf_counter()
        if not self._factors:   # nothing drifts now: back to the plan optimize chose, raced and verified
            gen = self._origin
        else:
            job = self.job
            scaled = scale_members(job.profile, self._factors)
            note = "re-planned live: " + ", ".join(f"{m} scaled {f:.2f}x" for m, f in sorted(self._factors.items()))
            plan = make_plan(job, partition.assign(job.segments, job.edges, scaled, job.pool), profile=scaled,
                             replanned=True, notes=(note,))
            plan = sequential(job, unless_split_pays(job, plan, profile=scaled), scaled)
            gen = self._gens.get(plan_key(plan)) or self._build(plan)
        plan_ms = round((time.perf_counter() - t0) * 1e3, 1)
        if gen is self._gen:
            self._event("kept", plan=gen.summary(), why=why, replan_ms=plan_ms)
            return
        self._swap(gen, why, plan_ms)

    def _build(self, plan: Plan) -> Generation:
        job = self.job
        opt = building.build(job.captured, plan, job.pool, settings=job.settings, objective=job.objective)
        if job.verify:
            opt = building.verify(opt, settings=job.settings)
        gen = Generation(opt)
        self._gens[gen.key] = gen
        return gen

    def _swap(self, gen: Generation, why: str, replan_ms: float) -> None:
        old = self._gen
        for m, gauge in self._gauges.items():
            if gen.work.get(m) != old.work.get(m):
                gauge.clear()
        self._gen = gen   # the swap: calls that start from now on run on `gen`; those under way finish on `old`
        self._swapped_at = time.monotonic()
        self._event("swap", plan_from=old.summary(), plan_to=gen.summary(), why=why, replan_ms=replan_ms)

    def _event(self, what: str, **fields) -> None:
        e = {"event": what, "time": time.time(), "call": self.calls, **fields}
        self.events.append(e)
        tr = _trace.active()
        if tr is not None:
            tr.add("live", start=time.perf_counter(), **e)

    # -- reading ---------------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """The current plan's run-time faults (`Optimized.stats`) and, under "live": the plan calls run on, the
        calls served, each member's drift ratio, state and utilisation, and the events (drift, recovered, swap,
        kept: the planner chose the plan running already), each with the why."""
        members = {}
        for m in self._gauges:
            members[m] = {"ratio": round(self._ratios[m], 3) if m in self._ratios else None,
                          "drifted": self._detectors[m].drifted, "scaled_by": self._factors.get(m),
                          "utilization_pct": self._utilization(m), "in_plan": m in self._gen.work}
        return {**self._gen.opt.stats,
                "live": {"plan": self._gen.summary(), "calls": self.calls,
                         "calls_per_plan": {g.summary(): g.calls for g in self._gens.values()},
                         "swaps": sum(e["event"] == "swap" for e in self.events),
                         "members": members, "events": list(self.events)}}

    def swap_to(self, plan: Plan, *, why: str) -> None:
        """Build `plan` (or reuse it, when built before) and swap it in now, as a drift would: for drills and for
        an operator who knows better than the detector."""
        with self._planning:
            gen = self._gens.get(plan_key(plan)) or self._build(plan)
            if gen is not self._gen:
                self._swap(gen, why, 0.0)

    def close(self) -> None:
        """Stop watching and end the member workers; calls after this are an error."""
        self._closed = True
        self._stop.set()
        self._thread.join()
        with self._planning:   # a re-plan under way finishes (and swaps nothing) before its plans are closed
            pass
        for p in self._probers.values():
            p.shutdown(wait=True)
        if self._own_telemetry:
            self.pool.stop_telemetry()
        for g in self._gens.values():
            g.opt.runtime.close()
        for tid, home in self._homes.items():
            try:
                os.sched_setaffinity(tid, home)
            except OSError:   # the thread has ended
                pass
        self._homes.clear()

    def __enter__(self) -> "Live":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        # what a caller of an `Optimized` reads (captured, program, runtime, race, save): the current plan's
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._gen.opt, name)


def go_live(opt: Optimized, settings: LiveSettings | None = None, **overrides) -> Live:
    """`opt` under live re-planning (see the module docstring). `opt` must come from `dioe.optimize`, which keeps
    what re-planning needs (the profile and segments); `overrides` are `LiveSettings` fields."""
    job = getattr(opt, "job", None)
    if job is None:
        raise DIOEError("live re-planning needs the profile that dioe.optimize measured; this model has none "
                        "(a loaded plan was not profiled): optimize it, then go live")
    settings = settings or LiveSettings()
    if overrides:
        unknown = sorted(set(overrides) - set(LiveSettings.__dataclass_fields__))
        if unknown:
            raise DIOEError(f"unknown live setting(s) {unknown}; known: {sorted(LiveSettings.__dataclass_fields__)}")
        settings = LiveSettings(**{**settings.__dict__, **overrides})
    return Live(opt, job, settings)
