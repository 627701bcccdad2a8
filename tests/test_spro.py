"""sPRO against a direct per-region computation, its saturation rules and its config parsing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stad.errors import DatasetError, StadError
from stad.metrics import SPRO
from stad.metrics.functional import au_pro
from stad.metrics.spro import DefectConfig, Region, load_defects_config, saturated_weights

SIZE = 12
RELATIVE = DefectConfig("missing", 255, 0.6, True)
ABSOLUTE = DefectConfig("extra", 245, 7.0, False)
FULL = DefectConfig("full", 250, 1.0, True)


def _box(top: int, left: int, h: int, w: int, size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + h, left : left + w] = True
    return mask


def _reference(maps, regions, limit):
    """AU-sPRO straight from the definition: every distinct score is a threshold.

    Args:
        maps: list of (H, W) float64 arrays.
        regions: list (per image) of lists of (mask, saturation area).
        limit: FPR integration limit.
    """
    normal = np.concatenate(
        [
            m[~np.logical_or.reduce([r for r, _ in rs] + [np.zeros_like(m, bool)])]
            for m, rs in zip(maps, regions, strict=True)
        ]
    )
    flat = [(m[r], s) for m, rs in zip(maps, regions, strict=True) for r, s in rs]
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    xs, ys = [0.0], [0.0]
    for t in thresholds:
        xs.append(np.mean(normal >= t))
        ys.append(np.mean([min(np.sum(v >= t) / s, 1.0) for v, s in flat]))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for i in range(1, len(xs)):
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def _batch(maps, defects, paths, masks):
    return {
        "mask": torch.from_numpy(np.stack(masks)).float().unsqueeze(1),
        "label": torch.tensor([0 if d == "good" else 1 for d in defects]),
        "path": list(paths),
        "defect": list(defects),
    }, torch.from_numpy(np.stack(maps)).unsqueeze(1)


@pytest.fixture(scope="module")
def scene():
    """3 good, 2 logical and 2 structural images with overlapping channels; scores with ties."""
    rng = np.random.default_rng(0)
    defects = ["good"] * 3 + ["logical_anomalies"] * 2 + ["structural_anomalies"] * 2
    channel_sets = [
        [],
        [],
        [],
        [(_box(1, 1, 4, 5), RELATIVE), (_box(3, 3, 4, 4), ABSOLUTE)],
        [(_box(6, 2, 3, 7), FULL)],
        [(_box(0, 6, 5, 5), ABSOLUTE)],
        [(_box(7, 7, 4, 4), RELATIVE), (_box(1, 1, 2, 2), ABSOLUTE)],
    ]
    maps, masks, regions, paths = [], [], {}, []
    for i, channels in enumerate(channel_sets):
        union = np.logical_or.reduce([m for m, _ in channels] + [np.zeros((SIZE, SIZE), bool)])
        score = rng.normal(0, 1, (SIZE, SIZE)) + 1.5 * union
        maps.append(np.round(score, 1).astype(np.float64))  # rounding makes ties
        masks.append(union)
        paths.append(f"/data/{i}.png")
        if channels:
            regions[paths[-1]] = [Region(m, d) for m, d in channels]
    return maps, masks, regions, paths, defects


def _official_saturation(mask: np.ndarray, defect: DefectConfig) -> float:
    """MVTec's rule: int(threshold * area) when relative, else min(threshold, area)."""
    area = int(mask.sum())
    if defect.relative_saturation:
        return float(int(defect.saturation_threshold * area))
    return float(min(defect.saturation_threshold, area))


