"""A real OpenADR 3.1 VTN for the tests: the `openadr` crate's binary (built by
``hack/install-openadr3-vtn.sh``) as a subprocess on a free loopback port, in-memory, with two
OAuth2 clients of its own token endpoint: the utility's business logic and one VEN. ``Vtn``
also speaks the utility's side of the API (programs, VEN objects, events, reading reports).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration.k8s_env import _die_with_parent, free_port
from tests.integration.operator_env import wait_for

BL_ID, BL_SECRET, VEN_ID, VEN_SECRET = "utility-bl", "bl-secret-1", "site-a-client", "v-sec-1"


def vtn_binary() -> str:
    path = os.environ.get("AIFACTORY_OPENADR3_VTN") or os.path.expanduser(
        "~/.cache/aifactory/openadr3-vtn/current/bin/openadr")
    if not os.access(path, os.X_OK):
        why = f"the OpenADR 3 VTN is not installed at {path} (run hack/install-openadr3-vtn.sh)"
        if os.environ.get("AIFACTORY_REQUIRE_INTEGRATION"):
            pytest.fail(f"AIFACTORY_REQUIRE_INTEGRATION is set but {why}", pytrace=False)
        pytest.skip(why)
    return path


class Vtn:
    """The VTN as a subprocess on a free loopback port, and the utility's side of its API."""

    def __init__(self, binary: str, log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/openadr3/3.1.0"
        self._log = open(log, "ab")  # noqa: SIM115  closed in stop()
        self.proc = subprocess.Popen(
            [binary, "vtn", "--listen", f"127.0.0.1:{self.port}",
             "--client", f"{BL_ID}:{BL_SECRET}:bl", "--client", f"{VEN_ID}:{VEN_SECRET}:ven"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent)
        wait_for(self._answers, 30, "the VTN to answer")
        self.token = self._token()

    def _answers(self) -> bool:
        assert self.proc.poll() is None, f"the VTN exited: {self.log_tail()}"
        try:
            with urllib.request.urlopen(self.url + "/auth/server", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def _token(self) -> str:
        form = urllib.parse.urlencode({"grant_type": "client_credentials",
                                       "client_id": BL_ID, "client_secret": BL_SECRET})
        with urllib.request.urlopen(self.url + "/auth/token", form.encode(), timeout=10) as r:
            return str(json.load(r)["access_token"])

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One call as the utility's business logic; the decoded answer."""
        req = urllib.request.Request(
            self.url + path, method=method, headers={
                "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: HTTP {exc.code} {exc.read()!r}") from None

    def event(self, program_id: str, name: str, kind: str, value: float, units: str | None,
              targets: list[str], event_id: str | None = None) -> str:
        """Publishes an event of one 30-minute interval starting now (``event_id``: replaces
        that event, PUT); its id."""
        body: dict[str, Any] = {
            "programID": program_id, "eventName": name, "targets": targets,
            "intervalPeriod": {"start": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                               "duration": "PT30M"},
            "intervals": [{"id": 0, "payloads": [{"type": kind, "values": [value]}]}]}
        if units:
            body["payloadDescriptors"] = [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                                           "payloadType": kind, "units": units}]
        if event_id:
            return str(self.call("PUT", f"/events/{event_id}", body)["id"])
        return str(self.call("POST", "/events", body)["id"])

    def reports(self, event_id: str) -> list[float]:
        """The LOAD_SHED_DELTA_AVAILABLE values reported on one event."""
        return [float(v) for rep in self.call("GET", "/reports")
                if rep.get("eventID") == event_id for res in rep.get("resources") or []
                for iv in res.get("intervals") or [] for p in iv.get("payloads") or []
                if p.get("type") == "LOAD_SHED_DELTA_AVAILABLE" for v in p.get("values") or []]

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        with open(self._log.name, "rb") as f:
            return b"".join(f.readlines()[-lines:]).decode(errors="replace")

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 10 s) to the VTN's PID."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
