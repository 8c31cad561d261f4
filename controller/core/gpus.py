"""GPU model names, spelled once for every path.

The same hardware goes by several names: ``H200`` in a factory spec, ``NVIDIA-H200`` in GPU
Feature Discovery's ``nvidia.com/gpu.product`` label, ``NVIDIA H200`` from nvidia-smi.
``gpu_model_name`` turns every known spelling of disclosed hardware into its canonical name
and leaves any other name as written, and ``NodeInfo`` and ``JobSpec`` apply it when they
are built, so a node and a job that ask for the same GPUs match whether they came from a
factory YAML, a trace, Kubernetes Node labels or a manifest, in ``aifactory simulate`` and in
the operator alike. Undisclosed models of the public traces (openb's ``G1``-``G3``, the spot
trace's ``GPU-series-*``) keep their names, so distinct hardware stays distinct; the power
model gives them its generic profile (``canonical_model`` maps them to ``GENERIC``).
"""

from __future__ import annotations

__all__ = ["GENERIC_MODEL", "KNOWN_MODELS", "canonical_model", "gpu_model_name",
           "known_models"]

GENERIC_MODEL = "GENERIC"

# Canonical names of the models the power model has a profile for.
KNOWN_MODELS = ("H200", "H100", "H800", "B200", "A100", "A800", "L40S", "A10", "T4", "P100",
                "V100M16", "V100M32", GENERIC_MODEL)

# Other spellings of the same hardware: Kubernetes GPU feature discovery product labels
# (nvidia.com/gpu.product), nvidia-smi names, trace names. Matched after _normalise().
_ALIASES: dict[str, str] = {
    "NVIDIA-H200": "H200", "NVIDIA-H200-141GB-HBM3E": "H200", "H200-SXM": "H200",
    "H200-SXM-141GB": "H200",
    "NVIDIA-H100-80GB-HBM3": "H100", "NVIDIA-H100": "H100", "H100-SXM": "H100",
    "H100-SXM5-80GB": "H100",
    "NVIDIA-H800": "H800", "NVIDIA-H800-80GB-HBM3": "H800",
    "NVIDIA-B200": "B200",
    "NVIDIA-A100-SXM4-80GB": "A100", "A100-SXM4-80GB": "A100", "A100-80GB": "A100",
    "NVIDIA-A100-80GB": "A100",
    "NVIDIA-A800-SXM4-80GB": "A800", "A800-SXM4-80GB": "A800",
    "NVIDIA-L40S": "L40S",
    "NVIDIA-A10": "A10",
    "TESLA-T4": "T4", "NVIDIA-T4": "T4",
    "TESLA-P100-PCIE-16GB": "P100", "TESLA-P100": "P100",
    "TESLA-V100-SXM2-16GB": "V100M16", "TESLA-V100-SXM2-32GB": "V100M32",
}
# Undisclosed models of the openb (G1-G3) and spot-GPU (GPU-series-*) traces: distinct
# hardware of unknown power, given the generic profile.
_UNDISCLOSED = ("G1", "G2", "G3", "GPU-SERIES-1", "GPU-SERIES-2")


def _normalise(model: str) -> str:
    return "-".join(model.strip().upper().replace("_", " ").split())


_NAMES: dict[str, str] = {
    **{_normalise(name): name for name in KNOWN_MODELS},
    **{_normalise(alias): target for alias, target in _ALIASES.items()},
}
_LOOKUP: dict[str, str] = {
    **_NAMES,
    **{_normalise(name): GENERIC_MODEL for name in _UNDISCLOSED},
}


def known_models(include_aliases: bool = False) -> tuple[str, ...]:
    """Canonical model names with a power profile (and, if asked, every accepted spelling)."""
    names = set(KNOWN_MODELS)
    if include_aliases:
        names |= set(_ALIASES) | set(_UNDISCLOSED)
    return tuple(sorted(names))


def canonical_model(model: str) -> str | None:
    """The power model's name for ``model`` (``NVIDIA-H200`` -> ``H200``, ``G2`` ->
    ``GENERIC``), or None if unknown."""
    return _LOOKUP.get(_normalise(model))


def gpu_model_name(model: str) -> str:
    """The name nodes and jobs are matched by: the canonical name of a known spelling of
    disclosed hardware (``NVIDIA-H200`` -> ``H200``), else ``model`` as written."""
    return _NAMES.get(_normalise(model), model.strip())
