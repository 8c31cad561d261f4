"""The Ray actor that runs one worker of a gang, and the small API a worker program calls.

One ``GangWorker`` actor per placement-group bundle. It sets the distributed-training
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``,
``CUDA_VISIBLE_DEVICES`` from the GPUs our placement gave it on its node,
``AIFACTORY_CHECKPOINT_DIR``) and runs the job's runtime in a thread of the actor, so the
backend can poll it while it works:

* ``entrypoint: "package.module:function"`` is called with a ``WorkerContext``
  (``ctx.rank``, ``ctx.world_size``, ``ctx.checkpoint_dir``, ``ctx.latest_checkpoint``,
  ``ctx.report(progress=..., checkpoint=...)``, ``ctx.should_stop``);
* ``command: [...]`` runs as a subprocess whose output is kept (``aifactory logs``); it
  reports by printing ``AIFACTORY_REPORT {"progress": 0.5, "checkpoint": "path"}``.

Inference replicas serve HTTP on a free port of their node and report it with the number of
requests in flight: the entrypoint is a factory ``function(ctx) -> handler`` and
``handler(body: bytes) -> bytes | str`` answers each request; a command replica is started with
``PORT`` set, its endpoint reported, and reports its load by printing
``AIFACTORY_REPORT {"in_flight": 3, "requests_total": 120}``.

Rank 0 picks ``MASTER_PORT`` on its node; the other ranks ask rank 0 for it, so launching a
gang never blocks the control plane.

A worker is either created for its plan inside its bundle, or pre-started without one
(``controller.backends.ray.pool``): then ``start`` gives it the plan and the placement group
that reserves its bundle, and it runs the program once that group is placed. A worker runs
one plan in its life: a second is refused.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import ray

from aifactory.controller.backends.ray.gang import WorkerPlan, WorkerReport

__all__ = ["LATEST_FILE", "REPORT_PREFIX", "GangWorker", "WorkerContext"]

REPORT_PREFIX = "AIFACTORY_REPORT "
LATEST_FILE = "LATEST"
LOG_LINES_KEPT = 500
STOP_GRACE_SECONDS = 5.0


class WorkerContext:
    """What a ``module:function`` entrypoint gets: who it is, where to checkpoint, how to
    report. ``report`` is cheap (a lock and a few assignments): call it every step."""

    __slots__ = ("_worker", "attempt", "checkpoint_dir", "env", "job", "local_rank", "rank",
                 "world_size")

    def __init__(self, plan: WorkerPlan, worker: GangWorker, env: dict[str, str]) -> None:
        self.job = plan.job
        self.rank = plan.rank
        self.world_size = plan.world_size
        self.local_rank = plan.local_rank
        self.checkpoint_dir = plan.checkpoint_dir
        self.attempt = plan.attempt
        self.env = env
        self._worker = worker

    @property
    def latest_checkpoint(self) -> str | None:
        """The last checkpoint any earlier attempt of this job reported, or None."""
        return read_latest(self.checkpoint_dir)

    @property
    def should_stop(self) -> bool:
        """True once the backend asked this worker to stop: save and return soon."""
        return self._worker._stopping.is_set()

    def report(self, progress: float | None = None, checkpoint: str | None = None,
               **metrics: float) -> None:
        """Progress in [0, 1], a checkpoint just written (rank 0's is recorded as the job's
        latest), and any numeric metrics."""
        self._worker._report(progress, checkpoint, metrics)


def read_latest(checkpoint_dir: str) -> str | None:
    try:
        text = (Path(checkpoint_dir) / LATEST_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _load(entrypoint: str) -> Callable[..., Any]:
    module_name, _, attr = entrypoint.partition(":")
    module = importlib.import_module(module_name)
    target = module
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{entrypoint} is not callable")
    return target


class GangWorker:
    """One worker of a gang (instantiated by Ray as a threaded actor)."""

    def __init__(self, plan: WorkerPlan | None = None) -> None:
        self._plan = plan  # None: pre-started, idle until ``start`` gives it one
        self._reservation: Any = None  # a pooled worker's placement group (start waits)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._phase = "starting"
        self._progress = 0.0
        self._checkpoint: str | None = None
        self._checkpoint_at: float | None = None
        self._started_at = 0.0
        self._finished_at: float | None = None
        self._message = ""
        self._retryable = True
        self._endpoint: str | None = None
        self._in_flight = 0
        self._requests = 0
        self._latency_total = 0.0
        self._metrics: dict[str, float] = {}
        self._lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self._proc: subprocess.Popen[str] | None = None
        self._server: ThreadingHTTPServer | None = None
        self._master: tuple[str, int] | None = None
        self._thread: threading.Thread | None = None
        self._ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self._node_id = ray.get_runtime_context().get_node_id()

    @property
    def plan(self) -> WorkerPlan:
        if self._plan is None:
            raise RuntimeError("this pre-started worker has no plan yet (start gives it one)")
        return self._plan

    @property
    def _gpu_ids(self) -> tuple[str, ...]:
        """The GPUs our placement gave this worker on its node (not Ray's pick inside the
        bundle: every worker, pooled or not, agrees with the scheduler and the actuator)."""
        return tuple(str(g) for g in self._plan.local_gpus) if self._plan else ()

    # ----------------------------------------------------------------- called by the backend

    def master(self) -> tuple[str, int]:
        """Rank 0's address and a free port on its node (chosen once)."""
        with self._lock:
            if self._master is None:
                self._master = (self._ip, _free_port(""))
            return self._master

    def start(self, rank0: Any | None, plan: WorkerPlan | None = None,
              placement_group: Any = None) -> None:
        """Begin running (idempotent). ``rank0`` is rank 0's actor handle (None on rank 0).
        A pre-started worker gets its ``plan`` here and waits for ``placement_group``."""
        with self._lock:
            if plan is not None and self._plan is not None and plan != self._plan:
                raise RuntimeError(f"worker runs {self._plan.job} rank {self._plan.rank}; a "
                                   f"worker process runs one job, not also {plan.job}")
            if self._thread is not None:
                return
            if plan is not None:
                self._plan, self._reservation = plan, placement_group
            self._thread = threading.Thread(target=self._main, args=(rank0,), daemon=True,
                                            name=f"aifactory-{self.plan.rank}")
            self._thread.start()

    def poll(self) -> WorkerReport:
        with self._lock:
            if self._plan is None:  # pre-started, not yet given a plan
                return WorkerReport(rank=-1, phase="starting", node="", node_id=self._node_id,
                                    pid=os.getpid())
            return WorkerReport(
                rank=self.plan.rank, phase=self._phase, node=self.plan.node,
                node_id=self._node_id, pid=os.getpid(), gpu_ids=self._gpu_ids,
                progress=self._progress, checkpoint=self._checkpoint,
                checkpoint_at=self._checkpoint_at, started_at=self._started_at,
                finished_at=self._finished_at, message=self._message,
                retryable=self._retryable, endpoint=self._endpoint,
                in_flight=self._in_flight, requests_total=self._requests,
                latency_seconds_total=self._latency_total,
                metrics=tuple(sorted(self._metrics.items())))

    def describe(self) -> WorkerPlan | None:
        """The plan this worker runs (a restarted operator rebuilds the placement from it);
        None for a pre-started worker still idle."""
        return self._plan

    def logs(self, lines: int = 100) -> str:
        with self._lock:
            kept = list(self._lines)
        return "\n".join(kept[-lines:] if lines > 0 else kept)

    def stop(self) -> None:
        """Ask the program to stop: set ``ctx.should_stop``, SIGTERM a command (then SIGKILL
        after a grace period), shut the HTTP server."""
        self._stopping.set()
        proc, server = self._proc, self._server
        if server is not None:
            server.shutdown()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()

    # ----------------------------------------------------------------- internals

    def _report(self, progress: float | None, checkpoint: str | None,
                metrics: dict[str, float]) -> None:
        now = time.time()
        with self._lock:
            if progress is not None:
                self._progress = min(1.0, max(0.0, float(progress)))
            if checkpoint is not None:
                self._checkpoint = str(checkpoint)
                self._checkpoint_at = now
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self._metrics[str(key)] = float(value)
        if checkpoint is not None and self.plan.rank == 0:
            latest = Path(self.plan.checkpoint_dir) / LATEST_FILE
            tmp = latest.with_suffix(".tmp")
            tmp.write_text(str(checkpoint) + "\n", encoding="utf-8")
            os.replace(tmp, latest)

    def _log(self, line: str) -> None:
        with self._lock:
            self._lines.append(line.rstrip("\n"))

    def _set(self, phase: str, message: str = "", retryable: bool = True) -> None:
        with self._lock:
            if self._phase in ("succeeded", "failed"):
                return
            self._phase = phase
            self._message = message
            self._retryable = retryable
            if phase in ("succeeded", "failed"):
                self._finished_at = time.time()
                if phase == "succeeded" and self.plan.kind == "TrainingJob":
                    self._progress = 1.0

    def _environment(self, rank0: Any | None) -> dict[str, str]:
        if rank0 is None:
            addr, port = self.master()
        else:
            addr, port = ray.get(rank0.master.remote())
        env = dict(self.plan.env)
        env.update(self.plan.distributed_env(addr, port))
        env["CUDA_VISIBLE_DEVICES"] = ",".join(self._gpu_ids)
        return env

    def _main(self, rank0: Any | None) -> None:
        try:
            Path(self.plan.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            if not self._reserved():
                self._set("failed", "stopped")
                return
            env = self._environment(rank0)
            os.environ.update(env)
            for entry in env.get("PYTHONPATH", "").split(os.pathsep):
                if entry and entry not in sys.path:
                    sys.path.append(entry)
            with self._lock:
                self._started_at = time.time()
            if self.plan.kind == "InferenceService":
                self._serve(env)
            elif self.plan.entrypoint:
                self._call(env)
            elif self.plan.command:
                self._run_command(env)
            else:
                self._set("failed", f"{self.plan.job}: spec.runtime: set entrypoint "
                          "(module:function) or command", retryable=True)
        except Exception as exc:  # the program's error becomes the job's status
            self._log(traceback.format_exc())
            self._set("failed", f"worker {self.plan.rank} on {self.plan.node}: "
                      f"{type(exc).__name__}: {exc}")

    def _reserved(self) -> bool:
        """A pre-started worker runs outside its placement group: wait until the group holds
        its bundle on this node (False when stopped first)."""
        if self._reservation is None:
            return True
        while not self._reservation.wait(timeout_seconds=1):
            if self._stopping.is_set():
                return False
        return True

    def _entry(self) -> Callable[..., Any] | None:
        assert self.plan.entrypoint is not None
        try:
            return _load(self.plan.entrypoint)
        except Exception as exc:
            self._log(traceback.format_exc())
            self._set("failed", f"cannot load entrypoint {self.plan.entrypoint!r} on "
                      f"{self.plan.node}: {type(exc).__name__}: {exc}", retryable=True)
            return None

    def _call(self, env: dict[str, str]) -> None:
        fn = self._entry()
        if fn is None:
            return
        self._set("running")
        fn(WorkerContext(self.plan, self, env))
        if self._stopping.is_set():
            self._set("failed", "stopped")
        else:
            self._set("succeeded", "completed")

    def _spawn(self, env: dict[str, str]) -> subprocess.Popen[str]:
        full = dict(os.environ)
        full.update(env)
        proc = subprocess.Popen(list(self.plan.command), env=full, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._proc = proc
        return proc

    def _run_command(self, env: dict[str, str]) -> None:
        proc = self._spawn(env)
        self._set("running")
        last = ""
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(REPORT_PREFIX):
                self._parse_report(line[len(REPORT_PREFIX):])
                continue
            self._log(line)
            last = line.strip() or last
        code = proc.wait()
        if code == 0:
            self._set("succeeded", "completed")
        elif self._stopping.is_set():
            self._set("failed", "stopped")
        else:
            self._set("failed", f"worker {self.plan.rank} on {self.plan.node}: command "
                      f"exited with code {code}: {last[-300:]}")

    def _parse_report(self, text: str) -> None:
        try:
            data = json.loads(text)
        except ValueError:
            self._log(f"(ignored malformed report: {text.strip()[:200]})")
            return
        if not isinstance(data, dict):
            return
        progress = data.pop("progress", None)
        checkpoint = data.pop("checkpoint", None)
        load = data.pop("in_flight", None), data.pop("requests_total", None)
        if all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in load):
            with self._lock:
                self._in_flight, self._requests = load
        metrics = {k: v for k, v in data.items() if isinstance(v, int | float)}
        self._report(float(progress) if isinstance(progress, int | float) else None,
                     str(checkpoint) if checkpoint is not None else None, metrics)

    # ----------------------------------------------------------------- inference

    def _serve(self, env: dict[str, str]) -> None:
        host = self.plan.serve_host or self._ip
        if self.plan.command:
            port = _free_port(host)
            env = dict(env, PORT=str(port), HOST=host)
            with self._lock:
                self._endpoint = f"http://{host}:{port}"
            self._run_command(env)
            return
        if self.plan.entrypoint:
            factory = self._entry()
            if factory is None:
                return
            handler = factory(WorkerContext(self.plan, self, env))
        else:
            handler = _echo
        server = ThreadingHTTPServer((host, 0), _request_handler(self, handler))
        server.daemon_threads = True
        self._server = server
        with self._lock:
            self._endpoint = f"http://{host}:{server.server_address[1]}"
        self._set("running", f"serving at {self._endpoint}")
        server.serve_forever(poll_interval=0.2)
        server.server_close()
        self._set("failed", "stopped")

    def _enter(self) -> float:
        with self._lock:
            self._in_flight += 1
            self._requests += 1
        return time.monotonic()

    def _leave(self, entered: float) -> None:
        took = time.monotonic() - entered
        with self._lock:
            self._in_flight -= 1
            self._latency_total += took


def _echo(body: bytes) -> bytes:
    return body


def _request_handler(worker: GangWorker, handler: Callable[[bytes], Any]
                     ) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def _answer(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._answer(200, b"ok")
            else:
                self._handle(b"")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self._handle(self.rfile.read(length) if length > 0 else b"")

        def _handle(self, body: bytes) -> None:
            entered = worker._enter()
            try:
                out = handler(body)
                data = out.encode() if isinstance(out, str) else bytes(out)
                self._answer(200, data)
            except Exception as exc:
                self._answer(500, f"{type(exc).__name__}: {exc}".encode())
            finally:
                worker._leave(entered)

    return Handler
