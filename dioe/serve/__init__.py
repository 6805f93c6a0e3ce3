"""Serving an optimized model: a dynamic batcher (`Batcher`), an HTTP server with Prometheus metrics
(`dioe.serve.http`, the `serve` extra), a Ray Serve deployment (`dioe.serve.ray`, the `serve-ray` extra) and a
load generator (`dioe.serve.loadgen`).

    >>> from dioe.serve import Batcher
    >>> b = Batcher(opt, model=model, max_batch_size=8)                   # doctest: +SKIP
    >>> out = b(*inputs)                                                  # from any number of threads
"""

from __future__ import annotations

import importlib.util

from .batcher import (Batcher, BatcherClosed, Metrics, QueueFull, RequestFailed,  # noqa: F401
                      RequestTimeout)
from .buckets import Bucket, Buckets  # noqa: F401
from ..errors import DIOEError


def require(extra: str, *modules: str) -> None:
    """Import `modules` or fail with one clear error naming the extra that brings them."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise DIOEError(f"serving needs {', '.join(missing)}: pip install 'dioe[{extra}]'")


__all__ = ["Batcher", "BatcherClosed", "Bucket", "Buckets", "Metrics", "QueueFull", "RequestFailed",
           "RequestTimeout", "require"]
