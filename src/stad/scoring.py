"""Scoring image files with a trained method: listing inputs (a file, a folder, a glob), decoding
them on threads, batching, and reading a labelled folder laid out like MVTec's test split.
Used by ``stad.predict``, ``stad.export`` and the thresholds (f1 on a labelled folder)."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, cast

import numpy as np
import torch
from torch import Tensor

from stad.data.base import list_few
from stad.data.images import (
    IMAGE_EXTENSIONS,
    as_hw,
    is_image_file,
    list_images,
    list_subfolders,
    load_rgb,
)
from stad.errors import DatasetError, IncompatibleError, StadError

if TYPE_CHECKING:
    from stad.checkpoint import LoadedRun
    from stad.core import Method

NORMAL = "good"
MASK_SUFFIX = "_mask"


def list_inputs(spec: str) -> tuple[list[Path], Path]:
    """The image files an ``input=`` names, sorted, and the folder output names start from.

    A folder is searched recursively (hidden files and folders are skipped, other suffixes than
    images ignored); a glob may use ``**``; a single file is taken whatever its suffix.

    Raises:
        StadError: nothing exists at ``spec`` or it names no image file.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = [
            p
            for p in path.rglob("*")
            if is_image_file(p)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        base = path
    elif glob.has_magic(spec):
        files = [Path(p) for p in glob.glob(str(path), recursive=True)]
        files = [p for p in files if is_image_file(p)]
        base = Path(os.path.commonpath([str(p.parent) for p in files])) if files else path.parent
    else:
        raise StadError(f"input {spec} does not exist; pass input=<image file, folder or glob>")
    if not files:
        suffixes = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise StadError(f"input {spec} holds no image files ({suffixes})")
    return sorted(files, key=lambda p: p.relative_to(base).as_posix()), base


def output_names(paths: Sequence[Path], base: Path) -> list[str]:
    """A unique name per input: its path under ``base`` without the suffix (``good/000``), or with
    the suffix folded in (``good/000_jpg``) where two files differ only by suffix."""
    plain = [p.relative_to(base).with_suffix("").as_posix() for p in paths]
    counts: dict[str, int] = {}
    for name in plain:
        counts[name] = counts.get(name, 0) + 1
    return [
        name if counts[name] == 1 else f"{name}_{p.suffix.lstrip('.').lower()}"
        for name, p in zip(plain, paths, strict=True)
    ]


@dataclass
class Skipped:
    """An input that was not scored, and why."""

    path: Path
    reason: str


@dataclass
class _Decoded:
    index: int
    image: np.ndarray | None = None  # uint8 3×H×W at the model's size
    size: tuple[int, int] = (0, 0)  # original (width, height)
    error: str | None = None


@dataclass
class ScoredBatch:
    """One forward pass: which inputs (indices into the path list), their model-size images,
    maps and scores (on the CPU), original sizes, and the inputs of this chunk that were skipped.

    Attributes:
        indices: positions of the scored images in the path list.
        images: B×3×H×W float32 in [0, 1] (what the model saw).
        maps: B×1×H×W float32 anomaly maps. scores: (B,) float32.
        sizes: original (width, height) of each scored image.
        skipped: inputs of this chunk that could not be scored.
    """

    indices: list[int]
    images: Tensor
    maps: Tensor
    scores: Tensor
    sizes: list[tuple[int, int]]
    skipped: list[Skipped] = field(default_factory=list)


class ScoredImages(NamedTuple):
    """What :func:`score_images` returns; ``scores``/``maps`` follow ``paths`` (the inputs that
    were scored, in input order)."""

    scores: Tensor
    maps: Tensor | None
    skipped: list[Skipped]
    paths: list[Path]


def network_stride(method: Method) -> int | None:
    """The coarsest stride of the method's backbone feature extractors, or None if it has none."""
    from stad.backbones import total_stride

    return total_stride(method)


def check_image_inputs(method: Method, name: str = "") -> None:
    """Stop when the method reads more than the image (e.g. depth): files cannot give it."""
    if method.requires:
        raise IncompatibleError(
            f"method {name or method.name or '?'} (as trained) reads "
            f"{', '.join(method.requires)} besides the image, which image files cannot provide; "
            "stad.predict and stad.export score RGB images only: use a run trained on images "
            "alone (e.g. method.input=rgb)"
        )


def _decode(index: int, path: Path, size_hw: tuple[int, int], min_side: int | None) -> _Decoded:
    """Decode one file as the datasets do, or say why it cannot be scored."""
    try:
        if path.stat().st_size == 0:
            return _Decoded(index, error="empty file (0 bytes)")
        image, size = load_rgb(path, size_hw)
    except DatasetError as err:
        return _Decoded(index, error=str(err))
    except Exception as err:  # one bad file (decompression bomb, odd codec) must not stop a folder
        return _Decoded(index, error=f"cannot decode it ({type(err).__name__}: {err})")
    if min_side is not None and min(size) < min_side:
        return _Decoded(
            index,
            error=(
                f"image is {size[0]}x{size[1]} px, smaller than the network's total stride "
                f"{min_side}: too little detail to score at {size_hw[1]}x{size_hw[0]} px"
            ),
        )
    return _Decoded(index, np.ascontiguousarray(image.transpose(2, 0, 1)), size)


def _decoded_chunks(
    paths: Sequence[Path],
    size_hw: tuple[int, int],
    batch_size: int,
    workers: int,
    min_side: int | None,
) -> Iterator[list[_Decoded]]:
    """Decoded chunks of ``batch_size`` files; with workers, the next chunk decodes in threads
    while the model runs (PIL releases the GIL while decoding and resizing)."""
    chunks = [range(s, min(s + batch_size, len(paths))) for s in range(0, len(paths), batch_size)]
    if workers == 0:
        for chunk in chunks:
            yield [_decode(i, paths[i], size_hw, min_side) for i in chunk]
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:

        def submit(chunk: range) -> list[Future]:
            return [pool.submit(_decode, i, paths[i], size_hw, min_side) for i in chunk]

        pending = submit(chunks[0]) if chunks else []
        for k in range(len(chunks)):
            current = pending
            if k + 1 < len(chunks):
                pending = submit(chunks[k + 1])  # decodes while the model scores this chunk
            yield [f.result() for f in current]


def iter_scored(
    method: Method,
    paths: Sequence[Path],
    image_size: int | Sequence[int],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    workers: int = 0,
) -> Iterator[ScoredBatch]:
    """Score image files batch by batch (bounded memory), preprocessed like a dataset's test split.

    The method runs in eval mode under ``torch.inference_mode`` on ``device`` (default: where
    its parameters are); its previous mode is restored afterwards.

    Args:
        method: a trained Method that reads only ``image``.
        paths: image files, in the order the batches follow.
        image_size: the run's input size (one int or (height, width)).
        batch_size: images per forward pass. workers: decoding threads (0: decode inline).
    """
    size_hw = as_hw(image_size)
    device = torch.device(device) if device is not None else _method_device(method)
    min_side = network_stride(method)
    was_training = method.training
    method.eval().to(device)
    try:
        for chunk in _decoded_chunks(paths, size_hw, batch_size, workers, min_side):
            skipped = [Skipped(paths[d.index], d.error) for d in chunk if d.error is not None]
            good = [d for d in chunk if d.error is None]
            if not good:
                yield ScoredBatch([], torch.empty(0), torch.empty(0), torch.empty(0), [], skipped)
                continue
            # Exactly AnomalyDataset.__getitem__: uint8 → float32, then / 255.
            images = torch.from_numpy(np.stack([cast(np.ndarray, d.image) for d in good]))
            images = images.to(torch.float32)
            images.div_(255.0)
            with torch.inference_mode():
                maps, scores = method({"image": images.to(device)})
            yield ScoredBatch(
                [d.index for d in good],
                images,
                maps.float().cpu(),
                scores.float().cpu(),
                [d.size for d in good],
                skipped,
            )
    finally:
        method.train(was_training)


def _method_device(method: Method) -> torch.device:
    tensor = next(iter(method.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def score_images(
    loaded: LoadedRun,
    paths: Sequence[Path],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    keep_maps: bool = True,
    workers: int = 0,
) -> ScoredImages:
    """Scores (and maps) of image files with a loaded run, in memory.

    Returns:
        ``ScoredImages(scores (N,), maps N×1×H×W or None, skipped, paths)`` where N counts the
        scored inputs; ``paths`` are those inputs, in input order.
    """
    scores, maps, skipped, scored = [], [], [], []
    for batch in iter_scored(loaded.method, paths, loaded.image_size, batch_size, device, workers):
        skipped += batch.skipped
        if not batch.indices:
            continue
        scores.append(batch.scores)
        scored += [Path(paths[i]) for i in batch.indices]
        if keep_maps:
            maps.append(batch.maps)
    all_scores = torch.cat(scores) if scores else torch.empty(0)
    all_maps = (torch.cat(maps) if maps else torch.empty(0)) if keep_maps else None
    return ScoredImages(all_scores, all_maps, skipped, scored)


def read_labelled(
    folder: Path | str, masks: Path | str | None = "auto"
) -> tuple[list[Path], list[int], list[Path | None] | None]:
    """The images of a folder laid out like MVTec's test split, their labels and masks.

    Layout: ``folder/good/*`` normal (label 0), ``folder/<defect>/*`` anomalous (label 1).
    Masks: ``masks/<defect>/<stem>_mask.<ext>`` (or ``<stem>.<ext>``) for every anomalous
    image; ``masks="auto"`` looks for ``folder/../ground_truth``, None means no masks.

    Returns:
        ``(paths, labels, mask paths)``; mask paths are None for normal images, and the whole
        list is None without a mask folder.

    Raises:
        DatasetError: the folder is missing, lacks ``good/`` or a defect folder, or a mask is
            missing for an anomalous image.
    """
    folder = Path(folder).expanduser()
    fix = (
        "lay it out like MVTec AD's test split: good/ with normal images and one folder per "
        "defect type with anomalous images"
    )
    if not folder.is_dir():
        raise DatasetError(f"labelled folder {folder} does not exist; {fix}")
    loose = list_images(folder)
    if loose:
        raise DatasetError(
            f"labelled folder {folder} holds images outside sub-folders ({list_few(loose)}), "
            f"which have no label; {fix}"
        )
    groups = {d.name: list_images(d) for d in list_subfolders(folder)}
    groups = {name: files for name, files in groups.items() if files}
    if NORMAL not in groups or len(groups) < 2:
        found = ", ".join(f"{n}/" for n in groups) or "no image folders"
        raise DatasetError(f"labelled folder {folder} holds {found}; {fix}")
    paths = [p for name in sorted(groups) for p in groups[name]]
    labels = [int(name != NORMAL) for name in sorted(groups) for _ in groups[name]]
    mask_root = _mask_root(folder, masks)
    if mask_root is None:
        return paths, labels, None
    return paths, labels, _match_masks(paths, labels, mask_root)


def _mask_root(folder: Path, masks: Path | str | None) -> Path | None:
    if masks is None:
        return None
    if str(masks) == "auto":
        candidate = folder.parent / "ground_truth"
        return candidate if candidate.is_dir() else None
    root = Path(masks).expanduser()
    if not root.is_dir():
        raise DatasetError(f"mask folder {root} does not exist; pass masks=<folder> or masks=none")
    return root


def _match_masks(paths: list[Path], labels: list[int], root: Path) -> list[Path | None]:
    found: list[Path | None] = []
    missing = []
    for path, label in zip(paths, labels, strict=True):
        if not label:
            found.append(None)
            continue
        folder = root / path.parent.name
        candidates = [folder / f"{path.stem}{MASK_SUFFIX}{e}" for e in sorted(IMAGE_EXTENSIONS)]
        candidates += [folder / f"{path.stem}{e}" for e in sorted(IMAGE_EXTENSIONS)]
        mask = next((c for c in candidates if c.is_file()), None)
        if mask is None:
            missing.append(path)
        found.append(mask)
    if missing:
        raise DatasetError(
            f"{len(missing)} anomalous image(s) have no mask in {root}: {list_few(missing)}; "
            f"expected {root}/<defect>/<stem>{MASK_SUFFIX}.png, or pass masks=none to choose the "
            "image threshold only"
        )
    return found
