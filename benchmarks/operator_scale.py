"""The operator at factory scale on a real API server: prints numbers, asserts none.

    python -m benchmarks.operator_scale [--scenarios burst,ramp,kueue] [--smoke]
        [--nodes 2500] [--burst 3000] [--running 20000] [--json PATH]
        [--operator-pythonpath DIR]   # run another checkout's operator (before/after)

Starts etcd + kube-apiserver (``tests/integration/k8s_env.py``; ``hack/install-test-deps.sh``
builds them), installs ``manifests/``, creates Node objects and runs ``aifactory operator
--backend sim --inventory nodes`` as a subprocess under its own ServiceAccount, so its GPUs
are the Nodes. Jobs are created over HTTP by this process (16 at a time) and followed by
one watch; the API server's own ``apiserver_request_total`` counts the operator's writes.

* **burst** (``--nodes`` Nodes of 8 GPUs, racks of 16 nodes, blocks of 8 racks): ``--burst``
  TrainingJobs, 70 % 1x1, 20 % 1x8, 10 % 4x8 rack-required, created as fast as the API
  server takes them. Reported: seconds from the last POST until every job has a phase;
  phase latency (each job's POST returning to the watch's first sight of its first phase,
  and of Running) p50/p95/p99; writes per second by verb.
* **ramp**: once the burst finished (90 s runs), ``--running`` 1x1 TrainingJobs that run
  for a day; then 60 s of steady state with all of them running. Reported: phase latency
  during the ramp, status PATCH/s and Event POST/PATCH/s in steady state, operator CPU
  seconds per second and peak RSS, API-server CPU.
* **kueue**: Kueue's scheduler-performance scenario (``test/performance/scheduler``,
  baseline generator) in GPU terms: 640 Nodes (1 block x 10 racks x 64, 8 GPUs each); 30
  GPUQueues in 5 cohorts of 6, each 20 GPUs nominal, borrowing up to 100; per queue 350
  small (2 workers x 1 GPU, 0.2 s, priority 50, one every 100 ms), 100 medium (4 x 1,
  0.5 s, priority 100, every 500 ms), 50 large (8 x 1, 1 s, priority 200, every 1.2 s),
  each class alternating rack-required and rack-preferred. Reported: wall time until all
  15,000 finished, mean and p90 admission time per class (the watch's first sight of
  Admitted/Running minus the POST's return), quota usage (GPU-seconds of admitted jobs over
  nominal GPUs x wall time).

``--smoke`` shrinks every scenario to run in a minute or two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aifactory.operators.kube import KubeClient, KubeError, load_configuration
from aifactory.operators.translate import parse_time
from benchmarks.common import machine, machine_line, markdown_table
from tests.integration.k8s_env import KubeTestEnv
from tests.integration.operator_env import (
    OperatorProcess,
    Watch,
    ensure_namespace,
    gpu_node,
    install_manifests,
    training_job,
    wait_for,
)

NS = "scale"
HOLDING = ("Admitted", "Running", "Succeeded")
PLURAL = "/apis/aifactory.io/v1alpha1/namespaces/{ns}/trainingjobs"
CLK_TCK = 100.0  # os.sysconf("SC_CLK_TCK") on Linux


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mib(pid: int, key: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def request_counts(env: KubeTestEnv) -> dict[str, float]:
    """``apiserver_request_total`` summed by verb/resource/subresource, from its /metrics."""
    out: dict[str, float] = {}
    text = env.kubectl("get", "--raw", "/metrics", timeout=60).stdout
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(part.split("=", 1) for part in
                      line[line.index("{") + 1:line.rindex("}")].replace('"', "").split(","))
        key = f"{labels.get('verb')} {labels.get('resource')}"
        if labels.get("subresource"):
            key += "/" + labels["subresource"]
        out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def rates(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    keys = ("PATCH trainingjobs/status", "PATCH trainingjobs", "POST events", "PATCH events",
            "PATCH gpuqueues/status", "PATCH powerbudgets/status")
    return {k: (after.get(k, 0.0) - before.get(k, 0.0)) / seconds for k in keys}


class Creator:
    """POSTs TrainingJobs as the cluster admin, ``concurrency`` at a time; records when
    each POST returned."""

    def __init__(self, env: KubeTestEnv, concurrency: int = 16) -> None:
        self.kube = KubeClient(load_configuration(str(env.kubeconfig)), concurrency)
        self.created: dict[tuple[str, str], float] = {}
        self.created_wall: dict[tuple[str, str], float] = {}
        self.errors = 0

    async def create(self, body: dict[str, Any]) -> None:
        ns = body["metadata"]["namespace"]
        for attempt in range(5):
            try:
                await self.kube.request("POST", PLURAL.format(ns=ns), body)
                self.created[(ns, body["metadata"]["name"])] = time.monotonic()
                self.created_wall[(ns, body["metadata"]["name"])] = time.time()
                return
            except KubeError as exc:
                if exc.status == 409:
                    return
                self.errors += 1
                await asyncio.sleep(0.2 * (attempt + 1))

    async def create_all(self, bodies: Iterable[dict[str, Any]]) -> None:
        await asyncio.gather(*(self.create(b) for b in bodies))

    async def close(self) -> None:
        await self.kube.close()


def make_nodes(count: int, nodes_per_rack: int, racks_per_block: int) -> list[dict[str, Any]]:
    out = []
    for i in range(count):
        rack = i // nodes_per_rack
        out.append(gpu_node(f"gpu-{i:05d}", f"r{rack:04d}", f"b{rack // racks_per_block:03d}"))
    return out


def apply_many(env: KubeTestEnv, docs: list[dict[str, Any]], chunk: int = 500) -> None:
    for i in range(0, len(docs), chunk):
        env.apply({"apiVersion": "v1", "kind": "List", "items": docs[i:i + chunk]})


def burst_jobs(count: int, runtime: float) -> list[dict[str, Any]]:
    out = []
    for i in range(count):
        kind = i % 10
        if kind < 7:
            job = training_job(f"burst-{i:05d}", NS, 1, 1)
        elif kind < 9:
            job = training_job(f"burst-{i:05d}", NS, 1, 8)
        else:
            job = training_job(f"burst-{i:05d}", NS, 4, 8, topology={"required": "rack"})
        job["spec"]["expectedRuntimeSeconds"] = runtime
        out.append(job)
    return out


def phase_latencies(watch: Watch, keys: Iterable[tuple[str, str]],
                    created: dict[tuple[str, str], float]) -> dict[str, float]:
    """From each job's POST returning to the watch's first sight of a phase (and of
    Running): what a user sees, the watch's own lag included."""
    with watch.lock:
        first = [min(watch.first[k].values()) - created[k] for k in keys
                 if k in watch.first and k in created]
        running = [watch.first[k]["Running"] - created[k] for k in keys
                   if "Running" in watch.first.get(k, {}) and k in created]
    return {"first_phase_p50_s": pct(first, 50), "first_phase_p95_s": pct(first, 95),
            "first_phase_p99_s": pct(first, 99), "running_p50_s": pct(running, 50),
            "running_p95_s": pct(running, 95), "running_p99_s": pct(running, 99),
            "jobs": len(first)}


