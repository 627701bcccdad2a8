"""A labelled validation set without test images: held-out normal training images, plus the same
images with synthetic anomalies (``stad.synthesis``) and their exact masks.

It lets a sweep choose hyper-parameters by AUROC / PRO while the test set stays untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from stad.data.base import Item
from stad.errors import StadError
from stad.synthesis import build_synthesizer

# Every corrupted copy must hold a defect, however small the held-out set.
_ALWAYS_ANOMALOUS = {"clean_probability": 0.0}
_OWN_KEYS = {"image", "mask", "label", "path", "defect"}


class SyntheticAnomalySet(Dataset[Item]):
    """Normal images (label 0) followed by their corrupted copies (label 1, exact masks).

    Args:
        normal: Normal images only (batch dicts of the contract), e.g. the held-out split.
        synthesis: A ``synthesis`` config block (see ``stad.synthesis.build_synthesizer``).
        image_size: Side of the images (for folder textures).
        category: The dataset category (picks the foreground rule).
        seed: Seed of the synthesis: the same seed gives the same set.

    Raises:
        StadError: ``normal`` is empty or holds an anomalous image.
    """

    def __init__(
        self,
        normal: Dataset[Item],
        synthesis: Mapping[str, Any],
        image_size: int,
        category: str | None = None,
        seed: int = 0,
    ) -> None:
        if len(normal) == 0:  # type: ignore[arg-type]
            raise StadError(
                "the synthetic-anomaly validation set needs held-out normal images; set "
                "validation.val_fraction > 0"
            )
        batch = next(iter(DataLoader(normal, batch_size=len(normal), shuffle=False)))  # type: ignore[arg-type]
        if bool((batch["label"] != 0).any()):
            raise StadError("validation images must be normal; an anomalous image was held out")
        synthesizer = build_synthesizer(
            {**dict(synthesis), **_ALWAYS_ANOMALOUS}, image_size, category, seed
        )
        corrupted = synthesizer(batch["image"])
        self.images = torch.cat([batch["image"], corrupted.image])
        self.masks = torch.cat([torch.zeros_like(corrupted.mask), corrupted.mask])
        n = len(batch["path"])
        self.labels = torch.cat([torch.zeros(n), torch.ones(n)]).long()
        self.paths = [*batch["path"], *(f"{p}#synthetic" for p in batch["path"])]
        # Other inputs (depth, foreground ...) are the clean image's for both copies.
        self.extra = {
            key: torch.cat([value, value])
            for key, value in batch.items()
            if key not in _OWN_KEYS and isinstance(value, torch.Tensor)
        }
        self.description = synthesizer.describe()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self.images[index],
            "mask": self.masks[index],
            "label": self.labels[index],
            "path": self.paths[index],
            "defect": "synthetic" if self.labels[index] else "good",
            **{key: value[index] for key, value in self.extra.items()},
        }
