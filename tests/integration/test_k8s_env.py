"""Proves the integration control plane is real: RBAC is enforced and CRDs work.

If these fail, every operator integration test built on `kube_env` would be
testing against something other than a real API server.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration.k8s_env import KubeTestEnv

pytestmark = pytest.mark.integration

NAMESPACE = "k8s-env-smoke"

RBAC_OBJECTS = f"""
apiVersion: v1
kind: ServiceAccount
metadata: {{name: reader, namespace: {NAMESPACE}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: configmap-reader, namespace: {NAMESPACE}}}
rules:
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: reader-reads-configmaps, namespace: {NAMESPACE}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: configmap-reader}}
subjects:
- {{kind: ServiceAccount, name: reader, namespace: {NAMESPACE}}}
"""

CRD_NAME = "widgets.smoke.aifactory.test"
CRD = f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: {CRD_NAME}}}
spec:
  group: smoke.aifactory.test
  scope: Namespaced
  names: {{plural: widgets, singular: widget, kind: Widget}}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {{type: integer}}
"""


def _sa_kubectl(env: KubeTestEnv, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return env.kubectl(*args, kubeconfig=config, check=False)


def test_rbac_is_enforced_for_a_service_account(kube_env: KubeTestEnv, tmp_path: Path) -> None:
    kube_env.kubectl("create", "namespace", NAMESPACE)
    try:
        kube_env.apply(RBAC_OBJECTS)
        config = kube_env.serviceaccount_kubeconfig(NAMESPACE, "reader", tmp_path / "sa.kubeconfig")

        whoami = _sa_kubectl(kube_env, config, "auth", "whoami", "-o", "json")
        assert whoami.returncode == 0, whoami.stderr
        username = json.loads(whoami.stdout)["status"]["userInfo"]["username"]
        assert username == f"system:serviceaccount:{NAMESPACE}:reader"

        listed = _sa_kubectl(kube_env, config, "get", "configmaps")
        assert listed.returncode == 0, listed.stderr

        created = _sa_kubectl(kube_env, config, "create", "configmap", "nope")
        assert created.returncode != 0
        assert "forbidden" in created.stderr.lower(), created.stderr
        # ...while the admin may, so the refusal above really is RBAC.
        kube_env.kubectl("create", "configmap", "allowed", f"--namespace={NAMESPACE}")
    finally:
        # Without a namespace controller the namespace would only reach
        # Terminating, so delete what was created inside it explicitly.
        kube_env.kubectl(
            "delete", "configmap,rolebinding,role,serviceaccount", "--all",
            f"--namespace={NAMESPACE}", "--wait=false", check=False,
        )  # fmt: skip
        kube_env.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def test_crd_becomes_established(kube_env: KubeTestEnv) -> None:
    kube_env.apply(CRD)
    try:
        kube_env.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
        kube_env.apply(
            {
                "apiVersion": "smoke.aifactory.test/v1",
                "kind": "Widget",
                "metadata": {"name": "w", "namespace": "default"},
                "spec": {"size": 3},
            }
        )
        size = kube_env.kubectl(
            "get", "widget", "w", "--namespace=default", "-o", "jsonpath={.spec.size}"
        ).stdout
        assert size == "3"
        bad = kube_env.kubectl(
            "apply", "-f", "-", check=False,
            input="apiVersion: smoke.aifactory.test/v1\nkind: Widget\n"
            "metadata: {name: bad, namespace: default}\nspec: {size: not-a-number}\n",
        )  # fmt: skip
        assert bad.returncode != 0 and "spec.size" in bad.stderr, bad.stderr
    finally:
        kube_env.kubectl("delete", "widget", "w", "--namespace=default", check=False)
        kube_env.kubectl("delete", "crd", CRD_NAME, "--wait=false", check=False)
