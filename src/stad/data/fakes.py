"""Tiny fake copies of the real datasets' layouts, for tests and for trying the readers.

Each writer reproduces its dataset's folder layout and file naming with a handful of small
generated images, quirks included: VisA's split file, indexed mask values and ``image_anno.csv``
defect names (one with a comma); MVTec LOCO's several masks per image with defect values 255,
245 and 236 and its ``defects_config.json``; Magnetic Tile Defects' images and soft-edged masks
side by side in ``Imgs/`` with sizes that differ per image; BTAD's per-category extensions
(``01``: ``.bmp`` images with ``.png`` masks, ``02``: ``.png``/``.png``, ``03``:
``.bmp``/``.bmp``); and a user folder layout. Pictures are noise with the defect painted where
its mask is, from a generator seeded per file, so the files are reproducible.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "BTAD_EXTENSIONS",
    "LOCO_DEFECTS",
    "write_fake_btad",
    "write_fake_folder",
    "write_fake_mtd",
    "write_fake_mvtec_loco",
    "write_fake_visa",
]

BTAD_EXTENSIONS: dict[str, tuple[str, str]] = {
    "01": (".bmp", ".png"),
    "02": (".png", ".png"),
    "03": (".bmp", ".bmp"),
}
"""BTAD's (image, mask) file extensions per category, as in the released archive."""

LOCO_DEFECTS: tuple[dict[str, object], ...] = (
    {
        "defect_name": "missing_part",
        "pixel_value": 255,
        "saturation_threshold": 1.0,
        "relative_saturation": True,
    },
    {
        "defect_name": "extra_part",
        "pixel_value": 245,
        "saturation_threshold": 12,
        "relative_saturation": False,
    },
    {
        "defect_name": "scratch",
        "pixel_value": 236,
        "saturation_threshold": 0.5,
        "relative_saturation": True,
    },
)
"""The fake LOCO category's defects_config.json: one relative, one absolute, one low value."""


def _rng(*key: object) -> np.random.Generator:
    """A generator seeded by a tuple of names and numbers (stable across runs and platforms)."""
    words = [zlib.crc32(str(k).encode()) for k in key]
    return np.random.default_rng(words)


