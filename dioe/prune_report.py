"""What each pruning stage is worth: its size, its agreement with the dense model, its latency under DIOE, and the
table, JSON and plot a pruning run writes.

Agreement uses the precision budget's metrics and bounds (`dioe.accuracy`): the budget picked for the dense model's
output, or the one given, judged on held-out inputs that neither Taylor ranking nor recovery saw. Latency is DIOE's
fp32 plan of each stage, the stages timed in interleaved rounds (as the race times contenders), so that a
neighbour's load falls on every stage alike rather than on whichever ran during it.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .accuracy import Budget, evaluate
from .errors import DIOEError
from .files import write_bytes, write_text


@dataclass(frozen=True)
class Stage:
    """One stage of a pruning run; stage 0 is the dense model."""

    index: int
    target_sparsity: float        # the schedule's aim for this stage, of the prunable parameters
    sparsity: float               # what it reached, of the prunable parameters
    params: int
    params_ratio: float           # against the dense model's
    macs: int                     # multiply-accumulates at batch 1, torch-pruning's count
    agreement: dict               # the budget's metrics on held-out inputs: value, bound, worst per metric
    met: bool                     # whether the budget held
    latency_ms: dict = field(default_factory=dict)   # batch (as text) -> DIOE median ms
    recovery: dict = field(default_factory=dict)     # distillation loss before and after recovery, where it ran
    path: str = ""                                   # the saved stage's folder, in the run's output folder


@dataclass(frozen=True)
class PruneResult:
    """A whole run: every stage, and which one fits the budget (the fastest that meets it)."""

    model: str
    strategy: str
    target_sparsity: float
    steps: int
    budget: str
    stages: tuple[Stage, ...]
    fits: int | None
    machine: str = ""
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "stages": [asdict(s) for s in self.stages], "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "PruneResult":
        known = {f.name for f in fields(cls)}
        if set(d) != known:
            raise DIOEError(f"pruning result has keys {sorted(d)}; expected {sorted(known)}")
        return cls(**{**d, "stages": tuple(Stage(**s) for s in d["stages"]), "notes": tuple(d["notes"])})


def outputs(model: torch.nn.Module, inputs: Sequence[tuple]) -> list[tuple]:
    """Flat output tuples of `model` on each input, as `dioe.accuracy.evaluate` takes them."""
    import torch.utils._pytree as pytree

    with torch.no_grad():
        return [tuple(t for t in pytree.tree_leaves(model(*x)) if isinstance(t, torch.Tensor)) for x in inputs]


def agreement(budget: Budget, reference: list[tuple], candidate: list[tuple]) -> tuple[dict, bool]:
    """The budget's metrics for one stage: per metric, the output closest to failing."""
    report = evaluate(budget, reference, candidate)
    row: dict = {"summary": report.summary()}
    for metric in budget.metrics:
        rs = [r for r in report.results if r.metric == metric]
        worst = min(rs, key=lambda r: r.margin)
        row[metric] = {"value": round(worst.value, 6), "bound": round(worst.bound, 6), "worst": round(worst.worst, 6),
                       "output": worst.output}
    return row, report.met


def time_stages(built: dict[str, object], inputs: tuple, *, budget_s: float, rounds: int = 5) -> dict[str, float]:
    """Median over rounds of each stage's median ms, every stage's callable timed in the same interleaved rounds
    (`dioe.timing.side_by_side`); each has run once already, when DIOE verified it."""
    from .timing import side_by_side

    calls = {name: (lambda xs, fn=fn: fn(*xs)) for name, fn in built.items()}  # side_by_side passes the inputs whole
    per_round = side_by_side(calls, inputs, rounds=rounds, repeats=50, budget_s=budget_s / rounds, warm=True)
    return {name: round(statistics.median(ms), 3) for name, ms in per_round.items()}


def fitting_stage(stages: Sequence[Stage]) -> int | None:
    """The stage that meets the budget at the lowest batch-1 latency (the fewest parameters where none was timed)."""
    ok = [s for s in stages if s.met]
    if not ok:
        return None
    key = (lambda s: s.latency_ms["1"]) if all("1" in s.latency_ms for s in ok) else (lambda s: s.params)
    return min(ok, key=key).index


COLUMNS = ("stage", "target_sparsity", "sparsity", "params", "params_ratio", "macs", "macs_ratio", "latency_b1_ms",
           "latency_b8_ms", "speedup_b1", "speedup_b8", "metric", "agreement", "bound", "worst", "met", "fits")


def _binding(stage: Stage) -> tuple[str, dict]:
    """The metric the plot and table show: top-1 where the budget has it, else cosine, else relative L2."""
    for metric in ("top1", "cosine", "rel_l2"):
        if metric in stage.agreement:
            return metric, stage.agreement[metric]
    raise DIOEError("a stage's agreement has none of the budget metrics top1, cosine, rel_l2")


def table_rows(result: PruneResult) -> list[dict]:
    dense = result.stages[0]
    rows = []
    for s in result.stages:
        metric, a = _binding(s)
        row = {"stage": s.index, "target_sparsity": s.target_sparsity, "sparsity": s.sparsity, "params": s.params,
               "params_ratio": s.params_ratio, "macs": s.macs, "macs_ratio": round(s.macs / dense.macs, 4),
               "metric": metric, "agreement": a["value"], "bound": a["bound"], "worst": a["worst"], "met": s.met,
               "fits": s.index == result.fits}
        for b in ("1", "8"):
            ms = s.latency_ms.get(b)
            row[f"latency_b{b}_ms"] = ms if ms is not None else ""
            base = dense.latency_ms.get(b)
            row[f"speedup_b{b}"] = round(base / ms, 3) if ms and base else ""
        rows.append(row)
    return rows


