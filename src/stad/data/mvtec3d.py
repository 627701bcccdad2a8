"""MVTec 3D-AD reader: layout checks, depth preprocessing (AST's recipe) and the datasets.

Layout (Bergmann et al., VISAPP 2022)::

    <root>/<category>/{train,validation}/good/{rgb/<stem>.png, xyz/<stem>.tiff}
    <root>/<category>/test/<defect>/{rgb/<stem>.png, xyz/<stem>.tiff, gt/<stem>.png}

Every test image has a ground-truth mask of the same stem (all zero for ``good``). The ``xyz``
TIFF is an organised point cloud, float32 (H, W, 3) in metres, with the RGB image's size; missing
points are zero (NaN and ±inf are treated the same way, so no NaN reaches depth or foreground).
Its z channel becomes two maps (full resolution, then resized):

1. :func:`fill_missing`: a missing z takes the mean of the valid z of its 3×3 window, 3 passes;
2. :func:`fit_background_plane`: a bilinear surface through the four image corners, each the
   mean of the valid z of its 2×2 corner patch;
3. :func:`foreground_mask`: ``|z − background| > 7e-3`` (7 mm) and ``z ≠ 0`` on the filled z;
4. :func:`depth_map`: ``(z − mean foreground z) × 100`` (cm) on the foreground, 0 elsewhere.

Items add ``depth`` (inputs ``depth`` and ``rgbd``) and ``foreground`` (every input) to the batch
dict of :class:`~stad.data.base.AnomalyDataset`; ``image`` is always served so maps can be drawn
over it. Layout problems raise one :class:`~stad.errors.DatasetError` naming the files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from PIL import Image

from stad.data.base import AnomalyDataset, DatasetSplits, Sample, list_few
from stad.data.images import as_hw, list_images, list_subfolders, read_image_size, resize_mask
from stad.data.mvtec import NORMAL, _index_by_stem, category_dir_of
from stad.errors import DatasetError

__all__ = [
    "FILL_PASSES",
    "FOREGROUND_THRESHOLD",
    "INPUT_MODES",
    "MVTEC_3D_CATEGORIES",
    "MVTec3DDataset",
    "Sample3D",
    "build_mvtec3d",
    "depth_map",
    "fill_missing",
    "fit_background_plane",
    "foreground_mask",
    "preprocess_depth",
    "read_xyz",
    "scan_mvtec3d",
]

MVTEC_3D_CATEGORIES: tuple[str, ...] = (
    "bagel",
    "cable_gland",
    "carrot",
    "cookie",
    "dowel",
    "foam",
    "peach",
    "potato",
    "rope",
    "tire",
)
"""The 10 categories of MVTec 3D-AD."""

INPUT_MODES: tuple[str, ...] = ("rgb", "depth", "rgbd")
"""AST's three settings: RGB only, depth (3D) only, RGB + depth."""

FOREGROUND_THRESHOLD = 7e-3
"""Height above the background surface (metres) from which a pixel is foreground."""

FILL_PASSES = 3
"""Hole-filling passes: each fills missing pixels that have a valid 3×3 neighbour."""

SPLITS: tuple[str, ...] = ("train", "validation", "test")
_XYZ_SUFFIXES = (".tif", ".tiff")
_DATASET = "MVTec 3D-AD"
_ROOT_FIX = (
    "Set dataset.root=/path/to/mvtec_3d_anomaly_detection (the folder that holds bagel/, "
    "cable_gland/, ...), or set STAD_DATA to the folder that holds "
    "mvtec_3d_anomaly_detection/; MVTec 3D-AD is downloaded from "
    "https://www.mvtec.com/company/research/datasets/mvtec-3d-ad"
)


# ----------------------------------------------------------------------------- depth maps


def _box_sum3(values: np.ndarray) -> np.ndarray:
    """Sum over each pixel's 3×3 window (zero padding), in float64 so sums are exact enough."""
    padded = np.pad(values.astype(np.float64), 1)
    height, width = values.shape
    return sum(padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3))  # type: ignore[return-value]


def fill_missing(z: np.ndarray, passes: int = FILL_PASSES) -> np.ndarray:
    """Fill missing depth values (zero or non-finite) from their 3×3 neighbourhood.

    Each pass gives every missing pixel that has at least one valid pixel in its 3×3 window the
    mean of those valid values; all pixels of a pass are filled at once from the previous pass's
    values, so the result does not depend on a scan order. Pixels without a valid neighbour after
    ``passes`` passes stay 0.

    Args:
        z: Depth (H, W), missing values as 0 or NaN/inf.
        passes: Number of passes.

    Returns:
        float32 (H, W) without NaN; missing pixels that could not be filled are 0.
    """
    filled = np.where(np.isfinite(z), z, 0.0).astype(np.float64)
    for _ in range(passes):
        missing = filled == 0
        if not missing.any():
            break
        counts = _box_sum3(~missing)
        sums = _box_sum3(filled)
        fill = missing & (counts > 0)
        filled[fill] = sums[fill] / counts[fill]
    return filled.astype(np.float32)


