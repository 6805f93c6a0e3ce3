"""The dynamic batcher: concurrent callers' requests are queued, stacked along the batch dimension, run under the
plan of their bucket and split back, in order. The knobs are named as Triton's dynamic batcher names them.

    >>> opt = dioe.optimize(model, inputs)                                        # doctest: +SKIP
    >>> with Batcher(opt, model=model, max_batch_size=8, max_queue_delay_ms=2) as b:  # doctest: +SKIP
    ...     out = b(*inputs)                          # same structure as opt(*inputs), from any thread
"""

from __future__ import annotations

import heapq
import itertools
import math
import queue
import threading
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..errors import DIOEError, InputSpecError
from .buckets import Buckets


class QueueFull(DIOEError):
    """The batcher's queue holds `queue_size` requests; try again after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeout(DIOEError, TimeoutError):
    """A request was not answered within its `timeout_ms`."""


class BatcherClosed(DIOEError):
    """The batcher was closed; it takes no more requests."""


class RequestFailed(DIOEError):
    """The model failed on this request (run alone, after its batch failed); the message says how."""


class Metrics:
    """What the batcher reports as it runs; the HTTP server and the Ray replicas export it. This base ignores it."""

    def queue_depth(self, n: int) -> None: ...
    def batch(self, rows: int, bucket: int, seconds: float) -> None: ...
    def request(self, seconds: float, outcome: str) -> None: ...   # ok, timeout, rejected, error
    def retry(self, requests: int) -> None: ...                    # a failed batch re-run one request at a time
    def fallbacks(self, n: int) -> None: ...                       # new run-time engine fallbacks


@dataclass(order=True)
class _Request:
    priority: int
    order: int
    inputs: tuple = field(compare=False)
    rows: int = field(compare=False)
    seq: int | None = field(compare=False)
    submitted: float = field(compare=False)
    deadline: float | None = field(compare=False)
    future: Future = field(compare=False)


class Batcher:
    """Batch concurrent calls to an optimized model. Call it like the model, from any number of threads.

    Knobs, as Triton's dynamic batcher has them: `max_batch_size` (rows per batch), `max_queue_delay_ms` (how
    long the oldest request waits for company), `preferred_batch_sizes` (the batch sizes to form and to build
    plans for ahead), `queue_size` (a full queue rejects at once with `QueueFull`), `timeout_ms` (a request not
    answered by then fails with `RequestTimeout`; None waits for ever), `priorities` (levels 1, highest, to
    `priorities`; `default_priority` for calls that name none, the lowest by default).

    `model` is needed to build the plans of buckets other than `opt`'s own shape; `optimize_options` are passed
    to `dioe.optimize` for them (by default this plan's pool and precision). `sequence_buckets` are the padded
    lengths of token inputs. A batch that fails is re-run one request at a time, so a bad request fails alone."""

    def __init__(self, opt, *, model: torch.nn.Module | None = None, max_batch_size: int = 8,
                 max_queue_delay_ms: float = 2.0, preferred_batch_sizes: Sequence[int] = (), queue_size: int = 64,
                 timeout_ms: float | None = None, priorities: int = 1, default_priority: int | None = None,
                 sequence_buckets: Sequence[int] | None = None, optimize_options: Mapping[str, Any] | None = None,
                 build_ahead: bool = True, metrics: Metrics | None = None):
        if max_queue_delay_ms < 0:
            raise DIOEError(f"max_queue_delay_ms must be 0 or more, got {max_queue_delay_ms}")
        if not isinstance(queue_size, int) or queue_size < 1:
            raise DIOEError(f"queue_size must be a positive integer, got {queue_size!r}")
        if timeout_ms is not None and timeout_ms <= 0:
            raise DIOEError(f"timeout_ms must be positive or None (no timeout), got {timeout_ms}")
        if not isinstance(priorities, int) or priorities < 1:
            raise DIOEError(f"priorities must be a positive integer (the number of levels), got {priorities!r}")
        self.priorities = priorities
        self.default_priority = self._check_priority(priorities if default_priority is None else default_priority)
        self.buckets = Buckets(opt, model=model, max_batch_size=max_batch_size,
                               preferred_batch_sizes=preferred_batch_sizes, sequence_buckets=sequence_buckets,
                               optimize_options=optimize_options)
        self.name = self.buckets.name
        self.max_batch_size, self.queue_size, self.timeout_ms = max_batch_size, queue_size, timeout_ms
        self.max_queue_delay_s = max_queue_delay_ms / 1000
        self.preferred = tuple(sorted(set(preferred_batch_sizes)))
        self.metrics = metrics or Metrics()
        if build_ahead and self.preferred:
            self.buckets.build([self.buckets.longest(b) for b in self.preferred])
        self._heap: list[_Request] = []
        self._rows = 0   # rows queued in _heap
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._batch_s = 0.0   # a running mean of batch times, for Retry-After
        self._fallbacks = self.buckets.fallbacks()
        self._answers: queue.SimpleQueue | None = None   # batches in a pipeline, to answer when done
        self._answerer: threading.Thread | None = None
        self._worker = threading.Thread(target=self._loop, name=f"dioe-batcher-{self.name}", daemon=True)
        self._worker.start()

    # -- callers -----------------------------------------------------------------------------------------------
    def __call__(self, *inputs: torch.Tensor, priority: int | None = None, timeout_ms: float | None = None) -> Any:
        return self.result(self.submit(*inputs, priority=priority, timeout_ms=timeout_ms),
                           timeout_ms=self.timeout_ms if timeout_ms is None else timeout_ms)

    def submit(self, *inputs: torch.Tensor, priority: int | None = None, timeout_ms: float | None = None) -> Future:
        """Queue one request; returns a Future of its outputs. Raises `QueueFull` at once when the queue is full."""
        rows, seq = self.buckets.check(inputs)
        prio = self.default_priority if priority is None else self._check_priority(priority)
        timeout_ms = self.timeout_ms if timeout_ms is None else timeout_ms
        now = time.monotonic()
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"{self.name}: the batcher is closed and takes no more requests")
            if len(self._heap) >= self.queue_size:
                self.metrics.request(0.0, "rejected")
                raise QueueFull(f"{self.name}: the queue is full ({self.queue_size} requests waiting); retry "
                                f"after {self.retry_after_s()} s or raise queue_size", self.retry_after_s())
            deadline = None if timeout_ms is None else now + timeout_ms / 1000
            heapq.heappush(self._heap, _Request(prio, next(self._order), tuple(inputs), rows, seq, now, deadline,
                                                fut))
            self._rows += rows
            self.metrics.queue_depth(len(self._heap))
            # wake the worker only when this request changes what it waits for: the first one starts the queue
            # delay, a full batch ends it, a deadline may come sooner. Waking it for every request costs each batch
            # as many thread switches as it has requests.
            if len(self._heap) == 1 or self._rows >= self.max_batch_size or deadline is not None:
                self._cond.notify()
        return fut

    def result(self, fut: Future, *, timeout_ms: float | None) -> Any:
        """Wait for a submitted request; a request not answered within `timeout_ms` raises `RequestTimeout`."""
        try:
            return fut.result(None if timeout_ms is None else timeout_ms / 1000)
        except RequestTimeout:  # the worker's own verdict; a TimeoutError too, so it is caught first
            raise
        except FutureTimeout:
            if fut.cancel():
                where = "in the queue"
                self.metrics.request(timeout_ms / 1000, "timeout")
            else:  # the worker took it: it may be expiring it this instant, with the same error, or running it
                try:
                    return fut.result(0.05)
                except RequestTimeout:
                    raise
                except FutureTimeout:
                    where = "while its batch ran"
            raise RequestTimeout(f"{self.name}: no answer within timeout_ms={timeout_ms:g} (timed out {where})") \
                from None
        except CancelledError:
            raise RequestTimeout(f"{self.name}: the request was cancelled after its timeout") from None

    def retry_after_s(self) -> int:
        """Whole seconds until the queue has likely room again: the batches ahead at the mean batch time."""
        batches = math.ceil((len(self._heap) + 1) / self.max_batch_size)
        return max(1, math.ceil(batches * self._batch_s))

    @property
    def queue_depth(self) -> int:
        return len(self._heap)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_priority(self, p: int) -> int:
        if not isinstance(p, int) or not 1 <= p <= self.priorities:
            raise DIOEError(f"priority must be an integer from 1 (highest) to priorities={self.priorities}, "
                            f"got {p!r}")
        return p

    # -- shutdown ----------------------------------------------------------------------------------------------
    def close(self, *, timeout_s: float = 30.0) -> None:
        """Take no more requests, answer the queued ones, and stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout_s)
        with self._cond:  # whatever the worker could not reach in time is answered, not left waiting
            left, self._heap, self._rows = self._heap, [], 0
        for r in left:
            if r.future.set_running_or_notify_cancel():
                r.future.set_exception(BatcherClosed(f"{self.name}: the batcher closed before this request ran"))

    def __enter__(self) -> "Batcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the worker --------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                if self._answers is not None:   # the batches in a pipeline are answered before the worker ends
                    self._answers.put(None)
                    self._answerer.join()
                return
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[_Request] | None:
        """Wait for a batch: `max_batch_size` rows, or what is queued once the oldest request has waited
        `max_queue_delay_ms`. None once closed and drained."""
        with self._cond:
            while True:
                self._expire(time.monotonic())
                if not self._heap:
                    if self._closed:
                        return None
                    self._cond.wait(self._until_next_deadline())
                    continue
                rows = self._rows
                wait = min(r.submitted for r in self._heap) + self.max_queue_delay_s - time.monotonic()
                if rows >= self.max_batch_size or wait <= 0 or self._closed:
                    return self._take(rows)
                self._cond.wait(min(wait, self._until_next_deadline() or wait))

    def _take(self, available: int) -> list[_Request]:
        """Pop the highest-priority requests, up to `max_batch_size` rows, or up to the largest preferred batch
        size that the queue fills; without preferred sizes, a batch that would be padded to a slower bucket takes
        only the rows that fill the one below (`Buckets.rows_to_take`)."""
        cap = min(self.max_batch_size, available)
        fitting = [b for b in self.preferred if b <= cap]
        if fitting and cap not in self.preferred:
            cap = fitting[-1]
        elif not self.preferred:
            cap = self.buckets.rows_to_take(cap)
        batch, rows, skipped = [], 0, []
        while self._heap and rows < cap:
            r = heapq.heappop(self._heap)
            if rows + r.rows > self.max_batch_size:
                skipped.append(r)
                continue
            if r.future.set_running_or_notify_cancel():   # False: its caller gave up on it
                batch.append(r)
                rows += r.rows
        for r in skipped:
            heapq.heappush(self._heap, r)
        self._rows = sum(r.rows for r in self._heap)
        self.metrics.queue_depth(len(self._heap))
        return batch

    def _until_next_deadline(self) -> float | None:
        deadlines = [r.deadline for r in self._heap if r.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _expire(self, now: float) -> None:
        late = [r for r in self._heap if r.deadline is not None and r.deadline <= now]
        if not late:
            return
        self._heap = [r for r in self._heap if not (r.deadline is not None and r.deadline <= now)]
        heapq.heapify(self._heap)
        self._rows = sum(r.rows for r in self._heap)
        for r in late:
            if r.future.set_running_or_notify_cancel():
                self.metrics.request(now - r.submitted, "timeout")
                r.future.set_exception(RequestTimeout(
                    f"{self.name}: no answer within timeout_ms={(r.deadline - r.submitted) * 1000:g} (timed out in "
                    "the queue)"))
        self.metrics.queue_depth(len(self._heap))

    def _run(self, batch: list[_Request]) -> None:
        t0 = time.perf_counter()
        try:
            fut = self.buckets.submit([r.inputs for r in batch], [(r.rows, r.seq) for r in batch])
        except Exception as e:  # noqa: BLE001 -- answered below, as a batch that failed
            fut = Future()
            fut.set_exception(e)
        if fut.done():
            self._finish(batch, fut, t0)
            return
        # A pipelined plan took the batch and returned: the worker forms the next batch while this one runs, and
        # the answers thread answers this one when it is done (in order; its retries go through the pipeline too).
        with self._cond:
            if self._answers is None:
                self._answers = queue.SimpleQueue()
                self._answerer = threading.Thread(target=self._answer_loop, name=f"dioe-answers-{self.name}",
                                                  daemon=True)
                self._answerer.start()
        self._answers.put((batch, fut, t0))

    def _answer_loop(self) -> None:
        while True:
            item = self._answers.get()
            if item is None:
                return
            self._finish(*item)

    def _finish(self, batch: list[_Request], fut: Future, t0: float) -> None:
        try:
            outs = fut.result()
        except Exception as e:  # noqa: BLE001 -- one bad request must not fail the others: re-run each alone
            if len(batch) == 1:
                self._answer(batch[0], error=self._failure(e))
            else:
                self.metrics.retry(len(batch))
                for r in batch:
                    try:
                        self._answer(r, out=self.buckets.run([r.inputs], [(r.rows, r.seq)])[0])
                    except Exception as e1:  # noqa: BLE001
                        self._answer(r, error=self._failure(e1))
        else:
            took = time.perf_counter() - t0
            with self._cond:   # the worker and the answers thread both finish batches
                self._batch_s = took if not self._batch_s else 0.8 * self._batch_s + 0.2 * took
            rows = sum(r.rows for r in batch)
            self.metrics.batch(rows, self.buckets.bucket_for(rows, max((r.seq for r in batch if r.seq), default=None)
                                                            ).batch, took)
            for r, out in zip(batch, outs):
                self._answer(r, out=out)
        with self._cond:
            fb = self.buckets.fallbacks()
            new, self._fallbacks = fb - self._fallbacks, fb
        if new:
            self.metrics.fallbacks(new)

    def _answer(self, r: _Request, *, out: Any = None, error: Exception | None = None) -> None:
        self.metrics.request(time.monotonic() - r.submitted, "ok" if error is None else "error")
        if error is None:
            r.future.set_result(out)
        else:
            r.future.set_exception(error)

    def _failure(self, e: Exception) -> DIOEError:
        if isinstance(e, (InputSpecError, RequestTimeout, BatcherClosed)):
            return e
        return RequestFailed(f"{self.name}: the model failed on this request: {type(e).__name__}: {e}")
