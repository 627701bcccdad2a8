"""Datasets: one builder per dataset family, chosen by ``dataset.name``.

Each builder turns a ``dataset`` config and an image size into train/test datasets that yield
the batch dict of the contract (image, mask, label, path, defect). Each family also has a layout
scanner (:data:`LAYOUTS`) that lists its files and problems without decoding anything, for
``python -m stad.data.check``.

Readers are imported when their dataset is used: importing this package must not import
``stad.data.check`` (which the readers use), or ``python -m stad.data.check`` would run a second
copy of that module; it also keeps MVTec LOCO's metric imports out of other runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from omegaconf import DictConfig

from stad.data.base import DatasetSplits
from stad.errors import lookup

if TYPE_CHECKING:
    from stad.data.check import LayoutReport

__all__ = ["DATASETS", "LAYOUTS", "build_dataset", "category_name"]


def category_name(category: object) -> str:
    """A category as its folder name: Hydra reads ``dataset.category=01`` as the int 1, BTAD's
    folder is ``01``."""
    return f"{category:02d}" if isinstance(category, int) else str(category)


def _folders(cfg: DictConfig) -> dict[str, Any]:
    """The folder dataset's layout keys."""
    keys = ("normal_dir", "normal_test_dir", "abnormal_dir", "mask_dir", "mask_rule")
    return {k: cfg[k] for k in keys if k in cfg}


# ----------------------------------------------------------------------------- builders


def _mvtec(cfg: DictConfig, image_size: int) -> DatasetSplits:
    from stad.data.mvtec import build_mvtec

    return build_mvtec(cfg.root, cfg.category, image_size)


def _mvtec3d(cfg: DictConfig, image_size: int) -> DatasetSplits:
    from stad.data.mvtec3d import build_mvtec3d

    return build_mvtec3d(cfg.root, cfg.category, image_size, input=cfg.get("input", "rgbd"))


def _synthetic_root(cfg: DictConfig) -> Path:
    from stad.data.synthetic import ensure_synthetic

    # One cache folder per category: asking for `brick` generates only brick.
    return ensure_synthetic(cfg.root, categories=[cfg.category], **cfg.generator)


def _synthetic(cfg: DictConfig, image_size: int) -> DatasetSplits:
    from stad.data.mvtec import build_mvtec

    splits = build_mvtec(_synthetic_root(cfg), cfg.category, image_size)
    splits.info["dataset"] = "synthetic"
    return splits


def _visa(cfg: DictConfig, image_size: int) -> DatasetSplits:
    from stad.data.visa import build_visa

    return build_visa(cfg.root, cfg.category, image_size, split_file=cfg.get("split_file"))


def _mvtec_loco(cfg: DictConfig, image_size: int) -> DatasetSplits:
    from stad.data.mvtec_loco import build_mvtec_loco

    limit = cfg.get("spro_fpr_limit", 0.05)
    return build_mvtec_loco(cfg.root, cfg.category, image_size, spro_fpr_limit=limit)


def _mtd(cfg: DictConfig, image_size: int) -> DatasetSplits:
    from stad.data.mtd import build_mtd

    return build_mtd(
        cfg.root,
        image_size,
        train_fraction=cfg.get("train_fraction", 0.8),
        seed=cfg.get("split_seed", 0),
        mask_threshold=cfg.get("mask_threshold", 128),
        category=category_name(cfg.get("category", "mtd")),
    )


def _btad(cfg: DictConfig, image_size: int) -> DatasetSplits:
    from stad.data.btad import build_btad

    return build_btad(cfg.root, category_name(cfg.category), image_size)


def _folder(cfg: DictConfig, image_size: int) -> DatasetSplits:
    from stad.data.folder import build_folder

    return build_folder(cfg.root, category_name(cfg.category), image_size, **_folders(cfg))


DATASETS: dict[str, Callable[[DictConfig, int], DatasetSplits]] = {
    "mvtec": _mvtec,
    "mvtec3d": _mvtec3d,
    "synthetic": _synthetic,
    "visa": _visa,
    "mvtec_loco": _mvtec_loco,
    "mtd": _mtd,
    "btad": _btad,
    "folder": _folder,
}


def build_dataset(cfg: DictConfig, image_size: int) -> DatasetSplits:
    """Train/test splits of the dataset a ``dataset`` config names."""
    builder = lookup(DATASETS, "dataset", cfg.name)
    return builder(cfg, image_size)


# ----------------------------------------------------------------------------- layouts

_MVTEC_EXPECTED = (
    "<category>/train/good/*, <category>/test/<defect>/* with a good/ folder, and "
    "<category>/ground_truth/<defect>/<stem>_mask.png for every anomalous image"
)


def _mvtec_layout(name: str, root: str | Path, category: str) -> LayoutReport:
    from stad.data.check import report_of
    from stad.data.mvtec import scan_mvtec

    return report_of(
        name,
        Path(root).expanduser() / category,
        _MVTEC_EXPECTED,
        lambda: dict(zip(("train", "test"), scan_mvtec(root, category), strict=True)),
    )


def _mvtec3d_layout(cfg: DictConfig) -> LayoutReport:
    from stad.data.check import report_of
    from stad.data.mvtec3d import scan_mvtec3d

    expected = (
        "<category>/{train,validation}/good/{rgb,xyz}/ and <category>/test/<defect>/{rgb,xyz,gt}/"
    )
    splits = ("train", "validation", "test")
    return report_of(
        "MVTec 3D-AD",
        Path(cfg.root).expanduser() / cfg.category,
        expected,
        lambda: dict(zip(splits, cast(Any, scan_mvtec3d(cfg.root, cfg.category)), strict=True)),
    )


def _visa_layout(cfg: DictConfig) -> LayoutReport:
    from stad.data.visa import scan_visa

    return scan_visa(cfg.root, cfg.category, cfg.get("split_file"))


def _mvtec_loco_layout(cfg: DictConfig) -> LayoutReport:
    from stad.data.mvtec_loco import scan_mvtec_loco

    return scan_mvtec_loco(cfg.root, cfg.category, check_channels=True)


def _mtd_layout(cfg: DictConfig) -> LayoutReport:
    from stad.data.mtd import scan_mtd

    return scan_mtd(
        cfg.root,
        cfg.get("train_fraction", 0.8),
        cfg.get("split_seed", 0),
        category_name(cfg.get("category", "mtd")),
    )


def _btad_layout(cfg: DictConfig) -> LayoutReport:
    from stad.data.btad import scan_btad

    return scan_btad(cfg.root, category_name(cfg.category))


def _folder_layout(cfg: DictConfig) -> LayoutReport:
    from stad.data.folder import scan_folder

    return scan_folder(cfg.root, **_folders(cfg))


LAYOUTS: dict[str, Callable[[DictConfig], LayoutReport]] = {
    "mvtec": lambda cfg: _mvtec_layout("MVTec AD", cfg.root, cfg.category),
    "mvtec3d": _mvtec3d_layout,
    "synthetic": lambda cfg: _mvtec_layout("synthetic", _synthetic_root(cfg), cfg.category),
    "visa": _visa_layout,
    "mvtec_loco": _mvtec_loco_layout,
    "mtd": _mtd_layout,
    "btad": _btad_layout,
    "folder": _folder_layout,
}
"""Layout scanners by dataset name: a ``dataset`` config → a ``LayoutReport`` (no decoding)."""


def training_files(splits: DatasetSplits) -> list[Path]:
    """The training image files of built splits, in the reader's order (what a method's
    pretraining step may crop, :class:`stad.core.PretrainData`)."""
    return [s.image_path for s in getattr(splits.train, "samples", [])]
