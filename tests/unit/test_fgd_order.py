"""FGD's pod order, draw for draw: Go's math/rand ported (``controller.sim.gorand``) and
``fgd_order`` checked against sequences printed by Go itself.

The expected values were printed by Go 1.26 (``math/rand``: ``rand.Seed``, ``Int``,
``Intn``, ``Shuffle``, ``Int63n``) and by ``go run ./hack/fgd_order LIST SEED`` (FGD's
generator: sort by name, shuffle, tune to 130 % of the 6,212 GPUs), whose output lines
(names) are hashed here.
"""

from __future__ import annotations

import hashlib

import pytest

from aifactory.controller.inputs.traces import load_openb_pods
from aifactory.controller.sim.fill import fgd_order
from aifactory.controller.sim.gorand import GoRand
from tests.unit.test_traces import OPENB, trace


@pytest.mark.parametrize(("seed", "expected"), [
    (42, (3440579354231278675, 987, 176, 692798, [1, 4, 9, 5, 8, 7, 2, 6, 3, 0], 840270781)),
    (0, (8717895732742165505, 514, 5110, 310570, [6, 9, 8, 7, 0, 5, 4, 1, 2, 3], 1346885298)),
    (-7, (747107023976529931, 928, 3069, 922176, [0, 9, 6, 2, 1, 8, 4, 5, 7, 3], 2093580542)),
    (51, (3893522058333705853, 47, 8472, 374254, [8, 2, 3, 9, 1, 6, 0, 4, 5, 7], 1543566984)),
], ids=["seed 42", "seed 0 (Go's default seed)", "a negative seed", "seed 51"])
def test_gorand_draws_what_go_math_rand_draws(seed: int, expected: tuple[object, ...]) -> None:
    rng = GoRand(seed)
    first, small, pods, power_of_two = rng.int_(), rng.intn(1000), rng.intn(9061), \
        rng.intn(1 << 20)
    items = list(range(10))

    def swap(i: int, j: int) -> None:
        items[i], items[j] = items[j], items[i]

    rng.shuffle(len(items), swap)
    assert (first, small, pods, power_of_two, items, rng.int63n(3_000_000_000)) == expected


@pytest.mark.parametrize(("pod_list", "seed", "length", "head", "digest"), [
    ("multigpu50", 42, 6361, ("openb-pod-6825", "openb-pod-2707"), "2d1497119fcb4db6"),
    ("multigpu50", 51, 6392, ("openb-pod-1951", "openb-pod-8114"), "15cea8a87289ab49"),
    ("gpushare40", 42, 11771, ("openb-pod-0255", "openb-pod-1685"), "6dbce181534ef8f5"),
    ("gpushare40", 51, 11589, ("openb-pod-7151", "openb-pod-7598"), "b1e549d6ee01704c"),
    ("default", 42, 10866, ("openb-pod-0255", "openb-pod-1685"), "c4da0ec090f40bf3"),
    ("default", 51, 10859, ("openb-pod-7151", "openb-pod-7598"), "3b73cd762906b097"),
], ids=lambda v: str(v) if not isinstance(v, tuple) else "")
def test_fgd_order_is_the_sequence_fgds_go_generator_builds(
        pod_list: str, seed: int, length: int, head: tuple[str, str], digest: str) -> None:
    # multigpu50 holds more GPU demand than 130 % of capacity (pods removed at random);
    # gpushare40 and default hold less (random pods appended as "-tuned-<i>" copies).
    pods = [j.spec for j in load_openb_pods(trace(OPENB, f"openb_pod_list_{pod_list}.csv"),
                                            host_resources=True)]
    order = fgd_order(pods, 6212, seed, 1.3)
    names = "".join(f"{s.name}\n" for s in order)
    assert (len(order), order[0].name, order[1].name) == (length, *head)
    assert hashlib.sha256(names.encode()).hexdigest()[:16] == digest
