"""CPU cores: pin a thread to a member's cores, read how long a thread waited for one (`schedstat`), and take a core
away on purpose (a drift drill's background load).

    >>> pin((0,))                                   # this thread runs on core 0 from now on  # doctest: +SKIP
    >>> with Hog(core=0, seconds=10):               # three busy processes on core 0, gone on exit  # doctest: +SKIP
    ...     ...
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

from .errors import DIOEError

# A busy loop pinned to one core, that ends by itself after its time even if its parent dies without killing it.
_BUSY = ("import os, sys, time\n"
         "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
         "print('busy', flush=True)\n"
         "end = time.monotonic() + float(sys.argv[2])\n"
         "while time.monotonic() < end:\n"
         "    pass\n")


def usable_cores() -> int:
    """How many cores this process may run on: its main thread's affinity mask (a thread `pin`ned to a member's
    cores does not narrow it), or every core where the platform has none."""
    try:
        return len(os.sched_getaffinity(os.getpid()))
    except AttributeError:
        return os.cpu_count() or 1


def pin(cores: Sequence[int]) -> None:
    """Pin the calling thread to `cores` (Linux applies `sched_setaffinity(0, ...)` to the calling thread only);
    nothing to do for an empty list."""
    if cores:
        os.sched_setaffinity(0, set(cores))


class Hog:
    """`procs` busy processes pinned to `core`, for at most `seconds`: the load of a drift drill. Each starts a session
    of its own: with the kernel's autogroup scheduling, processes of one session share one group's weight on every
    core, so busy processes in the caller's session would take the caller's own weight on its other cores (a model
    pinned to the other core ran 5x slower); each in a session of its own weighs as one more tenant of that core
    alone. Killed on exit; each ends by itself after `seconds` even if the caller dies first."""

    def __init__(self, *, core: int, seconds: float, procs: int = 3):
        if not hasattr(os, "sched_setaffinity"):
            raise DIOEError("taking a core needs Linux (os.sched_setaffinity)")
        if not 0 <= core < (os.cpu_count() or 1):
            raise DIOEError(f"no core {core} on this machine (cores 0 to {(os.cpu_count() or 1) - 1})")
        if not 0 < seconds <= 3600 or procs < 1:
            raise DIOEError(f"a hog runs 1 or more processes for 0 to 3600 s; got {procs} for {seconds} s")
        self.core, self.seconds, self.procs = core, seconds, procs
        self._running: list[subprocess.Popen] = []

    def start(self) -> "Hog":
        """Start the processes and return once each is pinned and busy (an interpreter takes a while to start on
        a loaded machine: the load is there when this returns)."""
        self._running = [subprocess.Popen([sys.executable, "-c", _BUSY, str(self.core), str(self.seconds)],
                                          stdout=subprocess.PIPE, text=True, start_new_session=True)
                         for _ in range(self.procs)]
        try:
            for p in self._running:
                if p.stdout.readline().strip() != "busy":
                    raise DIOEError(f"a busy process for core {self.core} did not start (exit status {p.poll()})")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p in self._running:
            p.kill()
        for p in self._running:
            p.wait(timeout=10)
            p.stdout.close()
        self._running = []

    def __enter__(self) -> "Hog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def waited(samples) -> float:
    """(Running or waiting, running) samples summed, as a ratio: 1.0 for a thread that had its core all along."""
    return sum(w for w, _ in samples) / max(sum(c for _, c in samples), 1e-9)


def schedstat(tid: int) -> tuple[int, int] | None:
    """(ns on a core, ns waiting for one) of thread `tid` of this process, from Linux's schedstat; None without."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            ran, waiting, _ = f.read().split()
        return int(ran), int(waiting)
    except (OSError, ValueError):
        return None