def operator_args(args: argparse.Namespace) -> list[str]:
    extra = ["--inventory=nodes", "--backend=sim", "--sim-speed=1"]
    if args.writes_per_second:
        extra.append(f"--status-writes-per-second={args.writes_per_second}")
    return extra


def start_operator(env: KubeTestEnv, work: Path, args: argparse.Namespace) -> OperatorProcess:
    environ = {"PYTHONPATH": args.operator_pythonpath} if args.operator_pythonpath else {}
    operator = OperatorProcess(env, work, operator_args(args), environ=environ)
    operator.start(ready_timeout=300)
    return operator


def run_burst_and_ramp(args: argparse.Namespace, scenarios: set[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="aifactory-scale-") as tmp, KubeTestEnv() as env:
        work = Path(tmp)
        install_manifests(env)
        ensure_namespace(env, NS)
        apply_many(env, make_nodes(args.nodes, 16, 8))
        operator = start_operator(env, work, args)
        watch = Watch(env, "trainingjobs")
        creator = Creator(env)
        loop = asyncio.new_event_loop()
        try:
            pid, api_pid = operator.proc.pid, env.apiserver_pid  # type: ignore[union-attr]
            if "burst" in scenarios:
                results["burst"] = _burst(env, watch, creator, loop, args, pid, api_pid)
            if "ramp" in scenarios:
                results["ramp"] = _ramp(env, watch, creator, loop, args, pid, api_pid)
            results["operator_peak_rss_mib"] = rss_mib(pid)
            results["operator_metrics"] = {
                line.split()[0]: float(line.split()[1])
                for line in operator.metrics().splitlines()
                if line.startswith("aifactory_operator_") and "{" not in line}
        finally:
            loop.run_until_complete(creator.close())
            loop.close()
            watch.close()
            operator.kill()  # the API server goes with the run: nothing to release
    return results


def _burst(env: KubeTestEnv, watch: Watch, creator: Creator, loop: asyncio.AbstractEventLoop,
           args: argparse.Namespace, pid: int, api_pid: int) -> dict[str, Any]:
    jobs = burst_jobs(args.burst, args.burst_runtime)
    keys = [(NS, j["metadata"]["name"]) for j in jobs]
    before, cpu0, api0, t0 = request_counts(env), cpu_seconds(pid), cpu_seconds(api_pid), \
        time.monotonic()
    loop.run_until_complete(creator.create_all(jobs))
    last_post = time.monotonic()
    wait_for(lambda: all(k in watch.first for k in keys), 600, "every burst job's phase",
             interval=0.2)
    with watch.lock:
        all_phased = max(min(watch.first[k].values()) for k in keys) - last_post
    wait_for(lambda: all("Running" in watch.first.get(k, {}) or "Succeeded" in
                         watch.first.get(k, {}) for k in keys), 900,
             "every burst job running", interval=0.5)
    t1 = time.monotonic()
    after = request_counts(env)
    out = {"jobs": len(jobs), "post_seconds": last_post - t0,
           "all_have_phase_after_last_post_s": all_phased,
           "all_running_after_last_post_s": t1 - last_post,
           **phase_latencies(watch, keys, creator.created),
           "writes_per_second": rates(before, after, t1 - t0),
           "operator_cpu_per_s": (cpu_seconds(pid) - cpu0) / (t1 - t0),
           "apiserver_cpu_per_s": (cpu_seconds(api_pid) - api0) / (t1 - t0)}
    wait_for(lambda: all("Succeeded" in watch.first.get(k, {}) for k in keys),
             args.burst_runtime + 900, "every burst job finished", interval=1.0)
    return out


def _ramp(env: KubeTestEnv, watch: Watch, creator: Creator, loop: asyncio.AbstractEventLoop,
          args: argparse.Namespace, pid: int, api_pid: int) -> dict[str, Any]:
    jobs = [training_job(f"run-{i:05d}", NS, 1, 1, expectedRuntimeSeconds=86400)
            for i in range(args.running)]
    keys = [(NS, j["metadata"]["name"]) for j in jobs]
    t0 = time.monotonic()
    loop.run_until_complete(creator.create_all(jobs))
    posted = time.monotonic()
    wait_for(lambda: all("Running" in watch.first.get(k, {}) for k in keys), 1800,
             "every ramp job running", interval=1.0)
    running = time.monotonic()
    out: dict[str, Any] = {"jobs": len(jobs), "post_seconds": posted - t0,
                           "all_running_after_last_post_s": running - posted,
                           **phase_latencies(watch, keys, creator.created)}
    # Steady state: everything runs; only meters (and nothing else) change.
    time.sleep(10)
    before, cpu0, api0, t1 = request_counts(env), cpu_seconds(pid), cpu_seconds(api_pid), \
        time.monotonic()
    time.sleep(args.steady_seconds)
    t2 = time.monotonic()
    out["steady"] = {"seconds": t2 - t1,
                     "writes_per_second": rates(before, request_counts(env), t2 - t1),
                     "operator_cpu_per_s": (cpu_seconds(pid) - cpu0) / (t2 - t1),
                     "apiserver_cpu_per_s": (cpu_seconds(api_pid) - api0) / (t2 - t1),
                     "operator_rss_mib": rss_mib(pid, "VmRSS")}
    return out


# ----------------------------------------------------------------- Kueue's scenario

CLASSES = (  # name, workers, runtime s, priority, per queue, interval s
    ("small", 2, 0.2, 50, 350, 0.1),
    ("medium", 4, 0.5, 100, 100, 0.5),
    ("large", 8, 1.0, 200, 50, 1.2),
)


def kueue_queues(cohorts: int, per_cohort: int) -> list[dict[str, Any]]:
    return [{"apiVersion": "aifactory.io/v1alpha1", "kind": "GPUQueue",
             "metadata": {"name": f"cq-{c}-{q}"},
             "spec": {"nominalGPUs": 20, "borrowingLimitGPUs": 100, "cohort": f"cohort-{c}"}}
            for c in range(cohorts) for q in range(per_cohort)]


async def _generate(creator: Creator, queue: str, cls: tuple[Any, ...], count: int,
                    classes: dict[tuple[str, str], str]) -> None:
    name, workers, runtime, priority, _per_queue, interval = cls
    start = time.monotonic()
    for i in range(count):
        job = training_job(f"{queue}-{name}-{i:03d}", NS, workers, 1, queue=queue,
                           priority=priority, expectedRuntimeSeconds=runtime,
                           topology={"required" if i % 2 == 0 else "preferred": "rack"})
        classes[(NS, job["metadata"]["name"])] = name
        await creator.create(job)
        # Kueue's generator creates one every interval (a fixed schedule, not a delay).
        await asyncio.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))


