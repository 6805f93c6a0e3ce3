"""Scale-out on Ray Serve: a deployment whose replicas each load a saved plan, batch with the batcher's knobs
through `@serve.batch`, run each batch under the plan of its bucket, and export the batcher's metrics through Ray's
metrics. A replica on the plan's machine loads the plan, and the plan of each batch size from a folder written by
the batcher's `buckets.save`, whatever thread budget it is given; a replica on a machine whose pool differs
optimizes again for its own pool, from the model and the profile cached on disk (shared cache folder: no
re-measuring what was measured).

    >>> import ray; from ray import serve                                        # doctest: +SKIP
    >>> ray.init(num_cpus=2)
    >>> app = deployment("minilm.plan.json", bucket_plans="minilm-buckets", num_replicas=2, threads=1,
    ...                  max_batch_size=8)
    >>> handle = serve.run(app)
    >>> out = handle.infer.remote(ids, mask).result()

`plain_torch_deployment` is the baseline it is measured against: the same model in torch eager, with
`@serve.batch` at the same knobs and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from . import require
from .batcher import Metrics
from .metrics import BATCH_SIZES, LATENCY_S, Instruments
from ..errors import DIOEError, InputSpecError


class RayMetrics(Instruments):
    """The batcher's metrics under the same names, through `ray.util.metrics` (Ray's exporter serves them)."""

    def __init__(self, model: str):
        from ray.util import metrics as rm

        tags = {"model": model}
        self._queue = rm.Gauge("dioe_queue_depth", "Requests in the replica's current batch", tag_keys=("model",))
        self._batch = rm.Histogram("dioe_batch_size", "Rows per batch run", boundaries=list(BATCH_SIZES),
                                   tag_keys=("model",))
        self._batch_s = rm.Histogram("dioe_batch_latency_seconds", "Time to run one batch",
                                     boundaries=list(LATENCY_S), tag_keys=("model",))
        self._requests = rm.Counter("dioe_requests", "Requests by outcome", tag_keys=("model", "outcome"))
        self._retries = rm.Counter("dioe_batch_retries", "Requests re-run alone after their batch failed",
                                   tag_keys=("model",))
        self._fallbacks = rm.Counter("dioe_fallbacks", "Engine fallbacks at run time", tag_keys=("model",))
        for m in (self._queue, self._batch, self._batch_s, self._retries, self._fallbacks):
            m.set_default_tags(tags)
        self.model = model

    def request(self, seconds: float, outcome: str) -> None:
        self._requests.inc(1, tags={"model": self.model, "outcome": outcome})


def load_for_replica(plan_path: str, model_spec: str | None, *, small: bool, settings: Any, options: dict,
                     threads: int | None = None) -> tuple[Any, Any]:
    """(model, optimized) on this replica: the saved plan where this replica runs on the plan's machine, else a
    fresh optimize for this pool (the cached profile and engine artifacts make it a short one). `threads`: the
    replica's share of the CPU, which its engines keep to (the plan's, made for the whole machine, would run a
    thread per core in every replica at once); a share of the plan's machine still loads the plan."""
    from .. import zoo
    from ..pipeline import load, optimize
    from ..plan import Plan
    from ..pool import ResourcePool

    plan = Plan.load(plan_path)
    model, inputs = zoo.resolve(model_spec or plan.model, size="small" if small else "full")
    pool = ResourcePool.discover()
    if threads:
        pool = pool.with_threads(threads)
    if pool.same_machine(plan.pool_fingerprint) and set(plan.members()) <= {m.id for m in pool.members}:
        return model, load(plan_path, model, hardware=pool, settings=settings)
    return model, optimize(model, inputs, hardware=pool, settings=settings, name=plan.model, **options)


def owned(items: Sequence) -> list:
    """Calibration items with every tensor owning its storage: each replica receives the options pickled, and a
    pickled view carries its whole base (576 slices of one tokenized set made a 680 MB message)."""
    import torch

    return [tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in item) if isinstance(item, (tuple, list))
            else item.clone() if isinstance(item, torch.Tensor) else item for item in items]


