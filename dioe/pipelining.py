"""Pipelining: a stream of batches through a plan whose partitions sit on different members, each member working
on its own batch at once. Batch k+1 enters the first stage while batch k is in the second.

A stage is a run of consecutive partitions (in the program's order) on one member; each member's stages run in
that member's own worker thread, so a member never runs two batches at once and keeps to its thread budget. A
batch passes from stage to stage through the members' queues; at most `depth` batches are in flight, which bounds
every queue. Outputs come back in the order the batches went in; a batch that fails fails alone.

    >>> outs = list(opt.map([(x1,), (x2,), (x3,)], depth=4))   # doctest: +SKIP
    >>> fut = opt.submit(x4); out = fut.result()                 # doctest: +SKIP
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence, TypeVar

from .cores import pin
from .errors import DIOEError
from .tracing import Trace

T = TypeVar("T")


def group_stages(items: Sequence[T], member_of: Callable[[T], Hashable]) -> list[list[T]]:
    """Runs of consecutive `items` on one member: the pipeline's stages, in order.

        >>> group_stages(["a1", "a2", "b1", "a3"], lambda s: s[0])
        [['a1', 'a2'], ['b1'], ['a3']]
    """
    out: list[list[T]] = []
    for x in items:
        if out and member_of(out[-1][-1]) == member_of(x):
            out[-1].append(x)
        else:
            out.append([x])
    return out


@dataclass(frozen=True)
class Stage:
    member: str
    steps: tuple        # the program's steps this stage runs, in order


class PipelineClosed(DIOEError):
    """A batch submitted to, or still waiting in, a pipeline that was closed."""


@dataclass
class _Batch:
    env: dict           # value name -> value: the batch's inputs, then what its stages computed
    future: Future
    trace: Trace | None
    call: int
    model: str          # the call slice's name in a trace
    start: float        # when it took its place in the pipeline


_STOP = object()


class Pipeline:
    """The stages of `runtime`'s program, each on its member's worker thread. `depth`: how many batches may be in
    flight at once (by default two per stage: one running, one waiting at each)."""

    def __init__(self, runtime, *, depth: int | None = None):
        self.runtime = runtime
        steps = runtime.program.steps
        self.stages = tuple(Stage(g[0][1], tuple(s for s, _ in g)) for g in group_stages(
            [(s, runtime.compiled[s.partition].member) for s in steps], lambda sm: sm[1]))
        self.depth = 2 * len(self.stages) if depth is None else depth
        if not isinstance(self.depth, int) or self.depth < 1:
            raise DIOEError(f"depth must be a positive integer (batches in flight), got {depth!r}")
        self._slots = threading.BoundedSemaphore(self.depth)
        self._lock = threading.Lock()
        self._closed = False
        self._in_flight: set[Future] = set()
        members = list(dict.fromkeys(s.member for s in self.stages))
        # Unbounded queues: the semaphore bounds them to `depth` batches. Bounded queues between members that
        # serve more than one stage (a, b, a) could deadlock, each member blocked putting into the other's.
        self._inbox: dict[str, queue.SimpleQueue] = {m: queue.SimpleQueue() for m in members}
        self._threads = [threading.Thread(target=self._work, args=(m,), name=f"dioe-stage-{m}", daemon=True)
                         for m in members]
        self._started = False   # the workers start with the first batch: a pipeline never fed costs no thread

    @property
    def pipelined(self) -> bool:
        """Whether batches can overlap: more than one stage."""
        return len(self.stages) > 1

    # -- callers ---------------------------------------------------------------------------------------------
    def submit(self, flat_inputs: Sequence, *, trace: Trace | None = None, call: int = 0,
               model: str = "model") -> Future:
        """Queue one batch (the program's flat inputs); a Future of its flat outputs. Blocks while `depth`
        batches are in flight. `trace`: record the batch as call `call` of `model`, its partitions with it."""
        while not self._slots.acquire(timeout=0.1):
            if self._closed:
                break
        with self._lock:
            if self._closed:
                raise PipelineClosed("the pipeline is closed and takes no more batches")
            if not self._started:
                for t in self._threads:
                    t.start()
                self._started = True
            fut: Future = Future()
            fut.set_running_or_notify_cancel()
            self._in_flight.add(fut)
        fut.add_done_callback(self._done)
        env = dict(zip(self.runtime.program.graph_inputs, flat_inputs))
        self._inbox[self.stages[0].member].put((0, _Batch(env, fut, trace, call, model, time.perf_counter())))
        return fut

    def _done(self, fut: Future) -> None:
        with self._lock:
            self._in_flight.discard(fut)
        self._slots.release()

    def map(self, batches: Iterable[Sequence], *, depth: int | None = None) -> Iterator:
        """Each batch's flat outputs, in order, with up to `depth` batches in flight (the pipeline's by default).
        A batch that failed raises its error when its turn comes; the batches after it have run all the same."""
        return window(batches, self.submit, self.depth if depth is None else depth)

    def close(self, *, timeout_s: float = 30.0) -> None:
        """Take no more batches, let those in flight finish (for at most `timeout_s`), fail any left, and stop
        the workers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            left = list(self._in_flight)
        deadline = time.monotonic() + timeout_s
        for f in left:
            try:
                f.exception(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 -- a batch that did not finish in time is failed below
                break
        for f in list(self._in_flight):
            _settle(f, error=PipelineClosed(f"the pipeline closed before this batch finished "
                                            f"(waited {timeout_s:g} s)"))
        for q in self._inbox.values():
            q.put(_STOP)
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))

    # -- the member workers ------------------------------------------------------------------------------------
    def _work(self, member: str) -> None:
        inbox = self._inbox[member]
        rt = self.runtime
        pin(rt.pool[member].cores)   # a member's work keeps to its cores, as the runtime's own workers do
        while True:
            item = inbox.get()
            if item is _STOP:
                return
            i, b = item
            if b.future.done():   # failed by close while it waited
                continue
            stage = self.stages[i]
            try:
                for step in stage.steps:
                    rt._run_step(step, b.env, b.trace, b.call, stage=i)
                if i + 1 < len(self.stages):
                    self._inbox[self.stages[i + 1].member].put((i + 1, b))
                    continue
                outs = rt.outputs(b.env)
            except BaseException as e:  # noqa: BLE001 -- the batch's own error, for its own caller
                self._record(b)
                _settle(b.future, error=e)
                continue
            self._record(b)
            _settle(b.future, result=outs)

    def _record(self, b: _Batch) -> None:
        """The batch's call slice, before its Future frees its place: the next batch's slice on the same slot
        starts after this one ends. Overlapping batches take lanes by slot, so that each lane's slices nest."""
        if b.trace is not None:
            b.trace.add("call", call=b.call, model=b.model, start=b.start, end=time.perf_counter(), pipelined=True,
                        slot=b.call % self.depth)


