"""Decision thresholds for image scores and anomaly-map pixels, chosen without the test set.

Three ways (``threshold.method``): ``quantile`` of the scores of held-out normal images (the
default; an expected false-positive rate of 1 − q on normal images), ``f1``, the F1-optimal
value on a labelled set the user supplies, or ``fixed`` values. A threshold is a dict
``{"value", "method", "source", ...}`` so the run record says how it was chosen.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from stad.data.images import as_hw, load_mask
from stad.errors import StadError
from stad.scoring import iter_scored, list_inputs, read_labelled

if TYPE_CHECKING:
    from stad.core import Method

# Quantile of normal pixels: at most this many pixel values are kept per image when the
# pixel threshold is fitted (a uniform subsample keeps memory bounded on large sets).
PIXELS_PER_IMAGE = 4096


def quantile_threshold(values: Tensor | np.ndarray, q: float, source: str) -> dict[str, Any]:
    """The q-quantile (linear interpolation) of scores of normal images."""
    if not 0.0 < q <= 1.0:
        raise StadError(f"threshold quantile must be in (0, 1], got {q}")
    array = np.asarray(torch.as_tensor(values).double().flatten())
    if array.size == 0:
        raise StadError(
            f"no {source} to choose a threshold from; hold out normal images "
            "(threshold.val_fraction > 0) or use threshold.method=fixed"
        )
    return {
        "value": float(np.quantile(array, q)),
        "method": "quantile",
        "quantile": q,
        "source": source,
        "n": int(array.size),
    }


def f1_threshold(scores: Tensor | np.ndarray, labels: Tensor | np.ndarray, source: str) -> dict:
    """The threshold that maximises F1 of ``score >= t`` against binary ``labels``.

    Every distinct score is a candidate; ties break toward the higher threshold (fewer alarms).
    """
    s = np.asarray(torch.as_tensor(scores).double().flatten())
    y = np.asarray(torch.as_tensor(labels).flatten()).astype(bool)
    if s.size != y.size:
        raise StadError(f"{source}: {s.size} scores but {y.size} labels")
    if not y.any() or y.all():
        raise StadError(
            f"{source} needs both normal and anomalous examples to choose an F1-optimal "
            f"threshold; it has {int(y.sum())} anomalous of {y.size}"
        )
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    # Only the last index of each run of equal scores is a valid cut (score >= t keeps all ties).
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp, fp, cut = tp[last], fp[last], s_sorted[last]
    f1 = 2 * tp / (2 * tp + fp + (y.sum() - tp))
    best = int(np.argmax(f1))
    return {
        "value": float(cut[best]),
        "method": "f1",
        "f1": float(f1[best]),
        "source": source,
        "n": int(s.size),
    }


def fixed_threshold(value: float, source: str = "configured") -> dict[str, Any]:
    """A threshold given by the user."""
    return {"value": float(value), "method": "fixed", "source": source}


def sample_pixels(maps: Tensor, per_image: int = PIXELS_PER_IMAGE, seed: int = 0) -> Tensor:
    """A fixed-size uniform subsample of each map's pixels (B×…) → (B·k,), reproducible."""
    flat = maps.detach().float().flatten(1).cpu()
    if flat.shape[1] <= per_image:
        return flat.flatten()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(flat.shape[1], generator=g)[:per_image]
    return flat[:, idx].flatten()


class ThresholdCounts(Metric):
    """How many test images (and pixels) the run's thresholds classify right, counted like the
    other test metrics (states summed across processes)."""

    takes_batch = True
    full_state_update = False

    def __init__(self, image: float | None, pixel: float | None) -> None:
        super().__init__()
        self.image, self.pixel = image, pixel
        for name in _COUNT_NAMES:
            self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, maps: Tensor, scores: Tensor, batch: dict[str, Any]) -> None:
        """Count one test batch: maps B×1×H×W, scores (B,), ``batch["label"]``/``["mask"]``."""
        labels = batch["label"].bool().to(scores.device)
        if self.image is not None:
            self._add("image", scores.double() >= self.image, labels)
        if self.pixel is not None:
            above = maps.double() >= self.pixel
            self._add("by_pixels", above.flatten(1).any(1), labels)
            self._add("pixel", above.flatten(), batch["mask"].to(maps.device).bool().flatten())

    def _add(self, prefix: str, pred: Tensor, truth: Tensor) -> None:
        for suffix, hits in (
            ("tp", pred & truth),
            ("fp", pred & ~truth),
            ("tn", ~pred & ~truth),
            ("fn", ~pred & truth),
        ):
            state = getattr(self, f"{prefix}_{suffix}")
            setattr(self, f"{prefix}_{suffix}", state + hits.sum())

    def compute(self) -> dict[str, dict[str, int]]:
        """Counts per decision rule: ``image`` (score), ``by_pixels`` (any pixel above the pixel
        threshold), ``pixel`` (each pixel against the mask)."""
        return {
            prefix: {s: int(getattr(self, f"{prefix}_{s}")) for s in ("tp", "fp", "tn", "fn")}
            for prefix in ("image", "by_pixels", "pixel")
        }


_COUNT_NAMES = [
    f"{p}_{s}" for p in ("image", "by_pixels", "pixel") for s in ("tp", "fp", "tn", "fn")
]


