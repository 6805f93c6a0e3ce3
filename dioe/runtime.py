"""The runtime: executes a compiled plan. Partitions run in dependency order; independent partitions on
different members run at the same time, one worker thread per member; a backend that fails at run time is
retried once, then the call runs on torch at the reference member, loudly; a partition's circuit breaker keeps
calls off an engine that keeps failing and brings it back when probe calls pass (see `recovery`). No call is
lost: each returns eager's result or raises one clear error.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Mapping, Sequence

import torch

from .backend import Compiled
from .breaker import Breaker
from .cores import pin
from .errors import BackendError
from .recovery import Recovery
from .pool import ResourcePool
from .split import Program
from .tracing import PARTITION_MARK, Trace, nbytes


class Runtime(Recovery):
    def __init__(self, program: Program, compiled: Mapping[str, Compiled], pool: ResourcePool, *, cache_dir=None):
        self.program = program
        self.cache_dir = cache_dir  # the fallback's backend instance is the one of the plan's cache
        self.compiled = dict(compiled)
        self.pool = pool
        self.stats: Counter = Counter()
        self.fallbacks: dict[str, str] = {}   # partition -> why it now runs on the reference backend
        self._warned: set[str] = set()
        self._deps = program.dependencies()
        self._producer = {v: st.partition for st in program.steps for v in st.outputs}
        self._ops = {st.partition: sum(1 for n in program.partition(st.partition).gm.graph.nodes
                                       if n.op == "call_function") for st in program.steps}
        members = {c.member for c in self.compiled.values()}
        self.concurrent = len(members) > 1 and self._has_parallel_steps()
        # a member pinned to cores runs its partitions on a worker pinned to them
        self._workers = {m: ThreadPoolExecutor(1, thread_name_prefix=f"dioe-{m}", initializer=pin,
                                               initargs=(pool[m].cores,)) for m in members} \
            if self.concurrent else {}
        self.direct = self._direct_outputs()  # the one-partition fast path, or None
        # weak references to what to call after a partition's engine is replaced: a model bound to its engine
        self.on_replace: list[Callable[[], Callable[[], None] | None]] = []
        self._lock = threading.RLock()
        # the engines the plan chose (`compiled` holds what calls run now: these, or an open breaker's detour)
        self.planned: dict[str, Compiled] = dict(self.compiled)
        self.breaker_settings: dict = {}
        self.breakers = {pid: Breaker() for pid in self.compiled}
        self._fallback_engines: dict[str, Compiled] = {}
        self._pipeline = None   # the stream of batches' stages (pipelining), started on first use

    def _direct_outputs(self) -> list | None:
        """For a plan of one partition that reads the graph's inputs in order: where each graph output comes from
        (an index into the partition's outputs, or a constant). None for any other plan."""
        if len(self.program.steps) != 1:
            return None
        step = self.program.steps[0]
        if step.inputs != self.program.graph_inputs:
            return None
        where = {v: i for i, v in enumerate(step.outputs)}
        out = []
        for i, v in enumerate(self.program.graph_outputs):
            if v is None:
                out.append((False, self.program.constants[i]))
            elif v in where:
                out.append((True, where[v]))
            else:
                return None  # an output that is an input passed through
        return out

    def replace(self, pid: str, compiled: Compiled) -> None:
        """Run partition `pid` on `compiled` from now on: it becomes the planned engine, under a closed breaker;
        whoever bound the one before (`on_replace`) is told."""
        with self._lock:
            self.planned[pid] = compiled
            self.breakers[pid] = Breaker(**self.breaker_settings)
            self._bind(pid, compiled)

    def configure_breakers(self, **settings) -> None:
        """New breakers (closed) for every partition, with these `Breaker` settings (failures, cooldown_calls,
        cooldown_s, probes, forget_s); each partition runs on its planned engine again."""
        with self._lock:
            self.breaker_settings = dict(settings)
            for pid, c in list(self.planned.items()):
                self.replace(pid, c)

    def _bind(self, pid: str, compiled: Compiled) -> None:
        """Route partition `pid`'s calls to `compiled` (the planned engine, or the detour of an open breaker)."""
        with self._lock:
            self.compiled[pid] = compiled
            for ref in self.on_replace:
                tell = ref()
                if tell is not None:
                    tell()

    def _call_direct(self, pid: str, c: Compiled, args: Sequence) -> list:
        try:
            outs = c(*args)
        except BackendError as e:
            outs = self.recover(pid, c, e, args)
        return [outs[v] if computed else v for computed, v in self.direct]

    def _has_parallel_steps(self) -> bool:
        steps = [s.partition for s in self.program.steps]
        reach: dict[str, set[str]] = {}
        for p in steps:
            reach[p] = set(self._deps[p]).union(*(reach[d] for d in self._deps[p])) if self._deps[p] else set()
        return any(a not in reach[b] and b not in reach[a] for i, a in enumerate(steps) for b in steps[i + 1:])

    # -- one partition ---------------------------------------------------------------------------------------
    def _run_step(self, step, env: dict, tr: Trace | None = None, call: int = 0, stage: int | None = None) -> None:
        c = self.compiled[step.partition]
        args = []
        for v in step.inputs:
            x = env[v]
            if isinstance(x, torch.Tensor) and x.device.type != c.io_device.split(":")[0]:
                t0 = time.perf_counter()
                src = x.device
                x = x.to(c.io_device)
                if tr is not None:
                    tr.add("copy", call=call, value=v, start=t0, end=time.perf_counter(), to=c.member,
                           **{"from": self._member_of(v, src)}, bytes=x.numel() * x.element_size(),
                           producer=self._producer.get(v), consumer=step.partition)
            args.append(x)
        t0 = time.perf_counter()
        fell_back = False
        try:
            if tr is not None and tr.ops and c.backend == "torch":
                with torch.profiler.record_function(f"{PARTITION_MARK}{call}:{step.partition}"):
                    outs = c(*args)
            else:
                outs = c(*args)
        except BackendError as e:
            outs = self.recover(step.partition, c, e, args)
            c = self.compiled[step.partition]
            fell_back = True
        if tr is not None:
            tr.add("partition", call=call, partition=step.partition, member=c.member, backend=c.backend,
                   precision=c.precision, start=t0, end=time.perf_counter(), thread=threading.current_thread().name,
                   ops=self._ops[step.partition], bytes_in=nbytes(args), bytes_out=nbytes(outs),
                   deps=list(self._deps[step.partition]), fallback=fell_back,
                   **({} if stage is None else {"stage": stage}))
        env.update(zip(step.outputs, outs))

    def _member_of(self, value: str, device) -> str:
        p = self._producer.get(value)
        if p is not None:
            return self.compiled[p].member
        return next((m.id for m in self.pool.members if m.device == str(device)), str(device))

    # -- the whole program -------------------------------------------------------------------------------------
    def run(self, flat_inputs: Sequence, tr: Trace | None = None, call: int = 0) -> tuple:
        """Run the program once. `tr`, when given, records every partition run and copy of this call."""
        if self.direct is not None and tr is None:
            pid = self.program.steps[0].partition
            c = self.compiled[pid]
            if c.io_device == "cpu" and not [x for x in flat_inputs if type(x) is torch.Tensor and not x.is_cpu]:
                return tuple(self._call_direct(pid, c, flat_inputs))
        env = dict(zip(self.program.graph_inputs, flat_inputs))
        # torch.profiler sees only the thread that started it: op tracing runs the partitions in this one
        if not self.concurrent or (tr is not None and tr.ops):
            for step in self.program.steps:
                self._run_step(step, env, tr, call)
        else:
            self._run_concurrent(env, tr, call)
        return self.outputs(env)

    def outputs(self, env: dict) -> tuple:
        """The graph's outputs from the values a run computed, on the CPU."""
        outs = []
        for i, v in enumerate(self.program.graph_outputs):
            x = env[v] if v is not None else self.program.constants[i]
            outs.append(x.to("cpu") if isinstance(x, torch.Tensor) and x.device.type != "cpu" else x)
        return tuple(outs)

    def _run_concurrent(self, env: dict, tr: Trace | None, call: int) -> None:
        futures: dict[str, Future] = {}
        lock = threading.Lock()

        def task(step):
            for d in self._deps[step.partition]:
                futures[d].result()  # dependencies were submitted earlier, to FIFO workers: no deadlock
            with lock:
                local = {v: env[v] for v in step.inputs}
            self._run_step(step, local, tr, call)
            with lock:
                env.update({v: local[v] for v in step.outputs})

        for step in self.program.steps:
            member = self.compiled[step.partition].member
            futures[step.partition] = self._workers[member].submit(task, step)
        for f in futures.values():
            f.result()

    def pipeline(self, depth: int | None = None):
        """This program's pipeline (`pipelining.Pipeline`), made on first use (with `depth` batches in flight at
        most; the default is two per stage) and closed with the runtime."""
        from .pipelining import Pipeline

        with self._lock:
            if self._pipeline is None:
                self._pipeline = Pipeline(self, depth=depth)
            return self._pipeline

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
        for w in self._workers.values():
            w.shutdown(wait=True)


class RoutedRuntime:
    """A runtime as a live model's callers see it (`opt.runtime`): `run` goes through the live model (`run_flat`,
    flat inputs to flat outputs), so a caller of `opt.runtime.run`, such as the batcher, is served like a call of
    the model; anything else is the runtime of the plan serving now (`serving()`)."""

    def __init__(self, run_flat: Callable[[list], tuple], serving: Callable[[], Runtime]):
        self._run_flat, self._serving = run_flat, serving

    def run(self, flat_inputs: Sequence, tr: Trace | None = None, call: int = 0) -> tuple:
        return self._run_flat(list(flat_inputs))

    def __getattr__(self, name: str):
        return getattr(self._serving(), name)
