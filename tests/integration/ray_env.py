"""The session's Ray cluster and helpers to drive a control plane against it.

::

    block b0
    ├── rack b0-r0: n-b0-r0-00 (8 GPUs), n-b0-r0-01 (8 GPUs)
    └── rack b0-r1: n-b0-r1-00 (8 GPUs), n-b0-r1-01 (8 GPUs)

Each node is a real raylet declaring 8 GPUs and 4 CPUs, labelled like ``ray start --labels``
would label a real machine. Without Ray installed the tests skip, unless
AIFACTORY_REQUIRE_INTEGRATION is set (CI), where that fails.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.factories import grid_nodes

NODES = grid_nodes(1, 2, 2)


@contextmanager
def start_cluster() -> Iterator[Any]:
    try:
        from aifactory.controller.backends.ray.local import LocalRayCluster
    except ImportError as exc:
        if os.environ.get("AIFACTORY_REQUIRE_INTEGRATION"):
            pytest.fail(f"AIFACTORY_REQUIRE_INTEGRATION is set but Ray is missing: {exc}",
                        pytrace=False)
        pytest.skip(f"Ray is not installed: {exc}")
    cluster = LocalRayCluster(NODES, cpus_per_node=4).start()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def wait_for(step: Callable[[], object], done: Callable[[], bool], timeout: float = 30.0,
             what: str = "condition") -> None:
    """Call ``step`` until ``done()`` or fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        step()
        if done():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def leftovers() -> list[str]:
    """Placement groups and named actors of ours still alive on the cluster (pre-started
    pooled workers, ``aifactory/_pool/...``, included: a closed backend stops them)."""
    import ray
    from ray.util.placement_group import placement_group_table

    pgs = [f"pg {v['name']} ({v['state']})" for v in placement_group_table().values()
           if str(v.get("name", "")).startswith("aifactory/") and v.get("state") != "REMOVED"]
    actors = [f"actor {a['name']}" for a in ray.util.list_named_actors(all_namespaces=True)
              if str(a.get("name", "")).startswith("aifactory/")]
    return pgs + actors
