"""AST against the official code (marco-rudolph/AST): backbone padding, foreground dilation,
map upsampling and image scores, the presets' switches.

The official computations are re-derived here from their description (scipy for the dilation,
efficientnet_pytorch's padding rule), never imported: the official code is not a dependency.
"""

import copy

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from conftest import compose_config
from timm.layers import Conv2dSame, StdConv2dSame
from timm.layers.pool2d_same import MaxPool2dSame

from stad.backbones import create_classifier
from stad.errors import StadError
from stad.methods import build_method
from stad.methods.ast import (
    AstScorer,
    BlockFeatures,
    binary_dilation,
    feature_extractor,
    foreground_weight,
    use_foreground,
)
from stad.static_padding import (
    StaticSameConv2d,
    StaticSamePool2d,
    _meta_copy,
    applied_padding,
    apply_static_padding,
    input_sizes,
    tf_same_padding,
    tf_same_table,
)

SMALL = ("method.flow.hidden=16", "method.student.hidden=16")
# The two stride-2 depthwise convolutions whose TF "same" padding differs between 456 and 768 px.
SHIFTED = ("blocks.3.0.conv_dw", "blocks.5.0.conv_dw")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny convolutions


@pytest.fixture(scope="module")
def b5_features():
    """EfficientNet-B5 up to blocks[5] (AST's tap), random weights (only shapes matter)."""
    model, _ = create_classifier("tf_efficientnet_b5", "random")
    return BlockFeatures(model, 5)


# -- 1. backbone padding ----------------------------------------------------------------------
def test_b5_tf_same_padding_at_456_and_768_differs_only_at_two_strided_convs(b5_features):
    # efficientnet_pytorch fixes each conv's pad from its input size at image_size 456 (the size
    # chain ⌈n/2⌉ of calculate_output_image_size): 456 → 228 → 114 → 57 → 29 → 15.
    sizes = input_sizes(b5_features, 456)
    firsts = ["stem.0", *(f"blocks.{i}.0.conv_dw" for i in range(6))]
    assert [sizes[n][0] for n in firsts] == [456, 228, 228, 114, 57, 29, 29]
    at_456, at_768 = tf_same_table(b5_features, 456), tf_same_table(b5_features, 768)
    assert at_456.keys() == at_768.keys() and len(at_456) == 37  # stem + 36 depthwise convs
    differ = {n: (at_456[n], at_768[n]) for n in at_456 if at_456[n] != at_768[n]}
    assert differ == {
        "blocks.3.0.conv_dw": ((1, 1, 1, 1), (0, 1, 0, 1)),
        "blocks.5.0.conv_dw": ((2, 2, 2, 2), (1, 2, 1, 2)),
    }


@pytest.mark.slow
def test_timm_b5_pads_dynamically_and_the_option_pads_as_at_456():
    model, _ = create_classifier("tf_efficientnet_b5", "random")
    features = BlockFeatures(model, 5)
    # The installed timm builds B5's five stride-2 convs as Conv2dSame (dynamic), the rest as
    # plain nn.Conv2d with symmetric padding.
    dynamic = [n for n, m in features.named_modules() if isinstance(m, Conv2dSame)]
    assert dynamic == ["stem.0", *(f"blocks.{i}.0.conv_dw" for i in (1, 2, 3, 5))]
    before = applied_padding(features, 768)
    assert [before[n] for n in SHIFTED] == [(0, 1, 0, 1), (1, 2, 1, 2)]
    assert before == {n: p for n, p in tf_same_table(features, 768).items() if any(p)}
    keys = list(features.state_dict())

    pads = apply_static_padding(features, 456)
    after = applied_padding(features, 768)
    assert [after[n] for n in SHIFTED] == [(1, 1, 1, 1), (2, 2, 2, 2)]
    assert {n: p for n, p in after.items() if p != before[n]} == {n: after[n] for n in SHIFTED}
    assert sorted(pads) == sorted(dynamic) and all(
        isinstance(features.get_submodule(n), StaticSameConv2d) for n in dynamic
    )
    # Same parameters under the same names, still frozen; same output shape at 768 (24×24).
    assert list(features.state_dict()) == keys
    assert not any(p.requires_grad for p in features.parameters())
    out = _meta_copy(features)(torch.zeros(1, 3, 768, 768, device="meta"))[0]
    assert out.shape == (1, 304, 24, 24)


