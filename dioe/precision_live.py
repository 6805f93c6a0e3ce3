"""Live precision switching, `optimize(..., precision="live")`: serve the fp32 plan at once, sample the real
inputs it serves, build the lower-precision plan in the background once enough are seen, shadow-test it on held-
apart samples, promote it when it meets the accuracy budget and races faster, and demote it when the inputs drift
from what it was calibrated on.

    >>> opt = dioe.optimize(model, inputs, precision="live", accuracy=dioe.Budget(cosine=0.99))  # doctest: +SKIP
    >>> for x in traffic: y = opt(x)                     # fp32 now; the lower precision once it has earned it
    >>> opt.live.wait(60); opt.live.state, opt.plan.partitions[0].precision                      # doctest: +SKIP
    ('promoted', 'int8')
    >>> opt.close()                                                                              # doctest: +SKIP

The caller never waits for a build: calls keep running on the plan that serves now, and a switch happens between
calls (a call finishes on the plan it started on). Every switch, and every attempt that was not promoted, is an
event in `opt.stats["precision"]["events"]` and in the active trace, with its reason.
"""

from __future__ import annotations

import collections
import threading
import time
import warnings
import weakref
from dataclasses import replace
from typing import Any

import torch

from . import precision as precisions
from . import tracing as _trace
from .accuracy import AccuracyReport, Budget, evaluate
from .calibration import Samples
from .errors import DIOEError
from .optimized import Optimized
from .plan import Choice
from .planner import Job
from .precision_record import Candidate
from .reservoir import Reservoir
from .runtime import RoutedRuntime

SAMPLING, TESTING, PROMOTED, SETTLED, CLOSED = "sampling", "testing", "promoted", "settled", "closed"


def check_options(*, calibration: Any) -> None:
    """What `optimize(precision="live")` refuses before it starts."""
    if calibration is not None:
        raise DIOEError("precision='live' calibrates on the inputs it serves; calibration= is for the offline search "
                        "(precision='auto' or 'int8'): pass one or the other")


def serve(safe: Optimized, job: Job, *, budget: Budget | None) -> "LiveModel":
    """`safe` (the fp32 plan optimize chose) wrapped to switch precision live; see the module docstring."""
    captured = job.captured
    budget = budget or Budget.default_for(captured.unflatten_outputs(captured.reference_outputs()))
    live = LiveModel(safe, job, budget)
    s = job.settings
    safe.plan = replace(safe.plan, notes=safe.plan.notes + (
        f"precision live: fp32 serves while served inputs are sampled; after {s.live_after_calls} calls and "
        f"{s.calibration_samples} calibration + {live.live.reservoir.caps['shadow']} shadow samples, lower "
        f"precisions are built and shadow-tested against the budget {budget} in the background",))
    return live