def write_outputs(result: PruneResult, folder: Path, *, stem: str = "pruning") -> dict[str, Path]:
    """`<stem>.csv`, `<stem>.json` and `<stem>.png` in `folder`; returns their paths."""
    rows = table_rows(result)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = {"csv": write_text(folder / f"{stem}.csv", buf.getvalue()),
             "json": write_text(folder / f"{stem}.json", json.dumps(result.to_dict(), indent=1))}
    paths["png"] = write_bytes(folder / f"{stem}.png", plot(result, rows))
    return paths


def plot(result: PruneResult, rows: list[dict]) -> bytes:
    """PNG bytes: DIOE latency at batch 1 against agreement with the dense model, one point per stage, the stage
    that fits the budget ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["latency_b1_ms"] != ""]
    x_key, x_label = ("latency_b1_ms", "DIOE latency, batch 1 (ms)") if len(timed) == len(rows) else \
        ("params_ratio", "parameters / dense")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    xs, ys = [r[x_key] for r in rows], [r["agreement"] for r in rows]
    ax.plot(xs, ys, "-o", color="tab:blue")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(f"stage {r['stage']}\n{r['params_ratio']:.0%} params", (x, y), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    if result.fits is not None:
        r = rows[result.fits]
        ax.plot([r[x_key]], [r["agreement"]], "o", ms=16, mfc="none", mec="tab:red", mew=2,
                label=f"fits the budget: stage {r['stage']}")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"agreement with dense: {rows[0]['metric']} (mean)")
    ax.set_title(f"{result.model}: {result.strategy} pruning to {result.target_sparsity:g} in {result.steps} stages"
                 + (f"\n{result.machine}" if result.machine else ""), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def text_table(result: PruneResult) -> str:
    """The table for a terminal."""
    from .text import table

    rows = table_rows(result)
    return table([[str(r["stage"]), f"{r['sparsity']:.3f}", f"{r['params_ratio']:.3f}", f"{r['macs_ratio']:.3f}",
                   str(r["latency_b1_ms"]), str(r["latency_b8_ms"]), f"{r['metric']} {r['agreement']:.4f}",
                   ("met" if r["met"] else "-") + (" <- fits" if r["fits"] else "")] for r in rows],
                 ["stage", "sparsity", "params", "MACs", "b1 ms", "b8 ms", "agreement", "budget"])


def latencies(models: dict, zoo_name: str | None, size: str, batches: Sequence[int], example: tuple, rows: int, *,
              backends, hardware, timing_s: float, log, problems: list[str]) -> dict[int, dict[str, float]]:
    """Each stage's DIOE fp32 plan, timed per batch size with every stage in interleaved rounds: a zoo model at
    each of `batches`, an nn.Module at its example's batch. A stage DIOE cannot optimize is left untimed, and
    said so in `problems`."""
    import warnings

    from .pipeline import optimize

    out: dict[int, dict[str, float]] = {k: {} for k in models}
    for batch in batches:
        if zoo_name is not None:
            from . import zoo

            inputs = tuple(zoo.load(zoo_name, size=size, batch=batch)[1])
        elif batch == rows:
            inputs = example
        else:
            log(f"  batch {batch} skipped: an nn.Module is timed at its example's batch, {rows}")
            continue
        built = {}
        for k, m in models.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opt = optimize(m, inputs, precision="fp32", name=f"{zoo_name or type(m).__name__}-pruned-{k}",
                                   backends=backends, hardware=hardware)
            except DIOEError as e:  # one stage DIOE cannot run is a result; the others are still timed
                problems.append(f"stage {k}, batch {batch}: not timed, DIOE could not optimize it: "
                                f"{str(e).splitlines()[0][:300]}")
                log("  " + problems[-1])
                continue
            built[str(k)] = opt
            log(f"  stage {k}, batch {batch}: DIOE plan " + ", ".join(f"{p.backend}@{p.member}"
                                                                      for p in opt.plan.partitions))
        for k, ms in time_stages(built, inputs, budget_s=timing_s).items():
            out[int(k)][str(batch)] = ms
        del built
    return out


def notes(stages: Sequence[Stage]) -> list[str]:
    """Whether latency fell with every stage, and by how much against the MAC reduction."""
    notes = []
    dense, last = stages[0], stages[-1]
    for b in ("1", "8"):
        ms = [s.latency_ms.get(b) for s in stages]
        if None in ms:
            continue
        falls = all(x > y for x, y in zip(ms, ms[1:]))
        notes.append(f"batch {b}: latency {'falls with every stage' if falls else 'does not fall with every stage'}"
                     f" (stage by stage: {' -> '.join(f'{x:g}' for x in ms)} ms); the last stage runs "
                     f"{ms[0] / ms[-1]:.2f}x faster than dense for {dense.macs / last.macs:.2f}x fewer MACs")
    return notes


__all__ = ["COLUMNS", "PruneResult", "Stage", "agreement", "fitting_stage", "latencies", "notes", "outputs", "plot",
           "table_rows", "text_table", "time_stages", "write_outputs"]
