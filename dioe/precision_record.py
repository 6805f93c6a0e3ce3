"""What the precision stage tried and decided (`PrecisionRecord`, one `Candidate` per contender), and its verdict
cached beside the profile (`Verdict`), so that a warm optimize judges nothing again.

    >>> PrecisionRecord.from_dict(rec.to_dict(), rec.budget, "x.precision.json").winner == rec.winner  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Sequence

from . import integrity
from .accuracy import AccuracyReport, Budget
from .backend import cache_root
from .calibration import Samples, fingerprint
from .errors import DIOEError
from .files import write_text
from .mixed import Mix
from .plan import Choice, Plan
from .planner import Job

FP32 = "fp32 plan"   # the fp32 winner's name among the precision contenders


@dataclass(frozen=True)
class Candidate:
    """One lower-precision contender: what it is, and how it fared on the held-out samples."""

    option: Choice
    report: AccuracyReport | None      # None: it could not be built
    why: str = ""                      # why it is out, if it is
    mix: Mix | None = None             # a mix of `option` and a higher precision over parts, else the whole graph
    # the winner's agreement on the inputs `dioe.load` makes up (`reload.example_agreement`), measured once by
    # the search: a warm optimize that rebuilds the winner records it in the plan without an eager call more
    example: tuple[dict, ...] | None = None

    @property
    def label(self) -> str:
        return self.mix.label() if self.mix else self.option.label()


@dataclass(frozen=True)
class PrecisionRecord:
    """What the precision stage tried and decided (`opt.precision_search`); the plan's notes say it in words."""

    budget: Budget
    source: str                                  # "given" or "generated" calibration and held-out inputs
    candidates: tuple[Candidate, ...]
    # the fp32 plan on the same held-out samples, where it won; None where a lower precision did (its report is
    # the plan's, and the fp32 plan's would cost 64 more calls for nothing the plan shows)
    fp32: AccuracyReport | None
    fast_ms: dict[str, float]                    # contender -> mean of its faster half of rounds ("fp32 plan", labels)
    winner: str                                  # "fp32 plan" or the winning option's label
    reused: str | None = None                    # the verdict file a warm optimize took this from, if it did

    def to_dict(self) -> dict:
        return {"source": self.source, "winner": self.winner, "fp32": self.fp32 and self.fp32.to_dict(),
                "fast_ms": self.fast_ms,
                "candidates": [{"option": c.option.label(), "why": c.why,
                                "report": c.report.to_dict() if c.report else None,
                                **({"mix": c.mix.to_dict()} if c.mix else {}),
                                **({"example": list(c.example)} if c.example is not None else {})}
                               for c in self.candidates]}

    @classmethod
    def from_dict(cls, d: dict, budget: Budget, reused: str) -> "PrecisionRecord":
        if d["winner"] == FP32 and d["fp32"] is None:
            raise DIOEError("the fp32 plan won but the record has no accuracy report for it")
        return cls(budget, d["source"], tuple(Candidate(Choice.parse(c["option"]), c["report"] and
                                                        AccuracyReport.from_dict(c["report"]), c["why"],
                                                        Mix.from_dict(c["mix"]) if c.get("mix") else None,
                                                        _example(c.get("example")))
                                              for c in d["candidates"]),
                   d["fp32"] and AccuracyReport.from_dict(d["fp32"]), {k: float(v) for k, v in d["fast_ms"].items()},
                   str(d["winner"]), reused)

    def with_example(self, label: str, example) -> "PrecisionRecord":
        """This record with candidate `label`'s agreement on the inputs `dioe.load` makes up (None: none made)."""
        got = None if example is None else tuple(example)
        return replace(self, candidates=tuple(replace(c, example=got) if c.label == label else c
                                              for c in self.candidates))

    @property
    def kept(self) -> tuple[Candidate, ...]:
        """The candidates that met the budget."""
        return tuple(c for c in self.candidates if not c.why)


def _example(got) -> tuple[dict, ...] | None:
    """A candidate's recorded example agreement, as `reload.example_agreement` gives it, checked entry by entry."""
    if got is None:
        return None
    return tuple({"metric": str(e["metric"]), "output": int(e["output"]), "value": float(e["value"])} for e in got)


# -- the verdict of an earlier precision search ------------------------------------------------------------------------
# What the search does with the same inputs; a verdict cached by an earlier way of searching is searched again.
# 2: judged fastest first, int8 mixed with the bf16 that met the budget.
SEARCH_VERSION = 2


class Verdict:
    """What the precision stage decided for one fp32 plan, budget, precision cap, candidate list and set of
    calibration and held-out inputs, cached beside the profile: a warm optimize then judges nothing again (64
    held-out inputs through eager and every candidate take longer than the rest of a warm optimize on a large
    model). Any change to one of those keys searches again."""

    def __init__(self, cache_dir, job: Job, plan: Plan, precision: str, budget: Budget, samples: Samples,
                 options: Sequence[Choice]):
        key = repr(([(p.nodes, p.member, p.backend, p.precision) for p in plan.partitions], precision,
                    repr(budget), fingerprint(samples.calibrate), fingerprint(samples.holdout),
                    [o.label() for o in options], job.settings.split_margin, job.settings.race_close,
                    job.settings.mixed_parts, SEARCH_VERSION)).encode()
        self.key = hashlib.blake2b(key, digest_size=8).hexdigest()
        self.budget = budget
        self.path = cache_root(cache_dir) / "profiles" / \
            f"{job.profile.graph_hash}-{job.profile.fingerprint}.precision.json"
        self.record: PrecisionRecord | None = None
        self.notes: tuple[str, ...] = ()
        data = integrity.load_checked(self.path, "precision verdict") or {}
        if data.get("key") != self.key:
            return  # none, or one for other keys: search again
        try:
            self.record = PrecisionRecord.from_dict(data["record"], budget, self.path.name)
            self.notes = tuple(str(n) for n in data["notes"])
        except (ValueError, KeyError, TypeError, AttributeError, DIOEError) as e:
            self.record = None
            integrity.forget(self.path, "precision verdict", f"it does not read as one ({type(e).__name__}: {e})")

    def save(self, record: PrecisionRecord, notes: Sequence[str]) -> None:
        write_text(self.path, integrity.dumps_checked({"key": self.key, "record": record.to_dict(),
                                                       "notes": list(notes)}))