def _expected(scene, group: str, limit: float) -> float:
    maps, _, regions, paths, defects = scene
    keep = [i for i, d in enumerate(defects) if d in ("good", group)]
    per_image = [
        [(r.mask, _official_saturation(r.mask, r.defect)) for r in regions.get(paths[i], [])]
        for i in keep
    ]
    return _reference([maps[i] for i in keep], per_image, limit)


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_exact_mode_equals_the_direct_computation(scene, limit) -> None:
    maps, masks, regions, paths, defects = scene
    metric = SPRO(regions, fpr_limit=limit, mode="exact")
    for lo, hi in ((0, 4), (4, 7)):  # two batches
        batch, preds = _batch(maps[lo:hi], defects[lo:hi], paths[lo:hi], masks[lo:hi])
        metric.update(preds, torch.zeros(hi - lo), batch)
    values = metric.compute()
    logical = _expected(scene, "logical_anomalies", limit)
    structural = _expected(scene, "structural_anomalies", limit)
    assert 0.0 < logical < 1.0 and 0.0 < structural < 1.0
    np.testing.assert_allclose(float(values["logical"]), logical, atol=1e-12)
    np.testing.assert_allclose(float(values["structural"]), structural, atol=1e-12)
    np.testing.assert_allclose(float(values[""]), (logical + structural) / 2, atol=1e-12)
    assert float(metric.error_bound()) == 0.0


def test_binned_mode_is_within_its_bound(scene) -> None:
    maps, masks, regions, paths, defects = scene
    binned, exact = SPRO(regions, fpr_limit=0.3), SPRO(regions, fpr_limit=0.3, mode="exact")
    noisy = [m + np.random.default_rng(1).normal(0, 1e-3, m.shape) for m in maps]
    batch, preds = _batch(noisy, defects, paths, masks)
    for metric in (binned, exact):
        metric.update(preds, torch.zeros(len(maps)), batch)
    b, e, bound = binned.compute(), exact.compute(), float(binned.error_bound())
    for key in ("", "logical", "structural"):
        assert abs(float(b[key]) - float(e[key])) <= bound + 1e-12
    assert bound < 0.01


def test_saturation_one_is_pro_over_channels() -> None:
    """With relative threshold 1.0 every region needs all its pixels: sPRO is PRO."""
    rng = np.random.default_rng(3)
    mask = _box(2, 2, 4, 6)
    maps = [rng.random((SIZE, SIZE)) + mask, rng.random((SIZE, SIZE))]
    regions = {"/a.png": [Region(mask, FULL)]}
    batch, preds = _batch(
        maps, ["logical_anomalies", "good"], ["/a.png", "/b.png"], [mask, np.zeros_like(mask)]
    )
    metric = SPRO(regions, fpr_limit=0.3, mode="exact")
    metric.update(preds, torch.zeros(2), batch)
    expected = au_pro(preds[:, 0], batch["mask"][:, 0] > 0, fpr_limit=0.3)
    with pytest.warns(UserWarning, match=r"no structural_anomalies"):
        value = metric.compute()["logical"]
    np.testing.assert_allclose(float(value), float(expected), atol=1e-12)


def test_a_region_found_up_to_its_saturation_area_counts_fully() -> None:
    """A quarter of a 16-pixel region found with relative threshold 0.25 scores 1; with 1.0 it
    scores like PRO; with an absolute threshold of 3 pixels, 2 found pixels score 2/3."""
    mask = _box(0, 0, 4, 4)
    score = np.zeros((SIZE, SIZE))
    score[0, :2] = 1.0
    score[1, :2] = 1.0  # 4 of the 16 region pixels score 1, everything else 0
    quarter = DefectConfig("q", 1, 0.25, True)
    cases = [(quarter, 1.0), (FULL, (0.3 * 0.25 + 0.75 * 0.3**2 / 2) / 0.3)]
    for defect, expected in cases:
        metric = SPRO({"/a.png": [Region(mask, defect)]}, fpr_limit=0.3, mode="exact")
        batch, preds = _batch([score], ["structural_anomalies"], ["/a.png"], [mask])
        metric.update(preds, torch.zeros(1), batch)
        with pytest.warns(UserWarning, match=r"no logical_anomalies"):
            value = metric.compute()["structural"]
        np.testing.assert_allclose(float(value), expected, atol=1e-12)
    two = score.copy()
    two[1, :2] = 0.0  # 2 pixels found; an absolute threshold of 3 pixels
    metric = SPRO({"/a.png": [Region(mask, DefectConfig("a", 1, 3.0, False))]}, fpr_limit=0.05)
    batch, preds = _batch([two], ["structural_anomalies"], ["/a.png"], [mask])
    metric.update(preds, torch.zeros(1), batch)
    expected = 2 / 3 + (1 / 3) * 0.05 / 2  # linear from (0, 2/3) to (1, 1), up to 0.05
    with pytest.warns(UserWarning, match=r"no logical_anomalies"):
        value = metric.compute()["structural"]
    np.testing.assert_allclose(float(value), expected, atol=1e-9)


