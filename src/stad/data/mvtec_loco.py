"""MVTec LOCO AD reader: layout checks, several masks per image, and the sPRO metric.

Layout (Bergmann et al., "Beyond Dents and Scratches", IJCV 2022)::

    <root>/<category>/train/good/*.png                      normal training images
    <root>/<category>/validation/good/*.png                 normal validation images
    <root>/<category>/test/good/*.png                       normal test images
    <root>/<category>/test/logical_anomalies/<stem>.png     images violating logical constraints
    <root>/<category>/test/structural_anomalies/<stem>.png  images with structural defects
    <root>/<category>/ground_truth/<type>/<stem>/000.png, 001.png ...   one PNG per defect
    <root>/<category>/defects_config.json                   per defect type: pixel value and
                                                            saturation threshold

Each ground-truth PNG (a "channel") holds one defect instance: its pixels carry the defect type's
value (255, 254, ... down to 236 in some categories) and everything else is 0. The pixel mask of
an image is the union of its channels (binarised with ``> 0``, so the low values count); the
channels themselves, resized to the run's image size, are kept as the regions of the sPRO metric
(:class:`stad.metrics.spro.SPRO`): the reader hands them on as plain data
(``DatasetSplits.metrics["spro"]``, :mod:`stad.defects`) and the runner builds the metric.
The dataset's own ``validation/good`` split is served as ``DatasetSplits.validation``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stad.data.base import AnomalyDataset, DatasetSplits, Sample, list_few
from stad.data.check import LayoutReport, list_required
from stad.data.images import (
    as_hw,
    check_mask_size,
    list_images,
    list_subfolders,
    load_rgb,
    open_image,
    read_image_size,
    resize_mask,
)
from stad.data.mvtec import NORMAL, _index_by_stem, category_dir_of
from stad.defects import ANOMALY_GROUPS, DefectConfig, Region, load_defects_config
from stad.errors import DatasetError

__all__ = [
    "ANOMALY_GROUPS",
    "MVTEC_LOCO_CATEGORIES",
    "LocoDataset",
    "LocoSample",
    "build_mvtec_loco",
    "read_channel",
    "read_regions",
    "scan_mvtec_loco",
]

MVTEC_LOCO_CATEGORIES: tuple[str, ...] = (
    "breakfast_box",
    "juice_bottle",
    "pushpins",
    "screw_bag",
    "splicing_connectors",
)
"""The 5 categories of MVTec LOCO AD."""

DEFECTS_CONFIG = "defects_config.json"
_DATASET = "MVTec LOCO AD"
_ROOT_FIX = (
    "Set dataset.root=/path/to/mvtec_loco_anomaly_detection (the folder that holds "
    "breakfast_box/, juice_bottle/, ...), or set STAD_DATA to the folder that holds "
    "mvtec_loco_anomaly_detection/; MVTec LOCO AD is downloaded from "
    "https://www.mvtec.com/company/research/datasets/mvtec-loco"
)
_EXPECTED = (
    "<category>/{train,validation}/good/*.png, <category>/test/{good,logical_anomalies,"
    "structural_anomalies}/*.png, <category>/ground_truth/<type>/<image stem>/000.png ... (one "
    f"PNG per defect) and <category>/{DEFECTS_CONFIG}"
)


@dataclass(frozen=True)
class LocoSample(Sample):
    """A :class:`Sample` with every ground-truth channel of the image.

    Attributes:
        channels: The PNGs of ``ground_truth/<type>/<stem>/``, sorted; empty for good images.
            ``mask_path`` is the first of them (None for good images).
    """

    channels: tuple[Path, ...] = ()


# ----------------------------------------------------------------------------- layout


def scan_mvtec_loco(root: str | Path, category: str, check_channels: bool = False) -> LayoutReport:
    """Check one MVTec LOCO AD category and list its samples.

    Args:
        root: The dataset root, holding one folder per category.
        category: The category, e.g. ``"pushpins"``.
        check_channels: Also decode every ground-truth PNG and check its values against
            ``defects_config.json`` (the check command does; building the datasets always does).

    Returns:
        The report: splits ``train``, ``validation`` (normal) and ``test`` (good, then logical,
        then structural anomalies, each sorted by name, anomalies as :class:`LocoSample`), and
        every problem found.

    Raises:
        DatasetError: The root or the category folder does not exist.
    """
    category_dir = category_dir_of(
        Path(root).expanduser(),
        category,
        _DATASET,
        MVTEC_LOCO_CATEGORIES,
        _ROOT_FIX,
        "mvtec_loco_anomaly_detection",
    )
    report = LayoutReport(_DATASET, category_dir, _EXPECTED)
    problems = report.problems
    defects: dict[int, DefectConfig] | None = None
    try:
        defects = load_defects_config(category_dir / DEFECTS_CONFIG)
    except DatasetError as err:
        problems.append(str(err))
    splits = {
        "train": _normal_split(category_dir / "train", problems),
        "validation": _normal_split(category_dir / "validation", problems),
        "test": _test_split(category_dir, problems),
    }
    report.splits = splits
    if check_channels and defects is not None:
        for sample in splits["test"]:
            for channel in getattr(sample, "channels", ()):
                try:
                    read_channel(channel, defects)
                except DatasetError as err:
                    problems.append(str(err))
    return report


def _normal_split(split_dir: Path, problems: list[str]) -> list[Sample]:
    images = list_required(split_dir / NORMAL, f"normal {split_dir.name} images", problems)
    others = [str(d) for d in list_subfolders(split_dir) if d.name != NORMAL]
    if others:
        problems.append(
            f"{split_dir} must hold only {NORMAL}/ (normal images), but it also holds "
            f"{list_few(others)}; move anomalous images to test/ or delete the folders."
        )
    return [Sample(p, None, 0, NORMAL) for p in images]


def _test_split(category_dir: Path, problems: list[str]) -> list[Sample]:
    test_dir = category_dir / "test"
    good = list_required(test_dir / NORMAL, "normal test images", problems)
    known = (NORMAL, *ANOMALY_GROUPS)
    unknown = [str(d) for d in list_subfolders(test_dir) if d.name not in known]
    if unknown:
        problems.append(
            f"{test_dir} holds {list_few(unknown)}; MVTec LOCO AD's test folders are "
            f"{', '.join(known)} (sPRO is reported per anomaly type). Rename or delete them."
        )
    groups = [g for g in ANOMALY_GROUPS if (test_dir / g).is_dir()]
    if test_dir.is_dir() and not groups:
        problems.append(
            f"{test_dir} has neither {' nor '.join(ANOMALY_GROUPS)}; the test set needs anomalous "
            "images. Restore them from the dataset archive."
        )
    samples: list[Sample] = [Sample(p, None, 0, NORMAL) for p in good]
    for group in groups:
        images = list_required(test_dir / group, f"{group} test images", problems)
        samples += _anomalous(images, category_dir / "ground_truth" / group, group, problems)
    return samples


def _anomalous(
    images: list[Path], gt_dir: Path, group: str, problems: list[str]
) -> list[LocoSample]:
    """Anomalous samples of one group with their channel PNGs; gaps go to ``problems``."""
    if images and not gt_dir.is_dir():
        problems.append(
            f"{gt_dir} does not exist; every {group} test image <stem>.png needs its masks "
            f"{gt_dir}/<stem>/000.png ... Restore it from the dataset archive."
        )
        return []
    by_stem = _index_by_stem(images, "", problems)
    folders = {d.name: d for d in list_subfolders(gt_dir)}
    missing = [str(p) for stem, p in by_stem.items() if stem not in folders]
    orphans = [str(d) for name, d in folders.items() if name not in by_stem]
    empty: list[str] = []
    samples = []
    for stem, image in by_stem.items():
        if stem not in folders:
            continue
        channels = tuple(p for p in list_images(folders[stem]) if p.suffix.lower() == ".png")
        if not channels:
            empty.append(str(folders[stem]))
            continue
        samples.append(LocoSample(image, channels[0], 1, group, channels))
    if missing:
        problems.append(
            f"{len(missing)} {group} image(s) have no ground-truth folder: {list_few(missing)}. "
            f"Expected {gt_dir}/<image stem>/000.png ...; restore it from the dataset archive."
        )
    if orphans:
        problems.append(
            f"{len(orphans)} ground-truth folder(s) match no test image: {list_few(orphans)}. "
            f"A folder {gt_dir}/<stem>/ belongs to test/{group}/<stem>.png; restore the image "
            "or delete the folder."
        )
    if empty:
        problems.append(
            f"{len(empty)} ground-truth folder(s) hold no .png mask: {list_few(empty)}. Restore "
            "the masks from the dataset archive."
        )
    return samples


# ----------------------------------------------------------------------------- regions


def read_channel(
    path: Path, defects: Mapping[int, DefectConfig]
) -> tuple[np.ndarray, DefectConfig]:
    """Decode one ground-truth PNG: its defect pixels and its defect type.

    Args:
        path: The PNG.
        defects: The category's ``defects_config.json``, by pixel value.

    Returns:
        bool (H, W) at the file's resolution, and the defect type its value names.

    Raises:
        DatasetError: The file is unreadable, holds no defect pixel or several values, or its
            value is not in ``defects_config.json``.
    """
    img = open_image(path)
    values_img = img.convert("L") if img.mode not in ("L", "I", "I;16", "P") else img
    if values_img.mode == "P":
        values_img = values_img.convert("L")
    values = np.asarray(values_img)
    present = [int(v) for v in np.unique(values) if v != 0]
    if len(present) != 1:
        what = "no defect pixel" if not present else f"the values {present}"
        raise DatasetError(
            f"Ground-truth mask {path} holds {what}; each MVTec LOCO AD mask PNG holds one "
            "defect: 0 and one value listed in defects_config.json. Restore it from the dataset "
            "archive."
        )
    defect = defects.get(present[0])
    if defect is None:
        raise DatasetError(
            f"Ground-truth mask {path} has the value {present[0]}, which defects_config.json "
            f"does not list (it lists {sorted(defects)}); restore the mask or the config file "
            "from the dataset archive."
        )
    return values != 0, defect


def read_regions(
    samples: Sequence[Sample],
    defects: Mapping[int, DefectConfig],
    size_hw: tuple[int, int],
) -> tuple[dict[str, list[Region]], dict[Path, tuple[np.ndarray, int]]]:
    """Decode every channel of the anomalous samples, resized for the metric and the dataset.

    Args:
        samples: Test samples; only :class:`LocoSample` s with channels are read.
        defects: The category's ``defects_config.json``, by pixel value.
        size_hw: The evaluated ``(height, width)``.

    Returns:
        ``(regions, masks)``: the sPRO regions by image path (str) at ``size_hw``, and per image
        its union mask (uint8 (H, W) in {0, 1} at ``size_hw``) with its anomalous pixel count
        at the original resolution.

    Raises:
        DatasetError: A channel is unreadable or invalid (see :func:`read_channel`) or its size
            differs from its image's.
    """
    regions: dict[str, list[Region]] = {}
    masks: dict[Path, tuple[np.ndarray, int]] = {}
    vanished: list[str] = []
    height, width = size_hw
    for sample in samples:
        channels = getattr(sample, "channels", ())
        if not channels:
            continue
        image_size = read_image_size(sample.image_path)
        scale = (height * width) / (image_size[0] * image_size[1])
        union = np.zeros((image_size[1], image_size[0]), dtype=bool)
        found = []
        for channel in channels:
            pixels, defect = read_channel(channel, defects)
            check_mask_size(
                channel, (pixels.shape[1], pixels.shape[0]), sample.image_path, image_size
            )
            union |= pixels
            resized = resize_mask(pixels.astype(np.uint8), size_hw).astype(bool)
            found.append(Region(resized, defect, scale))
            if not resized.any():
                vanished.append(str(channel))
        regions[str(sample.image_path)] = found
        masks[sample.image_path] = (resize_mask(union.astype(np.uint8), size_hw), int(union.sum()))
    if vanished:
        warnings.warn(
            f"{len(vanished)} ground-truth region(s) vanish when resized to {height}x{width} px, "
            f"e.g. {list_few(vanished)}; sPRO cannot score them and leaves them out. Use a larger "
            "dataset.image_size if it must see them.",
            stacklevel=2,
        )
    return regions, masks


class LocoDataset(AnomalyDataset):
    """Test images of MVTec LOCO AD, each served with the union of its ground-truth channels.

    Args:
        samples: The test samples (good ones and :class:`LocoSample` s).
        image_size: Output size, one int (square) or ``(height, width)``.
        masks: Union mask (uint8 (H, W) in {0, 1} at ``image_size``) and original anomalous pixel
            count of every anomalous image (from :func:`read_regions`).
        preload: Decode everything now (True) or on access (False).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int | Sequence[int],
        masks: Mapping[Path, tuple[np.ndarray, int]],
        preload: bool = True,
    ) -> None:
        self.masks = dict(masks)
        super().__init__(samples, image_size, preload)

    def _decode(self, sample: Sample) -> tuple[np.ndarray, np.ndarray, int | None]:
        if sample.label == 0:
            return super()._decode(sample)
        image, _ = load_rgb(sample.image_path, self.image_size)
        mask, count = self.masks[sample.image_path]
        return np.ascontiguousarray(image.transpose(2, 0, 1)), mask, count

    def _check_headers(self) -> None:
        for sample in self.samples:
            image_size = read_image_size(sample.image_path)
            for channel in getattr(sample, "channels", ()):
                check_mask_size(channel, read_image_size(channel), sample.image_path, image_size)


