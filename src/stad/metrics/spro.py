"""sPRO: MVTec LOCO AD's saturated per-region overlap, as a torchmetrics ``Metric``.

Definitions follow MVTec's official LOCO evaluation code (version 2.0; Bergmann et al., IJCV
2022):

* A **region** is one ground-truth channel: one PNG of ``ground_truth/<type>/<image>/``, holding
  one defect instance (its pixels may form several connected pieces). Its single non-zero pixel
  value names its defect type in the category's ``defects_config.json``.
* Each defect type has a **saturation threshold**: with ``relative_saturation`` the region is
  saturated once ``s = int(threshold × area)`` of its pixels are detected, otherwise once
  ``s = min(threshold, area)`` pixels are. ``sPRO(t) = mean over regions of
  min(TP(t) / s, 1)``, where TP(t) counts the region's pixels scoring above ``t``.
* **FPR(t)**: the fraction of the pixels outside every region, over all images of the subset,
  scoring above ``t``.
* The **AU-sPRO** is the area under sPRO against FPR from 0 to ``fpr_limit``, divided by the
  limit (the LOCO paper's main tables use 0.05). It is reported for the logical and for the
  structural anomalies, each together with all good test images, and as the mean of the two
  (the official ``mean``).

Saturation keeps the curve a sum over pixels: sorted by score within its region, the first
``floor(s)`` pixels weigh ``1 / s`` each, the next one the remainder ``(s - floor(s)) / s`` and
the rest nothing, so the weights above any threshold add up to ``min(TP / s, 1)`` exactly (tied
pixels are always counted together). The metric is therefore PRO's computation
(:func:`stad.metrics.functional.pro_from_histograms` and ``pro_from_scores``) with these weights
instead of ``1 / area``: bounded memory in the binned mode (two histograms per image group, the
stated error bound), every score kept in the exact mode.

The metric is evaluated at the anomaly maps' resolution, like every stad pixel metric: regions
are resized to it (nearest neighbour) by the dataset reader, relative saturation uses the resized
area, and absolute thresholds (pixel counts of the original image) are scaled by the ratio of
pixel counts. The official code evaluates at the images' original resolution; at 256 px the two
differ only through the resizing of masks and maps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from stad.defects import (
    ANOMALY_GROUPS,
    DefectConfig,
    Region,
    load_defects_config,
    parse_defects_config,
)
from stad.errors import StadError
from stad.metrics import functional as F
from stad.metrics.classes import Mode, _cat, _pixel_inputs, _PixelMetric, _sorted_state

__all__ = [
    "ANOMALY_GROUPS",
    "SPRO",
    "DefectConfig",
    "Region",
    "load_defects_config",
    "parse_defects_config",
    "saturated_weights",
]

_GROUP_KEYS = ("logical", "structural")  # record keys: spro_logical, spro_structural


def saturated_weights(scores: Tensor, saturation: float) -> tuple[Tensor, Tensor]:
    """The weights that turn a region's pixels into its saturated overlap.

    Args:
        scores: (n,) scores of the region's pixels.
        saturation: The region's saturation area ``s`` (>= 1, <= n).

    Returns:
        ``(top, weights)``: the ``ceil(s)`` highest scores (descending) and their float64
        weights, ``1 / s`` for the first ``floor(s)`` and ``(s - floor(s)) / s`` for the last when
        ``s`` is fractional; the sum of the weights of the scores >= t is ``min(TP(t) / s, 1)``.
    """
    count = min(scores.numel(), math.ceil(saturation))
    top = torch.topk(scores, count, sorted=True).values
    weights = torch.full((count,), 1.0 / saturation, dtype=torch.float64, device=scores.device)
    whole = math.floor(saturation)
    if count > whole:
        weights[whole] = (saturation - whole) / saturation
    return top, weights


class SPRO(_PixelMetric):
    """Normalised area under MVTec LOCO's sPRO curve, per anomaly type and their mean.

    ``compute()`` returns ``{"": mean, "logical": ..., "structural": ...}`` (float64 scalars;
    the run record names them ``spro``, ``spro_logical`` and ``spro_structural``). A type
    without any image in the test set gives NaN (and so does the mean), with a warning.

    The metric reads its batches whole (``takes_batch``): ``update(maps, scores, batch)`` takes
    the regions of each image from ``regions`` by the batch's ``path``, and the image's group
    from its ``defect`` (``good``, ``logical_anomalies`` or ``structural_anomalies``).

    Args:
        regions: The regions of every anomalous test image, by image path (as in the batch's
            ``path``), at the resolution of the anomaly maps.
        fpr_limit: Upper FPR limit of the integral (LOCO's main tables: 0.05).
        mode: "binned" (default; per image group an int64 normal histogram and a float64 weight
            histogram, bounded memory) or "exact" (every pixel).
        num_bits: binned resolution: 2**num_bits bins, 2**(num_bits-9) per octave of scores.
        validate_args: check for NaN scores and non-binary masks.
        kwargs: passed to ``torchmetrics.Metric``.
    """

    takes_batch = True

    # States (add_state): the histograms in binned mode, the score lists in exact mode.
    num_regions: Tensor
    normal_hist: Tensor
    weight_hist: Tensor
    normal_scores: list[Tensor]
    normal_groups: list[Tensor]
    region_scores: list[Tensor]
    region_weights: list[Tensor]
    region_groups: list[Tensor]

    def __init__(
        self,
        regions: Mapping[str, Sequence[Region]],
        fpr_limit: float = 0.05,
        mode: Mode = "binned",
        num_bits: int = F.DEFAULT_NUM_BITS,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(mode=mode, num_bits=num_bits, validate_args=validate_args, **kwargs)
        self.fpr_limit = F.check_fpr_limit(fpr_limit)
        self.regions = {str(path): tuple(rs) for path, rs in regions.items()}
        groups = len(ANOMALY_GROUPS)
        self.add_state(
            "num_regions", default=torch.zeros(groups, dtype=torch.int64), dist_reduce_fx="sum"
        )
        if self.mode == "binned":
            # Row 0: normal pixels of good images; row 1 + g: those of anomalous group g.
            self.add_state(
                "normal_hist",
                default=torch.zeros(groups + 1, self.num_bins, dtype=torch.int64),
                dist_reduce_fx="sum",
            )
            self.add_state(
                "weight_hist",
                default=torch.zeros(groups, self.num_bins, dtype=torch.float64),
                dist_reduce_fx="sum",
            )
        else:
            for name in ("normal_scores", "normal_groups", "region_scores", "region_weights"):
                self.add_state(name, default=[], dist_reduce_fx="cat")
            self.add_state("region_groups", default=[], dist_reduce_fx="cat")

    # -- update ------------------------------------------------------------------------------
    def _group(self, defect: str, label: int, path: str) -> int:
        """0 for good images, 1 + index in ANOMALY_GROUPS for anomalous ones."""
        if label == 0:
            return 0
        if defect not in ANOMALY_GROUPS:
            raise StadError(
                f"sPRO got anomalous image {path} of type {defect!r}; MVTec LOCO's anomalous "
                f"images are {' or '.join(ANOMALY_GROUPS)} (the test folder names)."
            )
        return 1 + ANOMALY_GROUPS.index(defect)

    def _regions_of(self, path: str, shape: tuple[int, ...]) -> tuple[Region, ...]:
        regions = self.regions.get(path)
        if not regions:
            raise StadError(
                f"sPRO has no ground-truth regions for anomalous test image {path}: the metric "
                "must be built from the same test set it evaluates (the MVTec LOCO reader "
                "registers it with its regions)."
            )
        if regions[0].mask.shape != shape:
            raise StadError(
                f"sPRO regions of {path} are {regions[0].mask.shape} but its anomaly map is "
                f"{shape}; anomaly maps must have the dataset's image_size."
            )
        return regions

    def update(self, preds: Tensor, scores: Tensor, batch: Mapping[str, Any]) -> None:
        """Add a batch of anomaly maps.

        Args:
            preds: (B, 1, H, W) or (B, H, W) real anomaly maps.
            scores: (B,) image scores (unused; part of the dataset-metric signature).
            batch: The test batch: ``mask`` (B, 1, H, W), ``label`` (B,), ``path`` (B str) and
                ``defect`` (B str).
        """
        maps, union = _pixel_inputs("sPRO", preds, batch["mask"], self.validate_args)
        self._follow(maps)
        labels = [int(v) for v in torch.as_tensor(batch["label"]).reshape(-1).tolist()]
        groups = [
            self._group(str(d), label, str(p))
            for d, label, p in zip(batch["defect"], labels, batch["path"], strict=True)
        ]
        normal: list[tuple[int, Tensor]] = []
        weighted: list[tuple[int, Tensor, Tensor]] = []
        for i, group in enumerate(groups):
            if group == 0:
                normal.append((0, maps[i].reshape(-1)))
                continue
            regions = self._regions_of(str(batch["path"][i]), tuple(maps.shape[-2:]))
            inside = torch.zeros_like(union[i])
            for region in regions:
                mask = torch.from_numpy(region.mask).to(maps.device)
                inside |= mask
                if region.area == 0:
                    continue  # vanished when resized: the reader warned; it cannot be scored
                top, weights = saturated_weights(maps[i][mask], region.saturation_area())
                weighted.append((group - 1, top, weights))
                self.num_regions[group - 1] += 1
            normal.append((group, maps[i][~inside]))
        self._add(normal, weighted)

    def _add(
        self, normal: list[tuple[int, Tensor]], weighted: list[tuple[int, Tensor, Tensor]]
    ) -> None:
        if self.mode == "exact":
            for group, values in normal:
                self.normal_scores.append(values)
                self.normal_groups.append(torch.full_like(values, group, dtype=torch.uint8))
            for group, top, weights in weighted:
                self.region_scores.append(top)
                self.region_weights.append(weights)
                self.region_groups.append(torch.full_like(top, group, dtype=torch.uint8))
            return
        for group in range(len(ANOMALY_GROUPS) + 1):
            chunks = [v for g, v in normal if g == group]
            if chunks:
                bins = F.score_bins(torch.cat(chunks), self.num_bits)
                self.normal_hist[group] += self._histogram(bins)
        for group, top, weights in weighted:
            # index_add_ rather than bincount(weights=...): deterministic on CUDA.
            self.weight_hist[group].index_add_(0, F.score_bins(top, self.num_bits), weights)

    # -- compute -----------------------------------------------------------------------------
    def _area(self, group: int) -> tuple[Tensor, Tensor]:
        """AU-sPRO and its bound for anomalous group ``group`` with all good images."""
        num_regions = int(self.num_regions[group])
        if self.mode == "binned":
            normal_hist = self.normal_hist[0] + self.normal_hist[group + 1]
            return F.pro_from_histograms(
                normal_hist, self.weight_hist[group], num_regions, self.fpr_limit
            )
        normal_groups = _cat(self.normal_groups, torch.uint8, self.device)
        normal_scores = _cat(self.normal_scores, torch.float32, self.device)
        keep = (normal_groups == 0) | (normal_groups == group + 1)
        normal = _sorted_state([normal_scores[keep]], self.device)
        region_groups = _cat(self.region_groups, torch.uint8, self.device)
        mine = region_groups == group
        value = F.pro_from_scores(
            normal,
            _cat(self.region_scores, normal.dtype, self.device)[mine],
            _cat(self.region_weights, torch.float64, self.device)[mine],
            num_regions,
            self.fpr_limit,
            normal_sorted=True,
        )
        return value, torch.zeros((), dtype=torch.float64, device=value.device)

    def compute(self) -> dict[str, Tensor]:
        """AU-sPRO up to ``fpr_limit``: ``{"": mean, "logical": ..., "structural": ...}``."""
        values, bounds = {}, []
        for group, key in enumerate(_GROUP_KEYS):
            value, bound = self._area(group)
            if int(self.num_regions[group]) == 0:
                self._warn_nan(f"the test set has no {ANOMALY_GROUPS[group]} region ({key})")
            values[key] = value
            bounds.append(bound)
        self._bound = torch.stack(bounds).max()
        return {"": 0.5 * (values["logical"] + values["structural"]), **values}