def test_saturation_area_rules() -> None:
    ten, eleven = _box(0, 0, 2, 5), _box(0, 0, 1, 11)
    assert Region(ten, DefectConfig("r", 1, 0.3, True)).saturation_area() == 3.0
    assert Region(eleven, DefectConfig("r", 1, 0.3, True)).saturation_area() == 3.0  # int()
    assert Region(ten, DefectConfig("a", 1, 4.0, False)).saturation_area() == 4.0
    assert Region(ten, DefectConfig("a", 1, 400.0, False)).saturation_area() == 10.0  # area cap
    # Absolute thresholds are pixel counts of the original image: scaled with the pixel count.
    assert Region(ten, DefectConfig("a", 1, 24.0, False), 0.25).saturation_area() == 6.0
    assert Region(ten, DefectConfig("r", 1, 0.05, True)).saturation_area() == 1.0  # at least 1


def test_saturated_weights_sum_to_the_capped_overlap() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3], dtype=torch.float64)
    top, weights = saturated_weights(scores, 2.5)
    assert top.tolist() == [0.9, 0.7, 0.5]
    np.testing.assert_allclose(weights.numpy(), [0.4, 0.4, 0.2])
    for t in scores.tolist():
        found = int((scores >= t).sum())
        np.testing.assert_allclose(float(weights[top >= t].sum()), min(found / 2.5, 1.0))


def test_a_missing_type_is_nan_and_unknown_images_fail(scene) -> None:
    maps, masks, regions, paths, defects = scene
    metric = SPRO(regions, mode="exact")
    batch, preds = _batch(maps[:4], defects[:4], paths[:4], masks[:4])
    metric.update(preds, torch.zeros(4), batch)
    with pytest.warns(UserWarning, match=r"structural_anomalies"):
        values = metric.compute()
    assert math.isnan(float(values["structural"])) and math.isnan(float(values[""]))
    assert 0 < float(values["logical"]) <= 1
    batch["path"][3] = "/unknown.png"
    with pytest.raises(StadError, match=r"no ground-truth regions .*unknown.png"):
        SPRO(regions).update(preds, torch.zeros(4), batch)
    batch["defect"][3] = "scratch"
    with pytest.raises(StadError, match=r"type 'scratch'"):
        SPRO(regions).update(preds, torch.zeros(4), batch)


def test_defects_config_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "defects_config.json"
    entries = [
        {
            "defect_name": "a",
            "pixel_value": 255,
            "saturation_threshold": 1.0,
            "relative_saturation": True,
        },
        {
            "defect_name": "b",
            "pixel_value": 236,
            "saturation_threshold": 2000,
            "relative_saturation": False,
        },
    ]
    path.write_text(json.dumps(entries))
    config = load_defects_config(path)
    assert config[236] == DefectConfig("b", 236, 2000.0, False) and config[255].relative_saturation
    with pytest.raises(DatasetError, match=r"does not exist"):
        load_defects_config(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(DatasetError, match=r"Cannot read .* as JSON"):
        load_defects_config(path)
    for bad in (
        [{**entries[0], "saturation_threshold": 1.5}],  # relative above 1
        [{**entries[0], "pixel_value": 0}],
        [{"defect_name": "a", "pixel_value": 3}],
        [entries[0], {**entries[1], "pixel_value": 255}],  # duplicate value
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(DatasetError, match=r"defects_config.json"):
            load_defects_config(path)