def run_kueue(args: argparse.Namespace) -> dict[str, Any]:
    cohorts, per_cohort = (2, 2) if args.smoke else (5, 6)
    scale = 0.1 if args.smoke else 1.0
    with tempfile.TemporaryDirectory(prefix="aifactory-kueue-") as tmp, KubeTestEnv() as env:
        work = Path(tmp)
        install_manifests(env)
        ensure_namespace(env, NS)
        apply_many(env, make_nodes(640, 64, 10))
        queues = kueue_queues(cohorts, per_cohort)
        env.apply({"apiVersion": "v1", "kind": "List", "items": queues})
        operator = start_operator(env, work, args)
        watch = Watch(env, "trainingjobs")
        creator = Creator(env, concurrency=32)
        classes: dict[tuple[str, str], str] = {}
        loop = asyncio.new_event_loop()
        try:
            pid, api_pid = operator.proc.pid, env.apiserver_pid  # type: ignore[union-attr]
            cpu0, api0, t0 = cpu_seconds(pid), cpu_seconds(api_pid), time.monotonic()
            async def generate_all() -> None:
                await asyncio.gather(*(
                    _generate(creator, q["metadata"]["name"], cls, max(1, int(cls[4] * scale)),
                              classes) for q in queues for cls in CLASSES))

            loop.run_until_complete(generate_all())
            posted = time.monotonic()
            keys = list(classes)
            wait_for(lambda: all("Succeeded" in watch.first.get(k, {}) for k in keys), 3600,
                     "every Kueue-scenario job finished", interval=1.0)
            t1 = time.monotonic()
            with watch.lock:
                first = {k: dict(watch.first[k]) for k in keys}
                bodies = {k: watch.objects.get(k) or {} for k in keys}
            per_class: dict[str, dict[str, float]] = {}
            for cls in CLASSES:
                waits = [min(first[k][p] for p in HOLDING if p in first[k]) - creator.created[k]
                         for k in keys if classes[k] == cls[0] and k in creator.created]
                # The operator's own admission time (status.startedAt), without the lag of
                # the status write and the watch.
                started = [parse_time((bodies[k].get("status") or {}).get("startedAt"))
                           for k in keys if classes[k] == cls[0] and k in creator.created_wall]
                own = [t - creator.created_wall[k] for k, t in zip(
                    [k for k in keys if classes[k] == cls[0] and k in creator.created_wall],
                    started, strict=True) if t is not None]
                per_class[cls[0]] = {"jobs": len(waits), "mean_admission_s":
                                     statistics.fmean(waits), "p90_admission_s": pct(waits, 90),
                                     "mean_started_s": statistics.fmean(own) if own else
                                     float("nan"), "p90_started_s": pct(own, 90)}
            used = 0.0  # GPU-seconds of admitted work, from each job's own status times
            for k in keys:
                status = bodies[k].get("status") or {}
                began, ended = parse_time(status.get("startedAt")), \
                    parse_time(status.get("completionTime"))
                if began is not None and ended is not None:
                    used += float(status.get("gpus") or 0.0) * max(0.0, ended - began)
            nominal = 20.0 * len(queues)
            return {"jobs": len(keys), "queues": len(queues), "wall_s": t1 - t0,
                    "post_seconds": posted - t0, "create_errors": creator.errors,
                    "classes": per_class, "quota_usage": used / (nominal * (t1 - t0)),
                    "operator_cpu_s": cpu_seconds(pid) - cpu0,
                    "operator_peak_rss_mib": rss_mib(pid),
                    "apiserver_cpu_s": cpu_seconds(api_pid) - api0}
        finally:
            loop.run_until_complete(creator.close())
            loop.close()
            watch.close()
            operator.kill()


