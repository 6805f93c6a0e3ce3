"""A bounded, uniform sample of the inputs a model serves, dealt into two disjoint parts: one to calibrate a
lower-precision plan on, one held apart to shadow-test it on. Each part is a reservoir (Vitter's Algorithm R):
after n calls routed to it, every one of them is in it with the same chance, so a burst of similar traffic at the
start does not decide the calibration alone.

    >>> import torch
    >>> r = Reservoir((torch.zeros(2, 4),), n_calibrate=4, n_shadow=2, max_bytes=2 ** 20)
    >>> for i in range(40):
    ...     taken = r.offer(lambda: (torch.full((2, 4), float(i)),))
    >>> r.full, len(r.snapshot().calibrate), len(r.snapshot().holdout)
    (True, 4, 2)

Samples are whole calls: a plan is compiled for the example's shapes, so a sample must have them to run on it
(each batch row still counts as one sample when the budget is judged). An item equal to one already held is not
taken again, so the two parts never share an input.
"""

from __future__ import annotations

import random
import threading
from typing import Callable, Sequence

import torch

from .calibration import Samples, digest
from .errors import DIOEError
from .text import fmt_bytes
from .tracing import nbytes

PARTS = ("calibrate", "shadow")


class Reservoir:
    """`n_calibrate` + `n_shadow` sampled calls, each call routed at random to one part in proportion to its size;
    at most `max_bytes` of tensors held, which `__init__` checks against the example's size."""

    def __init__(self, example: Sequence, *, n_calibrate: int, n_shadow: int, max_bytes: int, seed: int = 0):
        for name, n in (("n_calibrate", n_calibrate), ("n_shadow", n_shadow)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise DIOEError(f"{name} must be an integer >= 1; got {n!r}")
        item = nbytes([x for x in example if isinstance(x, torch.Tensor)])
        need = (n_calibrate + n_shadow) * item
        if need > max_bytes:
            raise DIOEError(f"live precision samples {n_calibrate} calls to calibrate and {n_shadow} to shadow-test "
                            f"on, {fmt_bytes(item)} each: {fmt_bytes(need)}, over the cap of {fmt_bytes(max_bytes)}"
                            f" (Settings.live_sample_bytes); raise the cap, or lower Settings.calibration_samples or "
                            f"the budget's samples")
        self.caps = {"calibrate": n_calibrate, "shadow": n_shadow}
        self.item_bytes = item
        self._share = n_shadow / (n_calibrate + n_shadow)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget every sample: a fresh attempt samples the traffic as it is now."""
        with self._lock:
            self.parts: dict[str, list[tuple]] = {p: [] for p in PARTS}
            self._digests: dict[str, list[str]] = {p: [] for p in PARTS}
            self.routed = {p: 0 for p in PARTS}   # calls routed to each part: Algorithm R's count
            self.offered = 0
            self.duplicates = 0

    @property
    def full(self) -> bool:
        return all(len(self.parts[p]) == self.caps[p] for p in PARTS)

    def offer(self, inputs: Callable[[], Sequence]) -> bool:
        """Offer one call's flat inputs (`inputs()` is only called when the call is taken, so a call not sampled
        costs a random draw); True when it was taken. The taken inputs are copied: the caller may reuse its own."""
        with self._lock:
            self.offered += 1
            part = "shadow" if self._rng.random() < self._share else "calibrate"
            self.routed[part] += 1
            n, cap = self.routed[part], self.caps[part]
            slot = n - 1 if n <= cap else self._rng.randrange(n)
            if slot >= cap:
                return False
            flat = tuple(inputs())
            key = digest(flat)
            if key in self._digests["calibrate"] or key in self._digests["shadow"]:
                self.duplicates += 1
                return False
            item = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in flat)
            held, keys = self.parts[part], self._digests[part]
            if slot < len(held):
                held[slot], keys[slot] = item, key
            else:
                held.append(item)
                keys.append(key)
            return True

    def snapshot(self) -> Samples:
        """The samples held now, as `calibration.split` deals them: calibrate on one part, judge on the other."""
        with self._lock:
            return Samples(calibrate=list(self.parts["calibrate"]), holdout=list(self.parts["shadow"]),
                           source="live")

    def stats(self) -> dict:
        with self._lock:
            return {"offered": self.offered, "calibrate": len(self.parts["calibrate"]),
                    "shadow": len(self.parts["shadow"]), "duplicates": self.duplicates,
                    "bytes": self.item_bytes * sum(len(v) for v in self.parts.values())}


__all__ = ["Reservoir"]
