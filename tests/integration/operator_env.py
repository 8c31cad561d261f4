"""The operator on a real API server: install the manifests, run it, watch what it writes.

Used by the operator integration tests and by ``benchmarks/operator_latency.py``; depends
only on ``k8s_env`` (the real etcd + kube-apiserver), the standard library and PyYAML.

* ``install_manifests`` runs ``kubectl apply -k manifests/`` (CRDs, RBAC, Deployment) and
  waits for the CRDs to be Established. Nothing runs the Deployment (no kubelet); the
  operator runs here as a subprocess instead.
* ``OperatorProcess`` starts ``python -m controller.cli.main operator`` authenticated as the
  ``aifactory-operator`` ServiceAccount from ``manifests/rbac.yaml`` (its RBAC, not admin),
  and can be killed (SIGKILL) and started again, as a crash would.
* ``Watch`` follows one kind through the watch API in a thread and records, per object,
  when each phase was first seen, so latencies are measured from what the API server
  serves, not from polling.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.integration.k8s_env import REPO_ROOT, KubeTestEnv, _die_with_parent, free_port

GROUP_VERSION = "aifactory.io/v1alpha1"
CRDS = ("trainingjobs", "inferenceservices", "gpuqueues", "powerbudgets")
OPERATOR_NAMESPACE = "aifactory-system"
OPERATOR_ACCOUNT = "aifactory-operator"


def install_manifests(env: KubeTestEnv) -> None:
    """CRDs, RBAC, admission policies and the Deployment from ``manifests/``, as a user
    installs them; returns once the admission policies are in force."""
    env.kubectl("apply", "-k", str(REPO_ROOT / "manifests"))
    env.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                *(f"crd/{plural}.aifactory.io" for plural in CRDS))
    # The API server loads policies in the background: wait until one refuses a job in a
    # namespace granted no queue.
    probe = "aifactory-admission-probe"
    env.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": probe}})

    def refused() -> bool:
        tried = env.kubectl("apply", "--dry-run=server", "-f", "-", check=False,
                            input=yaml.safe_dump(training_job("probe", probe)))
        return tried.returncode != 0 and "may not use queue" in tried.stderr

    wait_for(refused, 60, "the admission policies to take effect", interval=0.2)


def ensure_namespace(env: KubeTestEnv, name: str, queues: str = "*",
                     default_queue: str | None = None) -> None:
    """A namespace granted ``queues`` (the ``aifactory.io/queues`` annotation a cluster
    admin sets; ``*`` grants every queue), and optionally a default queue."""
    annotations = {"aifactory.io/queues": queues}
    if default_queue is not None:
        annotations["aifactory.io/default-queue"] = default_queue
    env.apply({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": name, "annotations": annotations}})


def wait_for(check: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


class OperatorProcess:
    """``aifactory operator`` as a child process running as the operator ServiceAccount."""

    def __init__(self, env: KubeTestEnv, workdir: Path, args: Sequence[str] = (),
                 environ: dict[str, str] | None = None) -> None:
        self.env = env
        self.workdir = workdir
        self.args = list(args)
        self.environ = dict(environ or {})  # added to this process's environment
        self.kubeconfig = env.serviceaccount_kubeconfig(
            OPERATOR_NAMESPACE, OPERATOR_ACCOUNT, workdir / "operator.kubeconfig")
        self.health_port = 0
        self.metrics_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"operator-{self.starts}.log"

    def start(self, ready_timeout: float = 60.0, leading: bool = True) -> None:
        """Start it and wait until it leads and its engine runs (``leading``), or only until
        it answers ``/healthz`` (a standby waiting for the leader Lease does). A port that
        another process took between ``free_port()`` and the operator's bind is a race of
        this helper, not of the operator: it starts again on new ports (twice at most)."""
        for attempt in range(3):
            try:
                self._start_once(ready_timeout, leading)
                return
            except AssertionError as exc:
                if attempt == 2 or "Address already in use" not in str(exc):
                    raise

    def _start_once(self, ready_timeout: float, leading: bool) -> None:
        self.starts += 1
        self.health_port, self.metrics_port = free_port(), free_port()
        argv = [sys.executable, "-m", "aifactory.controller.cli.main", "operator",
                f"--kubeconfig={self.kubeconfig}", f"--health-port={self.health_port}",
                f"--metrics-port={self.metrics_port}", *self.args]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1",
               **self.environ}
        env.pop("KUBECONFIG", None)
        with self.log_path.open("wb") as log:
            # Dies with the test process even if that is killed before its teardown.
            self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True,
                                         preexec_fn=_die_with_parent)
        wait_for(self.leading if leading else self._healthy, ready_timeout,
                 "the operator's /healthz" + (" as the leader" if leading else ""),
                 interval=0.1)

    def _health(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the operator exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode() if response.status == 200 else None
        except OSError:
            return None

    def _healthy(self) -> bool:
        return self._health() is not None

    def leading(self) -> bool:
        """Its engine runs: /healthz answers, and not as a standby."""
        body = self._health()
        return body is not None and '"standby"' not in body

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: nothing is flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (kopf shuts down cleanly), then SIGKILL if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def samples(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """``(labels, value)`` of every sample of ``name`` on the metrics port whose labels
        include ``labels``."""
        from prometheus_client.parser import text_string_to_metric_families

        return [(dict(s.labels), float(s.value))
                for family in text_string_to_metric_families(self.metrics())
                for s in family.samples
                if s.name == name and labels.items() <= s.labels.items()]


class Watch:
    """A watch on one of our kinds in all namespaces, in a daemon thread.

    ``first[(namespace, name)][phase]`` is the monotonic time the phase was first seen;
    ``objects`` holds the latest body of each object; ``added`` when it was first seen.
    """

    def __init__(self, env: KubeTestEnv, plural: str) -> None:
        config = yaml.safe_load(env.kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        self._dir = tempfile.mkdtemp(prefix="aifactory-watch-")
        paths = {}
        for key, data in (("ca", cluster["certificate-authority-data"]),
                          ("cert", user["client-certificate-data"]),
                          ("key", user["client-key-data"])):
            path = Path(self._dir) / key
            path.write_bytes(base64.b64decode(data))
            paths[key] = str(path)
        self._ssl = ssl.create_default_context(cafile=paths["ca"])
        self._ssl.load_cert_chain(paths["cert"], paths["key"])
        server = urllib.parse.urlsplit(cluster["server"])
        self._host, self._port = server.hostname or "127.0.0.1", server.port or 443
        self._path = f"/apis/{GROUP_VERSION}/{plural}?watch=1&timeoutSeconds=3600"
        self.lock = threading.Lock()
        self.first: dict[tuple[str, str], dict[str, float]] = {}
        self.added: dict[tuple[str, str], float] = {}
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.deleted: set[tuple[str, str]] = set()
        self.changed = threading.Condition(self.lock)
        # Checked against every object after every event (not only at the end): each says
        # what is wrong, or None. What they say is kept in ``violations``.
        self.invariants: list[Callable[[dict[tuple[str, str], dict[str, Any]]], str | None]] = []
        self.violations: list[str] = []
        self.events = 0
        self._conn: http.client.HTTPSConnection | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_for(lambda: self._conn is not None, 30, "the watch to connect")

    def _run(self) -> None:
        while not self._stop:
            conn = http.client.HTTPSConnection(self._host, self._port, context=self._ssl,
                                               timeout=3600)
            try:
                conn.request("GET", self._path)
                response = conn.getresponse()
                self._conn = conn
                for line in response:
                    if self._stop:
                        return
                    self._event(json.loads(line))
            except (OSError, ValueError, http.client.HTTPException):
                if self._stop:
                    return
                time.sleep(0.2)
            finally:
                conn.close()

    def _event(self, event: dict[str, Any]) -> None:
        now = time.monotonic()
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        with self.lock:
            if event.get("type") == "DELETED":
                self.deleted.add(key)
                self.objects.pop(key, None)
            else:
                self.added.setdefault(key, now)
                self.objects[key] = obj
                phase = (obj.get("status") or {}).get("phase")
                if phase:
                    self.first.setdefault(key, {}).setdefault(phase, now)
            self.events += 1
            for check in self.invariants:
                wrong = check(self.objects)
                if wrong is not None:
                    self.violations.append(wrong)
            self.changed.notify_all()

    def phase(self, namespace: str, name: str) -> str | None:
        with self.lock:
            obj = self.objects.get((namespace, name))
        return None if obj is None else (obj.get("status") or {}).get("phase")

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        with self.lock:
            obj = self.objects.get((namespace, name)) or {}
        return dict(obj.get("status") or {})

    def wait_phase(self, namespace: str, name: str, phases: Iterable[str],
                   timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the object's phase is one of ``phases``; its status."""
        wanted = set(phases)
        wait_for(lambda: self.phase(namespace, name) in wanted, timeout,
                 f"{namespace}/{name} to reach {sorted(wanted)} (now "
                 f"{self.phase(namespace, name)!r}: {self.status(namespace, name)})")
        return self.status(namespace, name)

    def close(self) -> None:
        self._stop = True
        conn = self._conn
        if conn is not None and conn.sock is not None:
            # Shut the socket down rather than close the response: closing a buffered
            # reader another thread is blocked in would wait for that thread forever.
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        for path in Path(self._dir).iterdir():
            path.unlink()
        Path(self._dir).rmdir()


