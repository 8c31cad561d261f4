"""A Kubernetes Service in front of each InferenceService whose replicas serve.

On Ray, each replica listens on its node's address at a port of its own
(``status.endpoints``). So that clients use one stable name, as for a Deployment, the operator
keeps a Service ``<name>`` without a selector in the service's namespace (port 80, named
``http``) and EndpointSlices that list the ready replicas' addresses, one slice per replica
port (an EndpointSlice's ports are shared by all its addresses). kube-proxy then routes
``http://<name>.<namespace>.svc`` to any ready replica. Both are owned by the InferenceService
(garbage-collected with it) and written with server-side apply under the operator's field
manager; a slice whose port no replica serves any more is deleted, and the Service with the
last of them. A Service of that name that someone else manages is left alone (the apply is
refused as a conflict, logged once).

Only addresses that are IPs become endpoints (what EndpointSlices take); a replica that
reports a host name is left out, logged. Writes run in their own task, one pass per change,
and only while this replica of the operator leads.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aifactory.operators.kube import KubeClient, KubeError
from aifactory.operators.translate import GROUP, VERSION

__all__ = ["FIELD_MANAGER", "Route", "ServiceRouting", "desired_objects"]

log = logging.getLogger(__name__)

FIELD_MANAGER = "aifactory-operator"
MANAGED_BY = "operator.aifactory.io"  # a label value: no "/"
SERVICE_PORT = 80
APPLY = "application/apply-patch+yaml"


@dataclass(frozen=True, slots=True)
class Route:
    """What one InferenceService should have: its identity and its ready endpoints."""

    namespace: str
    name: str
    uid: str
    endpoints: tuple[str, ...]


def _split(endpoint: str) -> tuple[str, int, str] | None:
    """``http://10.0.0.5:8123`` -> (address, port, IPv4|IPv6); None for a host name."""
    parts = urlsplit(endpoint)
    if parts.hostname is None or parts.port is None:
        return None
    try:
        ip = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return None
    return str(ip), parts.port, "IPv6" if ip.version == 6 else "IPv4"


def desired_objects(route: Route) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """The Service, its EndpointSlices (one per (port, family)) and the endpoints left out."""
    owner = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
             "name": route.name, "uid": route.uid, "controller": True,
             "blockOwnerDeletion": False}
    labels: dict[str, str] = {"app.kubernetes.io/managed-by": MANAGED_BY,
              "aifactory.io/inference-service": route.name}
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": route.name, "namespace": route.namespace, "labels": labels,
                     "ownerReferences": [owner]},
        "spec": {"type": "ClusterIP",
                 "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP"}]},
    }
    groups: dict[tuple[int, str], list[str]] = {}
    skipped: list[str] = []
    for endpoint in route.endpoints:
        split = _split(endpoint)
        if split is None:
            skipped.append(endpoint)
            continue
        address, port, family = split
        groups.setdefault((port, family), []).append(address)
    slices: list[dict[str, Any]] = [{
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{route.name}-{family.lower()}-{port}",
                     "namespace": route.namespace, "ownerReferences": [owner],
                     "labels": {**labels, "kubernetes.io/service-name": route.name,
                                "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
        "addressType": family,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}}
                      for a in sorted(addresses)],
    } for (port, family), addresses in sorted(groups.items())]
    return service, slices, skipped


class ServiceRouting:
    """Keeps each serving InferenceService's Service and EndpointSlices as its replicas
    come and go. ``want`` is called by the engine at every status refresh."""

    def __init__(self, kube: KubeClient, may_write: Callable[[], bool] | None = None) -> None:
        self.kube = kube
        self.may_write = may_write or (lambda: True)
        self._want: dict[tuple[str, str], Route] = {}
        self._have: dict[tuple[str, str], tuple[Route, tuple[str, ...]]] = {}  # route, slices
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._warned: set[tuple[str, str]] = set()
        self.writes = 0

    def want(self, routes: Iterable[Route]) -> None:
        """Every InferenceService as it should be routed now (those absent: none)."""
        want = {(r.namespace, r.name): r for r in routes if r.endpoints}
        if want != self._want:
            self._want = want
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="aifactory-routing")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        backoff, last = 1.0, ""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.may_write():
                continue
            try:
                await self.sync()
                backoff, last = 1.0, ""
            except Exception as exc:  # never let routing end the operator
                if str(exc) != last:  # each distinct failure once, not every retry
                    last = str(exc)
                    log.warning("routing InferenceServices to their replicas failed (%s); "
                                "retrying with backoff", exc)
                await asyncio.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                self._wake.set()

    async def sync(self) -> None:
        """Apply what changed: new or changed routes, then routes no longer wanted."""
        for key, route in list(self._want.items()):
            have = self._have.get(key)
            if have is not None and have[0] == route:
                continue
            old = have[1] if have is not None else await self._slices(route)
            self._have[key] = (route, await self._apply(route, old))
        for key in [k for k in self._have if k not in self._want]:
            route, slices = self._have.pop(key)
            await self._delete(route.namespace, "services", [route.name], core=True)
            await self._delete(route.namespace, "endpointslices", list(slices))

    async def _apply(self, route: Route, old_slices: Sequence[str]) -> tuple[str, ...]:
        service, slices, skipped = desired_objects(route)
        key = (route.namespace, route.name)
        if skipped and key not in self._warned:
            self._warned.add(key)
            log.warning("%s/%s: endpoints %s are not IP addresses; left out of its Service",
                        route.namespace, route.name, ", ".join(skipped))
        params = {"fieldManager": FIELD_MANAGER}
        try:
            await self.kube.request(
                "PATCH", f"/api/v1/namespaces/{route.namespace}/services/{route.name}",
                service, content_type=APPLY, params=params)
        except KubeError as exc:
            if exc.status == 409:  # someone else's Service of that name: leave it
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("%s/%s: a Service of that name is managed by someone else; "
                                "not routing to the replicas (%s)", *key, exc)
                return tuple(old_slices)
            raise
        self.writes += 1
        names = []
        for body in slices:
            name = body["metadata"]["name"]
            await self.kube.request(
                "PATCH", f"/apis/discovery.k8s.io/v1/namespaces/{route.namespace}/"
                f"endpointslices/{name}", body, content_type=APPLY, params=params)
            self.writes += 1
            names.append(name)
        await self._delete(route.namespace, "endpointslices",
                           [n for n in old_slices if n not in names])
        return tuple(names)

    async def _slices(self, route: Route) -> tuple[str, ...]:
        """The slices this operator wrote for the route before (a restart forgot them)."""
        found = await self.kube.request(
            "GET", f"/apis/discovery.k8s.io/v1/namespaces/{route.namespace}/endpointslices",
            params={"labelSelector": f"kubernetes.io/service-name={route.name},"
                                     f"endpointslice.kubernetes.io/managed-by={MANAGED_BY}"})
        return tuple(str(item["metadata"]["name"]) for item in (found or {}).get("items", []))

    async def _delete(self, namespace: str, plural: str, names: Sequence[str],
                      core: bool = False) -> None:
        base = f"/api/v1/namespaces/{namespace}" if core else \
            f"/apis/discovery.k8s.io/v1/namespaces/{namespace}"
        for name in names:
            try:
                await self.kube.request("DELETE", f"{base}/{plural}/{name}")
                self.writes += 1
            except KubeError as exc:
                if exc.status != 404:
                    raise
