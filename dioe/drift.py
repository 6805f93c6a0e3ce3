"""Drift: how far each member's live run times are from what they were undisturbed, and when that counts as a
change worth re-planning for. Plain values and arithmetic, no threads: `dioe.live` feeds them.

    >>> d = Detector(slow=1.5, recover=1.2, hold=3)
    >>> [d.update(r) for r in (1.0, 1.6, 1.7, 1.8, 1.3, 1.1, 1.1, 1.1)]
    [None, None, None, 'drift', None, None, None, 'recovered']
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from .errors import DIOEError


@dataclass(frozen=True)
class LiveSettings:
    """The knobs of live re-planning (`dioe.optimize(..., live=LiveSettings(...))` or `opt.go_live(...)`)."""

    window: int = 50          # a member's drift ratio: the mean of its last `window` run times over its reference
    slow: float = 1.5         # a member has drifted when its ratio stays at or above this ...
    recover: float = 1.2      # ... and is back when it stays at or below this (below `slow`: the hysteresis band)
    hold: int = 5             # ... for this many readings in a row: a spike of noise is not a drift
    tick_s: float = 0.05      # how often readings are taken, and a member no plan runs on is probed
    min_dwell_s: float = 1.0  # no swap sooner than this after the last: a plan gets time to show its own times
    replan: bool = True       # False: watch and record drifts only, on the plan optimize chose (a fixed plan)

    def __post_init__(self):
        bad = []
        if not (isinstance(self.window, int) and self.window >= 3):
            bad.append(f"window must be an integer >= 3, got {self.window!r}")
        if not isinstance(self.replan, bool):
            bad.append(f"replan must be true or false, got {self.replan!r}")
        if not (isinstance(self.hold, int) and self.hold >= 1):
            bad.append(f"hold must be an integer >= 1, got {self.hold!r}")
        for name in ("slow", "recover", "tick_s", "min_dwell_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad.append(f"{name} must be a finite number >= 0, got {v!r}")
        if not bad and not 1.0 < self.recover < self.slow:
            bad.append(f"need 1 < recover < slow (the hysteresis band), got recover={self.recover}, slow={self.slow}")
        if not bad and self.tick_s <= 0:
            bad.append(f"tick_s must be > 0, got {self.tick_s}")
        if bad:
            raise DIOEError("bad live settings: " + "; ".join(bad))


@dataclass
class Detector:
    """Hysteresis on a stream of drift ratios: 'drift' once `hold` readings in a row reach `slow`, then
    'recovered' once `hold` readings in a row fall to `recover`; None otherwise. A reading between the two
    thresholds breaks a run, so noise around either threshold changes nothing."""

    slow: float = 1.5
    recover: float = 1.2
    hold: int = 5
    drifted: bool = False
    run: int = field(default=0)   # readings in a row past the threshold that would change the state

    def update(self, ratio: float) -> str | None:
        crossing = ratio <= self.recover if self.drifted else ratio >= self.slow
        self.run = self.run + 1 if crossing else 0
        if self.run < self.hold:
            return None
        self.drifted, self.run = not self.drifted, 0
        return "drift" if self.drifted else "recovered"


class Gauge:
    """A member's last run times (seconds), bounded, and the reference they are compared with: the lowest mean of a
    full window seen while the member was undisturbed. The mean, not the median: a thread that shares its core with
    busy processes runs most calls at full speed and waits out their time slices now and then, so the median of
    back-to-back calls hardly moves (1.57 ms against 1.65 ms undisturbed, on a core taken by three) while their
    mean, the member's throughput, does. The lowest, not the first: a reference taken during a burst of someone
    else's load would hide a later drift. Kept per kind of work (`key`): a member that runs other partitions under
    a new plan has other times."""

    def __init__(self, window: int):
        self.times: deque[float] = deque(maxlen=window)
        self.count = 0            # run times added, ever: a reading is taken only on new ones
        self.references: dict = {}

    def add(self, seconds: float) -> None:
        self.times.append(seconds)
        self.count += 1

    def clear(self) -> None:
        self.times.clear()

    @property
    def full(self) -> bool:
        return len(self.times) == self.times.maxlen

    def mean(self) -> float:
        return sum(self.times) / len(self.times)

    def ratio(self, key, *, learn: bool) -> float | None:
        """The window's mean over the reference for `key`, or None until a full window gave one. `learn` (the
        member is not drifted) lets a lower full window lower the reference."""
        if not self.full:
            return None
        now, ref = self.mean(), self.references.get(key)
        if learn and (ref is None or now < ref):
            self.references[key] = ref = now
        return None if ref is None else now / ref
