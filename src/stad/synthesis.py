"""DRAEM-style anomaly synthesis on torch tensors, for methods that train on synthetic defects.

A synthetic anomaly is a Perlin-noise blob (random lattice scales 2^0..2^5 per axis, rotated,
thresholded) kept inside the object's foreground (a grey-level rule per category), filled with
an augmented texture and blended with a random opacity:
``x̃ = (1 − m)·x + m·((1 − β)·τ + β·x)``, β ~ U(0, max_opacity). The returned mask ``m`` is exact:
the corrupted pixels are the pixels where ``m > 0`` and no other pixel changes.

Everything runs on the batch's device (the runner applies it to each training batch as a
derived stream, the datamodule is untouched); every random draw comes from one CPU
``torch.Generator``, so the synthesis is deterministic given its seed on any device.

RD++'s pseudo-anomalies (:class:`SimplexNoise`) are a simpler kind: a rectangle of fractal 3-D
simplex noise added to the image.

Texture sources (``TextureSource``): a folder of images (DTD in DRAEM and AAND), scikit-image's
bundled images (offline default, no download), the other images of the batch, or procedural
fractal noise. Textures read from files can enter channel-reversed (``channel_order="bgr"``), as
in code that reads them with ``cv2.imread`` and blends them into RGB images unconverted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from stad.errors import DatasetError, StadError

# ITU-R 601-2 luma, as PIL's convert("L") that the official foreground script uses.
_LUMA = (0.299, 0.587, 0.114)


# -- foreground -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForegroundRule:
    """Where anomalies may appear, from the grey levels of the clean image.

    Attributes:
        kind: ``all`` (every pixel), ``threshold`` (blurred grey level > ``level``, or ≤ with
            ``invert``), ``disc`` (centred disc of radius ``extent``·H), ``box`` (centred square
            of half-side ``extent``·side) or ``batch`` (the batch's own ``foreground`` mask).
        level: grey level on the 0..255 scale (``threshold``).
        invert: keep the dark side of the threshold (objects darker than their background).
        extent: disc radius / box half-side as a fraction of the image height / side.
        sigma: Gaussian blur before thresholding, as a fraction of the image height (the
            official script blurs σ = 8 px on ~1024 px originals).
    """

    kind: str = "all"
    level: float = 0.0
    invert: bool = False
    extent: float = 0.45
    sigma: float = 8.0 / 1024.0

    def __post_init__(self) -> None:
        if self.kind not in ("all", "threshold", "disc", "box", "batch"):
            raise StadError(
                f"foreground rule kind={self.kind!r} is unknown; use all, threshold, disc, box "
                "or batch"
            )


def foreground_mask(
    images: Tensor, rule: ForegroundRule, foreground: Tensor | None = None
) -> Tensor:
    """The foreground of clean images under a rule.

    Args:
        images: B×3×H×W in [0, 1].
        rule: the category's rule.
        foreground: B×1×H×W mask of the batch (needed by ``kind="batch"``, ignored otherwise).

    Returns:
        B×1×H×W float mask in {0, 1}.
    """
    b, _, h, w = images.shape
    if rule.kind == "all":
        return images.new_ones(b, 1, h, w)
    if rule.kind == "batch":
        if foreground is None:
            raise StadError(
                "foreground rule kind=batch needs a dataset that provides a 'foreground' mask; "
                "choose another rule (e.g. kind=all) for this dataset"
            )
        return (foreground > 0).to(images.dtype)
    if rule.kind in ("disc", "box"):
        yy = torch.arange(h, device=images.device, dtype=images.dtype) - (h - 1) / 2
        xx = torch.arange(w, device=images.device, dtype=images.dtype) - (w - 1) / 2
        if rule.kind == "disc":
            inside = yy[:, None] ** 2 + xx[None, :] ** 2 <= (rule.extent * h) ** 2
        else:
            inside = (yy.abs()[:, None] <= rule.extent * h) & (xx.abs()[None, :] <= rule.extent * w)
        return inside.to(images.dtype).expand(b, 1, h, w).clone()
    luma = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    grey = _blur((images * luma).sum(dim=1, keepdim=True) * 255.0, rule.sigma * h)
    above = grey > rule.level
    return (~above if rule.invert else above).to(images.dtype)


def _blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of B×1×H×W maps (σ in pixels, reflected borders)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    out = F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode=mode), k.view(1, 1, -1, 1))


# -- Perlin masks -----------------------------------------------------------------------------
def _uniform(g: torch.Generator, low: float, high: float, n: int = 1) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _fade(t: Tensor) -> Tensor:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    size: Sequence[int], scales: Sequence[int], generator: torch.Generator, device: Any = "cpu"
) -> Tensor:
    """2-D gradient (Perlin) noise with ``scales`` lattice cells along (rows, columns).

    The lattice's random gradient angles are drawn on the CPU generator; the noise is rendered
    on ``device``. Any size works (no divisibility by the scales needed).

    Returns:
        H×W noise, roughly in [−1, 1].
    """
    h, w = size
    ry, rx = scales
    angles = 2 * math.pi * torch.rand(ry + 1, rx + 1, generator=generator)
    grads = torch.stack((angles.cos(), angles.sin()), dim=-1).to(device)
    ys = torch.arange(h, device=device, dtype=torch.float32) * (ry / h)
    xs = torch.arange(w, device=device, dtype=torch.float32) * (rx / w)
    cy, cx = ys.floor().long(), xs.floor().long()
    fy, fx = (ys - cy)[:, None], (xs - cx)[None, :]

    def corner(dy: int, dx: int) -> Tensor:
        g = grads[(cy + dy)[:, None], (cx + dx)[None, :]]
        return (fy - dy) * g[..., 0] + (fx - dx) * g[..., 1]

    ty, tx = _fade(fy), _fade(fx)
    n0 = torch.lerp(corner(0, 0), corner(1, 0), ty)
    n1 = torch.lerp(corner(0, 1), corner(1, 1), ty)
    return math.sqrt(2.0) * torch.lerp(n0, n1, tx)


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate N×C×H×W images about their centre (bilinear), zero outside the source."""
    theta = degrees.to(images.device, images.dtype) * (math.pi / 180.0)
    h, w = images.shape[-2:]
    cos, sin = theta.cos(), theta.sin()
    # Normalised coordinates stretch non-square images: correct the off-diagonal terms.
    matrix = torch.stack(
        (
            torch.stack((cos, -sin * h / w, torch.zeros_like(cos)), dim=-1),
            torch.stack((sin * w / h, cos, torch.zeros_like(cos)), dim=-1),
        ),
        dim=1,
    )
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def perlin_masks(
    foreground: Tensor,
    generator: torch.Generator,
    *,
    max_scale_exponent: int = 5,
    threshold: float = 0.5,
    max_rotation: float = 90.0,
    min_pixels: int = 4,
    retries: int = 10,
) -> Tensor:
    """Binary Perlin blobs inside a foreground, one per image.

    Per image the lattice scales are 2^U{0..max_scale_exponent} per axis; the noise is rotated
    by U(±max_rotation)°, thresholded and intersected with the foreground, and redrawn (same
    scales) up to ``retries`` times while it covers ≤ ``min_pixels`` pixels.

    Args:
        foreground: N×1×H×W mask in {0, 1}.
        generator: CPU generator of every random draw.

    Returns:
        N×1×H×W float mask in {0, 1}, zero outside the foreground.
    """
    n, _, h, w = foreground.shape
    masks = torch.zeros_like(foreground)
    for i in range(n):
        scales = [
            2 ** int(e) for e in torch.randint(0, max_scale_exponent + 1, (2,), generator=generator)
        ]
        for _ in range(retries + 1):
            noise = perlin_noise((h, w), scales, generator, foreground.device)
            angle = _uniform(generator, -max_rotation, max_rotation)
            noise = rotate(noise[None, None], angle)[0]
            blob = (noise > threshold).to(foreground.dtype) * foreground[i]
            if blob.sum() > min_pixels:
                break
        masks[i] = blob
    return masks


# -- textures ---------------------------------------------------------------------------------
class TextureSource:
    """Fills for the anomalies: ``sample`` gives N×3×H×W textures in [0, 1]."""

    name = "texture"

    def sample(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """One texture per image of ``images`` (N×3×H×W in [0, 1]), on their device."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the run record says about this source."""
        return {"source": self.name}


def _resize(images: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode="bilinear", antialias=True)


CHANNEL_ORDERS = ("rgb", "bgr")


def _check_channel_order(order: str) -> str:
    if order not in CHANNEL_ORDERS:
        raise StadError(
            f"method.synthesis.texture.channel_order={order!r} is unknown; use rgb or bgr"
        )
    return order


class _StoredTextures(TextureSource):
    """Textures held in memory as uint8 C×h×w tensors on the CPU, in ``channel_order``: ``bgr``
    stores them channel-reversed, as ``cv2.imread`` gives them to DRAEM-style code that blends
    them into RGB images unconverted (and augments them as if they were RGB)."""

    def __init__(self, textures: Sequence[Tensor], channel_order: str = "rgb") -> None:
        if not textures:
            raise DatasetError("the texture source holds no image")
        self.channel_order = _check_channel_order(channel_order)
        reverse = channel_order == "bgr"
        self.textures = [t.flip(0) if reverse else t for t in textures]

    def _crop(self, texture: Tensor, generator: torch.Generator) -> Tensor:
        return texture

    def sample(self, images: Tensor, generator: torch.Generator) -> Tensor:
        index = torch.randint(0, len(self.textures), (images.shape[0],), generator=generator)
        out = [
            _resize(
                self._crop(self.textures[int(i)], generator)[None].to(images.device).float() / 255,
                images.shape[-2:],
            )
            for i in index
        ]
        return torch.cat(out).to(images.dtype)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class FolderTextures(_StoredTextures):
    """Every image under a folder (recursively), e.g. DTD's ``images/``, resized to ``size``²
    (squashed, as DRAEM/AAND) and kept in memory, so no file is read during training."""

    name = "folder"

    def __init__(
        self,
        root: str | Path,
        size: int,
        limit: int | None = None,
        seed: int = 0,
        channel_order: str = "rgb",
    ):
        """Read the textures now.

        Args:
            root: folder of texture images (searched recursively).
            size: stored side length (resized again to the batch's size when it differs).
            limit: keep at most this many files, a seeded random subset (None: all).
            seed: seed of that subset.
            channel_order: ``rgb`` or ``bgr`` (see :class:`_StoredTextures`).

        Raises:
            DatasetError: the folder is missing, holds no image, or an image cannot be read.
        """
        self.root = Path(root).expanduser()
        fix = (
            "set method.synthesis.texture.root to a folder of texture images (e.g. DTD's "
            "dtd/images) or use the offline source method.synthesis.texture.source=skimage"
        )
        if not self.root.is_dir():
            raise DatasetError(f"texture folder {self.root} does not exist; {fix}")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(
                f"texture folder {self.root} holds no image ({', '.join(IMAGE_SUFFIXES)}); {fix}"
            )
        if limit is not None and len(files) > limit:
            keep = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
            files = [files[int(i)] for i in sorted(keep[:limit].tolist())]
        self.files = files
        super().__init__([_read_rgb(p, (size, size)) for p in files], channel_order)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "root": str(self.root),
            "images": len(self.files),
            "channel_order": self.channel_order,
        }


def _read_rgb(path: Path | Any, size: tuple[int, int] | None = None) -> Tensor:
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if size is not None:
                rgb = rgb.resize((size[1], size[0]), resample=Image.Resampling.BILINEAR)
            array = np.array(rgb, dtype=np.uint8)
    except OSError as err:
        raise DatasetError(
            f"cannot read texture image {path} ({err}); remove or replace the file"
        ) from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# Natural images and textures shipped inside scikit-image's wheel (read from the package, never
# through skimage.data's loaders, which may try to download a missing file).
SKIMAGE_IMAGES = (
    "brick.png",
    "grass.png",
    "gravel.png",
    "coffee.png",
    "chelsea.png",
    "astronaut.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "motorcycle_left.png",
    "coins.png",
    "moon.png",
    "camera.png",
    "page.png",
    "text.png",
    "cell.png",
    "color.png",
)


class SkimageTextures(_StoredTextures):
    """Offline default: random square crops (¼ to all of the shorter side) of the natural images
    and textures bundled with scikit-image, resized to the batch's size."""

    name = "skimage"

    def __init__(
        self,
        names: Sequence[str] = SKIMAGE_IMAGES,
        min_crop: float = 0.25,
        channel_order: str = "rgb",
    ) -> None:
        package = resources.files("skimage.data")
        found = [n for n in names if (package / n).is_file()]
        if not found:
            raise DatasetError(
                "none of scikit-image's bundled images was found; reinstall scikit-image or use "
                "method.synthesis.texture.source=noise (no files needed)"
            )
        textures = []
        for name in found:
            with resources.as_file(package / name) as file:
                textures.append(_read_rgb(file))
        self.names = found
        self.min_crop = min_crop
        super().__init__(textures, channel_order)

    def _crop(self, texture: Tensor, generator: torch.Generator) -> Tensor:
        h, w = texture.shape[-2:]
        side = max(8, int(min(h, w) * float(_uniform(generator, self.min_crop, 1.0))))
        top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
        return texture[:, top : top + side, left : left + side]

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "images": list(self.names),
            "channel_order": self.channel_order,
        }


