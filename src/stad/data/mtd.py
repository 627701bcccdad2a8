"""Magnetic Tile Defects (MTD) reader, with stad's documented deterministic split.

Layout of the released repository (Huang et al., "Surface defect saliency of magnetic tile",
The Visual Computer 2020; github.com/abin24/Magnetic-tile-defect-datasets.)::

    <root>/MT_Free/Imgs/<name>.jpg            defect-free tiles (their .png masks are all zero)
    <root>/MT_<Defect>/Imgs/<name>.jpg        tiles with a defect: Blowhole, Break, Crack, Fray,
    <root>/MT_<Defect>/Imgs/<name>.png        Uneven; the mask has the image's name, .png

MTD has no train/test split, and published numbers depend on the one used. stad's split:
``train_fraction`` (default 0.8) of the ``MT_Free`` images train, the other defect-free images
and every defect image test. Which free images train is decided per file name, not by the order
files are listed in: the images are ranked by ``sha256("<seed>/<file name>")`` and the first
``round(train_fraction × n)`` train. The same names, fraction and seed give the same split on
every machine and with every numpy version; ``info["split_digest"]`` (a hash of the training
names) identifies it in the run record.

The masks have soft (anti-aliased) edges, so they are thresholded at ``mask_threshold`` (a pixel
is anomalous when its value is >= 128 of 255 by default, i.e. at least half covered) instead of
``> 0``. The images are greyscale JPEGs of different sizes; they are repeated over three
channels and resized whole like every stad image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stad.data.base import AnomalyDataset, DatasetSplits, Sample, list_few, split_summary
from stad.data.check import LayoutReport, match_by_key
from stad.data.images import (
    as_hw,
    check_mask_size,
    list_images,
    list_subfolders,
    load_rgb,
    mask_levels,
    open_image,
    resize_mask,
)
from stad.data.mvtec import NORMAL
from stad.errors import DatasetError

__all__ = [
    "MTD_CATEGORY",
    "MTD_DEFECTS",
    "MTDDataset",
    "build_mtd",
    "scan_mtd",
    "split_digest",
    "split_normals",
]

MTD_DEFECTS: tuple[str, ...] = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
"""The five defect classes of MTD (folders ``MT_<class>``)."""

MTD_CATEGORY = "mtd"
"""MTD is one category: every defect class is part of its test set."""

_FREE = "MT_Free"
_IMAGE_SUFFIXES = (".jpg", ".jpeg")
_MASK_SUFFIX = ".png"
_DATASET = "Magnetic Tile Defects"
_ROOT_FIX = (
    "Set dataset.root=/path/to/Magnetic-tile-defect-datasets. (the folder that holds MT_Free/, "
    "MT_Blowhole/, ...), or set STAD_DATA to the folder that holds mtd/; MTD is downloaded from "
    "https://github.com/abin24/Magnetic-tile-defect-datasets."
)
_EXPECTED = (
    "<root>/MT_Free/Imgs/*.jpg (defect-free images) and <root>/MT_<Defect>/Imgs/*.jpg, each with "
    "its mask <same name>.png beside it, for at least one defect class "
    f"({', '.join(MTD_DEFECTS)})"
)


def split_normals(
    images: Sequence[Path], train_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """Split defect-free images into training and test images, deterministically by name.

    Args:
        images: The defect-free images.
        train_fraction: Share that trains, in (0, 1).
        seed: Any integer; another seed draws another split.

    Returns:
        ``(train, test)``, each sorted by file name.
    """

    def rank(path: Path) -> str:
        return hashlib.sha256(f"{seed}/{path.name}".encode()).hexdigest()

    ordered = sorted(images, key=lambda p: (rank(p), p.name))
    n_train = round(train_fraction * len(ordered))
    train = sorted(ordered[:n_train], key=lambda p: p.name)
    return train, sorted(ordered[n_train:], key=lambda p: p.name)


def split_digest(train: Sequence[Path]) -> str:
    """A short hash of the training file names, naming a split in the run record."""
    names = "\n".join(sorted(p.name for p in train))
    return hashlib.sha256(names.encode()).hexdigest()[:12]


def _check_fraction(train_fraction: float) -> float:
    if not 0.0 < float(train_fraction) < 1.0:
        raise DatasetError(
            f"MTD train_fraction={train_fraction!r} must lie in (0, 1): it is the share of the "
            "MT_Free images used for training (default 0.8); set dataset.train_fraction=0.8."
        )
    return float(train_fraction)


def _class_images(folder: Path, problems: list[str]) -> tuple[list[Path], list[Path]]:
    """JPEG images and PNG masks of one ``MT_<class>/Imgs`` folder."""
    files = list_images(folder)
    images = [p for p in files if p.suffix.lower() in _IMAGE_SUFFIXES]
    masks = [p for p in files if p.suffix.lower() == _MASK_SUFFIX]
    if not folder.is_dir():
        problems.append(
            f"{folder} does not exist; every MT_<class> folder holds its images in Imgs/. Restore "
            "it from the dataset repository."
        )
    elif not images:
        problems.append(
            f"{folder} holds no .jpg images (an empty class); restore them from the dataset "
            "repository or delete the class folder."
        )
    return images, masks


def scan_mtd(
    root: str | Path, train_fraction: float = 0.8, seed: int = 0, category: str = MTD_CATEGORY
) -> LayoutReport:
    """Check the MTD layout and list its samples with stad's split.

    Args:
        root: The folder that holds ``MT_Free/`` and the ``MT_<Defect>/`` folders.
        train_fraction: Share of the ``MT_Free`` images that trains, in (0, 1).
        seed: Seed of the split.
        category: Must be ``"mtd"`` (MTD is one category).

    Returns:
        The report: ``train`` (defect-free) and ``test`` (the other defect-free images, then each
        defect class in name order with masks), and every problem found.

    Raises:
        DatasetError: The root does not exist, the category is not ``mtd`` or the fraction is out
            of range.
    """
    train_fraction = _check_fraction(train_fraction)
    if str(category) != MTD_CATEGORY:
        raise DatasetError(
            f"Magnetic Tile Defects has one category, {MTD_CATEGORY!r}, not {category!r}: all its "
            f"defect classes form one test set. Set dataset.category={MTD_CATEGORY}."
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"{_DATASET} root {root} {what}. {_ROOT_FIX}.")
    report = LayoutReport(_DATASET, root, _EXPECTED)
    problems = report.problems
    class_dirs = [d for d in list_subfolders(root) if d.name.startswith("MT_")]
    if not class_dirs:
        nested = [d for d in list_subfolders(root) if (d / _FREE).is_dir()]
        hint = f" It is {nested[0]}: set dataset.root={nested[0]}." if nested else ""
        found = [d.name for d in list_subfolders(root)]
        problems.append(
            f"{root} holds no MT_<class>/ folder (it holds {list_few(found) or 'no folders'})."
            f"{hint} {_ROOT_FIX}."
        )
        return report
    if not (root / _FREE).is_dir():
        problems.append(
            f"{root} has no {_FREE}/ folder of defect-free images; training needs them. Restore "
            "it from the dataset repository."
        )
    free: list[Path] = []
    defects: list[Sample] = []
    for class_dir in class_dirs:
        images, masks = _class_images(class_dir / "Imgs", problems)
        if class_dir.name == _FREE:
            free = images  # their masks are all zero: not read
            continue
        paired = match_by_key(
            images,
            masks,
            lambda p: p.stem,
            lambda p: p.stem,
            problems,
            f"{class_dir / 'Imgs'}/<image name>.png",
        )
        name = class_dir.name.removeprefix("MT_")
        defects += [Sample(p, paired.get(p), 1, name) for p in images]
    if not defects and (root / _FREE).is_dir():
        problems.append(
            f"{root} has no defect class with images (MT_Blowhole/, MT_Crack/, ...); the test set "
            "needs anomalous images. Restore them from the dataset repository."
        )
    train, test_free = split_normals(free, train_fraction, seed)
    if free and (not train or not test_free):
        problems.append(
            f"train_fraction={train_fraction} of the {len(free)} MT_Free images leaves "
            f"{len(train)} for training and {len(test_free)} for testing; both need at least one. "
            "Set dataset.train_fraction closer to 0.5 or add defect-free images."
        )
    report.splits = {
        "train": [Sample(p, None, 0, NORMAL) for p in train],
        "test": [Sample(p, None, 0, NORMAL) for p in test_free] + defects,
    }
    if free:
        report.notes.append(
            f"split: {len(train)} of {len(free)} MT_Free images train (train_fraction="
            f"{train_fraction}, seed={seed}, split_digest={split_digest(train)})"
        )
    return report


class MTDDataset(AnomalyDataset):
    """An :class:`AnomalyDataset` whose masks are thresholded, for MTD's soft-edged masks.

    Args:
        samples: The files, in the order they are served.
        image_size: Output size, one int (square) or ``(height, width)``.
        mask_threshold: A mask pixel is anomalous when its (greyscale) value is >= this.
        preload: Decode everything now (True) or on access (False).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int | Sequence[int],
        mask_threshold: int = 128,
        preload: bool = True,
    ) -> None:
        if not 1 <= int(mask_threshold) <= 255:
            raise DatasetError(
                f"MTD mask_threshold={mask_threshold!r} must lie in 1..255 (default 128: a pixel "
                "is anomalous when at least half covered); set dataset.mask_threshold=128."
            )
        self.mask_threshold = int(mask_threshold)
        super().__init__(samples, image_size, preload)

    def _decode(self, sample: Sample) -> tuple[np.ndarray, np.ndarray, int | None]:
        image, original_size = load_rgb(sample.image_path, self.image_size)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
        if sample.mask_path is None:
            return chw, np.zeros(self.image_size, dtype=np.uint8), None
        img = open_image(sample.mask_path)
        check_mask_size(sample.mask_path, img.size, sample.image_path, original_size)
        binary = (mask_levels(img) >= self.mask_threshold).astype(np.uint8)
        return chw, resize_mask(binary, self.image_size), int(binary.sum())


