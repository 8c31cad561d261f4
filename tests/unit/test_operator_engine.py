"""The engine without a cluster: requests in, status patches and Events out.

A fake API client records what would be written; a manual clock moves simulated time; each
test drives ``Engine.iterate()`` by hand. The factory (16 GPUs)::

    factory
    └── b0: b0-r0 (n-b0-r0-00, n-b0-r0-01), 8 GPUs each
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

import pytest

from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.runtime.clock import WallClock as SimClock
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.operators.books import EngineOptions
from aifactory.operators.engine import Engine
from aifactory.operators.startup import recover
from tests.factories import RecordingBackend, grid_nodes

NODES = grid_nodes(1, 1, 2)


class ManualClock(SimClock):
    """Simulated time that moves only when a test says so."""

    def __init__(self) -> None:
        super().__init__(1.0)
        self.t = 1_790_000_000.0

    def __call__(self) -> float:
        return self.t


class FakeKube:
    """Stands in for aifactory.operators.kube.KubeClient; nothing here touches the network."""

    async def patch_status(self, *args: Any) -> None:
        raise AssertionError("the writers are not started in unit tests")

    async def post_event(self, *args: Any) -> None:
        raise AssertionError("the writers are not started in unit tests")

    async def close(self) -> None:
        pass


def _engine(clock: ManualClock | None = None) -> Engine:
    clock = clock or ManualClock()
    factory = replace(factory_from_nodes("t", NODES), queues=())
    topo = factory.topology()
    cp = ControlPlane(factory, SimulatedBackend(topo.nodes, clock), clock=clock, topology=topo)
    return Engine(cp, FakeKube(), clock, EngineOptions())  # type: ignore[arg-type]


def _job(name: str, uid: str = "", generation: int = 1, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "aifactory.io/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": name, "namespace": "ns", "uid": uid or f"uid-{name}",
                         "generation": generation,
                         "creationTimestamp": "2026-09-21T14:13:20Z"},
            "spec": {"workers": 1, "gpusPerWorker": 1, "queue": "default", **spec}}


def _status(engine: Engine, name: str, kind: str = "TrainingJob") -> dict[str, Any]:
    status = engine.outbox.queued_status((kind, "ns", name))
    assert status is not None, f"no status queued for {name}"
    return dict(status)


def _reasons(engine: Engine) -> list[str]:
    return [reason for _, _, reason, _ in engine.outbox.queued_events()]


def test_a_job_is_placed_and_its_status_and_event_say_where() -> None:
    engine = _engine()
    engine.apply_job("TrainingJob", _job("a", workers=2, gpusPerWorker=8))
    engine.iterate()
    status = _status(engine, "a")
    assert status["phase"] == "Running" and status["gpus"] == 16
    assert status["span"] == "rack b0-r0"
    assert [w["gpus"] for w in status["placement"]["workers"]] == [list(range(8))] * 2
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Queued": "False", "Admitted": "True", "Running": "True"}
    assert status["powerWatts"] > 0
    assert "Admitted" in _reasons(engine)


def test_handlers_are_idempotent() -> None:
    engine = _engine()
    for _ in range(3):
        engine.apply_job("TrainingJob", _job("a"))
        engine.iterate()
    assert list(engine.cp.jobs) == ["ns/a"]
    assert _reasons(engine).count("Admitted") == 1


def test_a_spec_the_core_refuses_fails_with_its_reason() -> None:
    engine = _engine()
    engine.apply_job("TrainingJob", _job("bad", runtime={"entrypoint": "train.py"}))
    engine.iterate()
    status = _status(engine, "bad")
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.runtime.entrypoint: must look like 'package.module:function'" in \
        failed["message"]
    assert "InvalidSpec" in _reasons(engine) and not engine.cp.jobs


def test_a_finished_job_reports_energy_cost_and_its_gpus_free() -> None:
    clock = ManualClock()
    engine = _engine(clock)
    engine.apply_job("TrainingJob", _job("a", gpusPerWorker=8, expectedRuntimeSeconds=60))
    engine.apply_job("TrainingJob", _job("b", gpusPerWorker=8, expectedRuntimeSeconds=600))
    engine.apply_job("TrainingJob", _job("c", gpusPerWorker=8))
    engine.iterate()
    assert _status(engine, "c")["phase"] == "Queued"
    clock.t += 61
    engine.iterate()
    done = _status(engine, "a")
    assert done["phase"] == "Succeeded"
    assert done["energyJoules"] > 8 * 60 * 100 and done["costDollars"] > 0
    assert done["gpuHours"] == pytest.approx(8 * 60 / 3600, rel=1e-3)
    assert done["completionTime"] > done["startedAt"]
    assert _status(engine, "c")["phase"] == "Running"  # took the freed GPUs


def test_deleting_releases_the_gpus_before_the_handler_returns() -> None:
    engine = _engine()
    engine.apply_job("TrainingJob", _job("a", gpusPerWorker=8, workers=2))
    engine.iterate()
    assert engine.cp.state.allocated_gpu_equivalents == 16

    async def delete() -> None:
        task = asyncio.ensure_future(engine.delete_job("TrainingJob", "ns", "a", "uid-a"))
        await asyncio.sleep(0)
        engine.iterate()
        await task

    asyncio.run(delete())
    assert engine.cp.state.allocated_gpu_equivalents == 0 and not engine.cp.jobs


def test_preemption_marks_the_victim_and_names_the_preemptor() -> None:
    engine = _engine()
    engine.apply_job("TrainingJob", _job("low", workers=2, gpusPerWorker=8, priority=0))
    engine.iterate()
    engine.apply_job("TrainingJob", _job("high", workers=1, gpusPerWorker=8, priority=10))
    engine.iterate()
    low = _status(engine, "low")
    assert low["phase"] == "Queued" and low["preemptions"] == 1 and low["placement"] is None
    preempted = next(c for c in low["conditions"] if c["type"] == "Preempted")
    assert preempted["status"] == "True" and "preempted by ns/high" in preempted["message"]
    assert _status(engine, "high")["phase"] == "Running"


def test_an_inference_service_scales_down_from_its_highest_replica() -> None:
    engine = _engine()
    service: dict[str, Any] = {"apiVersion": "aifactory.io/v1alpha1", "kind": "InferenceService",
               "metadata": {"name": "s", "namespace": "ns", "uid": "u", "generation": 1},
               "spec": {"model": "m", "gpusPerReplica": 2, "maxReplicas": 4, "replicas": 4,
                        "queue": "default"}}
    engine.apply_job("InferenceService", service)
    engine.iterate()
    assert _status(engine, "s", "InferenceService")["replicas"] == 4
    service["metadata"]["generation"] = 2
    service["spec"]["replicas"] = 2
    engine.apply_job("InferenceService", service)
    engine.iterate()
    status = _status(engine, "s", "InferenceService")
    assert (status["replicas"], status["desiredReplicas"]) == (2, 2)
    assert sorted(w["replica"] for w in status["placement"]["workers"]) == [0, 1]
    assert sorted(engine.cp.jobs) == ["ns/s:r0", "ns/s:r1"]


def test_queues_and_budgets_from_objects_reach_the_scheduler() -> None:
    engine = _engine()
    engine.apply_config("GPUQueue", {"metadata": {"name": "gold", "uid": "q", "generation": 1},
                                     "spec": {"nominalGPUs": 16}}, deleted=False)
    engine.apply_job("TrainingJob", _job("lost", queue="silver"))
    engine.iterate()
    waiting = next(c for c in _status(engine, "lost")["conditions"] if c["type"] == "Queued")
    assert waiting["reason"] == "QuotaExceeded"
    assert "queue 'silver' does not exist; known queues: gold" in waiting["message"]
    idle = engine.cp.state.budget_watts  # no budget yet
    assert idle == []
    engine.apply_config("PowerBudget", {"metadata": {"name": "tight", "uid": "b",
                                                     "generation": 1},
                                        "spec": {"watts": 2000}}, deleted=False)
    engine.apply_job("TrainingJob", _job("hungry", queue="gold", gpusPerWorker=8))
    engine.iterate()
    hungry = _status(engine, "hungry")
    assert hungry["phase"] == "Queued"
    assert next(c for c in hungry["conditions"] if c["type"] == "Queued")["reason"] == \
        "PowerBudgetExceeded"
    engine.apply_config("PowerBudget", {"metadata": {"name": "tight", "uid": "b"}},
                        deleted=True)
    engine.iterate()
    assert _status(engine, "hungry")["phase"] == "Running"


def _as_listed(engine: Engine, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the API server would list after the engine's statuses were written."""
    return [{**d, "status": _status(engine, d["metadata"]["name"])} for d in docs]


