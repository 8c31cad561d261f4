"""The Ray backend on a real Ray cluster of 4 simulated 8-GPU nodes in 2 racks.

::

    block b0
    ├── rack b0-r0: n-b0-r0-00, n-b0-r0-01
    └── rack b0-r1: n-b0-r1-00, n-b0-r1-01      (8 GPUs each; head node without GPUs)

Every test drives a real ``ControlPlane`` with the ``RayBackend``; workers run the programs
in ``tests/integration/ray_programs.py`` and write what they saw into their checkpoint
directory. After each test nothing of ours may remain on the cluster.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from aifactory.controller.backends.base import WorkloadPhase  # noqa: E402
from aifactory.controller.backends.ray.backend import RayBackend  # noqa: E402
from aifactory.controller.core.spec import JobKind, JobSpec, Runtime  # noqa: E402
from aifactory.controller.core.topology import RACK_LABEL  # noqa: E402
from aifactory.controller.runtime.autoscale import AutoscalePolicy, replica_changes  # noqa: E402
from aifactory.controller.runtime.controlplane import ControlPlane, JobPhase, JobRecord  # noqa: E402
from aifactory.controller.runtime.resync import Reconciler, adopt_running  # noqa: E402
from aifactory.controller.runtime.scaler import Autoscaler, replicas_of  # noqa: E402
from tests.integration.ray_env import NODES, leftovers, wait_for  # noqa: E402

pytestmark = pytest.mark.integration
PROGRAMS = "tests.integration.ray_programs"


def job(name: str, workers: int, gpus: int, program: str = "where",
        env: dict[str, str] | None = None, **kw: Any) -> JobSpec:
    return JobSpec(name=name, workers=workers, gpus_per_worker=gpus, namespace="it",
                   runtime=Runtime(entrypoint=f"{PROGRAMS}:{program}",
                                   env=tuple((env or {}).items())), **kw)


def make_backend(root: Path) -> RayBackend:
    return RayBackend(checkpoint_root=str(root), cpus_per_worker=0.1, serve_host="127.0.0.1",
                      start_timeout_seconds=30, poll_interval_seconds=0.05)


def plane_for(backend: RayBackend) -> ControlPlane:
    return ControlPlane(backend.factory("it"), backend, "aifactory",
                        topology=backend.topology)


@pytest.fixture
def backend(ray_cluster: Any, tmp_path: Path) -> Iterator[RayBackend]:
    b = make_backend(tmp_path)
    yield b
    b.close()
    left: list[str] = []
    end = time.monotonic() + 10
    while time.monotonic() < end:
        left = leftovers()
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"left on the cluster: {left}"


@pytest.fixture
def plane(backend: RayBackend) -> ControlPlane:
    return plane_for(backend)


def chosen_nodes(cp: ControlPlane) -> dict[str, list[str]]:
    """Node names per rank of every job, as the scheduler chose them at admission."""
    seen: dict[str, list[str]] = {}

    def on(reason: str, rec: JobRecord, message: str) -> None:
        if reason == "Admitted" and rec.placement is not None:
            seen[rec.spec.key] = [cp.topo.nodes[s.node].name for s in rec.placement.slots]

    cp.listeners.append(on)
    return seen


def reports(root: Path, spec: JobSpec, prefix: str = "where", attempt: int = 0
            ) -> list[dict[str, Any]]:
    folder = root / spec.namespace / spec.name
    return [json.loads((folder / f"{prefix}-{attempt}-{r}.json").read_text())
            for r in range(spec.workers)]


def finished(cp: ControlPlane, *keys: str) -> bool:
    return all(cp.jobs[k].done for k in keys)


def test_every_bundle_lands_on_the_node_the_scheduler_chose(
        plane: ControlPlane, backend: RayBackend, tmp_path: Path) -> None:
    spread = job("spread", workers=3, gpus=8)
    chosen = chosen_nodes(plane)
    plane.submit(spread)
    wait_for(plane.step, lambda: finished(plane, spread.key), what="spread to finish")
    assert plane.jobs[spread.key].phase == JobPhase.SUCCEEDED
    ids = {n.info.name: n.node_id for n in backend.ray_nodes(fresh=True)}
    seen = reports(tmp_path, spread)
    assert [r["node_id"] for r in seen] == [ids[name] for name in chosen[spread.key]]
    assert len(set(chosen[spread.key])) == 3
    envs = [r["env"] for r in seen]
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"}
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
    assert {e["LOCAL_RANK"] for e in envs} == {"0"}


def test_cuda_visible_devices_differ_between_two_workers_on_one_node(
        plane: ControlPlane, backend: RayBackend, tmp_path: Path) -> None:
    pair = job("pair", workers=2, gpus=4, required_level="node")
    plane.submit(pair)
    wait_for(plane.step, lambda: finished(plane, pair.key), what="pair to finish")
    first, second = (r["env"] for r in reports(tmp_path, pair))
    gpus = [set(e["CUDA_VISIBLE_DEVICES"].split(",")) for e in (first, second)]
    assert len(gpus[0]) == len(gpus[1]) == 4
    assert not gpus[0] & gpus[1]
    assert (first["LOCAL_RANK"], second["LOCAL_RANK"]) == ("0", "1")
    assert first["LOCAL_WORLD_SIZE"] == second["LOCAL_WORLD_SIZE"] == "2"


def placed_gpus(cp: ControlPlane) -> dict[str, list[str]]:
    """``CUDA_VISIBLE_DEVICES`` per rank of every job, as the scheduler's placement says."""
    seen: dict[str, list[str]] = {}

    def on(reason: str, rec: JobRecord, message: str) -> None:
        if reason == "Admitted" and rec.placement is not None:
            seen[rec.spec.key] = [",".join(str(g - cp.topo.gpu_start[s.node]) for g in s.gpus)
                                  for s in rec.placement.slots]

    cp.listeners.append(on)
    return seen


