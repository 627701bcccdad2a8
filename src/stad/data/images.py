"""Image and mask decoding for every dataset family: file filters, RGB loading, binary masks.

Images are resized with antialiased bilinear interpolation and never cropped (implicit centre
crops shifted heat maps against masks in peer projects). Masks are binarised with ``> 0`` at their
original resolution, then resized with nearest-neighbour sampling so they stay binary (stad's
protocol; the official codes' rules are options, :data:`MASK_RULES`).
Every decoding failure becomes a :class:`~stad.errors.DatasetError` naming the file; truncated
files are errors, never padded (PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay off).
Alpha channels are dropped, never composited: the stored colours are the picture.
:class:`DecodeCache` keeps decoded, resized arrays on disk so later runs skip decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
import warnings
import zlib
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from stad.errors import DatasetError
from stad.fileio import IMAGE_EXTENSIONS, is_image_file, list_images

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "list_images"]  # re-exported for the readers

# Decoding errors PIL and numpy raise on truncated, corrupt or exotic files.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, TypeError)


def list_subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name (hidden ones such as ``.ipynb_checkpoints``
    are skipped)."""
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def as_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise an image size to ``(height, width)``.

    Args:
        image_size: One int for a square size, or ``(height, width)``.

    Raises:
        DatasetError: The size is not one or two positive integers.
    """
    try:
        # Not int(): a bool is an Integral and must stay recognisable to be refused below.
        values = (
            [cast(int, image_size)] * 2
            if isinstance(image_size, Integral)
            else list(cast(Sequence[int], image_size))
        )
    except TypeError:
        values = []
    valid = len(values) == 2 and all(
        isinstance(v, Integral) and not isinstance(v, bool) and v > 0 for v in values
    )
    if not valid:
        raise DatasetError(
            f"Invalid image size {image_size!r}: expected a positive int or [height, width]; "
            "set dataset.image_size=256 (or e.g. [256,256])."
        )
    return int(values[0]), int(values[1])


def open_image(path: Path) -> Image.Image:
    """Open ``path`` and decode its pixels, or raise a :class:`DatasetError` naming it.

    Raises:
        DatasetError: The file is missing, truncated, corrupt or not an image PIL reads, or
            PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` was switched on in this process.
    """
    _refuse_truncated_loading(path)
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError as err:
        raise DatasetError(f"Image file {path} does not exist; check the dataset folder.") from err
    except _DECODE_ERRORS as err:
        raise DatasetError(
            f"Cannot decode image file {path} ({type(err).__name__}: {err}). The file is "
            "truncated, corrupt or not an image PIL can read: replace it with the original from "
            "the dataset archive (or save it as an 8-bit PNG), or delete it."
        ) from err


def _refuse_truncated_loading(path: Path) -> None:
    """Stop if some code in this process told PIL to pad truncated files.

    With ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` PIL fills the missing part of a cut file with
    grey/black and reports success, which would train and evaluate on broken images silently.
    The flag is process-wide, so it cannot be switched off for stad's reads alone.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise DatasetError(
            f"Refusing to decode {path}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this "
            "process, so truncated files would be read as partly blank images without an error. "
            "Set PIL.ImageFile.LOAD_TRUNCATED_IMAGES = False (the default) before running stad."
        )


def read_image_size(path: Path) -> tuple[int, int]:
    """Return ``(width, height)`` from the file header, without decoding the pixels.

    Raises:
        DatasetError: The file is missing or not a readable image.
    """
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError as err:
        raise DatasetError(f"Image file {path} does not exist; check the dataset folder.") from err
    except _DECODE_ERRORS as err:
        raise DatasetError(
            f"Cannot read image file {path} ({type(err).__name__}: {err}). The file is corrupt "
            "or not an image PIL can read: replace it with the original from the dataset archive "
            "(or save it as an 8-bit PNG), or delete it."
        ) from err


