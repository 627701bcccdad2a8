"""Patch networks of Uninformed Students: the paper's layouts, and dense / tiled / windowed /
grid evaluation against the patch network applied to each pixel's own p×p patch.

Padding convention under test: the image is padded by (p − 1)/2 on each side (reflection) and
pixel (i, j) gets the descriptor of ``padded[i : i + p, j : j + p]``.
"""

import pytest
import torch

from stad.errors import StadError
from stad.methods.patchnet import PatchNet

SCALES = (17, 33, 65)


def small_net(p: int) -> PatchNet:
    torch.manual_seed(p)
    return PatchNet(p, out_channels=8, width=0.0625).double()


def patchwise(net: PatchNet, images: torch.Tensor) -> torch.Tensor:
    """The reference: the patch network on every pixel's p×p patch, one by one."""
    p = net.patch_size
    padded = net.pad(images)
    b, _, h, w = images.shape
    patches = torch.stack(
        [padded[:, :, i : i + p, j : j + p] for i in range(h) for j in range(w)], dim=1
    ).flatten(0, 1)
    return net(patches).view(b, h, w, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("p", SCALES)
def test_dense_evaluation_equals_the_patch_network_on_every_pixels_patch(p):
    net = small_net(p)
    images = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    dense = net.dense(images)
    assert dense.shape == (2, 8, 9, 11)
    torch.testing.assert_close(dense, patchwise(net, images), rtol=0, atol=1e-10)


@pytest.mark.parametrize("p", SCALES)
def test_tiles_windows_and_grids_are_exact_parts_of_the_dense_map(p):
    net = small_net(p)
    images = torch.rand(1, 3, 21, 18, dtype=torch.float64)
    dense = net.dense(images)
    torch.testing.assert_close(net.dense(images, tile=8), dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(net.window(images, (3, 5), (7, 4)), dense[..., 3:10, 5:9])
    s = net.stride
    for oy, ox in [(0, 0), (s - 1, 0), (s // 2, s - 1)]:
        torch.testing.assert_close(net.grid(images, (oy, ox)), dense[..., oy::s, ox::s])


def test_layouts_follow_the_papers_tables():
    # p: (conv weight shapes at width 1, effective field, output stride). p = 65: Table 4 with
    # Conv3 → 256 channels and Conv5 1×1; floor pooling leaves the last rows of 33 and 65 unused.
    expected = {
        17: ([(128, 3, 6, 6), (256, 128, 5, 5), (256, 256, 5, 5), (128, 256, 4, 4)], 17, 1),
        33: ([(128, 3, 5, 5), (256, 128, 5, 5), (256, 256, 2, 2), (128, 256, 4, 4)], 32, 4),
        65: (
            [
                (128, 3, 5, 5),
                (128, 128, 5, 5),
                (256, 128, 5, 5),
                (256, 256, 4, 4),
                (128, 256, 1, 1),
            ],
            60,
            8,
        ),
    }
    for p, (shapes, field, stride) in expected.items():
        with torch.device("meta"):
            net = PatchNet(p)
        assert [tuple(c.weight.shape) for c in net.convs] == shapes
        assert (net.field, net.stride) == (field, stride)
    net = PatchNet(65, width=0.25)
    assert net(torch.rand(3, 3, 65, 65)).shape == (3, 128)


@pytest.mark.parametrize("descriptor_activation", [True, False])
def test_leaky_relu_follows_every_convolution_the_descriptor_layer_as_the_paper(
    descriptor_activation,
):
    # Paper: LeakyReLU after every convolution; the switch leaves the descriptor layer linear.
    net = PatchNet(
        17, out_channels=4, width=0.0625, slope=0.5, descriptor_activation=descriptor_activation
    ).double()
    x = torch.rand(1, 3, 17, 17, dtype=torch.float64)
    h = x
    for i, conv in enumerate(net.convs):
        h = conv(h)
        if descriptor_activation or i < len(net.convs) - 1:
            h = torch.where(h > 0, h, 0.5 * h)
    torch.testing.assert_close(net(x), h.flatten(1))


def test_wrong_patch_sizes_and_settings_fail_clearly():
    with pytest.raises(StadError, match="patch size 31"):
        PatchNet(31)
    with pytest.raises(StadError, match="padding"):
        PatchNet(17, padding="circular")
    with pytest.raises(StadError, match="17×17 patches"):
        PatchNet(17, width=0.0625)(torch.rand(1, 3, 20, 20))