def deployment(plan_path: str | Path, *, model_spec: str | None = None, small: bool = False, num_replicas: int = 2,
               threads: int = 1, max_batch_size: int = 8, max_queue_delay_ms: float = 2.0,
               preferred_batch_sizes: Sequence[int] = (), queue_size: int = 64, cache_dir: str | None = None,
               optimize_options: dict | None = None, bucket_plans: str | Path | None = None, name: str = "dioe"):
    """A bound Ray Serve application serving the plan at `plan_path` (pass it to `serve.run`). Each replica uses
    `threads` torch threads and one Ray CPU each. `bucket_plans`: a folder written by `Buckets.save` (the batcher's
    `buckets.save(folder)`) with a plan for each batch size: a replica on the machine they were made on loads them,
    where without them it optimizes one plan per batch size as it starts."""
    require("serve-ray", "ray")
    from ray import serve

    from ..plan import Plan

    plan_path = str(Path(plan_path).resolve())
    plan = Plan.load(plan_path)   # a bad path or plan fails here, not in every replica
    options = dict(optimize_options or {})
    taken = sorted(set(options) & {"hardware", "settings", "name"})
    if taken:
        raise DIOEError(f"optimize_options may not name {', '.join(taken)}: each replica sets them itself (its own "
                        "pool, capped at threads; cache_dir= for the cache folder; the plan's model name)")
    options.setdefault("precision", "fp32" if all(p.precision == "fp32" for p in plan.partitions) else "auto")
    if isinstance(options.get("calibration"), (list, tuple)):
        options["calibration"] = owned(options["calibration"])
    if bucket_plans is not None:
        bucket_plans = str(Path(bucket_plans).resolve())
        if not Path(bucket_plans).is_dir():   # here, not in every replica
            raise DIOEError(f"bucket_plans={bucket_plans}: no such folder (Buckets.save writes one)")

    @serve.deployment(name=name, num_replicas=num_replicas, max_ongoing_requests=queue_size,
                      ray_actor_options={"num_cpus": threads})
    class DIOEReplica:
        def __init__(self):
            import torch

            from ..settings import Settings
            from .buckets import Buckets

            torch.set_num_threads(threads)
            settings = Settings(cache_dir=Path(cache_dir)) if cache_dir else Settings()
            model, opt = load_for_replica(plan_path, model_spec, small=small, settings=settings, options=options,
                                          threads=threads)
            self.buckets = Buckets(opt, model=model, max_batch_size=max_batch_size,
                                   preferred_batch_sizes=preferred_batch_sizes,
                                   optimize_options={**options, "settings": settings})
            if bucket_plans is not None:
                self.buckets.load(bucket_plans)
            self.buckets.build()   # every bucket's plan before the first request, not in the middle of a load
            self.metrics = RayMetrics(self.buckets.name)
            self._fallbacks = self.buckets.fallbacks()

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_queue_delay_ms / 1000)
        async def _batch(self, requests: list) -> list:
            return run_batch(self.buckets, requests, self.metrics)

        async def describe(self) -> list[dict]:
            """This replica's buckets: what each plan runs and where it came from (loaded or optimized here)."""
            return self.buckets.describe()

        async def infer(self, *inputs) -> Any:
            """The model's outputs for one request (a tuple of input tensors), batched with its neighbours."""
            shape = self.buckets.check(inputs)   # a bad request fails alone, before it joins a batch
            out = await self._batch((tuple(inputs), shape))
            fb = self.buckets.fallbacks()
            if fb != self._fallbacks:
                self.metrics.fallbacks(fb - self._fallbacks)
                self._fallbacks = fb
            if isinstance(out, Exception):
                raise out
            return out

        async def __call__(self, request) -> Any:
            """HTTP, as the DIOE server takes it: JSON (KServe v2 form) or a safetensors body."""
            from starlette.responses import JSONResponse, Response

            from .codec import BINARY, BodyError, decode_binary, decode_json, encode_binary, encode_json

            binary = request.headers.get("content-type", "").split(";")[0].strip() == BINARY
            body = await request.body()
            try:
                names = self.buckets.input_names
                inputs = decode_binary(body, names) if binary else decode_json(body, names)
                out = await self.infer(*inputs)
            except (BodyError, InputSpecError) as e:
                return JSONResponse({"error": str(e)}, status_code=400)
            except DIOEError as e:
                return JSONResponse({"error": str(e)}, status_code=500)
            if binary:
                return Response(encode_binary(out), media_type=BINARY)
            return JSONResponse(encode_json(self.buckets.name, out))

    return DIOEReplica.bind()


