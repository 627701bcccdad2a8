"""VisA reader: the raw archive's layout, split by its official ``split_csv/1cls.csv``.

Layout of the released archive (Zou et al., ECCV 2022; github.com/amazon-science/spot-diff)::

    <root>/split_csv/1cls.csv                           object,split,label,image,mask
    <root>/<category>/Data/Images/Normal/0000.JPG ...   normal images
    <root>/<category>/Data/Images/Anomaly/000.JPG ...   anomalous images
    <root>/<category>/Data/Masks/Anomaly/000.png ...    their masks (any value > 0 is anomalous)
    <root>/<category>/image_anno.csv                    image,label,mask: the defect description

The split file's paths are relative to ``<root>``; ``split`` is ``train`` or ``test``, ``label``
``normal`` or ``anomaly``, and ``mask`` is empty for normal images. stad reads the one-class
split (``1cls``: training images are normal) exactly as listed, never the archive's folders.
The masks store small values (not 255), so they are binarised with ``> 0`` like every stad mask.
Defect names come from ``image_anno.csv`` when present (e.g. ``"chunk of wax missing"``, or
``"melt, scratch"`` for several defects), else ``anomaly``; normal images are ``good``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from stad.data.base import AnomalyDataset, DatasetSplits, Sample, list_few, split_summary
from stad.data.check import LayoutReport
from stad.data.images import as_hw, is_image_file, list_images, list_subfolders
from stad.data.mvtec import NORMAL
from stad.errors import DatasetError

__all__ = ["SPLIT_FILE", "VISA_CATEGORIES", "build_visa", "read_split_file", "scan_visa"]

VISA_CATEGORIES: tuple[str, ...] = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
"""The 12 categories of VisA."""

SPLIT_FILE = "split_csv/1cls.csv"
"""The official one-class split, relative to the dataset root."""

_COLUMNS = ("object", "split", "label", "image", "mask")
_DATASET = "VisA"
_ROOT_FIX = (
    "Set dataset.root=/path/to/VisA (the folder that holds split_csv/, candle/, ...), or set "
    "STAD_DATA to the folder that holds visa/; VisA is downloaded from "
    "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar"
)
_EXPECTED = (
    f"<root>/{SPLIT_FILE} (columns {','.join(_COLUMNS)}; split train|test, label "
    "normal|anomaly, paths relative to <root>) listing <category>/Data/Images/{Normal,Anomaly}/* "
    "and, for each anomalous image, its mask <category>/Data/Masks/Anomaly/*.png"
)


def read_split_file(path: Path, problems: list[str]) -> list[tuple[int, dict[str, str]]] | None:
    """Rows of a VisA split file with their line numbers, or None (and a problem) if unusable.

    Args:
        path: The CSV file.
        problems: Where a missing, unreadable or malformed file is reported.
    """
    fix = (
        f"VisA's archive ships {SPLIT_FILE} (also in github.com/amazon-science/spot-diff); put "
        "it there or set dataset.split_file=/path/to/1cls.csv."
    )
    if not path.is_file():
        problems.append(f"Split file {path} does not exist. {fix}")
        return None
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in reader.fieldnames or []]
            rows = [(reader.line_num, dict(row)) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        problems.append(f"Cannot read split file {path} as CSV ({err}). {fix}")
        return None
    if header[: len(_COLUMNS)] != list(_COLUMNS):
        problems.append(
            f"Split file {path} has the columns {','.join(header) or '(none)'}; a VisA split file "
            f"has {','.join(_COLUMNS)}. {fix}"
        )
        return None
    clean = []
    for line, row in rows:
        clean.append((line, {k.strip(): (v or "").strip() for k, v in row.items() if k}))
    return clean


def _annotations(path: Path) -> dict[str, str]:
    """``image_anno.csv``: the defect description of each image path (empty if absent)."""
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return {
                (row.get("image") or "").strip(): (row.get("label") or "").strip()
                for row in csv.DictReader(f)
            }
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}


def scan_visa(
    root: str | Path, category: str, split_file: str | Path | None = None
) -> LayoutReport:
    """Check one VisA category against the split file and list its samples.

    Args:
        root: The dataset root (holding ``split_csv/`` and the category folders).
        category: The category, e.g. ``"pcb1"``.
        split_file: The split CSV; None for ``<root>/split_csv/1cls.csv``. A relative path is
            taken relative to ``root``.

    Returns:
        The report: ``train`` (normal images) and ``test`` (normal then anomalous images, each
        sorted by path) as the split file lists them, and every problem found.

    Raises:
        DatasetError: The root does not exist.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"{_DATASET} root {root} {what}. {_ROOT_FIX}.")
    split_path = Path(split_file).expanduser() if split_file else Path(SPLIT_FILE)
    split_path = split_path if split_path.is_absolute() else root / split_path
    category_dir = root / category
    report = LayoutReport(_DATASET, category_dir, _EXPECTED)
    problems = report.problems
    rows = read_split_file(split_path, problems)
    if not category_dir.is_dir():
        found = [p.name for p in list_subfolders(root)]
        problems.append(
            f"Category folder {category_dir} does not exist; {root} holds "
            f"{list_few(found, limit=20) if found else 'no folders'}. VisA's categories are "
            f"{', '.join(VISA_CATEGORIES)}; pick one with dataset.category=..."
        )
    if rows is None:
        return report
    mine = [(line, row) for line, row in rows if row.get("object") == category]
    if not mine:
        listed = sorted({row.get("object", "") for _, row in rows})
        problems.append(
            f"Split file {split_path} lists no image of category {category!r} (an empty "
            f"category); it lists {list_few(listed, limit=20) or 'nothing'}. Pick one of those "
            "with dataset.category=..., or use the official split file."
        )
        return report
    report.splits = _samples(root, category, split_path, mine, problems)
    _check_leftovers(root, category_dir, report)
    return report


