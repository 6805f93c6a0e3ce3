"""Fault injection: tiny-bert in three partitions (ONNX Runtime, OpenVINO, torch), every engine and the torch
fallback failing on a schedule (isolated blips, bursts, a long stretch), 10,000 calls (2,000 at CI's small size)
with 1 and with 8 threads.
Every call returns eager's result or raises one clear DIOE error; none is lost, none is wrong, and each breaker
closes again soon after the faults stop. The latency numbers are printed (`-s`), not asserted."""

import itertools
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import dioe
from dioe.build import build
from dioe.plan import Plan, PlanPartition

from helpers import eager, max_rel_error



class Schedule:
    """When each engine is down, in call numbers, for `calls` calls (10,000 at full size; CI's small size runs a
    fifth of them, the same phases scaled, the bursts as long)."""

    def __init__(self, calls: int):
        k = calls // 10
        self.calls = calls
        self.clean = range(0, 2 * k)        # fault-free: the baseline median is taken over its second half
        self.blips = range(2 * k, 4 * k)    # each engine fails one call in 37 of its own, and in a 20-call burst
        self.bursts = {name: range(2 * k + j * k // 2, 2 * k + j * k // 2 + 20)
                       for j, name in enumerate(["onnxruntime", "openvino", "torch"], start=1)}
        self.stretch = range(4 * k, 6 * k)  # every engine fails every call (torch's for the first half only) ...
        self.fallback_down = range(5 * k, 5 * k + min(k // 2, 100))  # ... and the fallback too: RunError
        self.quiet = 6 * k                  # no fault from here on

    def down(self, name: str, call: int, own: int) -> bool:
        if call in self.stretch:
            return name != "torch" or call < self.stretch.start + len(self.stretch) // 2
        if call in self.blips:
            return own % 37 == 0 or call in self.bursts[name]
        return False

    def fallback(self, name: str, call: int, own: int) -> bool:
        return call in self.fallback_down


class Clock(threading.local):
    """The number of the call the thread runs: the schedule's time (a plan on one member runs its partitions in
    the calling thread)."""
    now = 0


def inject(compiled, name: str, clock: Clock, down):
    """Wrap `compiled`'s callable: it raises when the schedule says its engine is down."""
    real, count, lock = compiled.fn, itertools.count(), threading.Lock()

    def fn(*args):
        with lock:
            own = next(count)
        if down(name, clock.now, own):
            raise RuntimeError(f"injected fault in {name}")
        return real(*args)
    compiled.fn = fn


def three_engine_plan(model, inputs, pool):
    g = dioe.capture(model, inputs, name="tiny-bert")
    nodes = [n.name for n in g.compute_nodes]
    cut = [0, len(nodes) // 3, 2 * len(nodes) // 3, len(nodes)]
    parts = tuple(PlanPartition(f"p{i}", (f"p{i}",), tuple(nodes[cut[i]:cut[i + 1]]), pool.reference.id, backend,
                                "fp32", cut[i + 1] - cut[i], 0.0, 1.0)
                  for i, backend in enumerate(["onnxruntime", "openvino", "torch"]))
    return build(g, Plan("tiny-bert", g.structure_hash(), "", "latency", parts, 1.0), pool, objective="latency")


@pytest.mark.models
@pytest.mark.parametrize("threads", [1, 8])
def test_no_call_is_lost_or_wrong_under_injected_faults(pool, zoo_size, threads):
    sched = Schedule(10_000 if zoo_size == "full" else 2_000)
    CALLS, QUIET, FALLBACK_DOWN = sched.calls, sched.quiet, sched.fallback_down
    model, (ids, mask) = dioe.zoo.load("tiny-bert")
    opt = three_engine_plan(model, (ids, mask), pool)
    rt = opt.runtime
    assert [rt.compiled[p].backend for p in ("p0", "p1", "p2")] == ["onnxruntime", "openvino", "torch"]
    gen = torch.Generator().manual_seed(3)
    good = [torch.randint(0, 1000, ids.shape, generator=gen) for _ in range(4)]
    bad = [ids.clone().index_fill_(1, torch.tensor([3]), v) for v in (-1, 1000)]
    cases = [(x, eager(model, (x, mask))) for x in good] + [(x, None) for x in bad]
    clock = Clock()
    for pid, c in rt.compiled.items():
        inject(c, c.backend, clock, sched.down)
        inject(rt._fallback_engine(pid), "fallback", clock, sched.fallback)
    latency, outcome = [0.0] * CALLS, [""] * CALLS
    closed_at = {}

    def one(call: int) -> None:
        clock.now = call
        x, want = cases[call % len(cases)]
        t0 = time.perf_counter()
        try:
            out = opt(x, mask)
        except dioe.IndexRangeError:
            outcome[call] = "refused" if want is None else "lost"
        except dioe.RunError:
            outcome[call] = "clear error" if call in FALLBACK_DOWN else "lost"
        except Exception as e:
            outcome[call] = f"lost: {type(e).__name__}: {e}"
        else:
            ok = want is not None and out is not None and max_rel_error(want, out) <= 1e-4
            outcome[call] = "ok" if ok else "wrong"
        latency[call] = time.perf_counter() - t0
        if call >= QUIET and not closed_at and all(b["state"] == "closed" for b in rt.breaker_states().values()):
            closed_at.setdefault("call", call)

    with pytest.warns(RuntimeWarning, match="injected fault"):
        if threads == 1:
            for call in range(CALLS):
                one(call)
        else:
            with ThreadPoolExecutor(threads) as ex:
                for f in [ex.submit(one, call) for call in range(CALLS)]:
                    f.result(timeout=120)
    counts = {k: outcome.count(k) for k in set(outcome)}
    assert set(counts) <= {"ok", "refused", "clear error"}, counts
    assert counts["refused"] == sum(1 for c in range(CALLS) if c % len(cases) >= len(good))
    assert 0 < counts.get("clear error", 0) <= len(FALLBACK_DOWN)
    states = opt.stats["breakers"]
    assert all(s["state"] == "closed" and s["opened"] >= 1 and s["closed"] >= 1 for s in states.values()), states
    assert closed_at and closed_at["call"] < QUIET + 100, closed_at
    assert opt.stats["retries"] > 0 and opt.stats["fallback_calls"] > 0
    base = statistics.median(latency[sched.clean.stop // 2:sched.clean.stop])
    after = statistics.median(latency[QUIET + 100:QUIET + 300])
    print(f"\n{threads} thread(s): {counts}; breakers closed by call {closed_at['call']} (faults stopped at "
          f"{QUIET}); median ms fault-free {base * 1e3:.3f}, calls {QUIET + 100}-{QUIET + 300} "
          f"{after * 1e3:.3f} ({after / base - 1:+.1%}); retries {opt.stats['retries']}, fallback calls "
          f"{opt.stats['fallback_calls']}; breakers {states}")
