"""Plans are data: which member, backend and precision runs each partition, what that was predicted to cost,
what it measured, and why it won. Frozen dataclasses that round-trip through JSON.

    >>> p = Plan.from_dict(plan.to_dict())                  # doctest: +SKIP
    >>> p == plan                                           # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .text import round_ms, show_ms, table

PLAN_VERSION = 1


@dataclass(frozen=True, order=True)
class Choice:
    """A (member, backend, precision): where and how one part of the graph runs. The key of profile tables,
    assignments and race verdicts; a label such as "openvino@cpu0/fp32" only at the edges (JSON, the CLI).

    `predicted_ms` (a runner-up's forecast in a plan) takes no part in equality, hashing or order: two choices
    are the same option whatever time they carry.

        >>> Choice.parse("openvino@cpu0/fp32") == Choice("cpu0", "openvino", "fp32", predicted_ms=3.0)
        True
    """

    member: str
    backend: str
    precision: str = "fp32"
    predicted_ms: float = field(default=0.0, compare=False)

    def label(self) -> str:
        return f"{self.backend}@{self.member}/{self.precision}"

    def __str__(self) -> str:
        return self.label()

    def option(self) -> "Choice":
        """The same choice without a time."""
        return Choice(self.member, self.backend, self.precision)

    @classmethod
    def parse(cls, label: str) -> "Choice":
        """The choice a label "backend@member/precision" names."""
        backend, at, rest = str(label).partition("@")
        member, slash, precision = rest.rpartition("/")
        if not (backend and at and member and slash and precision):
            raise ValueError(f"{label!r} is not an option label; expected backend@member/precision, such as "
                             "openvino@cpu0/fp32")
        return cls(member, backend, precision)


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
    # fingerprint of the inputs its engine was calibrated on (int8): a reload finds the artifact by it
    calibration: str | None = None

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
    # AccuracyReport dict of the plan against fp32 eager on held-out samples; None where nothing was judged (fp32)
    accuracy: Mapping[str, Any] | None = None

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
        if self.accuracy is not None:
            from .accuracy import AccuracyReport   # reading a plan needs no accuracy code until it has a report

            lines.append(f"accuracy against fp32 eager: {AccuracyReport.from_dict(self.accuracy).summary()}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


__all__ = ["Choice", "Plan", "PlanPartition", "round_ms", "show_ms"]
