"""The Prometheus face of a control plane: a custom Collector and a /metrics server.

This is the only module that imports ``prometheus_client``. ``FactoryCollector`` builds
fresh metric families on every ``collect()`` from one ``FactorySnapshot``
(``controller.observe.snapshot``), like client_python's ``process_collector``: register it in any
``CollectorRegistry``. ``start_metrics_server(plane, port)`` serves ``/metrics`` from a
daemon thread; the operator calls it with the lock its engine holds while it changes the
plane (and its own counters as an ``extra`` collector on the same port), and
``aifactory simulate --serve-metrics`` with the lock of its pacing loop.

The server writes the text format with ``controller.observe.families.TextRenderer`` (the same rows
as the Collector, formatted about 10x faster than ``generate_latest``; see that module);
``renderer="client"`` serves ``generate_latest`` of the Collector instead.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from aifactory.controller.observe.families import Family, TextRenderer, build_families, format_value
from aifactory.controller.observe.snapshot import (
    PlaneObserver,
    ServiceSource,
    TelemetryChoice,
    choose_telemetry,
)

if TYPE_CHECKING:
    from aifactory.controller.runtime.controlplane import ControlPlane

__all__ = ["DEFAULT_METRICS_PORT", "FactoryCollector", "MetricsServer",
           "start_metrics_server", "to_client_families"]

DEFAULT_METRICS_PORT = 9402
RENDERERS = ("fast", "client")


def to_client_families(families: list[Family]) -> Iterator[Metric]:
    """``prometheus_client`` metric families holding the same samples as ``families``."""
    for fam in families:
        metric: GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily
        if fam.kind == "histogram":
            hist = HistogramMetricFamily(fam.name, fam.help, labels=fam.labels)
            for values, counts in fam.histograms:
                buckets = [(format_value(b), c)
                           for b, c in zip(counts.bounds, counts.cumulative, strict=True)]
                hist.add_metric(list(values), buckets, counts.sum)
            yield hist
            continue
        if fam.kind == "counter":
            metric = CounterMetricFamily(fam.name, fam.help, labels=fam.labels)
        else:
            metric = GaugeMetricFamily(fam.name, fam.help, labels=fam.labels)
        for values, value in fam.samples:
            metric.add_metric(list(values), value)
        yield metric


class FactoryCollector(Collector):
    """A ``prometheus_client`` collector over one control plane.

    ``lock`` (any context manager) is held while the snapshot is taken, never while the
    families are formatted."""

    def __init__(self, observer: PlaneObserver,
                 lock: AbstractContextManager[object] | None = None) -> None:
        self.observer = observer
        self.lock: AbstractContextManager[object] = lock or contextlib.nullcontext()
        self.renderer = TextRenderer()
        self.last_snapshot_seconds = 0.0
        self.last_render_seconds = 0.0
        self.last_cpu_seconds = 0.0  # CPU time of the last render_text, this thread only

    def families(self) -> list[Family]:
        started = time.perf_counter()
        with self.lock:
            snap = self.observer.snapshot()
        self.last_snapshot_seconds = time.perf_counter() - started
        return build_families(snap)

    def collect(self) -> Iterator[Metric]:
        yield from to_client_families(self.families())

    def describe(self) -> Iterator[Metric]:
        return iter(())  # registering must not take a snapshot

    def render_text(self) -> bytes:
        """The whole /metrics body in the text format, the fast way."""
        cpu = time.thread_time()
        families = self.families()
        started = time.perf_counter()
        body = self.renderer.render(families)
        self.last_render_seconds = time.perf_counter() - started
        self.last_cpu_seconds = time.thread_time() - cpu
        return body


class MetricsServer:
    """A running /metrics endpoint. ``close()`` stops it and joins its thread.

    ``extra`` collectors (names of their own, e.g. the operator's ``aifactory_operator_*``)
    are served after the factory's families on the same port."""

    def __init__(self, collector: FactoryCollector, host: str, port: int,
                 renderer: str = "fast", extra: Sequence[Collector] = ()) -> None:
        if renderer not in RENDERERS:
            raise ValueError(f"renderer must be one of {', '.join(RENDERERS)}, got "
                             f"{renderer!r}")
        self.collector = collector
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        others = CollectorRegistry(auto_describe=False)
        for other in extra:
            registry.register(other)
            others.register(other)

        def render() -> bytes:
            if renderer == "client":
                return generate_latest(registry)
            body = collector.render_text()
            return body + generate_latest(others) if extra else body

        handler = _handler(render)
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name=f"aifactory-metrics-{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)
        self.collector.observer.close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handler(render: Callable[[], bytes]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body = render()
                except Exception as exc:  # a broken scrape must not kill the server
                    self._reply(500, f"snapshot failed: {exc}\n".encode(), "text/plain")
                    return
                self._reply(200, body, TextRenderer.CONTENT_TYPE)
            elif path in ("/", "/healthz"):
                self._reply(200, b'aifactory metrics: <a href="/metrics">/metrics</a>\n',
                            "text/html")
            else:
                self._reply(404, b"not found: try /metrics\n", "text/plain")

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return None  # one line per scrape would drown the operator's log

    return Handler


def start_metrics_server(plane: ControlPlane, port: int = DEFAULT_METRICS_PORT,
                         host: str = "0.0.0.0", *,
                         lock: AbstractContextManager[object] | None = None,
                         per_gpu: bool = True, telemetry: str | TelemetryChoice = "auto",
                         renderer: str = "fast",
                         extra: Sequence[Collector] = (),
                         services: ServiceSource | None = None) -> MetricsServer:
    """Serve ``plane``'s metrics on ``http://host:port/metrics`` from a daemon thread.

    ``lock``: held while a snapshot is taken; pass the lock your thread holds while it
    calls ``plane.step()`` (the plane is not thread-safe). ``per_gpu=False``: node-level
    series only (a 100,000-GPU factory). ``telemetry``: ``auto`` (the simulated backend's
    own, else NVML, else the power model), ``backend``, ``nvml``, ``model``, or a choice
    already made (``choose_telemetry``). ``extra``: more collectors served on the same
    port. ``services``: InferenceServices' replicas and load (the autoscaler).
    ``port=0`` picks a free port (see ``.port``). Stop it with ``.close()``."""
    if isinstance(telemetry, TelemetryChoice):
        choice = telemetry
    elif lock is not None:
        with lock:
            choice = choose_telemetry(plane, telemetry)
    else:
        choice = choose_telemetry(plane, telemetry)
    observer = PlaneObserver(plane, choice, per_gpu=per_gpu, services=services)
    return MetricsServer(FactoryCollector(observer, lock), host, port, renderer, extra)