def _mask(rng: np.random.Generator, size_wh: tuple[int, int], value: int = 255) -> np.ndarray:
    """A rectangle of ``value`` at a random place covering about 5-15 % of the image."""
    width, height = size_wh
    h = int(rng.integers(max(2, height // 5), max(3, height // 3)))
    w = int(rng.integers(max(2, width // 5), max(3, width // 3)))
    top = int(rng.integers(0, height - h))
    left = int(rng.integers(0, width - w))
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[top : top + h, left : left + w] = value
    return mask


def _picture(
    rng: np.random.Generator,
    size_wh: tuple[int, int],
    mask: np.ndarray | None = None,
    grey: bool = False,
) -> Image.Image:
    """Noise around mid-grey; the masked pixels are painted bright."""
    width, height = size_wh
    shape = (height, width) if grey else (height, width, 3)
    pixels = rng.normal(110, 12, shape)
    if mask is not None:
        pixels[mask > 0] = 230
    img = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(img, mode="L" if grey else "RGB")


def _save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".png": "PNG"}[path.suffix.lower()]
    img.save(path, format=fmt)
    return path


def _save_mask(mask: np.ndarray, path: Path) -> Path:
    return _save(Image.fromarray(mask, mode="L"), path)


# ----------------------------------------------------------------------------- VisA


def write_fake_visa(
    root: str | Path,
    categories: Sequence[str] = ("candle",),
    n_train: int = 4,
    n_test_good: int = 2,
    n_anomalous: int = 3,
    size_wh: tuple[int, int] = (40, 32),
) -> Path:
    """Write a VisA-shaped dataset: the raw ``Data/`` folders and ``split_csv/1cls.csv``.

    Layout: ``<root>/<category>/Data/Images/Normal/NNNN.JPG``,
    ``<root>/<category>/Data/Images/Anomaly/NNN.JPG``, ``<root>/<category>/Data/Masks/Anomaly/
    NNN.png`` (indexed values 1, 2, 3 for the defect, not 255), ``<root>/<category>/
    image_anno.csv`` (image,label,mask; labels such as ``"melt, scratch"``) and
    ``<root>/split_csv/1cls.csv`` (object,split,label,image,mask; rows in a shuffled order, as in
    the official file).

    Returns:
        ``root``.
    """
    root = Path(root)
    rows: list[str] = []
    for category in categories:
        annotations = ["image,label,mask"]
        for i in range(n_train + n_test_good):
            rel = f"{category}/Data/Images/Normal/{i:04d}.JPG"
            _save(_picture(_rng("visa", category, "normal", i), size_wh), root / rel)
            split = "train" if i < n_train else "test"
            rows.append(f"{category},{split},normal,{rel},")
            annotations.append(f"{rel},normal,")
        for i in range(n_anomalous):
            rng = _rng("visa", category, "anomaly", i)
            mask = _mask(rng, size_wh, value=1 + i % 3)
            rel = f"{category}/Data/Images/Anomaly/{i:03d}.JPG"
            mask_rel = f"{category}/Data/Masks/Anomaly/{i:03d}.png"
            _save(_picture(rng, size_wh, mask), root / rel)
            _save_mask(mask, root / mask_rel)
            rows.append(f"{category},test,anomaly,{rel},{mask_rel}")
            label = "bent" if i % 2 == 0 else '"melt, scratch"'
            annotations.append(f"{rel},{label},{mask_rel}")
        (root / category / "image_anno.csv").write_text("\n".join(annotations) + "\n")
    order = _rng("visa", "rows").permutation(len(rows))
    split_file = root / "split_csv" / "1cls.csv"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    lines = ["object,split,label,image,mask", *(rows[i] for i in order)]
    split_file.write_text("\n".join(lines) + "\n")
    return root


# ----------------------------------------------------------------------------- MVTec LOCO


def write_fake_mvtec_loco(
    root: str | Path,
    category: str = "breakfast_box",
    n_train: int = 4,
    n_validation: int = 2,
    n_test_good: int = 2,
    n_logical: int = 2,
    n_structural: int = 2,
    size_wh: tuple[int, int] = (40, 32),
) -> Path:
    """Write an MVTec LOCO AD-shaped category folder.

    Layout: ``<category>/{train,validation}/good/NNN.png``, ``<category>/test/{good,
    logical_anomalies,structural_anomalies}/NNN.png``, ``<category>/ground_truth/<type>/NNN/
    000.png ...`` (one PNG per defect instance, its pixels set to the defect's value) and
    ``<category>/defects_config.json`` (:data:`LOCO_DEFECTS`). The first logical image has two
    overlapping channels (values 255 and 245); structural channels use the value 236.

    Returns:
        The category folder.
    """
    cat = Path(root) / category
    for split, n in (("train", n_train), ("validation", n_validation), ("test", n_test_good)):
        for i in range(n):
            rng = _rng("loco", category, split, i)
            _save(_picture(rng, size_wh), cat / split / "good" / f"{i:03d}.png")
    for kind, n, value in (
        ("logical_anomalies", n_logical, 255),
        ("structural_anomalies", n_structural, 236),
    ):
        for i in range(n):
            rng = _rng("loco", category, kind, i)
            channels = [_mask(rng, size_wh, value)]
            if kind == "logical_anomalies" and i == 0:
                second = np.roll(channels[0], shift=(2, 3), axis=(0, 1))
                channels.append(np.where(second > 0, 245, 0).astype(np.uint8))
            union = np.maximum.reduce(channels)
            _save(_picture(rng, size_wh, union), cat / "test" / kind / f"{i:03d}.png")
            for c, channel in enumerate(channels):
                _save_mask(channel, cat / "ground_truth" / kind / f"{i:03d}" / f"{c:03d}.png")
    (cat / "defects_config.json").write_text(json.dumps(list(LOCO_DEFECTS), indent=2))
    return cat


# ----------------------------------------------------------------------------- MTD


def write_fake_mtd(
    root: str | Path,
    n_free: int = 10,
    n_per_defect: int = 2,
    defects: Sequence[str] = ("Blowhole", "Crack"),
) -> Path:
    """Write a Magnetic Tile Defects-shaped dataset.

    Layout: ``<root>/MT_<Class>/Imgs/exp1_num_<n>.jpg`` greyscale images with a ``.png`` mask of
    the same stem beside each (all zero for ``MT_Free``). Defect masks have soft edges (a linear
    ramp from 255 inside to 0 over 3 px), and image sizes differ from one image to the next.

    Returns:
        ``root``.
    """
    root = Path(root)
    number = 0
    for cls, n in (("Free", n_free), *((d, n_per_defect) for d in defects)):
        for i in range(n):
            number += 1
            size_wh = (30 + (number % 4) * 2, 24 + (number % 3))
            rng = _rng("mtd", cls, i)
            stem = f"exp{1 + i % 2}_num_{1000 + number}"
            folder = root / f"MT_{cls}" / "Imgs"
            if cls == "Free":
                mask = np.zeros((size_wh[1], size_wh[0]), dtype=np.uint8)
            else:
                mask = _soft_mask(_mask(rng, size_wh))
            _save(_picture(rng, size_wh, mask, grey=True), folder / f"{stem}.jpg")
            _save_mask(mask, folder / f"{stem}.png")
    return root


def _soft_mask(mask: np.ndarray, ramp: int = 3) -> np.ndarray:
    """Soften a binary mask's edges: 255 inside, falling linearly to 0 over ``ramp`` pixels."""
    inside = mask > 0
    height, width = mask.shape
    rows, cols = np.nonzero(inside)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    yy, xx = np.mgrid[0:height, 0:width]
    dy = np.maximum(np.maximum(top - yy, yy - bottom), 0)
    dx = np.maximum(np.maximum(left - xx, xx - right), 0)
    distance = np.maximum(dy, dx)
    soft = np.clip(255 * (1 - distance / (ramp + 1)), 0, 255)
    return np.where(inside, 255, soft).astype(np.uint8)


# ----------------------------------------------------------------------------- BTAD


def write_fake_btad(
    root: str | Path,
    categories: Sequence[str] = ("01", "02", "03"),
    n_train: int = 3,
    n_test_ok: int = 2,
    n_test_ko: int = 2,
    size_wh: tuple[int, int] = (32, 32),
) -> Path:
    """Write a BTAD-shaped dataset with each category's own file extensions.

    Layout: ``<root>/<category>/train/ok/NNNN<ext>``, ``test/ok/NNNN<ext>``,
    ``test/ko/NNNN<ext>`` and ``ground_truth/ko/NNNN<mask ext>`` (0/255), with the extensions of
    :data:`BTAD_EXTENSIONS`.

    Returns:
        ``root``.
    """
    root = Path(root)
    for category in categories:
        image_ext, mask_ext = BTAD_EXTENSIONS.get(category, (".png", ".png"))
        cat = root / category
        for split, n in (("train", n_train), ("test", n_test_ok)):
            for i in range(n):
                img = _picture(_rng("btad", category, split, i), size_wh)
                _save(img, cat / split / "ok" / f"{i:04d}{image_ext}")
        for i in range(n_test_ko):
            rng = _rng("btad", category, "ko", i)
            mask = _mask(rng, size_wh)
            _save(_picture(rng, size_wh, mask), cat / "test" / "ko" / f"{i:04d}{image_ext}")
            _save_mask(mask, cat / "ground_truth" / "ko" / f"{i:04d}{mask_ext}")
    return root


# ----------------------------------------------------------------------------- folder


def write_fake_folder(
    root: str | Path,
    n_train: int = 4,
    n_test_good: int = 2,
    defects: Mapping[str, int] | None = None,
    loose: int = 0,
    normal_dir: str = "train/good",
    normal_test_dir: str = "test/good",
    abnormal_dir: str = "test",
    mask_dir: str | None = "ground_truth",
    mask_rule: str = "{stem}_mask",
    size_wh: tuple[int, int] = (32, 32),
) -> Path:
    """Write a user dataset for the ``folder`` reader (defaults: MVTec AD's layout).

    Anomalous images go to ``<abnormal_dir>/<defect>/NNN.png`` (one sub-folder per entry of
    ``defects``) and, with ``loose`` > 0, directly into ``<abnormal_dir>/``; their masks to
    ``<mask_dir>/<defect>/<rule(stem)>.png`` and ``<mask_dir>/<rule(stem)>.png`` (none when
    ``mask_dir`` is None).

    Returns:
        ``root``.
    """
    root = Path(root)
    defects = {"crack": 2, "hole": 1} if defects is None else dict(defects)
    for folder, n in ((normal_dir, n_train), (normal_test_dir, n_test_good)):
        for i in range(n):
            _save(_picture(_rng("folder", folder, i), size_wh), root / folder / f"{i:03d}.png")
    groups = [(name, n) for name, n in defects.items()] + ([("", loose)] if loose else [])
    for sub, n in groups:
        for i in range(n):
            rng = _rng("folder", abnormal_dir, sub, i)
            mask = _mask(rng, size_wh)
            stem = f"{i:03d}" if sub else f"loose_{i:03d}"
            _save(_picture(rng, size_wh, mask), root / abnormal_dir / sub / f"{stem}.png")
            if mask_dir is not None:
                _save_mask(mask, root / mask_dir / sub / f"{mask_rule.format(stem=stem)}.png")
    return root
