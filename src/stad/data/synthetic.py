"""The built-in generated dataset: real textures and a simple machined part with synthetic defects.

``ensure_synthetic`` writes the dataset once, in the MVTec AD layout, into a cache folder keyed
by the generator version and every parameter, and returns its root; the MVTec reader reads it.

* Texture categories crop, rotate, rescale and colourise one of scikit-image's bundled
  greyscale textures (brick, grass, gravel: CC0 photographs shipped inside the package, so
  nothing downloads). Defects: scratch, hole, stain.
* The object category renders a round machined part (a cap with a slotted hub, four pins and a
  painted index mark) on a lightly textured table, with jitter in position, size, rotation and
  lighting. Defects: scratch, stain, missing part (a bite out of the rim shows the table) and
  misplaced part (one pin moved along its circle).

Every image comes from its own ``numpy.random.Generator(PCG64([seed, category, stream, index]))``,
so the output is byte-identical for the same parameters and library versions, and a category's
images do not depend on which other categories are generated. An anomalous image is its clean
image with the defect composited in: pixels outside the mask are byte-identical to the clean
image, and the mask is exactly the set of pixels that changed by more than ``_NOISE_TOL`` grey
levels (holes in a region filled, specks dropped).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from stad.errors import DatasetError

__all__ = [
    "CATEGORIES",
    "DEFAULT_CATEGORIES",
    "DEFECTS",
    "GENERATOR_VERSION",
    "MARKER",
    "ensure_synthetic",
    "make_anomalous",
    "make_normal",
]

GENERATOR_VERSION = 1
"""Bump when the pictures change, so old caches are not reused."""

DEFAULT_CATEGORIES: tuple[str, ...] = ("texture", "object")
CATEGORIES: tuple[str, ...] = ("texture", "object", "brick", "grass")
"""Every category the generator can write ("texture" is the colourised gravel texture)."""

_TEXTURE_DEFECTS = ("scratch", "hole", "stain")
DEFECTS: dict[str, tuple[str, ...]] = {
    "texture": _TEXTURE_DEFECTS,
    "brick": _TEXTURE_DEFECTS,
    "grass": _TEXTURE_DEFECTS,
    "object": ("scratch", "stain", "missing_part", "misplaced_part"),
}
"""Defect types (test folder names) per category."""

MARKER = ".complete"
"""Written last into a finished dataset root (holds the parameters as JSON)."""

NORMAL = "good"
_NOISE_TOL = 3  # grey levels (of 255): changes at most this large are sensor noise, not defect
_MIN_IMAGE_SIZE = 32
_MAX_ATTEMPTS = 8

Image3 = np.ndarray  # H×W×3 float32 in [0, 1] (uint8 once quantised)


# --------------------------------------------------------------------------------------------
# Small numeric helpers


def _rng(seed: int, category: str, stream: str, index: int) -> np.random.Generator:
    # crc32 is stable across processes, unlike hash(); the tuple keeps streams independent.
    key = [seed, zlib.crc32(category.encode()), zlib.crc32(stream.encode()), index]
    return np.random.Generator(np.random.PCG64(key))


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre row and column coordinates, each size×size float32 (read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _coverage(inside_px: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (positive inside)."""
    return np.clip(inside_px / soft + 0.5, 0.0, 1.0)


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _wobble(rng: np.random.Generator, phi: np.ndarray, amplitude: float) -> np.ndarray:
    """A random smooth radius factor 1 + Σ_k c_k cos(kφ + p_k) for irregular blob outlines."""
    out = np.ones_like(phi)
    for k in range(2, 6):
        out += amplitude / k * rng.uniform(0.3, 1.0) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return out


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _luminance(image: Image3) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _mix(base: Image3, top: Image3 | np.ndarray, alpha: np.ndarray) -> Image3:
    return base + (top - base) * alpha[..., None]


# --------------------------------------------------------------------------------------------
# Textures


@dataclass(frozen=True)
class _TextureSpec:
    source: str  # a PNG bundled inside skimage/data
    dark: tuple[float, float, float]  # colour that black maps to
    light: tuple[float, float, float]  # colour that white maps to
    max_rotation: float  # degrees; isotropic textures turn freely, bricks stay upright
    flip: bool  # 180° turns allowed (bricks look the same upside down)
    crop: float = 280.0  # side of the source crop in source pixels


