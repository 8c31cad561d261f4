"""The operator's own calls to the Kubernetes API: list, patch status, post Events.

kopf watches the resources and calls the handlers; everything the single engine task writes
on its own schedule (status of placed, preempted and finished jobs, Events, queue and budget
status) goes through this small asyncio client instead, so writes never block the engine
and never run in another thread. It speaks plain JSON over aiohttp (which kopf already
uses) with the credentials the ``kubernetes`` package finds: a kubeconfig
(``$KUBECONFIG`` or ``--kubeconfig``) or the in-cluster ServiceAccount token, re-read when
it rotates.

Only this module and ``operators.handlers`` touch the API; errors are translated here, once,
into ``KubeError`` carrying the HTTP status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import time
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from aifactory.operators.translate import GROUP, PLURALS, VERSION, format_time

__all__ = ["EVENT_COMPONENT", "KubeClient", "KubeError", "ObjectRef", "load_configuration"]

log = logging.getLogger(__name__)

EVENT_COMPONENT = "aifactory-operator"
TOKEN_REFRESH_SECONDS = 60.0
ObjectRef = Mapping[str, str]  # apiVersion, kind, name, namespace ("" if cluster-scoped), uid


class KubeError(RuntimeError):
    """An API call failed; ``status`` is the HTTP status (0 when nothing answered)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


def load_configuration(kubeconfig: str | None = None) -> k8s_client.Configuration:
    """Credentials as kubectl would find them: ``kubeconfig``, ``$KUBECONFIG``, in-cluster."""
    cfg = k8s_client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, client_configuration=cfg)
        return cfg
    try:
        k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=cfg)
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            client_configuration=cfg)
    return cfg


