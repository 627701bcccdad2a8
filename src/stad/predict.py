"""Score new images with a trained run: ``python -m stad.predict run=<run dir> input=<images>``.

Images are decoded and resized exactly as the run's dataset served its test split (RGB, uint8,
antialiased bilinear resize to ``image_size``, no crop, float32 in [0, 1]), so predicting a
dataset's test folder reproduces the run's scores. Each image gets a score, a decision
(``score >= image threshold``), its anomaly map (16-bit PNG scaled per image, or exact float32
``.npy``) and a colour overlay on one colour range for the whole run. Files that cannot be scored
are skipped, warned about and listed in ``skipped.csv``, never dropped silently.

The functions :func:`score_images`, :func:`read_labelled` and :func:`labelled_thresholds` are
the reusable parts (``run.py`` chooses F1 thresholds at training time with the last one).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from stad.data.base import list_few
from stad.data.images import (
    IMAGE_EXTENSIONS,
    as_hw,
    is_image_file,
    list_images,
    list_subfolders,
    load_mask,
    load_rgb,
)
from stad.errors import DatasetError, IncompatibleError, StadError
from stad.results import write_atomic
from stad.viz import overlay

if TYPE_CHECKING:
    from stad.checkpoint import LoadedRun
    from stad.core import Method

NORMAL = "good"
MASK_SUFFIX = "_mask"
PNG16_MAX = 65535
# Default quantiles of threshold=quantile when the run's config has none (config.yaml's values).
IMAGE_QUANTILE = 0.99
PIXEL_QUANTILE = 0.999
THRESHOLD_MODES = ("run", "quantile", "f1", "fixed")
MAP_FORMATS = ("png16", "npy")
CSV_COLUMNS = (
    "path",
    "name",
    "score",
    "decision",
    "pixel_fraction",
    "map_min",
    "map_max",
    "map_file",
    "overlay_file",
    "width",
    "height",
)


# -- key=value options (shared with stad.export) ------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One ``key=value`` command-line option: how to parse it, its default and its help."""

    parse: Callable[[str], Any]
    default: Any
    help: str


def parse_bool(text: str) -> bool:
    """``true/false``, ``yes/no``, ``1/0`` (any case)."""
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def parse_choice(*choices: str) -> Callable[[str], str]:
    """A parser that accepts one of ``choices``."""

    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def optional_path(text: str) -> Path | None:
    """A path, or None for ``none``/``null``/empty."""
    return None if text.strip().lower() in ("", "none", "null") else Path(text).expanduser()


def parse_options(
    argv: Sequence[str], spec: dict[str, Option], command: str, required: Sequence[str] = ()
) -> dict[str, Any]:
    """``key=value`` arguments (as Hydra overrides look) → values by key, defaults filled in.

    Raises:
        StadError: an argument without ``=``, an unknown or repeated key, a value that does not
            parse, or a missing required key; the message lists the known keys.
    """
    known = ", ".join(spec)
    values: dict[str, Any] = {}
    for arg in argv:
        key, sep, text = arg.partition("=")
        key = key.strip().lstrip("+")
        if not sep:
            raise StadError(f"{command}: argument {arg!r} is not key=value; known keys: {known}")
        if key not in spec:
            raise StadError(f"{command}: unknown option {key!r}; known keys: {known}")
        if key in values:
            raise StadError(f"{command}: option {key!r} is given twice")
        try:
            values[key] = spec[key].parse(text)
        except ValueError as err:
            raise StadError(f"{command}: {key}={text!r}: {err} ({spec[key].help})") from None
    missing = [k for k in required if k not in values]
    if missing:
        raise StadError(
            f"{command}: missing {', '.join(f'{k}=...' for k in missing)}; "
            f"usage: python -m {command} " + " ".join(f"{k}=<{k}>" for k in required)
        )
    return {k: values.get(k, opt.default) for k, opt in spec.items()}


