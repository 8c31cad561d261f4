"""Cluster backends: where placed work actually runs (simulated factory, Ray)."""

from aifactory.controller.backends.base import (
           ClusterBackend,
           GPUReading,
           TelemetrySnapshot,
           WorkloadPhase,
           WorkloadStatus,
)

__all__ = ["ClusterBackend", "GPUReading", "TelemetrySnapshot", "WorkloadPhase",
           "WorkloadStatus"]
