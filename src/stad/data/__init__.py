"""Datasets: one builder per dataset family, chosen by ``dataset.name``.

Each builder turns a ``dataset`` config and an image size into train/test datasets that yield
the batch dict of the contract (image, mask, label, path, defect).
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from stad.data.base import DatasetSplits
from stad.data.mvtec import build_mvtec
from stad.data.mvtec3d import build_mvtec3d
from stad.data.synthetic import ensure_synthetic
from stad.errors import lookup


def _mvtec(cfg: DictConfig, image_size: int) -> DatasetSplits:
    return build_mvtec(cfg.root, cfg.category, image_size)


def _mvtec3d(cfg: DictConfig, image_size: int) -> DatasetSplits:
    return build_mvtec3d(cfg.root, cfg.category, image_size, input=cfg.get("input", "rgbd"))


def _synthetic(cfg: DictConfig, image_size: int) -> DatasetSplits:
    # One cache folder per category: asking for `brick` generates only brick.
    root = ensure_synthetic(cfg.root, categories=[cfg.category], **cfg.generator)
    splits = build_mvtec(root, cfg.category, image_size)
    splits.info["dataset"] = "synthetic"
    return splits


DATASETS: dict[str, Callable[[DictConfig, int], DatasetSplits]] = {
    "mvtec": _mvtec,
    "mvtec3d": _mvtec3d,
    "synthetic": _synthetic,
}


def build_dataset(cfg: DictConfig, image_size: int) -> DatasetSplits:
    """Train/test splits of the dataset a ``dataset`` config names."""
    builder = lookup(DATASETS, "dataset", cfg.name)
    return builder(cfg, image_size)
