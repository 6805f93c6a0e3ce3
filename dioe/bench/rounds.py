"""The bench's timing method: every engine's calls in interleaved rounds, a block of calls per engine per round,
with a GEMM canary read between every two blocks; blocks timed while something else held the cores are timed
again once the canary reads quiet."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Callable

import torch

from ..timing import settle
from .machine import Canary, call_seconds

MAX_ROUNDS, CALLS_PER_ROUND = 20, 50
# The canary: a 1024^3 fp32 GEMM timed between every two blocks of calls (an engine's calls in one round). A block
# with a canary on either side below DISTURBED of the fastest canary of the run was timed while something else
# held the cores (on this 2-core machine a run timed resnet50's batch-1 rounds at half speed: the GEMM probe before
# them read 89 GFLOP/s against 175 in the run before, and every engine's median rose by 65-92%). Such a block is
# timed again once the canary reads quiet, for up to RETIME_S per model and batch; blocks still disturbed then are
# kept, and counted in the results. In runs 17 and 18, with a neighbour busy for most of both, 16 and 14 of 16
# models and batches spent the whole 30 s then allowed and still kept disturbed blocks (794 of 910, 621 of 875):
# about 7 of each run's 31 minutes, for little. Round-by-round paired ratios now carry the drift that re-timing
# was for.
DISTURBED, RETIME_S, QUIET_WAIT_S = 0.85, 15.0, 0.5


def estimate(fn: Callable, args) -> float:
    """Seconds per call, for sizing the rounds: the fastest of a few calls, at least two unless the first took
    over half a second. One call was not enough: inductor's first call inside the timing loop took 0.2 s on a
    0.3 ms model, which cut every engine of that model to 5 rounds and inductor to 2 calls a round."""
    times = [call_seconds(lambda: fn(*args))]
    while times[0] < 0.5 and (len(times) < 2 or (len(times) < 5 and sum(times) < 0.05)):
        times.append(call_seconds(lambda: fn(*args)))
    return max(min(times), 1e-5)


def disturbance_text(seen: dict) -> str:
    """What the canary saw over one model and batch's blocks, in words."""
    text = f"{seen['disturbed']} of {seen['blocks']} blocks disturbed"
    if seen["disturbed"]:
        text += f", {seen['retimed']} re-timed, {seen['left_disturbed']} left"
    return text


class _Block:
    """One engine's calls in one round, with the canary's readings just before and just after them."""

    def __init__(self, engine: str, calls: int, round_: int = 0):
        self.engine, self.calls, self.round = engine, calls, round_
        self.samples: list[float] = []
        self.before = self.after = 0.0

    def quiet(self, nominal: float) -> bool:
        return min(self.before, self.after) >= DISTURBED * nominal


def interleaved(built: dict, *, rounds: int, budget_s: float, canary: Canary | None = None
                ) -> tuple[dict[str, list[float]], dict[str, list[float]], int, dict]:
    """Round-robin: every engine runs a few calls per round, in a rotated order, so that drift in the machine's
    state (clocks, caches, a neighbour's load) hits all engines alike. An engine gets `budget_s` of calls in all,
    at least one per round: a 1 s call (vit-base at batch 8) is timed `rounds` times. Where even the slowest
    engine's 50 calls a round would leave most of the budget unspent, the rounds grow instead (up to 20), so that
    a fast model's samples are spread over seconds of the machine's drift rather than a few milliseconds of it.
    Every engine was called once already when it was built: that was its warm-up.
    Between every two blocks of calls the canary (a `Canary` unless given) reads the machine's GEMM speed; a block
    with a reading below DISTURBED of the canary's nominal speed on either side is timed again (see RETIME_S).
    Returns each engine's samples in ms, the median of its block in each round (the engines' blocks of one round
    ran seconds apart, which pairs them: see `paired_ratio`), the rounds, and what the canary saw."""
    canary = canary or Canary()
    est = {}
    blocks: list[_Block] = []
    with torch.inference_mode():
        for e, (fn, args) in built.items():
            est[e] = estimate(fn, args)
        if est:
            rounds = max(rounds, min(MAX_ROUNDS, int(budget_s / (CALLS_PER_ROUND * max(est.values())))))
        order = list(built)
        readings = [canary()]  # every reading, in order: the last is the machine's state right now

        def timed(block: _Block) -> _Block:
            fn, args = built[block.engine]
            block.before, block.samples = readings[-1], []
            settle()  # the previous engine's (or the canary's) spinning workers go idle first
            for _ in range(block.calls):
                t0 = time.perf_counter()
                fn(*args)
                block.samples.append((time.perf_counter() - t0) * 1e3)
            settle()
            readings.append(canary())
            block.after = readings[-1]
            return block

        for r in range(rounds):
            for e in order[r % len(order):] + order[:r % len(order)]:
                blocks.append(timed(_Block(e, max(1, min(CALLS_PER_ROUND, int(budget_s / rounds / est[e]))), r)))
        disturbed = [b for b in blocks if not b.quiet(canary.nominal)]
        retimed, deadline = 0, time.perf_counter() + RETIME_S
        while time.perf_counter() < deadline:
            again = [b for b in blocks if not b.quiet(canary.nominal)]
            if not again:
                break
            if readings[-1] < DISTURBED * canary.nominal:  # still busy: wait for the canary to read quiet
                time.sleep(QUIET_WAIT_S)
                readings.append(canary())
                continue
            # the engine with the most disturbed blocks first: should time run out, each engine's median still
            # rests on as many quiet blocks as the others' can
            timed(max(again, key=lambda b: sum(x.engine == b.engine for x in again)))
            retimed += 1
    samples: dict[str, list[float]] = {e: [] for e in built}
    by_round: dict[str, list[float]] = {e: [0.0] * rounds for e in built}
    for b in blocks:
        samples[b.engine] += b.samples
        by_round[b.engine][b.round] = statistics.median(b.samples)
    left = Counter(b.engine for b in blocks if not b.quiet(canary.nominal))
    seen = {"nominal_gflops": canary.nominal, "blocks": len(blocks), "disturbed": len(disturbed), "retimed": retimed,
            "left_disturbed": sum(left.values()), "left_by_engine": dict(left), "fastest_gflops": max(readings)}
    return samples, by_round, rounds, seen