def build_mvtec_loco(
    root: str | Path,
    category: str,
    image_size: int | tuple[int, int],
    spro_fpr_limit: float = 0.05,
    preload: bool = True,
) -> DatasetSplits:
    """Read one MVTec LOCO AD category into train/validation/test datasets with its sPRO.

    Args:
        root: The dataset root, holding one folder per category.
        category: The category, e.g. ``"pushpins"``.
        image_size: Output size, one int (square) or ``(height, width)``; no crop.
        spro_fpr_limit: FPR integration limit of the registered sPRO (LOCO's tables: 0.05).
        preload: Decode and resize every image now, so bad files stop the run before training
            (ground-truth channels are always decoded now: the metric needs them).

    Returns:
        The splits, with ``validation`` set and ``metrics["spro"]`` the arguments of
        :class:`~stad.metrics.spro.SPRO` (the test set's regions, the FPR limit).

    Raises:
        DatasetError: The layout is malformed (every problem in one message), a channel is
            invalid, or a file is unreadable or of the wrong size.
    """
    size_hw = as_hw(image_size)
    report = scan_mvtec_loco(root, category)
    report.raise_if_unusable()
    defects = load_defects_config(Path(report.location) / DEFECTS_CONFIG)
    train, validation, test = (report.splits[s] for s in ("train", "validation", "test"))
    regions, masks = read_regions(test, defects, size_hw)
    splits = DatasetSplits(
        train=AnomalyDataset(train, size_hw, preload=preload),
        test=LocoDataset(test, size_hw, masks, preload=preload),
        validation=AnomalyDataset(validation, size_hw, preload=preload),
    )
    splits.metrics = {"spro": {"regions": regions, "fpr_limit": spro_fpr_limit}}
    # The saturation thresholds of sPRO come from it: part of the data fingerprint.
    splits.extra_files = (Path(report.location) / DEFECTS_CONFIG,)
    splits.info = {
        "dataset": "mvtec_loco",
        "category": category,
        "root": str(Path(root).expanduser()),
        "n_train": len(train),
        "n_validation": len(validation),
        "n_test": len(test),
        "n_test_anomalous": sum(s.label for s in test),
        "n_test_per_type": {g: sum(s.defect == g for s in test) for g in ANOMALY_GROUPS},
        "n_regions": sum(len(r) for r in regions.values()),
        "defects": sorted({s.defect for s in test} - {NORMAL}),
        "spro_fpr_limit": float(spro_fpr_limit),
        "image_size": list(size_hw),
    }
    return splits
