"""BTAD (beanTech Anomaly Detection) reader: check a category's layout, list it, build datasets.

Layout of the released archive (Mishra et al., ISIE 2021)::

    <root>/<category>/train/ok/*            normal training images
    <root>/<category>/test/ok/*             normal test images
    <root>/<category>/test/ko/*             anomalous test images
    <root>/<category>/ground_truth/ko/*     one mask per anomalous image, same stem

File extensions differ per category: ``01`` has ``.bmp`` images with ``.png`` masks, ``02``
``.png`` images and masks, ``03`` ``.bmp`` images and masks. Masks are therefore matched by stem
only, whatever their extension. Normal images carry the defect name ``good`` (stad's convention
for every dataset), anomalous ones ``ko``.
"""

from __future__ import annotations

from pathlib import Path

from stad.data.base import AnomalyDataset, DatasetSplits, Sample, list_few, split_summary
from stad.data.check import LayoutReport, list_required, match_by_key
from stad.data.images import as_hw, list_subfolders
from stad.data.mvtec import NORMAL, category_dir_of

__all__ = ["BTAD_CATEGORIES", "build_btad", "scan_btad"]

BTAD_CATEGORIES: tuple[str, ...] = ("01", "02", "03")
"""BTAD's three products."""

_DATASET = "BTAD"
_ROOT_FIX = (
    "Set dataset.root=/path/to/BTech_Dataset_transformed (the folder that holds 01/, 02/, 03/), "
    "or set STAD_DATA to the folder that holds btad/; BTAD is downloaded from "
    "http://avires.dimi.uniud.it/papers/btad/btad.zip"
)
_EXPECTED = (
    "<category>/train/ok/ (normal training images), <category>/test/ok/ (normal test images), "
    "<category>/test/ko/ (anomalous test images) and <category>/ground_truth/ko/<image stem>.png "
    "or .bmp (one mask per anomalous image)"
)


def scan_btad(root: str | Path, category: str) -> LayoutReport:
    """Check one BTAD category and list its samples.

    Args:
        root: The dataset root, holding ``01/``, ``02/``, ``03/``.
        category: ``"01"``, ``"02"`` or ``"03"``.

    Returns:
        The report: splits ``train`` (``train/ok``) and ``test`` (``test/ok`` then ``test/ko``
        with masks, each sorted by file name), and every layout problem found.

    Raises:
        DatasetError: The root or the category folder does not exist.
    """
    category_dir = category_dir_of(
        Path(root).expanduser(), str(category), _DATASET, BTAD_CATEGORIES, _ROOT_FIX, "btad"
    )
    report = LayoutReport(_DATASET, category_dir, _EXPECTED)
    problems = report.problems
    train = list_required(category_dir / "train" / "ok", "normal training images", problems)
    test_dir = category_dir / "test"
    good = list_required(test_dir / "ok", "normal test images", problems)
    bad = list_required(test_dir / "ko", "anomalous test images", problems)
    others = [str(d) for d in list_subfolders(test_dir) if d.name not in ("ok", "ko")]
    if others:
        problems.append(
            f"{test_dir} holds folders other than ok/ and ko/: {list_few(others)}; BTAD's test "
            "set has only these two. Move the images into ok/ or ko/, or delete the folders."
        )
    gt_dir = category_dir / "ground_truth" / "ko"
    masks: dict[Path, Path] = {}
    if bad and not gt_dir.is_dir():
        problems.append(
            f"{gt_dir} does not exist; every anomalous image test/ko/<stem>.* needs its mask "
            "ground_truth/ko/<stem>.png (or .bmp). Restore it from the dataset archive."
        )
    elif bad:
        masks = match_by_key(
            bad,
            list_required(gt_dir, "masks of the anomalous images", []),
            lambda p: p.stem,
            lambda p: p.stem,
            problems,
            f"{gt_dir}/<image stem>.png (or .bmp)",
        )
    report.splits = {
        "train": [Sample(p, None, 0, NORMAL) for p in train],
        "test": [Sample(p, None, 0, NORMAL) for p in good]
        + [Sample(p, masks.get(p), 1, "ko") for p in bad],
    }
    return report


def build_btad(
    root: str | Path, category: str, image_size: int | tuple[int, int], preload: bool = True
) -> DatasetSplits:
    """Read one BTAD category into train/test datasets.

    Args:
        root: The dataset root.
        category: ``"01"``, ``"02"`` or ``"03"``.
        image_size: Output size, one int (square) or ``(height, width)``; no crop.
        preload: Decode and resize every file now, so bad files stop the run before training.

    Raises:
        DatasetError: The layout is malformed (every problem in one message) or a file is
            unreadable or of the wrong size.
    """
    size_hw = as_hw(image_size)
    report = scan_btad(root, category)
    report.raise_if_unusable()
    train, test = report.splits["train"], report.splits["test"]
    splits = DatasetSplits(
        train=AnomalyDataset(train, size_hw, preload=preload),
        test=AnomalyDataset(test, size_hw, preload=preload),
    )
    splits.info = split_summary("btad", category, root, train, test, size_hw)
    return splits
