"""Anomaly-map overlays: image | map over image | ground truth, as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor


def _colormap(values: np.ndarray) -> np.ndarray:
    """A blue→green→yellow→red ramp for values in [0, 1] (H×W → H×W×3 uint8)."""
    stops = np.array([[0, 0, 128], [0, 160, 255], [0, 220, 80], [255, 230, 0], [230, 0, 0]])
    pos = np.clip(values, 0, 1) * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    return ((1 - frac) * stops[lo] + frac * stops[lo + 1]).astype(np.uint8)


def overlay(image: Tensor, amap: Tensor, mask: Tensor, vmin: float, vmax: float) -> np.ndarray:
    """One row image | heat map blended on the image | mask, H×3W×3 uint8.

    Args:
        image: 3×H×W in [0, 1]. amap: 1×H×W anomaly map. mask: 1×H×W in {0, 1}.
        vmin, vmax: the map range shared by all overlays of a run, so colours compare.
    """
    img = (image.permute(1, 2, 0).numpy().clip(0, 1) * 255).astype(np.uint8)
    scaled = (amap[0].numpy() - vmin) / max(vmax - vmin, 1e-12)
    heat = (0.5 * img + 0.5 * _colormap(scaled)).astype(np.uint8)
    gt = np.repeat((mask[0].numpy() > 0).astype(np.uint8)[..., None] * 255, 3, axis=2)
    return np.concatenate([img, heat, gt], axis=1)


def save_overlays(examples: list[dict], out_dir: Path) -> list[Path]:
    """Write one PNG per example (dicts with image, map, mask, score, label, path)."""
    if not examples:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    values = np.concatenate([e["map"].numpy().ravel() for e in examples])
    vmin, vmax = float(np.percentile(values, 1)), float(np.percentile(values, 99.9))
    paths = []
    for i, e in enumerate(examples):
        name = f"{i:02d}_{'anomalous' if e['label'] else 'normal'}_{Path(e['path']).stem}.png"
        Image.fromarray(overlay(e["image"], e["map"], e["mask"], vmin, vmax)).save(out_dir / name)
        paths.append(out_dir / name)
    return paths
