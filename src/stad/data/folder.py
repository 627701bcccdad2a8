"""The ``folder`` dataset: users' own images, laid out in folders named in the config.

Four folders, each relative to ``dataset.root`` (or absolute)::

    normal_dir        normal training images                       default train/good
    normal_test_dir   normal test images                           default test/good
    abnormal_dir      anomalous test images: each sub-folder is    default test
                      one defect type; images directly inside are
                      the defect type named after the folder
    mask_dir          optional masks, mirroring abnormal_dir's     default ground_truth
                      sub-folders; null for no masks

The mask of ``<abnormal_dir>/<defect>/<stem>.<ext>`` is ``<mask_dir>/<defect>/<name>.<any
image ext>`` where ``<name>`` is ``mask_rule`` with ``{stem}`` replaced (default
``{stem}_mask``; ``{stem}`` when masks carry their image's name). Sub-folders of ``abnormal_dir``
that are the normal folders (``test/good`` inside ``test``) are not defects, so the defaults read
MVTec AD's layout. Without ``mask_dir`` only image metrics are defined (pixel metrics are NaN).
"""

from __future__ import annotations

import string
from pathlib import Path

from stad.data.base import AnomalyDataset, DatasetSplits, Sample, list_few, split_summary
from stad.data.check import LayoutReport, list_required, match_by_key
from stad.data.images import as_hw, list_images, list_subfolders
from stad.data.mvtec import NORMAL
from stad.errors import DatasetError

__all__ = ["build_folder", "mask_name_key", "scan_folder"]

_DATASET = "folder dataset"


def mask_name_key(mask_rule: str) -> tuple[str, str]:
    """Split a mask rule into the text before and after ``{stem}``.

    Raises:
        DatasetError: The rule has no ``{stem}``, another field, or a path separator.
    """
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(mask_rule) if f is not None]
    except ValueError:
        fields = []
    if fields != ["stem"] or "/" in mask_rule or "\\" in mask_rule:
        raise DatasetError(
            f"dataset.mask_rule={mask_rule!r} must contain {{stem}} once, no other field and no "
            "folder, e.g. '{stem}_mask' (mask 000_mask.png for image 000.png) or '{stem}'."
        )
    prefix, suffix = mask_rule.split("{stem}")
    return prefix, suffix


def _resolve(root: Path, folder: str | Path) -> Path:
    path = Path(folder).expanduser()
    return path if path.is_absolute() else root / path


