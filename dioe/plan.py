"""Plans are data: which member, backend and precision runs each partition, what that was predicted to cost,
what it measured, and why it won. Frozen dataclasses that round-trip through JSON.

    >>> p = Plan.from_dict(plan.to_dict())                  # doctest: +SKIP
    >>> p == plan                                           # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import DescriptorError, PlanError
from .files import write_text
from .schema import LineMap, Path_, build, spec
from .text import round_ms, show_ms, table

PLAN_VERSION = 1
PRECISIONS = ("fp32", "bf16", "fp16", "int8")   # what a partition of a plan runs at
OBJECTIVES = ("latency", "throughput")
_TIME = spec(ge=0, finite=True, doc="milliseconds")
_COUNT = spec(ge=0, finite=True)


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
    predicted_ms: float = field(default=0.0, compare=False, metadata=_TIME)

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

    def _validate(self, where: LineMap, path: Path_) -> None:
        _check_engine(self.backend, self.precision, where, path)


@dataclass(frozen=True)
class PlanPartition:
    id: str
    segments: tuple[str, ...]
    nodes: tuple[str, ...]
    member: str
    backend: str
    precision: str
    ops: int = field(metadata=_COUNT)
    gflops: float = field(metadata=_COUNT)
    predicted_ms: float = field(metadata=_TIME)
    measured_ms: float | None = field(default=None, metadata=_TIME)
    runner_up: Choice | None = None
    reason: str = ""
    # fingerprint of the inputs its engine was calibrated on (int8): a reload finds the artifact by it
    calibration: str | None = None

    @property
    def choice(self) -> Choice:
        return Choice(self.member, self.backend, self.precision, self.predicted_ms)

    def _validate(self, where: LineMap, path: Path_) -> None:
        _check_engine(self.backend, self.precision, where, path)
        if not self.nodes:
            raise where.error(path + ("nodes",), "a partition runs at least one node; expected a non-empty list")


@dataclass(frozen=True)
class PlanStage:
    """One stage of the plan run as a pipeline (`opt.map`, `opt.submit`): consecutive partitions on one member,
    run by that member's worker thread while the other members work on other batches."""

    member: str
    partitions: tuple[str, ...]
    predicted_ms: float = field(metadata=_TIME)   # its partitions plus the copies into it, per batch