def test_restart_adopts_running_jobs_where_they_ran_and_requeues_the_rest() -> None:
    clock = ManualClock()
    first = _engine(clock)
    docs = [_job("a", gpusPerWorker=8, expectedRuntimeSeconds=600),
            _job("b", gpusPerWorker=4, expectedRuntimeSeconds=600), _job("c", gpusPerWorker=8)]
    for doc in docs:
        first.apply_job("TrainingJob", doc)
    first.iterate()
    listed = _as_listed(first, docs)
    clock.t += 30
    second = _engine(clock)
    report = recover(second, listed)
    assert (report.adopted, report.requeued, report.conflicts) == (2, 1, [])
    for name in ("a", "b"):
        rec = second.cp.jobs[f"ns/{name}"]
        assert rec.placement == first.cp.jobs[f"ns/{name}"].placement
    second.iterate()
    assert second.cp.jobs["ns/c"].placement is None  # no room: nothing placed twice
    second.cp.state.check_consistency()
    # The simulated work carried on: 30 of 600 s were done while nobody watched.
    status = second.cp.backend.status("ns/a")
    assert status is not None and status.progress == pytest.approx(30 / 600, abs=1e-6)


def test_restart_refuses_two_jobs_recorded_on_one_gpu() -> None:
    first = _engine()
    doc = _job("a", gpusPerWorker=8)
    first.apply_job("TrainingJob", doc)
    first.iterate()
    listed = _as_listed(first, [doc])
    twin = {**listed[0], "metadata": {**listed[0]["metadata"], "name": "twin", "uid": "t"}}
    second = _engine()
    report = recover(second, [*listed, twin])
    assert report.adopted == 1 and len(report.conflicts) == 1
    assert "would be 2000/1000 used" in report.conflicts[0]
    assert "PlacementConflict" in _reasons(second)
    second.iterate()
    second.cp.state.check_consistency()
    assert second.cp.jobs["ns/twin"].placement is not None  # requeued, placed elsewhere
    assert second.cp.jobs["ns/twin"].placement != second.cp.jobs["ns/a"].placement


