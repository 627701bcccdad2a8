"""Anomaly-detection metrics: image AUROC, pixel AUROC, PRO and MVTec LOCO's sPRO as
torchmetrics ``Metric``s.

Definitions, modes and error bounds are documented in docs/metrics.md; the pure math is in
:mod:`stad.metrics.functional`.
"""

from stad.metrics.classes import PRO, ImageAUROC, PixelAUROC
from stad.metrics.spro import SPRO

__all__ = ["PRO", "SPRO", "ImageAUROC", "PixelAUROC"]