def training_job(name: str, namespace: str, workers: int = 1, gpus_per_worker: int = 1,
                 **spec: Any) -> dict[str, Any]:
    """A TrainingJob manifest; extra keyword arguments go into ``spec``."""
    return {"apiVersion": GROUP_VERSION, "kind": "TrainingJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"workers": workers, "gpusPerWorker": gpus_per_worker, **spec}}


def gpu_slots(statuses: Iterable[dict[str, Any]]) -> list[tuple[str, int]]:
    """(node, GPU index) of every worker in the given statuses' placements."""
    slots: list[tuple[str, int]] = []
    for status in statuses:
        for worker in ((status.get("placement") or {}).get("workers") or []):
            slots.extend((worker["node"], g) for g in worker["gpus"])
    return slots


def delete_all(env: KubeTestEnv, namespace: str) -> None:
    """Delete every TrainingJob and InferenceService of a namespace (the operator must run
    to release finalizers; without it, strip them)."""
    env.kubectl("delete", "trainingjobs,inferenceservices", "--all", f"-n={namespace}",
                "--wait=false", check=False)


def release_all(env: KubeTestEnv, namespace: str, timeout: float = 60.0) -> None:
    """Delete every job of a namespace and wait until the running operator released them
    (its finalizers are gone)."""
    delete_all(env, namespace)
    wait_for(lambda: env.kubectl("get", "trainingjobs,inferenceservices", f"-n={namespace}",
                                 "-o", "name", check=False).stdout.strip() == "", timeout,
             f"the jobs of {namespace} to be released", interval=0.3)


def gpu_node(name: str, rack: str, block: str = "b0", gpus: int = 8,
             ready: bool | None = None) -> dict[str, Any]:
    """A Node object of ``gpus`` allocatable H200s in ``rack``/``block`` (no kubelet runs
    it: tests set its conditions, taints and cordon themselves)."""
    status: dict[str, Any] = {"capacity": {"nvidia.com/gpu": str(gpus)},
                              "allocatable": {"nvidia.com/gpu": str(gpus)}}
    if ready is not None:
        status["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "aifactory.io/rack": rack, "aifactory.io/block": block,
                "nvidia.com/gpu.product": "NVIDIA-H200"}},
            "status": status}


