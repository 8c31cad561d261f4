"""deploy/ray/ on a real API server: Ray on the GPU nodes and the operator that uses it.

Every kustomization passes ``kubectl apply --dry-run=server -k`` (schemas, defaulting,
admission; the namespaces exist for real first, with their Pod Security labels), the Pods of
the head and workers pass the namespace's "restricted" Pod Security enforcement, and the
KubeRay variant validates against KubeRay's published RayCluster CRD (installed for real from
the cache hack/install-test-deps.sh fills). Beyond "it applies", the parts must agree: each
``ray start`` command parses with the pinned Ray's own CLI, workers label Ray nodes with
their Kubernetes node name under the operator's label key, the operator's arguments parse
with its own parser and checks and point at the head's client port, and the Ray namespace's
NetworkPolicy admits the operator there. No kubelet runs here, so nothing is started.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from aifactory.controller.backends.ray.gang import NODE_NAME_LABEL
from aifactory.operators.main import options_from
from aifactory.operators.main import parser as operator_parser
from tests.integration.k8s_env import REPO_ROOT, KubeTestEnv
from tests.integration.operator_env import wait_for

pytestmark = pytest.mark.integration

RAY = "deploy/ray"
KUBERAY = "deploy/ray/kuberay"
OPERATOR = "deploy/ray/operator"
OPERATOR_KUBERAY = "deploy/ray/kuberay/operator"
GPU_PRESENT = "nvidia.com/gpu.present"
NODE = "gpu-node-1.example.internal"  # what the kubelet would put in $(NODE_NAME)
PSA_WARNING = "would violate PodSecurity"


def kuberay_crd() -> Path:
    """The RayCluster CRD hack/install-test-deps.sh fetched for hack/kuberay.version."""
    version = (REPO_ROOT / "hack" / "kuberay.version").read_text().strip()
    root = os.environ.get("AIFACTORY_CACHE") or str(Path.home() / ".cache" / "aifactory")
    return Path(root) / "kuberay" / version / "ray.io_rayclusters.yaml"


def render(env: KubeTestEnv, path: str) -> list[dict[str, Any]]:
    out = env.kubectl("kustomize", str(REPO_ROOT / path)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} in {[d['kind'] for d in docs]}"
    return hits[0]


def dry_run(env: KubeTestEnv, path: str) -> str:
    """Create its namespaces for real, then dry-run the whole kustomization on the server."""
    for ns in (d for d in render(env, path) if d["kind"] == "Namespace"):
        env.apply(ns)
    result = env.kubectl("apply", "--dry-run=server", "-k", str(REPO_ROOT / path))
    assert PSA_WARNING not in result.stderr, result.stderr
    return result.stdout


def container(template: dict[str, Any]) -> dict[str, Any]:
    containers = template["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_var(c: dict[str, Any], name: str) -> dict[str, Any]:
    hits = [e for e in c.get("env", []) if e["name"] == name]
    assert len(hits) == 1, f"env {name} in {c['name']}: {hits}"
    return dict(hits[0])


def kubelet_expand(args: list[str], values: dict[str, str]) -> list[str]:
    """``$(VAR)`` references as the kubelet expands them in a container's args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: values.get(m[1], m[0]), a) for a in args]


def ray_start_options(args: list[str]) -> dict[str, Any]:
    """Parse ``ray start`` arguments with the pinned Ray's own CLI (no process runs)."""
    scripts = pytest.importorskip("ray.scripts.scripts")
    with scripts.start.make_context("start", list(args)) as ctx:
        return dict(ctx.params)


def flags(params: dict[str, str]) -> list[str]:
    """rayStartParams as KubeRay's convertParamMap renders them: "true" alone, "false" gone
    (except the options taking true/false), else --key=value."""
    out = []
    for key, value in sorted(params.items()):
        if value.lower() in ("true", "false") and key not in ("log-color", "include-dashboard"):
            out += [f"--{key}"] if value.lower() == "true" else []
        else:
            out.append(f"--{key}={value}")
    return out


def assert_gpu_node_placement(spec: dict[str, Any]) -> None:
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    exprs = [e for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]]
    assert {"key": GPU_PRESENT, "operator": "In", "values": ["true"]} in exprs
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists"
               for t in spec["tolerations"])
    shm = [v for v in spec["volumes"] if v["name"] == "shm"]
    assert shm and shm[0]["emptyDir"]["medium"] == "Memory"


