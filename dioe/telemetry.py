"""Telemetry: readings of each pool member's utilisation, memory and power, taken now or by a background thread
so that readers never wait on NVML or psutil. `ResourcePool.start_telemetry`, `telemetry()` and `sample()` use it;
traces record its readings as counter tracks.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from .pool import ResourcePool


@dataclass(frozen=True)
class Sample:
    """One telemetry reading of a member. Fields a device cannot report are None."""

    time: float
    utilization_pct: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    power_w: float | None


class Telemetry:
    """Samples members in a daemon thread so that readers never wait on NVML or psutil."""

    def __init__(self, pool: ResourcePool):
        self._pool = pool
        self._latest: dict[str, Sample] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process()

    def start(self, interval_s: float) -> None:
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()
        psutil.cpu_percent(None, percpu=True)  # prime: the first call has no interval to measure over
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), name="dioe-telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        self._thread = None

    def _loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._sample()

    def latest(self) -> dict[str, Sample]:
        with self._lock:
            have = dict(self._latest)
        if not have:
            self._sample()
            with self._lock:
                have = dict(self._latest)
        return have

    def sample(self) -> dict[str, Sample]:
        return self._sample()

    def _sample(self) -> dict[str, Sample]:
        now = time.time()
        out: dict[str, Sample] = {}
        vm = psutil.virtual_memory()
        per_core = psutil.cpu_percent(None, percpu=True)
        cpu_util = sum(per_core) / len(per_core) if per_core else 0.0
        nvml = _nvml_handles()
        for m in self._pool.members:
            if m.device == "cpu":
                # a member pinned to cores is as busy as those cores, not as the machine
                util = sum(per_core[c] for c in m.cores if c < len(per_core)) / len(m.cores) if m.cores else cpu_util
                out[m.id] = Sample(now, util, vm.total - vm.available, m.memory_bytes, None)
            elif m.device and m.device.startswith("cuda") and nvml is not None:
                out[m.id] = _nvml_sample(nvml, int(m.device.split(":")[1]), now)
            else:
                out[m.id] = Sample(now, None, None, m.memory_bytes, None)
        with self._lock:
            self._latest = out
        return out


def _nvml_handles():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def _nvml_sample(pynvml, index: int, now: float) -> Sample:
    h = pynvml.nvmlDeviceGetHandleByIndex(index)
    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
    try:
        power = pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0
    except Exception:
        power = None
    util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
    return Sample(now, float(util), int(mem.used), int(mem.total), power)
