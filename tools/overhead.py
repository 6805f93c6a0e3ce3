"""Per-call overhead of each backend: a tiny partition (one 4-element add) timed through each backend's
compiled callable, against calling the same torch function directly. Reported as medians over many calls.

    python tools/overhead.py [--calls 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import dioe
from dioe import backends
from dioe.backend import Partition


class Tiny(torch.nn.Module):
    def forward(self, x):
        return x + 1


def per_call_us(fn, x, calls: int, rounds: int = 7) -> float:
    for _ in range(min(calls, 1000)):
        fn(x)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x)
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    pool = dioe.ResourcePool.discover()
    cpu = pool.reference
    x = torch.randn(4)
    g = dioe.capture(Tiny(), (x,))
    part = Partition("tiny", g.gm, (x,))
    with torch.inference_mode():
        rows = {"plain torch call (x + 1)": per_call_us(lambda t: t + 1, x, args.calls)}
        for name in backends.names():
            if backends.unavailable_reason(name):
                rows[name] = None
                continue
            compiled = backends.get(name).compile(part, cpu, "fp32")
            rows[name] = per_call_us(compiled, x, args.calls)
    print(f"per-call cost of a one-op partition on {cpu.name} ({cpu.threads} threads), median of 7 x {args.calls}")
    for k, v in rows.items():
        print(f"  {k:28s} {'unavailable' if v is None else f'{v:7.2f} us'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": cpu.name, "per_call_us": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
