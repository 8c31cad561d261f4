"""Gang workloads on a real network topology, for scenarios 3 (gangs) and 4 (power).

The factory is the real Lingjun fabric (``alibaba-lingjun-dataset-2023/topo.csv``, Crux,
SIGCOMM'24): 847 hosts, rack = ToR group ``(PSW, ASW)`` (119 racks of 2 to 8 hosts),
block = PSW (3 blocks of 179, 306 and 362 hosts). The file does not say how many GPUs a
host has; 8 H100 per host is an assumption (6,776 GPUs).

Gangs are drawn to match a cluster summary of AcmeTrace (NSDI'24,
``acmetrace/cluster_summary.csv``): Kalos has a median of 1 GPU per job, a mean of
26.77 and a maximum of 1,024; Seren a median of 1, mean 5.68, max 1,024. The summary gives
three numbers, so the size model is a choice that meets them:

- sizes are powers of two from 1 to the maximum; P(1 GPU) = 0.6 (ASSUMPTION: a median of
  1 only needs >= 0.5);
- the other sizes 2^k (k >= 1) have weight r^k, with r solved so the mean matches;
- runtimes are log-normal with the summary's median and mean GPU-job runtime (so
  sigma = sqrt(2 ln(mean / median))), capped at its maximum, independent of size.

A gang of n <= 8 GPUs is one worker of n GPUs; a larger one is n / 8 workers of 8 GPUs
that prefer one rack (``preferred_level: rack``, as Kueue TAS users ask for it).
Background work is openb ``default`` pods (fractions of a GPU up to 8 GPUs, their own
durations capped at 24 h), sampled with replacement. Arrivals are Poisson; rates are set
so gangs offer ``gang_load`` and background ``background_load`` of the factory's GPU-time
over the arrival window. Everything runs at priority 0, so no preemption blurs locality.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from aifactory.controller.core.spec import JobKind, JobSpec
from aifactory.controller.inputs.datasets import shared_path
from aifactory.controller.inputs.factory import FactorySpec, factory_from_nodes
from aifactory.controller.inputs.traces import load_openb_pods, load_topology_csv
from aifactory.controller.inputs.workload import Arrival
from benchmarks.common import openb_path

__all__ = [
    "ClusterSummary",
    "GangSizeModel",
    "GangWorkload",
    "fit_sizes",
    "gang_workload",
    "lingjun_factory",
    "load_summary",
]

P_SINGLE_GPU = 0.6
GPUS_PER_HOST = 8
BACKGROUND_CAP_SECONDS = 24 * 3600.0
GANG_NAMESPACE = "gangs"
BACKGROUND_NAMESPACE = "openb"


@dataclass(frozen=True, slots=True)
class ClusterSummary:
    """One row of AcmeTrace's cluster summary (GPU jobs only)."""

    name: str
    mean_gpus: float
    median_gpus: float
    max_gpus: int
    mean_runtime_seconds: float
    median_runtime_seconds: float
    max_runtime_seconds: float


def load_summary(name: str) -> ClusterSummary:
    path = shared_path("traces", "acmetrace", "cluster_summary.csv")
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["id"] == name:
                return ClusterSummary(
                    name, float(row["avg_gpu_num"]), float(row["med_gpu_num"]),
                    int(float(row["max_gpu"])), float(row["avg_run_time_gpu"]),
                    float(row["med_run_time_gpu"]), float(row["max_run_time_gpu"]))
    raise ValueError(f"cluster {name!r} is not in {path}")


@dataclass(frozen=True, slots=True)
class GangSizeModel:
    sizes: tuple[int, ...]
    probabilities: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(s * p for s, p in zip(self.sizes, self.probabilities, strict=True))

    @property
    def median(self) -> int:
        acc = 0.0
        for s, p in zip(self.sizes, self.probabilities, strict=True):
            acc += p
            if acc >= 0.5:
                return s
        return self.sizes[-1]

    def draw(self, rng: random.Random) -> int:
        return rng.choices(self.sizes, weights=self.probabilities)[0]


