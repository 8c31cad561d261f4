"""``aifactory operator``: run the Kubernetes operator (kopf) with a chosen backend.

    aifactory operator --backend sim [--cluster small|PATH] [--inventory auto|nodes|factory]
                       [--sim-speed N] [--status-interval SECONDS] [--kubeconfig PATH]
                       [--health-port 8080] [--metrics-port 9090] [--policy aifactory]

``--backend sim`` runs placed work on the simulated factory inside this process. Its GPUs
are the cluster's Nodes when any has GPUs (allocatable ``nvidia.com/gpu`` or a
``nvidia.com/gpu.count`` label), else the ``--cluster`` factory spec. ``--sim-speed N`` makes
one wall second N simulated seconds, so a job with ``expectedRuntimeSeconds: 3600`` finishes
in 3600/N wall seconds. ``--backend ray`` needs the Ray backend module (its own issue).

Credentials: ``--kubeconfig``, else ``$KUBECONFIG``, else the in-cluster ServiceAccount.
The liveness/readiness endpoint is ``http://0.0.0.0:<health-port>/healthz`` (ready once
start-up recovery finished); Prometheus metrics are on ``<metrics-port>/metrics``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from controller.errors import AifactoryError
from controller.factory import load_factory
from controller.policies import POLICY_NAMES
from operators.backends import BACKENDS, BackendError, check_backend
from operators.engine import EngineOptions
from operators.inventory import INVENTORY_MODES
from operators.startup import OperatorOptions

__all__ = ["main", "parser"]


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aifactory operator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="sim",
                   help="where placed work runs (default: sim)")
    p.add_argument("--cluster", default="small",
                   help="factory spec for the simulated backend when the cluster's Nodes have "
                        "no GPUs: built-in name (small, 100k, nvl72) or a SimulatedFactory "
                        "YAML (default: small)")
    p.add_argument("--inventory", choices=INVENTORY_MODES, default="auto",
                   help="GPU inventory: Node objects, the --cluster spec, or auto (Nodes if "
                        "any has GPUs, else the spec)")
    p.add_argument("--sim-speed", type=_positive, default=1.0,
                   help="simulated seconds per wall second (default 1)")
    p.add_argument("--status-interval", type=_positive, default=5.0,
                   help="seconds between energy/power/cost refreshes of running jobs and "
                        "queue/budget status (default 5)")
    p.add_argument("--tick", type=_positive, default=0.1,
                   help="seconds between engine passes when nothing happens (default 0.1)")
    p.add_argument("--policy", choices=POLICY_NAMES, default="aifactory",
                   help="placement policy (default aifactory)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (--backend ray)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig (default: $KUBECONFIG, "
                   "then in-cluster)")
    p.add_argument("--health-port", type=int, default=8080,
                   help="port of /healthz (liveness and readiness); 0 disables (default 8080)")
    p.add_argument("--metrics-port", type=int, default=9090,
                   help="port of Prometheus /metrics; 0 disables (default 9090)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return p


def options_from(args: argparse.Namespace) -> OperatorOptions:
    if args.backend != "sim" and args.sim_speed != 1.0:
        raise BackendError("--sim-speed applies to --backend sim only")
    engine = EngineOptions(tick_seconds=args.tick, status_interval_seconds=args.status_interval)
    return OperatorOptions(backend=args.backend, cluster=args.cluster, inventory=args.inventory,
                           sim_speed=args.sim_speed, policy=args.policy,
                           ray_address=args.ray_address, engine=engine)


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

    from operators.handlers import OperatorApp, build_registry
    from operators.metrics import serve_metrics

    app = OperatorApp(options, kubeconfig=args.kubeconfig)
    registry = build_registry(app)
    if args.metrics_port:
        serve_metrics(app, args.metrics_port)
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


if __name__ == "__main__":
    sys.exit(main())
