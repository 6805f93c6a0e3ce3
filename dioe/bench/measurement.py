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
import torch.utils._pytree as pytree

from ..text import round_ms, show_ms
from .engines import MODEL_CALLED, PARTS, PRECISION_ENGINES, build, partitions_call
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


HELD_OUT = 32   # inputs each engine is judged on against fp32 eager, at batch 1


def _samples(name: str, size: str, batch: int, inputs, n: int) -> list[tuple]:
    """`n` input tuples like `inputs`: the zoo's realistic data where it has some, else generated ones."""
    from .. import zoo
    from ..calibration import generate

    items = zoo.calibration(name, n=n, batch=batch, size=size)
    return items if items is not None else generate(tuple(inputs), n=n, seed=1)


def _accuracy(built: dict, captured, held_out: list[tuple]) -> dict[str, dict]:
    """Each engine's outputs on `held_out` against fp32 eager's, under the default budget for the output: worst and
    mean cosine, top-1 agreement for logits, and whether the budget's confidence bounds hold."""
    from ..accuracy import Budget, evaluate

    flat_in = [tuple(captured.flatten_inputs(tuple(x), {})) for x in held_out]
    with torch.no_grad():
        reference = [tuple(captured.gm(*x)) for x in flat_in]
    # by the model's own output, names kept, as optimize picks it: a bare tuple would read a model's one hidden
    # state, (batch, seq, width), as token logits and judge it by argmax
    budget = Budget.default_for(captured.unflatten_outputs(reference[0]))
    out = {}
    for engine, (fn, _) in built.items():
        if engine in ("torch", PARTS):
            continue
        try:
            with torch.no_grad():
                got = [tuple(pytree.tree_leaves(fn(*x))) if engine in MODEL_CALLED else tuple(fn(*f))
                       for x, f in zip(held_out, flat_in)]
            got = [tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in g)
                   for g in got]
            report = evaluate(budget, reference, got)
        except Exception as e:
            out[engine] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        row: dict = {"budget": str(budget), "met": report.met, "samples": len(held_out), "summary": report.summary()}
        for metric in ("cosine", "top1", "rel_l2"):
            rs = [r for r in report.results if r.metric == metric]
            if rs:
                guard = min if metric != "rel_l2" else max
                row[metric] = {"mean": round(guard(r.value for r in rs), 6), "worst": round(guard(r.worst for r in rs), 6),
                               "bound": round(guard(r.bound for r in rs), 6)}
        out[engine] = row
    return out


def measure_model(name: str, *, size: str, batches: tuple[int, ...], engines: tuple[str, ...], rounds: int,
                  budget_s: float, cache: Path, rss: Rss, canary: Canary | None = None, log=print,
                  precision_batches: tuple[int, ...] | None = None) -> dict:
    """All engines on one model: build each (timed, with its peak RSS), then interleaved rounds per batch size,
    watched by `canary` (one for the whole run, so that its nominal speed is the run's fastest). At batch 1 each
    engine is also judged against fp32 eager on held-out inputs that no int8 engine calibrated on. The
    lower-precision engines run only at `precision_batches` (default: every batch)."""
    from .. import zoo
    from ..accuracy import Budget
    from ..capture import capture
    from ..settings import Settings

    out: dict = {"model": name, "size": size, "batches": {}}
    canary = canary or Canary()
    calibration_samples = Settings().calibration_samples   # read from the environment once, for every batch
    all_engines = engines
    for batch in batches:
        engines = tuple(e for e in all_engines if e not in PRECISION_ENGINES or precision_batches is None
                        or batch in precision_batches)
        started = time.perf_counter()
        model, inputs = zoo.load(name, size=size, batch=batch)
        captured = capture(model, inputs, name=name)
        gflops = captured.summary()["gflops"]
        flat = _flat(captured, inputs)
        built: dict[str, Callable] = {}
        rows: dict[str, dict] = {}
        calibration = held_out = None
        if set(engines) & set(PRECISION_ENGINES) or batch == 1:
            # DIOE's search takes its calibration and held-out inputs from the first `n_dioe`; the bench judges
            # every engine on the rest, which nothing calibrated on
            n_dioe = calibration_samples + Budget(cosine=0.999).holdout_inputs(batch)
            items = _samples(name, size, batch, inputs, n_dioe + (HELD_OUT if batch == 1 else 0))
            calibration, held_out = items[:n_dioe], items[n_dioe:]
        for engine in engines:
            base = rss.window()
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    made = build(engine, model, inputs, captured, cache / f"b{batch}",
                                 calibration=calibration if engine == "dioe-auto" else
                                 (calibration or [])[:calibration_samples])
                    args = inputs if engine in MODEL_CALLED else flat
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
        if held_out:
            for engine, acc in _accuracy(built, captured, held_out).items():
                rows[engine]["accuracy"] = acc
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
