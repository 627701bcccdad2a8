"""Reverse-distillation blocks: layouts read from timm, OCBE and de-ResNet structure and shapes,
the summed-level scorer, and the separable Gaussian blur against a 2-D convolution."""

import numpy as np
import pytest
import timm
import torch
from torch import nn

from stad.methods.common import GaussianBlur, cosine_distance, gaussian_kernel1d
from stad.methods.decoders import (
    GENERIC_LAYOUT,
    FusionBottleneck,
    MirroredDecoder,
    ResidualBlock,
    ResNetLayout,
    SummedLevelScorer,
    resnet_layout,
)
from stad.methods.rd import reverse_student

LEVELS = [1, 2, 3]


def _feature_sizes(name):
    with torch.device("meta"):
        info = timm.create_model(name, features_only=True, out_indices=LEVELS).feature_info
    return info.channels(), info.reduction()


def test_layouts_come_from_the_timm_architecture():
    assert resnet_layout("wide_resnet50_2.tv_in1k") == ResNetLayout("bottleneck", 2.0, (3, 4, 6, 3))
    assert resnet_layout("resnet50") == ResNetLayout("bottleneck", 1.0, (3, 4, 6, 3))
    assert resnet_layout("resnet18.tv_in1k") == ResNetLayout("basic", 1.0, (2, 2, 2, 2))
    assert resnet_layout("tf_efficientnet_lite0") == GENERIC_LAYOUT


def test_wide_resnet_ocbe_and_decoder_have_the_official_structure():
    channels, strides = _feature_sizes("wide_resnet50_2")
    assert channels == [256, 512, 1024] and strides == [4, 8, 16]
    with torch.device("meta"):
        student = reverse_student(channels, strides, resnet_layout("wide_resnet50_2"))
    ocbe, decoder = student.bottleneck, student.decoder
    # layer1: 256 → 512 → 1024 (two stride-2 blocks), layer2: 512 → 1024 (one).
    convs = [[s[0] for s in chain] for chain in ocbe.downsample]
    assert [[(c.in_channels, c.out_channels, c.stride) for c in ch] for ch in convs] == [
        [(256, 512, (2, 2)), (512, 1024, (2, 2))],
        [(512, 1024, (2, 2))],
    ]
    # 3 bottlenecks (width 1024), the first strided with a 1×1 shortcut 3072 → 2048.
    assert len(ocbe.embed) == 3
    shortcut = ocbe.embed[0].shortcut[0]
    assert (shortcut.in_channels, shortcut.out_channels, shortcut.kernel_size) == (
        3072,
        2048,
        (1, 1),
    )
    assert shortcut.stride == (2, 2) and ocbe.embed[0].body[3].stride == (2, 2)
    assert ocbe.embed[0].body[0].out_channels == 1024
    # de-WRN50-2: [3, 4, 6] blocks; first block of each stage upsamples with 2×2/2 transposed convs.
    assert [len(s) for s in decoder.stages] == [3, 4, 6]
    for stage, (c_out, width) in zip(
        decoder.stages, [(1024, 512), (512, 256), (256, 128)], strict=True
    ):
        first = stage[0]
        for up in (first.body[3], first.shortcut[0]):
            assert isinstance(up, nn.ConvTranspose2d)
            assert up.kernel_size == (2, 2) and up.stride == (2, 2)
        assert first.body[0].out_channels == width and first.body[6].out_channels == c_out
        assert all(isinstance(b.shortcut, nn.Identity) for b in stage[1:])


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("wide_resnet50_2", 256),
        ("resnet18", 256),
        ("tf_efficientnet_lite0", 256),
        ("resnet18", 100),
    ],
)
def test_every_decoder_level_matches_the_encoder_level(name, size):
    channels, strides = _feature_sizes(name)
    meta = name == "wide_resnet50_2"  # shapes only: no need to compute 80 M parameters
    with torch.device("meta" if meta else "cpu"):
        student = reverse_student(channels, strides, resnet_layout(name))
        targets = [
            torch.rand(2, c, -(-size // s), -(-size // s))
            for c, s in zip(channels, strides, strict=True)
        ]
        embedding = student.bottleneck(targets)
        preds = student(None, targets)
    half = -(-targets[-1].shape[-1] // 2)  # the OCBE's stride-2 block
    assert embedding.shape == (2, 2 * channels[-1], half, half)
    assert [p.shape for p in preds] == [t.shape for t in targets]


def test_fusion_without_stride_keeps_the_last_level_size():
    channels, strides = _feature_sizes("resnet18")
    dfe = FusionBottleneck(channels, strides, 256, GENERIC_LAYOUT, blocks=1, stride=1)
    feats = [torch.rand(1, c, 64 // s, 64 // s) for c, s in zip(channels, strides, strict=True)]
    assert dfe(feats).shape == (1, 256, 4, 4) and dfe.out_stride == 16
    decoder = MirroredDecoder(256, 16, channels, strides, GENERIC_LAYOUT, [2, 2, 2])
    assert [tuple(o.shape) for o in decoder(dfe(feats))] == [tuple(f.shape) for f in feats]


def test_residual_block_shapes_and_identity_shortcut():
    x = torch.rand(1, 8, 6, 6)
    assert ResidualBlock(8, 16, "bottleneck", 2.0, up=2)(x).shape == (1, 16, 12, 12)
    assert ResidualBlock(8, 4, "basic", down=2)(x).shape == (1, 4, 3, 3)
    same = ResidualBlock(8, 8, "basic")
    assert isinstance(same.shortcut, nn.Identity)


def test_summed_scorer_adds_levels_and_is_zero_for_a_perfect_student():
    t = [torch.randn(1, 8, 16, 16), torch.randn(1, 8, 8, 8)]
    batch = {"image": torch.zeros(1, 3, 32, 32)}
    scorer = SummedLevelScorer(cosine_distance, sigma=0)
    maps, scores = scorer(t, [x.clone() for x in t], batch)
    assert maps.shape == (1, 1, 32, 32) and maps.abs().max() < 1e-6
    s = [t[0].clone(), -t[1]]  # level 2 opposite: 1 − cos = 2 everywhere, level 1 adds 0
    maps, scores = scorer(t, s, batch)
    assert torch.allclose(maps, torch.full_like(maps, 2.0), atol=1e-5)
    assert torch.allclose(scores, maps.flatten(1).amax(1))


@pytest.mark.parametrize(("sigma", "size"), [(4.0, 64), (1.5, 21), (4.0, 12)])
@pytest.mark.parametrize("border", ["reflect", "mirror"])
def test_separable_blur_equals_scipy_gaussian_filter(sigma, size, border):
    """scipy.ndimage.gaussian_filter (the official codes' blur) with the same border rule, for
    maps longer and shorter than the kernel's radius (16 px at σ = 4)."""
    from scipy.ndimage import gaussian_filter

    maps = torch.rand(2, 1, size, size + 3, dtype=torch.float64)
    blurred = GaussianBlur(sigma, border=border)(maps)
    for out, source in zip(blurred, maps, strict=True):
        expected = gaussian_filter(source[0].numpy(), sigma=sigma, mode=border, truncate=4.0)
        np.testing.assert_allclose(out[0].numpy(), expected, rtol=0, atol=1e-7)  # float32 kernel
    k = gaussian_kernel1d(sigma).double()
    assert abs(float(k.sum()) - 1.0) < 1e-6