def test_a_finished_training_job_is_forgotten_after_its_retention() -> None:
    clock = ManualClock()
    factory = replace(factory_from_nodes("t", NODES), queues=())
    topo = factory.topology()
    backend = SimulatedBackend(topo.nodes, clock)
    cp = ControlPlane(factory, backend, clock=clock, topology=topo)
    engine = Engine(cp, FakeKube(), clock,  # type: ignore[arg-type]
                    EngineOptions(finished_retention_seconds=0.0))
    doc = _job("a", gpusPerWorker=8, expectedRuntimeSeconds=60)
    engine.apply_job("TrainingJob", doc)
    engine.iterate()
    clock.t += 61
    engine.iterate()
    final = _status(engine, "a")
    assert final["phase"] == "Succeeded" and "ns/a" in cp.jobs  # written, then kept a while
    engine.iterate()  # the retention (0 s here) is over
    assert not cp.jobs and backend.status("ns/a") is None
    assert "ns/a" not in cp.metrics.job_gpu_seconds and not engine.objects
    # kopf delivers the object again (say, a resync): its final status says it is done.
    engine.apply_job("TrainingJob", {**doc, "status": final})
    engine.iterate()
    assert not cp.jobs and _reasons(engine).count("Admitted") == 1

    async def delete() -> None:  # and deleting it has nothing left to release
        task = asyncio.ensure_future(engine.delete_job("TrainingJob", "ns", "a", "uid-a"))
        await asyncio.sleep(0)
        engine.iterate()
        await asyncio.wait_for(task, 1)

    asyncio.run(delete())
    assert not engine.objects and not cp.jobs


def test_the_engine_waits_for_a_scrape_without_blocking_its_event_loop() -> None:
    engine = _engine()

    async def main() -> tuple[float, float]:
        engine.lock.acquire()  # a scrape is reading the plane
        loop = asyncio.create_task(engine._run())
        engine.apply_job("TrainingJob", _job("a"))
        await asyncio.sleep(0.2)  # this coroutine runs: the event loop is not blocked
        during = engine.stats["iterations"]
        engine.lock.release()
        await asyncio.sleep(0.2)
        after = engine.stats["iterations"]
        engine._stopping = True
        engine._wake.set()
        await loop
        return during, after

    during, after = asyncio.run(main())
    assert during == 0 and after >= 1
    assert engine.cp.jobs["ns/a"].placement is not None


