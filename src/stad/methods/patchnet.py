"""Patch networks of Uninformed Students (Bergmann et al., CVPR 2020) and their dense evaluation.

A patch network maps one p×p patch to a d-dimensional descriptor with valid convolutions and
2×2 stride-2 max-pooling only (p ∈ {17, 33, 65}; the paper's supplementary tables). Evaluating it
on every p×p patch of an image one by one repeats almost all the work; the *dense* evaluation
gives the descriptor of every pixel in one pass. It is the multi-pooling / shift-and-stitch
transform (Bailer et al.) written as dilation ("à trous"): each stride-2 pooling becomes a
stride-1 pooling and every later layer is dilated by the product of the strides before it. Both
compute exactly the same numbers (each output pixel once per layer); dilation needs no
re-ordering of the multi-pooling branches.

Padding convention: the image is padded by (p − 1)/2 pixels on each side (reflection, or edge
replication for images too small to reflect), and the descriptor of pixel (i, j) is the patch
network applied to ``padded[i : i + p, j : j + p]``, i.e. the patch centred on the pixel. Where
a table's layers do not use the whole patch (floor pooling drops trailing rows: p = 65 sees the
top-left 60×60, p = 33 the top-left 32×32), the dense output reproduces that exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stad.errors import StadError


@dataclass(frozen=True)
class Conv:
    """A valid convolution; ``channels=None`` marks the descriptor layer (d channels)."""

    channels: int | None
    kernel: int


@dataclass(frozen=True)
class Pool:
    """A 2×2 max-pooling with stride 2 (floor: an odd trailing row or column is dropped)."""


Layer = Conv | Pool

# Paper, supplementary tables (patch size p → layers). p = 65 (Table 4) is not self-consistent;
# as METHODS.md rules: Conv3 outputs 256 channels (the pool after it lists 256) and Conv5 is 1×1
# (it acts on a 1×1 map). The tables' final 512-channel "Decode" layer belongs to pretraining
# (a decoder to the backbone's descriptor), not to the patch network.
LAYOUTS: dict[int, tuple[Layer, ...]] = {
    17: (Conv(128, 6), Conv(256, 5), Conv(256, 5), Conv(None, 4)),
    33: (Conv(128, 5), Pool(), Conv(256, 5), Pool(), Conv(256, 2), Conv(None, 4)),
    65: (
        Conv(128, 5),
        Pool(),
        Conv(128, 5),
        Pool(),
        Conv(256, 5),
        Pool(),
        Conv(256, 4),
        Conv(None, 1),
    ),
}


def effective_field(layout: Sequence[Layer]) -> int:
    """Side of the input window the layout's single output pixel actually depends on."""
    size = 1
    for layer in reversed(layout):
        size = size + layer.kernel - 1 if isinstance(layer, Conv) else 2 * size
    return size