def _samples(
    root: Path,
    category: str,
    split_path: Path,
    rows: list[tuple[int, dict[str, str]]],
    problems: list[str],
) -> dict[str, list[Sample]]:
    """Samples of a category's split-file rows; bad rows and missing files go to ``problems``."""
    defects = _annotations(root / category / "image_anno.csv")
    train: list[Sample] = []
    test: list[Sample] = []
    bad_rows: list[str] = []
    anomalous_train: list[str] = []
    missing_images: list[str] = []
    missing_masks: list[str] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    for line, row in rows:
        split, label, rel, mask_rel = row["split"], row["label"], row["image"], row["mask"]
        if split not in ("train", "test") or label not in ("normal", "anomaly") or not rel:
            bad_rows.append(f"line {line}: {split},{label},{rel}")
            continue
        if split == "train" and label == "anomaly":
            anomalous_train.append(f"line {line}: {rel}")
            continue
        if rel in seen:
            duplicates.append(rel)
            continue
        seen.add(rel)
        image = root / rel
        if not is_image_file(image):
            missing_images.append(str(image))
            continue
        if label == "normal":
            (train if split == "train" else test).append(Sample(image, None, 0, NORMAL))
            continue
        mask = root / mask_rel if mask_rel else None
        if mask is None or not is_image_file(mask):
            missing_masks.append(f"{image} (mask {mask_rel or 'not listed'})")
            mask = None
        test.append(Sample(image, mask, 1, defects.get(rel) or "anomaly"))
    if bad_rows:
        problems.append(
            f"Split file {split_path} has {len(bad_rows)} malformed row(s) for {category}: "
            f"{list_few(bad_rows)}; split must be train or test and label normal or anomaly. "
            "Use the official split_csv/1cls.csv."
        )
    if anomalous_train:
        problems.append(
            f"Split file {split_path} puts {len(anomalous_train)} anomalous image(s) of "
            f"{category} in train ({list_few(anomalous_train)}); stad trains on normal images "
            "only. Use the one-class split split_csv/1cls.csv (not 2cls_*.csv)."
        )
    if duplicates:
        problems.append(
            f"Split file {split_path} lists {len(duplicates)} image(s) twice: "
            f"{list_few(duplicates)}. Use the official split_csv/1cls.csv."
        )
    if missing_images:
        problems.append(
            f"{len(missing_images)} image(s) listed in {split_path} do not exist: "
            f"{list_few(missing_images)}. Check dataset.root (paths in the split file are "
            "relative to it) or restore the images from the archive."
        )
    if missing_masks:
        problems.append(
            f"{len(missing_masks)} anomalous image(s) have no mask: {list_few(missing_masks)}. "
            "Each anomaly row needs <category>/Data/Masks/Anomaly/<stem>.png; restore the masks "
            "from the archive."
        )
    train.sort(key=lambda s: str(s.image_path))
    test.sort(key=lambda s: (s.label, str(s.image_path)))
    for split, samples, need in (
        ("train", train, "normal training images"),
        ("test", [s for s in test if s.label == 0], "normal test images"),
        (
            "test",
            [s for s in test if s.label == 1],
            "anomalous test images (both classes are needed for AUROC)",
        ),
    ):
        if not samples and not missing_images:
            problems.append(
                f"Split file {split_path} lists no {need} of {category} in its {split} split; "
                "use the official split_csv/1cls.csv."
            )
    return {"train": train, "test": test}


