"""Leader election on a ``coordination.k8s.io/v1`` Lease, the way client-go does it.

Several replicas of the operator may run (a Deployment of 2, a rollout's overlap, a stuck
old pod); only the holder of the Lease ``aifactory-system/aifactory-operator`` places work.
The others wait as standbys, serving health, and take over when the holder stops renewing.

The protocol is client-go's ``leaderelection`` on a Lease:

- A candidate reads the Lease. If another identity holds it, the candidate remembers when it
  *saw* the record last change (its own monotonic clock, never the holder's timestamps: the
  clocks of two machines need not agree) and takes over only when the record has not
  changed for ``lease_seconds``. Every write is an update on the ``resourceVersion`` read,
  so two candidates never both win: the API server refuses the second with 409 Conflict.
- The holder renews every ``retry_seconds``. If it has not renewed for
  ``renew_deadline_seconds`` it stops (the process exits; the pod restarts as a standby).
  ``renew_deadline_seconds < lease_seconds``, so a holder stops writing before any other
  candidate may take the Lease: ``is_leader()`` turns False at the renew deadline, and the
  outbox writes status (placements) only while it is True. That is the fence.
- On a clean shutdown the holder gives the Lease up (empty holder, 1 s duration), so a
  rollout hands over at once.

The elector runs on a thread of its own with its own event loop and API client, so renewals
never wait behind the engine's work on the operator's loop. Timings default to 10 s lease,
7 s renew deadline and 2 s retry: a standby takes over at most ~12 s after the leader died.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aifactory.operators.kube import KubeClient, KubeError, load_configuration
from aifactory.operators.translate import format_time

__all__ = ["LeaderElector", "LeaseTimings"]

log = logging.getLogger(__name__)
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


@dataclass(frozen=True, slots=True)
class LeaseTimings:
    """Seconds. A standby takes over ``lease_seconds`` after it last saw the Lease renewed;
    a holder that could not renew for ``renew_deadline_seconds`` stops; both retry every
    ``retry_seconds``."""

    lease_seconds: float = 10.0
    renew_deadline_seconds: float = 7.0
    retry_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_seconds < self.renew_deadline_seconds < self.lease_seconds:
            raise ValueError("leader election needs 0 < retry < renew deadline < lease "
                             f"duration, got {self.retry_seconds}, "
                             f"{self.renew_deadline_seconds}, {self.lease_seconds}")


class LeaderElector:
    """One candidate for the Lease ``namespace/name`` under ``identity``."""

    def __init__(self, namespace: str, name: str, identity: str,
                 timings: LeaseTimings = LeaseTimings(),
                 kubeconfig: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timings = timings
        self._kubeconfig = kubeconfig
        self._clock = clock
        self._renewed_at: float | None = None  # our clock, at our last successful write
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self.leading = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.transitions = 0

    # ----------------------------------------------------------------- the public face

    def is_leader(self) -> bool:
        """True while this candidate holds the Lease and renewed it within the renew
        deadline: writes that act on the cluster happen only then."""
        renewed = self._renewed_at
        return renewed is not None and \
            self._clock() - renewed < self.timings.renew_deadline_seconds

    def start(self, on_lost: Callable[[], None]) -> None:
        """Campaign (and, once leading, renew) on a thread; ``on_lost`` is called there if
        leadership is lost. ``leading`` is set when the Lease is first acquired."""
        self._thread = threading.Thread(target=self._thread_main, args=(on_lost,),
                                        name="aifactory-leader-election", daemon=True)
        self._thread.start()

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """Stop campaigning; a holder gives the Lease up."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_seconds)

    # ----------------------------------------------------------------- the loop

    def _thread_main(self, on_lost: Callable[[], None]) -> None:
        asyncio.run(self._run(on_lost))

    async def _run(self, on_lost: Callable[[], None]) -> None:
        kube = KubeClient(load_configuration(self._kubeconfig), concurrency=1,
                          timeout_seconds=self.timings.retry_seconds * 2)
        try:
            while not self._stop.is_set():
                if await self._try_acquire_or_renew(kube):
                    if not self.leading.is_set():
                        log.info("leader election: %s holds lease %s/%s", self.identity,
                                 self.namespace, self.name)
                        self.leading.set()
                elif self.leading.is_set() and not self.is_leader():
                    log.error("leader election: %s could not renew lease %s/%s for %.0f s; "
                              "stopping", self.identity, self.namespace, self.name,
                              self.timings.renew_deadline_seconds)
                    on_lost()
                    return
                await self._sleep(self.timings.retry_seconds)
            if self.leading.is_set() and self.is_leader():
                await self._release(kube)
        finally:
            await kube.close()

    async def _sleep(self, seconds: float) -> None:
        deadline = self._clock() + seconds
        while not self._stop.is_set() and self._clock() < deadline:
            await asyncio.sleep(min(0.1, seconds))

    async def _try_acquire_or_renew(self, kube: KubeClient) -> bool:
        """One attempt; True if we hold the Lease now (renewed or newly acquired)."""
        base = LEASES.format(namespace=self.namespace)
        now = self._clock()
        stamp = format_time(time.time())
        try:
            lease = await kube.request("GET", f"{base}/{self.name}")
        except KubeError as exc:
            if exc.status != 404:
                log.warning("leader election: reading the lease failed: %s", exc)
                return False
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(stamp, stamp, 0)}
            return await self._write(kube, "POST", base, body, now)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        if holder and holder != self.identity:
            duration = float(spec.get("leaseDurationSeconds") or self.timings.lease_seconds)
            if now - self._observed_at < duration:
                return False  # held, and renewed within its duration as we saw it
        ours = holder == self.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        acquired = str(spec["acquireTime"]) if ours and spec.get("acquireTime") else stamp
        lease["spec"] = self._spec(stamp, acquired, transitions)
        return await self._write(kube, "PUT", f"{base}/{self.name}", lease, now)

    def _spec(self, renew: str, acquired: str, transitions: int) -> dict[str, Any]:
        return {"holderIdentity": self.identity,
                "leaseDurationSeconds": round(self.timings.lease_seconds),
                "acquireTime": acquired, "renewTime": renew, "leaseTransitions": transitions}

    async def _write(self, kube: KubeClient, method: str, path: str, body: Any,
                     now: float) -> bool:
        try:
            written = await kube.request(method, path, body)
        except KubeError as exc:
            if exc.status != 409:  # 409: another candidate wrote first
                log.warning("leader election: writing the lease failed: %s", exc)
            return False
        spec = (written or {}).get("spec") or {}
        self._observed = (spec.get("holderIdentity"), spec.get("renewTime"),
                          spec.get("leaseTransitions"))
        self._observed_at = now
        self._renewed_at = now
        self.transitions = int(spec.get("leaseTransitions") or 0)
        return True

    async def _release(self, kube: KubeClient) -> None:
        path = LEASES.format(namespace=self.namespace) + f"/{self.name}"
        try:
            lease = await kube.request("GET", path)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"].update(holderIdentity="", leaseDurationSeconds=1,
                                 renewTime=format_time(time.time()))
            await kube.request("PUT", path, lease)
            self._renewed_at = None
            log.info("leader election: %s gave up lease %s/%s", self.identity,
                     self.namespace, self.name)
        except KubeError as exc:
            log.warning("leader election: giving up the lease failed: %s", exc)