def scan_folder(
    root: str | Path,
    normal_dir: str | Path = "train/good",
    normal_test_dir: str | Path = "test/good",
    abnormal_dir: str | Path = "test",
    mask_dir: str | Path | None = "ground_truth",
    mask_rule: str = "{stem}_mask",
) -> LayoutReport:
    """Check a folder dataset and list its samples.

    Args:
        root: The folder the other paths are relative to.
        normal_dir: Normal training images.
        normal_test_dir: Normal test images.
        abnormal_dir: Anomalous test images (sub-folders = defect types).
        mask_dir: Masks mirroring ``abnormal_dir``'s sub-folders, or None.
        mask_rule: Mask file name (without extension) of image ``<stem>.<ext>``.

    Returns:
        The report: ``train`` and ``test`` (normal test images, then each defect type in name
        order, sorted by file name), and every problem found.

    Raises:
        DatasetError: The root does not exist or the mask rule is malformed.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(
            f"Folder dataset root {root} {what}. Set dataset.root=/path/to/your/data (the "
            "folder that holds the folders named by dataset.normal_dir, normal_test_dir, "
            "abnormal_dir and mask_dir)."
        )
    prefix, suffix = mask_name_key(mask_rule)
    normal, normal_test = _resolve(root, normal_dir), _resolve(root, normal_test_dir)
    abnormal = _resolve(root, abnormal_dir)
    masks_root = None if mask_dir is None else _resolve(root, mask_dir)
    expected = (
        f"normal training images in {normal}, normal test images in {normal_test}, anomalous "
        f"test images in {abnormal} (one sub-folder per defect type)"
        + (
            f" and their masks {masks_root}/<defect>/{mask_rule}.png"
            if masks_root is not None
            else ""
        )
    )
    report = LayoutReport(_DATASET, root, expected)
    problems = report.problems
    if normal.resolve() == normal_test.resolve():
        problems.append(
            f"normal_dir and normal_test_dir are the same folder {normal}; test images must not "
            "be trained on. Move some normal images to a separate test folder."
        )
    train = list_required(normal, "normal training images", problems)
    good = list_required(normal_test, "normal test images", problems)
    groups = _defect_groups(abnormal, (normal, normal_test, masks_root), problems)
    anomalous: list[Sample] = []
    for defect, sub, images in groups:
        paired: dict[Path, Path] = {}
        if masks_root is not None:
            folder = masks_root / sub
            paired = match_by_key(
                images,
                list_images(folder),
                lambda p: p.stem,
                lambda m: _key(m.stem, prefix, suffix),
                problems,
                f"{folder}/{mask_rule}.<png|jpg|...>",
            )
        anomalous += [Sample(p, paired.get(p), 1, defect) for p in images]
    if masks_root is not None:
        _check_mask_folders(masks_root, {sub for _, sub, _ in groups}, problems)
    elif anomalous:
        report.notes.append(
            "no mask_dir: the anomalous images have no masks, so only image metrics are defined"
        )
    report.splits = {
        "train": [Sample(p, None, 0, NORMAL) for p in train],
        "test": [Sample(p, None, 0, NORMAL) for p in good] + anomalous,
    }
    return report


def _key(stem: str, prefix: str, suffix: str) -> str | None:
    """The image stem a mask name encodes, or None if the name does not follow the rule."""
    if len(stem) <= len(prefix) + len(suffix):
        return None
    if not stem.startswith(prefix) or not stem.endswith(suffix):
        return None
    return stem[len(prefix) : len(stem) - len(suffix)]


def _defect_groups(
    abnormal: Path, skip: tuple[Path | None, ...], problems: list[str]
) -> list[tuple[str, str, list[Path]]]:
    """``(defect, sub-folder, images)`` of the anomalous folder: loose images first."""
    if not abnormal.is_dir():
        problems.append(
            f"Anomalous image folder {abnormal} does not exist; set dataset.abnormal_dir to the "
            "folder of anomalous test images (one sub-folder per defect type)."
        )
        return []
    skipped = {p.resolve() for p in skip if p is not None}
    groups = []
    loose = list_images(abnormal)
    if loose:
        groups.append((abnormal.name, "", loose))
    empty = []
    for sub in list_subfolders(abnormal):
        if sub.resolve() in skipped:
            continue
        images = list_images(sub)
        if images:
            groups.append((sub.name, sub.name, images))
        else:
            empty.append(str(sub))
    if empty:
        problems.append(
            f"Defect folder(s) without images: {list_few(empty)}; add their images or delete "
            "the folders."
        )
    if not groups:
        problems.append(
            f"{abnormal} holds no anomalous images (directly or in defect sub-folders); the test "
            "set needs both normal and anomalous images for AUROC."
        )
    return groups


def _check_mask_folders(masks_root: Path, subs: set[str], problems: list[str]) -> None:
    """A missing mask folder, or mask sub-folders that match no defect folder, are problems."""
    if not masks_root.is_dir():
        problems.append(
            f"Mask folder {masks_root} does not exist; create it, or set dataset.mask_dir=null "
            "for a dataset without masks (image metrics only)."
        )
        return
    orphans = [
        str(p) for d in list_subfolders(masks_root) if d.name not in subs for p in list_images(d)
    ]
    if orphans:
        problems.append(
            f"{len(orphans)} mask(s) are in folders that match no defect folder: "
            f"{list_few(orphans)}; name mask folders after the defect folders, or delete them."
        )


def build_folder(
    root: str | Path,
    category: str,
    image_size: int | tuple[int, int],
    normal_dir: str | Path = "train/good",
    normal_test_dir: str | Path = "test/good",
    abnormal_dir: str | Path = "test",
    mask_dir: str | Path | None = "ground_truth",
    mask_rule: str = "{stem}_mask",
    preload: bool = True,
) -> DatasetSplits:
    """Read a folder dataset into train/test datasets.

    Args:
        root: The folder the other paths are relative to.
        category: A name for the record (the data's folders come from the other arguments).
        image_size: Output size, one int (square) or ``(height, width)``; no crop.
        normal_dir: Normal training images.
        normal_test_dir: Normal test images.
        abnormal_dir: Anomalous test images (sub-folders = defect types).
        mask_dir: Masks mirroring ``abnormal_dir``'s sub-folders, or None.
        mask_rule: Mask file name (without extension) of image ``<stem>.<ext>``.
        preload: Decode and resize every file now, so bad files stop the run before training.

    Raises:
        DatasetError: The layout is malformed (every problem in one message), or a file is
            unreadable or of the wrong size.
    """
    size_hw = as_hw(image_size)
    report = scan_folder(root, normal_dir, normal_test_dir, abnormal_dir, mask_dir, mask_rule)
    report.raise_if_unusable()
    train, test = report.splits["train"], report.splits["test"]
    splits = DatasetSplits(
        train=AnomalyDataset(train, size_hw, preload=preload),
        test=AnomalyDataset(test, size_hw, preload=preload),
    )
    masks = mask_dir is not None
    splits.info = split_summary("folder", category, root, train, test, size_hw, masks=masks)
    return splits
