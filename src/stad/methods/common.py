"""Building blocks several methods share: backbone teachers and students, map helpers, blur."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stad.backbones import FeatureExtractor, WeightsInfo, create_feature_extractor
from stad.core import Batch, Features, Student, Teacher
from stad.feature_cache import CachedFeatures


class BackboneTeacher(Teacher):
    """A frozen pretrained feature extractor: the teacher of STFPM, RD, DSKD.

    With ``cache``, the features of each training image are computed in its first epoch and
    reused afterwards (the papers train on un-augmented images, so a frozen teacher gives the
    same features every epoch); evaluation (inference mode) always runs the extractor.
    """

    def __init__(self, extractor: FeatureExtractor, cache: CachedFeatures | None = None) -> None:
        super().__init__()
        self.extractor = extractor
        self.cache = cache

    @torch.no_grad()
    def forward(self, batch: Batch) -> Features:
        if self.cache is not None and not torch.is_inference_mode_enabled():
            return self.cache(batch["image"], batch.get("path"))
        return self.extractor(batch["image"])


class BackboneStudent(Student):
    """A randomly initialised copy of the teacher's architecture that sees the image."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, batch: Batch, targets: Features) -> Features:
        return self.extractor(batch["image"])


def pretrained_teacher(
    name: str, layers: Sequence[int], weights: str, cache: bool = False
) -> tuple[BackboneTeacher, WeightsInfo]:
    """A frozen teacher from a backbone config (the weights' source goes to the run record);
    ``cache`` keeps each training image's features in memory after its first epoch."""
    extractor, info = create_feature_extractor(name, layers, weights, frozen=True)
    key = f"{name}:{weights}:{list(layers)}"
    return BackboneTeacher(extractor, CachedFeatures(extractor, key) if cache else None), info


def squared_distance(t: Tensor, s: Tensor) -> Tensor:
    """Per-position squared L2 distance of channel-normalised features: B×C×h×w → B×1×h×w."""
    return (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(dim=1, keepdim=True)


def cosine_distance(t: Tensor, s: Tensor) -> Tensor:
    """Per-position 1 − cosine similarity: B×C×h×w → B×1×h×w."""
    return 1.0 - F.cosine_similarity(t, s, dim=1).unsqueeze(1)


def resize(maps: Tensor, size: Sequence[int], align_corners: bool = False) -> Tensor:
    """Bilinear resize of B×1×h×w maps.

    ``align_corners=False`` (half-pixel centres) is what STFPM's code (``F.interpolate`` and
    ``cv2.resize``) and AST's use; RD4AD's and AAND's test code upsample every level with
    ``align_corners=True`` (corner pixels pinned), which moves the map everywhere, not only at
    the border: their presets set ``scorer.align_corners: true``.
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=align_corners)


def reduce_map(maps: Tensor, reduction: str = "max") -> Tensor:
    """Image scores (B,) from maps B×1×H×W: ``max``, ``mean`` or ``topk:<fraction>``."""
    flat = maps.flatten(1)
    if reduction == "max":
        return flat.amax(dim=1)
    if reduction == "mean":
        return flat.mean(dim=1)
    if reduction.startswith("topk:"):
        k = max(1, round(float(reduction.split(":", 1)[1]) * flat.shape[1]))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"unknown score reduction {reduction!r}: use max, mean or topk:<fraction>")


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """Normalised 1-D Gaussian kernel of radius ``int(truncate·σ + 0.5)`` (scipy's rule)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


BLUR_BORDERS = ("reflect", "mirror")
"""Border rules of :class:`GaussianBlur`, in scipy.ndimage's names: ``reflect`` repeats the edge
pixel (``d c b a | a b c d | d c b a``, scipy's default, what ``gaussian_filter`` in the official
codes does); ``mirror`` does not (``d c b | a b c d | c b a``, torch's ``reflect`` padding)."""


class GaussianBlur(nn.Module):
    """Separable Gaussian smoothing of B×1×H×W maps with a static kernel, equal to
    ``scipy.ndimage.gaussian_filter(map, sigma, mode=border, truncate=4)`` on each map.

    Separable: a 33×33 2-D blur took ~40 % of a forward pass in a peer project. The kernel is a
    buffer computed once, so the layer exports with a static shape. The border is extended by
    gathering rows and columns (indices follow scipy's rule for any map size, also maps shorter
    than the kernel's radius).
    """

    kernel: Tensor  # buffer (register_buffer)

    def __init__(self, sigma: float, truncate: float = 4.0, border: str = "reflect") -> None:
        super().__init__()
        if border not in BLUR_BORDERS:
            raise ValueError(
                f"unknown blur border {border!r}: use one of {', '.join(BLUR_BORDERS)} "
                "(scorer.blur_border)"
            )
        self.sigma = sigma
        self.border = border
        kernel = gaussian_kernel1d(sigma, truncate) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, maps: Tensor) -> Tensor:
        if self.sigma <= 0:
            return maps
        radius = (self.kernel.numel() - 1) // 2
        k = self.kernel.to(maps.dtype)
        b, c, h, w = maps.shape
        # Channels folded into the batch: the kernel keeps a fixed shape (exports to ONNX).
        out = maps.reshape(b * c, 1, h, w)
        out = out.index_select(3, border_index(w, radius, self.border, maps.device))
        out = F.conv2d(out, k.view(1, 1, 1, -1))
        out = out.index_select(2, border_index(h, radius, self.border, maps.device))
        return F.conv2d(out, k.view(1, 1, -1, 1)).reshape(b, c, h, w)


def border_index(
    length: int, radius: int, border: str, device: torch.device | None = None
) -> Tensor:
    """Source index of each position of a signal of ``length`` extended by ``radius`` on both
    sides under scipy.ndimage's ``reflect`` or ``mirror`` rule (periodic, so any radius works)."""
    positions = torch.arange(-radius, length + radius, device=device)
    if length == 1:
        return torch.zeros_like(positions)
    if border == "reflect":  # period 2L: ... a | a b c d | d ...
        folded = positions.remainder(2 * length)
        return torch.where(folded < length, folded, 2 * length - 1 - folded)
    folded = positions.remainder(2 * length - 2)  # mirror, period 2L - 2: ... b | a b c d | c ...
    return torch.where(folded < length, folded, 2 * length - 2 - folded)
