"""The HTTP server: a FastAPI app around a `Batcher`, run by uvicorn on 127.0.0.1 unless told otherwise.

    POST /v1/models/{name}/infer   JSON (KServe v2 form) or a safetensors body (Content-Type:
                                   application/octet-stream); the answer comes in the same form
    GET  /v1/models/{name}         the model's inputs, buckets and knobs
    GET  /health                   200 while the batcher takes requests
    GET  /metrics                  Prometheus: queue depth, batch sizes, latency histograms, fallbacks

Malformed bodies, wrong shapes and dtypes get 400, oversize bodies 413, a full queue 503 with Retry-After, a
request past its timeout 504; each with a message saying what was expected.

    >>> app = make_app(batcher, metrics)                                 # doctest: +SKIP
    >>> with start(app) as url: ...                                      # a server on 127.0.0.1, in a thread
"""


import asyncio
import contextlib
import socket
import threading
import time
from typing import Iterator

from . import require
from .batcher import Batcher, BatcherClosed, QueueFull, RequestFailed, RequestTimeout
from .codec import BINARY, BodyError, decode_binary, decode_json, encode_binary, encode_json
from ..errors import DIOEError, InputSpecError

MAX_BODY_BYTES = 64 << 20


def make_app(batcher: Batcher, metrics=None, *, max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI app serving `batcher`'s model under its name; `metrics` (a `PrometheusMetrics`, the one the
    batcher reports to) backs /metrics."""
    require("serve", "fastapi", "uvicorn", "prometheus_client", "safetensors")
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    app = FastAPI(title=f"DIOE: {batcher.name}", docs_url=None, redoc_url=None)
    names = batcher.buckets.input_names

    def error(status: int, message: str, **headers) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise BodyError(f"the body is {declared} bytes; this server takes at most {max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it comes: a body without a length is bounded too
            size += len(chunk)
            if size > max_body_bytes:
                raise BodyError(f"the body is over {max_body_bytes} bytes, the most this server takes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/models/{name}/infer")
    async def infer(name: str, request: Request):
        if name != batcher.name:
            return error(404, f"no model {name!r} here; this server serves {batcher.name!r}")
        binary = request.headers.get("content-type", "").split(";")[0].strip() == BINARY
        try:
            body = await read_body(request)
        except BodyError as e:
            return error(413, str(e))
        try:
            inputs = decode_binary(body, names) if binary else decode_json(body, names)
            fut = batcher.submit(*inputs)
        except QueueFull as e:
            return error(503, str(e), **{"Retry-After": str(e.retry_after_s)})
        except BatcherClosed as e:
            return error(503, str(e))
        except (BodyError, InputSpecError, DIOEError) as e:
            return error(400, str(e))
        timeout = batcher.timeout_ms
        try:
            wrapped = asyncio.wrap_future(fut)
            out = await (asyncio.wait_for(wrapped, timeout / 1000) if timeout else wrapped)
        except RequestTimeout as e:
            return error(504, str(e))
        except (asyncio.TimeoutError, TimeoutError):
            return error(504, f"{batcher.name}: no answer within timeout_ms={timeout:g}")
        except RequestFailed as e:
            return error(500, str(e))
        except DIOEError as e:
            return error(500, f"{batcher.name}: {e}")
        if binary:
            return Response(encode_binary(out), media_type=BINARY)
        return JSONResponse(encode_json(batcher.name, out))

    @app.get("/v1/models/{name}")
    def metadata(name: str):
        if name != batcher.name:
            return error(404, f"no model {name!r} here; this server serves {batcher.name!r}")
        b = batcher.buckets
        return {"name": batcher.name,
                "inputs": [{"name": n, "shape": [-1, *s.shape[1:]], "datatype": s.dtype} for n, s in zip(names, b.specs)],
                "max_batch_size": batcher.max_batch_size, "batch_buckets": list(b.batch_sizes),
                "sequence_buckets": list(b.seq_buckets), "built": [[k.batch, k.seq] for k in b.built]}

    @app.get("/health")
    def health():
        if batcher.closed:
            return error(503, f"{batcher.name}: the batcher is closed")
        return {"status": "ok", "model": batcher.name, "queue_depth": batcher.queue_depth}

    @app.get("/metrics")
    def prometheus():
        if metrics is None:
            return error(404, "this server was started without metrics")
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    return app


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket on `host`:`port` (0: a free port), so the caller knows the port before serving."""
    try:
        sock = socket.create_server((host, port), reuse_port=False)
    except OSError as e:
        raise DIOEError(f"cannot listen on {host}:{port}: {e}") from None
    return sock


@contextlib.contextmanager
def start(app, *, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Run `app` under uvicorn in a thread, yield its URL, and stop it on exit (bounded waits both ways)."""
    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dioe-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise DIOEError(f"the HTTP server did not start within {start_timeout_s:g} s")
        time.sleep(0.02)
    h, p = sock.getsockname()[:2]
    try:
        yield f"http://{h}:{p}"
    finally:
        server.should_exit = True
        thread.join(start_timeout_s)
        sock.close()


def serve_forever(app, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until Ctrl-C, in this thread."""
    import uvicorn

    sock = bind(host, port)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
