"""A real Prometheus on loopback for the metrics integration tests.

``ensure_prometheus()`` finds the ``prometheus`` binary, installing Debian's package with
apt-get when it is missing and we may (root, or sudo without a password).
``PrometheusServer`` runs it with its own temporary storage and a generated config that
scrapes the given targets every second, waits until it is ready, answers PromQL over its
HTTP API, and on exit stops it by PID and removes its directory. Standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any


class PrometheusNotFoundError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_prometheus() -> str:
    """Path of the prometheus binary; apt-get installs it when missing and allowed."""
    found = shutil.which("prometheus")
    if found:
        return found
    if os.environ.get("AIFACTORY_SKIP_APT") == "1":
        raise PrometheusNotFoundError("prometheus is not installed (AIFACTORY_SKIP_APT=1)")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise PrometheusNotFoundError("prometheus is not installed and we are not root: "
                                          "run hack/install-test-deps.sh")
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]):
        done = subprocess.run([*prefix, *cmd], env=env, capture_output=True, text=True,
                              timeout=900, check=False)
        if done.returncode != 0:
            raise PrometheusNotFoundError(f"{' '.join(cmd)} failed: {done.stderr[-500:]}")
    found = shutil.which("prometheus")
    if not found:
        raise PrometheusNotFoundError("apt-get installed prometheus but it is not on PATH")
    return found


class PrometheusServer:
    """``with PrometheusServer(binary, ["127.0.0.1:9402"]) as prom: prom.query("up")``."""

    def __init__(self, binary: str, targets: Sequence[str], interval_seconds: int = 1
                 ) -> None:
        self.binary = binary
        self.targets = list(targets)
        self.interval = interval_seconds
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="aifactory-prometheus-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrometheusServer:
        config = self.dir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": f"{self.interval}s",
                       "evaluation_interval": f"{self.interval}s"},
            "scrape_configs": [{"job_name": "aifactory",
                                "scrape_interval": f"{self.interval}s",
                                "scrape_timeout": f"{self.interval}s",
                                "static_configs": [{"targets": self.targets}]}]}))
        log = (self.dir / "prometheus.log").open("wb")
        try:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={config}",
                 f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._stop()
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self._stop()
        raise RuntimeError(f"prometheus not ready after 30 s: {self.log_tail()}")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop()

    def log_tail(self) -> str:
        path = self.dir / "prometheus.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def _stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)

    # ----------------------------------------------------------------- HTTP API

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                doc = json.load(resp)
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{url}: HTTP {err.code}: {err.read()[:500]!r}") from err
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("/api/v1/query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str, at: float | None = None) -> float:
        """The single value of an expression that must return exactly one series."""
        result = self.query(expr, at)
        assert len(result) == 1, f"{expr} returned {len(result)} series: {result[:3]}"
        return float(result[0]["value"][1])

    def label_values(self, label: str, match: str) -> list[str]:
        values: list[str] = self.api(f"/api/v1/label/{label}/values", **{"match[]": match})
        return values

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.5)
