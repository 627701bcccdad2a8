"""What every dataset family produces: a list of samples, a dataset that serves batches, splits.

A dataset reader (``mvtec.py``, ...) only lists files as :class:`Sample` s and checks the layout;
:class:`AnomalyDataset` decodes, resizes and serves them as the batch dict of the contract
(``image``, ``mask``, ``label``, ``path``, ``defect``), and :class:`DatasetSplits` carries the
train/test datasets with a summary for the run record. :func:`data_fingerprint` identifies the
files a run reads, from their names and sizes, for the run record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from stad.data.images import (
    DecodeCache,
    as_hw,
    check_mask_size,
    load_mask,
    load_rgb,
    read_image_size,
    split_mask_rule,
)
from stad.errors import DatasetError

# Decoding threads: PIL releases the GIL while decoding and resizing, so threads scale on
# multi-core machines and any error still surfaces in the main process.
# What a dataset yields per index: "image" (3×H×W float tensor), "label", "mask", "path",
# "category" and, where the reader knows them, the defect type and 3-D channels.
Item = dict[str, Any]

_MAX_DECODE_THREADS = 8
# Files named per problem in a warning; the rest are counted.
_MAX_LISTED = 5


# The decode cache of the current run (``decode_cache`` in the config), for every dataset the
# readers build inside :func:`decode_cache`; readers need no parameter for it.
_RUN_DECODE_CACHE: ContextVar[str | Path | None] = ContextVar("stad_decode_cache", default=None)


@contextmanager
def decode_cache(folder: str | Path | None) -> Iterator[None]:
    """Datasets built inside this block keep decoded, resized images in ``folder`` across runs
    (None: decode from the files every time)."""
    token = _RUN_DECODE_CACHE.set(folder)
    try:
        yield
    finally:
        _RUN_DECODE_CACHE.reset(token)


# The evaluation protocol's mask rule of the current run (``eval_protocol.mask_rule``), for
# every dataset built inside :func:`mask_rule`; readers need no parameter for it.
_RUN_MASK_RULE: ContextVar[str] = ContextVar("stad_mask_rule", default="nearest")


@contextmanager
def mask_rule(rule: str, downscale: int | None = None) -> Iterator[None]:
    """Datasets built inside this block bring binary masks to their size by ``rule``
    (:data:`stad.data.images.MASK_RULES`; default ``nearest``), on a grid ``downscale`` times
    coarser held at their size when one is given (``eval_protocol.mask_downscale``)."""
    spec = rule if downscale is None else f"{rule}@{int(downscale)}"
    split_mask_rule(spec)  # fails with the fix in its message
    token = _RUN_MASK_RULE.set(spec)
    try:
        yield
    finally:
        _RUN_MASK_RULE.reset(token)


@dataclass(frozen=True)
class Sample:
    """One image file of a dataset, with its ground truth.

    Attributes:
        image_path: The image file.
        mask_path: Its ground-truth mask file, or None (normal images: an all-zero mask).
        label: 0 normal, 1 anomalous.
        defect: The defect type (``"good"`` for normal images in the MVTec convention).
    """

    image_path: Path
    mask_path: Path | None
    label: int
    defect: str

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise DatasetError(
                f"Sample {self.image_path} has label {self.label!r}; labels are 0 (normal) or "
                "1 (anomalous). This is a bug in the dataset reader that listed it."
            )

    def files(self) -> tuple[Path, ...]:
        """Every file this sample reads: each Path field, and each Path in a tuple/list field.

        Generic over subclasses, so a reader that adds a file to its samples (MVTec 3D-AD's
        ``xyz_path``, MVTec LOCO's ``channels``) is covered without code here. In field order,
        without repeats.
        """
        found: dict[Path, None] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            values = value if isinstance(value, tuple | list) else (value,)
            found.update((v, None) for v in values if isinstance(v, Path))
        return tuple(found)


@dataclass
class DatasetSplits:
    """The datasets of one run.

    Attributes:
        train: Normal images only; the datamodule holds a part of them out for validation.
        test: Normal and anomalous images with masks; used for the final metrics only.
        info: Summary for the run record, e.g. ``{"dataset": "mvtec", "category": "bottle",
            "n_train": 209, "n_test": 83, "n_test_anomalous": 63, "image_size": [256, 256]}``.
        validation: Normal images of the dataset's own validation split (MVTec 3D-AD's
            ``validation/good``), or None for datasets without one (MVTec AD); never test images.
        metrics: The dataset's own test metrics beside the common ones: record name (a key of
            ``stad.metrics.DATASET_METRICS``) -> the metric's arguments, plain data (e.g.
            MVTec LOCO's ground-truth regions for sPRO); the runner builds the metrics. See
            ``stad.core.update_metric`` for what their ``update`` receives.
        extra_files: Files the reader read besides the samples' own (a split list, a defect
            config), counted by :func:`data_fingerprint`.
    """

    train: Dataset[Item]
    test: Dataset[Item]
    info: dict[str, Any] = field(default_factory=dict)
    validation: Dataset[Item] | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra_files: tuple[Path, ...] = ()


class AnomalyDataset(Dataset[Item]):
    """Samples of any dataset family, decoded, resized (no crop) and served as batch dicts.

    With ``preload=True`` (default) every image and mask is decoded and resized at construction,
    in the main process, and kept as uint8 (256² px × 3 bytes per image); an unreadable file or a
    mask whose size differs from its image then stops the run before training, never inside a
    DataLoader worker. With ``preload=False`` only the file headers are checked up front (missing
    or unidentifiable files, mask sizes) and pixels are decoded on access.

    Each item is a dict:

    - ``image``: float32 (3, H, W) in [0, 1], not normalised (the teacher normalises);
    - ``mask``: float32 (1, H, W) with values in {0, 1}; all zero for samples without a mask;
    - ``label``: int64 scalar, 0 normal / 1 anomalous;
    - ``path``: the image file as str; ``defect``: the defect type.

    Args:
        samples: The files, in the order they are served.
        image_size: Output size, one int (square) or ``(height, width)``.
        preload: Decode everything now (True) or on access (False).
        cache: A :class:`~stad.data.images.DecodeCache` (or its folder) that keeps decoded,
            resized arrays across runs, or None to decode from the files every time.

    Raises:
        DatasetError: A file is missing or unreadable, or a mask's size differs from its image's.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int | Sequence[int],
        preload: bool = True,
        cache: DecodeCache | str | Path | None = None,
    ) -> None:
        self.samples: list[Sample] = list(samples)
        self.image_size: tuple[int, int] = as_hw(image_size)
        self.preload = preload
        if cache is None:
            cache = _RUN_DECODE_CACHE.get()
        self.cache = DecodeCache(cache) if isinstance(cache, str | Path) else cache
        self.mask_rule = _RUN_MASK_RULE.get()
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None
        if preload:
            self._preload()
        else:
            self._check_headers()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        if self._images is not None and self._masks is not None:
            image, mask = self._images[index], self._masks[index]
        else:
            image, mask, _ = self._decode(sample)
        return {
            "image": torch.from_numpy(image).to(torch.float32).div_(255.0),
            "mask": torch.from_numpy(mask).to(torch.float32).unsqueeze(0),
            "label": torch.tensor(sample.label, dtype=torch.int64),
            "path": str(sample.image_path),
            "defect": sample.defect,
        }

    @property
    def labels(self) -> list[int]:
        """The label of every sample, in order."""
        return [s.label for s in self.samples]

    def files(self) -> list[Path]:
        """Every file the dataset reads (images, masks, point clouds, ...), in sample order,
        without repeats (see :meth:`Sample.files`)."""
        found: dict[Path, None] = {}
        for sample in self.samples:
            found.update(dict.fromkeys(sample.files()))
        return list(found)

    def _decode(self, sample: Sample) -> tuple[np.ndarray, np.ndarray, int | None]:
        """Decode one sample: image uint8 (3, H, W), mask uint8 (H, W) in {0, 1}, and the mask's
        anomalous pixel count at the original resolution (None without a mask); through the
        decode cache when there is one."""
        if self.cache is None:
            return self._decode_files(sample)
        key = self.cache.key(sample.image_path, sample.mask_path, self.image_size, self.mask_rule)
        cached = self.cache.load(key, self.image_size) if key is not None else None
        if cached is not None:
            return cached
        decoded = self._decode_files(sample)
        if key is not None:
            self.cache.store(key, *decoded)
        return decoded

    def _decode_files(self, sample: Sample) -> tuple[np.ndarray, np.ndarray, int | None]:
        image, original_size = load_rgb(sample.image_path, self.image_size)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
        if sample.mask_path is None:
            return chw, np.zeros(self.image_size, dtype=np.uint8), None
        mask, n_pixels = load_mask(
            sample.mask_path, self.image_size, sample.image_path, original_size, self.mask_rule
        )
        return chw, mask, n_pixels

    def _preload(self) -> None:
        n_threads = max(1, min(_MAX_DECODE_THREADS, os.cpu_count() or 1, len(self.samples)))
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            decoded = list(pool.map(self._decode, self.samples))
        height, width = self.image_size
        self._images = np.empty((len(decoded), 3, height, width), dtype=np.uint8)
        self._masks = np.empty((len(decoded), height, width), dtype=np.uint8)
        for i, (image, mask, _) in enumerate(decoded):
            self._images[i] = image
            self._masks[i] = mask
        self._warn_empty_masks([d[2] for d in decoded])

    def _warn_empty_masks(self, pixel_counts: list[int | None]) -> None:
        """Warn about anomalous samples whose mask has no anomalous pixel, at the original or at
        the evaluated resolution: pixel metrics cannot see those defects."""
        assert self._masks is not None
        empty, vanished = [], []
        for i, (sample, count) in enumerate(zip(self.samples, pixel_counts, strict=True)):
            if sample.label != 1 or count is None:
                continue
            if count == 0:
                empty.append(sample.mask_path)
            elif not self._masks[i].any():
                vanished.append(sample.mask_path)
        if empty:
            warnings.warn(
                f"{len(empty)} anomalous image(s) have an all-zero mask, e.g. "
                f"{list_few(empty)}; pixel metrics treat them as normal. Check these mask files.",
                stacklevel=3,
            )
        if vanished:
            warnings.warn(
                f"{len(vanished)} mask(s) lose their whole defect when resized to "
                f"{self.image_size[0]}x{self.image_size[1]} px, e.g. {list_few(vanished)}; use a "
                "larger dataset.image_size if pixel metrics must see these defects.",
                stacklevel=3,
            )

    def _check_headers(self) -> None:
        for sample in self.samples:
            image_size = read_image_size(sample.image_path)
            if sample.mask_path is None:
                continue
            mask_size = read_image_size(sample.mask_path)
            check_mask_size(sample.mask_path, mask_size, sample.image_path, image_size)


