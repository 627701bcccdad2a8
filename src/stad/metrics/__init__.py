"""Anomaly-detection metrics: image AUROC, pixel AUROC, pixel AP, PRO and MVTec LOCO's sPRO as
torchmetrics ``Metric``s.

Definitions, modes and error bounds are documented in docs/metrics.md; the pure math is in
:mod:`stad.metrics.functional`.
"""

from typing import Any

from stad.errors import lookup
from stad.metrics.classes import PRO, ImageAUROC, PixelAP, PixelAUROC
from stad.metrics.spro import SPRO

__all__ = [
    "DATASET_METRICS",
    "PRO",
    "SPRO",
    "ImageAUROC",
    "PixelAP",
    "PixelAUROC",
    "dataset_metric",
]

DATASET_METRICS: dict[str, type] = {"spro": SPRO}
"""Metrics a dataset asks for beside the common ones (``DatasetSplits.metrics``), by name."""


def dataset_metric(name: str, arguments: dict[str, Any]) -> Any:
    """A dataset's own metric from its name and the arguments the reader gave (e.g. sPRO and
    LOCO's ground-truth regions)."""
    return lookup(DATASET_METRICS, "dataset metric", name)(**arguments)
