"""Property tests of the metrics (hypothesis): invariances, binned vs exact, known values, edges.

Every property is stated in docs/metrics.md; examples are tiny (at most 6 maps of 12x12) and the
search is derandomised, so the file is reproducible and runs in seconds. Scores are multiples of
1/8 in float64: every transform used below maps distinct scores to distinct scores exactly, so a
change of value can only come from the metric, never from rounding of the inputs.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import roc_auc_score

from stad.errors import StadError
from stad.metrics import PRO, ImageAUROC, PixelAUROC

PROPERTY = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

MODES = ["exact", "binned"]

# Binned metrics default to 2**12 bins here: each instance of the default 2**20 costs ~16 MiB and
# tens of milliseconds, and no property depends on the resolution (the bound tests also draw 20).
BITS = 12

# Strictly increasing maps of float64 scores that keep multiples of 1/8 in [-8, 8] distinct.
INCREASING: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "affine": lambda x: 3.0 * x + 7.0,
    "cube": lambda x: x**3,
    "exp": torch.exp,
    "shift": lambda x: x + 1000.0,  # a large offset: coarse binned resolution (docs/metrics.md)
    "rank": lambda x: torch.unique(x, return_inverse=True)[1].to(torch.float64),
}

# ----------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------


@st.composite
def pixel_cases(draw: st.DrawFn, both_classes: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (B, H, W) float64 multiples of 1/8 and masks (B, H, W) bool with both classes.

    A small ``levels`` gives many ties, also between normal and anomalous pixels.
    """
    n = draw(st.integers(1, 6))
    height, width = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    levels = draw(st.sampled_from([2, 8, 64]))
    values = draw(arrays(np.int64, (n, height, width), elements=st.integers(-levels, levels)))
    mask = draw(arrays(np.bool_, (n, height, width)))
    if both_classes:
        mask.flat[0], mask.flat[-1] = True, False
    return torch.from_numpy(values / 8.0), torch.from_numpy(mask)


