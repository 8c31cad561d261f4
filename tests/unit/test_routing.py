"""The Service and EndpointSlices the operator keeps in front of a serving InferenceService
(the objects themselves; the real API server runs them in test_operator_ray.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from aifactory.operators.kube import KubeError
from aifactory.operators.routing import Route, ServiceRouting, desired_objects

ROUTE = Route("serving", "chat", "uid-1", ("http://10.0.0.5:4001", "http://10.0.0.6:4001",
                                           "http://[fd00::7]:4002", "http://node-a:4003"))


def test_one_slice_per_port_and_family_and_host_names_left_out() -> None:
    service, slices, skipped = desired_objects(ROUTE)
    assert "selector" not in service["spec"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "protocol": "TCP"}]
    assert service["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    got = {(s["metadata"]["name"], s["addressType"], s["ports"][0]["port"],
            tuple(a for e in s["endpoints"] for a in e["addresses"])) for s in slices}
    assert got == {("chat-ipv4-4001", "IPv4", 4001, ("10.0.0.5", "10.0.0.6")),
                   ("chat-ipv6-4002", "IPv6", 4002, ("fd00::7",))}
    assert all(s["metadata"]["labels"]["kubernetes.io/service-name"] == "chat"
               for s in slices)
    assert skipped == ["http://node-a:4003"]


class FakeKube:
    """Records calls; answers GETs with the slices it holds and refuses what it is told to."""

    def __init__(self, conflict: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.conflict = conflict

    async def request(self, method: str, path: str, body: Any = None,
                      content_type: str | None = None,
                      params: Any = None) -> Any:
        self.calls.append((method, path))
        if method == "GET":
            return {"items": [{"metadata": {"name": "chat-ipv4-3999"}}]}  # from before
        if self.conflict and path.endswith("/services/chat"):
            raise KubeError(409, "conflict with another manager")
        return {}


def _sync(routing: ServiceRouting, *routes: Route) -> None:
    routing.want(routes)
    asyncio.run(routing.sync())


def test_apply_then_follow_the_replicas_then_remove() -> None:
    kube = FakeKube()
    routing = ServiceRouting(kube)  # type: ignore[arg-type]
    _sync(routing, ROUTE)
    patched = [p for m, p in kube.calls if m == "PATCH"]
    assert patched[0].endswith("/services/chat") and len(patched) == 3
    # What an earlier run left (port 3999) is deleted after the first apply.
    assert ("DELETE", "/apis/discovery.k8s.io/v1/namespaces/serving/endpointslices/"
            "chat-ipv4-3999") in kube.calls
    kube.calls.clear()
    _sync(routing, ROUTE)
    assert kube.calls == []  # unchanged: nothing written
    _sync(routing, Route("serving", "chat", "uid-1", ("http://10.0.0.5:4001",)))
    deleted = [p.rsplit("/", 1)[1] for m, p in kube.calls if m == "DELETE"]
    assert deleted == ["chat-ipv6-4002"]
    kube.calls.clear()
    _sync(routing)  # the service is gone (or serves nothing)
    assert sorted(p.rsplit("/", 1)[1] for m, p in kube.calls if m == "DELETE") == \
        ["chat", "chat-ipv4-4001"]


def test_someone_elses_service_is_left_alone() -> None:
    kube = FakeKube(conflict=True)
    routing = ServiceRouting(kube)  # type: ignore[arg-type]
    _sync(routing, ROUTE)
    assert [m for m, p in kube.calls if "endpointslices/chat-" in p and m == "PATCH"] == []