def usage(command: str, spec: dict[str, Option], summary: str) -> str:
    """The help text of a key=value command."""
    width = max(len(k) for k in spec)
    lines = [f"usage: python -m {command} key=value ...", "", summary, "", "options:"]
    for key, opt in spec.items():
        shown = str(opt.default).lower() if isinstance(opt.default, bool) else opt.default
        default = "" if opt.default is None else f" (default: {shown})"
        lines.append(f"  {key:<{width}}  {opt.help}{default}")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError("must be >= 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _quantile(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError("must be in (0, 1]")
    return value


def _masks(text: str) -> Path | str | None:
    value = text.strip()
    if value.lower() in ("", "none", "null", "off", "false"):
        return None
    return "auto" if value.lower() == "auto" else Path(value).expanduser()


def _range(text: str) -> tuple[float, float] | None:
    if text.strip().lower() in ("", "none", "null", "auto"):
        return None
    lo, hi = (float(v) for v in text.strip("[]()").split(","))
    if not hi > lo:
        raise ValueError("needs lo < hi")
    return lo, hi


PREDICT_OPTIONS: dict[str, Option] = {
    "run": Option(Path, None, "a finished run's folder (holds model.safetensors)"),
    "input": Option(str, None, "an image file, a folder (searched recursively) or a glob"),
    "output": Option(optional_path, None, "new or empty folder; default <run>/predictions/<time>"),
    "batch_size": Option(positive_int, 8, "images per forward pass"),
    "device": Option(parse_choice("auto", "cpu", "cuda"), "auto", "auto | cpu | cuda"),
    "workers": Option(_non_negative_int, min(4, os.cpu_count() or 1), "decoding threads"),
    "map_format": Option(parse_choice(*MAP_FORMATS), "png16", "png16 (scaled) | npy (float32)"),
    "overlay": Option(parse_bool, True, "write a colour overlay PNG per image"),
    "overlay_range": Option(_range, None, "lo,hi map values of the colour ramp (default: auto)"),
    "threshold": Option(parse_choice(*THRESHOLD_MODES), "run", " | ".join(THRESHOLD_MODES)),
    "labelled": Option(optional_path, None, "f1: folder with good/ and <defect>/ subfolders"),
    "masks": Option(_masks, "auto", "f1: mask folder; auto = <labelled>/../ground_truth; none"),
    "normal": Option(optional_path, None, "quantile: folder of normal images"),
    "image_quantile": Option(_quantile, None, "quantile: of normal image scores"),
    "pixel_quantile": Option(_quantile, None, "quantile: of normal map pixels"),
    "image_threshold": Option(float, None, "fixed: image score threshold"),
    "pixel_threshold": Option(float, None, "fixed: anomaly-map pixel threshold"),
}


# -- inputs -------------------------------------------------------------------------------------
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


# -- decoding and scoring -----------------------------------------------------------------------
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
            images = torch.from_numpy(np.stack([d.image for d in good])).to(torch.float32)
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


# -- thresholds ---------------------------------------------------------------------------------
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


def labelled_thresholds(
    method: Method,
    folder: Path | str,
    image_size: int,
    device: str | torch.device | None = None,
    masks: Path | str | None = "auto",
    batch_size: int = 8,
    workers: int = 0,
) -> dict[str, Any]:
    """F1-optimal image (and, with masks, pixel) thresholds on a labelled folder.

    The pixel threshold uses a fixed-size uniform sample of each image's pixels (the same
    positions in map and mask; ``stad.thresholds.sample_pixels``).

    Returns:
        ``{"image": threshold, "pixel": threshold}`` (``pixel`` only when there are masks).
    """
    from stad.thresholds import f1_threshold, sample_pixels  # (imports torchmetrics)

    paths, labels, mask_paths = read_labelled(folder, masks)
    size_hw = as_hw(image_size)
    scores, targets, pixels, pixel_labels, skipped = [], [], [], [], []
    for n, batch in enumerate(iter_scored(method, paths, image_size, batch_size, device, workers)):
        skipped += batch.skipped
        if not batch.indices:
            continue
        scores.append(batch.scores)
        targets += [labels[i] for i in batch.indices]
        if mask_paths is not None:
            truth = torch.stack(
                [
                    _mask(paths[i], mask_paths[i], size_hw, s)
                    for i, s in zip(batch.indices, batch.sizes, strict=True)
                ]
            )
            pixels.append(sample_pixels(batch.maps, seed=n))
            pixel_labels.append(sample_pixels(truth, seed=n))
    for item in skipped:
        _warn(f"labelled image skipped: {item.path}: {item.reason}")
    if not scores:
        raise StadError(f"no image of the labelled folder {folder} could be scored")
    source = f"{len(targets)} labelled images in {folder}"
    out = {"image": f1_threshold(torch.cat(scores), torch.tensor(targets), source)}
    if mask_paths is not None:
        out["pixel"] = f1_threshold(
            torch.cat(pixels), torch.cat(pixel_labels) > 0, f"{source} (sampled pixels)"
        )
    return out


def _mask(
    image: Path, mask: Path | None, size_hw: tuple[int, int], size: tuple[int, int]
) -> Tensor:
    if mask is None:
        return torch.zeros(1, *size_hw)
    array, _ = load_mask(mask, size_hw, image, size)
    return torch.from_numpy(array).to(torch.float32).unsqueeze(0)


def normal_thresholds(
    method: Method,
    folder: Path,
    image_size: int,
    image_q: float,
    pixel_q: float,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    workers: int = 0,
) -> dict[str, Any]:
    """Quantile thresholds from the scores and sampled map pixels of a folder of normal images."""
    from stad.thresholds import quantile_threshold, sample_pixels

    paths, _ = list_inputs(str(folder))
    scores, pixels = [], []
    for n, batch in enumerate(iter_scored(method, paths, image_size, batch_size, device, workers)):
        for item in batch.skipped:
            _warn(f"normal image skipped: {item.path}: {item.reason}")
        if batch.indices:
            scores.append(batch.scores)
            pixels.append(sample_pixels(batch.maps, seed=n))
    if not scores:
        raise StadError(f"no image of the normal folder {folder} could be scored")
    source = f"{sum(len(s) for s in scores)} normal images in {folder}"
    return {
        "image": quantile_threshold(torch.cat(scores), image_q, source),
        "pixel": quantile_threshold(torch.cat(pixels), pixel_q, f"{source} (sampled pixels)"),
    }


def choose_thresholds(loaded: LoadedRun, opts: dict[str, Any], device: torch.device) -> dict:
    """The image and pixel thresholds ``threshold=`` asks for; what a mode does not set comes
    from the run (``origin`` says which)."""
    from stad.thresholds import fixed_threshold

    run = {k: {**v, "origin": "run"} for k, v in (loaded.thresholds or {}).items()}
    mode = opts["threshold"]
    common = {"device": device, "batch_size": opts["batch_size"], "workers": opts["workers"]}
    chosen: dict[str, Any] = {}
    if mode == "fixed":
        if opts["image_threshold"] is None and opts["pixel_threshold"] is None:
            raise StadError("threshold=fixed needs image_threshold=<v> and/or pixel_threshold=<v>")
        for kind in ("image", "pixel"):
            if opts[f"{kind}_threshold"] is not None:
                chosen[kind] = fixed_threshold(opts[f"{kind}_threshold"], "stad.predict option")
    elif mode == "f1":
        if opts["labelled"] is None:
            raise StadError("threshold=f1 needs labelled=<folder with good/ and defect folders>")
        chosen = labelled_thresholds(
            loaded.method, opts["labelled"], loaded.image_size, masks=opts["masks"], **common
        )
    elif mode == "quantile":
        folder = opts["normal"] or (opts["labelled"] / NORMAL if opts["labelled"] else None)
        if folder is None:
            raise StadError("threshold=quantile needs normal=<folder of normal images>")
        saved = loaded.config.get("threshold") or {}
        image_q = opts["image_quantile"] or float(saved.get("image_quantile", IMAGE_QUANTILE))
        pixel_q = opts["pixel_quantile"] or float(saved.get("pixel_quantile", PIXEL_QUANTILE))
        chosen = normal_thresholds(
            loaded.method, folder, loaded.image_size, image_q, pixel_q, **common
        )
    chosen = {k: {**v, "origin": "stad.predict"} for k, v in chosen.items()}
    return {kind: chosen.get(kind, run.get(kind)) for kind in ("image", "pixel")}


def overlay_range(
    thresholds: dict[str, Any], override: tuple[float, float] | None
) -> tuple[float, float, str] | None:
    """The map values at the ends of the colour ramp, one range for the whole run.

    From the pixel threshold t (else the image threshold, on the map's scale when the score is
    the map's maximum): [0, 2t] for t > 0 (maps are distances), so t sits at the ramp's middle
    and everything above it is yellow to red; [t − 1, t + 1] otherwise. None: per image.
    """
    if override is not None:
        return override[0], override[1], "overlay_range option"
    for kind in ("pixel", "image"):
        entry = thresholds.get(kind)
        if entry is not None:
            t = float(entry["value"])
            lo, hi = (0.0, 2.0 * t) if t > 0 else (t - 1.0, t + 1.0)
            return lo, hi, f"{kind} threshold {t:.6g} at the middle of the ramp"
    return None


# -- writing ------------------------------------------------------------------------------------
def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as CSV text (floats in full precision)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def save_map(amap: np.ndarray, path: Path, fmt: str) -> tuple[float, float]:
    """Write an H×W map; returns its (min, max).

    ``png16``: ``q = round((m − min) / (max − min) · 65535)`` as a 16-bit greyscale PNG, so
    ``m ≈ min + q / 65535 · (max − min)`` (error ≤ half a step); a constant map is all zeros.
    ``npy``: the float32 values exactly.
    """
    lo, hi = float(amap.min()), float(amap.max())
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        np.save(path, amap.astype(np.float32))
        return lo, hi
    span = hi - lo
    scaled = (amap.astype(np.float64) - lo) / span if span > 0 else np.zeros_like(amap)
    q = np.round(np.clip(scaled, 0.0, 1.0) * PNG16_MAX).astype(np.uint16)
    Image.fromarray(q).save(path)
    return lo, hi


def read_png16_map(path: Path, map_min: float, map_max: float) -> np.ndarray:
    """Invert :func:`save_map`'s 16-bit PNG: float64 H×W map values."""
    with Image.open(path) as img:
        q = np.asarray(img).astype(np.float64)
    return map_min + q / PNG16_MAX * (map_max - map_min)


def _save_overlay(
    image: Tensor, amap: Tensor, path: Path, vrange: tuple[float, float] | None
) -> None:
    """image | heat map blended on the image (viz.overlay without its ground-truth panel)."""
    lo, hi = vrange if vrange is not None else (float(amap.min()), float(amap.max()))
    row = overlay(image, amap, torch.zeros_like(amap), lo, hi)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(row[:, : 2 * image.shape[-1]])).save(path)


