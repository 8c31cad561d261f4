"""The operator's write path at scale, without a cluster: the meter write budget, the change
lane that meter refreshes never delay, and Events aggregated the way client-go does.

The API server's side of the same rules (counted from its own metrics) is in
``tests/integration/test_operator_scale.py``.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.operators import publish
from aifactory.operators.books import EngineOptions
from aifactory.operators.engine import Engine
from aifactory.operators.events import COMBINED_PREFIX, SIMILAR_LIMIT, EventBook
from aifactory.operators.outbox import Outbox
from tests.factories import grid_nodes
from tests.unit.test_operator_engine import FakeKube, ManualClock, _job

REF = {"apiVersion": "aifactory.io/v1alpha1", "kind": "TrainingJob", "name": "a",
       "namespace": "ns", "uid": "u-a"}


# ----------------------------------------------------------------- events


def test_identical_events_count_up_instead_of_piling_up() -> None:
    book = EventBook()
    for t in range(5):
        book.add(REF, "Normal", "Admitted", "placed on n0", now=100.0 + t)
    (event,) = book.pending()
    assert event.count == 5 and event.first_seen == 100.0 and event.last_seen == 104.0
    [(key, taken)] = book.take(8)
    book.sent(key, taken, "a.1")
    book.add(REF, "Normal", "Admitted", "placed on n0", now=200.0)
    (again,) = book.pending()
    assert again.name == "a.1" and again.count == 6, "a posted Event is patched, not re-posted"


def test_many_similar_events_are_combined_into_one() -> None:
    book = EventBook()
    for i in range(SIMILAR_LIMIT + 30):
        book.add(REF, "Normal", "InsufficientCapacity", f"largest rack has {i} free GPUs",
                 now=100.0 + i, phase_change=False)
    pending = book.pending()
    assert len(pending) == SIMILAR_LIMIT + 1
    combined = pending[-1]
    assert combined.message.startswith(COMBINED_PREFIX) and combined.count == 30
    assert combined.message.endswith(f"{SIMILAR_LIMIT + 29} free GPUs"), "latest words"


def test_under_back_pressure_phase_changes_are_the_last_to_go() -> None:
    book = EventBook(max_backlog=10)
    for i in range(8):
        book.add({**REF, "uid": f"p{i}"}, "Normal", "Admitted", "placed", now=1.0)
    for i in range(50):
        book.add({**REF, "uid": f"w{i}"}, "Normal", "InsufficientCapacity", "full", now=1.0,
                 phase_change=False)
    assert len(book) == 10 and book.dropped == 48
    reasons = [e.reason for e in book.pending()]
    assert reasons.count("Admitted") == 8, "no phase change dropped while others could go"
    assert [e.reason for _, e in book.take(9)][:8] == ["Admitted"] * 8, "phase changes first"
    for i in range(150):  # a mass admission: phase changes are kept up to 10x the bound
        book.add({**REF, "uid": f"q{i}"}, "Normal", "Admitted", "placed", now=2.0)
    assert book.dropped == 48 + 1 + 150 - 100, "the other left first, then the oldest phases"
    assert len(book) == 100


# ----------------------------------------------------------------- outbox lanes


class RecordingKube(FakeKube):
    def __init__(self) -> None:
        self.patched: list[tuple[str, dict[str, Any]]] = []

    async def patch_status(self, kind: str, namespace: str | None, name: str,
                           status: dict[str, Any]) -> None:
        self.patched.append((name, dict(status)))
        await asyncio.sleep(0)


def test_a_phase_change_overtakes_a_full_meter_lane() -> None:
    async def run() -> list[str]:
        kube = RecordingKube()
        stats: dict[str, float] = {}
        outbox = Outbox(kube, collections_default(stats), writers=1)  # type: ignore[arg-type]
        for i in range(200):
            outbox.put_status(("TrainingJob", "ns", f"m{i}"), {"energyJoules": i},
                              change=False)
        outbox.put_status(("TrainingJob", "ns", "urgent"), {"phase": "Running"})
        outbox.put_status(("TrainingJob", "ns", "m5"), {"phase": "Succeeded"})  # superseded
        outbox.start()
        while outbox.pending:
            await asyncio.sleep(0)
        await outbox.close(0)
        names = [name for name, _ in kube.patched]
        assert [s for n, s in kube.patched if n == "m5"] == [{"phase": "Succeeded"}], \
            "the meter write m5 was superseded by its change: written once, as the change"
        return names

    names = asyncio.run(run())
    assert names[:2] == ["urgent", "m5"] and len(names) == 201


def test_writes_wait_for_the_lease_renewal_instead_of_being_dropped() -> None:
    async def run() -> list[str]:
        kube = RecordingKube()
        leading = [False]
        outbox = Outbox(kube, collections_default({}), writers=2,  # type: ignore[arg-type]
                        may_write=lambda: leading[0])
        outbox.put_status(("TrainingJob", "ns", "a"), {"phase": "Running"})
        outbox.put_status(("TrainingJob", "ns", "b"), {"energyJoules": 1}, change=False)
        outbox.start()
        await asyncio.sleep(0.35)  # the renewal is late: nothing goes out, nothing is lost
        assert kube.patched == [] and outbox.pending
        leading[0] = True  # renewed
        while outbox.pending:
            await asyncio.sleep(0.01)
        await outbox.close(0)
        return [name for name, _ in kube.patched]

    assert asyncio.run(run()) == ["a", "b"]


def collections_default(stats: dict[str, float]) -> dict[str, float]:
    import collections
    return collections.defaultdict(float, stats)


# ----------------------------------------------------------------- the meter budget


def _big_engine(clock: ManualClock, rate: float) -> Engine:
    factory = replace(factory_from_nodes("t", grid_nodes(2, 4, 8)), queues=())  # 512 GPUs
    topo = factory.topology()
    cp = ControlPlane(factory, SimulatedBackend(topo.nodes, clock), clock=clock, topology=topo)
    return Engine(cp, FakeKube(), clock,  # type: ignore[arg-type]
                  EngineOptions(meter_writes_per_second=rate, status_interval_seconds=5.0))


@pytest.mark.parametrize("jobs", [40, 400])
def test_meter_writes_stay_within_the_budget_whatever_the_number_running(
        jobs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    clock, mono = ManualClock(), [1000.0]
    monkeypatch.setattr(publish.time, "monotonic", lambda: mono[0])
    monkeypatch.setattr("aifactory.operators.engine.time.monotonic", lambda: mono[0])
    engine = _big_engine(clock, rate=20.0)
    writes: list[tuple[float, str, bool]] = []
    put = engine.outbox.put_status

    def counting(key: Any, status: Any, change: bool = True) -> None:
        writes.append((mono[0], key[2], change))
        put(key, status, change)

    engine.outbox.put_status = counting  # type: ignore[method-assign]
    for i in range(jobs):
        engine.apply_job("TrainingJob", _job(f"j{i}", expectedRuntimeSeconds=10_000))
    engine.iterate()
    assert sum(1 for _, _, change in writes if change) >= jobs, "every admission at once"
    writes.clear()
    seconds = 30.0
    for _ in range(int(seconds / 0.1)):
        mono[0] += 0.1
        clock.t += 0.1
        engine.iterate()
    meter = [(t, name) for t, name, change in writes if not change]
    assert len(meter) <= 20.0 * seconds + 20.0, f"{len(meter)} meter writes in {seconds} s"
    if jobs == 40:  # under the budget: every job refreshed every status interval
        assert len(meter) >= jobs * (seconds / 5.0 - 1)
    else:  # over it: the budget is used (none is due in the first interval),
        # round-robin, and everyone gets its turn
        assert len(meter) >= 20.0 * (seconds - 5.0) * 0.95
        assert len({name for _, name in meter}) == min(jobs, len(meter))
    assert engine.books.meter_lag <= max(5.0, jobs / 20.0) + 1.0
