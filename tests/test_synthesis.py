"""DRAEM-style anomaly synthesis: exact masks inside the foreground, the blend formula, every
texture source (a folder, the offline defaults), foreground rules against scipy, determinism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from stad.errors import DatasetError, StadError
from stad.synthesis import (
    AnomalySynthesizer,
    BatchTextures,
    ForegroundRule,
    build_synthesizer,
    foreground_mask,
    perlin_noise,
    texture_source,
)


def _images(n: int = 12, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images (continuous values: no fill equals them by chance)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")


RULES = {
    "all": ForegroundRule("all"),
    "disc": ForegroundRule("disc", extent=0.3),
    "box": ForegroundRule("box", extent=0.25),
    "threshold": ForegroundRule("threshold", level=120),
    "inverted": ForegroundRule("threshold", level=120, invert=True),
}


@pytest.mark.parametrize("source", ["skimage", "noise", "batch"])
@pytest.mark.parametrize("rule", list(RULES))
def test_corrupted_pixels_are_exactly_the_mask_and_inside_the_foreground(source, rule):
    images = _images()
    synth = AnomalySynthesizer(texture_source({"source": source}, 64), RULES[rule], seed=3)
    out = synth(images)
    mask = out.mask
    assert out.image.shape == images.shape and mask.shape == (12, 1, 64, 64)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    changed = (out.image != images).any(dim=1, keepdim=True)
    assert torch.equal(changed, mask > 0)  # corrupted exactly where the mask is, nowhere else
    assert not (mask.bool() & ~out.foreground.bool()).any()  # never outside the foreground
    assert torch.equal(out.foreground, foreground_mask(images, RULES[rule]))
    assert (mask.flatten(1).sum(1) > 0).sum() >= 6  # most images get an anomaly (80 %)
    assert out.image.min() >= 0 and out.image.max() <= 1


def test_blend_is_one_opacity_per_image_between_the_image_and_its_fill():
    images = _images(n=6)
    synth = AnomalySynthesizer(BatchTextures(), augmentations=0, clean_probability=0.0, seed=1)
    out = synth(images)
    # With the batch source and no augmentation the fill is a neighbour image, flipped.
    for i in range(6):
        inside = out.mask[i, 0] > 0
        assert inside.sum() > 4
        x, y = images[i][:, inside], out.image[i][:, inside]
        fills = [images[j].flip(-2)[:, inside] for j in range(6) if j != i]
        # y = (1 − β)·τ + β·x for a single β per image, for one of the neighbours τ.
        betas = [((y - t) / (x - t)).median() for t in fills]
        errors = [((1 - b) * t + b * x - y).abs().max() for b, t in zip(betas, fills, strict=True)]
        best = int(torch.stack(errors).argmin())
        assert errors[best] < 1e-5 and 0 <= betas[best] <= 0.8 + 1e-6


def test_folder_textures_fill_the_mask_with_the_folder_images(tmp_path):
    colours = {"red.png": (255, 0, 0), "sub/blue.jpg": (0, 0, 255)}
    for name, rgb in colours.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (40, 30), rgb).save(tmp_path / name, quality=100)
    (tmp_path / "notes.txt").write_text("not an image")
    cfg = {
        "texture": {"source": "folder", "root": str(tmp_path)},
        "augmentations": 0,
        "max_opacity": 0.0,  # β = 0: the fill replaces the pixel
        "clean_probability": 0.0,
    }
    synth = build_synthesizer(cfg, size=32, seed=0)
    assert synth.textures.describe()["images"] == 2
    images = _images(n=8, size=32)
    out = synth(images)
    inside = out.image.permute(0, 2, 3, 1)[out.mask[:, 0] > 0]
    assert len(inside) > 0
    red = torch.tensor([1.0, 0.0, 0.0])
    blue = torch.tensor([0.0, 0.0, 1.0])
    near = torch.minimum((inside - red).abs().amax(1), (inside - blue).abs().amax(1))
    assert near.max() < 0.02  # every corrupted pixel is one of the two textures


@pytest.mark.parametrize(
    ("order", "expected"), [("rgb", (1.0, 0.0, 0.0)), ("bgr", (0.0, 0.0, 1.0))]
)
def test_channel_order_bgr_blends_a_red_texture_as_blue(tmp_path, order, expected):
    # Official AAND: cv2.imread (BGR) texture blended into an RGB image: red enters as blue.
    Image.new("RGB", (24, 24), (255, 0, 0)).save(tmp_path / "red.png")
    cfg = {
        "texture": {"source": "folder", "root": str(tmp_path), "channel_order": order},
        "augmentations": 0,
        "max_opacity": 0.0,  # β = 0: the fill replaces the pixel (full opacity)
        "clean_probability": 0.0,
    }
    synth = build_synthesizer(cfg, size=32, seed=0)
    out = synth(_images(n=4, size=32))
    inside = out.image.permute(0, 2, 3, 1)[out.mask[:, 0] > 0]
    assert len(inside) > 0
    assert torch.allclose(inside, torch.tensor(expected).expand_as(inside), atol=1e-6)
    assert synth.describe()["textures"]["channel_order"] == order


def test_channel_order_is_checked_and_rgb_by_default():
    assert texture_source({"source": "skimage"}, 32).describe()["channel_order"] == "rgb"
    with pytest.raises(StadError, match="channel_order"):
        texture_source({"source": "skimage", "channel_order": "rbg"}, 32)


def test_a_missing_or_empty_texture_folder_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"does not exist.*source=skimage"):
        texture_source({"source": "folder", "root": str(tmp_path / "dtd")}, 32)
    with pytest.raises(DatasetError, match="holds no image"):
        texture_source({"source": "folder", "root": str(tmp_path)}, 32)
    with pytest.raises(DatasetError, match=r"texture\.root"):
        texture_source({"source": "folder", "root": None}, 32)
    with pytest.raises(StadError, match="unknown"):
        texture_source({"source": "dtd"}, 32)


def test_synthesis_is_deterministic_given_its_seed():
    images = _images(n=4)
    a = AnomalySynthesizer(texture_source({"source": "skimage"}, 64), seed=5)(images)
    b = AnomalySynthesizer(texture_source({"source": "skimage"}, 64), seed=5)(images)
    c = AnomalySynthesizer(texture_source({"source": "skimage"}, 64), seed=6)(images)
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)


def test_threshold_rule_matches_scipy_blur_and_threshold():
    rng = np.random.default_rng(0)
    image = np.full((96, 96, 3), 0.15)
    image[20:70, 30:80] = 0.8  # a bright object on a dark background
    image += rng.normal(0, 0.02, image.shape)
    rule = ForegroundRule("threshold", level=100, sigma=2.0 / 96)
    ours = foreground_mask(torch.from_numpy(image).permute(2, 0, 1)[None].float(), rule)[0, 0]
    grey = (image @ np.array([0.299, 0.587, 0.114])) * 255
    reference = ndimage.gaussian_filter(grey, sigma=2.0) > 100
    assert (ours.numpy().astype(bool) != reference).mean() < 0.002  # borders may differ
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    inverted = foreground_mask(tensor, replace(rule, invert=True))
    assert torch.equal(inverted[0, 0], 1 - ours)


def test_disc_rule_is_the_centred_disc():
    mask = foreground_mask(torch.zeros(2, 3, 40, 40), ForegroundRule("disc", extent=0.45))
    yy, xx = np.mgrid[:40, :40] - 19.5
    assert np.array_equal(mask[1, 0].numpy(), (yy**2 + xx**2 <= 18.0**2).astype(np.float32))


def test_perlin_noise_vanishes_on_the_lattice_and_stays_bounded():
    noise = perlin_noise((64, 96), (4, 8), torch.Generator().manual_seed(0))
    assert noise.shape == (64, 96)
    lattice = noise[::16, ::12]  # 64 / 4 rows and 96 / 8 columns per cell
    assert lattice.abs().max() < 1e-6
    assert noise.abs().max() <= 1.0 and noise.std() > 0.1


def test_foreground_rule_kinds_are_checked():
    with pytest.raises(StadError, match="unknown"):
        ForegroundRule("ellipse")
    with pytest.raises(StadError, match="foreground"):
        foreground_mask(torch.zeros(1, 3, 8, 8), ForegroundRule("batch"))
