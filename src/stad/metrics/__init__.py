"""Anomaly-detection metrics: image AUROC, pixel AUROC and PRO as torchmetrics ``Metric``s.

Definitions, modes and error bounds are documented in docs/metrics.md; the pure math is in
:mod:`stad.metrics.functional`.
"""

from stad.metrics.classes import PRO, ImageAUROC, PixelAUROC

__all__ = ["PRO", "ImageAUROC", "PixelAUROC"]