# ----------------------------------------------------------------- output

KUEUE_ANCHOR = {"wall_s": "667-723", "small": "393-449", "medium": "225-258",
                "large": "137-162", "quota_usage": "75 %", "cpu": "160-169 CPU-s",
                "rss": "575-589 MiB"}


def report(results: dict[str, Any]) -> str:
    lines = [machine_line(results["machine"])]
    for name in ("burst", "ramp"):
        r = results.get(name)
        if not r:
            continue
        lines.append(f"\n{name}: {r['jobs']} jobs, posted in {r['post_seconds']:.1f} s")
        rows = [["every job has a phase after the last POST (s)",
                 f"{r.get('all_have_phase_after_last_post_s', float('nan')):.1f}"],
                ["every job Running after the last POST (s)",
                 f"{r['all_running_after_last_post_s']:.1f}"],
                ["first phase p50 / p95 / p99 (s)", f"{r['first_phase_p50_s']:.2f} / "
                 f"{r['first_phase_p95_s']:.2f} / {r['first_phase_p99_s']:.2f}"],
                ["Running p50 / p95 / p99 (s)", f"{r['running_p50_s']:.2f} / "
                 f"{r['running_p95_s']:.2f} / {r['running_p99_s']:.2f}"]]
        steady = r.get("steady") or r
        for verb, rate in steady["writes_per_second"].items():
            rows.append([f"{verb} per s" + (" (steady)" if "steady" in r else ""),
                         f"{rate:.1f}"])
        rows.append(["operator CPU-s per s", f"{steady['operator_cpu_per_s']:.2f}"])
        rows.append(["API server CPU-s per s", f"{steady['apiserver_cpu_per_s']:.2f}"])
        if "operator_rss_mib" in steady:
            rows.append(["operator RSS (MiB)", f"{steady['operator_rss_mib']:.0f}"])
        lines.append(markdown_table(["measure", "value"], rows))
    if "operator_peak_rss_mib" in results:
        lines.append(f"\noperator peak RSS: {results['operator_peak_rss_mib']:.0f} MiB")
    k = results.get("kueue")
    if k:
        lines.append(f"\nKueue-shaped scenario: {k['jobs']} jobs in {k['queues']} queues")
        rows = [["wall time to all finished (s)", f"{k['wall_s']:.0f}", KUEUE_ANCHOR["wall_s"]]]
        for cls in ("small", "medium", "large"):
            c = k["classes"][cls]
            rows.append([f"{cls}: mean / p90 admission, seen by a watch (s)",
                         f"{c['mean_admission_s']:.2f} / {c['p90_admission_s']:.2f}",
                         KUEUE_ANCHOR[cls] + " (mean)"])
            rows.append([f"{cls}: mean / p90 admission, status.startedAt (s)",
                         f"{c['mean_started_s']:.2f} / {c['p90_started_s']:.2f}", ""])
        rows += [["quota usage", f"{100 * k['quota_usage']:.0f} %", KUEUE_ANCHOR["quota_usage"]],
                 ["manager/operator CPU", f"{k['operator_cpu_s']:.0f} CPU-s", KUEUE_ANCHOR["cpu"]],
                 ["manager/operator peak RSS", f"{k['operator_peak_rss_mib']:.0f} MiB",
                  KUEUE_ANCHOR["rss"]],
                 ["API server CPU", f"{k['apiserver_cpu_s']:.0f} CPU-s", ""]]
        lines.append(markdown_table(["measure", "aifactory", "Kueue (issue 13's run)"], rows))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="burst,ramp,kueue")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--nodes", type=int, default=2500)
    parser.add_argument("--burst", type=int, default=3000)
    parser.add_argument("--burst-runtime", type=float, default=90.0)
    parser.add_argument("--running", type=int, default=20000)
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--writes-per-second", type=float, default=0.0,
                        help="the operator's --status-writes-per-second (default: its own)")
    parser.add_argument("--operator-pythonpath", default="",
                        help="PYTHONPATH for the operator process (another checkout)")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.nodes, args.burst, args.running = 64, 100, 300
        args.burst_runtime, args.steady_seconds = 10.0, 10.0
    scenarios = set(args.scenarios.split(","))
    results: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    if scenarios & {"burst", "ramp"}:
        results.update(run_burst_and_ramp(args, scenarios))
    if "kueue" in scenarios:
        results["kueue"] = run_kueue(args)
    print(report(results))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
