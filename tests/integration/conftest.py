"""Fixtures for tests against real external components (here: a kube-apiserver).

`kube_env` starts one etcd + kube-apiserver for the whole session (start-up
costs seconds). Tests share it, so each should work in its own namespace.
When the binaries are not installed the tests are skipped, unless
AIFACTORY_REQUIRE_INTEGRATION is set (as in CI), where that is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.integration.k8s_env import BinariesNotFoundError, KubeTestEnv, binaries_dir


@pytest.fixture(scope="session")
def kube_env() -> Iterator[KubeTestEnv]:
    try:
        bin_dir = binaries_dir()
    except BinariesNotFoundError as exc:
        if os.environ.get("AIFACTORY_REQUIRE_INTEGRATION"):
            pytest.fail(f"AIFACTORY_REQUIRE_INTEGRATION is set but {exc}", pytrace=False)
        pytest.skip(str(exc))
    with KubeTestEnv(bin_dir=bin_dir) as env:
        yield env


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """One local Ray cluster for the session: a head without GPUs and 4 nodes of 8 GPUs in
    2 racks (see tests/integration/ray_env.py)."""
    from tests.integration.ray_env import start_cluster

    with start_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def aifactory_installed(kube_env: KubeTestEnv) -> KubeTestEnv:
    """The API server with ``kubectl apply -k manifests/`` done (CRDs, RBAC, Deployment)."""
    from tests.integration.operator_env import install_manifests

    install_manifests(kube_env)
    return kube_env