class BatchTextures(TextureSource):
    """The other images of the batch (each image gets a neighbour's, flipped upside down so a
    batch of one still gets a different fill)."""

    name = "batch"

    def sample(self, images: Tensor, generator: torch.Generator) -> Tensor:
        shift = int(torch.randint(1, max(2, images.shape[0]), (1,), generator=generator))
        return images.roll(shift, dims=0).flip(-2).clone()


class NoiseTextures(TextureSource):
    """Procedural colour textures: fractal Perlin noise per channel (3 octaves), stretched to
    [0, 1]; needs no file at all."""

    name = "noise"

    def __init__(self, octaves: int = 3) -> None:
        self.octaves = octaves

    def sample(self, images: Tensor, generator: torch.Generator) -> Tensor:
        n, _, h, w = images.shape
        out = torch.zeros(n, 3, h, w, device=images.device)
        for i in range(n):
            base = 2 ** int(torch.randint(0, 4, (1,), generator=generator))
            for c in range(3):
                for o in range(self.octaves):
                    res = base * 2**o
                    out[i, c] += 0.5**o * perlin_noise((h, w), (res, res), generator, images.device)
        lo = out.flatten(2).amin(dim=2)[..., None, None]
        hi = out.flatten(2).amax(dim=2)[..., None, None]
        return ((out - lo) / (hi - lo).clamp_min(1e-6)).to(images.dtype)


