"""``aifactory run --backend ray``: the sample jobs on a real Ray cluster, start to finish.

Connects to ``--address`` (or ``RAY_ADDRESS``), or starts a local Ray cluster of simulated GPU
nodes (default: 4 nodes x 8 H200 in 2 racks; ``--cluster`` takes a factory YAML of at most
16 nodes, since each is a raylet). Every job of ``--workload`` is submitted, as written, to a
real ``ControlPlane`` driving the ``RayBackend``; the command steps it until every training job
has finished (inference replicas keep serving until then), stops what still runs, and prints
where each job ran and how long it took from submission to all workers running.
InferenceServices with ``spec.autoscaling`` are autoscaled meanwhile on the requests in
flight their replicas report (``controller.runtime.scaler``), each change printed.

The samples run ``aifactory_examples`` (``examples/``, installed with this package). Three
flags add to every job's environment, and change nothing else: ``--fast`` sets
``AIFACTORY_FAST=1`` (the examples cut their steps, for a demo), ``--pythonpath`` (default
``$AIFACTORY_WORKER_PYTHONPATH``) appends folders to the workers' ``PYTHONPATH``, which is how
workers of a local cluster get PyTorch (``hack/install-torch.sh`` installs one outside the
virtualenv), and ``--env KEY=VALUE`` sets a variable.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aifactory.controller.backends.ray.demo import DEMO_NODES
from aifactory.controller.core.errors import AifactoryError
from aifactory.controller.core.spec import JobKind, JobSpec

__all__ = ["FAST_ENV", "WORKER_PYTHONPATH_ENV", "add_parser", "job_environment", "run",
           "with_environment"]

MAX_LOCAL_NODES = 16
IDLE_SECONDS = 3.0
FAST_ENV = "AIFACTORY_FAST"
WORKER_PYTHONPATH_ENV = "AIFACTORY_WORKER_PYTHONPATH"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def add_parser(sub: Any, default_workload: str) -> None:
    """Register ``aifactory run`` on the CLI's subparsers."""
    p = sub.add_parser("run", help="run jobs for real on a cluster backend (Ray)")
    p.add_argument("--backend", choices=("ray",), default="ray", help="execution backend")
    p.add_argument("--workload", default=None,
                   help=f"folder or file of TrainingJob/InferenceService manifests "
                        f"(default: {default_workload})")
    p.add_argument("--address", default=None,
                   help="Ray cluster to use (default: $RAY_ADDRESS, else a local cluster "
                        "of simulated GPU nodes)")
    p.add_argument("--cluster", default=None,
                   help="factory YAML for the local cluster (at most 16 nodes; default: "
                        "4 nodes x 8 H200 in 2 racks)")
    p.add_argument("--policy", default="aifactory", help="placement policy")
    p.add_argument("--fast", action="store_true",
                   help=f"a quick demo: sets {FAST_ENV}=1 for every job, and the "
                        "aifactory_examples programs cut their steps")
    p.add_argument("--pythonpath", action="append", default=None, metavar="DIR",
                   help="a folder added to every worker's PYTHONPATH (repeatable; default: "
                        f"${WORKER_PYTHONPATH_ENV}, {os.pathsep}-separated), e.g. "
                        "~/.cache/aifactory/torch from hack/install-torch.sh for the "
                        "training samples")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for every job (repeatable), e.g. STEPS=200")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="give up after this many seconds")
    p.add_argument("--ray-container-images", action="store_true",
                   help="the Ray nodes run container images (podman on every node): a "
                        "job's runtime.image becomes Ray's image_uri; without it such a job "
                        "fails with RuntimeImageUnsupported (--as-written)")
    p.add_argument("--checkpoint-root", default=None,
                   help="where gangs keep checkpoints (default: $AIFACTORY_CHECKPOINT_ROOT "
                        "or a temporary folder)")


def job_environment(args: argparse.Namespace) -> tuple[dict[str, str], tuple[str, ...]]:
    """What the flags add to every job: variables, and folders for ``PYTHONPATH``."""
    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.fullmatch(key):
            raise AifactoryError(f"--env: expected KEY=VALUE with KEY a variable name "
                                 f"(letters, digits, _), got {item!r}")
        env[key] = value
    if args.fast:
        env[FAST_ENV] = "1"
    given = args.pythonpath
    if given is None:
        given = [p for p in os.environ.get(WORKER_PYTHONPATH_ENV, "").split(os.pathsep) if p]
    folders = tuple(os.path.realpath(os.path.expanduser(p)) for p in given)
    for folder in folders:
        if not os.path.isdir(folder):
            raise AifactoryError(f"--pythonpath: {folder} is not a folder (for PyTorch, run "
                                 "hack/install-torch.sh: it installs ~/.cache/aifactory/torch)")
    return env, folders


def with_environment(spec: JobSpec, env: Mapping[str, str], pythonpath: Sequence[str]
                     ) -> JobSpec:
    """The job with ``env`` set over its own variables and ``pythonpath`` appended to its
    ``PYTHONPATH``; its entrypoint or command is untouched."""
    merged = dict(spec.runtime.env)
    merged.update(env)
    if pythonpath:
        own = [p for p in merged.get("PYTHONPATH", "").split(os.pathsep) if p]
        merged["PYTHONPATH"] = os.pathsep.join([*own, *pythonpath])
    if merged == dict(spec.runtime.env):
        return spec
    return replace(spec, runtime=replace(spec.runtime, env=tuple(merged.items())))


