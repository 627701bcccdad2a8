"""Dataset layout checks: the report every reader fills (the command ``python -m
stad.data.check`` is in :mod:`stad.data.check_command`).

A reader's ``scan_*`` function lists a dataset's files as :class:`~stad.data.base.Sample` s per
split and collects every layout problem it finds (missing folders, images without masks, masks
without images, empty categories, a bad split file ...) in one :class:`LayoutReport`, instead of
stopping at the first. Before training, the reader calls :meth:`LayoutReport.raise_if_unusable`,
which raises one :class:`~stad.errors.DatasetError` showing what was found and what was expected.

The command prints the same report without training, adding a header pass over every image and
mask (unreadable files, mask sizes that differ from their image's)::

    python -m stad.data.check dataset=visa dataset.root=/data/visa dataset.category=pcb1
    python -m stad.data.check dataset=btad dataset.category=all    # every category of the yaml

It exits with 0 when every checked category is usable, 2 otherwise (the message on stderr).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stad.data.base import Sample, list_few
from stad.data.images import IMAGE_EXTENSIONS, list_images, read_image_size
from stad.errors import DatasetError

__all__ = [
    "LayoutReport",
    "check_sizes",
    "list_required",
    "match_by_key",
    "report_of",
]


@dataclass
class LayoutReport:
    """What a reader found in a dataset folder.

    Attributes:
        dataset: The dataset's name in messages, e.g. ``"VisA"``.
        location: The folder that was checked (a category folder or the dataset root).
        expected: The expected layout, in words (shown when something is wrong).
        splits: Samples per split name (``"train"``, ``"validation"``, ``"test"``).
        problems: Everything that makes the layout unusable, one sentence each with its fix.
        notes: Facts worth printing that are not problems (e.g. how a split was drawn).
    """

    dataset: str
    location: Path
    expected: str
    splits: dict[str, list[Sample]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """No problem was found."""
        return not self.problems

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of samples per split and defect type (``{"test": {"good": 2, "crack": 3}}``)."""
        out: dict[str, dict[str, int]] = {}
        for split, samples in self.splits.items():
            per_defect: dict[str, int] = {}
            for sample in samples:
                per_defect[sample.defect] = per_defect.get(sample.defect, 0) + 1
            out[split] = per_defect
        return out

    def summary(self) -> str:
        """What was found, one clause per split."""
        return "; ".join(self.summary_lines())

    def summary_lines(self) -> list[str]:
        """One line per split: total, per defect type, and how many samples have masks."""
        if not self.splits:
            return ["no images were listed"]
        lines = []
        for split, per_defect in self.counts().items():
            samples = self.splits[split]
            parts = ", ".join(f"{defect} {n}" for defect, n in per_defect.items()) or "none"
            anomalous = sum(s.label for s in samples)
            masked = sum(s.mask_path is not None for s in samples if s.label == 1)
            masks = f", {masked} of {anomalous} anomalous with masks" if anomalous else ""
            lines.append(f"{split}: {len(samples)} images ({parts}{masks})")
        return lines

    def format(self) -> str:
        """The full report as printed by the check command."""
        status = "usable" if self.usable else f"NOT usable ({len(self.problems)} problem(s))"
        lines = [f"{self.dataset} at {self.location}: {status}"]
        lines += [f"  {line}" for line in self.summary_lines()]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  problem: {problem}" for problem in self.problems]
        if self.problems and self.expected:
            lines.append(f"  expected: {self.expected}")
        return "\n".join(lines)

    def raise_if_unusable(self) -> None:
        """Raise one DatasetError with every problem, what was found and what was expected.

        Raises:
            DatasetError: The report holds at least one problem.
        """
        if self.problems:
            expected = f" Expected: {self.expected}" if self.expected else ""
            raise DatasetError(
                f"{self.dataset} at {self.location} is not usable: {' '.join(self.problems)} "
                f"Found: {self.summary()}.{expected}"
            )

    def samples(self) -> list[Sample]:
        """Every sample of every split."""
        return [s for samples in self.splits.values() for s in samples]


def report_of(
    dataset: str,
    location: Path,
    expected: str,
    scan: Callable[[], dict[str, list[Sample]]],
) -> LayoutReport:
    """Run a raising scan function (the MVTec-family readers) and turn its result into a report.

    A DatasetError becomes the report's only problem, so the check command prints it like the
    problems of the collecting readers.
    """
    report = LayoutReport(dataset, location, expected)
    try:
        report.splits = scan()
    except DatasetError as err:
        report.problems.append(str(err))
    return report


