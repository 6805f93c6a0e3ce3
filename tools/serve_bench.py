"""Serving, side by side in one run on one model: the plan's offline throughput per batch size, the batcher under a
closed loop of N clients (in-process and over HTTP), the unbatched HTTP server, DIOE on Ray Serve, and a plain Ray
Serve deployment of the model in torch with `@serve.batch` at the same knobs. Prints a table, writes a PNG of
latency over time and the numbers as JSON.

    python tools/serve_bench.py tiny-bert [--small] [--duration 10] [--clients 16] [--max-batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.utils._pytree as pytree

import dioe
from dioe.files import write_text
from dioe.serve import Batcher
from dioe.serve.buckets import engines
from dioe.serve.command import calibrated
from dioe.serve.http import make_app, start
from dioe.serve.loadgen import closed_loop, plot
from dioe.serve.metrics import PrometheusMetrics
from dioe.text import table


def offline(batcher: Batcher, seconds: float) -> list[dict]:
    """Rows per second of each batch size's plan, called back to back; and each batch's median latency."""
    per = seconds / len(batcher.buckets.batch_sizes)
    rows = []
    for b in batcher.buckets.batch_sizes:
        bucket = batcher.buckets.longest(b)
        opt = batcher.buckets.plan(bucket)
        rows.append({**quieter(opt, batcher.buckets.examples(bucket), b, per), "plan": engines(opt.plan)})
    return rows


def quieter(fn, x, batch: int, seconds: float) -> dict:
    """`fn(*x)` warmed once, then called back to back in two passes of `seconds`; rows per second and median latency
    of the quieter pass (the machine may be shared)."""
    fn(*x)
    lat = min(_again(fn, x, seconds), _again(fn, x, seconds), key=statistics.median)
    return {"batch": batch, "rows_per_s": batch * len(lat) / sum(lat), "latency_ms": 1000 * statistics.median(lat)}


def over(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a (nothing answered)"


def eager_at(batcher: Batcher, model: torch.nn.Module, batch: int, seconds: float) -> dict:
    """torch eager's rows per second at `batch`, on the same inputs, timed like the plan's: what a torch deployment
    computes at best, so the most any DIOE server can gain over one is the plan's offline rows per second over
    this."""
    with torch.inference_mode():
        return quieter(model, batcher.buckets.examples(batcher.buckets.longest(batch)), batch, seconds / 2)


def external_load(url: str, name: str, args, label: str):
    """A closed loop driven by `dioe loadtest` in a process of its own, so the clients do not share the server's
    interpreter lock."""
    import subprocess
    import sys

    from dioe.serve.loadgen import LoadResult

    out = Path(tempfile.mkdtemp()) / "load.json"
    exe = Path(sys.executable).with_name("dioe")
    subprocess.run([str(exe), "loadtest", url, "--model", name, "--duration", str(args.duration), "--concurrency",
                    str(args.clients), "--binary", "--json", str(out)], check=False, timeout=args.duration + 300,
                   stdout=subprocess.DEVNULL)
    r = LoadResult.from_dict(json.loads(out.read_text()))
    r.name = label
    return r


def _again(opt, x, seconds: float) -> list[float]:
    lat, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(lat) < 3:
        s = time.perf_counter()
        opt(*x)
        lat.append(time.perf_counter() - s)
    return lat


CEILING, PLAIN_RAY = "HTTP alone, no model (ceiling)", "plain Ray Serve, torch"


class Echo(torch.nn.Module):
    """The cheapest model with the served model's inputs and outputs: it answers the served model's own outputs
    (at batch 1) whatever it is asked. Served over HTTP it measures what the server, the codec and the clients
    cost on their own, the ceiling of any HTTP row."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        for i, t in enumerate(outputs):
            self.register_buffer(f"out{i}", t.detach().clone())
        self.n = len(outputs)

    def forward(self, x, *rest):
        touch = x.float().sum() * 0.0   # an output that does not depend on the input would be a constant
        return tuple(getattr(self, f"out{i}") + touch for i in range(self.n))


def http_ceiling(model: torch.nn.Module, inputs: tuple, args) -> "object":
    with torch.inference_mode():
        out = model(*inputs)
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    echo = Echo(leaves).eval()
    opt = dioe.optimize(echo, inputs, name="echo", backends=["torch"])
    with Batcher(opt, model=echo, max_batch_size=1, queue_size=4 * args.clients) as single, \
            start(make_app(single)) as url:
        return external_load(url, single.name, args, CEILING)


