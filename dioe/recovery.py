"""What the runtime does when an engine raises: retry once on the same engine, then run the call on torch at the
reference member (the fallback, built once per partition, when first needed), and count the failure on the
partition's circuit breaker (`breaker.Breaker`). An open breaker binds a detour in place of the engine: calls take
the fallback, and after a cool-down probe the planned engine, which is bound again once probes pass.

A request that the fallback refuses too (eager refuses it) is not the engine's fault: it raises one `RunError`
naming the partition, the engine's error and the fallback's, and counts against nothing. No call is lost: each
returns a result computed by the planned engine or by the fallback, or raises that one error.
"""

from __future__ import annotations

import time
import warnings
import weakref
from typing import Sequence

import torch

from . import backends as registry
from . import tracing as _trace
from .backend import Compiled
from .errors import BackendError, DIOEError, RunError


class Recovery:
    """The fault handling of `Runtime` (which holds planned, compiled, breakers, stats, fallbacks and _lock)."""

    def recover(self, pid: str, failed: Compiled, error: BackendError, args: Sequence) -> tuple:
        """The outputs of a call of partition `pid` whose engine `failed` raised `error`; or the one clear error
        of a call that cannot have them."""
        if isinstance(error.__cause__, DIOEError):   # the detour's own verdict (a RunError): the call's error
            raise error.__cause__
        planned = self.planned[pid]
        if failed is planned:
            with self._lock:
                self.stats["retries"] += 1
            try:
                outs = planned(*args)
            except BackendError as again:
                error = again
            else:   # a transient fault: the engine stays, the breaker's count starts again
                self.breakers[pid].retried()
                return outs
        outs = self._on_fallback(pid, planned, str(error), args)  # raises RunError if eager refuses the call too
        if failed is planned and self.breakers[pid].failed():
            self._open(pid, planned, error)
        return outs

    def _on_fallback(self, pid: str, planned: Compiled, why: str, args: Sequence) -> tuple:
        """Run this call of `pid` on its fallback; `why`: the planned engine's error."""
        fallback = self._fallback_engine(pid)
        moved = [a.to("cpu") if isinstance(a, torch.Tensor) and not a.is_cpu else a for a in args]
        try:
            outs = fallback.fn(*moved)
        except Exception as e:
            raise RunError(f"{why}; and torch@{fallback.member}, its fallback, failed on this call too "
                           f"({type(e).__name__}: {e}). The inputs are refused by eager as well, or both engines "
                           f"are failing; no result was computed for this call.") from e
        with self._lock:
            self.stats["fallbacks"] += 1
            self.stats[f"fallback:{pid}"] += 1
            self.fallbacks[pid] = why
            warn = pid not in self._warned
            self._warned.add(pid)
        if warn:
            b = self.breakers[pid]
            warnings.warn(f"dioe: {why}. Re-ran this call of partition {pid} on torch@{fallback.member} (the "
                          f"reference) instead of {planned.backend}@{planned.member}; after {b.failures} such calls "
                          f"in a row the partition runs there until {b.probes} probe calls pass on "
                          f"{planned.backend} again. Expect it to be slower meanwhile.", RuntimeWarning, stacklevel=4)
        _event("fallback", pid, why=why[:300])
        return outs

    def _fallback_engine(self, pid: str) -> Compiled:
        """torch at the reference member for `pid`, compiled when first needed and kept."""
        with self._lock:
            c = self._fallback_engines.get(pid)
            if c is None:
                c = registry.get("torch", self.cache_dir).compile(self.program.partition(pid), self.pool.reference,
                                                                  "fp32")
                self._fallback_engines[pid] = c
            return c

    # -- the breaker's states -----------------------------------------------------------------------------------
    def _open(self, pid: str, planned: Compiled, error: BackendError) -> None:
        """Bind the detour: calls of `pid` take the fallback, and probe `planned` after the cool-down."""
        ref = weakref.ref(self)   # the runtime holds the detour; the detour does not keep the runtime alive

        def detour(*args):
            return ref()._detour_call(pid, planned, args)
        with self._lock:
            if self.planned[pid] is planned:
                self._bind(pid, Compiled(detour, pid, "torch", self.pool.reference.id, "fp32", planned.io_device,
                                         0.0, notes={"detour_of": f"{planned.backend}@{planned.member}"}))
        _event("breaker", pid, state="open", why=str(error)[:300])

    def _detour_call(self, pid: str, planned: Compiled, args: Sequence) -> tuple:
        """A call of `pid` while its breaker is open or half-open: a probe of `planned`, or the fallback."""
        b = self.breakers[pid]
        if b.route() == "probe":
            try:
                outs = planned(*args)
            except BackendError as e:
                b.probe_failed()
                _event("breaker", pid, state="open", why=f"probe failed: {str(e)[:300]}")
                return self._on_fallback(pid, planned, str(e), args)
            if b.passed():
                with self._lock:
                    if self.planned[pid] is planned:
                        self._bind(pid, planned)
                _event("breaker", pid, state="closed", why="probes passed")
            return outs
        return self._on_fallback(pid, planned, self.fallbacks.get(pid, "its breaker is open"), args)

    def breaker_states(self) -> dict:
        """Each partition's breaker: state, times opened and closed again, calls run on its fallback."""
        return {pid: {**b.snapshot(), "fallback_calls": self.stats[f"fallback:{pid}"]}
                for pid, b in self.breakers.items()}


def _event(kind: str, pid: str, **fields) -> None:
    """A fallback or breaker event in the active trace, if one is recording."""
    tr = _trace.active()
    if tr is not None:
        tr.add(kind, partition=pid, time=time.perf_counter(), **fields)