TEXTURE_SOURCES = ("folder", "skimage", "batch", "noise")


# -- texture augmentation (DRAEM's 3 of 10 imgaug operations, in torch) ----------------------
Augmentation = Callable[[Tensor, torch.Generator], Tensor]


def _gamma(x: Tensor, g: torch.Generator) -> Tensor:
    gamma = _uniform(g, 0.5, 2.0, 3).to(x.device, x.dtype).view(3, 1, 1)  # per channel
    return x.clamp(0, 1) ** gamma


def _brightness(x: Tensor, g: torch.Generator) -> Tensor:
    mul, add = float(_uniform(g, 0.8, 1.2)), float(_uniform(g, -30, 30)) / 255
    return (x * mul + add).clamp(0, 1)


def _sharpness(x: Tensor, g: torch.Generator) -> Tensor:
    # PIL's ImageEnhance.Sharpness: blend with its SMOOTH-filtered image, factor in [0, 2].
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device)
    kernel = (kernel / 13).to(x.dtype).expand(3, 1, 3, 3)
    smooth = F.conv2d(F.pad(x[None], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)[0]
    return (smooth + float(_uniform(g, 0.0, 2.0)) * (x - smooth)).clamp(0, 1)


def _hue_saturation(x: Tensor, g: torch.Generator) -> Tensor:
    # Hue turn and saturation change, independent values: a rotation and scaling of YIQ chroma.
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        device=x.device,
        dtype=x.dtype,
    )
    angle = float(_uniform(g, -50, 50)) / 255 * 2 * math.pi
    scale = 1.0 + 2.0 * float(_uniform(g, -50, 50)) / 255
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    turn = torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], device=x.device, dtype=x.dtype)
    matrix = torch.linalg.inv(to_yiq) @ turn @ to_yiq
    return torch.einsum("ij,jhw->ihw", matrix, x).clamp(0, 1)


