"""Issue-4 targets for one zoo model, measured side by side in one run: optimize() cold and warm time, the
optimized latency against each single backend compiled whole (fp32), and the runtime's overhead.

    python tools/bert_targets.py [MODEL] [--cache DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings

import torch

import dioe
from dioe import backends
from dioe.backend import Partition
from dioe.runtime import time_call


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="bert-base")
    ap.add_argument("--repeats", type=int, default=15)
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
        results = {}
        with torch.inference_mode():
            for _ in range(2):  # interleave rounds so drift hits everyone alike
                for name, c in singles.items():
                    results.setdefault(name, []).append(time_call(c, *flat, repeats=args.repeats))
                results.setdefault("dioe", []).append(time_call(opt.runtime.run, flat, repeats=args.repeats))
        med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
        best = min((v, k) for k, v in med.items() if k != "dioe")
        parts = sum(p.measured_ms or 0 for p in opt.plan.partitions)
        print(f"\n{args.model}: optimize cold {cold:.1f} s, warm {warm:.1f} s")
        for k, v in sorted(med.items(), key=lambda kv: kv[1]):
            print(f"  {k:12s} {v:8.2f} ms   {v / best[0]:.2f}x best single ({best[1]})")
        print(f"  runtime overhead: {med['dioe'] - parts:+.2f} ms over the sum of partitions ({parts:.2f} ms), "
              f"{100 * (med['dioe'] - parts) / med['dioe']:+.1f}%")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