def fit_sizes(mean: float, max_gpus: int, p_single: float = P_SINGLE_GPU) -> GangSizeModel:
    """P(1) = ``p_single``; sizes 2^k weighted r^k with r solved so the mean is ``mean``."""
    top = int(math.log2(max_gpus))
    sizes = tuple(2 ** k for k in range(top + 1))

    def model(r: float) -> GangSizeModel:
        weights = [r ** k for k in range(1, top + 1)]
        total = sum(weights)
        rest = [(1.0 - p_single) * w / total for w in weights]
        return GangSizeModel(sizes, (p_single, *rest))

    low, high = 1e-6, 4.0
    for _ in range(200):
        mid = (low + high) / 2
        if model(mid).mean < mean:
            low = mid
        else:
            high = mid
    return model((low + high) / 2)


def lingjun_factory() -> FactorySpec:
    nodes = load_topology_csv(shared_path("traces", "alibaba-lingjun-dataset-2023", "topo.csv"),
                              gpus_per_node=GPUS_PER_HOST, gpu_model="H100")
    return factory_from_nodes("lingjun", nodes)


@dataclass(frozen=True, slots=True)
class GangWorkload:
    arrivals: tuple[Arrival, ...]
    gangs: int
    background: int
    window_seconds: float
    sizes: GangSizeModel


def _gang_spec(i: int, gpus: int) -> JobSpec:
    if gpus <= GPUS_PER_HOST:
        return JobSpec(name=f"gang-{i:05d}", namespace=GANG_NAMESPACE, workers=1,
                       gpus_per_worker=gpus, kind=JobKind.TRAINING)
    return JobSpec(name=f"gang-{i:05d}", namespace=GANG_NAMESPACE,
                   workers=gpus // GPUS_PER_HOST, gpus_per_worker=GPUS_PER_HOST,
                   preferred_level="rack", kind=JobKind.TRAINING)


def gang_workload(seed: int, gangs: int, capacity_gpus: int, gang_load: float = 0.8,
                  background_load: float = 0.2, summary: str = "Kalos",
                  background_pool: Sequence[tuple[JobSpec, float]] | None = None
                  ) -> GangWorkload:
    """The arrivals of one seed: ``gangs`` gangs plus openb background pods."""
    rng = random.Random(seed)
    s = load_summary(summary)
    sizes = fit_sizes(s.mean_gpus, s.max_gpus)
    sigma = math.sqrt(2.0 * math.log(s.mean_runtime_seconds / s.median_runtime_seconds))
    mu = math.log(s.median_runtime_seconds)
    drawn = []
    for i in range(gangs):
        gpus = sizes.draw(rng)
        runtime = min(s.max_runtime_seconds, max(1.0, rng.lognormvariate(mu, sigma)))
        drawn.append((_gang_spec(i, gpus), runtime))
    gpu_seconds = sum(spec.total_gpus * t for spec, t in drawn)
    window = gpu_seconds / (gang_load * capacity_gpus)
    arrivals = [Arrival(spec, at, t) for (spec, t), at in
                zip(drawn, _poisson_times(rng, len(drawn), window), strict=True)]
    background = 0
    if background_load > 0:
        pool = list(background_pool) if background_pool is not None else openb_pool()
        target = background_load * capacity_gpus * window
        picked: list[tuple[JobSpec, float]] = []
        total = 0.0
        while total < target:
            spec, duration = pool[rng.randrange(len(pool))]
            spec = replace(spec, name=f"{spec.name}-{len(picked)}", priority=0)
            picked.append((spec, duration))
            total += spec.gpu_equivalents * duration
        arrivals += [Arrival(spec, at, d) for (spec, d), at in
                     zip(picked, _poisson_times(rng, len(picked), window), strict=True)]
        background = len(picked)
    arrivals.sort(key=lambda a: (a.at, a.spec.key))
    return GangWorkload(tuple(arrivals), gangs, background, window, sizes)


def openb_pool() -> list[tuple[JobSpec, float]]:
    """openb default pods with their durations, capped at 24 h (pods without one skipped)."""
    out = []
    for job in load_openb_pods(openb_path("openb_pod_list_default.csv")):
        if job.duration_seconds is None or job.duration_seconds <= 0:
            continue
        out.append((replace(job.spec, namespace=BACKGROUND_NAMESPACE),
                    min(job.duration_seconds, BACKGROUND_CAP_SECONDS)))
    return out


def _poisson_times(rng: random.Random, n: int, window: float) -> list[float]:
    if n == 0:
        return []
    rate = n / window
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out
