"""Plans are data: which member, backend and precision runs each partition, what that was predicted to cost,
what it measured, and why it won. Frozen dataclasses that round-trip through JSON.

    >>> p = Plan.from_dict(plan.to_dict())                  # doctest: +SKIP
    >>> p == plan                                           # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

PLAN_VERSION = 1


def round_ms(ms: float) -> float:
    """A time as plans and benchmark results keep it: five significant digits. A fixed step was too coarse for
    the smallest models: 0.1 us (four decimals of a ms) is 3% of a 3 us model, as wide as the split margin the
    optimizer decides on, and 1 us (three decimals, benchmark runs up to 19) is 9% of an 11 us one, which moved
    tiny-mlp's ratio and runtime overhead by whole steps."""
    return float(f"{ms:.5g}")


def show_ms(ms: float) -> str:
    """A time in ms as a person reads it: two decimals from 1 ms up, three significant digits below it (tiny-mlp's
    0.0111 ms, where two decimals read 0.01 for every engine), never in exponent form."""
    r = float(f"{ms:.3g}") if ms == ms else ms  # rounded first, so that 0.9996 reads 1.00, not 1.000
    if not 0 < r < 1:
        return f"{ms:.2f}"
    return f"{r:.{2 - math.floor(math.log10(r))}f}"


@dataclass(frozen=True)
class Choice:
    """A (member, backend, precision) and its predicted time for one partition."""

    member: str
    backend: str
    precision: str = "fp32"
    predicted_ms: float = 0.0

    def label(self) -> str:
        return f"{self.backend}@{self.member}/{self.precision}"


@dataclass(frozen=True)
class PlanPartition:
    id: str
    segments: tuple[str, ...]
    nodes: tuple[str, ...]
    member: str
    backend: str
    precision: str
    ops: int
    gflops: float
    predicted_ms: float
    measured_ms: float | None = None
    runner_up: Choice | None = None
    reason: str = ""

    @property
    def choice(self) -> Choice:
        return Choice(self.member, self.backend, self.precision, self.predicted_ms)


@dataclass(frozen=True)
class Plan:
    model: str
    graph_hash: str
    pool_fingerprint: str
    objective: str
    partitions: tuple[PlanPartition, ...]
    predicted_ms: float
    measured_ms: float | None = None
    eager_ms: float | None = None
    inputs: tuple[Mapping[str, Any], ...] = ()       # TensorSpec dicts of the flat inputs, to reload without data
    replanned: bool = False
    notes: tuple[str, ...] = ()
    version: int = PLAN_VERSION

    # -- JSON -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan format version {d.get('version')!r}; this DIOE reads version {PLAN_VERSION}")
        parts = []
        for p in d["partitions"]:
            ru = p.get("runner_up")
            parts.append(PlanPartition(**{**p, "segments": tuple(p["segments"]), "nodes": tuple(p["nodes"]),
                                          "runner_up": Choice(**ru) if ru else None}))
        return cls(**{**d, "partitions": tuple(parts), "inputs": tuple(dict(i) for i in d.get("inputs", ())),
                      "notes": tuple(d.get("notes", ()))})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable DIOE plan: {e}") from e
        return cls.from_dict(data)

    def with_measurements(self, per_partition_ms: Mapping[str, float], total_ms: float,
                          eager_ms: float | None = None) -> "Plan":
        parts = tuple(replace(p, measured_ms=per_partition_ms.get(p.id, p.measured_ms)) for p in self.partitions)
        return replace(self, partitions=parts, measured_ms=total_ms,
                       eager_ms=eager_ms if eager_ms is not None else self.eager_ms)

    # -- reading --------------------------------------------------------------------------------------------
    def members(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.member for p in self.partitions))

    def summary(self) -> str:
        """A table a person can read: each partition, where it runs, its share and why it was chosen."""
        lines = [f"plan for {self.model}: {len(self.partitions)} partition(s) on {', '.join(self.members())}; "
                 f"objective {self.objective}"]
        total = sum((p.measured_ms if p.measured_ms is not None else p.predicted_ms) for p in self.partitions) or 1
        rows = []
        for p in self.partitions:
            t = p.measured_ms if p.measured_ms is not None else p.predicted_ms
            ru = f"{p.runner_up.label()} {show_ms(p.runner_up.predicted_ms)} ms" if p.runner_up else "-"
            rows.append([p.id, p.member, p.backend, p.precision, str(p.ops), show_ms(p.predicted_ms),
                         "-" if p.measured_ms is None else show_ms(p.measured_ms), f"{100 * t / total:.0f}%", ru,
                         p.reason])
        from .cli import table

        lines.append(table(rows, ["partition", "member", "backend", "prec", "ops", "pred ms", "meas ms", "share",
                                  "runner-up", "why"]))
        tail = f"predicted {show_ms(self.predicted_ms)} ms"
        if self.measured_ms is not None:
            tail += f", measured {show_ms(self.measured_ms)} ms"
        if self.eager_ms is not None and self.measured_ms:
            tail += f"; torch eager {show_ms(self.eager_ms)} ms ({self.eager_ms / self.measured_ms:.2f}x)"
        if self.replanned:
            tail += "; re-planned once after measuring"
        lines.append(tail)
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def plan_field_names() -> list[str]:
    return [f.name for f in Plan.__dataclass_fields__.values()]


__all__ = ["Choice", "Plan", "PlanPartition", "field"]
