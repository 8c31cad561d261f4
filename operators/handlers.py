"""kopf handlers, kept thin: each turns a watch event into one engine request and returns.

Handlers never touch the control plane; they copy the body and hand it to the engine
(``aifactory.operators.engine``), which is the only code that schedules. Creation and resumption are
the same request (the engine ignores a generation it has seen), so handlers are idempotent
and an operator restart re-delivers everything harmlessly. Deletion waits until the engine
has released the GPUs; only then does kopf remove the finalizer ``aifactory.io/finalizer``.

GPUQueues and PowerBudgets are configuration, not work: they use kopf's low-level event
handler (no finalizer, no annotations written), and their deletion simply removes them.
Namespaces are watched the same way, for the queue grants their annotations hold
(``aifactory.operators.tenancy``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import kopf

from aifactory.controller.core.errors import AifactoryError
from aifactory.operators.engine import Engine
from aifactory.operators.grid import GridVen
from aifactory.operators.kube import KubeClient, load_configuration
from aifactory.operators.metrics_server import serve_metrics
from aifactory.operators.startup import OperatorOptions, RecoveryReport, build_engine
from aifactory.operators.translate import (
    BUDGET_KIND,
    GROUP,
    PLURALS,
    QUEUE_KIND,
    SERVICE_KIND,
    TRAINING_KIND,
    VERSION,
    plain,
)

__all__ = ["FINALIZER", "EngineDiffBase", "OperatorApp", "QuietProgressStorage",
           "build_registry", "configure_settings"]

FINALIZER = f"{GROUP}/finalizer"
log = logging.getLogger(__name__)


@dataclass(slots=True)
class OperatorApp:
    """What the handlers share: options, the API client, and (after start-up) the engine."""

    options: OperatorOptions
    kubeconfig: str | None = None
    kube: KubeClient | None = None
    engine: Engine | None = None
    report: RecoveryReport | None = None
    may_write: Callable[[], bool] | None = None  # the leader election's fence
    ven: GridVen | None = None  # the OpenADR VEN (--openadr-vtn-url, --openadr3-vtn-url)

    def running_engine(self) -> Engine:
        if self.engine is None:
            raise kopf.TemporaryError("the engine is not running yet", delay=1)
        return self.engine


class EngineDiffBase(kopf.DiffBaseStorage):
    """kopf's "last handled" state, taken from the engine's memory instead of an annotation.

    kopf decides whether a watch event is new work by diffing the object against a stored
    base; its default stores that base in an annotation, one extra PATCH of every object
    it handles. Here the base is what the engine has applied: an object whose uid and
    generation the engine knows is unchanged (a NOOP, no handler runs), so the operator's
    own status writes coming back (echoes) stop at kopf's cause detection; any other is new
    (the create/resume handler applies it, idempotently). Nothing is written."""

    def __init__(self, app: OperatorApp) -> None:
        super().__init__()
        self.app = app

    def build(self, *, body: kopf.Body,
              extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        """kopf's essence, without deep-copying the status first only to drop it (our
        handlers watch no status field): the status is most of a running job's body."""
        fields = list(extra_fields or ())
        if any("status" in str(f) for f in fields):
            return super().build(body=body, extra_fields=fields)
        trimmed = kopf.Body(cast(kopf.RawBody, {k: v for k, v in body.items()
                                                if k != "status"}))
        return super().build(body=trimmed, extra_fields=fields)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        engine = self.app.engine
        if engine is None or not engine.knows(str(body.get("kind")), body):
            return None
        return self.build(body=body)

    def store(self, *, body: kopf.Body, patch: kopf.Patch,
              essence: kopf.BodyEssence) -> None:
        pass  # the engine's memory is the store


class QuietProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's handler progress in annotations, written only when there is progress to keep
    (a handler to retry). A handler that succeeded at once is purged in the same breath,
    so storing it (and kopf's ``kopf-managed`` marker with it) would cost every object one
    PATCH for nothing."""

    def store(self, *, key: Any, record: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        if record.get("success"):
            return  # done (each cause has one handler of ours): nothing to remember
        super().store(key=key, record=record, body=body, patch=patch)


def configure_settings(settings: kopf.OperatorSettings,
                       app: OperatorApp | None = None) -> None:
    """Annotations (not status) for kopf's progress, only when a handler must be retried;
    the engine as its diff base (no annotation written per object); our finalizer; only
    Warnings of kopf's own logs become Events; no dynamic CRD/namespace scanning (RBAC
    needs none)."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = QuietProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = EngineDiffBase(app) if app is not None else \
        kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.scanning.disabled = True
    settings.peering.standalone = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def build_registry(app: OperatorApp) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        cfg = load_configuration(app.kubeconfig)
        bearer: dict[str, Any] = dict(cfg.auth_settings().get("BearerToken") or {})
        header = str(bearer.get("value") or "")
        scheme, _sep, token = header.partition(" ")
        return kopf.ConnectionInfo(
            server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
            scheme=scheme or None, token=token or None,
            certificate_path=cfg.cert_file, private_key_path=cfg.key_file)

    @kopf.on.startup(registry=registry, backoff=2)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_settings(settings, app)
        if app.kube is None:
            app.kube = KubeClient(load_configuration(app.kubeconfig))
        try:
            engine, report = await build_engine(app.kube, app.options, app.may_write)
        except AifactoryError as exc:
            await app.kube.close()
            raise kopf.PermanentError(str(exc)) from exc
        port = app.options.metrics_port
        if port:
            try:
                serve_metrics(engine, port, telemetry=app.options.telemetry,
                              per_gpu=app.options.per_gpu_metrics)
            except (AifactoryError, OSError) as exc:  # OSError: the port is taken
                await engine.stop(flush_seconds=0)  # closes the API client and the backend
                raise kopf.PermanentError(f"--metrics-port {port}: {exc}") from exc
        engine.start()
        app.engine, app.report = engine, report
        app.ven = engine.grid.open_ven(engine.grid_event, engine.grid_problem)
        if app.ven is not None:
            await app.ven.start()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        if app.ven is not None:
            await app.ven.stop()
        if app.engine is not None:
            await app.engine.stop()

    # PERMANENT: a failing probe answers HTTP 500 at once instead of being retried.
    @kopf.on.probe(id="engine", registry=registry, errors=kopf.ErrorsMode.PERMANENT)
    def probe(**_: Any) -> dict[str, Any]:
        return app.running_engine().health()

    for kind in (TRAINING_KIND, SERVICE_KIND):
        _register_job(registry, app, kind)
    for kind in (QUEUE_KIND, BUDGET_KIND):
        _register_config(registry, app, kind)

    @kopf.on.event("v1", "namespaces", registry=registry, id="namespaces-event")
    async def on_namespace(event: kopf.RawEvent, **_: Any) -> None:
        """A namespace's queue grant (its annotations) appeared, changed or went."""
        body = event.get("object")
        engine = app.engine
        if isinstance(body, dict) and engine is not None and engine.namespaces is not None:
            engine.apply_namespace(plain(body), deleted=event.get("type") == "DELETED")

    @kopf.on.event("v1", "nodes", registry=registry, id="nodes-event")
    async def on_node(event: kopf.RawEvent, **_: Any) -> None:
        """A Node's health (Ready, taints, cordon, allocatable GPUs) changed, or it went."""
        body = event.get("object")
        engine = app.engine
        if isinstance(body, dict) and engine is not None and engine.follows_nodes():
            engine.apply_node(plain(body), deleted=event.get("type") == "DELETED")

    return registry


def _register_job(registry: kopf.OperatorRegistry, app: OperatorApp, kind: str) -> None:
    plural = PLURALS[kind]

    async def apply(body: kopf.Body, **_: Any) -> None:
        engine = app.running_engine()
        namespace = str(body.get("metadata", {}).get("namespace"))
        if engine.namespaces is not None and namespace not in engine.namespaces \
                and app.kube is not None:
            # The job's Namespace event may still be on its way: read its grant first.
            found = await app.kube.get_namespace(namespace)
            if found is not None:
                engine.apply_namespace(found, deleted=False)
        engine.apply_job(kind, plain(body))

    async def delete(body: kopf.Body, **_: Any) -> None:
        meta = body.get("metadata", {})
        try:
            await app.running_engine().delete_job(kind, str(meta.get("namespace")),
                                                  str(meta.get("name")), str(meta.get("uid")))
        except TimeoutError as exc:
            raise kopf.TemporaryError("the engine did not release the GPUs in time",
                                      delay=2) from exc

    for decorator in (kopf.on.create, kopf.on.resume):
        decorator(GROUP, VERSION, plural, registry=registry, id=f"{plural}-apply",
                  backoff=2)(apply)
    if kind == SERVICE_KIND:  # replicas scale; a TrainingJob's spec is immutable
        kopf.on.update(GROUP, VERSION, plural, registry=registry, id=f"{plural}-update",
                       field="spec", backoff=2)(apply)
    kopf.on.delete(GROUP, VERSION, plural, registry=registry, id=f"{plural}-release",
                   backoff=2)(delete)


def _register_config(registry: kopf.OperatorRegistry, app: OperatorApp, kind: str) -> None:
    plural = PLURALS[kind]

    async def on_event(event: kopf.RawEvent, **_: Any) -> None:
        body = event.get("object")
        if not isinstance(body, dict):
            return
        # type None: an object of a (re)listing; applying it again is a no-op unless it
        # changed while the watch was down.
        app.running_engine().apply_config(kind, plain(body),
                                          deleted=event.get("type") == "DELETED")

    kopf.on.event(GROUP, VERSION, plural, registry=registry, id=f"{plural}-event")(on_event)
