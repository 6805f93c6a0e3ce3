"""The load generator behind `dioe loadtest`: a closed loop of `concurrency` clients, optionally paced to a total
`rate`, bounded in time and in count, against a server on this machine (loopback only) or any callable. It
reports throughput, p50/p90/p99 and errors, and draws latency over time.

    >>> r = closed_loop(lambda x: batcher(x), [x], concurrency=16, duration_s=10)   # doctest: +SKIP
    >>> print(r.summary())
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from ..errors import DIOEError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class LoadResult:
    """What a run measured: each answered request's (start, latency), and the errors by message."""

    name: str
    duration_s: float
    samples: list[tuple[float, float]] = field(default_factory=list)   # (seconds since start, latency in s)
    errors: Counter = field(default_factory=Counter)

    @classmethod
    def from_dict(cls, d: dict) -> "LoadResult":
        return cls(d["name"], d["duration_s"], [tuple(x) for x in d.get("samples", [])], Counter(d.get("error_kinds", {})))

    @property
    def throughput(self) -> float:
        return len(self.samples) / self.duration_s if self.duration_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        lat = sorted(s[1] for s in self.samples)
        if not lat:
            return float("nan")
        return 1000 * lat[min(len(lat) - 1, int(round(q / 100 * (len(lat) - 1))))]

    def to_dict(self, *, samples: bool = False) -> dict:
        extra = {"samples": self.samples, "error_kinds": dict(self.errors)} if samples else {}
        return {**extra, "name": self.name, "requests": len(self.samples), "errors": sum(self.errors.values()),
                "throughput": self.throughput, "p50_ms": self.percentile_ms(50), "p90_ms": self.percentile_ms(90),
                "p99_ms": self.percentile_ms(99), "duration_s": self.duration_s}

    def summary(self) -> str:
        d = self.to_dict()
        lines = [f"{self.name}: {d['requests']} answered in {d['duration_s']:.1f} s, {d['throughput']:.1f} req/s; "
                 f"latency p50 {d['p50_ms']:.1f} ms, p90 {d['p90_ms']:.1f} ms, p99 {d['p99_ms']:.1f} ms; "
                 f"{d['errors']} error(s)"]
        lines += [f"  {n} x {msg}" for msg, n in self.errors.most_common(5)]
        return "\n".join(lines)


def closed_loop(call: Callable[[Any], Any], payloads: Sequence, *, concurrency: int = 16, duration_s: float = 10.0,
                max_requests: int | None = None, rate: float | None = None, name: str = "load",
                progress: bool = False) -> LoadResult:
    """`concurrency` threads each call `call(payload)` in turn until `duration_s` or `max_requests` is reached;
    with `rate` (requests/s in all), each client waits for its share of the schedule. An exception counts as an
    error, by its message."""
    if concurrency < 1 or duration_s <= 0 or not payloads:
        raise DIOEError("a load run needs concurrency >= 1, duration > 0 and at least one payload")
    if rate is not None and rate <= 0:
        raise DIOEError(f"rate must be positive (requests per second), got {rate}")
    result = LoadResult(name, duration_s)
    lock = threading.Lock()
    issued = iter(range(max_requests)) if max_requests else None
    t0 = time.perf_counter()
    stop_at = t0 + duration_s

    def client(k: int) -> None:
        i = k
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                return
            with lock:
                if issued is not None and next(issued, None) is None:
                    return
            if rate is not None:  # client k's i-th request is due at i * concurrency / rate
                due = t0 + i * concurrency / rate
                if due >= stop_at:
                    return
                if due > now:
                    time.sleep(due - now)
            start = time.perf_counter()
            try:
                call(payloads[i % len(payloads)])
            except Exception as e:  # noqa: BLE001 -- counted and reported, by message
                with lock:
                    result.errors[f"{type(e).__name__}: {e}"[:200]] += 1
            else:
                end = time.perf_counter()
                with lock:
                    result.samples.append((start - t0, end - start))
            i += concurrency

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=round(duration_s), unit="s", desc=name, leave=False)
    while any(t.is_alive() for t in threads) and time.perf_counter() < stop_at + 60:  # bounded: a hung call too
        time.sleep(0.25)
        if bar is not None:
            bar.n = min(round(duration_s), round(time.perf_counter() - t0))
            bar.set_postfix(done=len(result.samples), errors=sum(result.errors.values()), refresh=True)
    if bar is not None:
        bar.close()
    # a call that started before the end is counted, so the run lasts until the last answer: dividing by the
    # nominal duration overstates throughput by up to a whole round of calls (one batch of a slow model)
    last = max((start + took for start, took in result.samples), default=0.0)
    result.duration_s = max(min(time.perf_counter(), stop_at) - t0, last) if not max_requests \
        else time.perf_counter() - t0
    return result


def check_loopback(url: str) -> str:
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise DIOEError(f"dioe loadtest drives servers on this machine only (127.0.0.1, localhost, ::1); got {url}")
    return url


def http_caller(url: str, model: str, body: bytes, *, binary: bool = False, timeout_s: float = 60.0):
    """A callable posting `body` to the server's infer route (one keep-alive connection per thread); a non-200
    answer raises with the server's message."""
    import httpx

    check_loopback(url)
    local = threading.local()
    ctype = "application/octet-stream" if binary else "application/json"

    def call(_payload: Any = None) -> bytes:
        c = getattr(local, "client", None)
        if c is None:
            c = local.client = httpx.Client(base_url=url, timeout=timeout_s)
        r = c.post(f"/v1/models/{model}/infer", content=body, headers={"content-type": ctype})
        if r.status_code != 200:
            raise DIOEError(f"HTTP {r.status_code}: {r.text[:150]}")
        return r.content
    return call


def plot(results: Sequence[LoadResult], path) -> None:
    """A PNG of latency over time, one series per run, each with its rolling p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import write_bytes

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in results:
        if not r.samples:
            continue
        pts = sorted(r.samples)
        line = ax.plot([t for t, _ in pts], [1000 * lat for _, lat in pts], ".", ms=2, alpha=0.35)[0]
        win = max(1, len(pts) // 20)   # a rolling p99 over a twentieth of the run
        p99 = []
        for i in range(len(pts)):
            w = sorted(lat for _, lat in pts[max(0, i - win):i + 1])
            p99.append(w[int(0.99 * (len(w) - 1))])
        ax.plot([t for t, _ in pts], [1000 * v for v in p99], "-", color=line.get_color(),
                label=f"{r.name}: {r.throughput:.0f} req/s, p99 {r.percentile_ms(99):.0f} ms")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue(), mode=0o644)
