"""Results per defect type (MVTec's broken_large vs contamination, MTD's five classes ...), the
table an error analysis starts with.

For each defect type d: image AUROC of d's images against **all** normal test images; pixel
AUROC, PRO and pixel AP over d's images plus all normal test images. The normal images enter
every type's metrics, so each type is scored against the same normals, as peers report it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from stad.metrics.classes import PRO, ImageAUROC, PixelAP, PixelAUROC

# 2**16 bins per pixel histogram (1 MiB each): a few types × 3 pixel metrics stay small; the
# record keeps each value's error bound.
PER_DEFECT_NUM_BITS = 16


class PerDefect(Metric):
    """Image AUROC, pixel AUROC, PRO and pixel AP per defect type (module docstring).

    Args:
        defects: the test set's defect type names (anomalous images only; "good" is normal).
        pro_fpr_limit: PRO's integration limit.
        num_bits: binned resolution of the pixel metrics.

    ``update(maps, scores, batch)`` reads ``batch["label"]``, ``batch["mask"]`` and
    ``batch["defect"]`` (one name per image); ``compute()`` returns ``{defect: {metric: value,
    metric_error_bound: bound}}``.
    """

    takes_batch = True
    full_state_update = False

    def __init__(
        self,
        defects: Sequence[str],
        pro_fpr_limit: float = 0.3,
        num_bits: int = PER_DEFECT_NUM_BITS,
    ) -> None:
        super().__init__()
        self.defects = sorted(set(defects))
        self.image = nn.ModuleDict({d: ImageAUROC() for d in self.defects})
        self.pixel = nn.ModuleDict({d: PixelAUROC(num_bits=num_bits) for d in self.defects})
        self.pro = nn.ModuleDict(
            {d: PRO(fpr_limit=pro_fpr_limit, num_bits=num_bits) for d in self.defects}
        )
        self.ap = nn.ModuleDict({d: PixelAP(num_bits=num_bits) for d in self.defects})

    def update(self, maps: Tensor, scores: Tensor, batch: dict[str, Any]) -> None:
        """Route each image to its type's metrics, and every normal image to all of them."""
        labels = batch["label"].reshape(-1)
        names = list(batch["defect"])
        normal = labels == 0
        for d in self.defects:
            of_type = torch.tensor([n == d for n in names], device=labels.device)
            chosen = normal | (of_type & (labels != 0))
            if not bool(chosen.any()):
                continue
            _child(self.image, d).update(scores[chosen], labels[chosen])
            for group in (self.pixel, self.pro, self.ap):
                _child(group, d).update(maps[chosen], batch["mask"][chosen])

    def compute(self) -> dict[str, dict[str, Any]]:
        """Every type's four metrics, their error bounds and, for an undefined one, why."""
        out: dict[str, dict[str, Any]] = {}
        for d in self.defects:
            values: dict[str, Any] = {}
            undefined: dict[str, str] = {}
            for name, group in (
                ("image_auroc", self.image),
                ("pixel_auroc", self.pixel),
                ("pro", self.pro),
                ("pixel_ap", self.ap),
            ):
                metric = _child(group, d)
                values[name] = float(metric.compute())
                values[f"{name}_error_bound"] = float(metric.error_bound())
                if metric.undefined_reason:
                    undefined[name] = metric.undefined_reason
            out[d] = {**values, **({"undefined": undefined} if undefined else {})}
        return out

    def reset(self) -> None:
        """Reset every type's metrics."""
        super().reset()
        for group in (self.image, self.pixel, self.pro, self.ap):
            for d in self.defects:
                _child(group, d).reset()


def _child(group: nn.ModuleDict, defect: str) -> Any:
    """One type's metric (ModuleDict items are typed as modules)."""
    return group[defect]


def defect_types(dataset: Any) -> list[str]:
    """The anomalous defect types of a test set whose reader lists its samples (``samples``
    with ``label`` and ``defect``); empty when it does not."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return []
    return sorted({str(s.defect) for s in samples if getattr(s, "label", 0) and s.defect})