def assert_pod_security(env: KubeTestEnv, namespace: str, template: dict[str, Any],
                        name: str) -> None:
    """A Pod from the template passes the namespace's enforced Pod Security level, and the
    same Pod with privilege escalation allowed does not (so the check is live)."""
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace},
           "spec": template["spec"]}
    env.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod))
    bad = json.loads(json.dumps(pod))
    bad["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    refused = env.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(bad),
                          check=False)
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused


# --------------------------------------------------------------------------- deploy/ray


def test_head_and_gpu_workers_apply_and_pass_restricted_pod_security(
        kube_env: KubeTestEnv) -> None:
    out = dry_run(kube_env, RAY)
    for created in ("namespace/aifactory-ray", "service/ray-head", "deployment.apps/ray-head",
                    "daemonset.apps/ray-worker", "networkpolicy.networking.k8s.io/ray"):
        assert created in out, out
    docs = render(kube_env, RAY)
    ns = find(docs, "Namespace", "aifactory-ray")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    head = find(docs, "Deployment", "ray-head")["spec"]["template"]
    workers = find(docs, "DaemonSet", "ray-worker")["spec"]["template"]
    assert_pod_security(kube_env, "aifactory-ray", head, "ray-head-check")
    assert_pod_security(kube_env, "aifactory-ray", workers, "ray-worker-check")


