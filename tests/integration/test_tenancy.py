"""Multi-tenancy on a real API server with RBAC: roles that aggregate, queues bound to
namespaces, priorities a tenant cannot inflate, admission inside the API server.

Tenants are real ServiceAccounts authenticating with TokenRequest tokens. No
kube-controller-manager runs here, so its ClusterRole aggregation controller does not fill in
the built-in ``edit`` role: ``aggregated_edit`` does what it would (the union of the rules of
every ClusterRole carrying the label ``edit`` aggregates, ours included) into a role bound
in the tenant's namespace.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aifactory.controller.core.spec import QueueSpec
from aifactory.operators.tenancy import NamespaceGrant, priority_refusal
from tests.integration.k8s_env import KubeTestEnv
from tests.integration.operator_env import (
    OperatorProcess,
    ensure_namespace,
    training_job,
    wait_for,
)

pytestmark = pytest.mark.integration

FACTORY = Path(__file__).parent / "data" / "factory-64.yaml"
RIGHTS = Path(__file__).parent / "data" / "operator-rights.txt"
OPERATOR_SA = "system:serviceaccount:aifactory-system:aifactory-operator"
EDIT_LABEL = "rbac.authorization.k8s.io/aggregate-to-edit"
QUEUES = {"tenancy-a": 100, "tenancy-b": None}  # queue -> maxPriority


def _queue(name: str, max_priority: int | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"nominalGPUs": 32}
    if max_priority is not None:
        spec["maxPriority"] = max_priority
    return {"apiVersion": "aifactory.io/v1alpha1", "kind": "GPUQueue",
            "metadata": {"name": name}, "spec": spec}


@pytest.fixture(scope="module")
def tenants(aifactory_installed: KubeTestEnv, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, Path]]:
    """Namespaces tenancy-a and tenancy-b, each granted its own queue, with a ServiceAccount
    ``tenant`` bound to the aggregated ``edit`` role; the two GPUQueues (deleted after: other
    modules run with no GPUQueue)."""
    env = aifactory_installed
    edit = aggregated_edit(env)
    configs: dict[str, Path] = {}
    tmp = tmp_path_factory.mktemp("tenants")
    env.apply([_queue(name, cap) for name, cap in QUEUES.items()])
    try:
        for ns in QUEUES:
            ensure_namespace(env, ns, queues=ns)
            env.apply([
                {"apiVersion": "v1", "kind": "ServiceAccount",
                 "metadata": {"name": "tenant", "namespace": ns}},
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                 "metadata": {"name": "tenant-edit", "namespace": ns},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                             "name": edit},
                 "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": ns}]},
            ])
            configs[ns] = env.serviceaccount_kubeconfig(ns, "tenant", tmp / f"{ns}.yaml")
        yield configs
    finally:
        for ns in QUEUES:
            env.kubectl("delete", "trainingjobs", "--all", f"-n={ns}", "--timeout=60s",
                        check=False)
        env.kubectl("delete", "gpuqueues", *QUEUES, "--ignore-not-found", check=False)


def aggregated_edit(env: KubeTestEnv) -> str:
    """A ClusterRole holding what the aggregation controller would put into ``edit``."""
    builtin = json.loads(env.kubectl("get", "clusterrole", "edit", "-o", "json").stdout)
    selectors = builtin["aggregationRule"]["clusterRoleSelectors"]
    assert {"matchLabels": {EDIT_LABEL: "true"}} in selectors
    roles = json.loads(env.kubectl("get", "clusterroles", "-l", f"{EDIT_LABEL}=true",
                                   "-o", "json").stdout)["items"]
    assert {"aifactory-edit", "aifactory-view"} <= {r["metadata"]["name"] for r in roles}
    rules = [rule for role in roles for rule in role.get("rules") or []]
    env.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "test-aggregated-edit"}, "rules": rules})
    return "test-aggregated-edit"


def _can(env: KubeTestEnv, config: Path, verb: str, resource: str, ns: str | None) -> bool:
    """``kubectl auth can-i`` as the tenant; ``kind/sub`` names a subresource."""
    kind, _, sub = resource.partition("/")
    args = [f"--subresource={sub}"] if sub else []
    args += [f"-n={ns}"] if ns else []
    done = env.kubectl("auth", "can-i", verb, kind, *args, kubeconfig=config, check=False)
    return done.stdout.strip() == "yes"


@pytest.mark.parametrize(("verb", "resource", "where", "allowed"), [
    pytest.param("create", "trainingjobs.aifactory.io", "own", True, id="create jobs"),
    pytest.param("delete", "trainingjobs.aifactory.io", "own", True, id="delete jobs"),
    pytest.param("create", "inferenceservices.aifactory.io", "own", True,
                 id="create services"),
    pytest.param("patch", "inferenceservices.aifactory.io/scale", "own", True,
                 id="scale services"),
    pytest.param("patch", "inferenceservices.aifactory.io/status", "own", False,
                 id="never a service's status"),
    pytest.param("list", "trainingjobs.aifactory.io", "own", True, id="read jobs"),
    pytest.param("patch", "trainingjobs.aifactory.io/status", "own", False,
                 id="never status"),
    pytest.param("create", "trainingjobs.aifactory.io", "other", False,
                 id="nothing in another namespace"),
    pytest.param("create", "gpuqueues.aifactory.io", None, False, id="no queues"),
    pytest.param("create", "powerbudgets.aifactory.io", None, False, id="no power budgets"),
    pytest.param("patch", "namespaces", None, False, id="no grants of its own"),
    pytest.param("create", "validatingadmissionpolicies.admissionregistration.k8s.io", None,
                 False, id="no admission policies"),
])
def test_a_tenant_bound_to_edit_does_what_a_tenant_should(
        aifactory_installed: KubeTestEnv, tenants: dict[str, Path], verb: str,
        resource: str, where: str | None, allowed: bool) -> None:
    ns = {"own": "tenancy-a", "other": "tenancy-b", None: None}[where]
    assert _can(aifactory_installed, tenants["tenancy-a"], verb, resource, ns) is allowed


RULE_CASES = [
    pytest.param("tenancy-a", None, "tenancy-b", 0, id="another team's queue"),
    pytest.param(None, None, None, 0, id="a namespace granted nothing"),
    pytest.param("tenancy-a, default", None, "default", 0, id="a second granted queue"),
    pytest.param("tenancy-a", None, None, 0, id="no queue named: the granted one"),
    pytest.param("tenancy-b", "tenancy-a", None, 0, id="a default queue not granted"),
    pytest.param("*", None, "tenancy-b", 5000, id="a wildcard grant, no priority cap"),
    pytest.param("tenancy-a", None, "tenancy-a", 100, id="at the priority cap"),
    pytest.param("tenancy-a", None, "tenancy-a", 1_000_000, id="above the priority cap"),
]


@pytest.mark.parametrize(("grant", "default", "queue", "priority"), RULE_CASES)
def test_the_api_server_and_the_operator_apply_the_same_rules(
        aifactory_installed: KubeTestEnv, tenants: dict[str, Path], grant: str | None,
        default: str | None, queue: str | None, priority: int,
        request: pytest.FixtureRequest) -> None:
    """A dry run of the job on the real API server is refused exactly when, and in the
    words with which, the operator's own check (operators.tenancy) refuses it."""
    env = aifactory_installed
    ns = "tenancy-rules-" + str(request.node.callspec.indices["grant"])
    annotations = {k: v for k, v in (("aifactory.io/queues", grant),
                                     ("aifactory.io/default-queue", default)) if v}
    env.apply({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": ns, "annotations": annotations}})
    job = training_job("rules", ns, priority=priority)
    if queue is not None:
        job["spec"]["queue"] = queue
    ours = NamespaceGrant.from_namespace({"metadata": {"name": ns,
                                                       "annotations": annotations}})
    resolved = ours.queue_for(queue)
    caps = {name: QueueSpec(name, 32, max_priority=cap) for name, cap in QUEUES.items()}
    expected = ours.queue_refusal(resolved) or priority_refusal(priority, caps.get(resolved))

    def server_says() -> str | None:
        done = env.kubectl("apply", "--dry-run=server", "-f", "-", check=False,
                           input=yaml.safe_dump(job))
        return None if done.returncode == 0 else done.stderr

    def agrees() -> bool:  # the server sees a new Namespace a moment after it is created
        said = server_says()
        return said is None if expected is None else said is not None and expected in said

    wait_for(agrees, 30, f"the API server to say {expected!r}", interval=0.2)


def test_a_tenants_job_runs_in_its_queue_and_cannot_touch_the_other_team(
        aifactory_installed: KubeTestEnv, tenants: dict[str, Path],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    env = aifactory_installed
    operator = OperatorProcess(env, tmp_path_factory.mktemp("tenancy-operator"),
                               [f"--cluster={FACTORY}", "--inventory=factory",
                                "--status-interval=1"])
    operator.start()
    try:
        theirs = training_job("theirs", "tenancy-b", workers=2, gpus_per_worker=8,
                              expectedRuntimeSeconds=3600)
        theirs["spec"]["queue"] = "tenancy-b"
        env.apply(theirs)
        mine = training_job("mine", "tenancy-a", workers=1, gpus_per_worker=8,
                            expectedRuntimeSeconds=3600)  # no queue: the namespace's
        env.kubectl("apply", "-f", "-", input=yaml.safe_dump(mine),
                    kubeconfig=tenants["tenancy-a"])
        sneaky = training_job("sneaky", "tenancy-a", workers=4, gpus_per_worker=8)
        sneaky["spec"]["queue"] = "tenancy-b"
        refused = env.kubectl("apply", "-f", "-", input=yaml.safe_dump(sneaky), check=False,
                              kubeconfig=tenants["tenancy-a"])
        assert refused.returncode != 0
        assert ("spec.queue: namespace tenancy-a may not use queue tenancy-b; its queues "
                "are tenancy-a") in refused.stderr
        inflated = training_job("inflated", "tenancy-a", workers=1, gpus_per_worker=1)
        inflated["spec"].update(queue="tenancy-a", priority=1_000_000)
        refused = env.kubectl("apply", "-f", "-", input=yaml.safe_dump(inflated),
                              check=False, kubeconfig=tenants["tenancy-a"])
        assert refused.returncode != 0
        assert ("spec.priority: 1000000 is above the maximum priority 100 of queue "
                "tenancy-a") in refused.stderr

        def phase(ns: str, name: str) -> str:
            return env.kubectl("get", "trainingjob", name, f"-n={ns}", "-o",
                               "jsonpath={.status.phase}", check=False).stdout

        wait_for(lambda: phase("tenancy-a", "mine") == "Running"
                 and phase("tenancy-b", "theirs") == "Running", 60,
                 "both teams' jobs to run")
        queue = env.kubectl("get", "trainingjob", "mine", "-n=tenancy-a", "-o",
                            "jsonpath={.status.queue}").stdout
        assert queue == "tenancy-a"  # named none: the namespace's queue, shown in status
        got = json.loads(env.kubectl("get", "trainingjobs", "-A", "-o", "json").stdout)
        names = {(j["metadata"]["namespace"], j["metadata"]["name"]) for j in got["items"]}
        assert ("tenancy-a", "sneaky") not in names and ("tenancy-a", "inflated") not in names
        assert operator.alive(), operator.log_tail()
    finally:
        for ns in QUEUES:
            env.kubectl("delete", "trainingjobs", "--all", f"-n={ns}", "--timeout=60s",
                        check=False)
        operator.stop()


def test_the_operators_rights_are_exactly_the_checked_in_list(
        aifactory_installed: KubeTestEnv) -> None:
    """``kubectl auth can-i --list`` for the operator's ServiceAccount: any widening of its
    rights shows as a diff against tests/integration/data/operator-rights.txt."""
    out = aifactory_installed.kubectl("auth", "can-i", "--list", "-n=aifactory-system",
                                      f"--as={OPERATOR_SA}").stdout
    got = [" ".join(line.split()) for line in out.strip().splitlines()]
    want = [" ".join(line.split()) for line in RIGHTS.read_text().strip().splitlines()]
    assert got == want, "\n".join(difflib.unified_diff(want, got, "expected", "now",
                                                       lineterm=""))