def drop_alpha(img: Image.Image) -> Image.Image:
    """The image without its alpha channel: colours (or grey levels) exactly as stored.

    Alpha is dropped, not composited onto a background: compositing onto black would turn
    transparent pixels into black garbage, onto white would invent a colour, while the stored
    colours are what the camera saw (datasets ship RGBA only by accident of export). Palette
    images are expanded through their palette first (``P`` with transparency via ``RGBA``, which
    also avoids PIL's warning about byte transparency).
    """
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        return img.convert("RGB")
    if img.mode == "LA":
        return img.convert("L")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (greyscale is repeated over three channels).

    16-bit and float greyscale images are scaled to 0..255 first: PIL's own conversion of those
    modes clips instead of scaling. Alpha is dropped (see :func:`drop_alpha`); 1-bit images
    become 0/255.
    """
    img = drop_alpha(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0, 0, 255).round().astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        # Float images are taken to be in [0, 1] when they fit there, else in [0, 255].
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        arr = np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def binarise_mask(img: Image.Image) -> np.ndarray:
    """Binary mask of a mask image: every non-zero pixel is anomalous.

    ``> 0`` rather than ``/ 255``: MVTec LOCO stores some defects with values 236..254, which a
    division to uint8 empties, VisA stores defect indices 1, 2, ..., and masks saved as 0/1 must
    not become empty. Soft (anti-aliased) edges count as anomalous down to value 1. Any bit
    depth: 16-bit and float masks are compared raw. Colour masks count a pixel if any channel is
    non-zero; palette masks are read through their palette; an alpha channel is ignored.

    Returns:
        uint8 array (H, W) with values in {0, 1}, at the file's resolution.
    """
    arr = np.asarray(drop_alpha(img))
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return (arr > 0).astype(np.uint8)


def mask_levels(img: Image.Image) -> np.ndarray:
    """Coverage of each pixel of a soft-edged mask on the 8-bit scale, for thresholded masks.

    For readers whose masks are thresholded rather than binarised with ``> 0`` (MTD's
    anti-aliased masks, ``>= 128``): every storage gives the same levels. 16-bit masks are
    scaled by 65535 (PIL's ``convert("L")`` clips them: 300/65535 would read 255); colour masks
    take the brightest channel (``convert("L")`` weighs pure blue as 29/255); alpha is dropped;
    masks stored as 0/1 (maximum 1, any mode) and float masks in [0, 1] are scaled to 0/255.

    Returns:
        uint8 array (H, W) in 0..255, at the file's resolution.
    """
    img = drop_alpha(img)
    if img.mode not in ("1", "L", "I", "F") and not img.mode.startswith("I;16"):
        img = img.convert("RGB")
    arr = np.asarray(img).astype(np.float64)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(arr.max()) if arr.size else 0.0
    if peak <= 1.0:  # 0/1, 1-bit (read as bool) and [0, 1] float masks
        scale = 255.0
    elif img.mode.startswith("I;16") or (img.mode == "I" and peak > 255):
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    return np.clip(arr * scale, 0, 255).round().astype(np.uint8)


def resize_rgb(img: Image.Image, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize an RGB image to ``size_hw`` with antialiased bilinear filtering, no crop.

    PIL's bilinear filter widens its support when downscaling, so it averages over every source
    pixel (antialiased), unlike ``torch.nn.functional.interpolate`` without ``antialias=True``.

    Returns:
        uint8 array (H, W, 3).
    """
    height, width = size_hw
    if img.size != (width, height):
        img = img.resize((width, height), resample=Image.Resampling.BILINEAR)
    return np.array(img, dtype=np.uint8)


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize a binary mask with nearest-neighbour sampling, so it stays in {0, 1}.

    Args:
        mask: uint8 (h, w) with values in {0, 1}.
        size_hw: Target ``(height, width)``.

    Returns:
        uint8 array (H, W) with values in {0, 1}.
    """
    height, width = size_hw
    if mask.shape == (height, width):
        return mask
    img = Image.fromarray(mask, mode="L")
    return np.array(img.resize((width, height), resample=Image.Resampling.NEAREST))


MASK_RULES = ("nearest", "antialiased_half", "bilinear_nonzero", "bilinear_positive")
"""How a binary mask is brought to the evaluation size (``eval_protocol.mask_rule``):

- ``nearest`` (stad's protocol, every method): binarise ``> 0`` at the file's resolution, then
  nearest-neighbour resizing, so every evaluated pixel is a pixel of the original mask;
- ``antialiased_half`` (RD4AD's and AAND's test code): the 0/255 mask resized with PIL's
  antialiased bilinear filter (torchvision ``Resize`` on a PIL image), then ``> 0.5`` on [0, 1];
- ``bilinear_nonzero`` (STFPM's code): ``cv2.resize`` (bilinear, half-pixel centres, no
  antialiasing) of the 0/255 mask, then ``astype(bool)``: any pixel whose rounded value is
  non-zero, i.e. interpolated value ``>= 0.5`` on the 0..255 scale (up to cv2's 11-bit
  fixed-point weights);
- ``bilinear_positive`` (AST's code): torch bilinear interpolation (half-pixel centres, no
  antialiasing) of the 0/255 mask, then ``> 0``: every pixel any anomalous source pixel
  reaches.

A rule may name a coarser evaluation grid, ``<rule>@<k>`` (``eval_protocol.mask_downscale``):
the mask is brought to (H/k)×(W/k) by the rule, then each grid pixel is held over its k×k block
of the target size, as AST's code evaluates at 192 px (input/4) while its input is 768 px. With
a map held the same way, every metric equals the one computed on the grid.
"""


def split_mask_rule(spec: str) -> tuple[str, int | None]:
    """``"bilinear_positive@4"`` → ``("bilinear_positive", 4)``; no ``@``: no coarser grid.

    Raises:
        DatasetError: unknown rule or a downscale that is not a positive integer.
    """
    rule, _, factor = spec.partition("@")
    if rule not in MASK_RULES or (factor and not (factor.isdigit() and int(factor) > 0)):
        raise DatasetError(
            f"Unknown mask rule {spec!r}; set eval_protocol.mask_rule to one of "
            f"{', '.join(MASK_RULES)} (and eval_protocol.mask_downscale to a positive integer "
            "or null)."
        )
    return rule, int(factor) if factor else None


def held_grid_mask(
    binary: np.ndarray, size_hw: tuple[int, int], rule: str, factor: int
) -> np.ndarray:
    """The mask made at ``size_hw / factor`` by ``rule``, each pixel repeated over its
    factor×factor block of ``size_hw``."""
    height, width = size_hw
    if height % factor or width % factor:
        raise DatasetError(
            f"eval_protocol.mask_downscale={factor} does not divide the image size "
            f"{height}x{width}; use a factor that divides image_size, or null"
        )
    grid = resize_mask_by_rule(binary, (height // factor, width // factor), rule)
    return np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)


def resize_mask_by_rule(binary: np.ndarray, size_hw: tuple[int, int], rule: str) -> np.ndarray:
    """Bring a {0, 1} mask at the file's resolution to ``size_hw`` by one of :data:`MASK_RULES`.

    Raises:
        DatasetError: unknown rule.
    """
    rule, factor = split_mask_rule(rule)
    if factor is not None and factor > 1:
        return held_grid_mask(binary, size_hw, rule, factor)
    if rule == "nearest":
        return resize_mask(binary, size_hw)
    height, width = size_hw
    if rule == "antialiased_half":
        img = Image.fromarray(binary * np.uint8(255), mode="L")
        levels = np.asarray(img.resize((width, height), resample=Image.Resampling.BILINEAR))
        return (levels.astype(np.float64) / 255.0 > 0.5).astype(np.uint8)
    if rule == "bilinear_nonzero":
        import torch
        import torch.nn.functional as F

        source = torch.from_numpy(binary.astype(np.float64) * 255.0)[None, None]
        resized = F.interpolate(source, size=size_hw, mode="bilinear", align_corners=False)
        return (resized[0, 0].numpy() >= 0.5).astype(np.uint8)
    if rule == "bilinear_positive":
        import torch
        import torch.nn.functional as F

        source = torch.from_numpy(binary.astype(np.float32) * 255.0)[None, None]
        resized = F.interpolate(source, size=size_hw, mode="bilinear", align_corners=False)
        return (resized[0, 0].numpy() > 0).astype(np.uint8)
    raise DatasetError(
        f"Unknown mask rule {rule!r}; set eval_protocol.mask_rule to one of "
        f"{', '.join(MASK_RULES)}."
    )


def load_rgb(path: Path, size_hw: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image as RGB and resize it.

    Returns:
        The uint8 array (H, W, 3) and the original ``(width, height)`` of the file.

    Raises:
        DatasetError: The file is missing or cannot be decoded.
    """
    img = open_image(path)
    original_size = img.size
    try:
        return resize_rgb(to_rgb(img), size_hw), original_size
    except _DECODE_ERRORS as err:
        raise DatasetError(
            f"Cannot convert image file {path} (mode {img.mode}) to RGB ({err}); "
            "save it as an 8-bit RGB or greyscale PNG."
        ) from err


def check_mask_size(
    mask_path: Path, mask_size: tuple[int, int], image_path: Path, image_size: tuple[int, int]
) -> None:
    """Raise a :class:`DatasetError` if a mask's ``(width, height)`` differs from its image's."""
    if mask_size != image_size:
        raise DatasetError(
            f"Mask {mask_path} is {mask_size[0]}x{mask_size[1]} px but its image {image_path} is "
            f"{image_size[0]}x{image_size[1]} px; a mask must have its image's size. Replace the "
            "mask (or the image) with the original files from the dataset archive."
        )


def load_mask(
    path: Path,
    size_hw: tuple[int, int],
    image_path: Path,
    image_size: tuple[int, int],
    rule: str = "nearest",
) -> tuple[np.ndarray, int]:
    """Decode a ground-truth mask, check it fits its image, binarise and resize it.

    Args:
        path: The mask file.
        size_hw: Target ``(height, width)``.
        image_path: The image the mask belongs to (named in errors).
        image_size: The image's original ``(width, height)``.
        rule: How the mask reaches ``size_hw`` (:data:`MASK_RULES`).

    Returns:
        uint8 array (H, W) in {0, 1}, and the number of anomalous pixels at the original
        resolution (0 flags an empty mask).

    Raises:
        DatasetError: The mask is unreadable or its size differs from the image's.
    """
    img = open_image(path)
    check_mask_size(path, img.size, image_path, image_size)
    try:
        binary = binarise_mask(img)
    except _DECODE_ERRORS as err:
        raise DatasetError(
            f"Cannot read mask file {path} (mode {img.mode}: {err}); save it as an 8-bit "
            "greyscale PNG (0 normal, > 0 anomalous)."
        ) from err
    return resize_mask_by_rule(binary, size_hw, rule), int(binary.sum())


class DecodeCache:
    """Decoded and resized images and masks on disk, shared by every run (a sweep decodes once).

    One raw file per sample under ``folder/<2 hex>/<sha256>.raw``: a 32-byte header (magic,
    height and width as uint32, the mask's anomalous pixel count at the original resolution as
    int64, the CRC-32 of those fields and the payload), then the uint8 image (3, H, W) and the
    uint8 mask (H, W). The layout is fixed by the target size, which is part of the key, so
    reading an entry is one read and a few fixed-offset unpacks: no ``.npy`` header, whose
    parsing (``ast.literal_eval`` inside ``numpy.load``) is not thread-safe on CPython up to
    3.11.7 ("AST constructor recursion depth mismatch" in the preload threads).
    The name hashes everything the decoded arrays depend on: the resolved image and mask paths,
    their sizes and modification times (nanoseconds), the target size and the format version,
    so an edited source file or another image size is a miss, never a stale hit. Entries of the
    wrong length, magic or checksum are misses and get rewritten; a cache that cannot be written
    only costs its speed-up (one warning). Old entries are never deleted: remove the folder to
    reclaim the space.

    Args:
        folder: the cache folder, e.g. ``${STAD_CACHE:-~/.cache/stad}/decoded``.

    Attributes:
        hits, misses: lookups answered from disk / decoded (tests and the run record use them).
    """

    #: Bump when decoding, resizing or the file layout changes: every older entry then misses.
    #: (1 was one ``.npz`` per sample.)
    VERSION = 2
    #: The file layout, named in benchmark rows.
    FORMAT = "raw"
    SUFFIX = ".raw"
    _MAGIC = b"STADDC2\n"
    # magic, height, width, pixel count (-1: no mask), CRC-32 of the payload
    _HEADER = struct.Struct("<8sIIqI4x")
    _CHECKED = 24  # the header bytes the checksum covers (all but the checksum itself)

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._warned = False

    def key(
        self,
        image_path: Path,
        mask_path: Path | None,
        size_hw: tuple[int, int],
        mask_rule: str = "nearest",
    ) -> str | None:
        """The entry name of a sample, or None when a source file cannot be stat'ed (decoding
        then raises the usual DatasetError)."""
        try:
            sources = [_identity(image_path), _identity(mask_path) if mask_path else None]
        except OSError:
            return None
        text = json.dumps([self.VERSION, list(size_hw), sources, mask_rule])
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str) -> Path:
        """The file of entry ``key``."""
        return self.folder / key[:2] / f"{key}{self.SUFFIX}"

    def load(
        self, key: str, size_hw: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, int | None] | None:
        """The cached ``(image (3, H, W), mask (H, W), pixel count or None)``, or None.

        The arrays are writable views of one buffer read from the file (no copy)."""
        height, width = size_hw
        n_image, n_mask = 3 * height * width, height * width
        size = self._HEADER.size + n_image + n_mask
        buffer = bytearray(size + 1)  # one byte more: a longer file is not this entry
        try:
            with self.path(key).open("rb") as handle:
                n_read = handle.readinto(buffer)
        except OSError:
            n_read = -1
        entry = self._unpack(buffer, n_read, size, n_image, size_hw)
        self._count(hit=entry is not None)
        return entry

    def _unpack(
        self, buffer: bytearray, n_read: int, size: int, n_image: int, size_hw: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, int | None] | None:
        if n_read != size:
            return None
        magic, height, width, count, crc = self._HEADER.unpack_from(buffer)
        if (magic, (height, width)) != (self._MAGIC, size_hw):
            return None
        view = memoryview(buffer)
        if _checksum(view[: self._CHECKED], view[self._HEADER.size : size]) != crc:
            return None
        pixels = np.frombuffer(
            buffer, dtype=np.uint8, count=size - self._HEADER.size, offset=self._HEADER.size
        )
        image = pixels[:n_image].reshape(3, *size_hw)
        mask = pixels[n_image:].reshape(size_hw)
        return image, mask, (None if count < 0 else int(count))

    def store(self, key: str, image: np.ndarray, mask: np.ndarray, n_pixels: int | None) -> None:
        """Write an entry atomically (a temporary file renamed into place)."""
        path = self.path(key)
        payload = (
            np.ascontiguousarray(image, dtype=np.uint8).tobytes()
            + np.ascontiguousarray(mask, dtype=np.uint8).tobytes()
        )
        height, width = mask.shape
        count = -1 if n_pixels is None else int(n_pixels)
        fields = self._HEADER.pack(self._MAGIC, height, width, count, 0)[: self._CHECKED]
        header = self._HEADER.pack(
            self._MAGIC, height, width, count, _checksum(fields, memoryview(payload))
        )
        temporary: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
                temporary = f.name
                f.write(header)
                f.write(payload)
            os.replace(temporary, path)
        except OSError as err:
            if temporary is not None:  # a full disk must not leave a partial entry behind
                Path(temporary).unlink(missing_ok=True)
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"Cannot write the decode cache in {self.folder} ({err}); images are decoded "
                    "every run. Set STAD_CACHE to a writable folder to speed up later runs.",
                    stacklevel=2,
                )

    def _count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1


def _checksum(header: bytes | memoryview, payload: memoryview) -> int:
    """CRC-32 of a cache entry's header fields and payload (zlib releases the GIL on large
    buffers, so preload threads check entries in parallel)."""
    return zlib.crc32(payload, zlib.crc32(header))


def _identity(path: Path) -> list[object]:
    """What identifies a file's content cheaply: resolved path, size, mtime in nanoseconds."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