_TEXTURES: dict[str, _TextureSpec] = {
    "texture": _TextureSpec("gravel.png", (0.16, 0.14, 0.12), (0.90, 0.84, 0.74), 180.0, False),
    "brick": _TextureSpec("brick.png", (0.22, 0.09, 0.06), (0.90, 0.62, 0.48), 4.0, True),
    "grass": _TextureSpec("grass.png", (0.06, 0.12, 0.04), (0.66, 0.84, 0.40), 180.0, False),
}


@lru_cache(maxsize=8)
def _source_texture(name: str, sigma: float) -> np.ndarray:
    """One bundled scikit-image texture as float32 in [0, 1], blurred against aliasing."""
    # Read the file shipped inside the wheel directly: skimage.data's loaders may fall back to
    # a download when a file is absent, and this generator must never touch the network.
    path = resources.files("skimage.data") / name
    try:
        with resources.as_file(path) as file, Image.open(file) as img:
            grey = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (FileNotFoundError, OSError) as err:
        raise DatasetError(
            f"scikit-image's bundled texture {name} is missing ({err}); the synthetic dataset "
            "needs it. Reinstall scikit-image (pip install --force-reinstall scikit-image)."
        ) from None
    if sigma > 0:
        grey = ndimage.gaussian_filter(grey, sigma)
    grey.setflags(write=False)
    return grey


def _texture_crop(
    spec: _TextureSpec, size: int, rng: np.random.Generator, contrast: float = 1.0
) -> np.ndarray:
    """A randomly placed, turned and scaled crop of a source texture, size×size in [0, 1]."""
    side = spec.crop * rng.uniform(0.95, 1.05)
    step = side / size  # source pixels per output pixel
    src = _source_texture(spec.source, round(max(0.0, (step - 1.0) / 2.0), 2))
    angle = math.radians(rng.uniform(-spec.max_rotation, spec.max_rotation))
    if spec.flip and rng.random() < 0.5:
        angle += math.pi
    cos, sin = math.cos(angle), math.sin(angle)
    # Half extent of the turned crop, kept inside the source (edges reflect if it must overlap).
    half = min(side / 2.0 * (abs(cos) + abs(sin)), (src.shape[0] - 1) / 2.0)
    centre = rng.uniform(half, src.shape[0] - 1 - half, size=2)
    yy, xx = _grid(size)
    v, u = (yy - (size - 1) / 2.0) * step, (xx - (size - 1) / 2.0) * step
    rows = centre[0] + cos * v + sin * u
    cols = centre[1] - sin * v + cos * u
    grey = ndimage.map_coordinates(src, [rows, cols], order=1, mode="reflect")
    mean = float(grey.mean())
    return mean + (grey - mean) * contrast


