"""Issue-4 targets for one zoo model, measured side by side in one run: optimize() cold and warm time, the
optimized latency against each single backend compiled whole (fp32), and the runtime's overhead: DIOE's call
against its partitions' compiled callables called directly, one after another, in the same rounds.

    python tools/bert_targets.py [MODEL] [--rounds 20]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings

import dioe
from dioe import backends
from dioe.backend import Partition
from dioe import timing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="bert-base")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    cache = tempfile.mkdtemp(prefix="dioe-bench-")
    try:
        model, inputs = dioe.zoo.load(args.model)
        t0 = time.perf_counter()
        opt = dioe.optimize(model, inputs, cache_dir=cache)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        opt = dioe.optimize(model, inputs, cache_dir=cache)
        warm = time.perf_counter() - t0
        print(opt.plan.summary())
        g, pool = opt.captured, dioe.ResourcePool.discover()
        flat = g.example_inputs
        singles = {}
        for name in ("torch", "inductor", "onnxruntime", "openvino"):
            if backends.unavailable_reason(name):
                continue
            c = backends.get(name, cache).compile(Partition("whole", g.gm, flat), pool.reference, "fp32")
            singles[name] = c
        # the plan's partitions called directly, in order, on their own example inputs: what DIOE's call adds on
        # top of them, called as the user calls it (input checks, routing, output structure), is the overhead
        steps = [(opt.runtime.compiled[st.partition], opt.program.partition(st.partition)) for st in opt.program.steps]
        direct = [(c, backends.get(c.backend, cache).to_io(part.example_inputs, pool[c.member])) for c, part in steps]

        def partitions(_xs):
            for c, xs in direct:
                c(*xs)
        calls = {**{name: (lambda xs, c=c: c(*xs)) for name, c in singles.items()},
                 "dioe": lambda _xs: opt(*inputs), "partitions": partitions}
        # the race's own side-by-side timing: interleaved rounds in a rotated order with a pause before each
        # contender, so that drift hits everyone alike and nobody always follows the same one. With 5 rounds of 15
        # calls, DIOE's call read 9% over its partition called directly, and 0.5% under it with 24 rounds of 5
        s = dioe.Settings()
        results = timing.side_by_side(calls, flat, rounds=args.rounds, repeats=s.race_repeats,
                                      budget_s=s.timing_budget_s / s.race_rounds)
        med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
        parts = med.pop("partitions")
        best = min((v, k) for k, v in med.items() if k != "dioe")
        print(f"\n{args.model}: optimize cold {cold:.1f} s, warm {warm:.1f} s")
        for k, v in sorted(med.items(), key=lambda kv: kv[1]):
            print(f"  {k:12s} {v:8.2f} ms   {v / best[0]:.2f}x best single ({best[1]})")
        print(f"  runtime overhead: {med['dioe'] - parts:+.2f} ms over its {len(direct)} partition(s) called directly "
              f"({parts:.2f} ms), {100 * (med['dioe'] - parts) / med['dioe']:+.1f}%; medians of {args.rounds} "
              "interleaved rounds")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