def with_test_counts(
    thresholds: dict[str, Any], counts: dict[str, dict[str, int]]
) -> dict[str, Any]:
    """The thresholds with how many test images each gets right (for the record and report)."""
    out = {kind: dict(value) for kind, value in thresholds.items()}
    if "image" in out:
        out["image"]["test"] = _right(counts["image"])
    if "pixel" in out:
        out["pixel"]["test"] = _right(counts["by_pixels"])
        pixel = counts["pixel"]
        out["pixel"]["test_pixels"] = {
            "tpr": pixel["tp"] / max(pixel["tp"] + pixel["fn"], 1),
            "fpr": pixel["fp"] / max(pixel["fp"] + pixel["tn"], 1),
        }
    return out


def _right(c: dict[str, int]) -> dict[str, int]:
    return {
        "right": c["tp"] + c["tn"],
        "total": c["tp"] + c["tn"] + c["fp"] + c["fn"],
        "normal_right": c["tn"],
        "normal_total": c["tn"] + c["fp"],
        "anomalous_right": c["tp"],
        "anomalous_total": c["tp"] + c["fn"],
    }


def decisions_right(scores: Tensor, labels: Tensor, threshold: float) -> dict[str, int]:
    """How many images ``score >= threshold`` classifies right, per class."""
    pred = torch.as_tensor(scores).double() >= threshold
    y = torch.as_tensor(labels).bool()
    return {
        "right": int((pred == y).sum()),
        "total": int(y.numel()),
        "normal_right": int((~pred & ~y).sum()),
        "normal_total": int((~y).sum()),
        "anomalous_right": int((pred & y).sum()),
        "anomalous_total": int(y.sum()),
    }


# -- thresholds on folders of images (stad.predict, and threshold.method=f1 of a run) --------
# Default quantiles when a saved run's config has none (config.yaml's values).
IMAGE_QUANTILE = 0.99
PIXEL_QUANTILE = 0.999


def _warn(message: str) -> None:
    print(f"stad: warning: {message}", file=sys.stderr, flush=True)


def labelled_thresholds(
    method: Method,
    folder: Path | str,
    image_size: int,
    device: str | torch.device | None = None,
    masks: Path | str | None = "auto",
    batch_size: int = 8,
    workers: int = 0,
) -> dict[str, Any]:
    """F1-optimal image (and, with masks, pixel) thresholds on a labelled folder.

    The pixel threshold uses a fixed-size uniform sample of each image's pixels (the same
    positions in map and mask; ``stad.thresholds.sample_pixels``).

    Returns:
        ``{"image": threshold, "pixel": threshold}`` (``pixel`` only when there are masks).
    """
    paths, labels, mask_paths = read_labelled(folder, masks)
    size_hw = as_hw(image_size)
    scores, targets, pixels, pixel_labels, skipped = [], [], [], [], []
    for n, batch in enumerate(iter_scored(method, paths, image_size, batch_size, device, workers)):
        skipped += batch.skipped
        if not batch.indices:
            continue
        scores.append(batch.scores)
        targets += [labels[i] for i in batch.indices]
        if mask_paths is not None:
            truth = torch.stack(
                [
                    _mask(paths[i], mask_paths[i], size_hw, s)
                    for i, s in zip(batch.indices, batch.sizes, strict=True)
                ]
            )
            pixels.append(sample_pixels(batch.maps, seed=n))
            pixel_labels.append(sample_pixels(truth, seed=n))
    for item in skipped:
        _warn(f"labelled image skipped: {item.path}: {item.reason}")
    if not scores:
        raise StadError(f"no image of the labelled folder {folder} could be scored")
    source = f"{len(targets)} labelled images in {folder}"
    out = {"image": f1_threshold(torch.cat(scores), torch.tensor(targets), source)}
    if mask_paths is not None:
        out["pixel"] = f1_threshold(
            torch.cat(pixels), torch.cat(pixel_labels) > 0, f"{source} (sampled pixels)"
        )
    return out


def _mask(
    image: Path, mask: Path | None, size_hw: tuple[int, int], size: tuple[int, int]
) -> Tensor:
    if mask is None:
        return torch.zeros(1, *size_hw)
    array, _ = load_mask(mask, size_hw, image, size)
    return torch.from_numpy(array).to(torch.float32).unsqueeze(0)


def normal_thresholds(
    method: Method,
    folder: Path,
    image_size: int,
    image_q: float,
    pixel_q: float,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    workers: int = 0,
) -> dict[str, Any]:
    """Quantile thresholds from the scores and sampled map pixels of a folder of normal images."""
    paths, _ = list_inputs(str(folder))
    scores, pixels = [], []
    for n, batch in enumerate(iter_scored(method, paths, image_size, batch_size, device, workers)):
        for item in batch.skipped:
            _warn(f"normal image skipped: {item.path}: {item.reason}")
        if batch.indices:
            scores.append(batch.scores)
            pixels.append(sample_pixels(batch.maps, seed=n))
    if not scores:
        raise StadError(f"no image of the normal folder {folder} could be scored")
    source = f"{sum(len(s) for s in scores)} normal images in {folder}"
    return {
        "image": quantile_threshold(torch.cat(scores), image_q, source),
        "pixel": quantile_threshold(torch.cat(pixels), pixel_q, f"{source} (sampled pixels)"),
    }
