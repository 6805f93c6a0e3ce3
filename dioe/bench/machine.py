"""The machine a run measures on: its description (CPU, ISA, versions), its GEMM roof, and the GEMM readings taken
during the run (a probe before each model's rounds, the canary between every two blocks of calls)."""

from __future__ import annotations

import platform
import time
from typing import Callable

import torch

from .. import backends


def describe_machine() -> dict:
    """The CPU, its ISA flags that matter to GEMMs, torch's threads and the versions of every library measured."""
    import importlib.metadata as md

    from ..devices import CpuInfo

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
            for op, make in ((torch_op, torch_gemm), ("openvino MatMul", openvino_gemm)):
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
    return _gflops(n, _gemm_seconds(torch_gemm(n, torch.float32), runs))


# A GEMM call slower than this has no fast kernel on this CPU (torch's bf16 GEMM on a CPU without AVX-512 BF16:
# 62 s a call at n=2048, 0.3 GFLOP/s). It is timed once, and larger sizes are not tried: repeated at both ends of
# a run, such calls had taken 18 of its 49 minutes.
SLOW_GEMM_S = 0.5


def _gemm_seconds(fn: Callable, runs: int) -> float:
    """Seconds of a GEMM call: its best of `runs` after two warm-up calls, or the first call alone when that took
    over SLOW_GEMM_S."""
    with torch.inference_mode():
        first = call_seconds(fn)
        if first > SLOW_GEMM_S:
            return first
        fn()
        return min(call_seconds(fn) for _ in range(runs))


def _gflops(n: int, seconds: float) -> float:
    """GFLOP/s of an n x n x n GEMM taking `seconds`."""
    return round(2 * n ** 3 / seconds / 1e9, 1)


def torch_gemm(n: int, dt: torch.dtype):
    """An n x n x n GEMM by torch: torch.mm, or torch._int_mm for int8."""
    if dt == torch.int8:
        a = torch.randint(-64, 64, (n, n), dtype=dt)
        b = torch.randint(-64, 64, (n, n), dtype=dt)
        return lambda: torch._int_mm(a, b)  # int8 x int8 -> int32 (oneDNN VNNI/AMX)
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    return lambda: torch.mm(a, b)


def openvino_gemm(n: int, dt: torch.dtype):
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


def call_seconds(fn: Callable) -> float:
    """Seconds one call of `fn()` took, by the wall clock."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Canary:
    """The machine's fp32 GEMM speed between blocks of timed calls: the best of three 1024^3 calls after one more,
    in GFLOP/s (on a quiet machine, six readings after each of three engines' calls stayed within 5% of each other).
    `nominal` is the fastest reading so far, seeded with the run's GEMM roof at that size."""

    def __init__(self, nominal: float = 0.0, n: int = PROBE_N):
        self.n, self.nominal = n, nominal
        self._fn = torch_gemm(n, torch.float32)

    def __call__(self) -> float:
        g = self.read()
        self.nominal = max(self.nominal, g)
        return g

    def read(self) -> float:
        self._fn()  # a warm-up: without it, six readings after an engine's calls spread down to 0.68 of their best
        return _gflops(self.n, min(call_seconds(self._fn) for _ in range(3)))