def split_summary(
    dataset: str,
    category: object,
    root: str | Path,
    train: Sequence[Sample],
    test: Sequence[Sample],
    image_size: Sequence[int],
    **extra: Any,
) -> dict[str, Any]:
    """The ``info`` of a dataset's splits for the run record: where, how many, which defects."""
    return {
        "dataset": dataset,
        "category": str(category),
        "root": str(Path(root).expanduser()),
        **extra,
        "n_train": len(train),
        "n_test": len(test),
        "n_test_anomalous": sum(s.label for s in test),
        "defects": sorted({s.defect for s in test if s.label == 1}),
        "image_size": list(image_size),
    }


def list_few(items: Sequence[object], limit: int = _MAX_LISTED) -> str:
    """The first ``limit`` items joined by commas, then how many more there are (for messages)."""
    listed = ", ".join(str(item) for item in items[:limit])
    return listed + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------- fingerprint


def data_fingerprint(splits: DatasetSplits) -> dict[str, Any]:
    """Identify the files a run reads, cheaply: their relative paths, split and sizes, hashed.

    Every file of the train, validation and test samples (images, masks, point clouds, ...; see
    :meth:`AnomalyDataset.files`) and ``splits.extra_files`` is listed as one line
    ``<split>\t<relative path>\t<size in bytes>``; the sorted lines are hashed with SHA-256.
    Paths are relative to the dataset root (``splits.info["root"]``) when every file lies under
    it, else to the files' common folder, in POSIX form and Unicode NFC (a copy made on macOS,
    which stores names decomposed, fingerprints like the original), so the same layout at
    another location gives the same fingerprint. The split is part of each line, so moving a
    file from train to test changes it. Only ``stat`` is called, no content is read: an edit
    that keeps a file's size is not seen (file modification times differ between copies and are
    not used).

    Args:
        splits: The datasets of a run.

    Returns:
        ``{"files": number of distinct files, "sha256": hex digest, "bytes": their total size}``.

    Raises:
        DatasetError: A listed file no longer exists.
        TypeError: A dataset does not list its files (no ``files()`` method).
    """
    roles = [("train", splits.train), ("validation", splits.validation), ("test", splits.test)]
    listed = [(role, path) for role, dataset in roles for path in _dataset_files(dataset)]
    listed += [("extra", Path(path)) for path in splits.extra_files]
    absolute = [(role, Path(os.path.abspath(path))) for role, path in listed]
    base = _fingerprint_base([path for _, path in absolute], splits.info.get("root"))
    sizes: dict[Path, int] = {}
    lines = []
    for role, path in absolute:
        if path not in sizes:
            sizes[path] = _file_size(path)
        relative = unicodedata.normalize("NFC", path.relative_to(base).as_posix())
        lines.append(f"{role}\t{relative}\t{sizes[path]}\n")
    digest = hashlib.sha256()
    for line in sorted(lines):
        # surrogateescape: names that are not valid UTF-8 on disk still hash (as their bytes).
        digest.update(line.encode("utf-8", "surrogateescape"))
    return {"files": len(sizes), "sha256": digest.hexdigest(), "bytes": sum(sizes.values())}