def match_by_key(
    images: Sequence[Path],
    masks: Sequence[Path],
    image_key: Callable[[Path], str],
    mask_key: Callable[[Path], str | None],
    problems: list[str],
    mask_rule: str,
) -> dict[Path, Path]:
    """Pair images with masks by a key derived from each file name (usually the stem).

    Args:
        images: Anomalous images that need a mask.
        masks: Candidate mask files.
        image_key: The key of an image (e.g. its stem).
        mask_key: The key of a mask, or None when the name does not follow the rule.
        problems: Gaps, leftovers and ambiguous names are appended here.
        mask_rule: How a mask is named, for messages (e.g. ``"ground_truth/ko/<stem>.png"``).

    Returns:
        The mask of every image that has exactly one.
    """
    by_key: dict[str, Path] = {}
    orphans: list[str] = []
    for mask in masks:
        key = mask_key(mask)
        if key is None:
            orphans.append(str(mask))
        elif key in by_key:
            problems.append(
                f"{by_key[key]} and {mask} are both masks of the image with stem {key!r}; keep "
                "one of them."
            )
        else:
            by_key[key] = mask
    image_keys: dict[str, Path] = {}
    for image in images:
        key = image_key(image)
        if key in image_keys:
            problems.append(
                f"{image_keys[key]} and {image} share the stem {key!r}, so masks cannot be "
                "matched by name; keep one of them."
            )
        image_keys.setdefault(key, image)
    missing = [str(image) for key, image in image_keys.items() if key not in by_key]
    orphans += [str(mask) for key, mask in by_key.items() if key not in image_keys]
    if missing:
        problems.append(
            f"{len(missing)} anomalous image(s) have no mask: {list_few(missing)}. Expected "
            f"{mask_rule} for each; restore the masks, or move images without ground truth out "
            "of the test set."
        )
    if orphans:
        problems.append(
            f"{len(orphans)} mask(s) match no image: {list_few(orphans)}. A mask must be named "
            f"{mask_rule}; rename it, restore its image, or delete it."
        )
    return {image: by_key[key] for key, image in image_keys.items() if key in by_key}


EXTENSIONS = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
"""The image suffixes stad reads, for messages."""


def list_required(folder: Path, what: str, problems: list[str]) -> list[Path]:
    """The images of a folder that must exist and hold images; a problem is added otherwise.

    Args:
        folder: The folder.
        what: What it should hold, e.g. ``"normal training images"``.
        problems: Where a missing or empty folder is reported.
    """
    if not folder.is_dir():
        problems.append(
            f"{folder} does not exist; it should hold the {what}. Check dataset.root (and "
            "dataset.category), or restore the folder from the dataset archive."
        )
        return []
    images = list_images(folder)
    if not images:
        problems.append(
            f"{folder} holds no images ({EXTENSIONS}); it should hold the {what}. Restore them "
            "from the dataset archive, or check that the archive was extracted completely."
        )
    return images


def check_sizes(report: LayoutReport) -> None:
    """Read the header of every image and mask of the report; add unreadable files and masks
    whose size differs from their image's to its problems (the check command's extra pass)."""
    mismatched: list[str] = []
    for sample in report.samples():
        masks = getattr(sample, "channels", None) or (
            () if sample.mask_path is None else (sample.mask_path,)
        )
        try:
            image_size = read_image_size(sample.image_path)
            for mask in masks:
                mask_size = read_image_size(mask)
                if mask_size != image_size:
                    mismatched.append(
                        f"{mask} is {mask_size[0]}x{mask_size[1]} px but its image "
                        f"{sample.image_path.name} is {image_size[0]}x{image_size[1]} px"
                    )
        except DatasetError as err:
            report.problems.append(str(err))
    if mismatched:
        report.problems.append(
            f"{len(mismatched)} mask(s) differ in size from their image: "
            f"{list_few(mismatched)}. A mask must have its image's size; restore both from the "
            "dataset archive."
        )


# ----------------------------------------------------------------------------- command


if __name__ == "__main__":
    # The command lives in stad.data.check_command (it needs the readers, which import this).
    from stad.data.check_command import main as _main

    sys.exit(_main())