def _illumination(size: int, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A gentle linear light fall-off across the image, size×size around 1."""
    yy, xx = _grid(size)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * xx + np.sin(direction) * yy) / size - 0.5 * (
        np.cos(direction) + np.sin(direction)
    )
    return 1.0 + strength * rng.uniform(0.3, 1.0) * ramp


def _sensor_noise(size: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(1.2 / 255.0)


def _texture_normal(category: str, size: int, rng: np.random.Generator) -> Image3:
    spec = _TEXTURES[category]
    grey = _texture_crop(spec, size, rng)
    grey = grey * rng.uniform(0.92, 1.08) + rng.uniform(-0.04, 0.04)
    grey = grey * _illumination(size, rng, 0.12)
    dark = np.asarray(spec.dark, np.float32) * rng.uniform(0.97, 1.03, 3)
    light = np.asarray(spec.light, np.float32) * rng.uniform(0.97, 1.03, 3)
    image = dark + np.clip(grey, 0.0, 1.0)[..., None] * (light - dark)
    return (image + _sensor_noise(size, rng)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Defect shapes (alpha maps in [0, 1], size×size)


def _curve_alpha(
    rng: np.random.Generator, size: int, centre: np.ndarray, length: float, width: float
) -> np.ndarray:
    """A thin curved stroke (quadratic Bézier) with tapered ends."""
    direction = rng.uniform(0, 2 * np.pi)
    tangent = np.array([np.sin(direction), np.cos(direction)])
    normal = np.array([-tangent[1], tangent[0]])
    p0, p2 = centre - tangent * length / 2, centre + tangent * length / 2
    p1 = centre + normal * length * rng.uniform(-0.35, 0.35)
    t = np.linspace(0.0, 1.0, max(8, int(length * 3)))[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    strength = np.sin(np.pi * t[:, 0]) ** 0.4 * rng.uniform(0.75, 1.0)

    reach = width / 2 + 2
    lo = np.floor(points.min(0) - reach).clip(0, size - 1).astype(int)
    hi = np.ceil(points.max(0) + reach).clip(0, size - 1).astype(int)
    alpha = np.zeros((size, size), np.float32)
    if np.any(hi < lo):
        return alpha
    rr, cc = np.mgrid[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1]
    query = np.stack([rr.ravel(), cc.ravel()], 1).astype(np.float64)
    dist, nearest = cKDTree(points).query(query, distance_upper_bound=reach)
    found = np.isfinite(dist)
    values = np.zeros(len(query), np.float32)
    values[found] = _coverage(width / 2 - dist[found]) * strength[nearest[found]]
    alpha[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1] = values.reshape(rr.shape)
    return alpha


def _blob_field(
    rng: np.random.Generator, size: int, centre: np.ndarray, radius: float, wobble: float
) -> tuple[np.ndarray, float]:
    """Normalised distance q (1 on an irregular elliptical outline) and the mean radius in px."""
    aspect = rng.uniform(0.55, 1.0)
    a, b = radius / math.sqrt(aspect), radius * math.sqrt(aspect)
    turn = rng.uniform(0, np.pi)
    # The wobble stretches the outline by at most 1 + wobble·(1/2 + 1/3 + 1/4 + 1/5) < 1 + 1.3w.
    box = _window(centre[0], centre[1], a * (1 + 1.3 * wobble) + 2, (size, size))
    yy, xx = (g[box] for g in _grid(size))
    dy, dx = yy - centre[0], xx - centre[1]
    u = np.cos(turn) * dx + np.sin(turn) * dy
    v = -np.sin(turn) * dx + np.cos(turn) * dy
    q = np.full((size, size), 2.0, np.float32)  # far outside the outline
    q[box] = np.sqrt((u / a) ** 2 + (v / b) ** 2) / _wobble(rng, np.arctan2(v, u), wobble)
    return q, radius


def _scratch_size(rng: np.random.Generator, size: int) -> tuple[float, float]:
    """Length and width in pixels for a scratch covering ~0.3–1.2 % of the image."""
    width = max(1.3, size * rng.uniform(0.006, 0.012))
    area = _log_uniform(rng, 0.003, 0.012) * size * size
    return float(np.clip(area / width, 0.15 * size, 0.8 * size)), width


def _centre(rng: np.random.Generator, size: int, margin: float = 0.18) -> np.ndarray:
    return rng.uniform(margin * size, (1 - margin) * size, size=2)


def _stain_colour(rng: np.random.Generator) -> np.ndarray:
    """Colours of real contaminations (rust, oil, ink, dried liquid), never saturated."""
    palette = np.array(
        [[0.62, 0.30, 0.12], [0.20, 0.16, 0.12], [0.22, 0.30, 0.58], [0.55, 0.52, 0.20]],
        np.float32,
    )
    return palette[rng.integers(len(palette))] * rng.uniform(0.85, 1.15, 3).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Texture defects: each returns (modified image, region the change may touch)


def _texture_scratch(clean: Image3, rng: np.random.Generator) -> tuple[Image3, np.ndarray]:
    size = clean.shape[0]
    length, width = _scratch_size(rng, size)
    alpha = _curve_alpha(rng, size, _centre(rng, size), length, width)
    if rng.random() < 0.5:  # fresh scratch: lighter, bare material
        target = clean + rng.uniform(0.18, 0.32)
    else:  # groove collecting dirt: darker
        target = clean * rng.uniform(0.35, 0.6)
    return _mix(clean, target, alpha), alpha > 0


def _texture_hole(clean: Image3, rng: np.random.Generator) -> tuple[Image3, np.ndarray]:
    size = clean.shape[0]
    radius = math.sqrt(_log_uniform(rng, 0.004, 0.03) * size * size / np.pi)
    q, r_px = _blob_field(rng, size, _centre(rng, size), radius, 0.25)
    outer = _coverage((1.0 - q) * r_px)
    inner = _coverage((0.7 - q) * r_px)
    rim = clean * 1.25 + 0.06  # frayed, lifted edge catches the light
    mod = _mix(clean, rim, outer * rng.uniform(0.45, 0.75))
    yy, _ = _grid(size)
    shade = rng.uniform(0.2, 0.4) * (1.0 + 0.3 * (yy - (size - 1) / 2) / size)
    mod = _mix(mod, clean * shade[..., None] + 0.02, inner)
    return mod, outer > 0


def _texture_stain(clean: Image3, rng: np.random.Generator) -> tuple[Image3, np.ndarray]:
    size = clean.shape[0]
    radius = math.sqrt(_log_uniform(rng, 0.006, 0.05) * size * size / np.pi)
    q, r_px = _blob_field(rng, size, _centre(rng, size), radius, 0.45)
    soft = max(2.0, 0.25 * r_px)  # stains soak in: soft edges
    alpha = rng.uniform(0.35, 0.6) * _smoothstep(0.0, soft / r_px, 1.0 - q)
    tinted = _luminance(clean)[..., None] * 1.6 * _stain_colour(rng)
    return _mix(clean, tinted, alpha), alpha > 0


# --------------------------------------------------------------------------------------------
# The object: a round machined part


@dataclass(frozen=True)
class _Part:
    """Pose, lighting and modifications of one rendered part (lengths in pixels)."""

    cy: float
    cx: float
    radius: float
    turn: float  # radians
    light: float  # light azimuth, radians
    gain: float
    pin_angles: tuple[float, ...]  # radians, relative to the image
    bite: tuple[float, float, float] | None = None  # (y, x, radius) cut out of the body


_TABLE = _TextureSpec("gravel.png", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 180.0, False, crop=300.0)
_METAL = np.array([0.80, 0.81, 0.84], np.float32)
_PAINT = np.array([0.10, 0.42, 0.55], np.float32)
_PIN_RADIUS = 0.13  # of the part radius
_PIN_ORBIT = 0.62


def _random_part(size: int, rng: np.random.Generator) -> _Part:
    turn = math.radians(rng.uniform(-25, 25))
    return _Part(
        cy=size / 2 + rng.uniform(-0.03, 0.03) * size,
        cx=size / 2 + rng.uniform(-0.03, 0.03) * size,
        radius=0.30 * size * rng.uniform(0.97, 1.03),
        turn=turn,
        light=math.radians(225 + rng.uniform(-15, 15)),
        gain=rng.uniform(0.94, 1.06),
        pin_angles=tuple(turn + np.pi / 4 + k * np.pi / 2 for k in range(4)),
    )


def _table(size: int, rng: np.random.Generator) -> Image3:
    """The plain, lightly textured surface the part lies on."""
    grey = _texture_crop(_TABLE, size, rng, contrast=0.12) * _illumination(size, rng, 0.08)
    colour = np.array([0.30, 0.33, 0.37], np.float32) * rng.uniform(0.96, 1.04)
    return (grey[..., None] / 0.5 * colour).astype(np.float32)


def _body_coverage(part: _Part, size: int, dy: float = 0.0, dx: float = 0.0) -> np.ndarray:
    yy, xx = _grid(size)
    dist = np.hypot(yy - part.cy - dy, xx - part.cx - dx)
    cover = _coverage(part.radius - dist)
    if part.bite is not None:
        by, bx, br = part.bite
        cover = cover * (1.0 - _coverage(br - np.hypot(yy - by - dy, xx - bx - dx)))
    return cover


def _window(cy: float, cx: float, half: float, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """Rows and columns of an array within ``half`` pixels of a point (drawing stays local)."""
    r0, r1 = max(0, math.floor(cy - half) - 1), min(shape[0], math.ceil(cy + half) + 2)
    c0, c1 = max(0, math.floor(cx - half) - 1), min(shape[1], math.ceil(cx + half) + 2)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _render_part(part: _Part, table: Image3) -> Image3:
    """The part composited onto the table, with a soft shadow, size×size×3."""
    size = table.shape[0]
    ly, lx = math.sin(part.light), math.cos(part.light)

    # Shadow: the body's silhouette shifted away from the light, blurred by its soft edge.
    shadow_dist = 0.05 * part.radius
    shadow = _body_coverage(part, size, -ly * shadow_dist, -lx * shadow_dist)
    shadow = ndimage.uniform_filter(shadow, max(3, int(0.08 * part.radius)) | 1)
    out = table * (1.0 - 0.35 * shadow)[..., None]

    # Everything below lies on the part: draw it in the part's bounding box only.
    box = _window(part.cy, part.cx, part.radius + 1, table.shape)
    yy, xx = (g[box] for g in _grid(size))
    dy, dx = (yy - part.cy) / part.radius, (xx - part.cx) / part.radius
    r = np.hypot(dy, dx)
    # Dome with a chamfered rim: the surface normal tilts outward towards the edge.
    tilt = 0.25 + 1.1 * _smoothstep(0.86, 0.97, r)
    nz = 1.0 / np.sqrt(1.0 + (tilt * r) ** 2)
    shade = 0.5 + 0.45 * nz * (0.8 + 0.6 * tilt * (dx * lx + dy * ly))
    shade = shade + 0.02 * np.sin(2 * np.pi * 14 * r) * (r < 0.85)  # machining rings
    hub_groove = np.exp(-(((r - 0.30) / 0.02) ** 2))
    shade = shade * (1.0 - 0.12 * (r < 0.3)) * (1.0 - 0.35 * hub_groove)
    body = shade[..., None] * (_METAL * part.gain)

    # Index mark painted at the part's orientation.
    phi = (np.arctan2(dy, dx) - part.turn + np.pi) % (2 * np.pi) - np.pi
    mark = _coverage((0.12 - np.abs(phi)) * r * part.radius) * _coverage(
        (0.07 - np.abs(r - 0.83)) * part.radius
    )
    body = _mix(body, shade[..., None] * (1.3 * _PAINT), mark)

    # Cross-slotted hub.
    c, s = math.cos(part.turn), math.sin(part.turn)
    u, v = (c * dx + s * dy) * part.radius, (-s * dx + c * dy) * part.radius
    arm, half_width = 0.2 * part.radius, 0.045 * part.radius
    slot_a = np.minimum(arm - np.abs(u), half_width - np.abs(v))
    slot_b = np.minimum(arm - np.abs(v), half_width - np.abs(u))
    body = _mix(body, body * 0.25, _coverage(np.maximum(slot_a, slot_b)))

    # Pins: a bright collar around a dark bore.
    pin = _PIN_RADIUS * part.radius
    for angle in part.pin_angles:
        py = part.cy + _PIN_ORBIT * part.radius * math.sin(angle)
        px = part.cx + _PIN_ORBIT * part.radius * math.cos(angle)
        rows, cols = _window(py - box[0].start, px - box[1].start, pin + 1, body.shape)
        py_, px_ = yy[rows, cols] - py, xx[rows, cols] - px
        d = np.hypot(py_, px_)
        facing = (px_ * lx + py_ * ly) / np.maximum(d, 1e-3)
        collar = (0.72 + 0.25 * facing)[..., None] * (_METAL * part.gain)
        patch = _mix(body[rows, cols], collar, _coverage(pin - d))
        body[rows, cols] = _mix(patch, patch * 0.2, _coverage(0.075 * part.radius - d))

    out[box] = _mix(out[box], body, _body_coverage(part, size)[box])
    return out.astype(np.float32, copy=False)


def _object_scene(size: int, rng: np.random.Generator) -> tuple[_Part, Image3, np.ndarray]:
    part, table = _random_part(size, rng), _table(size, rng)
    noise = _sensor_noise(size, rng)
    return part, table, noise


def _object_normal(category: str, size: int, rng: np.random.Generator) -> Image3:
    part, table, noise = _object_scene(size, rng)
    return _render_part(part, table) + noise


def _on_part(part: _Part, size: int, rng: np.random.Generator, reach: float) -> np.ndarray:
    """A random point on the part's face within ``reach`` part radii of its centre."""
    r, a = part.radius * reach * math.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
    return np.array([part.cy + r * math.sin(a), part.cx + r * math.cos(a)])


def _part_face(part: _Part, size: int) -> np.ndarray:
    """Coverage of the part's face, excluding the chamfer where a surface defect would slide off."""
    yy, xx = _grid(size)
    return _coverage(0.93 * part.radius - np.hypot(yy - part.cy, xx - part.cx))


def _object_scratch(
    clean: Image3, part: _Part, rng: np.random.Generator, render: Callable[[_Part], Image3]
) -> tuple[Image3, np.ndarray]:
    size = clean.shape[0]
    length, width = _scratch_size(rng, size)
    length = min(length, 1.1 * part.radius)
    alpha = _curve_alpha(rng, size, _on_part(part, size, rng, 0.55), length, width)
    alpha = alpha * _part_face(part, size)
    target = clean + rng.uniform(0.15, 0.3) if rng.random() < 0.5 else clean * 0.5
    return _mix(clean, target, alpha), alpha > 0


def _object_stain(
    clean: Image3, part: _Part, rng: np.random.Generator, render: Callable[[_Part], Image3]
) -> tuple[Image3, np.ndarray]:
    size = clean.shape[0]
    radius = math.sqrt(_log_uniform(rng, 0.004, 0.025) * size * size / np.pi)
    q, r_px = _blob_field(rng, size, _on_part(part, size, rng, 0.6), radius, 0.45)
    alpha = rng.uniform(0.4, 0.65) * _smoothstep(0.0, max(2.0, 0.25 * r_px) / r_px, 1.0 - q)
    alpha = alpha * _part_face(part, size)
    tinted = _luminance(clean)[..., None] * 1.5 * _stain_colour(rng)
    return _mix(clean, tinted, alpha), alpha > 0


def _object_missing(
    clean: Image3, part: _Part, rng: np.random.Generator, render: Callable[[_Part], Image3]
) -> tuple[Image3, np.ndarray]:
    size = clean.shape[0]
    angle = rng.uniform(0, 2 * np.pi)
    dist, bite = part.radius * rng.uniform(0.9, 1.05), part.radius * rng.uniform(0.17, 0.32)
    by, bx = part.cy + dist * math.sin(angle), part.cx + dist * math.cos(angle)
    mod = render(replace(part, bite=(by, bx, bite)))
    yy, xx = _grid(size)
    region = np.hypot(yy - by, xx - bx) < bite + 0.2 * part.radius  # the bite and its shadow
    return mod, region


def _object_misplaced(
    clean: Image3, part: _Part, rng: np.random.Generator, render: Callable[[_Part], Image3]
) -> tuple[Image3, np.ndarray]:
    size = clean.shape[0]
    k = int(rng.integers(len(part.pin_angles)))
    shift = math.radians(rng.uniform(22, 40)) * rng.choice([-1.0, 1.0])
    angles = list(part.pin_angles)
    angles[k] += shift
    mod = render(replace(part, pin_angles=tuple(angles)))
    yy, xx = _grid(size)
    region = np.zeros((size, size), bool)
    for angle in (part.pin_angles[k], angles[k]):
        py = part.cy + _PIN_ORBIT * part.radius * math.sin(angle)
        px = part.cx + _PIN_ORBIT * part.radius * math.cos(angle)
        region |= np.hypot(yy - py, xx - px) < (_PIN_RADIUS + 0.03) * part.radius + 1
    return mod, region


_TextureDefect = Callable[[Image3, np.random.Generator], tuple[Image3, np.ndarray]]
_ObjectDefect = Callable[
    [Image3, _Part, np.random.Generator, Callable[[_Part], Image3]], tuple[Image3, np.ndarray]
]
_TEXTURE_DEFECT_FNS: dict[str, _TextureDefect] = {
    "scratch": _texture_scratch,
    "hole": _texture_hole,
    "stain": _texture_stain,
}
_OBJECT_DEFECT_FNS: dict[str, _ObjectDefect] = {
    "scratch": _object_scratch,
    "stain": _object_stain,
    "missing_part": _object_missing,
    "misplaced_part": _object_misplaced,
}


# --------------------------------------------------------------------------------------------
# Clean / defective pairs


def _exact_mask(
    clean: np.ndarray, modified: np.ndarray, region: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Composite a modification so that the mask is exactly what changed.

    Args:
        clean: H×W×3 uint8 clean image.
        modified: H×W×3 uint8 image with the defect painted in.
        region: H×W bool, where the defect may change pixels.

    Returns:
        The defective image (H×W×3 uint8, equal to ``clean`` outside the mask) and the mask (H×W
        bool): pixels of ``region`` changed by more than ``_NOISE_TOL`` grey levels, holes filled
        (the inside of a stain is part of it even where the tint is invisible), specks dropped
        (a one-pixel fringe must not count as a defect region of its own in PRO).
    """
    diff = np.abs(modified.astype(np.int16) - clean.astype(np.int16)).max(-1)
    mask = ndimage.binary_fill_holes((diff > _NOISE_TOL) & region) & region
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count:
        sizes = np.bincount(labels.ravel())[1:]
        keep = sizes >= max(4, 0.05 * sizes.max())
        mask = keep[labels - 1] & (labels > 0)
    return np.where(mask[..., None], modified, clean), mask


def _check_category(category: str) -> None:
    if category not in DEFECTS:
        raise DatasetError(
            f"unknown synthetic category '{category}'; choose from {', '.join(CATEGORIES)}"
        )


def make_normal(
    category: str, index: int, *, image_size: int = 256, seed: int = 0, stream: str = "train"
) -> np.ndarray:
    """One defect-free image, exactly as the dataset stores it.

    Args:
        category: a name from :data:`CATEGORIES`.
        index: image number within the stream.
        image_size: side of the square image in pixels.
        seed: dataset seed.
        stream: ``"train"`` or ``"good"`` (the normal test images); both draw from the same
            distribution, with independent random streams.

    Returns:
        H×W×3 uint8 RGB image.
    """
    _check_category(category)
    rng = _rng(seed, category, stream, index)
    maker = _object_normal if category == "object" else _texture_normal
    return _to_uint8(maker(category, image_size, rng))


def make_anomalous(
    category: str, defect: str, index: int, *, image_size: int = 256, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One anomalous test image with the clean image it was made from and its exact mask.

    The clean image is drawn from the same distribution as the training images; the defect is
    composited into it, so ``defective == clean`` wherever ``mask`` is False.

    Args:
        category: a name from :data:`CATEGORIES`.
        defect: a name from ``DEFECTS[category]``.
        index: image number within the defect's test folder.
        image_size: side of the square image in pixels.
        seed: dataset seed.

    Returns:
        ``(clean, defective, mask)``: H×W×3 uint8, H×W×3 uint8 and H×W bool (never empty).
    """
    _check_category(category)
    if defect not in DEFECTS[category]:
        raise DatasetError(
            f"unknown defect '{defect}' for synthetic category '{category}'; "
            f"choose from {', '.join(DEFECTS[category])}"
        )
    rng = _rng(seed, category, defect, index)
    if category == "object":
        part, table, noise = _object_scene(image_size, rng)
        clean_f = _render_part(part, table) + noise

        def render(p: _Part) -> Image3:
            return _render_part(p, table) + noise

        def paint() -> tuple[Image3, np.ndarray]:
            return _OBJECT_DEFECT_FNS[defect](clean_f, part, rng, render)
    else:
        clean_f = _texture_normal(category, image_size, rng)

        def paint() -> tuple[Image3, np.ndarray]:
            return _TEXTURE_DEFECT_FNS[defect](clean_f, rng)

    clean = _to_uint8(clean_f)
    min_pixels = max(6, int(5e-4 * image_size * image_size))
    for _ in range(_MAX_ATTEMPTS):  # a defect may land where it barely shows: draw another
        modified, region = paint()
        defective, mask = _exact_mask(clean, _to_uint8(modified), region)
        if mask.sum() >= min_pixels:
            return clean, defective, mask
    raise AssertionError(f"no visible {defect} after {_MAX_ATTEMPTS} attempts")  # unreachable


# --------------------------------------------------------------------------------------------
# Writing the dataset once, atomically


def _write_png(path: Path, array: np.ndarray) -> None:
    # Fixed settings and no metadata: the same pixels give the same bytes.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _write_category(
    root: Path, category: str, size: int, n_train: int, n_good: int, n_defect: int, seed: int
) -> None:
    def name(i: int, count: int) -> str:
        return f"{i:0{max(3, len(str(count - 1)))}d}"

    for stream, folder, count in (("train", "train", n_train), ("good", "test", n_good)):
        out = root / category / folder / NORMAL
        out.mkdir(parents=True)
        for i in range(count):
            image = make_normal(category, i, image_size=size, seed=seed, stream=stream)
            _write_png(out / f"{name(i, count)}.png", image)
    for defect in DEFECTS[category]:
        images = root / category / "test" / defect
        masks = root / category / "ground_truth" / defect
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(n_defect):
            _, defective, mask = make_anomalous(category, defect, i, image_size=size, seed=seed)
            _write_png(images / f"{name(i, n_defect)}.png", defective)
            _write_png(masks / f"{name(i, n_defect)}_mask.png", mask.astype(np.uint8) * 255)


def _is_complete(root: Path) -> bool:
    return (root / MARKER).is_file()


def _publish(tmp: Path, root: Path) -> None:
    """Move a finished dataset into place; whoever renames first wins, the others discard theirs."""
    for _ in range(5):
        try:
            os.rename(tmp, root)  # atomic; fails if root exists and is not empty
            return
        except OSError:
            if _is_complete(root):  # another process finished the same dataset first
                shutil.rmtree(tmp, ignore_errors=True)
                return
        # root is an incomplete leftover (an older crash or a copy): move it aside, then retry.
        stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.stale-", dir=root.parent))
        with contextlib.suppress(FileNotFoundError):  # gone already: someone else cleared it
            os.rename(root, stale / "old")
        if _is_complete(stale / "old"):  # lost a race with a finished copy: put it back
            with contextlib.suppress(OSError):
                os.rename(stale / "old", root)
        shutil.rmtree(stale, ignore_errors=True)
    raise DatasetError(
        f"cannot move the generated synthetic dataset into {root}: the folder keeps being "
        "recreated. Delete it and run again."
    )


def _dataset_key(params: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    return f"synthetic_v{GENERATOR_VERSION}_{digest[:12]}"


def _check_params(
    categories: Sequence[str], counts: dict[str, int], image_size: int, seed: int
) -> None:
    for category in categories:
        _check_category(category)
    if not categories:
        raise DatasetError(f"no synthetic categories requested; choose from {CATEGORIES}")
    if image_size < _MIN_IMAGE_SIZE:
        raise DatasetError(
            f"synthetic image_size={image_size} is too small; use at least {_MIN_IMAGE_SIZE}"
        )
    if seed < 0:
        raise DatasetError(f"synthetic seed={seed} is negative; use a seed >= 0")
    for key, value in counts.items():
        if value < 1:
            raise DatasetError(f"synthetic {key}={value}: every split needs at least 1 image")


def ensure_synthetic(
    cache_dir: str | Path,
    *,
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    image_size: int = 256,
    n_train: int = 80,
    n_test_good: int = 16,
    n_test_per_defect: int = 8,
    seed: int = 0,
) -> Path:
    """Generate the synthetic dataset once and return its root (MVTec AD layout).

    Layout: ``root/<category>/train/good/000.png``, ``root/<category>/test/<defect>/000.png``
    (``test/good`` holds the normal test images) and
    ``root/<category>/ground_truth/<defect>/000_mask.png`` (0/255 L-mode PNG).

    The root is ``cache_dir/synthetic_v<version>_<key>``, the key a hash of every parameter.
    A root holding the :data:`MARKER` file is complete and returned at once. Otherwise the dataset
    is written into a temporary sibling folder and renamed into place, so a crash never leaves a
    half-written dataset that looks complete, and concurrent callers end with one intact copy.

    Args:
        cache_dir: folder that holds generated datasets (created if missing).
        categories: names from :data:`CATEGORIES`.
        image_size: side of the square PNGs in pixels.
        n_train: normal training images per category.
        n_test_good: normal test images per category.
        n_test_per_defect: test images per defect type (each with a mask).
        seed: seed of every random choice.

    Returns:
        The dataset root.

    Raises:
        DatasetError: an unknown category, an impossible size or count, or an unwritable cache.
    """
    if isinstance(categories, str):
        categories = (categories,)
    categories = tuple(sorted(set(categories)))
    counts = {
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_per_defect": n_test_per_defect,
    }
    _check_params(categories, counts, image_size, seed)
    params = {
        "version": GENERATOR_VERSION,
        "categories": list(categories),
        "image_size": int(image_size),
        **{k: int(v) for k, v in counts.items()},
        "seed": int(seed),
    }
    cache_dir = Path(cache_dir).expanduser()
    root = cache_dir / _dataset_key(params)
    if _is_complete(root):
        return root

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=cache_dir))
    except OSError as err:
        raise DatasetError(
            f"cannot write the synthetic dataset under {cache_dir} ({err.strerror}); point "
            "dataset.root (or the STAD_CACHE environment variable) to a writable folder."
        ) from None
    try:
        for category in categories:
            _write_category(
                tmp, category, image_size, n_train, n_test_good, n_test_per_defect, seed
            )
        (tmp / MARKER).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        _publish(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
