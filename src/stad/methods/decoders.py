"""Reverse-distillation building blocks shared by RD, DSKD (and AAND's student).

- ``ResNetLayout``: which residual block a mirrored decoder uses, read from the teacher's timm
  architecture (ResNets: their own block type, width and stage lengths; any other backbone: the
  de-ResNet-18 layout).
- ``FusionBottleneck``: multi-scale fusion of the encoder's levels followed by residual blocks
  (RD's one-class bottleneck embedding, OCBE; DSKD's deep feature embedding, DFE).
- ``MirroredDecoder``: a "de-ResNet" that upsamples back to the size and channels of every encoder
  level, deepest first.
- ``SummedLevelScorer``: per-level distance maps resized to the input, summed, blurred, reduced.

Every size comes from the teacher extractor's ``channels``/``strides`` (timm ``feature_info``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor, nn

from stad.core import Batch, Features, Scorer
from stad.errors import StadError
from stad.methods.common import GaussianBlur, reduce_map, resize

BASIC = "basic"
BOTTLENECK = "bottleneck"
_EXPANSION = {BASIC: 1, BOTTLENECK: 4}


# -- layout -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResNetLayout:
    """How the residual blocks of a bottleneck/decoder mirror the teacher.

    Attributes:
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50, Wide-ResNet-50-2 ...).
        width_ratio: bottleneck width / (output channels / 4): 2 for Wide-ResNets, else 1.
        stage_blocks: blocks of the encoder's stages layer1..layer4 ([3, 4, 6, 3] for WRN50-2).
    """

    block: str
    width_ratio: float
    stage_blocks: tuple[int, ...]


# Used for backbones that are not timm ResNets: de-ResNet-18's small BasicBlock layout.
GENERIC_LAYOUT = ResNetLayout(BASIC, 1.0, (2, 2, 2, 2))


def resnet_layout(name: str) -> ResNetLayout:
    """The layout of timm backbone ``name`` (built on the meta device, no weights read).

    Args:
        name: timm model name, optionally with a pretrained tag.

    Returns:
        The ResNet's own block type, width ratio and stage lengths; ``GENERIC_LAYOUT`` for any
        other architecture.
    """
    arch, _ = timm.models.split_model_name_tag(name)
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    if not isinstance(model, ResNet):
        return GENERIC_LAYOUT
    stages = cast(list[nn.Sequential], [model.layer1, model.layer2, model.layer3, model.layer4])
    first = stages[0][0]
    if isinstance(first, Bottleneck):
        width_ratio = first.conv1.out_channels / (first.conv3.out_channels / 4)
        return ResNetLayout(BOTTLENECK, width_ratio, tuple(len(s) for s in stages))
    if isinstance(first, BasicBlock):
        return ResNetLayout(BASIC, 1.0, tuple(len(s) for s in stages))
    return GENERIC_LAYOUT


# -- residual blocks --------------------------------------------------------------------------
def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3×3 convolution (padding 1, no bias) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _resample(in_channels: int, out_channels: int, down: int, up: int, kernel: int) -> nn.Module:
    """A convolution that downsamples (strided), upsamples (up×up transposed, stride up) or keeps
    the size (``kernel``×``kernel``, same padding)."""
    if up > 1:
        return nn.ConvTranspose2d(in_channels, out_channels, up, up, bias=False)
    return nn.Conv2d(in_channels, out_channels, kernel, down, kernel // 2, bias=False)


class ResidualBlock(nn.Module):
    """A ResNet BasicBlock or Bottleneck that may downsample, upsample or change width.

    Downsampling puts the stride on the 3×3 convolution (torchvision's ResNet v1.5); upsampling
    replaces it by an ``up``×``up`` transposed convolution with stride ``up`` (RD's de-ResNet).
    The shortcut is the identity when the shape is kept, else a 1×1 strided convolution
    (downsampling, width change) or the same transposed convolution (upsampling), + BatchNorm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block: str = BASIC,
        width_ratio: float = 1.0,
        down: int = 1,
        up: int = 1,
    ) -> None:
        super().__init__()
        if block == BASIC:
            self.body = nn.Sequential(
                _resample(in_channels, out_channels, down, up, 3),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        elif block == BOTTLENECK:
            width = max(1, int(out_channels // _EXPANSION[BOTTLENECK] * width_ratio))
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                _resample(width, width, down, up, 3),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            raise StadError(f"unknown residual block {block!r}: use '{BASIC}' or '{BOTTLENECK}'")
        self.shortcut: nn.Module = nn.Identity()
        if down > 1 or up > 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                _resample(in_channels, out_channels, down, up, 1), nn.BatchNorm2d(out_channels)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """B×C_in×h×w → B×C_out×(h·up/down)×(w·up/down)."""
        return self.relu(self.body(x) + self.shortcut(x))


def residual_stage(
    in_channels: int,
    out_channels: int,
    blocks: int,
    layout: ResNetLayout,
    down: int = 1,
    up: int = 1,
) -> nn.Sequential:
    """``blocks`` residual blocks; only the first resamples or changes width (as in ResNets)."""
    first = ResidualBlock(in_channels, out_channels, layout.block, layout.width_ratio, down, up)
    rest = [
        ResidualBlock(out_channels, out_channels, layout.block, layout.width_ratio)
        for _ in range(blocks - 1)
    ]
    return nn.Sequential(first, *rest)


def init_like_torchvision(module: nn.Module) -> None:
    """Kaiming-normal (fan-out) convolutions and unit BatchNorm, as torchvision's ResNet (and
    RD's code, whose transposed convolutions keep PyTorch's default init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _octaves(ratio: float, what: str) -> int:
    n = round(math.log2(ratio)) if ratio >= 1 else -1
    if n < 0 or 2**n != ratio:
        raise StadError(
            f"{what}: feature strides must differ by powers of two, got a ratio of {ratio}; "
            "choose other method.layers"
        )
    return n


# -- fusion bottleneck ------------------------------------------------------------------------
class FusionBottleneck(nn.Module):
    """Multi-scale fusion, then residual embedding blocks (RD's OCBE, DSKD's DFE).

    Each level but the last goes through 3×3 stride-2 conv+BN+ReLU blocks down to the last
    level's size; each block maps to the channels of the level at the stride it reaches (the last
    level's where no level has that stride). The results and the last level are concatenated
    and pass ``blocks`` residual blocks, the first with stride ``stride`` and a 1×1 shortcut.
    """

    def __init__(
        self,
        channels: Sequence[int],
        strides: Sequence[int],
        out_channels: int,
        layout: ResNetLayout,
        blocks: int,
        stride: int = 2,
    ) -> None:
        """Build the fusion blocks and the embedding stage.

        Args:
            channels: channels of the encoder levels (shallow first).
            strides: their strides.
            out_channels: channels of the embedding.
            layout: residual block type and width.
            blocks: number of residual blocks.
            stride: stride of the first residual block (RD: 2; DSKD: 1).
        """
        super().__init__()
        by_stride = dict(zip(strides, channels, strict=True))
        self.downsample = nn.ModuleList()
        for c, s in zip(channels[:-1], strides[:-1], strict=True):
            steps, current = [], c
            for k in range(1, _octaves(strides[-1] / s, "fusion bottleneck") + 1):
                target = by_stride.get(s * 2**k, channels[-1])
                steps.append(conv_bn_relu(current, target, stride=2))
                current = target
            self.downsample.append(nn.Sequential(*steps))
        fused = channels[-1] * len(channels)
        self.embed = residual_stage(fused, out_channels, blocks, layout, down=stride)
        self.out_channels = out_channels
        self.out_stride = strides[-1] * stride
        init_like_torchvision(self)

    def forward(self, features: Features) -> Tensor:
        """Levels B×C_i×h_i×w_i (shallow first) → B×out_channels×(h_L/stride)×(w_L/stride)."""
        last = features[-1]
        fused = [
            resize_features(down(f), last.shape[-2:])
            for down, f in zip(self.downsample, features[:-1], strict=True)
        ]
        return self.embed(torch.cat([*fused, last], dim=1))


def resize_features(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of feature maps, only where odd input sizes made them differ by a pixel."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# -- mirrored decoder -------------------------------------------------------------------------
class MirroredDecoder(nn.Module):
    """A "de-ResNet": one residual stage per encoder level, deepest level first.

    Stage k builds level L−1−k: its first block upsamples by (current stride / level stride)
    with transposed convolutions (main path and shortcut) and maps to the level's channels.
    With RD's layout on Wide-ResNet-50-2 this is de-WRN50-2: [3, 4, 6] bottleneck blocks giving
    1024×16², 512×32², 256×64² for a 256² input.
    """

    def __init__(
        self,
        in_channels: int,
        in_stride: int,
        channels: Sequence[int],
        strides: Sequence[int],
        layout: ResNetLayout,
        stage_blocks: Sequence[int],
    ) -> None:
        """Build one upsampling stage per encoder level.

        Args:
            in_channels: channels of the embedding fed to the decoder.
            in_stride: its stride.
            channels: channels of the encoder levels to rebuild (shallow first).
            strides: their strides.
            layout: residual block type and width.
            stage_blocks: blocks of each decoder stage, in decoder order (deepest level first).
        """
        super().__init__()
        if len(stage_blocks) < len(channels):
            raise StadError(
                f"decoder: {len(channels)} levels need {len(channels)} stage lengths, got "
                f"{list(stage_blocks)}"
            )
        self.stages = nn.ModuleList()
        current_c, current_s = in_channels, in_stride
        for k, level in enumerate(reversed(range(len(channels)))):
            up = 2 ** _octaves(current_s / strides[level], "decoder")
            stage = residual_stage(current_c, channels[level], stage_blocks[k], layout, up=up)
            self.stages.append(stage)
            current_c, current_s = channels[level], strides[level]
        init_like_torchvision(self)

    def forward(self, x: Tensor, sizes: Sequence[Sequence[int]] | None = None) -> Features:
        """Embedding B×C×h×w → one map per encoder level, shallow first (the encoder's order).

        Args:
            x: the embedding.
            sizes: the encoder levels' (h, w), shallow first; outputs are resized to them where
                inputs not divisible by the deepest stride made them differ by a pixel.
        """
        outs = []
        for k, stage in enumerate(self.stages):
            x = stage(x)
            if sizes is not None:
                x = resize_features(x, sizes[len(sizes) - 1 - k])
            outs.append(x)
        return outs[::-1]


# -- scorer -----------------------------------------------------------------------------------
LevelDistance = Callable[[Tensor, Tensor], Tensor]


class SummedLevelScorer(Scorer):
    """Σ_levels of per-position distance maps resized to the input, Gaussian-blurred, reduced."""

    def __init__(
        self,
        distance: LevelDistance,
        sigma: float = 4.0,
        reduction: str = "max",
        align_corners: bool = False,
        blur_border: str = "reflect",
    ) -> None:
        """Set the level distance, the map resampling, the blur and the image-score reduction.

        Args:
            distance: ``(t, s) -> B×1×h×w`` per level (e.g. ``common.cosine_distance``).
            sigma: Gaussian σ in pixels of the input (0: no blur).
            reduction: image score from the map (``common.reduce_map``).
            align_corners: bilinear upsampling of the level maps (``common.resize``).
            blur_border: the blur's border rule (``common.BLUR_BORDERS``).
        """
        super().__init__()
        self.distance = distance
        self.blur = GaussianBlur(sigma, border=blur_border)
        self.reduction = reduction
        self.align_corners = align_corners

    @classmethod
    def from_config(cls, distance: LevelDistance, cfg: Any) -> SummedLevelScorer:
        """From a method's ``scorer`` block: ``sigma``, ``reduction``, ``align_corners``,
        ``blur_border`` (runs saved before the last two existed resample as they did then:
        half-pixel centres, ``mirror`` border)."""
        return cls(
            distance,
            float(cfg.sigma),
            str(cfg.reduction),
            align_corners=bool(cfg.get("align_corners", False)),
            blur_border=str(cfg.get("blur_border", "mirror")),
        )

    def anomaly_map(self, targets: Features, preds: Features, size: Sequence[int]) -> Tensor:
        """B×1×H×W summed (not multiplied) level maps at ``size``, blurred."""
        levels = [
            resize(self.distance(t.float(), s.float()), size, self.align_corners)
            for t, s in zip(targets, preds, strict=True)
        ]
        return self.blur(torch.stack(levels).sum(dim=0))

    def forward(self, targets: Features, preds: Features, batch: Batch) -> tuple[Tensor, Tensor]:
        maps = self.anomaly_map(targets, preds, batch["image"].shape[-2:])
        return maps, reduce_map(maps, self.reduction)