@dataclass(frozen=True)
class Plan:
    model: str
    graph_hash: str
    pool_fingerprint: str
    objective: str
    partitions: tuple[PlanPartition, ...]
    predicted_ms: float = field(metadata=_TIME)
    measured_ms: float | None = field(default=None, metadata=_TIME)
    eager_ms: float | None = field(default=None, metadata=_TIME)
    inputs: tuple[Mapping[str, Any], ...] = ()       # TensorSpec dicts of the flat inputs, to reload without data
    replanned: bool = False
    notes: tuple[str, ...] = ()
    version: int = PLAN_VERSION
    # AccuracyReport dict of the plan against fp32 eager on held-out samples; None where nothing was judged (fp32)
    accuracy: Mapping[str, Any] | None = None
    # the pipeline's stages, in order; () in plans saved before stages were recorded
    stages: tuple[PlanStage, ...] = ()

    # -- JSON -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping, *, source: str = "plan") -> "Plan":
        """The plan `d` describes, checked field by field: a missing or mistyped field, a precision or backend DIOE
        does not know, a negative or non-finite time, or two partitions with one id is a `PlanError` naming the
        field's dotted path, e.g. `partitions[2].precision: 'int3' is not one of fp32, bf16, fp16, int8`."""
        if not isinstance(d, Mapping):
            raise PlanError(source, "", f"expected a JSON object (a saved DIOE plan), got {type(d).__name__}")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(source, "version", f"plan format version {d.get('version')!r}; this DIOE reads "
                                               f"version {PLAN_VERSION}")
        try:
            return build(cls, dict(d), LineMap.empty(source))
        except DescriptorError as e:   # the schema helpers speak of descriptors; a plan's error names the plan
            raise PlanError(source, e.key, e.message) from None

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON, whole or not at all."""
        return write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PlanError(str(path), "", f"not a readable DIOE plan: {e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:   # a truncated copy or a hand edit gone wrong
            raise PlanError(str(path), "", f"not valid JSON ({e.msg}: line {e.lineno}, column {e.colno}, "
                                           f"character {e.pos}); expected a plan saved by DIOE") from None
        return cls.from_dict(data, source=str(path))

    def file_in(self, folder: str | Path) -> Path:
        """Where the plan goes in `folder`: `<model>.plan.json`, the model's name made a single safe file name,
        so a name such as `../x` or `/etc/x` never writes outside the folder."""
        folder = Path(folder)
        path = folder / f"{safe_name(self.model)}.plan.json"
        if path.resolve().parent != folder.resolve():
            raise PlanError("plan", "model", f"{self.model!r} does not make a file name inside {folder}")
        return path

    def _validate(self, where: LineMap, path: Path_) -> None:
        if self.objective not in OBJECTIVES:
            raise where.error(path + ("objective",), f"{self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if not self.partitions:
            raise where.error(path + ("partitions",), "a plan has at least one partition; expected a non-empty list")
        ids: dict[str, int] = {}
        owner: dict[str, str] = {}
        for i, p in enumerate(self.partitions):
            if p.id in ids:
                raise where.error(path + ("partitions", i, "id"),
                                  f"{p.id!r} is already the id of partitions[{ids[p.id]}]; expected unique ids")
            ids[p.id] = i
            for j, n in enumerate(p.nodes):
                if n in owner:
                    raise where.error(path + ("partitions", i, "nodes", j),
                                      f"node {n!r} is already in partition {owner[n]!r}; expected each node once")
                owner[n] = p.id
        known = set(ids)
        for i, st in enumerate(self.stages):
            for j, pid in enumerate(st.partitions):
                if pid not in known:
                    raise where.error(path + ("stages", i, "partitions", j),
                                      f"{pid!r} is not a partition of this plan (or is in two stages); expected "
                                      f"one of {', '.join(sorted(known)) or 'none left'}")
                known.discard(pid)
        for i, spec_ in enumerate(self.inputs):
            if spec_:   # a non-tensor input has no spec
                _check_input(spec_, where, path + ("inputs", i))
        if self.accuracy is not None:
            _check_accuracy(self.accuracy, where, path + ("accuracy",))

    def with_measurements(self, per_partition_ms: Mapping[str, float], total_ms: float,
                          eager_ms: float | None = None) -> "Plan":
        parts = tuple(replace(p, measured_ms=per_partition_ms.get(p.id, p.measured_ms)) for p in self.partitions)
        return replace(self, partitions=parts, measured_ms=total_ms,
                       eager_ms=eager_ms if eager_ms is not None else self.eager_ms)

    # -- reading --------------------------------------------------------------------------------------------
    def members(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.member for p in self.partitions))

    @property
    def bottleneck_ms(self) -> float | None:
        """Predicted time per batch of a stream through the pipeline: its busiest member's stages. None for a plan
        without recorded stages."""
        load: dict[str, float] = {}
        for st in self.stages:
            load[st.member] = load.get(st.member, 0.0) + st.predicted_ms
        return max(load.values()) if load else None

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
        if len(self.stages) > 1:
            steps = " -> ".join(f"{st.member} [{', '.join(st.partitions)}] {show_ms(st.predicted_ms)} ms"
                                for st in self.stages)
            lines.append(f"pipeline stages: {steps}; a stream takes a batch every {show_ms(self.bottleneck_ms)} ms "
                         "(predicted bottleneck)")
        if self.accuracy is not None:
            from .accuracy import AccuracyReport   # reading a plan needs no accuracy code until it has a report

            lines.append(f"accuracy against fp32 eager: {AccuracyReport.from_dict(self.accuracy).summary()}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def safe_name(name: str) -> str:
    """`name` as one file name: path separators, `..` and characters other than letters, digits, `-`, `_`, `.`
    become `_`, and a leading dot goes, so the name can neither climb out of a folder nor hide in it.

        >>> safe_name("../../etc/passwd"), safe_name("bert-base"), safe_name(".hidden")
        ('______etc_passwd', 'bert-base', 'hidden')
    """
    out = re.sub(r"[^A-Za-z0-9._-]", "_", str(name)).replace("..", "__").lstrip(".")
    return out or "model"


def _check_engine(backend: str, precision: str, where: LineMap, path: Path_) -> None:
    from . import backends   # the registry lists backend files; it imports no engine

    if precision not in PRECISIONS:
        raise where.error(path + ("precision",), f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    if backend not in backends.names():
        raise where.error(path + ("backend",), f"{backend!r} is not one of {', '.join(backends.names())}")


def _check_input(spec_: Mapping, where: LineMap, path: Path_) -> None:
    """A flat input's TensorSpec, as `load` rebuilds example inputs from it."""
    import torch

    from .capture import TensorSpec

    t = build(TensorSpec, dict(spec_), where, path)
    for j, d in enumerate(t.shape):
        if isinstance(d, int) and d < 0:
            raise where.error(path + ("shape", j), f"expected a size >= 0, got {d}")
    if not isinstance(getattr(torch, t.dtype, None), torch.dtype):
        raise where.error(path + ("dtype",), f"{t.dtype!r} is not a torch dtype; expected a name such as float32")


def _check_accuracy(report: Mapping, where: LineMap, path: Path_) -> None:
    """The accuracy report's shape: `met`, `confidence` and typed `results`, as AccuracyReport writes them."""
    from .accuracy import MetricResult   # reading a plan needs no accuracy code until it has a report

    want = {"met", "confidence", "results"}
    if not want <= set(report) <= want | {"example"}:
        raise where.error(path, f"has keys {sorted(report)}; expected {sorted(want)} and optionally 'example'")
    build(bool, report["met"], where, path + ("met",))
    build(float, report["confidence"], where, path + ("confidence",))
    build(tuple[MetricResult, ...], report["results"], where, path + ("results",))
    # the plan's agreement on its own example inputs when it was made, which `dioe.load` checks it still gives
    example = report.get("example", [])
    if not isinstance(example, (list, tuple)):
        raise where.error(path + ("example",), f"expected a list, got {type(example).__name__}")
    for i, e in enumerate(example):
        at = path + ("example", i)
        if not isinstance(e, Mapping) or set(e) != {"metric", "output", "value"}:
            raise where.error(at, "expected {metric, output, value}")
        build(str, e["metric"], where, at + ("metric",))
        build(int, e["output"], where, at + ("output",))
        build(float, e["value"], where, at + ("value",))


__all__ = ["Choice", "OBJECTIVES", "PRECISIONS", "Plan", "PlanPartition", "PlanStage", "round_ms", "safe_name",
           "show_ms"]