def test_static_padding_for_the_inputs_own_size_reproduces_timms_dynamic_padding():
    model, _ = create_classifier("tf_efficientnet_lite0", "random")
    dynamic = BlockFeatures(model, 5).eval()
    static = copy.deepcopy(dynamic)
    apply_static_padding(static, 64)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(static(x)[0], dynamic(x)[0])
    # At another input size the pads stay those of 64 px (72 px: odd sizes from blocks[2] on,
    # where TF "same" padding changes).
    pads_64 = {n: p for n, p in tf_same_table(dynamic, 64).items() if any(p)}
    assert applied_padding(static, 72) == pads_64 != applied_padding(dynamic, 72)


def test_static_layers_pad_by_their_fixed_amounts_then_run_unpadded():
    conv = Conv2dSame(4, 6, 3, stride=2, bias=True)
    static = StaticSameConv2d(conv, (1, 1, 1, 1))
    x = torch.rand(1, 4, 10, 10)
    want = F.conv2d(F.pad(x, (1, 1, 1, 1)), conv.weight, conv.bias, stride=2)
    assert static.weight is conv.weight and torch.equal(static(x), want)
    pool = MaxPool2dSame(3, 2)
    x = torch.randn(1, 2, 9, 9)
    assert torch.equal(
        StaticSamePool2d(pool, tf_same_padding((9, 9), (3, 3), (2, 2), (1, 1)))(x), pool(x)
    )


def test_layers_that_pad_dynamically_in_other_ways_are_refused():
    with pytest.raises(StadError, match="StdConv2dSame"):
        apply_static_padding(torch.nn.Sequential(StdConv2dSame(3, 4, 3, stride=2)), 32)


@pytest.mark.slow
def test_the_ast_build_applies_the_option_and_keys_the_feature_cache_on_it(tiny_config):
    _, _, pads = feature_extractor("tf_efficientnet_b5", "random", 5, None, 456)
    assert [pads[n] for n in SHIFTED] == [(1, 1, 1, 1), (2, 2, 2, 2)]
    assert feature_extractor("tf_efficientnet_b5", "random", 5, None, None)[2] == {}
    cfg = tiny_config("method=ast", "backbone=tf_efficientnet_lite0", *SMALL)
    assert cfg.method.static_padding_size == 456
    method = build_method(cfg.method, cfg.backbone)
    assert method.info["static_padding"]["size"] == 456 and method.info["static_padding"]["pads"]
    dynamic = tiny_config(
        "method=ast", "backbone=tf_efficientnet_lite0", "method.static_padding_size=null", *SMALL
    )
    other = build_method(dynamic.method, dynamic.backbone)
    assert other.info["static_padding"]["pads"] == {}
    assert method.teacher.features.key != other.teacher.features.key


# -- 3. foreground dilation -------------------------------------------------------------------
@pytest.mark.parametrize("size", [8, 3, 4])
def test_dilation_of_a_single_pixel_matches_scipy_binary_dilation(size):
    # The code: utils.py dilation → scipy binary_dilation(mask, np.ones([8, 8])) at 192 px.
    for p in [(0, 0), (10, 10), (19, 5), (3, 19)]:
        mask = np.zeros((20, 20), bool)
        mask[p] = True
        want = scipy.ndimage.binary_dilation(mask, np.ones([size, size]))
        got = binary_dilation(torch.from_numpy(mask).float()[None, None], size)[0, 0].numpy()
        assert np.array_equal(got.astype(bool), want), (size, p)


def test_single_pixel_spreads_four_up_and_left_three_down_and_right():
    mask = torch.zeros(1, 1, 20, 20)
    mask[..., 10, 10] = 1
    rows = torch.nonzero(binary_dilation(mask, 8)[0, 0].any(1)).flatten()
    assert (rows.min().item(), rows.max().item()) == (6, 13)  # p−4 … p+3


def test_foreground_weight_is_the_codes_resize_dilate_downsample():
    g = torch.Generator().manual_seed(0)
    fg = (torch.rand(2, 1, 96, 96, generator=g) > 0.97).float()
    grid = (4, 4)
    # Code: fg at 8×grid by bilinear > 0 (utils.py downsampling(bin=True)), scipy 8×8 dilation,
    # bilinear (bin=False) to the grid.
    big = (F.interpolate(fg, size=(32, 32), mode="bilinear", align_corners=False) > 0).numpy()
    dilated = np.stack([scipy.ndimage.binary_dilation(m[0], np.ones([8, 8]))[None] for m in big])
    want = F.interpolate(torch.from_numpy(dilated).float(), size=grid, mode="bilinear")
    assert torch.equal(foreground_weight(fg, grid), want)


