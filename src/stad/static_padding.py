"""Static TensorFlow "same" padding for timm backbones: pad as if the input had a fixed size.

TF "same" padding of a strided convolution depends on the input size. timm's TF ports
(``tf_efficientnet_*``) compute it from each actual input (``Conv2dSame``); efficientnet_pytorch
(the EfficientNet of several official anomaly-detection codes) computes it once, when the model
is built, for the model's nominal image size (456 px for B5), and applies those amounts to any
input. At other input sizes the two disagree on some strided layers by one pixel on each side:
the same weights then see a feature grid shifted by half a pixel.

:func:`apply_static_padding` makes every dynamically "same"-padded layer of a module pad by the
amounts computed for a reference input size, as efficientnet_pytorch does; :func:`applied_padding`
reports what each padded layer actually pads for a given input size (to check either behaviour).
Stride-1 layers with odd kernels are unaffected: their "same" padding is symmetric at any size,
and timm builds them as plain ``nn.Conv2d``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.padding import pad_same_arg
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from torch import Tensor, nn

from stad.errors import StadError

Pad = tuple[int, int, int, int]  # (left, right, top, bottom), F.pad's order for the last 2 dims
DYNAMIC_CONVS = (Conv2dSame, Conv2dSameExport)
DYNAMIC_POOLS = (MaxPool2dSame, AvgPool2dSame)


def tf_same_padding(
    size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> Pad:
    """TF "same" padding of an input of ``size`` (h, w): total ``max((⌈n/s⌉−1)·s + d·(k−1) + 1 − n,
    0)`` per dimension, the odd pixel on the right / bottom."""
    totals = [
        max((math.ceil(n / s) - 1) * s + d * (k - 1) + 1 - n, 0)
        for n, k, s, d in zip(size, kernel, stride, dilation, strict=True)
    ]
    pad_h, pad_w = totals
    return (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


class StaticSameConv2d(nn.Conv2d):
    """A convolution that zero-pads its input by fixed amounts, then convolves unpadded.

    Built from a dynamic "same" convolution: it shares that layer's parameters (same names, so
    state dicts are unchanged) and keeps its stride, dilation and groups.
    """

    def __init__(self, conv: nn.Conv2d, pad: Pad) -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=0,
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            device="meta",  # placeholders only: the original parameters replace them below
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self.static_pad: Pad = tuple(int(p) for p in pad)  # type: ignore[assignment]
        self.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        """Pad by ``static_pad`` whatever the input size, then convolve without padding."""
        x = F.pad(x, self.static_pad)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, static_pad={self.static_pad}"


class StaticSamePool2d(nn.Module):
    """A max / average pooling that pads its input by fixed amounts (max: −inf, as timm's
    ``MaxPool2dSame``; average: zeros, counted, as timm's ``AvgPool2dSame``)."""

    def __init__(self, pool: nn.MaxPool2d | nn.AvgPool2d, pad: Pad) -> None:
        super().__init__()
        self.is_max = isinstance(pool, nn.MaxPool2d)
        self.kernel_size = _pair(pool.kernel_size)
        self.stride = _pair(pool.stride)
        self.ceil_mode = bool(pool.ceil_mode)
        self.dilation = _pair(cast(nn.MaxPool2d, pool).dilation) if self.is_max else (1, 1)
        self.count_include_pad = bool(getattr(pool, "count_include_pad", True))
        self.static_pad: Pad = tuple(int(p) for p in pad)  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        """Pad by ``static_pad``, then pool without padding."""
        if self.is_max:
            x = F.pad(x, self.static_pad, value=-float("inf"))
            return F.max_pool2d(x, self.kernel_size, self.stride, 0, self.dilation, self.ceil_mode)
        x = F.pad(x, self.static_pad)
        return F.avg_pool2d(
            x, self.kernel_size, self.stride, 0, self.ceil_mode, self.count_include_pad
        )


def is_dynamic_same(module: nn.Module) -> bool:
    """Whether ``module`` computes TF "same" padding from each input (timm's ``*Same`` layers)."""
    return isinstance(module, DYNAMIC_CONVS + DYNAMIC_POOLS)


def _unsupported_dynamic(module: nn.Module) -> bool:
    # Other timm layers that pad dynamically inside their own forward (weight-standardised
    # convolutions, CondConv): replacing them would lose what their forward does besides padding.
    name = type(module).__name__
    return not is_dynamic_same(module) and (
        name.endswith("Same") or bool(getattr(module, "dynamic_padding", False))
    )


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every parameter and buffer on the meta device (shapes only): a
    forward pass then computes sizes without arithmetic or copying weights."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def input_sizes(
    module: nn.Module, size: int | Sequence[int], in_channels: int = 3
) -> dict[str, tuple[int, int]]:
    """Spatial input size (h, w) of every conv / pool layer of ``module`` when it runs on one
    ``in_channels``×h×w input (a shape-only pass on a meta-device copy; nothing is computed)."""
    probe = _meta_copy(module).eval()
    sizes: dict[str, tuple[int, int]] = {}
    layers = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)

    def record(name: str, layer: nn.Module, args: tuple[Tensor, ...]) -> None:
        seen = cast(tuple[int, int], tuple(int(n) for n in args[0].shape[-2:]))
        if sizes.setdefault(name, seen) != seen:
            raise StadError(f"static padding: layer {name} runs on several input sizes")

    handles = [
        layer.register_forward_pre_hook(lambda layer, args, name=name: record(name, layer, args))
        for name, layer in probe.named_modules()
        if isinstance(layer, layers)
    ]
    try:
        h, w = _pair(size)
        with torch.no_grad():
            probe(torch.zeros(1, in_channels, h, w, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def _geometry(layer: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(kernel, stride, dilation) of a conv or pool layer."""
    dilation = getattr(layer, "dilation", 1)
    return (
        _pair(cast("int | Sequence[int]", layer.kernel_size)),
        _pair(cast("int | Sequence[int]", layer.stride)),
        _pair(dilation),
    )


def applied_padding(
    module: nn.Module, size: int | Sequence[int], in_channels: int = 3
) -> dict[str, Pad]:
    """What each padding conv / pool layer of ``module`` pads for an ``h×w`` input, as its own
    forward does: timm's dynamic layers by timm's ``pad_same_arg`` at their input size, static
    layers by their fixed amounts, plain layers by their symmetric ``padding``. Layers that pad
    nothing are left out."""
    sizes = input_sizes(module, size, in_channels)
    layers = dict(module.named_modules())
    pads: dict[str, Pad] = {}
    for name, seen in sizes.items():
        layer = layers[name]
        kernel, stride, dilation = _geometry(layer)
        if isinstance(layer, (StaticSameConv2d, StaticSamePool2d)):
            pad = layer.static_pad
        elif is_dynamic_same(layer):
            pad = cast(
                Pad, tuple(pad_same_arg(list(seen), list(kernel), list(stride), list(dilation)))
            )
        elif isinstance(layer.padding, str):  # nn.Conv2d(padding="same"): stride 1, symmetric
            pad = tf_same_padding(seen, kernel, stride, dilation)
        else:
            ph, pw = _pair(layer.padding)
            pad = (pw, pw, ph, ph)
        if any(pad):
            pads[name] = pad
    return pads


def tf_same_table(
    module: nn.Module, size: int | Sequence[int], in_channels: int = 3
) -> dict[str, Pad]:
    """TF "same" padding each conv / pool layer with a kernel larger than 1 would have for an
    ``h×w`` input of ``module`` (what efficientnet_pytorch fixes at build time for that size)."""
    sizes = input_sizes(module, size, in_channels)
    layers = dict(module.named_modules())
    table: dict[str, Pad] = {}
    for name, seen in sizes.items():
        kernel, stride, dilation = _geometry(layers[name])
        if max(kernel) > 1:
            table[name] = tf_same_padding(seen, kernel, stride, dilation)
    return table


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def apply_static_padding(
    module: nn.Module, size: int | Sequence[int], in_channels: int = 3
) -> dict[str, Pad]:
    """Make every dynamically TF-"same"-padded layer of ``module`` pad statically, by the amounts
    TF "same" padding gives when ``module`` runs on a ``size`` input (efficientnet_pytorch's
    ``Conv2dStaticSamePadding`` rule), whatever input then comes.

    Layers are replaced in place by :class:`StaticSameConv2d` / :class:`StaticSamePool2d`, which
    share the original parameters (state-dict keys unchanged). Layers the forward pass never
    reaches are left as they are.

    Returns:
        The static pads (left, right, top, bottom) by layer name.

    Raises:
        StadError: a dynamically padded layer of a kind this cannot reproduce (e.g. timm's
            ``StdConv2dSame``), or a layer run on several input sizes.
    """
    unsupported = [n for n, m in module.named_modules() if _unsupported_dynamic(m)]
    if unsupported:
        raise StadError(
            f"static padding: cannot make {', '.join(unsupported[:3])} pad statically (timm "
            f"{type(module.get_submodule(unsupported[0])).__name__}); set the static padding "
            "size to null (timm's dynamic padding) for this backbone"
        )
    sizes = input_sizes(module, size, in_channels)
    layers = dict(module.named_modules())
    pads: dict[str, Pad] = {}
    for name, seen in sizes.items():
        layer = layers[name]
        if not is_dynamic_same(layer):
            continue
        pad = tf_same_padding(seen, *_geometry(layer))
        static: nn.Module
        if isinstance(layer, nn.Conv2d):
            static = StaticSameConv2d(layer, pad)
        else:
            static = StaticSamePool2d(layer, pad)
        _replace(module, name, static)
        pads[name] = pad
    return pads
