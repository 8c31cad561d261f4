"""``aifactory operator``: run the Kubernetes operator (kopf) with a chosen backend.

    aifactory operator [--backend sim] [--cluster small|PATH] [--inventory auto|nodes|factory]
                       [--sim-speed N] [--status-interval SECONDS] [--kubeconfig PATH]
                       [--status-writes-per-second 20] [--autoscale-sync-seconds 15]
                       [--sim-traffic diurnal|FILE]
                       [--health-port 8080] [--metrics-port 9402] [--policy aifactory]
                       [--telemetry auto|nvml|model|sim] [--node-metrics]
    aifactory operator --backend ray (--ray-address ADDRESS | --ray-local [--cluster SPEC])
                       [--ray-cpus-per-worker N] [--ray-topology auto|nodes|ray]
                       [--ray-prestart-per-node N] ...

``--backend sim`` runs placed work on the simulated factory inside this process. Its GPUs
are the cluster's Nodes when any has GPUs (allocatable ``nvidia.com/gpu`` or a
``nvidia.com/gpu.count`` label), else the ``--cluster`` factory spec. ``--sim-speed N`` makes
one wall second N simulated seconds, so a job with ``expectedRuntimeSeconds: 3600`` finishes
in 3600/N wall seconds.

``--backend ray`` runs every placed gang on a Ray cluster (``--ray-address``, else
``$RAY_ADDRESS``) as a pinned placement group of detached worker actors; the inventory is
the cluster's live GPU nodes (their GPU counts are what Ray can schedule). Their rack, block,
NVLink domain and GPU model come from the Kubernetes Node each Ray node names with its
``aifactory.io/node`` label (``--ray-topology nodes``; ``auto``, the default, does so when
some Node has GPUs); Ray nodes that name no Node, and GPU Nodes no Ray node names, are left
out and reported (``operators.raynodes``). ``--ray-topology ray`` reads the Ray nodes' own
``aifactory.io/*`` labels instead, as ``aifactory run --backend ray`` does. ``--ray-local`` starts a
local Ray cluster of simulated GPU nodes instead (a demo: 4 x 8 H200 in 2 racks, or the
nodes of ``--cluster``, at most 16), which goes when the operator stops.

Credentials: ``--kubeconfig``, else ``$KUBECONFIG``, else the in-cluster ServiceAccount.
The liveness/readiness endpoint is ``http://0.0.0.0:<health-port>/healthz`` (ready once
start-up recovery finished); the factory's and the operator's Prometheus metrics are on
``<metrics-port>/metrics`` (``--telemetry``: where GPU power comes from, see
``aifactory.operators.metrics_server``).
"""

from __future__ import annotations

import argparse
import http.server
import logging
import os
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

from aifactory.controller.core.errors import AifactoryError
from aifactory.controller.inputs.factory import load_factory
from aifactory.controller.observe.exporter import DEFAULT_METRICS_PORT
from aifactory.controller.placement.registry import POLICY_NAMES
from aifactory.operators.books import EngineOptions
from aifactory.operators.grid import GridOptions
from aifactory.operators.inventory import INVENTORY_MODES
from aifactory.operators.leader import LeaderElector, LeaseTimings
from aifactory.operators.metrics_server import TELEMETRY_CHOICES
from aifactory.operators.session import (
    BACKENDS,
    RAY_TOPOLOGIES,
    BackendError,
    RayOptions,
    check_backend,
)
from aifactory.operators.startup import OperatorOptions

DEFAULT_CLUSTER = "small"
MAX_LOCAL_RAY_NODES = 16  # one raylet (~150 MB) per node
LOCAL_CPUS_PER_WORKER = 0.05  # local Ray nodes share this machine's few CPUs

