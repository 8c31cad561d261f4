"""The HTTP face the inference examples share, counting the requests in flight.

Run as a command, an example serves on ``$HOST:$PORT`` (the worker sets both; ``--host`` and
``--port`` for a run by hand) and reports its load to the worker as report lines,
``AIFACTORY_REPORT {"in_flight": 3, "requests_total": 120}``, on every change but at most
every ``REPORT_INTERVAL_SECONDS`` (the last state is always reported), which is what an
autoscaler reads. Run as an entrypoint factory (``module:factory``), the worker serves the
handler and counts in flight itself.

Routes: ``POST /`` (any path) answers with the model's handler, ``GET /healthz`` says ``ok``,
``GET /stats`` gives the counts as JSON. A handler's ``ValueError`` (bad input) is a 400 whose
body says which field and what is valid; anything else is a 500.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aifactory_examples.context import print_report

__all__ = ["REPORT_INTERVAL_SECONDS", "InferenceServer", "Load", "run_server", "server_args"]

REPORT_INTERVAL_SECONDS = 0.1
MAX_BODY_BYTES = 1 << 20

Handler = Callable[[bytes], bytes | str]


class Load:
    """Requests in flight and served in all, with a condition to wait for a change."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.in_flight = 0
        self.requests_total = 0
        self.version = 0

    def enter(self) -> None:
        with self.changed:
            self.in_flight += 1
            self.requests_total += 1
            self.version += 1
            self.changed.notify_all()

    def leave(self) -> None:
        with self.changed:
            self.in_flight -= 1
            self.version += 1
            self.changed.notify_all()

    def snapshot(self) -> dict[str, int]:
        with self.changed:
            return {"in_flight": self.in_flight, "requests_total": self.requests_total}


def _http_handler(handler: Handler, load: Load) -> type[BaseHTTPRequestHandler]:
    class Http(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _answer(self, code: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._answer(200, b"ok", "text/plain")
            elif self.path == "/stats":
                self._answer(200, json.dumps(load.snapshot()).encode())
            else:
                self._answer(404, b'{"error": "POST a request, or GET /healthz or /stats"}')

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._answer(413, json.dumps({"error": f"body of {length} bytes is over "
                                              f"{MAX_BODY_BYTES}"}).encode())
                return
            body = self.rfile.read(length) if length > 0 else b""
            load.enter()
            try:
                out = handler(body)
                code, data = 200, out.encode() if isinstance(out, str) else bytes(out)
            except ValueError as exc:
                code, data = 400, json.dumps({"error": str(exc)}).encode()
            except Exception as exc:
                code, data = 500, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
            finally:
                load.leave()
            self._answer(code, data)

    return Http


class InferenceServer:
    """A threading HTTP server over ``handler`` that counts its load and passes every change
    to ``report`` (default: a report line on stdout) from a background thread."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0, *,
                 report: Callable[..., None] | None = print_report) -> None:
        self.load = Load()
        self.httpd = ThreadingHTTPServer((host, port), _http_handler(handler, self.load))
        self.httpd.daemon_threads = True
        self._report = report
        self._closing = threading.Event()
        self._reporter: threading.Thread | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> InferenceServer:
        """Serve in a background thread (tests; ``serve_forever`` for a command)."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="http")
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        if self._report is not None:
            self._reporter = threading.Thread(target=self._report_loop, args=(self._report,),
                                              daemon=True, name="load-report")
            self._reporter.start()
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self.httpd.server_close()
            self._closing.set()
            with self.load.changed:
                self.load.changed.notify_all()
            if self._reporter is not None:
                self._reporter.join(timeout=2.0)

    def shutdown(self) -> None:
        """Stop serving (from another thread than ``serve_forever``'s); after ``start``, wait
        until the server and its reporter are done."""
        self.httpd.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _report_loop(self, report: Callable[..., None]) -> None:
        seen = -1
        while True:
            with self.load.changed:
                while self.load.version == seen and not self._closing.is_set():
                    self.load.changed.wait()
                if self.load.version == seen:
                    return  # closing, and the last state is reported
                seen = self.load.version
                counts = {"in_flight": self.load.in_flight,
                          "requests_total": self.load.requests_total}
            report(**counts)
            self._closing.wait(REPORT_INTERVAL_SECONDS)


def server_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    """``--host`` (default ``$HOST``, else 127.0.0.1) and ``--port`` (default ``$PORT``, else
    8000): the worker sets ``HOST`` and ``PORT`` for a command replica."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default=os.environ.get("HOST") or "127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8000))
    return parser.parse_args(argv)


def run_server(handler: Handler, args: argparse.Namespace, what: str) -> int:
    """Serve until SIGTERM or Ctrl-C (a command replica's life)."""
    server = InferenceServer(handler, args.host, args.port)

    def stop(_sig: int, _frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"serving {what} at {server.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0
