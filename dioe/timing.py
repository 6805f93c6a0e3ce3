"""Every timing loop DIOE runs: one segment's median for the profile, one call's median for the measure step,
contenders in interleaved rounds for the race, and the wait for idle cores between engines.

    >>> t = measure(lambda: None, (), warmup=1, min_runs=3, max_runs=3)
    >>> t.runs
    3

The constants below are part of the method, not knobs: they describe how engines and this machine behave.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

HEAVY_S = 0.05   # a call this long is stable after one warm-up, and three runs give its median

# Engines leave worker threads spinning after a call, waiting for the next one: torch's OpenMP workers for about
# 10 ms, ONNX Runtime's for 40-60 ms (a core's worth of this process's CPU time while it slept; minilm, 2 cores).
# Whatever is timed inside that window shares the cores with them: a 1024^3 GEMM read 116-149 GFLOP/s 20 ms after
# an ONNX Runtime call, against 170-177 once its workers were idle.
SETTLE_SLICE_S, SETTLE_MAX_S = 0.005, 0.25


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p25_ms: float
    p75_ms: float
    runs: int


def measure(fn: Callable, inputs: Sequence, *, warmup: int = 2, min_runs: int = 5, max_runs: int = 25,
            budget_s: float = 0.4) -> Timing:
    """Median and quartiles of `fn(*inputs)` wall time after warm-up; stops at max_runs or the time budget.
    A heavy call (over HEAVY_S) gets one warm-up and at least three runs instead of `warmup` and `min_runs`;
    with no warm-up asked for (a callable already warm), every call is a sample."""
    if warmup:
        t0 = time.perf_counter()
        fn(*inputs)
        if time.perf_counter() - t0 > HEAVY_S:
            warmup, min_runs = 1, min(min_runs, 3)
        for _ in range(warmup - 1):
            fn(*inputs)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_runs or (len(samples) < max_runs and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn(*inputs)
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return Timing(statistics.median(samples), q[0], q[2], len(samples))


def time_call(fn: Callable, *args, repeats: int = 10, warmup: int = 2, budget_s: float | None = None,
              min_runs: int = 3) -> float:
    """Median wall time of fn(*args) in ms: `repeats` runs, or fewer (at least `min_runs`) once `budget_s` is
    spent, so that a heavy model at a large batch is not timed for tens of seconds."""
    return measure(fn, args, warmup=warmup, min_runs=min(min_runs, repeats), max_runs=repeats,
                   budget_s=float("inf") if budget_s is None else budget_s).median_ms


def settle(max_s: float = SETTLE_MAX_S) -> float:
    """Sleep until this process's threads have gone idle (under a fifth of a core over a 5 ms slice), for at most
    `max_s`: before timing one engine after another. Returns the seconds waited."""
    t0 = time.perf_counter()
    while True:
        c0 = time.process_time()
        time.sleep(SETTLE_SLICE_S)
        waited = time.perf_counter() - t0
        if time.process_time() - c0 < 0.2 * SETTLE_SLICE_S or waited >= max_s:
            return waited


def side_by_side(runs: Mapping[str, Callable[[Sequence], Any]], flat: Sequence, *, rounds: int, repeats: int,
                 budget_s: float, warm: bool = False) -> dict[str, list[float]]:
    """Each callable's median ms per round, timed in interleaved rounds so that drift in the machine's state hits
    every contender alike. The order rotates each round, so that no contender always follows the same one, and
    each waits for the cores to go idle first (`settle`). Each contender gets at most `repeats` calls and about
    `budget_s` per round. `warm`: every callable has run already, so no call is spent on warming up (at batch 8 a
    warm-up call of a whole transformer took 1.6-3 s per contender)."""
    samples: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    with torch.inference_mode():
        for r in range(rounds):
            for k in order[r % len(order):] + order[:r % len(order)]:
                # An engine called straight after torch ran up to 20% slower (OpenVINO on minilm: 21.0 ms against
                # 17.7 ms; 18.1 ms after a 10 ms pause): without this the race ranks whoever follows eager too low.
                settle()
                samples[k].append(time_call(runs[k], flat, repeats=repeats, min_runs=1,
                                            warmup=0 if warm or r else 1, budget_s=budget_s))
    return samples


def fast_half(rounds: Sequence[float]) -> float:
    """Mean of the faster half of a contender's rounds (the faster two of three): the machine's noise only ever
    adds time."""
    fast = sorted(rounds)[:(len(rounds) + 1) // 2]
    return sum(fast) / len(fast)