__all__ = ["main", "parser"]


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aifactory operator",
                                description=(__doc__ or "").replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="sim",
                   help="where placed work runs (default: sim)")
    p.add_argument("--cluster", default=None,
                   help="factory spec for the simulated backend when the cluster's Nodes have "
                        "no GPUs: built-in name (small, 100k, nvl72) or a SimulatedFactory "
                        "YAML (default: small); with --ray-local, the nodes to start")
    p.add_argument("--inventory", choices=INVENTORY_MODES, default="auto",
                   help="GPU inventory: Node objects, the --cluster spec, or auto (Nodes if "
                        "any has GPUs, else the spec)")
    p.add_argument("--sim-speed", type=_positive, default=1.0,
                   help="simulated seconds per wall second (default 1)")
    p.add_argument("--status-interval", type=_positive, default=5.0,
                   help="seconds between energy/power/cost refreshes of running jobs and "
                        "queue/budget status (default 5)")
    p.add_argument("--status-writes-per-second", type=_positive, default=20.0,
                   help="budget of status writes that only refresh meters (energy, power, "
                        "cost, GPU-hours) or words, over all objects; phase and placement "
                        "changes are written at once, outside it (default 20)")
    p.add_argument("--autoscale-sync-seconds", type=_positive, default=15.0,
                   help="seconds between autoscaling decisions of InferenceServices with "
                        "spec.autoscaling (default 15, as the HorizontalPodAutoscaler)")
    p.add_argument("--sim-traffic", default=None, metavar="diurnal|FILE",
                   help="--backend sim: drive every InferenceService with simulated requests "
                        "('diurnal', relative to operator start, or a CSV of seconds,"
                        "requests_per_second or seconds,relative_load, re-read when it "
                        "changes), so replicas autoscale and watts follow load")
    p.add_argument("--tick", type=_positive, default=0.1,
                   help="seconds between engine passes when nothing happens (default 0.1)")
    p.add_argument("--policy", choices=POLICY_NAMES, default="aifactory",
                   help="placement policy (default aifactory)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to run on (--backend ray; default: $RAY_ADDRESS)")
    p.add_argument("--ray-local", action="store_true",
                   help="--backend ray on a local Ray cluster of simulated GPU nodes this "
                        "process starts and stops (a demo; no restart recovery)")
    p.add_argument("--ray-cpus-per-worker", type=_positive, default=None,
                   help=f"CPUs each Ray worker reserves (default 1, {LOCAL_CPUS_PER_WORKER:g} "
                        "with --ray-local)")
    p.add_argument("--ray-container-images", action="store_true",
                   help="--backend ray: the Ray nodes run container images (podman on every "
                        "node), so a job's runtime.image becomes Ray's image_uri; without "
                        "it such a job fails with RuntimeImageUnsupported")
    p.add_argument("--ray-topology", choices=RAY_TOPOLOGIES, default=None,
                   help="where the Ray nodes' rack, block, NVLink domain and GPU model come "
                        "from: nodes (the Kubernetes Node each names with its "
                        "aifactory.io/node label), ray (the Ray nodes' own labels), auto "
                        "(nodes when some Node has GPUs; default)")
    p.add_argument("--ray-prestart-per-node", type=_count, default=None,
                   help="idle Ray workers kept started on every GPU node, handed to gangs "
                        "so they start without new worker processes (default 2; 0: none)")
    p.add_argument("--telemetry", choices=TELEMETRY_CHOICES, default="auto",
                   help="GPU power and energy: auto (the backend's own: the simulated "
                        "factory's, or NVML on each Ray node else the power model), nvml, "
                        "model, or sim (default auto)")
    p.add_argument("--node-metrics", action="store_true",
                   help="node-level GPU series only, no per-GPU series (large factories)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig (default: $KUBECONFIG, "
                   "then in-cluster)")
    p.add_argument("--health-port", type=int, default=8080,
                   help="port of /healthz (liveness and readiness); 0 disables (default 8080)")
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help="port of Prometheus /metrics (the factory exporter and the operator's "
                        f"counters); 0 disables (default {DEFAULT_METRICS_PORT})")
    p.add_argument("--node-grace-seconds", type=_positive, default=40.0,
                   help="with Node objects as the inventory, a node not Ready for this long "
                        "fails the gangs there (they restart from their last checkpoint); "
                        "a shorter blip changes nothing (default 40)")
    p.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                   help="hold a coordination.k8s.io Lease before placing anything, so only "
                        "one of several replicas acts (default on)")
    p.add_argument("--lease-namespace",
                   default=os.environ.get("POD_NAMESPACE") or "aifactory-system",
                   help="namespace of the Lease (default: $POD_NAMESPACE, else "
                        "aifactory-system)")
    p.add_argument("--lease-name", default="aifactory-operator",
                   help="name of the Lease (default aifactory-operator)")
    p.add_argument("--leader-identity",
                   default=os.environ.get("POD_NAME") or socket.gethostname(),
                   help="this replica's identity in the Lease (default: $POD_NAME, else the "
                        "host name); a restarted pod keeps it and takes its Lease back at once")
    p.add_argument("--lease-seconds", type=_positive, default=10.0,
                   help="a standby takes over this long after the leader's last renewal; "
                        "the leader stops writing after 0.7 of it without renewing "
                        "(default 10)")
    p.add_argument("--grid-strategy", choices=("flexible", "uniform", "pause-newest"),
                   default="flexible", help="how load is shed when a PowerBudget's schedule "
                   "or a grid event lowers it: flexible (caps by spec.flexibility tier, then "
                   "pauses; tier 0 never touched), or a baseline")
    p.add_argument("--grid-levels", default="100,90,75,50",
                   help="percent of a budget's spec.watts for OpenADR SIMPLE levels 0,1,2,3")
    p.add_argument("--openadr-vtn-url", default=None,
                   help="act as an OpenADR 2.0b VEN of this VTN (e.g. https://vtn.utility."
                   "example/OpenADR2/Simple/2.0b): its events lower the power budgets")
    p.add_argument("--openadr-ven-name", default="aifactory", help="our VEN name at the VTN")
    p.add_argument("--openadr-credentials", default=None, metavar="DIR",
                   help="a mounted Secret: for 2.0b tls.crt, tls.key, ca.crt and optionally "
                   "vtn-fingerprint; for OpenADR 3 client-id, client-secret and optionally "
                   "ca.crt (only paths are logged)")
    p.add_argument("--openadr-budgets", default="",
                   help="comma-separated PowerBudgets the VTN's events lower (default: all)")
    p.add_argument("--openadr3-vtn-url", default=None,
                   help="act as an OpenADR 3 VEN of this VTN (its base URL, e.g. https://vtn."
                   "utility.example/openadr3/3.1.0; not with --openadr-vtn-url)")
    p.add_argument("--openadr3-ven-name", default="aifactory",
                   help="our venName at the OpenADR 3 VTN")
    p.add_argument("--openadr3-program", default="",
                   help="comma-separated programNames whose events we follow (default: all)")
    p.add_argument("--openadr3-targets", default="",
                   help="comma-separated target terms that name this site, besides the VEN "
                   "name and the targets the utility set on our VEN object")
    p.add_argument("--openadr3-token-url", default=None,
                   help="the OAuth2 token endpoint (default: the VTN's GET /auth/server)")
    p.add_argument("--openadr3-poll-seconds", type=float, default=10.0,
                   help="how often the VTN's programs and events are read (default 10)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return p


def _ray_options(args: argparse.Namespace) -> RayOptions:
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    if args.ray_local and args.ray_address:
        raise BackendError("--ray-local starts its own cluster; drop --ray-address")
    if not args.ray_local and address is None:
        raise BackendError("--backend ray needs a Ray cluster: --ray-address HOST:PORT (or "
                           "$RAY_ADDRESS), or --ray-local for a local demo cluster of "
                           "simulated GPU nodes")
    if args.inventory != "auto":
        raise BackendError("--inventory applies to --backend sim; with --backend ray the "
                           "inventory is the Ray cluster's live GPU nodes")
    if args.telemetry == "sim":
        raise BackendError("--telemetry sim reads the simulated backend; with --backend ray "
                           "use auto (NVML on every Ray node, else the power model), nvml or "
                           "model")
    nodes: tuple[Any, ...] = ()
    if args.ray_local and args.cluster:
        nodes = tuple(load_factory(args.cluster).nodes)
        if len(nodes) > MAX_LOCAL_RAY_NODES:
            raise BackendError(f"--cluster: a local Ray cluster runs one raylet per node; "
                               f"{len(nodes)} nodes is too many (at most "
                               f"{MAX_LOCAL_RAY_NODES})")
    elif args.cluster:
        raise BackendError("--cluster with --backend ray applies to --ray-local only; a Ray "
                           "cluster's nodes are its inventory")
    if args.ray_local and args.ray_topology == "nodes":
        raise BackendError("--ray-topology nodes joins Ray nodes to Kubernetes Nodes; the "
                           "simulated nodes of --ray-local have none (use auto or ray)")
    cpus = args.ray_cpus_per_worker or (LOCAL_CPUS_PER_WORKER if args.ray_local else 1.0)
    return RayOptions(address=None if args.ray_local else address, local=args.ray_local,
                      local_nodes=nodes, cpus_per_worker=cpus,
                      prestart_per_node=2 if args.ray_prestart_per_node is None
                      else args.ray_prestart_per_node,
                      telemetry="model" if args.telemetry == "model" else "auto",
                      container_images=args.ray_container_images,
                      topology=args.ray_topology or "auto")


def _grid_options(args: argparse.Namespace) -> GridOptions:
    try:
        levels = [float(x) for x in args.grid_levels.split(",")]
    except ValueError:
        levels = []
    if len(levels) != 4 or not all(0 <= x <= 100 for x in levels):
        raise BackendError(f"--grid-levels: four percents 0-100 for levels 0,1,2,3, e.g. "
                           f"100,90,75,50; got {args.grid_levels!r}")
    if args.openadr_credentials and not os.path.isdir(args.openadr_credentials):
        raise BackendError(f"--openadr-credentials: {args.openadr_credentials} is not a "
                           "directory (mount the Secret there)")
    if args.openadr_vtn_url and args.openadr3_vtn_url:
        raise BackendError("--openadr-vtn-url (OpenADR 2.0b) and --openadr3-vtn-url (OpenADR "
                           "3) exclude each other: the site is a VEN of one VTN; keep one")
    if args.openadr3_vtn_url:
        missing = [f for f in ("client-id", "client-secret") if not args.openadr_credentials
                   or not os.path.isfile(os.path.join(args.openadr_credentials, f))]
        if missing:
            raise BackendError(f"--openadr3-vtn-url needs --openadr-credentials DIR holding "
                               f"the OAuth2 client's files client-id and client-secret (a "
                               f"mounted Secret); missing: {', '.join(missing)}")
        if args.openadr3_poll_seconds <= 0:
            raise BackendError("--openadr3-poll-seconds: a positive number of seconds, e.g. "
                               f"10; got {args.openadr3_poll_seconds:g}")
    return GridOptions(strategy=args.grid_strategy, levels=dict(enumerate(levels)),
                       vtn_url=args.openadr_vtn_url, ven_name=args.openadr_ven_name,
                       credentials_dir=args.openadr_credentials,
                       budgets=_names(args.openadr_budgets), oa3_url=args.openadr3_vtn_url,
                       oa3_ven_name=args.openadr3_ven_name,
                       oa3_programs=_names(args.openadr3_program),
                       oa3_targets=_names(args.openadr3_targets),
                       oa3_token_url=args.openadr3_token_url,
                       oa3_poll_seconds=args.openadr3_poll_seconds)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def options_from(args: argparse.Namespace) -> OperatorOptions:
    if args.backend != "sim" and args.sim_speed != 1.0:
        raise BackendError("--sim-speed applies to --backend sim only")
    if args.backend == "sim" and (args.ray_local or args.ray_address or
                                  args.ray_cpus_per_worker or args.ray_container_images or
                                  args.ray_topology or args.ray_prestart_per_node is not None):
        raise BackendError("--ray-local, --ray-address, --ray-cpus-per-worker, "
                           "--ray-container-images, --ray-topology and --ray-prestart-per-node "
                           "apply to --backend ray only")
    ray = _ray_options(args) if args.backend == "ray" else RayOptions()
    if args.sim_traffic and args.backend != "sim":
        raise BackendError("--sim-traffic drives the simulated backend's InferenceServices; "
                           "with --backend ray the replicas report their own load")
    engine = EngineOptions(tick_seconds=args.tick, status_interval_seconds=args.status_interval,
                           meter_writes_per_second=args.status_writes_per_second,
                           autoscale_sync_seconds=args.autoscale_sync_seconds,
                           sim_traffic=args.sim_traffic)
    if not 0 <= args.metrics_port <= 65535:
        raise BackendError(f"--metrics-port: must be a port number (0 disables), got "
                           f"{args.metrics_port}")
    return OperatorOptions(grid=_grid_options(args),
                           backend=args.backend, cluster=args.cluster or DEFAULT_CLUSTER,
                           inventory=args.inventory, sim_speed=args.sim_speed,
                           policy=args.policy, ray=ray, engine=engine,
                           metrics_port=args.metrics_port, telemetry=args.telemetry,
                           per_gpu_metrics=not args.node_metrics,
                           node_grace_seconds=args.node_grace_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("kopf").setLevel(logging.WARNING)
        logging.getLogger("aiohttp").setLevel(logging.WARNING)
    try:
        options = options_from(args)
        check_backend(options.backend)  # fail now, not after kopf started
        if options.backend == "sim" and options.inventory != "nodes":
            load_factory(options.cluster)  # a wrong --cluster is an error before start-up
    except AifactoryError as exc:
        print(f"aifactory operator: error: {exc}", file=sys.stderr)
        return 2
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig

    import kopf

    from aifactory.operators.handlers import OperatorApp, build_registry

    app = OperatorApp(options, kubeconfig=args.kubeconfig)
    if args.leader_elect:
        elector = _campaign(args)
        app.may_write = elector.is_leader
    registry = build_registry(app)
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    try:
        kopf.run(registry=registry, clusterwide=True, standalone=True,
                 liveness_endpoint=liveness)
    except Exception as exc:  # kopf wraps the cause; say it in one line
        cause: BaseException = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        print(f"aifactory operator: error: start-up failed: {cause}", file=sys.stderr)
        return 1
    return 0


def _campaign(args: argparse.Namespace) -> LeaderElector:
    """Wait, as a standby serving health, until this replica holds the Lease. Losing it
    later ends the process at once (the pod restarts as a standby): the fence has already
    stopped its writes by then."""
    lease = args.lease_seconds
    timings = LeaseTimings(lease, renew_deadline_seconds=0.7 * lease,
                           retry_seconds=0.2 * lease)
    elector = LeaderElector(args.lease_namespace, args.lease_name, args.leader_identity,
                            timings, kubeconfig=args.kubeconfig)

    def lost() -> None:
        logging.getLogger(__name__).critical(
            "lost the leader lease %s/%s; exiting so a standby takes over",
            args.lease_namespace, args.lease_name)
        logging.shutdown()
        os._exit(3)

    standby = _serve_standby_health(args.health_port)
    elector.start(lost)
    logging.getLogger(__name__).info("waiting for the leader lease %s/%s as %s",
                                     args.lease_namespace, args.lease_name,
                                     args.leader_identity)
    try:
        elector.leading.wait()
    finally:
        if standby is not None:
            standby.shutdown()
            standby.server_close()
    return elector


def _serve_standby_health(port: int) -> http.server.ThreadingHTTPServer | None:
    """``/healthz`` while waiting for the Lease: a standby is alive and ready to take over."""
    if not port:
        return None

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path.rstrip("/") == "/healthz"
            body = b'{"standby": true}' if ok else b"not found"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json" if ok else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Health)
    threading.Thread(target=server.serve_forever, name="aifactory-standby-health",
                     daemon=True).start()
    return server


if __name__ == "__main__":
    sys.exit(main())