def test_gangs_start_on_pre_started_workers_and_a_process_runs_one_job(
        plane: ControlPlane, backend: RayBackend, tmp_path: Path) -> None:
    """The pool: a gang's workers are processes started before it was submitted, on the
    nodes the scheduler chose, with the placement's GPUs visible; the next gang gets other
    processes (a process never runs a second job), also pre-started (the pool refilled)."""
    assert backend.pool is not None
    full = backend.pool.per_node * len(NODES)
    chosen, gpus = chosen_nodes(plane), placed_gpus(plane)
    ids = {n.info.name: n.node_id for n in backend.ray_nodes(fresh=True)}
    seen: list[list[dict[str, Any]]] = []
    for name in ("first", "second"):
        spec = job(name, workers=3, gpus=4)
        wait_for(lambda: backend.refresh(force=True),
                 lambda: backend.pool is not None and backend.pool.warm() and
                 backend.pool.size() == full, what="the pool full")
        submitted = time.time()
        plane.submit(spec)
        wait_for(plane.step, lambda: finished(plane, spec.key),  # noqa: B023
                 what=f"{name} to finish")
        assert plane.jobs[spec.key].phase == JobPhase.SUCCEEDED
        got = reports(tmp_path, spec)
        assert all(r["process_started"] < submitted for r in got)
        assert [r["node_id"] for r in got] == [ids[n] for n in chosen[spec.key]]
        assert [r["env"]["CUDA_VISIBLE_DEVICES"] for r in got] == gpus[spec.key]
        seen.append(got)
    assert not {r["pid"] for r in seen[0]} & {r["pid"] for r in seen[1]}


def test_without_the_pool_workers_are_created_in_their_bundles(
        ray_cluster: Any, tmp_path: Path) -> None:
    """``prestart_per_node=0`` (and jobs with a runtime environment): each worker is a named
    actor created inside its bundle, with the placement's GPUs visible all the same."""
    backend = RayBackend(checkpoint_root=str(tmp_path), cpus_per_worker=0.1,
                         start_timeout_seconds=30, poll_interval_seconds=0.05,
                         prestart_per_node=0)
    try:
        plane = plane_for(backend)
        gpus = placed_gpus(plane)
        spec = job("own", workers=2, gpus=4, required_level="node",
                   env={"HOLD_SECONDS": "60"})
        plane.submit(spec)
        wait_for(plane.step, lambda: backend.status(spec.key) is not None and
                 backend.status(spec.key).phase is WorkloadPhase.RUNNING,  # type: ignore[union-attr]
                 what="the gang running")
        assert backend.pool is None
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        assert {"aifactory/it/own/w0", "aifactory/it/own/w1"} <= names
        assert not any(n.startswith("aifactory/_pool/") for n in names)
        got = reports(tmp_path, spec)
        assert [r["env"]["CUDA_VISIBLE_DEVICES"] for r in got] == gpus[spec.key]
        plane.cancel(spec.key)
    finally:
        backend.close()
    wait_for(lambda: None, lambda: not leftovers(), timeout=10, what="cleanup")