class PatchNet(nn.Module):
    """One patch network: p×p patch → d-dimensional descriptor, evaluable densely.

    LeakyReLU (paper: slope 5e-3) follows every convolution, the descriptor layer included
    (the paper's tables); ``descriptor_activation=False`` leaves the descriptor linear.

    Args:
        patch_size: p, one of ``LAYOUTS`` (17, 33, 65).
        out_channels: d, the descriptor dimension (paper: 128).
        width: factor on the hidden channels (1 = paper; smaller for CPU budgets).
        slope: negative slope of the LeakyReLU.
        padding: ``reflect`` (default), ``replicate`` or ``zeros``, how the dense evaluation pads
            the image borders.
        descriptor_activation: LeakyReLU after the descriptor layer too (paper).
    """

    def __init__(
        self,
        patch_size: int,
        out_channels: int = 128,
        width: float = 1.0,
        slope: float = 5e-3,
        padding: str = "reflect",
        descriptor_activation: bool = True,
    ) -> None:
        super().__init__()
        if patch_size not in LAYOUTS:
            raise StadError(
                f"patch size {patch_size} has no layout; use one of {sorted(LAYOUTS)} "
                "(method.scales)"
            )
        if padding not in ("reflect", "replicate", "zeros"):
            raise StadError(f"padding {padding!r}: use reflect, replicate or zeros")
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.slope = slope
        self.padding = padding
        self.descriptor_activation = descriptor_activation
        self.layout = LAYOUTS[patch_size]
        self.field = effective_field(self.layout)
        convs, channels = [], 3
        for layer in self.layout:
            if isinstance(layer, Conv):
                out = (
                    out_channels
                    if layer.channels is None
                    else max(1, round(layer.channels * width))
                )
                convs.append(nn.Conv2d(channels, out, layer.kernel))
                channels = out
        self.convs = nn.ModuleList(convs)

    def forward(self, patches: Tensor) -> Tensor:
        """Descriptors of whole patches (the network as trained on crops).

        Args:
            patches: B×3×p×p.

        Returns:
            B×d descriptors.
        """
        out = self._run(patches, dense=False)
        if out.shape[-2:] != (1, 1):
            raise StadError(
                f"patch network p={self.patch_size} got {tuple(patches.shape[-2:])} inputs; "
                f"it takes {self.patch_size}×{self.patch_size} patches (use dense() for images)"
            )
        return out.flatten(1)

    def dense(self, images: Tensor, tile: int | None = None) -> Tensor:
        """The descriptor of every pixel, in one pass (or tile by tile to bound memory).

        Args:
            images: B×3×H×W.
            tile: side of the output tiles computed at once; None computes the whole image.
                Tiles are exact (valid convolutions on overlapping input windows).

        Returns:
            B×d×H×W; pixel (i, j) holds ``self(pad(images)[..., i:i+p, j:j+p])``.
        """
        h, w = images.shape[-2:]
        if tile is None or (tile >= h and tile >= w):
            return self.window(images, (0, 0), (h, w))
        padded = self.pad(images)
        rows = []
        for y in range(0, h, tile):
            cols = [
                self.window(images, (y, x), (min(tile, h - y), min(tile, w - x)), padded)
                for x in range(0, w, tile)
            ]
            rows.append(torch.cat(cols, dim=-1))
        return torch.cat(rows, dim=-2)

    def window(
        self,
        images: Tensor,
        top_left: tuple[int, int],
        size: tuple[int, int],
        padded: Tensor | None = None,
    ) -> Tensor:
        """Dense descriptors of a window of pixels (exact: its context comes from the image).

        Args:
            images: B×3×H×W.
            top_left: (y, x) of the window's first pixel.
            size: (height, width) of the window, inside the image.
            padded: ``self.pad(images)`` when the caller has it already.

        Returns:
            B×d×height×width, equal to ``dense(images)`` over the window.
        """
        padded = self.pad(images) if padded is None else padded
        (y, x), (th, tw) = top_left, size
        reach = self.field - 1  # rows/columns a valid dense pass loses
        return self._run(padded[..., y : y + th + reach, x : x + tw + reach], dense=True)

    @property
    def stride(self) -> int:
        """Output stride of the plain (strided-pooling) network: 2 per pooling layer."""
        return 2 ** sum(isinstance(layer, Pool) for layer in self.layout)

    def grid(self, images: Tensor, offset: tuple[int, int]) -> Tensor:
        """Descriptors of the pixels on a grid, the network run with its strided pooling (one
        branch of shift-and-stitch): far cheaper than :meth:`dense` when there is pooling.

        Args:
            images: B×3×H×W.
            offset: (oy, ox), each in [0, stride).

        Returns:
            B×d×h×w with h = ⌈(H − oy)/stride⌉; entry (a, b) equals ``dense(images)`` at pixel
            (oy + a·stride, ox + b·stride).
        """
        h, w = images.shape[-2:]
        s, (oy, ox) = self.stride, offset
        rows, cols = -(-(h - oy) // s), -(-(w - ox) // s)
        # The last grid pixel's patch must fit: the window spans (count − 1)·s + field pixels.
        window = self.pad(images)[
            ..., oy : oy + (rows - 1) * s + self.field, ox : ox + (cols - 1) * s + self.field
        ]
        return self._run(window, dense=False)

    def pad(self, images: Tensor) -> Tensor:
        """Pad B×3×H×W by (p − 1)/2 on each side with the network's padding mode."""
        half = (self.patch_size - 1) // 2
        if self.padding == "zeros":
            return F.pad(images, (half,) * 4)
        small = min(images.shape[-2:]) <= half
        mode = "replicate" if self.padding == "replicate" or small else "reflect"
        return F.pad(images, (half,) * 4, mode=mode)

    def _run(self, x: Tensor, dense: bool) -> Tensor:
        dilation, i = 1, 0
        activated = len(self.convs) if self.descriptor_activation else len(self.convs) - 1
        for layer in self.layout:
            if isinstance(layer, Pool):
                if dense:
                    x = F.max_pool2d(x, kernel_size=2, stride=1, dilation=dilation)
                    dilation *= 2
                else:
                    x = F.max_pool2d(x, kernel_size=2, stride=2)
                continue
            conv = cast(nn.Conv2d, self.convs[i])
            x = F.conv2d(x, conv.weight, conv.bias, dilation=dilation)
            if i < activated:
                x = F.leaky_relu(x, self.slope)
            i += 1
        return x