def _autoscaler(cp: Any, backend: Any, workload: Path, env: Mapping[str, str],
                pythonpath: Sequence[str]) -> Any:
    """The autoscaler over the workload's InferenceServices, fed by the replicas' own
    reports of requests in flight (the Ray backend ``ReportsLoad``)."""
    from aifactory.controller.core.spec import job_from_manifest
    from aifactory.controller.inputs.workload import load_manifest_docs
    from aifactory.controller.runtime.autoscale import policy_from_manifest
    from aifactory.controller.runtime.scaler import Autoscaler

    scaler = Autoscaler(cp, backend)
    for _, _, doc in load_manifest_docs(workload):
        if doc.get("kind") == JobKind.INFERENCE.value:
            service = with_environment(job_from_manifest(doc), env, pythonpath)
            scaler.track(service, policy_from_manifest(doc))
    return scaler


@dataclass(slots=True)
class _Timing:
    submitted: float
    running: float | None = None


def run(args: argparse.Namespace, workload: Path) -> int:
    from rich.console import Console

    from aifactory.controller.backends.base import WorkloadPhase
    from aifactory.controller.backends.ray.backend import make_ray_backend
    from aifactory.controller.inputs.factory import load_factory
    from aifactory.controller.inputs.workload import load_workload
    from aifactory.controller.runtime.controlplane import ControlPlane
    from aifactory.controller.runtime.resync import Reconciler

    console = Console(width=None if sys.stdout.isatty() else 160)
    env, pythonpath = job_environment(args)
    specs = [with_environment(a.spec, env, pythonpath) for a in load_workload(workload)]
    factory = load_factory(args.cluster) if args.cluster else None
    nodes = factory.nodes if factory is not None else DEMO_NODES
    if args.address is None and len(nodes) > MAX_LOCAL_NODES:
        raise AifactoryError(f"--cluster: a local Ray cluster runs one raylet per node; "
                             f"{len(nodes)} nodes is too many (at most {MAX_LOCAL_NODES})")
    scratch = None
    root = args.checkpoint_root or os.environ.get("AIFACTORY_CHECKPOINT_ROOT")
    if root is None:
        root = scratch = tempfile.mkdtemp(prefix="aifactory-run-")
    backend = make_ray_backend(args.address, local_nodes=nodes, checkpoint_root=root,
                               cpus_per_worker=0.05,
                               container_images=args.ray_container_images)
    try:
        if factory is None or args.address is not None:
            factory = backend.factory("ray")
        else:
            backend.bind(factory.topology())
        cp = ControlPlane(factory, backend, args.policy, topology=backend.topology)
        loop = Reconciler(cp, backend, lambda: backend.factory("ray"))
        console.print(f"[bold]ray[/] {cp.topo.describe()}; {len(specs)} jobs from {workload}")
        scaler = _autoscaler(cp, backend, workload, env, pythonpath)
        timing: dict[str, _Timing] = {}
        for spec in specs:
            cp.submit(spec)
            timing[spec.key] = _Timing(time.monotonic())
        deadline = time.monotonic() + args.timeout
        training = [s.key for s in specs if s.kind is JobKind.TRAINING]
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            loop.step()
            if scaler.cp is not loop.cp:
                scaler.rebind(loop.cp)
            for change in scaler.step():
                console.print(f"[bold]autoscaling[/] {change.service}: {change.reason}")
            for key, t in timing.items():
                status = backend.status(key)
                if t.running is None and status is not None and \
                        status.phase is WorkloadPhase.RUNNING:
                    t.running = time.monotonic()
            if any(loop.cp.jobs[k].placement is not None for k in training):
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > IDLE_SECONDS:
                break  # every training job is done or waits on GPUs services keep
            time.sleep(0.2)
        _print(console, loop.cp, backend, timing)
        for key, rec in list(loop.cp.jobs.items()):
            if not rec.done:
                loop.cp.cancel(key)
    finally:
        backend.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _print(console: Any, cp: Any, backend: Any, timing: dict[str, _Timing]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="aifactory run --backend ray")
    for header in ("job", "GPUs", "state", "nodes", "to running s", "restarts", "energy kJ",
                   "detail"):
        table.add_column(header, justify="right" if header in ("GPUs", "to running s",
                                                               "restarts", "energy kJ")
                         else "left")
    for key, rec in cp.jobs.items():
        t = timing.get(key)
        status = backend.status(key)
        placed = rec.placement
        nodes = sorted({cp.topo.nodes[s.node].name for s in placed.slots}) if placed else []
        if rec.done:
            state = rec.phase.lower()
        elif status is not None and status.phase.value == "Running":
            state = "running"
        else:
            state = "waiting" if placed is None else "starting"
        detail = rec.failed_reason or (status.message if status and placed else rec.reason)
        to_running = f"{t.running - t.submitted:.1f}" if t and t.running else "-"
        energy = status.energy_joules / 1e3 if status else 0.0
        table.add_row(key, f"{rec.spec.gpu_equivalents:g}", state,
                      ", ".join(nodes) or "-", to_running, str(rec.restarts),
                      f"{energy:.1f}", detail[:80])
    console.print(table)
    for key, rec in cp.jobs.items():  # the table cuts details; a failure is said in full
        if rec.done and rec.failed_reason:
            console.print(f"[red]{escape(key)}[/]: {escape(rec.failed_reason)}", highlight=False)