def _solarize(x: Tensor, g: torch.Generator) -> Tensor:
    threshold = float(_uniform(g, 32, 128)) / 255
    if float(_uniform(g, 0, 1)) < 0.5:  # imgaug Solarize(p=0.5)
        return torch.where(x >= threshold, 1 - x, x)
    return x


def _posterize(x: Tensor, g: torch.Generator) -> Tensor:
    step = 2 ** (8 - int(torch.randint(1, 9, (1,), generator=g)))  # keep 1..8 bits
    return torch.floor(x.clamp(0, 1) * 255 / step) * step / 255


def _invert(x: Tensor, g: torch.Generator) -> Tensor:
    return 1 - x


def _autocontrast(x: Tensor, g: torch.Generator) -> Tensor:
    lo = x.flatten(1).amin(dim=1).view(3, 1, 1)
    hi = x.flatten(1).amax(dim=1).view(3, 1, 1)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)


def _equalize(x: Tensor, g: torch.Generator) -> Tensor:
    # Histogram equalisation per channel: each value becomes its rank (the empirical CDF).
    flat = x.flatten(1)
    ranks = flat.argsort(dim=1).argsort(dim=1).to(x.dtype)
    return (ranks / max(flat.shape[1] - 1, 1)).view_as(x)


def _rotate45(x: Tensor, g: torch.Generator) -> Tensor:
    return rotate(x[None], _uniform(g, -45, 45))[0]


