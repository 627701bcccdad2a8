"""The evaluation protocol's mask rules: stad's nearest rule and the official codes' rules,
each checked against the official pipeline it names (or a hand computation of it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stad.data.base import AnomalyDataset, Sample, mask_rule
from stad.data.images import DecodeCache, resize_mask_by_rule
from stad.errors import DatasetError


def _blob_mask(size: int = 90, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(4):
        y, x, r = rng.integers(5, size - 5), rng.integers(5, size - 5), rng.integers(2, 12)
        yy, xx = np.ogrid[:size, :size]
        mask[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 1
    return mask


def test_antialiased_half_equals_rd4ads_torchvision_pipeline():
    """RD4AD test.py: transforms.Resize((s, s)) + ToTensor on the PIL mask, then gt > 0.5."""
    from torchvision import transforms

    binary = _blob_mask()
    pipeline = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    official = (pipeline(Image.fromarray(binary * 255, mode="L"))[0] > 0.5).numpy()
    ours = resize_mask_by_rule(binary, (32, 32), "antialiased_half")
    np.testing.assert_array_equal(ours, official.astype(np.uint8))


def test_bilinear_nonzero_is_cv2_style_bilinear_without_antialiasing():
    """STFPM: cv2.resize(mask, (s, s)).astype(bool): half-pixel bilinear of the 2x2 nearest
    source pixels, any rounded non-zero value counts."""
    binary = np.zeros((4, 4), dtype=np.uint8)
    binary[1, 1] = 1  # output (0, 0) samples source (0.5, 0.5): weight 1/4 on pixel (1, 1)
    assert resize_mask_by_rule(binary, (2, 2), "bilinear_nonzero").tolist() == [[1, 0], [0, 0]]
    binary = np.zeros((8, 8), dtype=np.uint8)
    binary[0, 0] = 1  # output (0, 0) samples source (1.5, 1.5): pixel (0, 0) not among its 4
    assert resize_mask_by_rule(binary, (2, 2), "bilinear_nonzero").sum() == 0
    assert resize_mask_by_rule(binary, (2, 2), "nearest").sum() == 0


def test_rules_differ_on_region_borders_only():
    binary = _blob_mask()
    nearest = resize_mask_by_rule(binary, (32, 32), "nearest")
    for rule in ("antialiased_half", "bilinear_nonzero"):
        other = resize_mask_by_rule(binary, (32, 32), rule)
        assert set(np.unique(other)) <= {0, 1}
        assert 0 < np.abs(other.astype(int) - nearest).sum() < 0.5 * nearest.sum()
    assert (
        resize_mask_by_rule(binary, (32, 32), "bilinear_nonzero").sum()
        >= resize_mask_by_rule(binary, (32, 32), "antialiased_half").sum()
    )


def test_bilinear_positive_is_asts_interpolate_then_greater_than_zero():
    """AST utils.py: F.interpolate(mask, size, mode="bilinear", align_corners=False) on the 0/255
    float mask, then every value > 0 set to 1 (stricter than >= 0.5: any reach counts)."""
    import torch
    import torch.nn.functional as F

    binary = _blob_mask()
    source = torch.FloatTensor(binary.astype(np.float32) * 255)[None, None]
    down = F.interpolate(source, size=(32, 32), mode="bilinear", align_corners=False)
    down[down > 0] = 1
    ours = resize_mask_by_rule(binary, (32, 32), "bilinear_positive")
    np.testing.assert_array_equal(ours, down[0, 0].numpy().astype(np.uint8))
    # A single anomalous pixel reaches more pixels than under the ">= 0.5 of 255" rule.
    dot = np.zeros((90, 90), np.uint8)
    dot[45, 45] = 1
    positive = resize_mask_by_rule(dot, (92, 92), "bilinear_positive").sum()
    assert positive == 9 > resize_mask_by_rule(dot, (92, 92), "bilinear_nonzero").sum() == 5


def test_a_downscaled_rule_holds_the_coarse_mask_over_blocks_and_metrics_equal_the_grids():
    """AST evaluates maps and masks at input/4; stad holds both over 4×4 blocks at the input
    size, which leaves pixel AUROC and PRO exactly those on the 1/4 grid."""
    import torch

    from stad.metrics.functional import au_pro, binary_auroc

    binary = _blob_mask(size=96)
    coarse = resize_mask_by_rule(binary, (24, 24), "bilinear_positive")
    held = resize_mask_by_rule(binary, (96, 96), "bilinear_positive@4")
    np.testing.assert_array_equal(held, np.kron(coarse, np.ones((4, 4), np.uint8)))
    coarse_map = torch.rand(1, 24, 24, generator=torch.Generator().manual_seed(0))
    held_map = coarse_map.repeat_interleave(4, 1).repeat_interleave(4, 2)
    masks = torch.from_numpy(coarse)[None], torch.from_numpy(held)[None]
    auroc = [
        binary_auroc(m.flatten(), t.flatten())
        for m, t in zip((coarse_map, held_map), masks, strict=True)
    ]
    assert float(auroc[1]) == pytest.approx(float(auroc[0]), abs=1e-9)
    pro = [float(au_pro(m, t)) for m, t in zip((coarse_map, held_map), masks, strict=True)]
    assert pro[1] == pytest.approx(pro[0], abs=1e-6)
    with pytest.raises(DatasetError, match="mask_downscale=5 does not divide"):
        resize_mask_by_rule(binary, (96, 96), "nearest@5")
    with mask_rule("bilinear_positive", 4):
        pass
    with pytest.raises(DatasetError, match="mask_downscale"), mask_rule("nearest@x"):
        pass


def test_unknown_rule_names_the_setting():
    with pytest.raises(DatasetError, match=r"eval_protocol\.mask_rule"):
        resize_mask_by_rule(np.zeros((4, 4), np.uint8), (2, 2), "bicubic")
    with pytest.raises(DatasetError, match=r"eval_protocol\.mask_rule"), mask_rule("bicubic"):
        pass


def test_the_run_rule_reaches_datasets_and_their_cache_entries(tmp_path: Path):
    image = np.random.default_rng(1).integers(0, 256, (90, 90, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(_blob_mask() * 255, mode="L").save(tmp_path / "a_mask.png")
    samples = [Sample(tmp_path / "a.png", tmp_path / "a_mask.png", 1, "crack")]
    cache = DecodeCache(tmp_path / "cache")
    plain = AnomalyDataset(samples, 32, cache=cache)
    with mask_rule("bilinear_nonzero"):
        official = AnomalyDataset(samples, 32, cache=cache)
    assert (plain.mask_rule, official.mask_rule) == ("nearest", "bilinear_nonzero")
    assert cache.misses == 2  # one entry per rule, never the other rule's mask
    expected = resize_mask_by_rule(_blob_mask(), (32, 32), "bilinear_nonzero")
    np.testing.assert_array_equal(official[0]["mask"][0].numpy(), expected)
    assert not np.array_equal(plain[0]["mask"][0].numpy(), expected)