class LiveModel:
    """A model served by its fp32 plan until a lower precision earns its place. Call it like the model; `plan`
    and `runtime` are those serving now; `live` is the switching itself (`live.wait(timeout)`, `live.state`)."""

    def __init__(self, safe: Optimized, job: Job, budget: Budget):
        self.safe, self.captured = safe, safe.captured
        self.live = LivePrecision(safe, job, budget)
        live = self.live
        self._runtime = RoutedRuntime(live.run, lambda: live.serving.runtime)  # sampled, shadow-checked, switched
        weakref.finalize(self, self.live.close, timeout_s=0.0)  # a model dropped unclosed stops its thread too

    def __call__(self, *args, **kwargs) -> Any:
        return self.live.call(args, kwargs)

    @property
    def plan(self):
        return self.live.serving.plan

    @property
    def runtime(self) -> RoutedRuntime:
        return self._runtime

    @property
    def race(self):
        return self.safe.race

    @property
    def precision_search(self):
        return None   # no offline search ran; `stats["precision"]` says what the live one did

    @property
    def stats(self) -> dict:
        """The serving plan's run-time faults, and under "precision" the live switching's state, counts and
        events (each with its reason)."""
        return {**self.live.serving.stats, "precision": self.live.stats()}

    def save(self, path):
        """Write the plan serving now (see `Optimized.save`)."""
        return self.live.serving.save(path)

    def close(self, *, timeout_s: float = 60.0) -> None:
        """Stop the background thread (a build under way finishes first, up to `timeout_s`) and release the
        engines; the model serves no more calls."""
        self.live.close(timeout_s=timeout_s)

    def __enter__(self) -> "LiveModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LivePrecision:
    """The state machine behind a `LiveModel`: sampling -> testing -> promoted (or back to sampling, with the
    reason, when a candidate is rejected or demoted) -> ... -> settled once `Settings.live_attempts` are spent."""

    def __init__(self, safe: Optimized, job: Job, budget: Budget):
        s = job.settings
        self.safe, self.job, self.budget = safe, job, budget
        example = job.captured.example_inputs
        self.batch = next((x.shape[0] for x in example if isinstance(x, torch.Tensor) and x.dim()), 1)
        self.reservoir = Reservoir(example, n_calibrate=s.calibration_samples,
                                   n_shadow=budget.holdout_inputs(self.batch), max_bytes=s.live_sample_bytes)
        self.serving: Optimized = safe
        self.candidate: Optimized | None = None
        self.state = SAMPLING
        self.report: AccuracyReport | None = None      # the latest verdict on the serving candidate
        self.samples: Samples | None = None             # what the latest attempt calibrated and shadow-tested on
        self.counts = collections.Counter()
        self.events: collections.deque = collections.deque(maxlen=100)
        self._since = 0                                 # calls served since this attempt began sampling
        self._shadow: collections.deque = collections.deque()
        self._window: collections.deque = collections.deque(maxlen=budget.holdout_inputs(self.batch))
        self._inflight: collections.Counter = collections.Counter()
        self._build_due = False
        self._busy = False
        lock = threading.Lock()
        self._cv = threading.Condition(lock)        # the background thread's work, and `wait`
        # calls in flight ending: a condition of its own, so that a call ending does not wake the background thread
        # (one context switch per call, which cost more than a small model's call)
        self._drained = threading.Condition(lock)
        self._draining = False
        self._thread = threading.Thread(target=self._loop, name="dioe-live-precision", daemon=True)
        self._thread.start()

    # -- the caller's path ------------------------------------------------------------------------------------
    def call(self, args: tuple, kwargs: dict) -> Any:
        """One call of the model, on the plan serving when it starts."""
        serving, shadow = self._enter()
        try:
            if shadow:
                flat = self.captured_flat(args, kwargs)
                outs = serving.runtime.run(flat)
                self._enqueue(serving, flat, outs)
                return self.job.captured.unflatten_outputs(outs)
            out = serving(*args, **kwargs)
        finally:
            self._leave(serving)
        self._sample(serving, lambda: self.captured_flat(args, kwargs))
        return out

    def run(self, flat: list) -> tuple:
        """One call on flat inputs, as `Runtime.run` takes them (the batcher's stacked batches come this way)."""
        serving, shadow = self._enter()
        try:
            outs = serving.runtime.run(flat)
            if shadow:
                self._enqueue(serving, flat, outs)
        finally:
            self._leave(serving)
        self._sample(serving, lambda: flat)
        return outs

    def _enter(self) -> tuple[Optimized, bool]:
        """The plan this call runs on (read once: the call finishes on it, whatever switches meanwhile), and
        whether it is one of the promoted calls that are shadow-checked."""
        with self._cv:
            if self.state == CLOSED:
                raise DIOEError("this live model is closed; optimize the model again to serve it")
            serving = self.serving
            self._inflight[id(serving)] += 1
            self.counts["calls"] += 1
            self._since += 1
            lowp = serving is not self.safe
            self.counts["calls_lowp"] += lowp
            return serving, lowp and self.counts["calls"] % self.job.settings.live_shadow_every == 0

    def _leave(self, serving: Optimized) -> None:
        with self._cv:
            self._inflight[id(serving)] -= 1
            if not self._inflight[id(serving)]:
                del self._inflight[id(serving)]
                if self._draining:
                    self._drained.notify_all()

    def _sample(self, serving: Optimized, flat) -> None:
        """Offer a call served by the fp32 plan to the reservoir, and start the build once it is due."""
        if serving is self.safe and self.state == SAMPLING:
            if self.reservoir.offer(flat):
                self.counts["sampled"] += 1
            self._maybe_build()

    def captured_flat(self, args: tuple, kwargs: dict) -> list:
        return self.job.captured.flatten_inputs(args, kwargs)

    def _maybe_build(self) -> None:
        s = self.job.settings
        if self.state != SAMPLING or not self.reservoir.full or self._since < s.live_after_calls:
            return
        with self._cv:
            if self.state == SAMPLING:
                self.state, self._build_due = TESTING, True
                self._cv.notify_all()

    def _enqueue(self, serving: Optimized, flat, outs) -> None:
        """A shadow check of one promoted call, for the background thread; dropped (and counted) when the queue is
        full, so a burst of traffic costs the caller one copy at most."""
        item = (serving, tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in flat),
                tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in outs))
        with self._cv:
            if len(self._shadow) >= self.job.settings.live_shadow_queue:
                self.counts["shadow_dropped"] += 1
                return
            self._shadow.append(item)
            self._cv.notify_all()

    # -- waiting and closing ----------------------------------------------------------------------------------
    def wait(self, timeout: float) -> bool:
        """Block until the background thread has nothing left to do (no build due, no shadow check queued), at
        most `timeout` seconds; True when it is idle, False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self.state == CLOSED or not (self._build_due or self._busy or
                                                                           self._shadow), timeout)

    def close(self, *, timeout_s: float = 60.0) -> None:
        with self._cv:
            if self.state == CLOSED:
                return
            self.state = CLOSED
            self._shadow.clear()
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
            if self._thread.is_alive() and timeout_s > 0:
                warnings.warn(f"dioe: the live precision thread is still building after {timeout_s:g} s; it stops "
                              "when that build ends", RuntimeWarning, stacklevel=3)
        for o in {id(o): o for o in (self.candidate, self.safe) if o is not None}.values():
            o.runtime.close()

    def stats(self) -> dict:
        with self._cv:
            return {"state": self.state, "serving": _label(self.serving), "budget": str(self.budget),
                    "counts": dict(self.counts), "samples": self.reservoir.stats(),
                    "agreement": self.report.summary() if self.report is not None else None,
                    "events": list(self.events)}

    # -- the background thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                self._busy = False
                self._cv.notify_all()
                self._cv.wait_for(lambda: self.state == CLOSED or self._build_due or self._shadow)
                if self.state == CLOSED:
                    return
                build, self._busy = self._build_due, True
                self._build_due = False
                item = None if build else self._shadow.popleft()
            try:
                if build:
                    self._attempt()
                else:
                    self._check(*item)
            except Exception as e:  # noqa: BLE001 - the caller's path must never see the background's failures
                self._event("error", f"{type(e).__name__}: {str(e)[:300]}")
                self._back_to_fp32(f"live precision failed: {type(e).__name__}")

    def _attempt(self) -> None:
        """Build the lower-precision candidates on the calibration samples, judge them on the shadow samples against
        fp32 eager, race the ones that meet the budget against the fp32 plan, and promote the winner."""
        self.counts["attempts"] += 1
        self.samples = samples = self.reservoir.snapshot()
        job = self.job
        options = precisions.candidates(job, "live")
        self._event("testing", f"{len(samples.calibrate)} calibration and {len(samples.holdout)} shadow samples "
                    f"from {self._since} calls; candidates: {', '.join(o.label() for o in options) or 'none'}")
        if not options:
            self._settle("no member and engine of this plan runs below fp32")
            return
        holdout = [list(x) for x in samples.holdout]
        with _trace.stage("precision live: build and shadow-test", candidates=[o.label() for o in options]):
            reference = precisions.eager_outputs(job, holdout)
            missed: dict[str, Optimized] = {}
            tried, built = precisions.judge(job, options, samples, self.budget, reference, missed=missed)
            if missed:
                tried += self._mixes(missed, built, samples, reference)
            if not built:
                self._reject("; ".join(f"{c.label}: {c.why}" for c in tried))
                return
            best, fast, med, said = precisions.pick(self.safe, built, job)
        if best == precisions.FP32:
            self._reject(f"no gain over the fp32 plan: {said[0]}")
            return
        won = next(c for c in tried if c.label == best)
        cand = built[best]
        notes = [f"precision live: budget {self.budget}, judged on {len(holdout) * self.batch} shadow samples of "
                 f"served inputs against fp32 eager; calibrated on {len(samples.calibrate)} others"] + said
        cand.plan = precisions.promoted_plan(self.safe.plan, cand, won, fast, med, notes)
        with self._cv:
            if self.state == CLOSED:
                cand.runtime.close()
                return
            self.candidate, self.report = cand, won.report
            self._window.clear()
            self.serving, self.state = cand, PROMOTED
            self.counts["promotions"] += 1
        self._event("promoted", cand.plan.notes[-1] if won.mix else cand.plan.partitions[0].reason, plan=best)

    def _mixes(self, missed: dict[str, Optimized], built: dict[str, Optimized], samples: Samples,
               reference: list) -> list[Candidate]:
        """The lower precisions whose whole graph missed the budget, mixed with a higher precision over parts
        (`precisions.mix`, which adds what meets it to `built`), as the search at optimize does; only those that
        race faster than the fp32 plan that serves, since a mix runs no faster than its whole graph. Each is
        closed here."""
        job, margin = self.job, self.job.settings.split_margin
        fast, _ = precisions._race({precisions.FP32: self.safe, **built, **missed}, job, job.settings.race_rounds)
        speed = {k: v / fast[precisions.FP32] for k, v in fast.items() if k != precisions.FP32}
        out = []
        for label in [k for k in missed if speed.get(k, 1.0) > 1 - margin]:
            missed.pop(label).runtime.close()
            out.append(Candidate(Choice.parse(label), None,
                                 f"not mixed: its whole graph did not race {margin:.0%} faster than the fp32 plan"))
        return out + precisions.mix(job, missed, built, samples, self.budget, reference, speed)

    def _check(self, serving: Optimized, flat: tuple, got: tuple) -> None:
        """One promoted call judged against fp32 eager; once a budget's worth of samples is in the window, the
        candidate is demoted when the window no longer meets the budget."""
        if serving is not self.serving:
            return   # demoted since: its verdict is in
        (ref,) = precisions.eager_outputs(self.job, [flat])
        self._window.append((ref, got))
        self.counts["shadow_checked"] += 1
        if len(self._window) < self._window.maxlen:
            return
        report = evaluate(self.budget, [r for r, _ in self._window], [g for _, g in self._window])
        self.report = report
        if not report.met:
            self.counts["demotions"] += 1
            self._event("demoted", f"served inputs drifted: the last {len(self._window) * self.batch} shadow-checked "
                        f"samples miss the budget: {report.summary()}", plan=_label(serving))
            self._back_to_fp32("demoted")

    # -- switching back ----------------------------------------------------------------------------------------
    def _back_to_fp32(self, why: str) -> None:
        """Serve the fp32 plan again; retire the candidate once its calls in flight end; sample afresh while
        attempts are left."""
        with self._cv:
            cand, self.candidate = self.candidate, None
            self.serving = self.safe
            if cand is not None:
                self._draining = True
                self._drained.wait_for(lambda: id(cand) not in self._inflight, timeout=30.0)
                self._draining = False
            closed = self.state == CLOSED
        if cand is not None:
            cand.runtime.close()
        if not closed:
            if self.counts["attempts"] >= self.job.settings.live_attempts:
                self._settle(f"{why}; {self.counts['attempts']} attempt(s) spent (Settings.live_attempts)")
            else:
                self._resample()

    def _reject(self, why: str) -> None:
        self._event("rejected", why)
        self._back_to_fp32("rejected")

    def _settle(self, why: str) -> None:
        with self._cv:
            if self.state != CLOSED:
                self.state = SETTLED
        self._event("settled", f"serving fp32 from now on: {why}")

    def _resample(self) -> None:
        self.reservoir.reset()
        with self._cv:
            if self.state != CLOSED:
                self._since, self.state = 0, SAMPLING

    def _event(self, event: str, why: str, **fields) -> None:
        e = {"time": time.time(), "event": event, "why": why, "serving": _label(self.serving), **fields}
        with self._cv:
            self.events.append(e)
        tr = _trace.active()
        if tr is not None:
            tr.add("precision", start=time.perf_counter(), model=self.job.captured.name, event=event, why=why,
                   serving=e["serving"], **fields)


def _label(opt: Optimized) -> str:
    parts = opt.plan.partitions
    if len(parts) == 1:
        return parts[0].choice.label()
    return f"{len(parts)}-partition {'+'.join(sorted({p.precision for p in parts}))} plan"


__all__ = ["LiveModel", "LivePrecision", "check_options", "serve"]
