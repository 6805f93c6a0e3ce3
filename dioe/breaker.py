"""A circuit breaker per partition: when its planned engine keeps failing, calls go to the torch fallback for a
while, then a few real calls probe the engine and, when they pass, the planned engine takes the calls again.

A transient fault (a lost session, a busy device) then costs a few calls, not the rest of the process: torch was
4 to 11 times slower than the planned engine on tiny-mlp. The states are the usual ones:

    closed     calls run on the planned engine; a call that fails twice (the call and its one retry) counts a
               failure; `failures` in a row open the breaker. A retry that passes clears the count.
    open       calls run on the fallback; after `cooldown_calls` calls or `cooldown_s` seconds, whichever comes
               first, the next call probes the engine (half-open).
    half-open  one call at a time probes the planned engine with the caller's own inputs (its result is the
               call's result; a probe passes when the engine does not raise); `probes` passes in a row close the
               breaker, one failure opens it again for another cool-down.

    >>> b = Breaker(failures=2, cooldown_calls=1, probes=1)
    >>> b.failed(), b.failed()                  # the second failure in a row opens it
    (False, True)
    >>> b.state, b.route()                      # the first call in the open state takes the fallback
    ('open', 'fallback')
    >>> b.route(), b.passed()                   # the next one probes, and its pass closes the breaker
    ('probe', True)
    >>> b.state
    'closed'
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


@dataclass
class Breaker:
    """One partition's breaker; thread-safe. `route()` says where an open breaker sends a call; `failed()` and
    `passed()` report what happened, and return True when the state changed in a way the runtime must act on
    (opened: bind the fallback; closed: bind the planned engine again)."""

    failures: int = 3          # failed calls in a row (each after its retry) that open the breaker
    cooldown_calls: int = 20   # calls on the fallback before a probe ...
    cooldown_s: float = 1.0    # ... or seconds, whichever comes first
    probes: int = 3            # probe calls in a row that must pass to close it
    forget_s: float = 10.0     # a failure this long after the one before starts the count again

    def __post_init__(self):
        self._lock = threading.Lock()
        self.state = CLOSED
        self._in_row = 0           # closed: failures in a row; half-open: probes passed in a row
        self._last_failure = 0.0
        self._opened_at = 0.0
        self._since_open = 0       # calls routed to the fallback since the breaker last opened
        self._probing = False      # a probe is running: other calls take the fallback meanwhile
        self.opened = 0            # times it opened
        self.closed = 0            # times a half-open breaker closed again

    # -- closed -------------------------------------------------------------------------------------------------
    def failed(self) -> bool:
        """A call on the planned engine failed twice (closed state). True when this failure opened the breaker."""
        with self._lock:
            now = time.monotonic()
            if self.state != CLOSED:
                return False   # a call that started before the breaker opened: it is open already
            self._in_row = self._in_row + 1 if now - self._last_failure < self.forget_s else 1
            self._last_failure = now
            if self._in_row < self.failures:
                return False
            self._open(now)
            return True

    def retried(self) -> None:
        """A call failed once and its retry passed: the engine works, the count starts again."""
        with self._lock:
            if self.state == CLOSED:
                self._in_row = 0

    # -- open and half-open ---------------------------------------------------------------------------------------
    def route(self) -> str:
        """Where a call goes while the breaker is not closed: "probe" (the planned engine) or "fallback"."""
        with self._lock:
            if self.state == CLOSED:
                return "probe"   # closed by another thread meanwhile: the planned engine runs it
            if self._probing:
                return "fallback"
            if self.state == OPEN and (self._since_open >= self.cooldown_calls or
                                       time.monotonic() - self._opened_at >= self.cooldown_s):
                self.state, self._in_row = HALF_OPEN, 0
            if self.state == HALF_OPEN:
                self._probing = True
                return "probe"
            self._since_open += 1
            return "fallback"

    def passed(self) -> bool:
        """A probe passed. True when it closed the breaker."""
        with self._lock:
            self._probing = False
            if self.state != HALF_OPEN:
                return False
            self._in_row += 1
            if self._in_row < self.probes:
                return False
            self.state, self._in_row = CLOSED, 0
            self.closed += 1
            return True

    def probe_failed(self) -> None:
        """A probe failed: open again, for a whole cool-down."""
        with self._lock:
            self._probing = False
            if self.state == HALF_OPEN:
                self._open(time.monotonic())

    def _open(self, now: float) -> None:
        self.state, self._in_row, self._opened_at, self._since_open = OPEN, 0, now, 0
        self.opened += 1

    def snapshot(self) -> dict:
        """Its state and counts, for `Optimized.stats`."""
        with self._lock:
            return {"state": self.state, "opened": self.opened, "closed": self.closed}