class Finder(SimulatedBackend):
    """A simulated backend that also finds gangs still running after a restart, as Ray's
    detached placement groups are found; it records what start-up does with them."""

    def __init__(self, nodes: Any, clock: Any, gangs: list[Any]) -> None:
        super().__init__(nodes, clock)
        self.gangs = gangs
        self.adopted: list[str] = []
        self.discarded: list[str] = []
        self.launched: list[str] = []

    def adoptable(self) -> list[Any]:
        return list(self.gangs)

    def adopt(self, spec: Any, gang: Any) -> None:
        self.adopted.append(gang.job)

    def discard(self, gang: Any) -> None:
        self.discarded.append(gang.job)

    def launch(self, spec: Any, placement: Any, work_done: float = 0.0) -> None:
        self.launched.append(spec.key)
        super().launch(spec, placement, work_done=work_done)


@dataclass(frozen=True)
class Gang:
    job: str
    slots: tuple[tuple[str, tuple[int, ...], int], ...]
    started_at: float


def test_restart_adopts_what_the_backend_finds_running_and_removes_the_rest() -> None:
    clock = ManualClock()
    first = _engine(clock)
    docs = [_job("a", gpusPerWorker=8), _job("lost", gpusPerWorker=4), _job("late")]
    for doc in docs[:2]:
        first.apply_job("TrainingJob", doc)
    first.iterate()
    listed = [*_as_listed(first, docs[:2]), docs[2]]  # late: died before writing Running
    a_node = first.cp.jobs["ns/a"].placement.slots[0].node  # type: ignore[union-attr]
    other = NODES[1 - a_node].name  # where a really runs (the backend knows best)
    gangs = [Gang("ns/a", ((other, tuple(range(8)), 1000),), clock.t - 5),
             Gang("ns/late", ((NODES[a_node].name, (7,), 1000),), clock.t - 1),
             Gang("ns/deleted", ((NODES[a_node].name, (6,), 1000),), clock.t - 9)]
    factory = replace(factory_from_nodes("t", NODES), queues=())
    topo = factory.topology()
    backend = Finder(topo.nodes, clock, gangs)
    cp = ControlPlane(factory, backend, clock=clock, topology=topo)
    second = Engine(cp, FakeKube(), clock, EngineOptions())  # type: ignore[arg-type]
    report = recover(second, listed)
    assert (report.adopted, report.requeued, report.removed) == (2, 1, ["ns/deleted"])
    assert backend.adopted == ["ns/a", "ns/late"] and backend.discarded == ["ns/deleted"]
    assert [cp.topo.nodes[s.node].name for s in cp.jobs["ns/a"].placement.slots] == [other]  # type: ignore[union-attr]
    # a keeps the start its status recorded; late, never recorded, its workers' start.
    assert cp.jobs["ns/a"].started_at == pytest.approx(first.cp.jobs["ns/a"].started_at)
    assert cp.jobs["ns/late"].started_at == clock.t - 1
    assert "its status says it runs, but the backend has no gang for it" in \
        report.conflicts[0] and report.conflicts[0].startswith("ns/lost")
    second.iterate()
    assert backend.launched == ["ns/lost"]  # adopted gangs are never launched again
    # a's status still shows it on a_node until its move is written: late (on a_node's
    # GPU 7) is shown Running only after that write lands.
    assert second.outbox.queued_status(("TrainingJob", "ns", "late")) is None
    for _ in range(3):  # the writes land (a's move, lost's requeue), pass after pass
        for key, status in second.outbox.queued_statuses():
            second._written(key, status)
        second.iterate()
        if second.outbox.queued_status(("TrainingJob", "ns", "late")) is not None:
            break
    late = _status(second, "late")
    assert late["phase"] == "Running"
    assert {c["type"]: (c["status"], c["reason"]) for c in late["conditions"]}["Running"] == \
        ("True", "Adopted")
    cp.state.check_consistency()


