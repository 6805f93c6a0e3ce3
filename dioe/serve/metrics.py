"""The batcher's metrics in Prometheus form: queue depth, batch sizes, batch and request latency histograms,
request outcomes, retried batches and engine fallbacks. Each server keeps its own registry, so two servers in one
process (a test, a benchmark) never mix their numbers.
"""

from __future__ import annotations

from . import require
from .batcher import Metrics

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Instruments(Metrics):
    """What every exporter does alike: its instruments (`_queue`, `_batch`, `_batch_s`, `_retries`, `_fallbacks`),
    set up by the subclass under the same names, fed from the batcher's events."""

    def queue_depth(self, n: int) -> None:
        self._queue.set(n)

    def batch(self, rows: int, bucket: int, seconds: float) -> None:
        self._batch.observe(rows)
        self._batch_s.observe(seconds)

    def retry(self, requests: int) -> None:
        self._retries.inc(requests)

    def fallbacks(self, n: int) -> None:
        self._fallbacks.inc(n)


class PrometheusMetrics(Instruments):
    """Batcher metrics kept in a `prometheus_client` registry of their own, labelled with the model's name."""

    def __init__(self, model: str):
        require("serve", "prometheus_client")
        import prometheus_client as pc

        self.registry = pc.CollectorRegistry()
        kw = {"labelnames": ["model"], "registry": self.registry}
        self._queue = pc.Gauge("dioe_queue_depth", "Requests waiting in the batcher's queue", **kw).labels(model)
        self._batch = pc.Histogram("dioe_batch_size", "Rows per batch run", buckets=BATCH_SIZES, **kw).labels(model)
        self._batch_s = pc.Histogram("dioe_batch_latency_seconds", "Time to run one batch", buckets=LATENCY_S,
                                     **kw).labels(model)
        self._request_s = pc.Histogram("dioe_request_latency_seconds", "Time from queueing a request to its answer",
                                       buckets=LATENCY_S, **kw).labels(model)
        self._requests = pc.Counter("dioe_requests", "Requests by outcome (ok, error, timeout, rejected)",
                                    labelnames=["model", "outcome"], registry=self.registry)
        self._retries = pc.Counter("dioe_batch_retries", "Requests re-run alone after their batch failed",
                                   **kw).labels(model)
        self._fallbacks = pc.Counter("dioe_fallbacks", "Engine fallbacks at run time (a backend failed, torch took "
                                     "over)", **kw).labels(model)
        self.model = model

    def request(self, seconds: float, outcome: str) -> None:
        self._requests.labels(self.model, outcome).inc()
        if outcome == "ok":
            self._request_s.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The registry in Prometheus' text format, and its content type."""
        import prometheus_client as pc

        return pc.generate_latest(self.registry), pc.CONTENT_TYPE_LATEST