# -- 2. map and scores ------------------------------------------------------------------------
def _official_scores(z_t, z, weight):
    """The code's eval.py on the grid: st_loss (mean score), the ×8 bicubic st_pixel map, max."""
    per_pixel = torch.mean(weight * (z_t - z) ** 2, dim=1)  # get_st_loss(per_pixel=True)
    mean_st = per_pixel.mean(dim=(-1, -2))  # get_st_loss(per_sample=True)
    st_pixel = per_pixel * weight[:, 0]  # eval_mask
    up = torch.nn.Upsample(scale_factor=8, mode="bicubic", align_corners=False)
    st_pixel = up(st_pixel[:, None])[:, 0]
    return mean_st, st_pixel, st_pixel.flatten(1).amax(1)


def test_scorer_computes_the_codes_map_mean_and_max_scores():
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(2, 8, 4, 4, generator=g)
    z = z_t + 0.5 * torch.randn(2, 8, 4, 4, generator=g)
    batch = {"image": torch.zeros(2, 3, 128, 128), "foreground": torch.zeros(2, 1, 128, 128)}
    batch["foreground"][..., 20:90, 30:100] = 1
    weight = foreground_weight(batch["foreground"], (4, 4))
    assert ((weight > 0) & (weight < 1)).any()  # soft edges, where w² ≠ w matters
    mean_st, st_pixel, max_st = _official_scores(z_t, z, weight)
    for reduction, want in (("mean", mean_st), ("max", max_st)):
        maps, scores = AstScorer("student", reduction)([z_t, None, z_t], [z], batch)
        torch.testing.assert_close(scores, want)
        # The ×8 map (32 px) held at the 128-px input: every 4×4 block is one code pixel.
        assert maps.shape == (2, 1, 128, 128)
        torch.testing.assert_close(maps[:, 0, ::4, ::4], st_pixel)
        assert torch.equal(
            maps, maps[..., ::4, ::4].repeat_interleave(4, -2).repeat_interleave(4, -1)
        )


def test_scorer_without_a_factor_goes_straight_to_the_input_and_bilinear_is_a_switch():
    z_t = torch.randn(1, 8, 4, 4)
    z = torch.zeros(1, 8, 4, 4)
    batch = {"image": torch.zeros(1, 3, 64, 64)}
    grid = (z_t - z).pow(2).mean(1, keepdim=True)
    for mode in ("bicubic", "bilinear"):
        maps, _ = AstScorer("student", "max", upsample=mode, upsample_factor=None)(
            [z_t, None, z_t], [z], batch
        )
        want = F.interpolate(grid, size=(64, 64), mode=mode, align_corners=False)
        torch.testing.assert_close(maps, want)
    with pytest.raises(StadError, match="upsample"):
        AstScorer(upsample="nearest")


def test_foreground_mask_auto_is_off_for_rgb_as_the_code():
    assert use_foreground("auto", "rgb") is False
    assert use_foreground("auto", "depth") and use_foreground("auto", "rgbd")
    assert use_foreground(True, "rgb") and not use_foreground(False, "rgbd")
    with pytest.raises(StadError):
        use_foreground("sometimes", "rgb")


def test_rgb_input_ignores_the_foreground_in_loss_and_map(tiny_config):
    cfg = tiny_config("method=ast", "backbone=tf_efficientnet_lite0", "method.input=rgb", *SMALL)
    method = build_method(cfg.method, cfg.backbone).eval()
    batch = {
        "image": torch.rand(2, 3, 128, 128),
        "foreground": torch.zeros(2, 1, 128, 128),
        "path": ["a.png", "b.png"],
    }
    assert method.teacher.foreground(batch) is None and method.info["foreground_mask"] is False
    maps, _ = method(batch)
    assert maps.abs().sum() > 0  # an all-background mask would zero a masked map


# -- presets ----------------------------------------------------------------------------------
def test_ast_config_defaults_are_the_official_behaviour():
    m = compose_config(["method=ast", "dataset=mvtec"]).method
    assert m.static_padding_size == 456 and m.foreground_mask == "auto"
    assert m.loss_average == "all"  # utils.py: torch.mean of mask·loss over the whole grid
    sc = m.scorer
    switches = (sc.upsample, sc.upsample_factor, sc.score_source, sc.map_source, sc.mask)
    assert switches == ("bicubic", 8, "eval", "loss", True)
    # The code's factor: depth_len // map_len = (768 // 4) // (768 // 32).
    assert sc.upsample_factor == (768 // 4) // (768 // 32) and m.image_size == 768
    for name in ("ast_mvtec", "ast_mvtec3d_rgb", "ast_mvtec3d_depth", "ast_mvtec3d_rgbd"):
        cfg = compose_config([f"+experiment={name}"])
        assert cfg.eval_protocol.mask_rule == "bilinear_positive"
        assert cfg.eval_protocol.mask_downscale == 4  # the code's depth_len = img_len // 4
        assert cfg.method.static_padding_size == 456 and cfg.method.scorer.upsample == "bicubic"