def ray_rows(args, plan_path: Path, buckets: Path, request: tuple, knobs: dict, started: dict,
             options: dict) -> list:
    """The two Ray rows; `started` gets each deployment's seconds from `serve.run` to its first answer (its
    replicas loading or building their plans)."""
    import ray
    from ray import serve

    from dioe.serve.http import bind
    from dioe.serve.ray import deployment, plain_torch_deployment

    with bind() as s:
        port = s.getsockname()[1]
    ray.init(num_cpus=args.ray_replicas, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"num_replicas": args.ray_replicas, "threads": 1, **knobs}
        for label, app in (("DIOE on Ray Serve", deployment(plan_path, model_spec=args.model, small=args.small,
                                                             optimize_options=options,
                                                             bucket_plans=buckets, **common)),
                           (PLAIN_RAY, plain_torch_deployment(args.model, small=args.small,
                                                                             **common))):
            t0 = time.perf_counter()
            handle = serve.run(app, name=label.replace(" ", "-").replace(",", ""), route_prefix=None)
            handle.infer.remote(*request).result(timeout_s=600)   # replicas up and warm
            started[label] = time.perf_counter() - t0
            results.append(closed_loop(lambda x, h=handle: h.infer.remote(*x).result(timeout_s=120), [request],
                                       concurrency=args.clients, duration_s=args.duration, name=label))
            serve.delete(label.replace(" ", "-").replace(",", ""))
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="zoo name")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per load row")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    ap.add_argument("--ray-replicas", type=int, default=2, help="one-thread replicas (0: no Ray rows)")
    ap.add_argument("--out", default="serve-bench", help="folder for the PNG and the JSON")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    out = Path(args.out)
    model, inputs = dioe.zoo.load(args.model, size="small" if args.small else "full")
    # below fp32, every bucket is calibrated and judged on the zoo's data where it has some, as `dioe serve` does
    options = calibrated({"precision": args.precision}, args.model, small=args.small,
                         max_batch_size=args.max_batch_size)
    opt = dioe.optimize(model, inputs, name=args.model, **options)
    knobs = {"max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms}
    plan_path = opt.save(Path(tempfile.mkdtemp()) / f"{args.model}.plan.json")
    metrics = PrometheusMetrics(args.model)
    loads = []
    with Batcher(opt, model=model, queue_size=4 * args.clients, metrics=metrics, optimize_options=options,
                 **knobs) as batcher:
        batcher.buckets.build()
        buckets = plan_path.parent / "buckets"
        batcher.buckets.save(buckets)   # what the Ray replicas load
        offline_rows = offline(batcher, 2 * args.duration)
        best = max(offline_rows, key=lambda r: r["rows_per_s"])
        torch_best = eager_at(batcher, model, best["batch"], args.duration)
        loads.append(closed_loop(lambda x: batcher(*x), [inputs], concurrency=args.clients,
                                 duration_s=args.duration, name="batcher, in-process"))
        with start(make_app(batcher, metrics)) as url:
            loads.append(external_load(url, batcher.name, args, "batcher, HTTP"))
    with Batcher(opt, model=model, max_batch_size=1, queue_size=4 * args.clients) as single, \
            start(make_app(single)) as url:
        loads.append(external_load(url, single.name, args, "unbatched, HTTP"))
    started: dict = {}
    if args.ray_replicas:
        loads += ray_rows(args, plan_path, buckets, inputs, knobs, started, options)
    loads.append(http_ceiling(model, tuple(inputs), args))
    rows = [[f"offline, batch {r['batch']} ({r['plan']})", f"{r['rows_per_s']:.1f}", f"{r['latency_ms']:.1f}", "-",
             "-", "-"] for r in offline_rows]
    rows.append([f"offline, torch eager, batch {torch_best['batch']}", f"{torch_best['rows_per_s']:.1f}",
                 f"{torch_best['latency_ms']:.1f}", "-", "-", "-"])
    for r in loads:
        d = r.to_dict()
        rows.append([r.name, f"{d['throughput']:.1f}", "-", f"{d['p50_ms']:.1f}", f"{d['p99_ms']:.1f}", str(d["errors"])])
    print(f"{args.model}{' (small)' if args.small else ''}, {args.precision}, {args.clients} clients, "
          f"{args.duration:g} s per load row, max_batch_size {args.max_batch_size}, "
          f"max_queue_delay_ms {args.max_queue_delay_ms:g}, torch threads {torch.get_num_threads()}")
    print(table(rows, ["row", "rows/s", "batch latency ms", "p50 ms", "p99 ms", "errors"]))
    b, by = loads[0].to_dict(), {r.name: r.throughput for r in loads}
    ratios = [f"batcher / offline best (batch {best['batch']}): {over(b['throughput'], best['rows_per_s'])}",
              f"p99 / that batch's latency: {over(b['p99_ms'], best['latency_ms'])}",
              # Little's law: N clients in a closed loop at X rows/s wait N/X on average, whatever the server does
              f"least mean latency at the best offline throughput ({args.clients} clients / its rows per s): "
              f"{over(args.clients / best['rows_per_s'], best['latency_ms'] / 1000)}x that batch's latency",
              f"batched / unbatched HTTP: {over(by['batcher, HTTP'], by['unbatched, HTTP'])}",
              f"unbatched HTTP / HTTP ceiling: {over(by['unbatched, HTTP'], by[CEILING])}",
              f"DIOE's plan / torch eager offline at batch {best['batch']} (the most a DIOE server gains over a "
              f"torch one): {over(best['rows_per_s'], torch_best['rows_per_s'])}"]
    if args.ray_replicas:
        ratios += [f"batcher HTTP / plain Ray torch: {over(by['batcher, HTTP'], by[PLAIN_RAY])}",
                   f"DIOE on Ray / plain Ray torch: {over(by['DIOE on Ray Serve'], by[PLAIN_RAY])}",
                   "Ray deployments up and answering after " + ", ".join(f"{k} {v:.1f} s" for k, v in started.items())]
    print("\n" + "; ".join(ratios))
    png = out / f"{args.model}.serve.png"
    out.mkdir(parents=True, exist_ok=True)
    plot(loads, png)
    record = {"model": args.model, "small": args.small, "precision": args.precision, "clients": args.clients,
              "duration_s": args.duration, "knobs": knobs, "ray_replicas": args.ray_replicas, "ray_start_s": started,
              "offline": offline_rows, "torch_eager": torch_best, "load": [r.to_dict() for r in loads]}
    write_text(out / f"{args.model}.serve.json", json.dumps(record, indent=1))
    print(f"latency over time: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
