"""FGD's published allocation at 100 % arrived demand, per pod list and seed.

From the FGD authors' repository (``hkust-adsl/kubernetes-scheduler-simulator``, file
``experiments/analysis/expected_results/analysis_allo_discrete.csv``): the rows with
``sc_policy`` ``06-FGD`` and ``tune`` 1.3, column ``100`` (GPU allocation rate in percent
when the arrived GPU demand reaches 100 % of the 6,212 GPUs), seeds 42-51. Their pod order
per seed is the one ``controller.sim.fill.fgd_order`` rebuilds.
"""

from __future__ import annotations

__all__ = ["FGD_ALLOCATION_AT_100"]

FGD_ALLOCATION_AT_100: dict[str, dict[int, float]] = {
    "multigpu50": {42: 97.10, 43: 97.07, 44: 97.27, 45: 97.09, 46: 97.03, 47: 97.06,
                   48: 97.10, 49: 97.15, 50: 96.87, 51: 97.20},
    "gpushare40": {42: 94.06, 43: 93.96, 44: 93.93, 45: 93.91, 46: 93.82, 47: 93.96,
                   48: 94.00, 49: 93.94, 50: 93.95, 51: 94.08},
    "default": {42: 95.14, 43: 95.06, 44: 95.29, 45: 95.38, 46: 95.35, 47: 95.14,
                48: 95.18, 49: 95.30, 50: 95.15, 51: 95.28},
}