def _dataset_files(dataset: Dataset[Item] | None) -> Iterable[Path]:
    """The files of a dataset, through the torch wrappers a caller may have put around it."""
    if dataset is None:
        return []
    if isinstance(dataset, Subset):
        inner = dataset.dataset
        if isinstance(inner, AnomalyDataset):
            return [p for i in dataset.indices for p in inner.samples[int(i)].files()]
        return _dataset_files(inner)
    if isinstance(dataset, ConcatDataset):
        return [p for part in dataset.datasets for p in _dataset_files(part)]
    files = getattr(dataset, "files", None)
    if not callable(files):
        raise TypeError(
            f"{type(dataset).__name__} cannot list its files for data_fingerprint; give it a "
            "files() method (AnomalyDataset has one)."
        )
    return files()


def _fingerprint_base(paths: list[Path], root: object) -> Path:
    """The folder paths are made relative to: the dataset root if it holds them all, else the
    deepest folder that does."""
    if root is not None:
        base = Path(os.path.abspath(Path(str(root)).expanduser()))
        if all(path.is_relative_to(base) for path in paths):
            return base
    if not paths:
        return Path(os.path.abspath(os.sep))
    return Path(os.path.commonpath([str(path.parent) for path in paths]))


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as err:
        raise DatasetError(
            f"Dataset file {path} cannot be read any more ({err}); it was listed when the "
            "dataset was built. Restore it, or rebuild the dataset."
        ) from err