def run_batch(buckets, requests: list, metrics: Metrics) -> list:
    """Run `@serve.batch`'s requests ((inputs, shape) pairs) in the chunks that its bucket plans run fastest
    (`Buckets.chunk_sizes`), at most max_batch_size rows each; a chunk that fails is re-run one request at a time,
    and a request that fails alone gets its error as its answer."""
    import time

    from .batcher import RequestFailed

    out: list = []
    chunk: list = []

    def flush():
        if not chunk:
            return
        t0 = time.perf_counter()
        try:
            res = buckets.run([r for r, _ in chunk], [s for _, s in chunk])
            rows = sum(s[0] for _, s in chunk)
            metrics.batch(rows, buckets.bucket_for(rows, None).batch, time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 -- re-run each alone: one bad request must not fail the others
            if len(chunk) > 1:
                metrics.retry(len(chunk))
            res = []
            for r, s in chunk:
                try:
                    res.append(buckets.run([r], [s])[0])
                except Exception as e:  # noqa: BLE001
                    res.append(RequestFailed(f"{buckets.name}: the model failed on this request: "
                                             f"{type(e).__name__}: {e}"))
        for x in res:
            metrics.request(time.perf_counter() - t0, "error" if isinstance(x, Exception) else "ok")
        out.extend(res)
        chunk.clear()

    metrics.queue_depth(len(requests))
    left = sum(r[1][0] for r in requests)
    rows, size = 0, 0
    for r in requests:
        if chunk and rows + r[1][0] > size:   # a request is never cut: a chunk ends short or a request begins one
            flush()
            left -= rows
            rows = 0
        if not chunk:
            size = buckets.chunk_sizes(left)[0]
        chunk.append(r)
        rows += r[1][0]
    flush()
    return out


def plain_torch_deployment(model_spec: str, *, small: bool = False, num_replicas: int = 2, threads: int = 1,
                           max_batch_size: int = 8, max_queue_delay_ms: float = 2.0, queue_size: int = 64,
                           name: str = "torch"):
    """The baseline: the zoo model in torch eager behind `@serve.batch` at the same knobs; requests of one shape
    are concatenated along the batch and split back, nothing more."""
    require("serve-ray", "ray")
    from ray import serve

    @serve.deployment(name=name, num_replicas=num_replicas, max_ongoing_requests=queue_size,
                      ray_actor_options={"num_cpus": threads})
    class TorchReplica:
        def __init__(self):
            import torch

            from .. import zoo

            torch.set_num_threads(threads)
            self.model, _ = zoo.resolve(model_spec, size="small" if small else "full")

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_queue_delay_ms / 1000)
        async def _batch(self, requests: list) -> list:
            import torch
            import torch.utils._pytree as pytree

            with torch.inference_mode():
                out = self.model(*[torch.cat(xs) for xs in zip(*requests)])
            leaves, spec = pytree.tree_flatten(out)
            return [pytree.tree_unflatten([x[i:i + 1] if isinstance(x, torch.Tensor) else x for x in leaves], spec)
                    for i in range(len(requests))]

        async def infer(self, *inputs) -> Any:
            return await self._batch(tuple(inputs))

    return TorchReplica.bind()
