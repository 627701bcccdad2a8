"""Thresholds: quantile and F1 choices against brute force, test counts against a direct count,
and a run that chooses them on held-out normal images only and reports them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stad.errors import StadError
from stad.run import run
from stad.thresholds import (
    ThresholdCounts,
    decisions_right,
    f1_threshold,
    quantile_threshold,
    sample_pixels,
    with_test_counts,
)


def _brute_force_f1(scores: np.ndarray, labels: np.ndarray) -> float:
    best = -1.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        f1 = 2 * tp / (2 * tp + np.sum(pred & ~labels) + np.sum(~pred & labels))
        best = max(best, f1)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_f1_threshold_is_the_best_cut_including_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(40) < 0.4
    labels[:2] = [True, False]
    scores = np.round(rng.random(40) + labels * 0.5, 1)  # coarse: many ties
    chosen = f1_threshold(scores, labels, "test")
    assert chosen["f1"] == pytest.approx(_brute_force_f1(scores, labels))
    pred = scores >= chosen["value"]
    tp = np.sum(pred & labels)
    f1 = 2 * tp / (2 * tp + np.sum(pred & ~labels) + np.sum(~pred & labels))
    assert f1 == pytest.approx(chosen["f1"])


def test_f1_needs_both_classes_and_quantile_needs_values():
    with pytest.raises(StadError, match="both normal and anomalous"):
        f1_threshold([0.1, 0.2], [0, 0], "labelled set")
    with pytest.raises(StadError, match="val_fraction"):
        quantile_threshold(torch.tensor([]), 0.99, "held-out images")
    with pytest.raises(StadError, match=r"\(0, 1\]"):
        quantile_threshold(torch.tensor([1.0]), 1.5, "x")


def test_quantile_threshold_matches_numpy():
    values = torch.linspace(0, 1, 101)
    chosen = quantile_threshold(values, 0.9, "normal images")
    assert chosen["value"] == pytest.approx(0.9) and chosen["n"] == 101


def test_pixel_sample_is_bounded_and_reproducible():
    maps = torch.rand(3, 1, 100, 100)
    a, b = sample_pixels(maps, per_image=50, seed=1), sample_pixels(maps, per_image=50, seed=1)
    assert a.shape == (150,) and torch.equal(a, b)
    assert set(a.tolist()) <= set(maps.flatten().tolist())


def test_counts_equal_a_direct_count_over_batches():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 1, 8, 8, generator=g)
    masks = maps > 0.8
    labels = masks.flatten(1).any(1).long()
    scores = maps.flatten(1).mean(1)
    counts = ThresholdCounts(image=0.5, pixel=0.9)
    for i in (0, 3):
        batch = {"label": labels[i : i + 3], "mask": masks[i : i + 3]}
        counts.update(maps[i : i + 3], scores[i : i + 3], batch)
    result = with_test_counts({"image": {"value": 0.5}, "pixel": {"value": 0.9}}, counts.compute())
    assert result["image"]["test"] == decisions_right(scores, labels, 0.5)
    by_pixels = maps.flatten(1).amax(1)
    assert result["pixel"]["test"] == decisions_right(by_pixels, labels, 0.9)
    above = maps >= 0.9
    tpr = (above & masks).sum() / masks.sum()
    fpr = (above & ~masks).sum() / (~masks).sum()
    assert result["pixel"]["test_pixels"]["tpr"] == pytest.approx(float(tpr))
    assert result["pixel"]["test_pixels"]["fpr"] == pytest.approx(float(fpr))


@pytest.mark.slow
def test_a_run_chooses_thresholds_on_held_out_normals_and_reports_them(tiny_config, tmp_path):
    record = run(tiny_config("method=rd", "threshold.val_fraction=0.25"), tmp_path / "run")
    image, pixel = record["thresholds"]["image"], record["thresholds"]["pixel"]
    assert image["method"] == "quantile" and "held-out normal images" in image["source"]
    assert image["n"] == record["data"]["n_val"] > 0
    n_test = record["data"]["n_test"]
    assert image["test"]["total"] == pixel["test"]["total"] == n_test
    assert (tmp_path / "run" / "report.html").is_file()


@pytest.mark.slow
def test_fixed_thresholds_are_taken_as_given(tiny_config, tmp_path):
    cfg = tiny_config("method=rd", "threshold.method=fixed", "threshold.image=0.5")
    record = run(cfg, tmp_path / "run")
    assert record["thresholds"]["image"]["value"] == 0.5
    assert record["thresholds"]["image"]["method"] == "fixed"
    assert "pixel" not in record["thresholds"]