def _corner_mean(patch: np.ndarray, name: str) -> float:
    valid = np.isfinite(patch) & (patch != 0)
    if not valid.any():
        raise ValueError(f"the 2x2 {name} corner patch has no valid depth value")
    return float(patch[valid].mean())


def fit_background_plane(z: np.ndarray) -> np.ndarray:
    """Bilinear background surface through the four image corners.

    Each corner value is the mean of the valid (non-zero, finite) z of its 2×2 corner patch and
    sits at that patch's centre (half a pixel in from the border), so an exact plane is recovered
    exactly; pixels outside the patch centres are extrapolated.

    Args:
        z: Depth (H, W), H and W at least 3.

    Returns:
        float32 (H, W).

    Raises:
        ValueError: A corner patch has no valid value, or the map is smaller than 3×3.
    """
    height, width = z.shape
    if height < 3 or width < 3:
        raise ValueError(f"the depth map is {height}x{width}; at least 3x3 is needed")
    top_left = _corner_mean(z[:2, :2], "top-left")
    top_right = _corner_mean(z[:2, -2:], "top-right")
    bottom_left = _corner_mean(z[-2:, :2], "bottom-left")
    bottom_right = _corner_mean(z[-2:, -2:], "bottom-right")
    # Fractional positions between the patch centres (0.5 and size - 1.5).
    t = ((np.arange(height) - 0.5) / (height - 2))[:, None]
    u = ((np.arange(width) - 0.5) / (width - 2))[None, :]
    surface = (1 - t) * ((1 - u) * top_left + u * top_right) + t * (
        (1 - u) * bottom_left + u * bottom_right
    )
    return surface.astype(np.float32)


def foreground_mask(
    z: np.ndarray, background: np.ndarray, threshold: float = FOREGROUND_THRESHOLD
) -> np.ndarray:
    """Pixels that stand out of the background surface: ``|z − background| > threshold``, z ≠ 0.

    Args:
        z: Filled depth (H, W) (see :func:`fill_missing`); 0 marks pixels still missing.
        background: Background surface (H, W) (see :func:`fit_background_plane`).
        threshold: Distance in z units (metres in MVTec 3D-AD).

    Returns:
        bool (H, W).
    """
    return (np.abs(z.astype(np.float64) - background) > threshold) & (z != 0)