AUGMENTATIONS: tuple[Augmentation, ...] = (
    _gamma,
    _brightness,
    _sharpness,
    _hue_saturation,
    _solarize,
    _posterize,
    _invert,
    _autocontrast,
    _equalize,
    _rotate45,
)


def augment_textures(textures: Tensor, generator: torch.Generator, count: int = 3) -> Tensor:
    """Apply ``count`` distinct random operations of ``AUGMENTATIONS`` to each texture."""
    out = []
    for texture in textures:
        chosen = torch.randperm(len(AUGMENTATIONS), generator=generator)[:count]
        for i in chosen:
            texture = AUGMENTATIONS[int(i)](texture, generator)
        out.append(texture)
    return torch.stack(out) if out else textures


# -- the synthesizer --------------------------------------------------------------------------
@dataclass
class Synthesis:
    """A batch with synthetic anomalies.

    Attributes:
        image: B×3×H×W corrupted images in [0, 1].
        mask: B×1×H×W exact anomaly mask in {0, 1}.
        foreground: B×1×H×W foreground of the clean images in {0, 1}.
    """

    image: Tensor
    mask: Tensor
    foreground: Tensor


class AnomalySynthesizer:
    """Corrupts a batch of normal images with DRAEM-style anomalies (see the module docstring)."""

    def __init__(
        self,
        textures: TextureSource,
        foreground: ForegroundRule | None = None,
        *,
        max_scale_exponent: int = 5,
        threshold: float = 0.5,
        max_rotation: float = 90.0,
        max_opacity: float = 0.8,
        clean_probability: float = 0.2,
        augmentations: int = 3,
        min_pixels: int = 4,
        retries: int = 10,
        seed: int = 0,
        salt: int = 0,
    ) -> None:
        """Set the texture source, the foreground rule and the random ranges.

        Args:
            textures: where the fills come from.
            foreground: the category's foreground rule (None: everywhere).
            max_scale_exponent: Perlin lattice scales 2^0..2^this per axis.
            threshold: Perlin noise above it is anomalous.
            max_rotation: noise rotated by U(±this) degrees.
            max_opacity: β ~ U(0, this); the fill shows with weight 1 − β.
            clean_probability: share of images left without an anomaly.
            augmentations: random texture operations per fill (of 10).
            min_pixels: a blob of at most this many pixels is redrawn ...
            retries: ... up to this many times.
            seed: seed of the synthesizer's CPU generator.
            salt: mixed into the per-epoch restart (:meth:`set_epoch`) when non-zero, so two
                streams of one run (e.g. two stages of one method) draw different anomalies
                from the same (seed, epoch); 0 keeps the draws of (seed, epoch) alone.
        """
        if not 0 <= augmentations <= len(AUGMENTATIONS):
            raise StadError(f"augmentations={augmentations} must be in 0..{len(AUGMENTATIONS)}")
        self.textures = textures
        self.foreground = foreground or ForegroundRule()
        self.max_scale_exponent = max_scale_exponent
        self.threshold = threshold
        self.max_rotation = max_rotation
        self.max_opacity = max_opacity
        self.clean_probability = clean_probability
        self.augmentations = augmentations
        self.min_pixels = min_pixels
        self.retries = retries
        self.seed = seed
        self.salt = int(salt)
        self.generator = torch.Generator().manual_seed(seed)

    def set_epoch(self, epoch: int) -> None:
        """Restart the random stream at a point that depends on the seed and the epoch alone
        (and the salt, when set), so a training resumed at an epoch draws what an uninterrupted
        one draws there."""
        entropy = [self.seed, epoch] + ([self.salt] if self.salt else [])
        self.generator.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    @torch.no_grad()
    def __call__(self, images: Tensor, foreground: Tensor | None = None) -> Synthesis:
        """Corrupt a batch.

        Args:
            images: B×3×H×W clean images in [0, 1].
            foreground: B×1×H×W foreground mask of the batch (used by rule ``batch``).

        Returns:
            The corrupted images, their exact masks and the clean images' foreground.
        """
        g = self.generator
        n = images.shape[0]
        fg = foreground_mask(images, self.foreground, foreground)
        masks = perlin_masks(
            fg,
            g,
            max_scale_exponent=self.max_scale_exponent,
            threshold=self.threshold,
            max_rotation=self.max_rotation,
            min_pixels=self.min_pixels,
            retries=self.retries,
        )
        clean = torch.rand(n, generator=g) < self.clean_probability
        masks[clean.to(masks.device)] = 0
        fill = augment_textures(self.textures.sample(images, g), g, self.augmentations)
        beta = (torch.rand(n, generator=g) * self.max_opacity).to(images.device, images.dtype)
        blend = (1 - beta.view(-1, 1, 1, 1)) * fill.to(images.dtype) + beta.view(
            -1, 1, 1, 1
        ) * images
        # torch.where, not (1 − m)·x + m·y: pixels outside the mask stay bit-identical.
        corrupted = torch.where(masks > 0, blend, images)
        return Synthesis(corrupted, masks, fg)

    def describe(self) -> dict[str, Any]:
        """The synthesis settings for the run record."""
        return {
            "textures": self.textures.describe(),
            "foreground": asdict(self.foreground),
            "max_opacity": self.max_opacity,
            "clean_probability": self.clean_probability,
            "perlin_scales": f"2^0..2^{self.max_scale_exponent}",
            "threshold": self.threshold,
            **({"salt": self.salt} if self.salt else {}),
        }


