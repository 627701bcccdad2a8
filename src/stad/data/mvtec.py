"""MVTec AD reader: check a category folder's layout, list its samples, build the datasets.

Layout (Bergmann et al., CVPR 2019)::

    <root>/<category>/train/good/*.png                 normal training images
    <root>/<category>/test/<defect>/*.png              test images; defect "good" = normal
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   one mask per anomalous test image

The same layout serves any dataset written in it (the built-in synthetic one, custom data).
Masks are matched to images by file stem, never by full name, so ``0020.bmp`` finds
``0020_mask.png``. Every layout problem raises one :class:`~stad.errors.DatasetError` saying what
was found, what was expected and how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stad.data.base import AnomalyDataset, DatasetSplits, Sample, list_few
from stad.data.images import IMAGE_EXTENSIONS, as_hw, list_images, list_subfolders
from stad.errors import DatasetError

__all__ = [
    "MVTEC_AD_CATEGORIES",
    "AnomalyDataset",
    "DatasetSplits",
    "Sample",
    "build_mvtec",
    "scan_category",
    "scan_mvtec",
]

MVTEC_AD_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
"""The 15 categories of MVTec AD (5 textures, 10 objects)."""

NORMAL = "good"
MASK_SUFFIX = "_mask"
_ROOT_FIX = (
    "Set dataset.root=/path/to/mvtec_ad (the folder that holds bottle/, cable/, ...), or set "
    "the STAD_DATA environment variable to the folder that holds mvtec_ad/; MVTec AD is "
    "downloaded from https://www.mvtec.com/company/research/datasets/mvtec-ad"
)
_EXTENSIONS = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))


def scan_mvtec(root: str | Path, category: str) -> tuple[list[Sample], list[Sample]]:
    """Check the layout of one MVTec AD category and list its samples.

    Args:
        root: The dataset root, holding one folder per category.
        category: The category folder name, e.g. ``"bottle"``.

    Returns:
        ``(train, test)`` samples, sorted by defect folder and then file name; train holds the
        normal images of ``train/good``, test every image of ``test/<defect>`` with its mask.

    Raises:
        DatasetError: The root or category is missing, or the category folder is malformed.
    """
    return scan_category(_category_dir(Path(root).expanduser(), category))


def scan_category(
    category_dir: Path, *, mask_suffix: str = MASK_SUFFIX, dataset_name: str = "MVTec AD"
) -> tuple[list[Sample], list[Sample]]:
    """Check an MVTec-layout category folder and list its ``(train, test)`` samples.

    Args:
        category_dir: The folder holding ``train/``, ``test/`` and ``ground_truth/``.
        mask_suffix: The mask of image ``<stem>.<ext>`` is ``<stem><mask_suffix>.<any ext>``
            (``"_mask"`` in MVTec AD; ``""`` for layouts whose masks carry the image's stem).
        dataset_name: Named in error messages.

    Raises:
        DatasetError: A folder is missing or empty, an anomalous image has no mask, a mask has
            no image, or a mask name is ambiguous.
    """
    train = _scan_train(category_dir, dataset_name)
    defect_images = _scan_test(category_dir, dataset_name)
    masks = _match_masks(category_dir, defect_images, mask_suffix, dataset_name)
    test = [
        Sample(
            image_path=image,
            mask_path=masks.get(image),
            label=0 if defect == NORMAL else 1,
            defect=defect,
        )
        for defect, images in defect_images.items()
        for image in images
    ]
    return train, test


def build_mvtec(
    root: str | Path, category: str, image_size: int | tuple[int, int], preload: bool = True
) -> DatasetSplits:
    """Read one MVTec AD category into train/test datasets.

    Args:
        root: The dataset root, holding one folder per category.
        category: The category, e.g. ``"bottle"``.
        image_size: Output size, one int (square) or ``(height, width)``; images are resized
            whole (no crop).
        preload: Decode and resize every file now, so bad files stop the run before training.

    Returns:
        The splits; ``info`` summarises them for the run record.

    Raises:
        DatasetError: The layout is malformed or a file is unreadable.
    """
    size_hw = as_hw(image_size)
    train_samples, test_samples = scan_mvtec(root, category)
    splits = DatasetSplits(
        train=AnomalyDataset(train_samples, size_hw, preload=preload),
        test=AnomalyDataset(test_samples, size_hw, preload=preload),
    )
    splits.info = {
        "dataset": "mvtec",
        "category": category,
        "root": str(Path(root).expanduser()),
        "n_train": len(train_samples),
        "n_test": len(test_samples),
        "n_test_anomalous": sum(s.label for s in test_samples),
        "defects": sorted({s.defect for s in test_samples} - {NORMAL}),
        "image_size": list(size_hw),
    }
    return splits


def _category_dir(root: Path, category: str) -> Path:
    return category_dir_of(root, category, "MVTec AD", MVTEC_AD_CATEGORIES, _ROOT_FIX, "mvtec_ad")


def category_dir_of(
    root: Path,
    category: str,
    dataset: str,
    categories: Sequence[str],
    root_fix: str,
    root_name: str,
) -> Path:
    """``root/category``, or a DatasetError that says what the root holds and how to fix it.

    Shared by the readers of the MVTec family (MVTec AD, MVTec 3D-AD ...): ``dataset`` names the
    dataset in messages, ``categories`` are its official ones, ``root_fix`` says how to set the
    root and ``root_name`` is the folder STAD_DATA should hold.
    """
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"{dataset} root {root} {what}. {root_fix}.")
    category_dir = root / category
    if category_dir.is_dir():
        return category_dir
    if (root / "train").is_dir() and (root / "test").is_dir():
        raise DatasetError(
            f"Category folder {category_dir} does not exist, but {root} itself holds train/ and "
            f"test/: it is a category folder. Set dataset.root={root.parent} and "
            f"dataset.category={root.name}."
        )
    found = [p.name for p in list_subfolders(root)]
    known = (
        "" if category in categories else f" {dataset}'s categories are {', '.join(categories)}."
    )
    raise DatasetError(
        f"Category folder {category_dir} does not exist; {root} holds "
        f"{list_few(found, limit=20) if found else 'no folders'}.{known} Pick one of those with "
        f"dataset.category=..., or point dataset.root at the folder holding {category}/ (or set "
        f"STAD_DATA to the folder holding {root_name}/)."
    )


def _scan_train(category_dir: Path, dataset_name: str) -> list[Sample]:
    folder = category_dir / "train" / NORMAL
    if not folder.is_dir():
        raise DatasetError(
            f"{dataset_name} category {category_dir} has no {Path('train', NORMAL)}/ folder of "
            f"normal training images. Expected {category_dir}/train/good/*.png; check that "
            "dataset.root and dataset.category point at an extracted category folder."
        )
    images = list_images(folder)
    if not images:
        raise DatasetError(
            f"{dataset_name} training folder {folder} holds no images ({_EXTENSIONS}); copy the "
            "normal training images there, or check that the archive was extracted completely."
        )
    return [Sample(image_path=p, mask_path=None, label=0, defect=NORMAL) for p in images]


def _scan_test(category_dir: Path, dataset_name: str) -> dict[str, list[Path]]:
    """Images of every ``test/<defect>`` folder, by defect name (sorted)."""
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise DatasetError(
            f"{dataset_name} category {category_dir} has no test/ folder. Expected "
            f"{test_dir}/<defect>/*.png with a good/ folder of normal test images; check that "
            "the archive was extracted completely."
        )
    defect_images = {d.name: list_images(d) for d in list_subfolders(test_dir)}
    empty = [str(test_dir / name) for name, images in defect_images.items() if not images]
    if empty:
        raise DatasetError(
            f"{dataset_name} test folder(s) without images ({_EXTENSIONS}): {list_few(empty)}. "
            "Restore their images from the dataset archive, or delete the empty folders."
        )
    anomalous = [name for name in defect_images if name != NORMAL]
    if NORMAL not in defect_images or not anomalous:
        found = ", ".join(f"{n}/" for n in defect_images) or "no defect folders"
        raise DatasetError(
            f"{dataset_name} test folder {test_dir} holds {found}; it needs a {NORMAL}/ folder of "
            "normal images and at least one defect folder of anomalous images (both are needed "
            "for AUROC). Restore the test set from the dataset archive."
        )
    return defect_images


def _match_masks(
    category_dir: Path, defect_images: dict[str, list[Path]], mask_suffix: str, dataset_name: str
) -> dict[Path, Path]:
    """Find the mask of every anomalous test image by file stem; reject gaps and leftovers."""
    gt_dir = category_dir / "ground_truth"
    if not gt_dir.is_dir():
        raise DatasetError(
            f"{dataset_name} category {category_dir} has no ground_truth/ folder; every anomalous "
            f"test image test/<defect>/<name>.png needs a mask "
            f"ground_truth/<defect>/<name>{mask_suffix}.png. Restore it from the dataset archive."
        )
    masks: dict[Path, Path] = {}
    missing: list[str] = []
    orphans: list[str] = []
    problems: list[str] = []
    mask_folders = {d.name for d in list_subfolders(gt_dir)} - {NORMAL}
    for defect, images in defect_images.items():
        if defect == NORMAL:
            continue
        by_stem = _index_by_stem(images, "", problems)
        mask_files = list_images(gt_dir / defect)
        # A file without the suffix is not a mask of this layout, even if its stem matches.
        orphans += [str(m) for m in mask_files if not m.stem.endswith(mask_suffix)]
        mask_files = [m for m in mask_files if m.stem.endswith(mask_suffix)]
        mask_by_stem = _index_by_stem(mask_files, mask_suffix, problems)
        for stem, image in by_stem.items():
            if stem in mask_by_stem:
                masks[image] = mask_by_stem[stem]
            else:
                missing.append(str(image))
        orphans += [str(m) for s, m in mask_by_stem.items() if s not in by_stem]
    for folder in sorted(mask_folders - set(defect_images)):
        orphans += [str(m) for m in list_images(gt_dir / folder)]
    if missing:
        problems.append(
            f"{len(missing)} anomalous test image(s) have no mask: {list_few(missing)}. Expected "
            f"ground_truth/<defect>/<image stem>{mask_suffix}.png for each; restore the masks "
            "from the dataset archive (or move images without ground truth out of test/)."
        )
    if orphans:
        problems.append(
            f"{len(orphans)} mask(s) match no test image: {list_few(orphans)}. A mask of "
            f"test/<defect>/<stem>.png must be ground_truth/<defect>/<stem>{mask_suffix}.png; "
            "rename it, restore its image, or delete it."
        )
    if problems:
        raise DatasetError(
            f"{dataset_name} category {category_dir} is malformed: " + " ".join(problems)
        )
    return masks


def _index_by_stem(files: list[Path], suffix: str, problems: list[str]) -> dict[str, Path]:
    """Map each file's stem, less ``suffix``, to the file; two files with one key are a problem
    (``000.png`` next to ``000.jpg``), reported in ``problems``."""
    index: dict[str, Path] = {}
    for path in files:
        key = path.stem[: len(path.stem) - len(suffix)]
        if key in index:
            problems.append(
                f"{index[key]} and {path} share the stem {key!r}, so masks cannot be matched by "
                "name; keep one of them."
            )
            continue
        index[key] = path
    return index