@st.composite
def image_cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores (N,) float64 and labels (N,) int64 with both classes."""
    n = draw(st.integers(2, 40))
    levels = draw(st.sampled_from([2, 64]))
    values = draw(arrays(np.int64, (n,), elements=st.integers(-levels, levels)))
    labels = draw(arrays(np.int64, (n,), elements=st.integers(0, 1)))
    labels[0], labels[-1] = 1, 0
    return torch.from_numpy(values / 8.0), torch.from_numpy(labels)


def _metric(name: str, mode: str, num_bits: int = BITS, fpr_limit: float = 0.3):
    if name == "pixel_auroc":
        return PixelAUROC(mode=mode, num_bits=num_bits)
    return PRO(fpr_limit=fpr_limit, mode=mode, num_bits=num_bits)


def _value(metric, *batches: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """``(value, error bound)`` after updating ``metric`` with each batch in turn."""
    for maps, masks in batches:
        metric.update(maps, masks)
    return float(metric.compute()), float(metric.error_bound())


def _pixel(name: str, mode: str, maps: torch.Tensor, masks: torch.Tensor, **kw) -> float:
    return _value(_metric(name, mode, **kw), (maps, masks))[0]


# ----------------------------------------------------------------------------------------------
# Invariance to strictly monotone transforms
# ----------------------------------------------------------------------------------------------


TRANSFORMS = st.sampled_from(sorted(INCREASING))


@pytest.mark.parametrize("name", ["pixel_auroc", "pro"])
@PROPERTY
@given(case=pixel_cases(), transform=TRANSFORMS)
def test_exact_pixel_metrics_ignore_increasing_transforms(name, case, transform) -> None:
    maps, masks = case
    f = INCREASING[transform]
    assert _pixel(name, "exact", f(maps), masks) == _pixel(name, "exact", maps, masks)


@pytest.mark.parametrize("name", ["pixel_auroc", "pro"])
@PROPERTY
@given(case=pixel_cases(), transform=TRANSFORMS, num_bits=st.sampled_from([10, 14, 20]))
def test_binned_pixel_metrics_stay_within_their_bound_under_transforms(
    name, case, transform, num_bits
) -> None:
    maps, masks = case
    exact = _pixel(name, "exact", maps, masks)
    value, bound = _value(_metric(name, "binned", num_bits), (INCREASING[transform](maps), masks))
    assert abs(value - exact) <= bound + 1e-12


@pytest.mark.parametrize("name", ["pixel_auroc", "pro"])
@PROPERTY
@given(case=pixel_cases(), power=st.integers(-4, 4), num_bits=st.sampled_from([10, 16]))
def test_binned_pixel_metrics_ignore_powers_of_two(name, case, power, num_bits) -> None:
    maps, masks = case
    scaled = _pixel(name, "binned", maps * 2.0**power, masks, num_bits=num_bits)
    assert scaled == _pixel(name, "binned", maps, masks, num_bits=num_bits)


@PROPERTY
@given(case=image_cases(), transform=TRANSFORMS)
def test_image_auroc_ignores_increasing_transforms_and_matches_sklearn(case, transform) -> None:
    scores, labels = case
    metric, transformed = ImageAUROC(), ImageAUROC()
    metric.update(scores, labels)
    transformed.update(INCREASING[transform](scores), labels)
    value = float(metric.compute())
    assert float(transformed.compute()) == value
    assert value == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
@PROPERTY
@given(case=pixel_cases())
def test_reversing_the_scores_gives_one_minus_pixel_auroc(mode, case) -> None:
    maps, masks = case
    value, bound = _value(_metric("pixel_auroc", mode), (maps, masks))
    reversed_value, reversed_bound = _value(_metric("pixel_auroc", mode), (-maps, masks))
    assert abs(value + reversed_value - 1.0) <= bound + reversed_bound + 1e-12
    expected = roc_auc_score(masks.numpy().ravel(), maps.numpy().ravel())
    assert abs(value - expected) <= bound + 1e-12


# ----------------------------------------------------------------------------------------------
# Invariance to the order and batching of the images
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["pixel_auroc", "pro"])
@PROPERTY
@given(case=pixel_cases(), data=st.data())
def test_pixel_metrics_ignore_image_order_and_batching(name, mode, case, data) -> None:
    maps, masks = case
    n = maps.shape[0]
    whole = _value(_metric(name, mode), (maps, masks))
    order = torch.tensor(data.draw(st.permutations(range(n))))
    permuted = _value(_metric(name, mode), (maps[order], masks[order]))
    # Another order sums the same float64 terms in another order: equal up to rounding.
    assert permuted == pytest.approx(whole, abs=1e-12)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=n - 1)))
    bounds = [0, *cuts, n]
    pieces = [(maps[a:b], masks[a:b]) for a, b in itertools.pairwise(bounds)]
    # Batching keeps the order: identical values (docs/metrics.md, "Invariance").
    assert _value(_metric(name, mode), *pieces) == whole


@PROPERTY
@given(case=image_cases(), data=st.data())
def test_image_auroc_ignores_order_and_batching(case, data) -> None:
    scores, labels = case
    whole = ImageAUROC()
    whole.update(scores, labels)
    order = torch.tensor(data.draw(st.permutations(range(scores.numel()))))
    split = data.draw(st.integers(1, scores.numel() - 1))
    batched = ImageAUROC()
    batched.update(scores[order][:split], labels[order][:split])
    batched.update(scores[order][split:], labels[order][split:])
    assert float(batched.compute()) == pytest.approx(float(whole.compute()), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Binned within its bound of exact
# ----------------------------------------------------------------------------------------------


@st.composite
def float_cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps of arbitrary float32 values (stored as float64, so both modes see the same scores)."""
    maps, masks = draw(pixel_cases())
    values = draw(
        arrays(
            np.float32,
            tuple(maps.shape),
            elements=st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32),
        )
    )
    return torch.from_numpy(values.astype(np.float64)), masks


@pytest.mark.parametrize("name", ["pixel_auroc", "pro"])
@PROPERTY
@given(
    case=float_cases(),
    num_bits=st.sampled_from([10, 12, 20]),
    fpr_limit=st.sampled_from([0.05, 0.3, 1.0]),
)
def test_binned_is_within_its_error_bound_of_exact(name, case, num_bits, fpr_limit) -> None:
    maps, masks = case
    exact, exact_bound = _value(_metric(name, "exact", fpr_limit=fpr_limit), (maps, masks))
    value, bound = _value(_metric(name, "binned", num_bits, fpr_limit), (maps, masks))
    assert exact_bound == 0.0
    assert bound >= 0.0 and 0.0 <= value <= 1.0
    assert abs(value - exact) <= bound + 1e-12


