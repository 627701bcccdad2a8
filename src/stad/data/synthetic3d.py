"""A tiny generated dataset in the MVTec 3D-AD layout, for tests and demos of RGB + depth methods.

Each scene is a round object (a flat-topped puck 2 to 3 cm high) on a tilted table plane about
0.55 m from the camera, seen as an RGB image and an organised point cloud (x, y, z in metres).
Defects change both: a ``dent`` pushes a small disc of the object's top 8 mm down and darkens it,
a ``bump`` raises it 8 mm and paints it green; the ground-truth mask is that disc. Scattered
zero and NaN points imitate the sensor's missing values. Every scene comes from its own
``numpy.random.Generator`` seeded by ``(seed, split, defect, index)``, so files are reproducible.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

__all__ = ["DEFECTS", "FakeScene", "render_scene", "write_fake_mvtec3d"]

DEFECTS: tuple[str, ...] = ("bump", "dent")
"""Defect types: both are visible in the RGB image and in the depth."""

_TABLE_Z = 0.55  # metres from the camera
_TABLE_TILT = 0.02  # z change across the image (metres), far above the 7 mm foreground threshold
_OBJECT_HEIGHT = 0.02  # rim height; the top rises 1 cm more towards the centre
_DEFECT_DEPTH = 0.008
_PIXEL_PITCH = 5e-4  # x/y metres per pixel at the table distance


@dataclass(frozen=True)
class FakeScene:
    """One generated scene.

    Attributes:
        rgb: uint8 (H, W, 3).
        xyz: float32 (H, W, 3) in metres; missing points are all-zero or all-NaN.
        mask: uint8 (H, W) in {0, 1}, the defect (all zero for normal scenes).
        object_mask: bool (H, W), the object's footprint (defect included).
        holes: bool (H, W), the points written as missing.
    """

    rgb: np.ndarray
    xyz: np.ndarray
    mask: np.ndarray
    object_mask: np.ndarray
    holes: np.ndarray


def render_scene(
    size: int = 32, seed: int | list[int] = 0, defect: str | None = None, holes: bool = True
) -> FakeScene:
    """Render one scene: object on a tilted plane, optional defect, optional missing points.

    Args:
        size: Side of the square image in pixels (16 or more keeps the defect inside the object).
        seed: Seed (or seed sequence) of the scene's random generator.
        defect: None for a normal scene, or one of :data:`DEFECTS`.
        holes: Write about 2% of the points as zeros and 1% as NaN, at random pixels.

    Returns:
        The scene.
    """
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; known: {', '.join(DEFECTS)}")
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    centre = size / 2 + rng.uniform(-size / 16, size / 16, 2)
    radius = size * rng.uniform(0.26, 0.32)
    dist = np.hypot(rows - centre[0], cols - centre[1]) / radius
    object_mask = dist < 1.0

    slope = rng.uniform(0.5, 1.0, 2) * rng.choice([-1, 1], 2) * _TABLE_TILT / size
    table = _TABLE_Z + slope[0] * (rows - size / 2) + slope[1] * (cols - size / 2)
    height = np.where(object_mask, _OBJECT_HEIGHT + 0.01 * (1 - dist**2), 0.0)

    mask = np.zeros((size, size), dtype=bool)
    # Drawn for normal scenes too, so a defect changes nothing outside its mask.
    angle = rng.uniform(0, 2 * np.pi)
    if defect is not None:
        # A small disc well inside the object, so it stays foreground.
        offset = radius * 0.45 * np.array([np.sin(angle), np.cos(angle)])
        spot = centre + offset
        mask = np.hypot(rows - spot[0], cols - spot[1]) < max(2.0, size * 0.09)
        height = height + np.where(mask, _DEFECT_DEPTH if defect == "bump" else -_DEFECT_DEPTH, 0)
    # The camera looks down: the object is nearer, so its z is smaller.
    z = table - height

    rgb = _paint(rng, size, object_mask, height, mask, defect)
    xyz = np.stack(
        [
            (cols - size / 2) * _PIXEL_PITCH * z / _TABLE_Z,
            (rows - size / 2) * _PIXEL_PITCH * z / _TABLE_Z,
            z,
        ],
        axis=-1,
    ).astype(np.float32)
    missing = np.zeros((size, size), dtype=bool)
    if holes:
        draw = rng.random((size, size))
        zeros, nans = draw < 0.02, (draw >= 0.02) & (draw < 0.03)
        xyz[zeros] = 0.0
        xyz[nans] = np.nan
        missing = zeros | nans
    return FakeScene(rgb, xyz, mask.astype(np.uint8), object_mask, missing)


def _paint(
    rng: np.random.Generator,
    size: int,
    object_mask: np.ndarray,
    height: np.ndarray,
    mask: np.ndarray,
    defect: str | None,
) -> np.ndarray:
    """RGB picture of a scene: grey table, brown object shaded by its height, coloured defect."""
    rgb = np.empty((size, size, 3), dtype=np.float64)
    rgb[:] = rng.uniform(100, 120)
    shade = 0.8 + 0.2 * np.clip(height / (_OBJECT_HEIGHT + 0.01), 0, 1)
    rgb[object_mask] = np.array([175.0, 120.0, 70.0]) * shade[object_mask, None]
    if defect == "dent":
        rgb[mask] *= 0.35
    elif defect == "bump":
        rgb[mask] = np.array([70.0, 160.0, 60.0])
    rgb += rng.normal(0, 3, rgb.shape)
    return np.clip(rgb, 0, 255).round().astype(np.uint8)


def write_fake_mvtec3d(
    root: str | Path,
    category: str = "bagel",
    n_train: int = 4,
    n_validation: int = 2,
    n_test_good: int = 2,
    n_per_defect: int = 2,
    defects: tuple[str, ...] = DEFECTS,
    size: int = 32,
    seed: int = 0,
    holes: bool = True,
) -> Path:
    """Write a small MVTec 3D-AD-shaped category folder.

    Layout: ``<root>/<category>/{train,validation}/good/{rgb,xyz}/NNN.*`` and
    ``<root>/<category>/test/<good|defect>/{rgb,xyz,gt}/NNN.*`` (gt all zero for good images).

    Args:
        root: The dataset root; created if needed.
        category: The category folder name.
        n_train: Normal training scenes.
        n_validation: Normal validation scenes.
        n_test_good: Normal test scenes.
        n_per_defect: Test scenes per defect type.
        defects: Defect types, from :data:`DEFECTS`.
        size: Image side in pixels.
        seed: Base seed; equal arguments write identical files.
        holes: Scatter missing (zero and NaN) points over the clouds.

    Returns:
        The category folder.
    """
    category_dir = Path(root) / category
    plan = [("train", "good", n_train), ("validation", "good", n_validation)]
    plan += [("test", "good", n_test_good)] + [("test", d, n_per_defect) for d in defects]
    for split, folder, count in plan:
        for index in range(count):
            scene_seed = [seed, zlib.crc32(f"{category}/{split}/{folder}".encode()), index]
            scene = render_scene(
                size, scene_seed, defect=None if folder == "good" else folder, holes=holes
            )
            _write_scene(category_dir / split / folder, f"{index:03d}", scene, split == "test")
    return category_dir


def _write_scene(folder: Path, stem: str, scene: FakeScene, with_gt: bool) -> None:
    for sub in ("rgb", "xyz", "gt") if with_gt else ("rgb", "xyz"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene.rgb).save(folder / "rgb" / f"{stem}.png")
    # Contiguous x, y, z samples per pixel, like the dataset's files.
    tifffile.imwrite(
        folder / "xyz" / f"{stem}.tiff", scene.xyz, photometric="minisblack", planarconfig="contig"
    )
    if with_gt:
        Image.fromarray(scene.mask * 255, mode="L").save(folder / "gt" / f"{stem}.png")