def build_mtd(
    root: str | Path,
    image_size: int | tuple[int, int],
    train_fraction: float = 0.8,
    seed: int = 0,
    mask_threshold: int = 128,
    category: str = MTD_CATEGORY,
    preload: bool = True,
) -> DatasetSplits:
    """Read MTD into train/test datasets with stad's split.

    Args:
        root: The folder that holds the ``MT_*`` folders.
        image_size: Output size, one int (square) or ``(height, width)``; no crop.
        train_fraction: Share of the ``MT_Free`` images that trains.
        seed: Seed of the split.
        mask_threshold: Mask values >= this are anomalous (soft edges).
        category: ``"mtd"``.
        preload: Decode and resize every file now, so bad files stop the run before training.

    Raises:
        DatasetError: The layout is malformed (every problem in one message), a parameter is out
            of range, or a file is unreadable or of the wrong size.
    """
    size_hw = as_hw(image_size)
    report = scan_mtd(root, train_fraction, seed, category)
    report.raise_if_unusable()
    train, test = report.splits["train"], report.splits["test"]

    def dataset(samples: list[Sample]) -> MTDDataset:
        return MTDDataset(samples, size_hw, mask_threshold=mask_threshold, preload=preload)

    splits = DatasetSplits(train=dataset(train), test=dataset(test))
    splits.info = split_summary(
        "mtd",
        MTD_CATEGORY,
        root,
        train,
        test,
        size_hw,
        train_fraction=float(train_fraction),
        split_seed=int(seed),
        split_digest=split_digest([s.image_path for s in train]),
        mask_threshold=int(mask_threshold),
    )
    return splits