# -- from config ------------------------------------------------------------------------------
def texture_source(cfg: Mapping[str, Any], size: int, seed: int = 0) -> TextureSource:
    """The texture source a ``texture`` config block names (``source``, ``root``, ``limit``,
    ``channel_order``: ``rgb`` by default; it applies to the file sources folder and skimage)."""
    source = str(cfg.get("source", "skimage"))
    order = _check_channel_order(str(cfg.get("channel_order") or "rgb"))
    if source == "folder":
        root = cfg.get("root")
        if not root:
            raise DatasetError(
                "method.synthesis.texture.source=folder needs method.synthesis.texture.root=<a "
                "folder of texture images, e.g. DTD's dtd/images>; or use source=skimage"
            )
        limit = cfg.get("limit")
        return FolderTextures(root, size, int(limit) if limit else None, seed, order)
    if source == "skimage":
        return SkimageTextures(channel_order=order)
    if source == "batch":
        return BatchTextures()
    if source == "noise":
        return NoiseTextures()
    raise StadError(
        f"method.synthesis.texture.source={source!r} is unknown; use one of "
        + ", ".join(TEXTURE_SOURCES)
    )


def foreground_rule(cfg: Mapping[str, Any], category: str | None) -> ForegroundRule:
    """The rule of ``category`` from a ``foreground`` block: ``rules.<category>`` if listed,
    else ``default``; each rule a mapping of :class:`ForegroundRule` fields."""
    rules = cfg.get("rules") or {}
    chosen = rules.get(category) if category is not None else None
    spec = dict(chosen if chosen is not None else cfg.get("default") or {})
    return ForegroundRule(**spec)


def build_synthesizer(
    cfg: Mapping[str, Any], size: int, category: str | None = None, seed: int = 0
) -> AnomalySynthesizer:
    """An :class:`AnomalySynthesizer` from a ``synthesis`` config block.

    Args:
        cfg: keys ``texture`` (``texture_source``), ``foreground`` (``foreground_rule``) and the
            keyword arguments of :class:`AnomalySynthesizer`.
        size: side of stored folder textures (the run's image size).
        category: the dataset category, which picks the foreground rule.
        seed: seed of the synthesizer's generator (and of a folder's subset).
    """
    options = {k: v for k, v in cfg.items() if k not in ("texture", "foreground")}
    return AnomalySynthesizer(
        texture_source(cfg.get("texture") or {}, size, seed),
        foreground_rule(cfg.get("foreground") or {}, category),
        seed=seed,
        **options,
    )