def test_workers_join_the_head_labelled_with_their_node_name_on_gpu_nodes(
        kube_env: KubeTestEnv) -> None:
    docs = render(kube_env, RAY)
    service = find(docs, "Service", "ray-head")
    gcs_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "gcs")
    template = find(docs, "DaemonSet", "ray-worker")["spec"]["template"]
    worker = container(template)
    assert env_var(worker, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert f"--labels={NODE_NAME_LABEL}=$(NODE_NAME)" in worker["args"]
    assert_gpu_node_placement(template["spec"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"]
    assert worker["lifecycle"]["preStop"]["exec"]["command"][:2] == ["ray", "stop"]

    assert worker["command"] == ["ray"] and worker["args"][0] == "start"
    options = ray_start_options(kubelet_expand(worker["args"][1:],
                                               {"NODE_NAME": NODE, "POD_IP": "10.1.2.3"}))
    assert options["block"] and not options["head"]
    head_host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert options["address"] == f"{head_host}:{gcs_port}"
    label_utils = pytest.importorskip("ray._private.label_utils")
    assert label_utils.parse_node_labels_string(options["labels"]) == {NODE_NAME_LABEL: NODE}

    head = container(find(docs, "Deployment", "ray-head")["spec"]["template"])
    head_options = ray_start_options(kubelet_expand(head["args"][1:], {"POD_IP": "10.1.2.4"}))
    assert head_options["head"] and head_options["block"]
    assert head_options["num_gpus"] == 0 and head_options["include_dashboard"] is False
    assert head_options["port"] == gcs_port


# --------------------------------------------------------------------------- KubeRay


@pytest.fixture(scope="module")
def raycluster_crd(kube_env: KubeTestEnv) -> KubeTestEnv:
    crd = kuberay_crd()
    if not crd.is_file():
        message = f"{crd} is missing; run hack/install-test-deps.sh to fetch it"
        if os.environ.get("AIFACTORY_REQUIRE_INTEGRATION"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    # Server-side: the CRD is larger than client-side apply's last-applied annotation allows.
    kube_env.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))

    def established() -> bool:  # polled: `kubectl wait` fails while status is still empty
        crd = json.loads(kube_env.kubectl("get", "crd/rayclusters.ray.io", "-o", "json").stdout)
        return any(c["type"] == "Established" and c["status"] == "True"
                   for c in (crd.get("status") or {}).get("conditions") or [])

    wait_for(established, 60, "the RayCluster CRD to be Established", interval=0.5)
    return kube_env


def test_the_kuberay_variant_applies_and_labels_workers_with_their_node_name(
        raycluster_crd: KubeTestEnv) -> None:
    out = dry_run(raycluster_crd, KUBERAY)
    assert "raycluster.ray.io/aifactory created (server dry run)" in out, out
    cluster = find(render(raycluster_crd, KUBERAY), "RayCluster", "aifactory")
    # KubeRay then runs our command, handing it its own in $KUBERAY_GEN_RAY_START_CMD.
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head_group = cluster["spec"]["headGroupSpec"]
    (group,) = cluster["spec"]["workerGroupSpecs"]
    for params in (head_group["rayStartParams"], group["rayStartParams"]):
        assert "labels" not in params  # KubeRay v1.5 refuses rayStartParams['labels']
    head_options = ray_start_options(["--head", "--block", *flags(head_group["rayStartParams"])])
    assert head_options["num_gpus"] == 0 and head_options["num_cpus"] == 0

    template = group["template"]
    worker = container(template)
    assert env_var(worker, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    (script,) = worker["args"]
    assert worker["command"][:2] == ["/bin/bash", "-c"]
    assert "${KUBERAY_GEN_RAY_START_CMD}" in script
    suffix = f"--labels={NODE_NAME_LABEL}=${{NODE_NAME}}"
    assert suffix in script
    assert_gpu_node_placement(template["spec"])
    # What bash runs on a node: KubeRay's command for this group plus our label.
    generated = ["--address=aifactory-head-svc.aifactory-ray.svc.cluster.local:6379",
                 "--block", *flags(group["rayStartParams"]), "--num-gpus=8"]
    options = ray_start_options([*generated, suffix.replace("${NODE_NAME}", NODE)])
    assert options["labels"] == f"{NODE_NAME_LABEL}={NODE}"
    for name, probe in (("liveness", "livenessProbe"), ("readiness", "readinessProbe")):
        assert probe in worker, f"{name}: KubeRay's default probe needs wget and the dashboard"


# --------------------------------------------------------------------------- operator


def head_client_address(env: KubeTestEnv, ray_path: str) -> str:
    """``ray://HOST:PORT`` of the Ray Client port of the head that ``ray_path`` runs."""
    docs = render(env, ray_path)
    services = [d for d in docs if d["kind"] == "Service"]
    if services:
        (svc,) = services
        port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "client")
        return f"ray://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{port}"
    (cluster,) = (d for d in docs if d["kind"] == "RayCluster")
    head = container(cluster["spec"]["headGroupSpec"]["template"])
    port = next(p["containerPort"] for p in head["ports"] if p["name"] == "client")
    meta = cluster["metadata"]
    return f"ray://{meta['name']}-head-svc.{meta['namespace']}.svc:{port}"


@pytest.mark.parametrize(("overlay", "ray_path"), [(OPERATOR, RAY),
                                                   (OPERATOR_KUBERAY, KUBERAY)])
def test_the_operator_overlay_runs_the_ray_backend_against_that_head(
        kube_env: KubeTestEnv, overlay: str, ray_path: str) -> None:
    out = dry_run(kube_env, overlay)
    assert "deployment.apps/aifactory-operator" in out, out
    docs = render(kube_env, overlay)
    deployment = find(docs, "Deployment", "aifactory-operator")
    operator = container(deployment["spec"]["template"])
    assert operator["args"][0] == "operator"
    args = operator_parser().parse_args(operator["args"][1:])
    options = options_from(args)  # what the operator checks before it connects
    assert options.backend == "ray" and not options.ray.local
    assert options.ray.address == head_client_address(kube_env, ray_path)

    ray_docs = render(kube_env, ray_path)
    ray_images = {c["image"] for d in ray_docs for c in _containers(d)}
    assert ray_images == {operator["image"]}, "operator and Ray nodes must run one build"
    worker_mounts = {m["mountPath"] for d in ray_docs for c in _containers(d)
                     if c["name"] == "ray-worker" for m in c["volumeMounts"]}
    assert env_var(operator, "AIFACTORY_CHECKPOINT_ROOT")["value"] in worker_mounts

    # The Ray namespace's NetworkPolicy lets these pods in on the client port.
    policy = find(ray_docs, "NetworkPolicy", "ray")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    port = int(args.ray_address.rsplit(":", 1)[1])
    admitted = [rule for rule in policy["spec"]["ingress"]
                if any(peer.get("namespaceSelector", {}).get("matchLabels") ==
                       {"kubernetes.io/metadata.name": deployment["metadata"]["namespace"]}
                       and peer["podSelector"]["matchLabels"].items() <= pod_labels.items()
                       for peer in rule.get("from", []))
                and {"port": port, "protocol": "TCP"} in rule["ports"]]
    assert admitted, policy["spec"]["ingress"]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers of a workload or RayCluster document (none for other kinds)."""
    if doc["kind"] in ("Deployment", "DaemonSet"):
        return list(doc["spec"]["template"]["spec"]["containers"])
    if doc["kind"] == "RayCluster":
        groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]
    return []