def window(items: Iterable, submit: Callable[[object], Future], depth: int) -> Iterator:
    """Results of `submit(item)` for each item, in order, with at most `depth` submitted and not yet yielded. A
    bad `depth` is an error now, not at the first result."""
    if not isinstance(depth, int) or depth < 1:
        raise DIOEError(f"depth must be a positive integer (batches in flight), got {depth!r}")
    return _window(items, submit, depth)


def _window(items: Iterable, submit: Callable[[object], Future], depth: int) -> Iterator:
    pending: collections.deque[Future] = collections.deque()
    try:
        for item in items:
            if len(pending) >= depth:
                yield pending.popleft().result()
            pending.append(submit(item))
        while pending:
            yield pending.popleft().result()
    finally:  # a consumer that stops early: what it submitted still finishes, unobserved
        pending.clear()


def submit_call(opt, args: tuple, kwargs: dict) -> Future:
    """`opt(*args, **kwargs)` as a Future: into the pipeline when its plan has stages on several members, else
    run at once in the caller's thread (one stage has nothing to overlap with). Inputs that do not match the
    captured ones raise `InputSpecError` here, at once, either way; what goes wrong while the call runs is the
    Future's error."""
    from . import tracing as _trace

    pipe = opt.runtime.pipeline()
    flat = opt.captured.flatten_inputs(args, kwargs)
    if not pipe.pipelined:
        fut: Future = Future()
        try:
            fut.set_result(opt(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 -- the call's error, raised by fut.result() as a pipeline's is
            fut.set_exception(e)
        return fut
    tr = _trace.active()
    call = 0
    if tr is not None:  # each batch is one call: its partitions carry its call index and their stage
        tr.attach(opt.runtime.pool, opt.plan)
        call = tr.next_call()
    inner = pipe.submit(flat, trace=tr, call=call, model=opt.plan.model)
    out: Future = Future()

    def finish(f: Future) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())
        else:
            try:
                out.set_result(opt.captured.unflatten_outputs(f.result()))
            except Exception as e:  # noqa: BLE001
                out.set_exception(e)
    inner.add_done_callback(finish)
    return out


def map_calls(opt, batches: Iterable, depth: int | None) -> Iterator:
    """`opt(*batch)` for each batch (a tuple of inputs, or one input), in order, up to `depth` in flight."""
    pipe = opt.runtime.pipeline()
    return window(batches, lambda b: submit_call(opt, tuple(b) if isinstance(b, (tuple, list)) else (b,), {}),
                  pipe.depth if depth is None else depth)


def _settle(f: Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Answer `f` unless it is answered already: close and a stage's worker may both try, from two threads."""
    try:
        if error is not None:
            f.set_exception(error)
        else:
            f.set_result(result)
    except InvalidStateError:
        pass
