"""How fast the operator places jobs on a real API server: prints the numbers, asserts none.

    python benchmarks/operator_latency.py [--singles 20] [--burst 300] [--json PATH]

Starts etcd + kube-apiserver (``tests/integration/k8s_env.py``; run
``hack/install-test-deps.sh`` once), installs ``manifests/`` with ``kubectl apply -k``, and
runs ``aifactory operator --backend sim`` as a subprocess under the operator's own
ServiceAccount. Then:

* singles: ``--singles`` TrainingJobs (1 worker x 1 GPU), one at a time; for each, the time
  from just before ``kubectl apply`` starts to the moment a watch sees ``status.phase:
  Running`` (so it includes kubectl's own start-up), and from the watch's ADDED event to
  Running (the operator's share);
* burst: ``--burst`` TrainingJobs (1 x 2 GPUs each, all fit at once) in one
  ``kubectl apply``; the time until the watch has seen every one Running.

The factory is 4 blocks x 4 racks x 8 nodes x 8 GPUs = 1024 simulated H200s. Everything
started is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.k8s_env import KubeTestEnv
from tests.integration.operator_env import (
    OperatorProcess,
    Watch,
    ensure_namespace,
    install_manifests,
    training_job,
    wait_for,
)

FACTORY = """\
apiVersion: aifactory.io/v1alpha1
kind: SimulatedFactory
metadata: {name: bench-1024}
spec:
  levels: [block, rack, node]
  nodeGroups:
  - {gpuModel: H200, gpusPerNode: 8, blocks: 4, racksPerBlock: 4, nodesPerRack: 8}
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--singles", type=int, default=20)
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="aifactory-bench-") as tmp, KubeTestEnv() as env:
        work = Path(tmp)
        (work / "factory.yaml").write_text(FACTORY)
        install_manifests(env)
        ensure_namespace(env, "bench")
        operator = OperatorProcess(env, work, [f"--cluster={work / 'factory.yaml'}",
                                               "--status-interval=5"])
        watch = Watch(env, "trainingjobs")
        try:
            operator.start()
            total, server = [], []
            for i in range(args.singles):
                name = f"single-{i:03d}"
                started = time.monotonic()
                env.apply(training_job(name, "bench", expectedRuntimeSeconds=86400))
                watch.wait_phase("bench", name, ["Running"], timeout=30)
                running = watch.first[("bench", name)]["Running"]
                total.append(running - started)
                server.append(running - watch.added[("bench", name)])
            results["singles"] = {
                "count": args.singles,
                "apply_to_running_ms_p50": 1e3 * statistics.median(total),
                "apply_to_running_ms_p95": 1e3 * percentile(total, 95),
                "added_to_running_ms_p50": 1e3 * statistics.median(server),
                "added_to_running_ms_p95": 1e3 * percentile(server, 95),
            }
            docs = [training_job(f"burst-{i:03d}", "bench", 1, 2, expectedRuntimeSeconds=86400)
                    for i in range(args.burst)]
            started = time.monotonic()
            env.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs), timeout=300)
            applied = time.monotonic()
            names = [("bench", d["metadata"]["name"]) for d in docs]
            wait_for(lambda: all("Running" in watch.first.get(k, {}) for k in names), 300,
                     "every burst job Running", interval=0.1)
            last = max(watch.first[k]["Running"] for k in names)
            results["burst"] = {
                "count": args.burst,
                "kubectl_apply_seconds": applied - started,
                "all_running_seconds": last - started,
            }
            results["operator_metrics"] = {
                line.split()[0]: float(line.split()[1])
                for line in operator.metrics().splitlines()
                if line.startswith("aifactory_operator_") and "{" not in line}
        finally:
            watch.close()
            operator.stop()
    print(json.dumps(results, indent=2))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
