"""Live precision switching on a zoo model: per-call latency while fp32 serves and samples, while the lower
precision is built and shadow-tested in the background, and once it is promoted (or why it was not), with the
agreement bound that promoted it. Nothing is scripted: the race and the accuracy are this machine's.

    python tools/precision_live_bench.py [--model tiny-bert] [--backends onnxruntime] [--calls 400]
        [--out bench/results/live/precision-<machine>.md] [--machine "..."]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import dioe
from dioe.calibration import generate
from dioe.files import write_text
from dioe.text import table


def _serve(opt, traffic: list, calls: int, start: int) -> list[tuple[float, str]]:
    """`calls` calls cycling through `traffic`: each one's latency in ms and the state it was served in."""
    out = []
    for i in range(calls):
        x = traffic[(start + i) % len(traffic)]
        state = opt.live.state
        t0 = time.perf_counter()
        opt(*x)
        out.append(((time.perf_counter() - t0) * 1e3, state))
    return out


def _row(label: str, times: list[float]) -> list[str]:
    if not times:
        return [label, "0", "-", "-"]
    q = statistics.quantiles(times, n=20) if len(times) > 1 else [times[0]] * 19
    return [label, str(len(times)), f"{statistics.median(times):.3f}", f"{q[18]:.3f}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-bert")
    ap.add_argument("--size", default="full", choices=["full", "small"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--backends", default="onnxruntime", help="comma-separated backends to profile")
    ap.add_argument("--calls", type=int, default=400, help="calls served after the switch settles")
    ap.add_argument("--max-calls", type=int, default=20000, help="calls served at most before it settles")
    ap.add_argument("--after-calls", type=int, default=128, help="Settings.live_after_calls")
    ap.add_argument("--budget", default=None, help="e.g. 'cosine>=0.99' (default: Budget.default_for the output)")
    ap.add_argument("--machine", default="this machine", help="named in the report")
    ap.add_argument("--out", type=Path, help="write the report here (markdown)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    model, inputs = dioe.zoo.load(args.model, size=args.size, batch=args.batch)
    traffic = dioe.zoo.calibration(args.model, n=256, size=args.size, batch=args.batch) or \
        generate(inputs, n=256, seed=1)
    settings = dioe.Settings(live_after_calls=args.after_calls)
    budget = dioe.Budget.parse(args.budget) if args.budget else None
    t0 = time.perf_counter()
    opt = dioe.optimize(model, inputs, backends=args.backends.split(","), precision="live", accuracy=budget,
                        settings=settings)
    optimize_s = time.perf_counter() - t0
    try:
        served: list[tuple[float, str]] = []
        build_t0 = None
        # serve until the switching settles (promoted, or fp32 for good); calls keep being served during builds
        while opt.live.state not in ("promoted", "settled") and len(served) < args.max_calls:
            served += _serve(opt, traffic, 1, len(served))
            if build_t0 is None and opt.live.state == "testing":
                build_t0 = time.perf_counter()
        opt.live.wait(600)
        build_s = time.perf_counter() - build_t0 if build_t0 is not None else 0.0
        served += _serve(opt, traffic, args.calls, len(served))
        stats = opt.stats["precision"]
    finally:
        opt.close()
    rows = [_row(label, [t for t, s in served if s == state])
            for state, label in (("sampling", "fp32, sampling"), ("testing", "fp32, build and shadow test under way"),
                                 ("promoted", f"{stats['serving']}, promoted"), ("settled", "fp32, settled"))]
    lines = [f"# Live precision switching: {args.model} ({args.size}), {args.machine}", "",
             f"`dioe.optimize(..., precision=\"live\")`, backends {args.backends}, batch {inputs[0].shape[0]}, "
             f"budget `{stats['budget']}`; {args.after_calls} calls before the build may start. optimize took "
             f"{optimize_s:.1f} s; from the first build to the settled state {build_s:.1f} s.", "",
             "```", table(rows, ["served", "calls", "median ms", "p95 ms"]), "```", "",
             f"Agreement with fp32 eager on held-apart served inputs: {stats['agreement'] or '-'}", "",
             "Events:", ""]
    lines += [f"- {e['event']}: {e['why']}" for e in stats["events"]]
    lines += ["", f"Samples held: {stats['samples']}; counts: {stats['counts']}", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