def default_output(run_dir: Path) -> Path:
    """``<run>/predictions/<YYYY-mm-dd_HH-MM-SS>`` (with ``-2``, ``-3`` ... if taken)."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    base = run_dir / "predictions" / stamp
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{stamp}-{n}")
    return candidate


def prepare_output(path: Path) -> Path:
    """Create the output folder; refuse one that holds anything (never overwrite)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StadError(
            f"output {path} already exists and is not an empty folder; stad.predict never "
            "overwrites: pass a new output=<folder> (or leave output out for a new timestamped one)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StadError(f"cannot create the output folder {path} ({err.strerror or err})") from None
    return path


# -- the command --------------------------------------------------------------------------------
@dataclass
class PredictResult:
    """What one prediction wrote."""

    output: Path
    scored: int
    skipped: list[Skipped]
    thresholds: dict[str, Any]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise StadError("device=cuda but no CUDA device is available; use device=cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def predict(opts: dict[str, Any]) -> PredictResult:
    """Run one prediction from parsed options (see :data:`PREDICT_OPTIONS`)."""
    from stad.checkpoint import load_run  # timm and Lightning load only when there is work

    device = resolve_device(opts["device"])
    loaded = load_run(opts["run"], device)
    check_image_inputs(loaded.method, str(loaded.config.method.name))
    paths, base = list_inputs(opts["input"])
    thresholds = choose_thresholds(loaded, opts, device)
    vrange = overlay_range(thresholds, opts["overlay_range"])
    if thresholds["image"] is None:
        _warn(
            "the run holds no image threshold: the decision column stays empty; choose one with "
            "threshold=fixed image_threshold=<v>, threshold=f1 labelled=<folder> or "
            "threshold=quantile normal=<folder>"
        )
    out = prepare_output(opts["output"] or default_output(Path(opts["run"])))
    names = output_names(paths, base)
    rows, skipped = _write_predictions(loaded, opts, paths, names, out, thresholds, vrange, device)
    write_atomic(out / "predictions.csv", csv_text(rows, CSV_COLUMNS))
    write_atomic(
        out / "skipped.csv",
        csv_text([{"path": str(s.path), "reason": s.reason} for s in skipped], ("path", "reason")),
    )
    write_atomic(
        out / "thresholds.json",
        json.dumps(_thresholds_document(loaded, opts, thresholds, vrange), indent=2) + "\n",
    )
    return PredictResult(out, len(rows), skipped, thresholds)


def _write_predictions(
    loaded: LoadedRun,
    opts: dict[str, Any],
    paths: list[Path],
    names: list[str],
    out: Path,
    thresholds: dict[str, Any],
    vrange: tuple[float, float, str] | None,
    device: torch.device,
) -> tuple[list[dict[str, Any]], list[Skipped]]:
    from tqdm.auto import tqdm  # lightning's dependency; imported where the bar is drawn

    image_t = thresholds["image"]["value"] if thresholds["image"] else None
    pixel_t = thresholds["pixel"]["value"] if thresholds["pixel"] else None
    suffix = ".npy" if opts["map_format"] == "npy" else ".png"
    rows: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    batches = iter_scored(
        loaded.method, paths, loaded.image_size, opts["batch_size"], device, opts["workers"]
    )
    with tqdm(total=len(paths), unit="img", desc="stad.predict", disable=None) as bar:
        for batch in batches:
            for item in batch.skipped:
                bar.write(f"stad.predict: warning: skipped {item.path}: {item.reason}", sys.stderr)
            skipped += batch.skipped
            for j, i in enumerate(batch.indices):
                amap = batch.maps[j]
                score = float(batch.scores[j])
                map_file = f"maps/{names[i]}{suffix}"
                lo, hi = save_map(amap[0].numpy(), out / map_file, opts["map_format"])
                overlay_file = ""
                if opts["overlay"]:
                    overlay_file = f"overlays/{names[i]}.png"
                    rng = vrange[:2] if vrange is not None else None
                    _save_overlay(batch.images[j], amap, out / overlay_file, rng)
                rows.append(
                    {
                        "path": str(paths[i]),
                        "name": names[i],
                        "score": score,
                        "decision": _decision(score, image_t),
                        "pixel_fraction": (
                            float((amap >= pixel_t).float().mean()) if pixel_t is not None else ""
                        ),
                        "map_min": lo,
                        "map_max": hi,
                        "map_file": map_file,
                        "overlay_file": overlay_file,
                        "width": batch.sizes[j][0],
                        "height": batch.sizes[j][1],
                    }
                )
            bar.update(len(batch.indices) + len(batch.skipped))
    return rows, skipped


def _decision(score: float, threshold: float | None) -> str:
    if threshold is None:
        return ""
    return "anomalous" if score >= threshold else "normal"


def _thresholds_document(
    loaded: LoadedRun,
    opts: dict[str, Any],
    thresholds: dict[str, Any],
    vrange: tuple[float, float, str] | None,
) -> dict[str, Any]:
    return {
        "threshold": opts["threshold"],
        "image": thresholds["image"],
        "pixel": thresholds["pixel"],
        "decision": "anomalous when score >= image.value",
        "pixel_fraction": "share of map pixels >= pixel.value",
        "overlay_range": list(vrange[:2]) if vrange else None,
        "overlay_range_source": vrange[2] if vrange else "per image (no threshold)",
        "map_format": opts["map_format"],
        "map_scaling": (
            "value = map_min + q / 65535 * (map_max - map_min), q the 16-bit pixel"
            if opts["map_format"] == "png16"
            else "float32 values as computed"
        ),
        "map_size": [loaded.image_size, loaded.image_size],
        "run": str(loaded.run_dir),
        "method": str(loaded.config.method.name),
        "stad_version": loaded.stad_version,
    }


def _warn(message: str) -> None:
    print(f"stad.predict: warning: {message}", file=sys.stderr, flush=True)


def _summary(result: PredictResult) -> str:
    lines = [f"scored {result.scored} image(s) → {result.output}"]
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)} file(s) (listed in skipped.csv):")
        lines += [f"  {s.path}: {s.reason}" for s in result.skipped]
    return "\n".join(lines)


SUMMARY = (
    "Score images with a trained run: predictions.csv (score, decision per image), anomaly maps,\n"
    "colour overlays and thresholds.json in the output folder."
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stad.predict run=<run dir> input=<images> [key=value ...]``; returns the exit
    status: 0 when at least one image was scored, 2 when none was or on a user error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage("stad.predict", PREDICT_OPTIONS, SUMMARY))
        return 0
    try:
        opts = parse_options(argv, PREDICT_OPTIONS, "stad.predict", required=("run", "input"))
        result = predict(opts)
    except StadError as err:
        print(f"stad.predict: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(_summary(result), flush=True)
    if result.scored == 0:
        print("stad.predict: error: no image could be scored", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