def test_a_rack_required_gang_runs_inside_one_rack(
        plane: ControlPlane, backend: RayBackend, tmp_path: Path) -> None:
    filler = job("filler", workers=1, gpus=4, env={"HOLD_SECONDS": "60"})
    gang = job("rack-gang", workers=2, gpus=8, required_level="rack")
    plane.submit(filler)
    wait_for(plane.step, lambda: backend.status(filler.key) is not None and
             backend.status(filler.key).phase is WorkloadPhase.RUNNING,  # type: ignore[union-attr]
             what="filler running")
    snapshot = backend.telemetry()
    assert snapshot.source == "model"  # no GPU here: the power model, not NVML
    busy = [g for g in snapshot.gpus if filler.key in g.jobs]
    idle = [g for g in snapshot.gpus if not g.jobs]
    assert len(busy) == 4 and len(snapshot.gpus) == 32
    assert min(g.power_watts for g in busy) > max(g.power_watts for g in idle)

    plane.submit(gang)
    wait_for(plane.step, lambda: finished(plane, gang.key), what="rack gang to finish")
    rack_of = {n.name: n.label(RACK_LABEL) for n in NODES}
    name_of = {n.node_id: n.info.name for n in backend.ray_nodes(fresh=True)}
    filler_node = name_of[reports(tmp_path, filler)[0]["node_id"]]
    gang_nodes = [name_of[r["node_id"]] for r in reports(tmp_path, gang)]
    assert len(set(gang_nodes)) == 2
    assert {rack_of[n] for n in gang_nodes} == {next(r for r in set(rack_of.values())
                                                     if r != rack_of[filler_node])}
    assert (backend.status(filler.key).energy_joules or 0) > 0  # type: ignore[union-attr]
    plane.cancel(filler.key)


def test_losing_a_node_restarts_the_gang_elsewhere_from_its_checkpoint(
        plane: ControlPlane, backend: RayBackend, ray_cluster: Any, tmp_path: Path) -> None:
    trainer = job("trainer", workers=2, gpus=4, program="steps", restart_limit=2,
                  env={"STEPS": "40", "CHECKPOINT_EVERY": "5", "STEP_SECONDS": "0.1"})
    loop = Reconciler(plane, backend)
    chosen = chosen_nodes(plane)
    plane.submit(trainer)
    latest = tmp_path / "it" / "trainer" / "LATEST"
    wait_for(loop.step, latest.exists, what="a first checkpoint")
    victim = chosen[trainer.key][0]
    dead_id = {n.info.name: n.node_id for n in backend.ray_nodes(fresh=True)}[victim]
    ray_cluster.remove_node(victim)
    try:
        wait_for(loop.step, lambda: finished(plane, trainer.key), timeout=60,
                 what="the trainer to recover and finish")
        rec = plane.jobs[trainer.key]
        assert rec.phase == JobPhase.SUCCEEDED, rec.failed_reason
        assert rec.restarts == 1, rec.history
        assert victim not in chosen[trainer.key]
        folder = tmp_path / "it" / "trainer"
        last = max(int(f.name.split("-")[1]) for f in folder.glob("start-*-0.json"))
        assert last >= 1  # (a launch onto the node a moment after it left is attempt 1)
        resumed = reports(tmp_path, trainer, prefix="start", attempt=last)
        assert all(r["start"] >= 5 for r in resumed)
        assert all(r["node_id"] != dead_id for r in resumed)
    finally:
        ray_cluster.add_node(next(n for n in NODES if n.name == victim))