def test_the_engine_follows_a_plane_rebuilt_over_a_grown_inventory() -> None:
    from aifactory.controller.core.topology import NodeInfo
    from aifactory.operators.session import BackendSession
    from aifactory.operators.startup import OperatorOptions, _assemble

    clock = ManualClock()
    backend = RecordingBackend(NODES)  # its inventory grows below, as when a Ray node joins
    factory = factory_from_nodes("t", NODES)
    session = BackendSession(backend, factory, factory.topology(),
                             rebuild_factory=lambda: factory_from_nodes("t", backend.nodes))
    gold = {"metadata": {"name": "gold", "uid": "q", "generation": 1},
            "spec": {"nominalGPUs": 64}}
    listing = {"GPUQueue": [gold], "PowerBudget": [], "TrainingJob": [],
               "InferenceService": []}
    engine, _ = _assemble(FakeKube(), OperatorOptions(backend="ray"), listing,  # type: ignore[arg-type]
                          clock, session, factory, factory.topology())
    replaced: list[ControlPlane] = []
    engine.on_plane_replaced.append(replaced.append)
    engine.apply_job("TrainingJob", _job("a", workers=2, gpusPerWorker=8, queue="gold"))
    engine.iterate()
    old = engine.cp
    where = [old.topo.nodes[s.node].name for s in old.jobs["ns/a"].placement.slots]  # type: ignore[union-attr]
    backend.nodes.append(NodeInfo("n-new", 8, "H200"))
    engine.apply_job("TrainingJob", _job("b", workers=1, gpusPerWorker=8, queue="gold"))
    engine.iterate()
    assert replaced == [engine.cp] and engine.cp is not old
    assert engine.cp.topo.total_gpus == 24
    assert [q.name for q in engine.cp.factory.queues] == ["gold"]  # the GPUQueue objects'
    rec = engine.cp.jobs["ns/a"]
    assert [engine.cp.topo.nodes[s.node].name for s in rec.placement.slots] == where  # type: ignore[union-attr]
    assert backend.launched == ["ns/a", "ns/b"]  # a was not launched twice
    assert _status(engine, "b")["phase"] == "Running"


def test_a_status_write_landing_after_its_object_was_deleted_claims_nothing() -> None:
    """A Running status still on its way when the job was deleted must not leave the job's
    GPUs claimed: nothing else could ever be shown running on them."""
    engine = _engine()
    engine.apply_job("TrainingJob", _job("a", gpusPerWorker=8))
    engine.iterate()
    written = engine.outbox.queued_status(("TrainingJob", "ns", "a"))
    assert written is not None and written["phase"] == "Running"
    engine.forget(engine.objects[("TrainingJob", "ns", "a")])
    engine._written(("TrainingJob", "ns", "a"), written)  # the write lands late
    assert engine.books.claims.by_object == {} and engine.books.claims.by_slot == {}


def test_a_power_budget_schedule_listed_at_start_up_lowers_its_limit() -> None:
    """A PowerBudget that exists when the operator starts has its spec.schedule followed
    (not only one applied later); one whose schedule is invalid is refused whole, as when
    it changes while the operator runs."""
    from aifactory.operators.session import BackendSession
    from aifactory.operators.startup import OperatorOptions, _assemble
    from aifactory.operators.translate import format_time

    clock = ManualClock()
    factory = factory_from_nodes("t", NODES)
    topo = factory.topology()
    session = BackendSession(SimulatedBackend(topo.nodes, clock), factory, topo)
    window = {"start": format_time(clock.t - 60), "end": format_time(clock.t + 600),
              "percent": 50}
    site = {"metadata": {"name": "site", "uid": "b1", "generation": 1},
            "spec": {"watts": 10_000, "schedule": [window]}}
    bad = {"metadata": {"name": "bad", "uid": "b2", "generation": 1},
           "spec": {"watts": 10_000, "schedule": [{**window, "start": "tomorrow"}]}}
    listing = {"GPUQueue": [], "PowerBudget": [site, bad], "TrainingJob": [],
               "InferenceService": []}
    engine, _ = _assemble(FakeKube(), OperatorOptions(), listing,  # type: ignore[arg-type]
                          clock, session, factory, topo)
    assert [b.name for b in engine.cp.factory.power_budgets] == ["site"]
    assert "spec.schedule[0].start" in (engine.configs[("PowerBudget", "bad")].invalid or "")
    engine.iterate()
    index = engine.cp.state.budgets
    assert index.limits[index.names.index("site")] == 5_000
    assert engine.grid.budget_status()["site"]["limitCause"] == "schedule"