def depth_map(z: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Depth in centimetres around the mean foreground depth; 0 on the background.

    Args:
        z: Filled depth (H, W) in metres.
        foreground: bool (H, W).

    Returns:
        float32 (H, W): ``(z − mean(z[foreground])) × 100`` on the foreground, 0 elsewhere (all 0
        without foreground).
    """
    depth = np.zeros(z.shape, dtype=np.float64)
    if foreground.any():
        values = z[foreground].astype(np.float64)
        depth[foreground] = (values - values.mean()) * 100.0
    return depth.astype(np.float32)


def preprocess_depth(
    z: np.ndarray, threshold: float = FOREGROUND_THRESHOLD, passes: int = FILL_PASSES
) -> tuple[np.ndarray, np.ndarray]:
    """The whole recipe at the input resolution: fill, fit background, foreground, depth.

    Args:
        z: Raw z channel (H, W) in metres, missing values 0 or NaN.
        threshold: Foreground distance from the background surface.
        passes: Hole-filling passes.

    Returns:
        ``(depth, foreground)``: float32 (H, W) in cm and bool (H, W).

    Raises:
        ValueError: A corner patch has no valid depth (see :func:`fit_background_plane`).
    """
    filled = fill_missing(z, passes)
    foreground = foreground_mask(filled, fit_background_plane(filled), threshold)
    return depth_map(filled, foreground), foreground


def _resize_depth(depth: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map, antialiased when shrinking (PIL, like the RGB images)."""
    height, width = size_hw
    if depth.shape == (height, width):
        return depth.astype(np.float32)
    img = Image.fromarray(depth.astype(np.float32), mode="F")
    return np.array(img.resize((width, height), resample=Image.Resampling.BILINEAR))


# ----------------------------------------------------------------------------- files


def read_xyz(path: Path) -> np.ndarray:
    """Decode an organised point cloud TIFF.

    Returns:
        float32 (H, W, 3): x, y, z per pixel; NaN/inf kept (:func:`fill_missing` treats them as
        missing points).

    Raises:
        DatasetError: The file is missing, unreadable, not (H, W, 3) or not floating point.
    """
    try:
        xyz = tifffile.imread(path)
    except FileNotFoundError as err:
        raise DatasetError(
            f"Point cloud file {path} does not exist; check the dataset folder."
        ) from err
    except Exception as err:  # tifffile raises many types on corrupt files
        raise DatasetError(
            f"Cannot decode point cloud file {path} ({type(err).__name__}: {err}); replace it "
            "with the original from the dataset archive."
        ) from err
    _check_xyz_array(path, xyz.shape, xyz.dtype)
    return xyz.astype(np.float32, copy=False)


def _read_xyz_shape(path: Path) -> tuple[int, ...]:
    """The array shape from the TIFF header, without decoding the pixels."""
    try:
        with tifffile.TiffFile(path) as tif:
            shape = tuple(tif.series[0].shape)
            dtype = np.dtype(tif.series[0].dtype)
    except FileNotFoundError as err:
        raise DatasetError(
            f"Point cloud file {path} does not exist; check the dataset folder."
        ) from err
    except Exception as err:
        raise DatasetError(
            f"Cannot read point cloud file {path} ({type(err).__name__}: {err}); replace it "
            "with the original from the dataset archive."
        ) from err
    _check_xyz_array(path, shape, dtype)
    return shape


def _check_xyz_array(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if len(shape) != 3 or shape[2] != 3:
        raise DatasetError(
            f"Point cloud file {path} holds an array of shape {shape}; MVTec 3D-AD xyz files are "
            "(height, width, 3) float arrays (x, y, z). Replace it with the original file."
        )
    # An integer array is an image saved under xyz/ (or millimetres): the 7 mm foreground
    # threshold and the centimetre depth would silently be meaningless.
    if not np.issubdtype(dtype, np.floating):
        raise DatasetError(
            f"Point cloud file {path} holds {dtype} values; MVTec 3D-AD xyz files are float "
            "arrays of coordinates in metres. Replace it with the original file."
        )


def _check_xyz_size(xyz_path: Path, shape: tuple[int, ...], image_path: Path) -> None:
    width, height = read_image_size(image_path)
    if tuple(shape[:2]) != (height, width):
        raise DatasetError(
            f"Point cloud {xyz_path} is {shape[1]}x{shape[0]} px but its image {image_path} is "
            f"{width}x{height} px; the xyz TIFF must have its RGB image's size. Replace them "
            "with the original files from the dataset archive."
        )


# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Sample3D(Sample):
    """A :class:`Sample` with its organised point cloud.

    Attributes:
        xyz_path: The ``xyz/<stem>.tiff`` file of the image.
    """

    xyz_path: Path


class MVTec3DDataset(AnomalyDataset):
    """RGB images with their depth and foreground maps, served as batch dicts.

    Items are those of :class:`AnomalyDataset` plus:

    - ``depth``: float32 (1, H, W), centimetres around the mean foreground depth, 0 on the
      background (inputs ``depth`` and ``rgbd`` only);
    - ``foreground``: float32 (1, H, W) in {0, 1} (every input).

    ``image`` is always served (AST's ``depth`` setting ignores it; overlays need it). Depth is
    computed at the file's resolution, then resized bilinearly; the foreground with nearest
    sampling. With ``preload=True`` both are computed once, at construction, in the main process.

    Args:
        samples: The files, in the order they are served.
        image_size: Output size, one int (square) or ``(height, width)``.
        input: ``"rgb"``, ``"depth"`` or ``"rgbd"``.
        preload: Decode everything now (True) or on access (False).

    Raises:
        DatasetError: Bad input mode, a file is missing or unreadable, or sizes of an image, its
            point cloud and its mask differ.
    """

    def __init__(
        self,
        samples: Sequence[Sample3D],
        image_size: int | Sequence[int],
        input: str = "rgbd",
        preload: bool = True,
    ) -> None:
        self.input = check_input_mode(input)
        self._depths: np.ndarray | None = None
        self._foregrounds: np.ndarray | None = None
        super().__init__(samples, image_size, preload)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        if self._depths is not None and self._foregrounds is not None:
            depth, foreground = self._depths[index], self._foregrounds[index]
        else:
            depth, foreground = self._decode_geometry(self._sample3d(index))
        if self.input != "rgb":
            # A copy: in-place work on a batch must not change the preloaded maps.
            item["depth"] = torch.from_numpy(depth).clone().unsqueeze(0)
        item["foreground"] = torch.from_numpy(foreground).to(torch.float32).unsqueeze(0)
        return item

    def _sample3d(self, index: int) -> Sample3D:
        sample = self.samples[index]
        if not isinstance(sample, Sample3D):
            raise TypeError(f"MVTec3DDataset needs Sample3D samples, got {type(sample).__name__}")
        return sample

    def _decode_geometry(self, sample: Sample3D) -> tuple[np.ndarray, np.ndarray]:
        """Depth float32 (H, W) and foreground uint8 (H, W) of one sample, at ``image_size``."""
        xyz = read_xyz(sample.xyz_path)
        _check_xyz_size(sample.xyz_path, xyz.shape, sample.image_path)
        try:
            depth, foreground = preprocess_depth(xyz[..., 2])
        except ValueError as err:
            raise DatasetError(
                f"Cannot fit the background of point cloud {sample.xyz_path}: {err}. The corners "
                "of an MVTec 3D-AD scan show the background; replace the file with the original."
            ) from err
        return (
            _resize_depth(depth, self.image_size),
            resize_mask(foreground.astype(np.uint8), self.image_size),
        )

    def _preload(self) -> None:
        super()._preload()
        samples = [self._sample3d(i) for i in range(len(self))]
        n_threads = max(1, min(8, os.cpu_count() or 1, len(samples)))
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            decoded = list(pool.map(self._decode_geometry, samples))
        height, width = self.image_size
        self._depths = np.empty((len(decoded), height, width), dtype=np.float32)
        self._foregrounds = np.empty((len(decoded), height, width), dtype=np.uint8)
        for i, (depth, foreground) in enumerate(decoded):
            self._depths[i] = depth
            self._foregrounds[i] = foreground

    def _check_headers(self) -> None:
        super()._check_headers()
        for i in range(len(self)):
            sample = self._sample3d(i)
            _check_xyz_size(sample.xyz_path, _read_xyz_shape(sample.xyz_path), sample.image_path)


def check_input_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`INPUT_MODES`, else raise a DatasetError."""
    if mode not in INPUT_MODES:
        raise DatasetError(
            f"Unknown MVTec 3D-AD input {mode!r}; set dataset.input to one of "
            f"{', '.join(INPUT_MODES)} (RGB only, depth only, RGB + depth)."
        )
    return mode


def scan_mvtec3d(
    root: str | Path, category: str
) -> tuple[list[Sample3D], list[Sample3D], list[Sample3D]]:
    """Check the layout of one MVTec 3D-AD category and list its samples.

    Args:
        root: The dataset root, holding one folder per category.
        category: The category folder name, e.g. ``"bagel"``.

    Returns:
        ``(train, validation, test)`` samples, sorted by defect folder and then file name. Train
        and validation hold the normal images of ``<split>/good`` (no mask); test every image of
        ``test/<defect>`` with its ``gt`` mask.

    Raises:
        DatasetError: The root, category or a split is missing, or a folder is malformed (an RGB
            image without its point cloud or mask, a point cloud or mask without image, ...).
    """
    category_dir = _category_dir(Path(root).expanduser(), category)
    problems: list[str] = []
    train, validation, test = (_scan_split(category_dir, split, problems) for split in SPLITS)
    if problems:
        raise DatasetError(
            f"{_DATASET} category {category_dir} is malformed: " + " ".join(problems)
        )
    return train, validation, test


def build_mvtec3d(
    root: str | Path,
    category: str,
    image_size: int | tuple[int, int],
    input: str = "rgbd",
    preload: bool = True,
) -> DatasetSplits:
    """Read one MVTec 3D-AD category into train/validation/test datasets.

    Args:
        root: The dataset root, holding one folder per category.
        category: The category, e.g. ``"bagel"``.
        image_size: Output size of images, masks, depth and foreground (no crop).
        input: ``"rgb"``, ``"depth"`` or ``"rgbd"``; ``depth`` is served for the last two.
        preload: Decode and preprocess every file now, so bad files stop the run before training.

    Returns:
        The splits, with ``validation`` set; ``info`` summarises them for the run record.

    Raises:
        DatasetError: The layout is malformed, a file is unreadable or the input is unknown.
    """
    check_input_mode(input)
    size_hw = as_hw(image_size)
    train, validation, test = scan_mvtec3d(root, category)

    def dataset(samples: list[Sample3D]) -> MVTec3DDataset:
        return MVTec3DDataset(samples, size_hw, input=input, preload=preload)

    splits = DatasetSplits(train=dataset(train), test=dataset(test), validation=dataset(validation))
    splits.info = {
        "dataset": "mvtec3d",
        "category": category,
        "root": str(Path(root).expanduser()),
        "input": input,
        "n_train": len(train),
        "n_validation": len(validation),
        "n_test": len(test),
        "n_test_anomalous": sum(s.label for s in test),
        "defects": sorted({s.defect for s in test} - {NORMAL}),
        "image_size": list(size_hw),
    }
    return splits


def _category_dir(root: Path, category: str) -> Path:
    return category_dir_of(
        root, category, _DATASET, MVTEC_3D_CATEGORIES, _ROOT_FIX, "mvtec_3d_anomaly_detection"
    )


def _scan_split(category_dir: Path, split: str, problems: list[str]) -> list[Sample3D]:
    """Samples of one split folder; file-level problems are appended to ``problems``."""
    split_dir = category_dir / split
    if not split_dir.is_dir():
        raise DatasetError(
            f"{_DATASET} category {category_dir} has no {split}/ folder. Expected "
            f"{split_dir}/<defect>/{{rgb,xyz{',gt' if split == 'test' else ''}}}/ with a "
            f"{NORMAL}/ folder; check that the archive was extracted completely."
        )
    defects = [d.name for d in list_subfolders(split_dir)]
    is_test = split == "test"
    if NORMAL not in defects or (is_test and len(defects) < 2):
        found = ", ".join(f"{d}/" for d in defects) or "no folders"
        need = (
            f"a {NORMAL}/ folder and at least one defect folder (both are needed for AUROC)"
            if is_test
            else f"a {NORMAL}/ folder of normal images"
        )
        raise DatasetError(
            f"{_DATASET} folder {split_dir} holds {found}; it needs {need}. Restore it from the "
            "dataset archive."
        )
    if not is_test and defects != [NORMAL]:
        others = [str(split_dir / d) for d in defects if d != NORMAL]
        raise DatasetError(
            f"{_DATASET} {split}/ holds normal images only, but {split_dir} also holds "
            f"{list_few(others)}; move anomalous images to test/<defect>/ or delete the folders."
        )
    samples: list[Sample3D] = []
    for defect in defects:
        samples += _scan_defect(split_dir / defect, defect, is_test, problems)
    return samples


def _scan_defect(folder: Path, defect: str, is_test: bool, problems: list[str]) -> list[Sample3D]:
    """Match ``rgb/``, ``xyz/`` (and for test ``gt/``) files of one defect folder by stem."""
    images = _index_by_stem(list_images(folder / "rgb"), "", problems)
    if not images:
        problems.append(
            f"{folder / 'rgb'} holds no images; restore the rgb/ folder from the dataset archive "
            "or delete the empty defect folder."
        )
        return []
    xyz_files = [p for p in list_images(folder / "xyz") if p.suffix.lower() in _XYZ_SUFFIXES]
    clouds = _match(images, _index_by_stem(xyz_files, "", problems), folder / "xyz", problems)
    masks: dict[str, Path] = {}
    if is_test:
        masks = _match(
            images,
            _index_by_stem(list_images(folder / "gt"), "", problems),
            folder / "gt",
            problems,
        )
    label = 0 if defect == NORMAL else 1
    return [
        Sample3D(
            image_path=image,
            mask_path=masks.get(stem),
            label=label,
            defect=defect,
            xyz_path=clouds[stem],
        )
        for stem, image in images.items()
        if stem in clouds and (not is_test or stem in masks)
    ]


def _match(
    images: dict[str, Path], files: dict[str, Path], folder: Path, problems: list[str]
) -> dict[str, Path]:
    """Files of ``folder`` matched to images by stem; gaps and leftovers go to ``problems``."""
    kind = "point cloud (xyz/<stem>.tiff)" if folder.name == "xyz" else "mask (gt/<stem>.png)"
    missing = [str(image) for stem, image in images.items() if stem not in files]
    orphans = [str(path) for stem, path in files.items() if stem not in images]
    if missing:
        problems.append(
            f"{len(missing)} image(s) have no {kind}: {list_few(missing)}. Every rgb/<stem>.png "
            f"needs {folder}/<stem>; restore the files from the dataset archive or remove the "
            "images."
        )
    if orphans:
        problems.append(
            f"{len(orphans)} file(s) in {folder} match no rgb/ image: {list_few(orphans)}. Restore "
            "their images, rename them to their image's stem, or delete them."
        )
    return {stem: path for stem, path in files.items() if stem in images}