class KubeClient:
    """A few JSON calls to one API server with bounded concurrency."""

    def __init__(self, cfg: k8s_client.Configuration, concurrency: int = 32,
                 timeout_seconds: float = 30.0) -> None:
        self.cfg = cfg
        self.host = cfg.host.rstrip("/")
        self._ssl = self._ssl_context(cfg)
        self._limit = asyncio.Semaphore(concurrency)
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self.instance = socket.gethostname()
        self.calls = 0
        self.errors = 0
        self._auth = ""
        self._auth_expires = 0.0

    @staticmethod
    def _ssl_context(cfg: k8s_client.Configuration) -> ssl.SSLContext | bool:
        if not cfg.host.startswith("https"):
            return False
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        if not cfg.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        auth = self._authorization()
        if auth:
            headers["Authorization"] = auth
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _authorization(self) -> str:
        """The bearer header, re-read at most every ``TOKEN_REFRESH_SECONDS`` (in-cluster the
        token file rotates; client-go re-reads it once a minute, not on every request)."""
        now = time.monotonic()
        if now >= self._auth_expires:
            if self.cfg.refresh_api_key_hook is not None:
                self.cfg.refresh_api_key_hook(self.cfg)
            hook, self.cfg.refresh_api_key_hook = self.cfg.refresh_api_key_hook, None
            try:  # auth_settings() would call the hook a second time
                auth = self.cfg.auth_settings().get("BearerToken")
            finally:
                self.cfg.refresh_api_key_hook = hook
            self._auth = str(auth["value"]) if auth and auth.get("value") else ""
            self._auth_expires = now + TOKEN_REFRESH_SECONDS
        return self._auth

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: Any = None,
                      content_type: str | None = None,
                      params: Mapping[str, str] | None = None) -> Any:
        """One call; the decoded JSON answer, or KubeError."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=32))
        data = None if body is None else json.dumps(body)
        if data is not None and content_type is None:
            content_type = "application/json"
        async with self._limit:
            self.calls += 1
            try:
                async with self._session.request(
                        method, self.host + path, data=data, params=params,
                        headers=self._headers(content_type)) as response:
                    text = await response.text()
                    if response.status >= 400:
                        self.errors += 1
                        raise KubeError(response.status, _message(text))
                    return json.loads(text) if text else None
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.errors += 1
                raise KubeError(0, f"{method} {path}: {exc!r}") from exc

    # ----------------------------------------------------------------- our resources

    @staticmethod
    def _path(kind: str, namespace: str | None, name: str | None = None) -> str:
        base = f"/apis/{GROUP}/{VERSION}"
        plural = PLURALS[kind]
        path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
        return f"{path}/{name}" if name else path

    async def served_kinds(self) -> set[str]:
        """Which of our kinds the API server serves now (CRDs installed and established)."""
        try:
            doc = await self.request("GET", f"/apis/{GROUP}/{VERSION}")
        except KubeError as exc:
            if exc.status == 404:
                return set()
            raise
        return {str(r.get("kind")) for r in doc.get("resources", []) if "/" not in r["name"]}

    async def list_objects(self, kind: str) -> list[dict[str, Any]]:
        """Every object of one of our kinds, in all namespaces (paged)."""
        items: list[dict[str, Any]] = []
        params: dict[str, str] = {"limit": "500"}
        while True:
            doc = await self.request("GET", self._path(kind, None), params=params)
            for item in doc.get("items", []):
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", f"{GROUP}/{VERSION}")
                items.append(item)
            token = (doc.get("metadata") or {}).get("continue")
            if not token:
                return items
            params = {"limit": "500", "continue": token}

    async def list_namespaces(self) -> list[dict[str, Any]]:
        doc = await self.request("GET", "/api/v1/namespaces")
        return list(doc.get("items", []))

    async def get_namespace(self, name: str) -> dict[str, Any] | None:
        """The Namespace, or None if there is none by that name."""
        try:
            doc = await self.request("GET", f"/api/v1/namespaces/{name}")
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(doc)

    async def list_nodes(self) -> list[dict[str, Any]]:
        doc = await self.request("GET", "/api/v1/nodes")
        return list(doc.get("items", []))

    async def patch_status(self, kind: str, namespace: str | None, name: str,
                           status: Mapping[str, Any]) -> None:
        """Merge-patch ``/status``; None values remove keys."""
        await self.request("PATCH", self._path(kind, namespace, name) + "/status",
                           {"status": status}, "application/merge-patch+json")

    async def post_event(self, ref: ObjectRef, type_: str, reason: str, message: str,
                         count: int = 1, first: float | None = None,
                         last: float | None = None) -> str:
        """A core/v1 Event on the object (what ``kubectl describe`` lists); its name."""
        namespace = ref.get("namespace") or "default"
        involved = {"apiVersion": ref["apiVersion"], "kind": ref["kind"], "name": ref["name"],
                    "uid": ref.get("uid", "")}
        if ref.get("namespace"):
            involved["namespace"] = ref["namespace"]
        name = f"{ref['name']}.{uuid.uuid4().hex[:16]}"
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": involved, "reason": reason, "message": message[:1024],
            "type": type_, "source": {"component": EVENT_COMPONENT},
            "firstTimestamp": format_time_seconds(first),
            "lastTimestamp": format_time_seconds(last), "count": count,
            "reportingComponent": f"{GROUP}/operator", "reportingInstance": self.instance,
        }
        await self.request("POST", f"/api/v1/namespaces/{namespace}/events", body)
        return name

    async def patch_event(self, namespace: str, name: str, message: str, count: int,
                          last: float | None = None) -> None:
        """Count up an Event posted before (KubeError 404 once the API server expired it)."""
        await self.request("PATCH", f"/api/v1/namespaces/{namespace or 'default'}/events/{name}",
                           {"count": count, "lastTimestamp": format_time_seconds(last),
                            "message": message[:1024]}, "application/merge-patch+json")


def format_time_seconds(at: float | None = None) -> str:
    """``at`` (default now) as RFC 3339 with whole seconds (what Event timestamps take)."""
    return format_time(float(int(time.time() if at is None else at)))[:19] + "Z"


def _message(text: str) -> str:
    try:
        doc = json.loads(text)
    except ValueError:
        return text[:500]
    return str(doc.get("message", text))[:500] if isinstance(doc, dict) else text[:500]
