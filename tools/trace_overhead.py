"""What recording a trace costs: one optimized zoo model, latency with tracing off and on, measured side by side
in interleaved rounds (the issue's bound is 5% of latency).

    python tools/trace_overhead.py [MODEL] [--rounds N] [--small]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import dioe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="minilm")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20, help="calls per round")
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    model, inputs = dioe.zoo.load(args.model, size="small" if args.small else "full")
    opt = dioe.optimize(model, inputs)
    print(f"{args.model}: {len(opt.plan.partitions)} partition(s) on {', '.join(opt.plan.members())}")

    def per_call(traced: bool) -> float:
        t0 = time.perf_counter()
        if traced:
            with dioe.trace(None):
                for _ in range(args.calls):
                    opt(*inputs)
        else:
            for _ in range(args.calls):
                opt(*inputs)
        return (time.perf_counter() - t0) * 1e3 / args.calls

    per_call(False), per_call(True)  # warm-up
    off, on = [], []
    for _ in range(args.rounds):
        off.append(per_call(False))
        on.append(per_call(True))
    m_off, m_on = statistics.median(off), statistics.median(on)
    print(f"tracing off {m_off:.3f} ms/call, on {m_on:.3f} ms/call: {100 * (m_on - m_off) / m_off:+.2f}% "
          f"(median of {args.rounds} interleaved rounds of {args.calls} calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
