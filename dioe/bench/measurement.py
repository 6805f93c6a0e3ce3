"""One model measured: each engine built (its compile time and memory taken), then timed in interleaved rounds at
each batch size, and DIOE's partitions timed bare beside it at batch 1."""

from __future__ import annotations

import gc
import math
import shutil
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..text import round_ms, show_ms
from .engines import PARTS, build, partitions_call
from .machine import Canary, gemm_probe
from .rounds import disturbance_text, interleaved


class Rss:
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


def _flat(captured, inputs) -> tuple:
    return tuple(captured.flatten_inputs(inputs, {}))


def measure_model(name: str, *, size: str, batches: tuple[int, ...], engines: tuple[str, ...], rounds: int,
                  budget_s: float, cache: Path, rss: Rss, canary: Canary | None = None, log=print) -> dict:
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
                bare = partitions_call(built["dioe"][0])
                with torch.inference_mode():
                    bare()  # its warm-up, and a partition that fails bare is left out rather than end the run
                built[PARTS] = (bare, ())
            except Exception as e:
                log(f"  {name} b{batch}: DIOE's partitions could not be timed bare: {type(e).__name__}: {e}")
        probe = gemm_probe()
        canary.nominal = max(canary.nominal, probe)
        samples, by_round, used, seen = interleaved(built, rounds=rounds,
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
                                                    if "median_ms" in r) + f" ({took:.0f} s; {disturbance_text(seen)})")
        del built, model, captured
        gc.collect()
        # every engine's exports and compiled blobs for this model and batch: kept for the whole zoo they came to
        # 21 GB, and once filled the disk mid-run
        shutil.rmtree(cache / f"b{batch}", ignore_errors=True)
        torch._dynamo.reset()
    return out
