"""Units every layer shares, spelled once.

GPU shares are counted in thousandths of a GPU (``gpuMilliPerReplica`` in the CRDs, like
KAI-Scheduler's gpu-fraction): a whole GPU is ``MILLI_PER_GPU``. CPU is counted in
millicores and memory in MiB, as Kubernetes quantities are (``controller.core.spec``).
"""

from __future__ import annotations

__all__ = ["MILLI_PER_GPU"]

MILLI_PER_GPU = 1000
