"""What users ask for: TrainingJob and InferenceService specs, validated once at the edge.

The manifest shape parsed here is the one the CRDs in ``manifests/crds/`` use, so that
``aifactory simulate`` on ``manifests/samples/`` and the operator read the same YAML. Every
rejection names the field and says what would be valid, like Ray's
``validate_placement_group``.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.gpus import gpu_model_name
from aifactory.controller.core.units import MILLI_PER_GPU

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "DEFAULT_QUEUE",
    "REPLICA_SEPARATOR",
    "JobKind",
    "JobSpec",
    "PowerBudgetSpec",
    "QueueSpec",
    "Runtime",
    "job_from_manifest",
    "jobs_from_manifest",
]

API_GROUP = "aifactory.io"
API_VERSION = f"{API_GROUP}/v1alpha1"
DEFAULT_QUEUE = "default"
REPLICA_SEPARATOR = ":r"


class JobKind(enum.Enum):
    """Kinds of work the scheduler places."""

    TRAINING = "TrainingJob"
    INFERENCE = "InferenceService"


@dataclass(frozen=True, slots=True)
class Runtime:
    """How a placed worker runs: a Python entrypoint ``module:function`` or a command, and
    where its code comes from: ``image`` (a container image), or ``working_dir`` (a URI to
    an archive, unpacked as the worker's working directory) and ``pip`` (requirement
    strings installed for the job). The Ray backend maps these to Ray's ``runtime_env``
    (``controller.backends.ray.runtime_env``); the simulated backend runs no code."""

    entrypoint: str | None = None
    command: tuple[str, ...] = ()
    image: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str | None = None
    pip: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One gang: ``workers`` x ``gpus_per_worker`` GPUs, placed all or nothing.

    ``gpus_per_worker`` 0 is a CPU-only (zero-GPU) worker: it asks for CPU and memory alone
    (``cpu_milli``/``memory_mib``), takes no GPU, and counts 0 GPUs of demand.

    ``gpu_milli`` below 1000 asks for a fraction of one GPU (then ``workers`` and
    ``gpus_per_worker`` are 1), like KAI-Scheduler's gpu-fraction. ``cpu_milli`` and
    ``memory_mib`` are what each worker asks for besides GPUs (0: nothing).
    ``gpu_models`` empty means any model. Levels are topology level names (``block``,
    ``rack``, ``node``...).
    An InferenceService replica is a JobSpec with ``group`` set to the service key and
    ``group_size`` to the replica count. Replicas spread over at least
    ``spread_min_domains`` domains of ``spread_level`` (each domain holds at most
    ceil(replicas / min domains)), and pack inside that bound so other racks stay whole.
    """

    name: str
    workers: int = 1
    gpus_per_worker: int = 1
    gpu_milli: int = MILLI_PER_GPU
    namespace: str = "default"
    kind: JobKind = JobKind.TRAINING
    gpu_models: tuple[str, ...] = ()
    required_level: str | None = None
    preferred_level: str | None = None
    spread_level: str | None = None
    spread_min_domains: int = 2
    group_size: int = 1
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    expected_runtime_seconds: float | None = None
    checkpoint_interval_seconds: float | None = None
    restart_limit: int = 3
    power_cap_watts_per_gpu: float | None = None
    expected_utilization: float | None = None
    group: str | None = None
    runtime: Runtime = field(default_factory=Runtime)
    cpu_milli: int = 0  # CPU milli-cores per worker (0: asks for none)
    memory_mib: int = 0  # memory MiB per worker (0: asks for none)
    # Grid-event flexibility tier 0-3 (slowdown accepted: 0, 10, 25, 50 %); None: the
    # queue's default.
    flexibility: int | None = None

    def __post_init__(self) -> None:
        # One name per GPU model whatever the manifest wrote (NVIDIA-H200 -> H200), so a
        # job matches its nodes in the simulator and the operator alike.
        if self.gpu_models:
            object.__setattr__(self, "gpu_models",
                               tuple(gpu_model_name(m) for m in self.gpu_models))

    @property
    def key(self) -> str:
        """Unique, bounded identity: ``namespace/name``."""
        return f"{self.namespace}/{self.name}"

    @property
    def total_gpus(self) -> int:
        """Whole GPUs the gang occupies (a fractional request counts as 0 here)."""
        return self.workers * self.gpus_per_worker if self.gpu_milli >= MILLI_PER_GPU else 0

    @property
    def gpu_equivalents(self) -> float:
        """GPUs asked for, fractions included: 0.46 for a 460-milli request."""
        if self.gpu_milli < MILLI_PER_GPU:
            return self.gpu_milli / MILLI_PER_GPU
        return float(self.workers * self.gpus_per_worker)

    @property
    def is_fractional(self) -> bool:
        return self.gpu_milli < MILLI_PER_GPU

    @property
    def cpu_only(self) -> bool:
        """A zero-GPU job: its workers ask for CPU and memory alone."""
        return self.gpus_per_worker == 0

    def with_name(self, name: str) -> JobSpec:
        return replace(self, name=name)


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A named queue with a nominal GPU quota (Kueue's ClusterQueue with a cohort).

    ``borrowing_limit_gpus`` None means the queue may borrow any idle quota of its cohort;
    0 forbids borrowing. Usage above nominal is reclaimable by preemption.
    ``max_priority``: the highest priority its jobs may ask (None: no cap).
    """

    name: str
    nominal_gpus: float
    borrowing_limit_gpus: float | None = None
    cohort: str | None = None
    weight: float = 1.0
    max_priority: int | None = None
    default_flexibility: int = 0  # tier of its jobs that name none (grid events)


@dataclass(frozen=True, slots=True)
class PowerBudgetSpec:
    """A power limit in watts over the nodes whose labels match ``selector`` (all if empty).

    Admission keeps the estimated draw of every GPU in scope (idle GPUs at idle power, GPUs of
    running or admitted jobs at the job's estimate) at or under ``watts``.
    """

    name: str
    watts: float
    selector: tuple[tuple[str, str], ...] = ()


# --------------------------------------------------------------------------- parsing


def _get(mapping: Mapping[str, Any], key: str, path: str, kind: type | tuple[type, ...],
         default: Any = None, required: bool = False) -> Any:
    if key not in mapping or mapping[key] is None:
        if required:
            raise SpecError(f"{path}.{key}", "is required")
        return default
    value = mapping[key]
    if kind is int and isinstance(value, bool):
        raise SpecError(f"{path}.{key}", f"must be an integer, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SpecError(f"{path}.{key}", f"must be of type {names}, got {value!r}")
    return value


def _positive_int(mapping: Mapping[str, Any], key: str, path: str, default: int | None,
                  minimum: int = 1, maximum: int | None = None) -> int:
    value = _get(mapping, key, path, int, default=default, required=default is None)
    assert isinstance(value, int)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise SpecError(f"{path}.{key}", f"must be an integer {bound}, got {value}")
    return value


_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P)?$")
_MEMORY_BYTES = {None: 1, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40,
                 "Pi": 2 ** 50, "k": 10 ** 3, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9,
                 "T": 10 ** 12, "P": 10 ** 15}


def cpu_milli_of(value: Any, field: str) -> int:
    """A Kubernetes CPU quantity (``4``, ``2.5``, ``"500m"``) in milli-cores, rounded up."""
    text = str(value).strip() if isinstance(value, int | float | str) \
        and not isinstance(value, bool) else ""
    match = _CPU.match(text)
    if not match:
        raise SpecError(field, f"must be a CPU quantity such as 4, 2.5 or '500m', got {value!r}")
    amount = float(match.group(1))
    return math.ceil(amount if match.group(2) else amount * 1000)


def memory_mib_of(value: Any, field: str) -> int:
    """A Kubernetes memory quantity (``"64Gi"``, ``"512Mi"``, ``"1G"``, bytes) in MiB,
    rounded up."""
    text = str(value).strip() if isinstance(value, int | float | str) \
        and not isinstance(value, bool) else ""
    match = _MEMORY.match(text)
    if not match:
        raise SpecError(field, "must be a memory quantity such as '64Gi', '512Mi' or '1G', "
                        f"got {value!r}")
    return math.ceil(float(match.group(1)) * _MEMORY_BYTES[match.group(2)] / 2 ** 20)


def _host(spec: Mapping[str, Any], path: str, per: str) -> tuple[int, int]:
    """``cpuPer<per>`` and ``memoryPer<per>`` (Kubernetes quantities) as milli and MiB."""
    cpu = spec.get(f"cpuPer{per}")
    memory = spec.get(f"memoryPer{per}")
    return (0 if cpu is None else cpu_milli_of(cpu, f"{path}.cpuPer{per}"),
            0 if memory is None else memory_mib_of(memory, f"{path}.memoryPer{per}"))


def _optional_positive_float(mapping: Mapping[str, Any], key: str, path: str) -> float | None:
    value = _get(mapping, key, path, float)
    if value is None:
        return None
    assert isinstance(value, float)
    if value <= 0:
        raise SpecError(f"{path}.{key}", f"must be a number > 0, got {value}")
    return value


def _runtime(spec: Mapping[str, Any], path: str) -> Runtime:
    raw = _get(spec, "runtime", path, dict, default={})
    assert isinstance(raw, dict)
    entrypoint = _get(raw, "entrypoint", f"{path}.runtime", str)
    command = _get(raw, "command", f"{path}.runtime", list, default=[])
    assert isinstance(command, list)
    if entrypoint is not None and command:
        raise SpecError(f"{path}.runtime", "set either entrypoint (module:function) or "
                        "command, not both")
    if entrypoint is not None and (":" not in entrypoint or entrypoint.startswith(":")
                                   or entrypoint.endswith(":")):
        raise SpecError(f"{path}.runtime.entrypoint",
                        f"must look like 'package.module:function', got {entrypoint!r}")
    if not all(isinstance(part, str) for part in command):
        raise SpecError(f"{path}.runtime.command", "must be a list of strings, e.g. "
                        "['python', 'train.py']")
    env_raw = _get(raw, "env", f"{path}.runtime", list, default=[])
    assert isinstance(env_raw, list)
    env: list[tuple[str, str]] = []
    for i, item in enumerate(env_raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise SpecError(f"{path}.runtime.env[{i}]",
                            "must be an object with a string 'name' and 'value'")
        env.append((item["name"], str(item.get("value", ""))))
    image = _get(raw, "image", f"{path}.runtime", str)
    working_dir, pip = _code_source(raw, f"{path}.runtime")
    if image is not None and (working_dir is not None or pip):
        raise SpecError(f"{path}.runtime.image", "cannot be combined with workingDir or pip "
                        "(the image holds the code and its packages; Ray runs an image "
                        "alone): drop image, or bake the code and packages into it")
    return Runtime(entrypoint=entrypoint, command=tuple(command), image=image, env=tuple(env),
                   working_dir=working_dir, pip=pip)


# What Ray's runtime_env ``working_dir`` accepts as a remote package (Ray 2.60,
# ray/_common/runtime_env_uri.py and runtime_env_package.py): these schemes, and an archive
# Ray unpacks. The CRDs carry the same pattern.
WORKING_DIR_SCHEMES = ("https", "http", "s3", "gs", "azure", "abfss", "file")
WORKING_DIR_ARCHIVES = (".zip", ".tar.gz", ".tgz", ".tar.xz")
_WORKING_DIR = re.compile(r"^(https?|s3|gs|azure|abfss|file)://[^\s?#]+"
                          r"\.(zip|tar\.gz|tgz|tar\.xz)(\?[^\s#]*)?$")
_PIP_REQUIREMENT = re.compile(r"^[^-\s][^\r\n]*$")
MAX_PIP_REQUIREMENTS = 64


def _code_source(raw: Mapping[str, Any], path: str) -> tuple[str | None, tuple[str, ...]]:
    """``workingDir`` (a URI to an archive Ray can fetch) and ``pip`` (requirement strings)."""
    working_dir = _get(raw, "workingDir", path, str)
    if working_dir is not None and (len(working_dir) > 2048
                                    or not _WORKING_DIR.fullmatch(working_dir)):
        raise SpecError(f"{path}.workingDir", "must be a URI to a "
                        f"{', '.join(WORKING_DIR_ARCHIVES)} archive with scheme "
                        f"{', '.join(WORKING_DIR_SCHEMES)} (at most 2048 characters), e.g. "
                        f"'https://example.com/code/train.zip'; got {working_dir[:200]!r}")
    pip = _get(raw, "pip", path, list, default=[])
    assert isinstance(pip, list)
    if len(pip) > MAX_PIP_REQUIREMENTS:
        raise SpecError(f"{path}.pip", f"at most {MAX_PIP_REQUIREMENTS} requirements, got "
                        f"{len(pip)}")
    for i, item in enumerate(pip):
        if not isinstance(item, str) or len(item) > 512 or not _PIP_REQUIREMENT.fullmatch(item):
            raise SpecError(f"{path}.pip[{i}]", "must be one pip requirement string of at "
                            "most 512 characters, e.g. 'torch==2.5.1' or 'requests>=2', not "
                            f"an option or a blank; got {item!r}")
    return working_dir, tuple(pip)


def _topology(spec: Mapping[str, Any], path: str) -> tuple[str | None, str | None]:
    topo = _get(spec, "topology", path, dict, default={})
    assert isinstance(topo, dict)
    required = _get(topo, "required", f"{path}.topology", str)
    preferred = _get(topo, "preferred", f"{path}.topology", str)
    return required, preferred


def _models(spec: Mapping[str, Any], path: str) -> tuple[str, ...]:
    model = _get(spec, "gpuModel", path, str)
    if model is None:
        return ()
    models = tuple(m.strip() for m in model.split("|") if m.strip())
    if not models:
        raise SpecError(f"{path}.gpuModel", "must name a GPU model such as 'H200', or be left "
                        "out for any model")
    return models


def _common(metadata: Mapping[str, Any], spec: Mapping[str, Any], path: str) -> dict[str, Any]:
    name = _get(metadata, "name", "metadata", str, required=True)
    namespace = _get(metadata, "namespace", "metadata", str, default="default")
    priority = _get(spec, "priority", path, int, default=0)
    power_cap = _optional_positive_float(spec, "powerCapWattsPerGPU", path)
    queue = _get(spec, "queue", path, str, default=DEFAULT_QUEUE)
    flexibility = _get(spec, "flexibility", path, int)
    if flexibility is not None and not 0 <= flexibility <= 3:
        raise SpecError(f"{path}.flexibility", f"must be a tier 0-3 (slowdown accepted "
                        f"during a grid event: 0 none, 1 10 %, 2 25 %, 3 50 %), got "
                        f"{flexibility}")
    return {
        "flexibility": flexibility,
        "name": name,
        "namespace": namespace,
        "priority": priority,
        "power_cap_watts_per_gpu": power_cap,
        "queue": queue,
        "gpu_models": _models(spec, path),
        "runtime": _runtime(spec, path),
    }


def _cpu_only_needs_host(gpus: int, cpu: int, memory: int, path: str, per: str) -> None:
    """A zero-GPU worker must ask for something: CPU or memory."""
    if gpus == 0 and not cpu and not memory:
        raise SpecError(f"{path}.gpusPer{per}",
                        f"0 (a CPU-only {per.lower()}) needs {path}.cpuPer{per} or "
                        f"{path}.memoryPer{per}, e.g. cpuPer{per}: 4; or ask for 1 GPU or more")


def _training(metadata: Mapping[str, Any], spec: Mapping[str, Any]) -> JobSpec:
    path = "spec"
    required, preferred = _topology(spec, path)
    cpu, memory = _host(spec, path, "Worker")
    gpus = _positive_int(spec, "gpusPerWorker", path, default=1, minimum=0, maximum=72)
    _cpu_only_needs_host(gpus, cpu, memory, path, "Worker")
    return JobSpec(
        kind=JobKind.TRAINING,
        workers=_positive_int(spec, "workers", path, default=None, maximum=100_000),
        gpus_per_worker=gpus,
        required_level=required,
        preferred_level=preferred,
        expected_runtime_seconds=_optional_positive_float(spec, "expectedRuntimeSeconds", path),
        checkpoint_interval_seconds=_optional_positive_float(
            spec, "checkpointIntervalSeconds", path),
        restart_limit=_positive_int(spec, "restartLimit", path, default=3, minimum=0),
        cpu_milli=cpu,
        memory_mib=memory,
        **_common(metadata, spec, path),
    )


def _inference(metadata: Mapping[str, Any], spec: Mapping[str, Any]) -> JobSpec:
    path = "spec"
    _get(spec, "model", path, str, required=True)
    gpus = _positive_int(spec, "gpusPerReplica", path, default=1, minimum=0, maximum=72)
    milli = _positive_int(spec, "gpuMilliPerReplica", path, default=MILLI_PER_GPU,
                          maximum=MILLI_PER_GPU)
    if milli < MILLI_PER_GPU and gpus != 1:
        raise SpecError(f"{path}.gpuMilliPerReplica",
                        "a fraction of a GPU is only valid with gpusPerReplica: 1")
    min_replicas = _positive_int(spec, "minReplicas", path, default=1, minimum=0)
    max_replicas = _positive_int(spec, "maxReplicas", path, default=max(min_replicas, 1))
    if min_replicas > max_replicas:
        raise SpecError(f"{path}.minReplicas", f"must be <= maxReplicas ({max_replicas}), "
                        f"got {min_replicas}")
    replicas = _get(spec, "replicas", path, int, default=min_replicas)
    assert isinstance(replicas, int)
    if not min_replicas <= replicas <= max_replicas:
        raise SpecError(f"{path}.replicas", f"must be between minReplicas ({min_replicas}) "
                        f"and maxReplicas ({max_replicas}), got {replicas}")
    required, preferred = _topology(spec, path)
    topo = spec.get("topology") or {}
    spread = topo.get("spreadAcross", "rack") if isinstance(topo, dict) else "rack"
    if not isinstance(spread, str):
        raise SpecError(f"{path}.topology.spreadAcross", "must be a topology level name")
    min_domains = 2
    if isinstance(topo, dict) and "minDomains" in topo:
        min_domains = _positive_int(topo, "minDomains", f"{path}.topology", default=2)
    util = _get(spec, "expectedUtilization", path, float, default=0.6)
    assert isinstance(util, float)
    if not 0.0 <= util <= 1.0:
        raise SpecError(f"{path}.expectedUtilization", f"must be between 0 and 1, got {util}")
    common = _common(metadata, spec, path)
    cpu, memory = _host(spec, path, "Replica")
    _cpu_only_needs_host(gpus, cpu, memory, path, "Replica")
    return JobSpec(
        kind=JobKind.INFERENCE,
        workers=replicas,
        gpus_per_worker=gpus,
        gpu_milli=milli,
        required_level=required,
        preferred_level=preferred,
        spread_level=spread,
        spread_min_domains=min_domains,
        group_size=replicas,
        restart_limit=1_000_000,
        expected_utilization=util,
        group=f"{common['namespace']}/{common['name']}",
        cpu_milli=cpu,
        memory_mib=memory,
        **common,
    )


def job_from_manifest(doc: Mapping[str, Any]) -> JobSpec:
    """Parse one TrainingJob or InferenceService manifest into a JobSpec.

    An InferenceService comes back as one JobSpec whose ``workers`` is its replica count;
    ``jobs_from_manifest`` splits it into one gang per replica for placement.
    """
    if not isinstance(doc, Mapping):
        raise SpecError("(document)", "must be a mapping with apiVersion, kind, metadata, spec")
    api_version = doc.get("apiVersion")
    if api_version != API_VERSION:
        raise SpecError("apiVersion", f"must be {API_VERSION!r}, got {api_version!r}")
    kind = doc.get("kind")
    metadata = doc.get("metadata")
    if not isinstance(metadata, Mapping):
        raise SpecError("metadata", "is required and must contain a name")
    spec = doc.get("spec")
    if not isinstance(spec, Mapping):
        raise SpecError("spec", "is required")
    if kind == JobKind.TRAINING.value:
        return _training(metadata, spec)
    if kind == JobKind.INFERENCE.value:
        return _inference(metadata, spec)
    raise SpecError("kind", f"must be one of TrainingJob, InferenceService; got {kind!r}")


def replica_name(service: str, index: int) -> str:
    """The name of replica ``index`` of a service: ``<service>:r<index>``. The colon cannot
    occur in a Kubernetes object name, so no TrainingJob is ever mistaken for a replica."""
    return f"{service}{REPLICA_SEPARATOR}{index}"


def replica_parts(name: str) -> tuple[str, int] | None:
    """``svc:r3`` -> (``svc``, 3), and the same for a key (``ns/svc:r3`` -> (``ns/svc``, 3));
    None for anything that is not a replica."""
    head, sep, tail = name.rpartition(REPLICA_SEPARATOR)
    if not sep or not head or not tail.isdigit():
        return None
    return head, int(tail)


def replica_index(name: str) -> int | None:
    """``ns/svc:r3`` (or ``svc:r3``) -> 3; None for a TrainingJob."""
    parts = replica_parts(name)
    return None if parts is None else parts[1]


def replica_jobs(service: JobSpec) -> list[JobSpec]:
    """One single-worker gang per InferenceService replica (``workers`` = replicas), named
    ``replica_name(service, i)`` and grouped under the service's key."""
    return [
        replace(service, name=replica_name(service.name, i), workers=1, group=service.key,
                group_size=service.workers)
        for i in range(service.workers)
    ]


def jobs_from_manifest(doc: Mapping[str, Any]) -> list[JobSpec]:
    """Parse a manifest into the gangs to place: one for a job, one per inference replica."""
    job = job_from_manifest(doc)
    if job.kind is JobKind.INFERENCE:
        return replica_jobs(job)
    return [job]
