"""Power caps on real GPUs, behind a small interface (``PowerActuator``).

Grid-event curtailment lowers a running job's per-GPU power cap in place. On the simulated
factory the cap only changes the model; on real GPUs an actuator sets NVML's power
management limit on each GPU of the job, and resets it (to the GPU's default limit) when the
cap is lifted or the job ends, so the next job never inherits a cap. ``nvml_set_power_limits``
is the one function here that changes a GPU's settings (it needs root on the GPU's machine);
tests use ``RecordingActuator``, which records and changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["PowerActuator", "RecordingActuator", "nvml_set_power_limits"]


@runtime_checkable
class PowerActuator(Protocol):
    """Sets per-GPU power limits on one node (GPU index -> watts; None: the default)."""

    def set_power_limits(self, node: str, limits: Mapping[int, float | None]) -> None:
        ...


@dataclass(slots=True)
class RecordingActuator:
    """A fake actuator: records every call and the limits in force; touches no GPU.
    ``ignore``: GPUs that, like a GPU whose limit cannot be set, keep drawing as before."""

    calls: list[tuple[str, int, float | None]] = field(default_factory=list)
    limits: dict[tuple[str, int], float] = field(default_factory=dict)
    ignore: set[tuple[str, int]] = field(default_factory=set)

    def set_power_limits(self, node: str, limits: Mapping[int, float | None]) -> None:
        for index, watts in sorted(limits.items()):
            self.calls.append((node, index, watts))
            if (node, index) in self.ignore:
                continue
            if watts is None:
                self.limits.pop((node, index), None)
            else:
                self.limits[(node, index)] = watts


def nvml_set_power_limits(limits: Mapping[int, float | None]) -> dict[int, str]:
    """On this machine, through NVML: each GPU's power management limit to the watts given
    (clamped to what the GPU allows), or back to its default limit for None. Returns what
    failed, per GPU (NVML missing, not root, ...). Needs root; never called by tests."""
    try:
        import pynvml
    except ImportError:
        return dict.fromkeys(limits, "nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return dict.fromkeys(limits, f"NVML did not initialise: {exc}")
    errors: dict[int, str] = {}
    try:
        for index, watts in limits.items():
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(index)
                if watts is None:
                    milli = pynvml.nvmlDeviceGetPowerManagementDefaultLimit(h)
                else:
                    low, high = pynvml.nvmlDeviceGetPowerManagementLimitConstraints(h)
                    milli = min(max(int(watts * 1000), low), high)
                pynvml.nvmlDeviceSetPowerManagementLimit(h, milli)
            except Exception as exc:  # NVMLError_NoPermission, NotSupported, ...
                errors[index] = str(exc)
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return errors