@contextlib.contextmanager
def operator_on_nodes(env: KubeTestEnv, workdir: Path, namespace: str,
                      nodes: Sequence[dict[str, Any]], args: Sequence[str] = (),
                      also_delete: Sequence[str] = ()) -> Iterator[OperatorProcess]:
    """An operator whose inventory is ``nodes`` (Node objects this creates, after checking
    no other Node exists) working on ``namespace``; afterwards its jobs are released (or
    their finalizers stripped), the operator stopped and the Nodes (and ``also_delete``,
    Nodes a test added) deleted."""
    names = [str(n["metadata"]["name"]) for n in nodes]
    only_nodes(env, names)
    env.apply(list(nodes))
    ensure_namespace(env, namespace)
    proc = OperatorProcess(env, workdir, ["--inventory=nodes", "--status-interval=1", *args])
    proc.start()
    try:
        yield proc
    finally:
        try:
            release_all(env, namespace)
        finally:
            proc.stop()
            strip_finalizers(env, namespace)  # whatever the operator could not release
            env.kubectl("delete", "node", *names, *also_delete, "--ignore-not-found",
                        check=False)


def only_nodes(env: KubeTestEnv, names: Sequence[str]) -> None:
    """Fail unless no other Node exists: a module whose inventory is the Node objects needs
    exactly its own."""
    items = json.loads(env.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    others = sorted(n["metadata"]["name"] for n in items if n["metadata"]["name"] not in names)
    assert not others, f"Nodes of another module are still there: {others}"


def object_events(env: KubeTestEnv, namespace: str, name: str) -> list[str]:
    """``reason: message`` of every Event about one object."""
    out = env.kubectl("get", "events", f"-n={namespace}", "-o", "json",
                      f"--field-selector=involvedObject.name={name}").stdout
    return [f"{e['reason']}: {e['message']}" for e in json.loads(out)["items"]]


def strip_finalizers(env: KubeTestEnv, namespace: str) -> None:
    """Remove our finalizer from everything left in a namespace (cleanup without operator)."""
    for plural in ("trainingjobs", "inferenceservices"):
        names = env.kubectl("get", plural, f"-n={namespace}", "-o",
                            "jsonpath={.items[*].metadata.name}", check=False).stdout.split()
        for name in names:
            env.kubectl("patch", plural, name, f"-n={namespace}", "--type=merge", "-p",
                        '{"metadata":{"finalizers":null}}', check=False)


def budget_status(env: KubeTestEnv, name: str) -> dict[str, Any]:
    """A PowerBudget's status ({} while it is not there)."""
    out = env.kubectl("get", "powerbudget", name, "-o", "json", check=False)
    return dict(json.loads(out.stdout).get("status") or {}) if out.returncode == 0 else {}


def tier0_untouched(namespace: str, name: str = "tier-0"
                    ) -> Callable[[dict[tuple[str, str], dict[str, Any]]], str | None]:
    """A ``Watch`` invariant for the grid tests: the tier-0 job is never capped, paused,
    restarted or preempted."""
    def check(objects: dict[tuple[str, str], dict[str, Any]]) -> str | None:
        body = objects.get((namespace, name))
        if body is None:
            return None
        status = body.get("status") or {}
        conds = {c["type"]: c for c in status.get("conditions") or []}
        if conds.get("PowerCapped", {}).get("status") == "True":
            return "the tier-0 job was capped"
        if conds.get("Queued", {}).get("reason") == "PausedForGridEvent":
            return "the tier-0 job was paused"
        if (status.get("restarts") or 0) or (status.get("preemptions") or 0):
            return "the tier-0 job was restarted or preempted"
        return None
    return check