# -- RD++: simplex-noise pseudo-anomalies ------------------------------------------------------
def fractal_simplex(
    shape: tuple[int, int, int],
    seed: int,
    octaves: int = 6,
    persistence: float = 0.6,
    frequency: float = 32.0,
) -> np.ndarray:
    """Layered 3-D OpenSimplex noise on the integer grid of ``shape`` (z, y, x), float64: the sum
    over octaves of amplitude · noise3(x/f, y/f, z/f), f halving and the amplitude multiplied
    by ``persistence`` per octave (RD++'s ``Simplex_CLASS.rand_3d_octaves``, a copy of the
    opensimplex package's noise, which stad uses)."""
    try:
        import opensimplex
    except ImportError:
        raise StadError(
            "simplex noise (RD++'s pseudo-anomalies) needs opensimplex; install it with "
            "pip install 'stad[rdpp]'"
        ) from None
    noise = opensimplex.OpenSimplex(seed=int(seed))
    z, y, x = (np.arange(n, dtype=np.float64) for n in shape)
    out = np.zeros(shape, dtype=np.float64)
    amplitude = 1.0
    for _ in range(int(octaves)):
        out += amplitude * noise.noise3array(x / frequency, y / frequency, z / frequency)
        frequency /= 2
        amplitude *= persistence
    return out


class SimplexNoise:
    """RD++'s pseudo-anomaly (official ``MVTecDataset_train``): per image a rectangle of h × w
    pixels, h and w ~ U{min_side … side/8 − 1}, top-left corner ~ U{1 … side − h − 1}, gets
    ``scale`` × fractal simplex noise added to all three channels of the [0, 1] image (no
    clipping). The noise is the top-left h × w corner of one field per seed, as the official
    code evaluates one fixed noise on a grid from the origin for every image.

    Draws come from a CPU generator restarted per epoch from (seed, epoch) (:meth:`set_epoch`).
    """

    def __init__(
        self,
        octaves: int = 6,
        persistence: float = 0.6,
        frequency: float = 32.0,
        scale: float = 0.2,
        min_side: int = 10,
        max_side_divisor: int = 8,
        seed: int = 0,
    ) -> None:
        self.octaves, self.persistence, self.frequency = octaves, persistence, frequency
        self.scale, self.min_side, self.max_side_divisor = scale, min_side, max_side_divisor
        self.seed = seed
        self.noise_seed = int(np.random.SeedSequence([seed, 0x51]).generate_state(1)[0])
        self.generator = torch.Generator().manual_seed(seed)
        self._fields: dict[tuple[int, int], Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        """Restart the draws at a point given by (seed, epoch)."""
        self.generator.manual_seed(
            int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        )

    def _field(self, h: int, w: int) -> Tensor:
        if (h, w) not in self._fields:
            shape = (3, h // self.max_side_divisor, w // self.max_side_divisor)
            values = fractal_simplex(
                shape, self.noise_seed, self.octaves, self.persistence, self.frequency
            )
            self._fields[(h, w)] = torch.from_numpy(values).float()
        return self._fields[(h, w)]

    def _side(self, side: int) -> tuple[int, int]:
        """(length, start) of one side's rectangle (numpy's randint bounds: high excluded)."""
        high = side // self.max_side_divisor
        if high <= self.min_side:
            raise StadError(
                f"simplex noise: images of side {side} leave no rectangle of at least "
                f"{self.min_side} px below side/{self.max_side_divisor}; use image_size >= "
                f"{(self.min_side + 1) * self.max_side_divisor}"
            )
        length = int(torch.randint(self.min_side, high, (), generator=self.generator))
        start = int(torch.randint(1, side - length, (), generator=self.generator))
        return length, start

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """The batch (B×3×H×W in [0, 1]) with one noise rectangle per image."""
        h, w = images.shape[-2:]
        field = self._field(int(h), int(w))
        noise = torch.zeros_like(images, dtype=torch.float32)
        for i in range(images.shape[0]):
            nh, top = self._side(int(h))
            nw, left = self._side(int(w))
            noise[i, :, top : top + nh, left : left + nw] = self.scale * field[:, :nh, :nw]
        return images + noise.to(images.dtype)

    def describe(self) -> dict[str, Any]:
        """What the record says of the noise."""
        return {
            "kind": "simplex_noise",
            "octaves": self.octaves,
            "persistence": self.persistence,
            "frequency": self.frequency,
            "scale": self.scale,
            "min_side": self.min_side,
            "max_side_divisor": self.max_side_divisor,
        }
