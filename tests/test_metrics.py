"""Metrics against independent references: sklearn for AUROC, a plain threshold loop for PRO.

The PRO reference follows MVTec's official definition literally: one point per distinct score
(pixels with score >= t), per-region overlap from scipy-labelled 8-connected regions, FPR over all
normal pixels, padded with (0, 0) and (1, 1), trapezoid up to the limit with the curve linearly
interpolated at the limit, divided by the limit.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.ndimage
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from stad.errors import StadError
from stad.metrics import PRO, ImageAUROC, PixelAP, PixelAUROC
from stad.metrics import functional as F

SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# Data and references
# ----------------------------------------------------------------------------------------------


def make_case(
    seed: int, n: int = 6, size: int = 24, levels: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random maps (B, H, W) float32 and masks (B, H, W) bool with elliptic blobs.

    A third of the images are all normal. Anomalous pixels score higher on average but overlap
    the normal distribution. ``levels`` quantises the scores so that ties (also between normal
    and anomalous pixels) are frequent.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        if i % 3 == 0:
            continue
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(1, size / 4, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    maps = rng.normal(0.0, 1.0, (n, size, size)) + masks * rng.uniform(0.5, 2.0)
    if levels is not None:
        lo, hi = maps.min(), maps.max()
        maps = np.round((maps - lo) / (hi - lo) * (levels - 1)) / levels
    return torch.from_numpy(maps.astype(np.float32)), torch.from_numpy(masks)


def reference_pro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """AU-PRO by a plain loop over every distinct score (slow, obviously correct)."""
    normal, regions = [], []
    for score_map, mask in zip(maps, masks, strict=True):
        labels, count = scipy.ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        normal.append(score_map[labels == 0])
        regions.extend(score_map[labels == k] for k in range(1, count + 1))
    normal = np.concatenate(normal)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(float(np.mean(normal >= t)))
        pros.append(float(np.mean([np.mean(region >= t) for region in regions])))
    fprs.append(1.0)
    pros.append(1.0)
    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
            continue
        if x0 < limit:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
        break
    return area / limit


def pixel_value(metric: PixelAUROC | PRO, maps: torch.Tensor, masks: torch.Tensor) -> float:
    metric.update(maps, masks)
    return float(metric.compute())


# ----------------------------------------------------------------------------------------------
# Monotone keys and bins
# ----------------------------------------------------------------------------------------------


def test_monotone_key_orders_like_floats() -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal(5000) * 10.0 ** rng.uniform(-40, 38, 5000)
    special = [-np.inf, np.inf, 0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0]
    x = torch.tensor(np.concatenate([values, special]), dtype=torch.float32)
    keys = F.monotone_key(x).to(torch.int64)
    order = torch.argsort(x, stable=True)
    sorted_x, sorted_keys = x[order], keys[order]
    # Strictly increasing key exactly where the float strictly increases; equal floats share it.
    assert torch.equal(sorted_keys[1:] > sorted_keys[:-1], sorted_x[1:] > sorted_x[:-1])
    assert torch.equal(sorted_keys[1:] == sorted_keys[:-1], sorted_x[1:] == sorted_x[:-1])
    bins = F.score_bins(sorted_x, 12)
    assert torch.all(bins[1:] >= bins[:-1]) and bins.min() >= 0 and bins.max() < 2**12


def test_bin_resolution_is_relative() -> None:
    # 20 bits: 2048 bins per octave, whatever the scale.
    for scale in (1e-3, 1.0, 1e4):
        x = torch.tensor([1.0, 1.0 + 1.0 / 2048, 1.0 + 0.4 / 2048], dtype=torch.float64) * scale
        bins = F.score_bins(x * 2.0 ** -math.floor(math.log2(scale)))
        assert bins[1] == bins[0] + 1 and bins[2] == bins[0]
    edges = F.bin_lower_edges(20)
    x = torch.tensor([0.37, -5.0, 123.0])
    assert torch.all(edges[F.score_bins(x)] <= x)
    assert torch.all(edges[F.score_bins(x) + 1] > x)


# ----------------------------------------------------------------------------------------------
# Image AUROC
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_image_auroc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounded: many ties
    metric = ImageAUROC()
    for start in range(0, 300, 32):
        metric.update(
            torch.tensor(scores[start : start + 32]), torch.tensor(labels[start : start + 32])
        )
    assert float(metric.compute()) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert float(metric.error_bound()) == 0.0


def test_image_auroc_invariant_and_batch_independent() -> None:
    rng = np.random.default_rng(3)
    labels = torch.from_numpy(rng.integers(0, 2, 200))
    # Multiples of 1/64 stay exact in float32 under x1000 and +100.
    scores = torch.from_numpy(rng.integers(0, 64, 200) / 64).float() + labels * 0.2
    reference = float(F.binary_auroc(scores, labels))
    transformed = [scores * 1000, scores + 100, torch.exp(scores.double() * 30), scores * 1e30]
    for candidate in transformed:
        metric = ImageAUROC()
        metric.update(candidate, labels)
        assert float(metric.compute()) == reference
    one_by_one = ImageAUROC()
    for score, label in zip(scores, labels, strict=True):
        one_by_one.update(score.reshape(1), label.reshape(1))
    assert float(one_by_one.compute()) == reference
    # The sigmoid trap: raw scores around 98 must not saturate into ties.
    raw = torch.tensor([97.0, 98.0, 99.0, 100.0])
    metric = ImageAUROC()
    metric.update(raw, torch.tensor([0, 0, 1, 1]))
    assert float(metric.compute()) == 1.0


def test_image_auroc_single_class_is_nan_with_warning() -> None:
    metric = ImageAUROC()
    metric.update(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]))
    with pytest.warns(UserWarning, match="both normal and anomalous"):
        assert math.isnan(float(metric.compute()))


# ----------------------------------------------------------------------------------------------
# Pixel AUROC
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [None, 50])
def test_pixel_auroc_exact_matches_sklearn(seed: int, levels: int | None) -> None:
    maps, masks = make_case(seed, n=9, size=32, levels=levels)
    expected = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    metric = PixelAUROC(mode="exact")
    for start in range(0, 9, 4):
        metric.update(maps[start : start + 4, None], masks[start : start + 4, None])
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_pixel_auroc_binned_within_bound(seed: int) -> None:
    maps, masks = make_case(seed, n=12, size=64)
    exact = pixel_value(PixelAUROC(mode="exact"), maps, masks)
    binned = PixelAUROC()
    value = pixel_value(binned, maps, masks)
    bound = float(binned.error_bound())
    assert abs(value - exact) <= bound + 1e-12
    assert abs(value - exact) < 1e-3 and bound < 1e-3
    # A coarse histogram still honours its (larger) bound.
    coarse = PixelAUROC(num_bits=12)
    value = pixel_value(coarse, maps, masks)
    assert abs(value - exact) <= float(coarse.error_bound()) + 1e-12


def test_pixel_auroc_invariance_and_layouts() -> None:
    maps, masks = make_case(4, n=6, size=32, levels=64)
    reference = pixel_value(PixelAUROC(mode="exact"), maps, masks)
    for candidate in (maps * 1000, maps + 100, torch.exp(maps.double() * 20)):
        assert pixel_value(PixelAUROC(mode="exact"), candidate, masks) == reference
    # Binned: exactly invariant to powers of two, within its bound otherwise.
    binned = pixel_value(PixelAUROC(), maps, masks)
    assert pixel_value(PixelAUROC(), maps * 1024, masks) == binned
    shifted = PixelAUROC()
    assert abs(pixel_value(shifted, maps + 100, masks) - reference) <= float(shifted.error_bound())
    # Layouts and mask dtypes.
    for mode in ("exact", "binned"):
        expected = pixel_value(PixelAUROC(mode=mode), maps, masks)
        assert pixel_value(PixelAUROC(mode=mode), maps[:, None], masks[:, None].float()) == expected
        assert pixel_value(PixelAUROC(mode=mode), maps[:, None], masks.long()) == expected
        one = PixelAUROC(mode=mode)
        for i in range(maps.shape[0]):
            one.update(maps[i : i + 1], masks[i : i + 1].to(torch.uint8))
        assert float(one.compute()) == expected


def test_pixel_auroc_without_anomalous_pixels_is_nan() -> None:
    for mode in ("exact", "binned"):
        metric = PixelAUROC(mode=mode)
        metric.update(torch.rand(2, 8, 8), torch.zeros(2, 8, 8))
        with pytest.warns(UserWarning, match="normal and anomalous pixels"):
            assert math.isnan(float(metric.compute()))


# ----------------------------------------------------------------------------------------------
# Pixel AP
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [None, 50, 3])
def test_pixel_ap_exact_equals_sklearn_on_random_and_tied_scores(seed: int, levels) -> None:
    maps, masks = make_case(seed, n=9, size=32, levels=levels)
    expected = average_precision_score(masks.flatten().numpy(), maps.flatten().numpy())
    metric = PixelAP(mode="exact")
    for start in range(0, 9, 4):
        metric.update(maps[start : start + 4, None], masks[start : start + 4, None])
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [None, 50])
def test_pixel_ap_binned_within_its_bound_and_1e3_of_sklearn(seed: int, levels) -> None:
    maps, masks = make_case(seed, n=12, size=64, levels=levels)
    expected = average_precision_score(masks.flatten().numpy(), maps.flatten().numpy())
    binned = PixelAP()
    value = pixel_value(binned, maps, masks)
    bound = float(binned.error_bound())
    assert abs(value - expected) <= bound + 1e-12
    assert abs(value - expected) < 1e-3
    coarse = PixelAP(num_bits=12)  # fewer, wider bins: a larger bound, still honoured
    value = pixel_value(coarse, maps, masks)
    assert abs(value - expected) <= float(coarse.error_bound()) + 1e-12


def test_pixel_ap_edge_cases_follow_sklearn() -> None:
    # Hand-made: scores 0.9 (+), 0.8 (−), 0.8 (+), 0.1 (−); the tie at 0.8 is one threshold:
    # AP = 1/2 · 1 + 1/2 · 2/3.
    maps = torch.tensor([[[0.9, 0.8], [0.8, 0.1]]])
    masks = torch.tensor([[[1, 0], [1, 0]]])
    for mode in ("exact", "binned"):
        assert pixel_value(PixelAP(mode=mode), maps, masks) == pytest.approx(0.5 + 1 / 3)
        only_anomalous = PixelAP(mode=mode)
        only_anomalous.update(torch.rand(1, 4, 4), torch.ones(1, 4, 4))
        assert float(only_anomalous.compute()) == 1.0
        none = PixelAP(mode=mode)
        none.update(torch.rand(2, 8, 8), torch.zeros(2, 8, 8))
        with pytest.warns(UserWarning, match="anomalous pixels"):
            assert math.isnan(float(none.compute()))
    # Invariant to a strictly increasing transform (exact), like every stad metric.
    maps, masks = make_case(3, n=4, size=32)
    reference = pixel_value(PixelAP(mode="exact"), maps, masks)
    assert pixel_value(PixelAP(mode="exact"), torch.exp(maps.double() * 20), masks) == reference


# ----------------------------------------------------------------------------------------------
# PRO
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [None, 40])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_pro_exact_matches_reference(seed: int, levels: int | None, limit: float) -> None:
    maps, masks = make_case(seed, n=6, size=24, levels=levels)
    expected = reference_pro(maps.double().numpy(), masks.numpy(), limit)
    metric = PRO(fpr_limit=limit, mode="exact")
    for start in range(0, 6, 2):
        metric.update(maps[start : start + 2], masks[start : start + 2])
    value = float(metric.compute())
    assert value == pytest.approx(expected, abs=1e-9)
    assert 0.0 <= value <= 1.0
    assert float(F.au_pro(maps, masks, limit)) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_pro_binned_within_bound(seed: int) -> None:
    maps, masks = make_case(seed, n=12, size=64)
    exact = pixel_value(PRO(mode="exact"), maps, masks)
    binned = PRO()
    value = pixel_value(binned, maps, masks)
    bound = float(binned.error_bound())
    assert abs(value - exact) <= bound + 1e-12
    assert abs(value - exact) < 1e-3 and bound < 1e-3
    for num_bits, limit in ((11, 0.3), (14, 0.05), (16, 1.0)):
        coarse = PRO(fpr_limit=limit, num_bits=num_bits)
        reference = pixel_value(PRO(fpr_limit=limit, mode="exact"), maps, masks)
        value = pixel_value(coarse, maps, masks)
        assert abs(value - reference) <= float(coarse.error_bound()) + 1e-12


@pytest.mark.parametrize("mode", ["exact", "binned"])
def test_pro_hand_made_cases(mode: str) -> None:
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[1, 2:6, 2:6] = True
    masks[2, 10:14, 3:12] = True
    perfect = masks.float()
    assert pixel_value(PRO(mode=mode), perfect, masks) == pytest.approx(1.0, abs=1e-12)
    # Constant map: one tie group, the official curve is the diagonal (0,0)-(1,1), so the
    # normalised area up to a limit L is L / 2.
    for limit in (0.3, 0.1, 1.0):
        constant = torch.full((3, 16, 16), 7.0)
        value = pixel_value(PRO(fpr_limit=limit, mode=mode), constant, masks)
        assert value == pytest.approx(limit / 2, abs=1e-12)
        assert pixel_value(PixelAUROC(mode=mode), constant, masks) == pytest.approx(0.5)
    # Region 1 found perfectly, region 2 scored below every normal pixel: PRO stays at 1/2 until
    # the FPR reaches 1.
    missed = torch.rand(3, 16, 16) * 0.5
    missed[masks] = -1.0
    missed[1][masks[1]] = 1.0
    for limit in (0.3, 1.0):
        value = pixel_value(PRO(fpr_limit=limit, mode=mode), missed, masks)
        assert value == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("mode", ["exact", "binned"])
def test_pro_all_normal_batches_and_batch_size(mode: str) -> None:
    maps, masks = make_case(5, n=9, size=24, levels=30)
    masks[3:6] = False  # a whole batch without any region
    expected = reference_pro(maps.double().numpy(), masks.numpy(), 0.3)
    full = pixel_value(PRO(mode=mode), maps, masks)
    batched = PRO(mode=mode)
    for start in range(0, 9, 3):
        batched.update(maps[start : start + 3, None], masks[start : start + 3, None].float())
    single = PRO(mode=mode)
    for i in range(9):
        single.update(maps[i : i + 1], masks[i : i + 1])
    assert float(batched.compute()) == full
    assert float(single.compute()) == full
    assert full == pytest.approx(expected, abs=float(batched.error_bound()) + 1e-9)


@pytest.mark.parametrize("mode", ["exact", "binned"])
def test_pro_without_regions_is_nan_with_warning(mode: str) -> None:
    metric = PRO(mode=mode)
    metric.update(torch.rand(2, 1, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.bool))
    metric.update(torch.rand(1, 8, 8), torch.zeros(1, 8, 8))  # empty masks again
    with pytest.warns(UserWarning, match="no anomalous pixel"):
        assert math.isnan(float(metric.compute()))
    with pytest.warns(UserWarning, match="no normal pixel"):
        everything = PRO(mode=mode)
        everything.update(torch.rand(1, 8, 8), torch.ones(1, 8, 8))
        assert math.isnan(float(everything.compute()))


def test_pro_large_maps_and_invariance() -> None:
    maps, masks = make_case(6, n=2, size=512, levels=200)
    expected = reference_pro(maps.double().numpy(), masks.numpy(), 0.3)
    exact = pixel_value(PRO(mode="exact"), maps[:, None], masks[:, None])
    assert exact == pytest.approx(expected, abs=1e-9)
    binned = PRO()
    assert abs(pixel_value(binned, maps, masks) - exact) <= float(binned.error_bound()) + 1e-12
    for candidate in (maps * 1000, maps + 100, torch.exp(maps.double() * 10)):
        assert pixel_value(PRO(mode="exact"), candidate, masks) == exact
    assert pixel_value(PRO(), maps * 0.25, masks) == pixel_value(PRO(), maps, masks)


def test_pro_regions_are_eight_connected_per_image() -> None:
    # Two diagonal pixels form one region; the same pixels in two images are two regions.
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[0, 1, 1] = mask[0, 2, 2] = True
    mask[1, 1, 1] = True
    weights, num_regions = F.label_regions(mask)
    assert num_regions == 2
    assert weights.tolist() == [0.5, 0.5, 1.0]


# ----------------------------------------------------------------------------------------------
# States, errors, torchmetrics integration
# ----------------------------------------------------------------------------------------------


def test_binned_states_are_bounded_and_typed() -> None:
    pro, auroc = PRO(), PixelAUROC()
    for seed in range(4):
        maps, masks = make_case(seed, n=3, size=32)
        pro.update(maps, masks)
        auroc.update(maps, masks)
    assert pro.normal_hist.dtype == torch.int64 and pro.normal_hist.numel() == 2**20
    assert pro.region_weight_hist.dtype == torch.float64
    assert pro.region_weight_hist.numel() == 2**20
    assert pro.num_regions.dtype == torch.int64
    assert auroc.positive_hist.dtype == auroc.negative_hist.dtype == torch.int64
    assert int(auroc.positive_hist.sum() + auroc.negative_hist.sum()) == 4 * 3 * 32 * 32
    # Sum of 1/area over every region pixel is the region count.
    assert float(pro.region_weight_hist.sum()) == pytest.approx(int(pro.num_regions))


def test_forward_and_reset() -> None:
    maps, masks = make_case(7, n=6, size=24)
    metric = PRO()
    batch_values = [metric(maps[i : i + 3], masks[i : i + 3]) for i in (0, 3)]
    assert all(torch.isfinite(v) or math.isnan(float(v)) for v in batch_values)
    full = float(metric.compute())
    assert full == pixel_value(PRO(), maps, masks)
    assert float(metric.error_bound()) < 1e-3
    metric.reset()
    assert int(metric.normal_hist.sum()) == 0 and int(metric.num_regions) == 0


@pytest.mark.parametrize(
    ("build", "preds", "target", "match"),
    [
        (PRO, torch.rand(2, 8, 8), torch.zeros(2, 8, 9), "same|shape"),
        (PixelAUROC, torch.rand(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), "shape"),
        (PRO, torch.rand(2, 8, 8), torch.full((2, 8, 8), 0.5), "0 and 1"),
        (PixelAUROC, torch.full((1, 4, 4), float("nan")), torch.zeros(1, 4, 4), "NaN"),
        (ImageAUROC, torch.rand(2, 8, 8), torch.zeros(2), "one score per image"),
        (ImageAUROC, torch.rand(3), torch.tensor([0, 2, 1]), "0 and 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(build, preds, target, match) -> None:
    with pytest.raises(StadError, match=match):
        build().update(preds, target)


def test_bad_settings_raise_clear_errors() -> None:
    with pytest.raises(StadError, match="fpr_limit"):
        PRO(fpr_limit=0.0)
    with pytest.raises(StadError, match="mode"):
        PixelAUROC(mode="approx")  # type: ignore[arg-type]
    with pytest.raises(StadError, match="num_bits"):
        PRO(num_bits=40)


def test_no_update_warns_but_does_not_crash() -> None:
    for metric in (ImageAUROC(), PixelAUROC(), PixelAUROC(mode="exact"), PRO(mode="exact")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert math.isnan(float(metric.compute()))


def test_error_bounds_are_tight_on_adversarial_bins() -> None:
    # num_bits=10: one bin per half octave, so [1.0, 1.5) is a single bin. Anomalous pixels all
    # above the normal ones inside it: exact metrics are 1, the binned diagonal gives less, and
    # the gap equals the reported bound.
    maps = torch.full((1, 10, 10), 1.1)
    masks = torch.zeros(1, 10, 10, dtype=torch.bool)
    masks[0, :3, :3] = True
    maps[masks] = 1.3
    auroc = PixelAUROC(num_bits=10)
    assert pixel_value(auroc, maps, masks) == pytest.approx(0.5)
    assert float(auroc.error_bound()) == pytest.approx(0.5)
    for limit in (1.0, 0.3):
        pro = PRO(fpr_limit=limit, num_bits=10)
        gap = 1.0 - pixel_value(pro, maps, masks)
        assert gap == pytest.approx(float(pro.error_bound()), abs=1e-12)
        assert pixel_value(PRO(fpr_limit=limit, mode="exact"), maps, masks) == 1.0


@pytest.mark.parametrize("mode", ["exact", "binned"])
def test_infinite_scores_are_ordered(mode: str) -> None:
    maps, masks = make_case(8, n=3, size=16)
    masks[1, :4, :4] = True
    maps[masks] = float("inf")
    maps[0, 0, 0] = float("-inf")
    assert pixel_value(PRO(mode=mode), maps, masks) == pytest.approx(1.0, abs=1e-12)
    assert pixel_value(PixelAUROC(mode=mode), maps, masks) == pytest.approx(1.0, abs=1e-12)


def test_image_auroc_gives_its_scores_and_labels_in_update_order():
    metric = ImageAUROC()
    metric.update(torch.tensor([0.3, 0.9]), torch.tensor([0, 1]))
    metric.update(torch.tensor([0.1]), torch.tensor([1]))
    scores, labels = metric.scores()
    assert scores.dtype == torch.float32 and labels.dtype == torch.int64
    assert scores.tolist() == pytest.approx([0.3, 0.9, 0.1]) and labels.tolist() == [0, 1, 1]