def test_losing_one_node_of_a_gang_moves_only_that_worker(
        plane: ControlPlane, backend: RayBackend, ray_cluster: Any, tmp_path: Path) -> None:
    """Hot swap on Ray: the survivor keeps its node, the lost worker goes to a spare, and
    both resume from the gang's checkpoint."""
    trainer = job("swapped", workers=2, gpus=8, program="steps", restart_limit=2,
                  env={"STEPS": "40", "CHECKPOINT_EVERY": "5", "STEP_SECONDS": "0.1"})
    loop = Reconciler(plane, backend)
    repaired: list[str] = []
    plane.listeners.append(lambda reason, rec, message: repaired.append(message)
                           if reason == "Repaired" else None)
    plane.submit(trainer)
    latest = tmp_path / "it" / "swapped" / "LATEST"
    wait_for(loop.step, latest.exists, what="a first checkpoint")
    rec = plane.jobs[trainer.key]
    assert rec.placement is not None
    before = [plane.topo.nodes[s.node].name for s in rec.placement.slots]
    assert len(set(before)) == 2  # 8 GPUs a worker: one node each
    victim, survivor = before
    ray_cluster.remove_node(victim)
    try:
        wait_for(loop.step, lambda: bool(repaired) or rec.placement is None, timeout=60,
                 what="the hot swap")
        assert repaired, rec.history  # not requeued whole
        assert rec.placement is not None
        after = [plane.topo.nodes[s.node].name for s in rec.placement.slots]
        assert survivor in after and victim not in after
        wait_for(loop.step, lambda: finished(plane, trainer.key), timeout=90,
                 what="the repaired gang to finish")
        assert rec.phase == JobPhase.SUCCEEDED, rec.failed_reason
        assert rec.restarts == 1 and "hot swap moved 1 worker(s)" in repaired[0], rec.history
        resumed = reports(tmp_path, trainer, prefix="start", attempt=1)
        assert all(r["start"] >= 5 for r in resumed)  # from the checkpoint, not step 0
    finally:
        ray_cluster.add_node(next(n for n in NODES if n.name == victim))


def test_a_restarted_control_plane_adopts_running_gangs_without_twins(
        ray_cluster: Any, tmp_path: Path) -> None:
    long = job("long", workers=2, gpus=4, env={"HOLD_SECONDS": "120"})
    first = make_backend(tmp_path)
    cp = plane_for(first)
    cp.submit(long)
    wait_for(cp.step, lambda: first.status(long.key) is not None and
             first.status(long.key).phase is WorkloadPhase.RUNNING,  # type: ignore[union-attr]
             what="the gang running")
    before = {r.rank: (r.pid, r.node) for r in first.workers(long.key)}
    placement = cp.jobs[long.key].placement
    # The operator dies: its driver disconnects; detached actors and the group live on.
    ray.shutdown()
    ray.init(address=ray_cluster.address, namespace="aifactory", log_to_driver=False)
    second = make_backend(tmp_path)
    cp2 = plane_for(second)
    try:
        report = adopt_running(cp2, second, {long.key: long})
        assert report.adopted == (long.key,)
        for _ in range(5):
            cp2.step()
        assert cp2.jobs[long.key].phase == JobPhase.RUNNING
        assert cp2.jobs[long.key].placement == placement
        assert {r.rank: (r.pid, r.node) for r in second.workers(long.key)} == before
        ours = [v for v in ray.util.placement_group_table().values()
                if v["name"] == f"aifactory/{long.key}" and v["state"] != "REMOVED"]
        assert len(ours) == 1
    finally:
        cp2.cancel(long.key)
        second.close()
    wait_for(lambda: None, lambda: not leftovers(), timeout=10, what="cleanup")


def test_a_failing_command_keeps_its_output_and_fails_the_job(
        plane: ControlPlane, backend: RayBackend) -> None:
    script = ("import os, sys; print('hello from rank', os.environ['RANK']); "
              "print('AIFACTORY_REPORT {\"progress\": 0.25}'); sys.exit(3)")
    spec = JobSpec(name="crash", workers=1, gpus_per_worker=1, namespace="it",
                   restart_limit=0, runtime=Runtime(command=(sys.executable, "-c", script)))
    plane.submit(spec)
    wait_for(plane.step, lambda: finished(plane, spec.key), what="the command to fail")
    rec = plane.jobs[spec.key]
    assert rec.phase == JobPhase.FAILED
    assert "command exited with code 3" in (rec.failed_reason or "")
    assert "hello from rank 0" in backend.logs(spec.key)


