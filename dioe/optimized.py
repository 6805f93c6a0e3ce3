"""`Optimized`: a model running under a DIOE plan. Call it like the model; read its plan, its race and its
fallbacks; save the plan.

    >>> opt = dioe.optimize(model, inputs)                  # doctest: +SKIP
    >>> out = opt(*inputs)                                   # same structure as model(*inputs)
    >>> opt.save("minilm.plan.json")                         # doctest: +SKIP
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch

from . import tracing as _trace
from .capture import CapturedGraph
from .hotcall import hot_call
from .plan import Plan
from .runtime import Runtime
from .split import Program

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .live import Live
    from .planner import Job
    from .precision_record import PrecisionRecord
    from .race import RaceRecord


class Optimized:
    """A model running under a DIOE plan. Call it like the model."""

    def __init__(self, captured: CapturedGraph, plan: Plan, program: Program, runtime: Runtime):
        self.captured, self.plan, self.program, self.runtime = captured, plan, program, runtime
        self.race: RaceRecord | None = None   # what the race measured and decided, when optimize raced this plan
        self.precision_search: PrecisionRecord | None = None   # what the precision stage tried, when it ran
        self.job: Job | None = None   # what optimize measured and planned from (live re-planning needs it)
        # The common call of a one-partition plan on the CPU is this model's __call__ itself: see _hot_call. Python
        # looks __call__ up on the type, so the instance takes a class of its own while its engine is on the CPU.
        self._base, self._hot_class, self._engine, self._rebuild = type(self), None, None, None
        io = captured.hot_io()
        hot = hot_call(io[0], runtime.direct, program.steps[0].partition, one_output=io[2],
                       ranges=captured.index_ranges) \
            if io is not None and runtime.direct is not None else None
        if hot is not None:
            self._rebuild = io[1]
            base = self._base
            self._hot_class = type(base.__name__, (base,), {"__call__": hot, "__module__": base.__module__,
                                                           "__qualname__": base.__qualname__, "__doc__": base.__doc__})
            runtime.on_replace.append(weakref.WeakMethod(self._bind_engine))  # weak: the runtime keeps no model alive
        self._bind_engine()

    @property
    def _hot(self) -> Callable | None:
        """The generated __call__ while this model is bound to it (its engine on the CPU), else None."""
        return self._hot_class.__call__ if type(self) is self._hot_class else None

    def _bind_engine(self) -> None:
        """Bind the hot call to the partition's engine as compiled now; one that takes another device than the
        CPU (none does today) leaves the hot call until one on the CPU replaces it."""
        if self._hot_class is None:
            return
        c = self.runtime.compiled[self.program.steps[0].partition]
        if c.io_device == "cpu":
            self._engine = c
            self.__class__ = self._hot_class
        else:  # the class first: a hot call under way in another thread still finds the engine it started with
            self.__class__ = self._base

    def __call__(self, *args, **kwargs) -> Any:
        return self._call(args, kwargs)

    def _call(self, args: tuple, kwargs: dict) -> Any:
        """The general path: any plan, any call; a trace records the call's partitions and copies."""
        flat = self.captured.flatten_inputs(args, kwargs)
        tr = _trace.active()
        if tr is None:  # each backend runs its partitions under inference mode itself
            return self.captured.unflatten_outputs(self.runtime.run(flat))
        with torch.inference_mode():
            tr.attach(self.runtime.pool, self.plan)
            tr.before_call()
            call = tr.next_call()
            t0 = time.perf_counter()
            out = self.runtime.run(flat, tr, call)
            tr.add("call", call=call, model=self.plan.model, start=t0, end=time.perf_counter(),
                   sequential=tr.ops and self.runtime.concurrent)
            return self.captured.unflatten_outputs(out)

    def submit(self, *args, **kwargs) -> "Future":
        """`self(*args, **kwargs)` as a Future. A plan with stages on several members pipelines the calls
        submitted together: batch k+1 enters the first stage while batch k is in the second (see `pipelining`)."""
        from .pipelining import submit_call

        return submit_call(self, args, kwargs)

    def map(self, batches: Iterable, *, depth: int | None = None) -> Iterator:
        """The outputs of `self(*batch)` for each batch (a tuple of inputs, or one input), in order, pipelined
        across the plan's members with up to `depth` batches in flight.

            >>> outs = list(opt.map([(x1,), (x2,)], depth=4))        # doctest: +SKIP
        """
        from .pipelining import map_calls

        return map_calls(self, batches, depth)

    @property
    def stats(self) -> dict:
        """Run-time faults: how many calls ran on the torch fallback, why each partition last left its planned
        engine, how many calls were retried on their engine, and each partition's circuit breaker."""
        return {"fallback_calls": self.runtime.stats["fallbacks"], "fallbacks": dict(self.runtime.fallbacks),
                "retries": self.runtime.stats["retries"], "breakers": self.runtime.breaker_states()}

    def go_live(self, **settings) -> Live:
        """This model under live re-planning (`dioe.live`; `settings` are `dioe.LiveSettings` fields)."""
        from .live import go_live

        return go_live(self, **settings)

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON (a folder gets `<model>.plan.json`, the model's name made one safe file name)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = self.plan.file_in(path)
        return self.plan.save(path)