# ----------------------------------------------------------------------------------------------
# Known values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@PROPERTY
@given(
    case=pixel_cases(),
    fpr_limit=st.sampled_from([0.05, 0.3, 1.0]),
    scale=st.sampled_from([1.0, 1e-3, 250.0]),
)
def test_known_values_of_the_pixel_metrics(mode, case, fpr_limit, scale) -> None:
    _, masks = case
    perfect = masks.to(torch.float64) * scale  # the map equal to the mask (scaled)
    inverted = scale - perfect
    constant = torch.full(masks.shape, scale, dtype=torch.float64)
    for maps, auroc, pro in (
        (perfect, 1.0, 1.0),
        (inverted, 0.0, 0.0),
        (constant, 0.5, fpr_limit / 2),  # one tie group: the diagonal from (0, 0) to (1, 1)
    ):
        assert _pixel("pixel_auroc", mode, maps, masks) == pytest.approx(auroc, abs=1e-12)
        assert _pixel("pro", mode, maps, masks, fpr_limit=fpr_limit) == pytest.approx(
            pro, abs=1e-12
        )


@PROPERTY
@given(case=image_cases(), scale=st.sampled_from([1.0, 1e-3, 250.0]))
def test_known_values_of_image_auroc(case, scale) -> None:
    _, labels = case
    for scores, expected in (
        (labels * scale, 1.0),
        (-labels * scale, 0.0),
        (torch.full(labels.shape, scale), 0.5),
    ):
        metric = ImageAUROC()
        metric.update(scores.to(torch.float64), labels)
        assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
@PROPERTY
@given(case=pixel_cases(), data=st.data())
def test_pro_of_a_map_that_orders_regions_before_the_rest(mode, case, data) -> None:
    """Any map that puts every anomalous pixel above every normal one has PRO 1, whatever the
    order inside each class (PRO only sees the order across classes there)."""
    maps, masks = case
    lifted = torch.where(masks, maps + 100.0, maps)
    limit = data.draw(st.sampled_from([0.05, 0.3, 1.0]))
    assert _pixel("pro", mode, lifted, masks, fpr_limit=limit) == pytest.approx(1.0, abs=1e-12)
    assert _pixel("pixel_auroc", mode, lifted, masks) == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Degenerate inputs: NaN with a warning (docs/metrics.md, "Inputs, devices and edge cases")
# ----------------------------------------------------------------------------------------------


def _nan_with_warning(metric, maps: torch.Tensor, masks: torch.Tensor, why: str) -> None:
    metric.update(maps, masks)
    with pytest.warns(UserWarning, match=f"undefined \\(NaN\\).*{why}"):
        value = float(metric.compute())
    assert math.isnan(value)
    if metric.mode == "binned":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert math.isnan(float(metric.error_bound()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["pixel_auroc", "pro"])
@PROPERTY
@given(case=pixel_cases(both_classes=False))
def test_one_class_of_pixels_is_nan_with_a_warning(name, mode, case) -> None:
    maps, masks = case
    nothing = torch.zeros_like(masks)
    everything = torch.ones_like(masks)
    both = "both normal and anomalous pixels"
    no_anomaly, no_normal = (both, both) if name == "pixel_auroc" else ("no anomalous", "no normal")
    _nan_with_warning(_metric(name, mode), maps, nothing, no_anomaly)
    _nan_with_warning(_metric(name, mode), maps, everything, no_normal)


@PROPERTY
@given(case=image_cases(), label=st.integers(0, 1))
def test_image_auroc_of_one_class_is_nan_with_a_warning(case, label) -> None:
    scores, labels = case
    metric = ImageAUROC()
    metric.update(scores, torch.full_like(labels, label))
    with pytest.warns(UserWarning, match="both normal and anomalous"):
        assert math.isnan(float(metric.compute()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["pixel_auroc", "pro"])
@PROPERTY
@given(case=pixel_cases(), data=st.data())
def test_a_nan_batch_raises_and_leaves_the_metric_unchanged(name, mode, case, data) -> None:
    maps, masks = case
    expected = _pixel(name, mode, maps, masks)
    poisoned = maps.clone()
    poisoned.view(-1)[data.draw(st.integers(0, maps.numel() - 1))] = float("nan")
    metric = _metric(name, mode)
    with pytest.raises(StadError, match="NaN anomaly scores"):
        metric.update(poisoned, masks)
    assert _value(metric, (maps, masks))[0] == expected