def test_inference_replicas_report_requests_in_flight_and_the_autoscaler_scales_out(
        plane: ControlPlane, backend: RayBackend) -> None:
    """The autoscaler on Ray: replicas report their requests in flight, a sync scales out
    at most doubling, new replicas serve on their own endpoints, and when the load is gone
    the replicas come back down to the minimum (no stabilization window here)."""
    service = JobSpec(name="chat", kind=JobKind.INFERENCE, namespace="it", workers=1,
                      gpus_per_worker=1, group="it/chat", restart_limit=100,
                      runtime=Runtime(entrypoint=f"{PROGRAMS}:slow_echo",
                                      env=(("DELAY_SECONDS", "3.0"),)))
    policy = AutoscalePolicy(min_replicas=1, max_replicas=3, target_in_flight=1,
                             scale_down_stabilization_seconds=0)
    scaler = Autoscaler(plane, backend)
    (first,) = replica_changes(service, [], scaler.track(service, policy))[0]
    plane.submit(first)
    key = first.key
    wait_for(plane.step, lambda: bool(backend.endpoints(key)), what="replica serving")
    (endpoint,) = backend.endpoints(key)
    answers: list[bytes] = []

    def ask(i: int) -> None:
        req = urllib.request.Request(endpoint, data=f"q{i}".encode(), method="POST")
        with urllib.request.urlopen(req, timeout=20) as resp:
            answers.append(resp.read())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    wait_for(plane.step, lambda: (load := backend.replica_load(key)) is not None and
             load.in_flight == 3, timeout=5, what="3 requests in flight")
    changes = scaler.step(force=True)
    assert [c.replicas_to for c in changes] == [2], changes  # at most doubling
    assert scaler.step(force=True)[0].replicas_to == 3
    keys = [r.spec.key for r in replicas_of(plane, "it/chat")]
    assert len(keys) == 3
    wait_for(plane.step, lambda: all(backend.endpoints(k) for k in keys),
             what="3 replicas serving")
    view = scaler.view("it/chat")
    assert view is not None and view.ready == 3 and len(set(view.endpoints)) == 3
    for t in threads:
        t.join()
    assert sorted(answers) == [b"rank0:q0", b"rank0:q1", b"rank0:q2"]
    wait_for(plane.step, lambda: (v := scaler.view("it/chat")) is not None and
             v.requests_total >= 3 and v.latency_seconds_total >= 9.0,
             what="the answered requests counted")
    down = scaler.step(force=True)  # no load now: back to the minimum at once
    assert down and down[-1].replicas_to == 1, down
    assert [r.spec.key for r in replicas_of(plane, "it/chat")] == [key]
    plane.cancel(key)


def test_a_grid_cap_goes_to_each_gpu_of_the_gang_and_is_reset_when_it_ends(
        ray_cluster: Any, tmp_path: Path) -> None:
    """Curtailment's in-place cap on Ray: every GPU of the gang gets the limit through the
    actuator (a recording fake here: no GPU's settings change in tests), the power model
    follows, lifting the cap resets the limits, and so does the gang's end."""
    from aifactory.controller.backends.actuators import RecordingActuator

    actuator = RecordingActuator()
    backend = RayBackend(checkpoint_root=str(tmp_path), cpus_per_worker=0.1,
                         serve_host="127.0.0.1", start_timeout_seconds=30,
                         poll_interval_seconds=0.05, actuator=actuator)
    try:
        plane = plane_for(backend)
        capped = job("capped", workers=2, gpus=4, env={"HOLD_SECONDS": "60"})
        plane.submit(capped)
        wait_for(plane.step, lambda: backend.status(capped.key) is not None and
                 backend.status(capped.key).phase is WorkloadPhase.RUNNING,  # type: ignore[union-attr]
                 what="the gang running")
        rec = plane.jobs[capped.key]
        assert rec.placement is not None
        gpus = {(plane.topo.nodes[s.node].name, g - plane.topo.gpu_start[s.node])
                for s in rec.placement.slots for g in s.gpus}
        plane.recap(rec, 300.0, "capped to 300 W per GPU for grid event test")
        assert actuator.limits == dict.fromkeys(gpus, 300.0)
        power = {(g.node, g.index): g.power_watts for g in backend.telemetry().gpus}
        assert all(power[k] <= 300.0 + 1e-6 for k in gpus)
        plane.recap(rec, None, "power cap restored")
        assert actuator.limits == {}
        plane.recap(rec, 450.0, "capped again")
        plane.cancel(capped.key)  # the gang ends capped: its GPUs are reset
        assert actuator.limits == {}
        assert {(n, i) for n, i, w in actuator.calls if w is None} == gpus
    finally:
        backend.close()