def _check_leftovers(root: Path, category_dir: Path, report: LayoutReport) -> None:
    """Masks that belong to no listed image are problems; unlisted images are only noted."""
    listed = {s.image_path for s in report.samples()}
    listed_masks = {s.mask_path for s in report.samples() if s.mask_path is not None}
    masks = list_images(category_dir / "Data" / "Masks" / "Anomaly")
    orphans = [str(m) for m in masks if m not in listed_masks]
    if orphans:
        report.problems.append(
            f"{len(orphans)} mask(s) in {category_dir / 'Data' / 'Masks' / 'Anomaly'} belong to "
            f"no anomalous image of the split file: {list_few(orphans)}. Restore their images "
            "and the official split file, or delete the masks."
        )
    images = list_images(category_dir / "Data" / "Images" / "Normal") + list_images(
        category_dir / "Data" / "Images" / "Anomaly"
    )
    unlisted = [p for p in images if p not in listed]
    if unlisted:
        report.notes.append(
            f"{len(unlisted)} image(s) under {category_dir / 'Data' / 'Images'} are not in the "
            f"split file and are not used, e.g. {list_few([str(p) for p in unlisted], limit=3)}"
        )


def build_visa(
    root: str | Path,
    category: str,
    image_size: int | tuple[int, int],
    split_file: str | Path | None = None,
    preload: bool = True,
) -> DatasetSplits:
    """Read one VisA category into train/test datasets, split by the official split file.

    Args:
        root: The dataset root.
        category: The category, e.g. ``"pcb1"``.
        image_size: Output size, one int (square) or ``(height, width)``; no crop.
        split_file: The split CSV (default ``<root>/split_csv/1cls.csv``).
        preload: Decode and resize every file now, so bad files stop the run before training.

    Raises:
        DatasetError: The layout or split file is malformed (every problem in one message), or a
            file is unreadable or of the wrong size.
    """
    size_hw = as_hw(image_size)
    report = scan_visa(root, category, split_file)
    report.raise_if_unusable()
    train, test = report.splits["train"], report.splits["test"]
    splits = DatasetSplits(
        train=AnomalyDataset(train, size_hw, preload=preload),
        test=AnomalyDataset(test, size_hw, preload=preload),
    )
    split = str(split_file or SPLIT_FILE)
    splits.info = split_summary("visa", category, root, train, test, size_hw, split_file=split)
    split_path = Path(split_file).expanduser() if split_file else Path(SPLIT_FILE)
    # The split file decides what is train and test: part of the data fingerprint.
    splits.extra_files = (
        split_path if split_path.is_absolute() else Path(root).expanduser() / split_path,
    )
    return splits
