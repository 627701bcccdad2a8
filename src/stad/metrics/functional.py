"""Pure math of the anomaly-detection metrics: ROC AUC, AU-PRO and their binned versions.

No state lives here; :mod:`stad.metrics.classes` wraps these functions as torchmetrics ``Metric``s.

Every curve is the one MVTec's official evaluation code builds for PRO: one point per distinct
score ``t`` counting the pixels with score ``>= t`` (ties merged into one point), padded with
(0, 0) and (1, 1), integrated with the trapezoid rule up to an FPR limit, the curve linearly
interpolated at exactly the limit, divided by the limit. Only the order of the scores matters,
never their values: nothing here applies a sigmoid or any other squashing.

The area is computed per anomalous pixel instead of per curve point (the Mann-Whitney view of
the ROC AUC, extended to PRO). Let a = F(> s) and b = F(>= s) be the fractions of normal pixels
scoring above, and at-or-above, the anomalous pixel's score s. Along the official curve the pixel
counts fully once the FPR passes b, and inside the tie segment [a, b] (a diagonal of the curve)
it counts linearly from 0 to 1. Its share of the area up to the limit L is therefore

    g(a, b) = (L - b) + (b - a) / 2        if b <= L
            = (L - a)^2 / (2 (b - a))      if a < L < b
            = 0                            if a >= L,

and the metric is sum_p w_p g(a_p, b_p) / (W L), with w_p = 1 and W = number of anomalous pixels
for the ROC AUC (L = 1), and w_p = 1 / area of the pixel's region and W = number of regions for
PRO. Only the normal scores need sorting; each anomalous pixel costs two binary searches.

Binned mode maps each float32 score to a monotone integer key (IEEE-754 bits with the sign
trick, so integer order == float order) and keeps its top ``num_bits`` bits: each power-of-two
octave of scores is split into ``2 ** (num_bits - 9)`` bins, a relative resolution independent of
the scale of the scores. A bin then acts as one tie group: the same formula applies per bin, and
the error this causes is bounded from the histograms themselves (:func:`area_from_masses`).
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.ndimage
import torch
from torch import Tensor

from stad.errors import StadError

__all__ = [
    "DEFAULT_NUM_BITS",
    "area_from_masses",
    "au_pro",
    "auroc_from_histograms",
    "auroc_from_scores",
    "average_precision_from_histograms",
    "average_precision_from_scores",
    "bin_lower_edges",
    "binary_auroc",
    "check_fpr_limit",
    "check_num_bits",
    "curve_from_histograms",
    "curve_from_scores",
    "cut_curve_at",
    "histogram_has_nan",
    "label_regions",
    "monotone_key",
    "nan_bin_ranges",
    "pro_from_histograms",
    "pro_from_scores",
    "score_bins",
    "sort_scores",
    "thin_curve",
]

#: 20 bits: 2**20 bins, 2048 bins per octave (relative bin width 2**-11 ~ 4.9e-4), 8 MiB per
#: int64/float64 histogram.
DEFAULT_NUM_BITS = 20
_MIN_BITS = 10  # below this a bin spans several octaves
_MAX_BITS = 26  # 2**26 bins = 512 MiB per histogram; more is never useful


# ----------------------------------------------------------------------------------------------
# Scores -> monotone integer keys -> bins
# ----------------------------------------------------------------------------------------------


def check_num_bits(num_bits: int) -> int:
    """Validate the number of key bits kept by the binned mode.

    Args:
        num_bits: bits of the 32-bit monotone key kept as the bin index.

    Returns:
        ``num_bits`` unchanged.

    Raises:
        StadError: if it lies outside [10, 26].
    """
    if not isinstance(num_bits, int) or not _MIN_BITS <= num_bits <= _MAX_BITS:
        raise StadError(
            f"metrics num_bits={num_bits!r} is out of range: use an integer in "
            f"[{_MIN_BITS}, {_MAX_BITS}] (default {DEFAULT_NUM_BITS})."
        )
    return num_bits


def monotone_key(scores: Tensor) -> Tensor:
    """Map float32 scores to int32 keys whose integer order equals the float order.

    Positive floats already sort like their bit patterns; negative floats sort in reverse, so
    their magnitude bits are flipped. -0.0 is folded onto +0.0 first, because the two compare
    equal and must share a key.

    Args:
        scores: any shape, any real dtype (cast to float32; NaN is not allowed).

    Returns:
        int32 tensor of the same shape, strictly increasing with the float32 score.
    """
    # Adding +0.0 turns -0.0 into +0.0 (IEEE-754 round-to-nearest) and makes a fresh tensor.
    bits = (scores.to(torch.float32) + 0.0).view(torch.int32)
    # bits >> 31 is -1 for negative floats (arithmetic shift): flip their 31 magnitude bits.
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def score_bins(scores: Tensor, num_bits: int = DEFAULT_NUM_BITS) -> Tensor:
    """Bin index of each score: the top ``num_bits`` bits of its monotone key.

    Args:
        scores: any shape, any real dtype.
        num_bits: bits kept; the result lies in ``[0, 2 ** num_bits)``.

    Returns:
        int32 tensor of the same shape, non-decreasing with the score.
    """
    # monotone_key's steps in place on one fresh int32 tensor: this runs on every test pixel,
    # and each temporary of a 2M-pixel batch costs a page-faulting allocation (4x slower).
    bits = (scores.to(torch.float32) + 0.0).view(torch.int32)
    flip = bits >> 31
    flip &= 0x7FFFFFFF
    bits ^= flip
    del flip
    # Arithmetic shift of the signed key is a floor division, so order is kept; the offset
    # moves the range from [-2**(K-1), 2**(K-1)) to [0, 2**K).
    bits >>= 32 - num_bits
    bits += 1 << (num_bits - 1)
    return bits


@functools.cache
def nan_bin_ranges(num_bits: int = DEFAULT_NUM_BITS) -> tuple[int, int]:
    """Bins of -inf and +inf: bins below the first and above the second hold only NaN.

    The two infinity bins themselves also hold the NaN bit patterns next to infinity, so a
    count there needs an exact ``isnan`` check (see :func:`histogram_has_nan`).

    Returns:
        ``(bin of -inf, bin of +inf)``.
    """
    infs = torch.tensor([float("-inf"), float("inf")])
    low, high = score_bins(infs, num_bits).tolist()
    return int(low), int(high)


def histogram_has_nan(hist: Tensor, scores: Tensor, num_bits: int = DEFAULT_NUM_BITS) -> bool:
    """Whether ``scores`` hold a NaN, read from their histogram of bins where possible.

    One look at the histogram's outermost bins instead of a pass over every pixel; only when a
    score lies in an infinity bin (rare) does it fall back to ``torch.isnan`` on the scores.

    Args:
        hist: ``(2 ** num_bits,)`` counts of :func:`score_bins` of ``scores``.
        scores: the scores themselves (any shape).
        num_bits: as in :func:`score_bins`.
    """
    low, high = nan_bin_ranges(num_bits)
    # One device sync for both counts.
    nan_only, at_infinity = torch.stack(
        [hist[:low].sum() + hist[high + 1 :].sum(), hist[low] + hist[high]]
    ).tolist()
    if nan_only:
        return True
    return bool(at_infinity and torch.isnan(scores).any())


def bin_lower_edges(num_bits: int = DEFAULT_NUM_BITS, device: torch.device | None = None) -> Tensor:
    """Smallest float32 score of every bin (useful to plot binned curves against thresholds).

    Args:
        num_bits: as in :func:`score_bins`.
        device: where to build the result.

    Returns:
        float32 tensor of shape ``(2 ** num_bits,)``; the two outermost bins (which hold -inf and
        +inf next to NaN bit patterns) and the NaN-only bins give NaN.
    """
    bins = torch.arange(1 << num_bits, dtype=torch.int64, device=device)
    key = ((bins - (1 << (num_bits - 1))) << (32 - num_bits)).to(torch.int32)
    bits = torch.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.view(torch.float32)


# ----------------------------------------------------------------------------------------------
# Ground-truth regions
# ----------------------------------------------------------------------------------------------


def label_regions(masks: Tensor) -> tuple[Tensor, int]:
    """Weight of every anomalous pixel: 1 / area of its 8-connected ground-truth region.

    The labelling runs on the CPU (scipy.ndimage.label with a 3x3 ones structure per image);
    only the weights of the anomalous pixels travel back to the device of ``masks``.

    Args:
        masks: (B, H, W) bool.

    Returns:
        ``(weights, num_regions)``: weights is float64 of shape ``(masks.sum(),)`` in the order of
        ``masks.nonzero()`` (the order of ``x[masks]``); num_regions is the number of regions.
    """
    mask_np = masks.detach().to("cpu", torch.bool).numpy()
    rows = _anomalous_rows(mask_np)
    if rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=masks.device), 0
    labels, num_regions = scipy.ndimage.label(rows, structure=_ROW_STRUCTURE)
    region_of_pixel = labels[rows]
    areas = np.bincount(region_of_pixel, minlength=num_regions + 1).astype(np.float64)
    weights = 1.0 / areas[region_of_pixel]
    return torch.from_numpy(weights).to(masks.device), int(num_regions)


_ROW_STRUCTURE = np.ones((3, 3), dtype=bool)


def _anomalous_rows(mask: np.ndarray) -> np.ndarray:
    """The rows of a (B, H, W) mask that hold anomalous pixels, stacked into one 2-D image.

    A region never crosses an all-zero row, so labelling only the non-empty rows, with one zero
    row wherever rows were skipped or a new image begins, gives the same regions as labelling
    every image, in the same pixel order (row-major, image by image), at the cost of the
    anomalous rows only (about 1/10 of a typical test set's pixels).

    Returns:
        bool array (R, W).
    """
    n, height, width = mask.shape
    flat = np.ascontiguousarray(mask).reshape(n * height, width)
    # With whole uint64 words per row, test 8 pixels per word.
    words = flat.view(np.uint64) if width % 8 == 0 else flat
    busy = words.any(axis=1)
    kept = np.flatnonzero(busy)
    if kept.size == 0:
        return np.zeros((0, width), dtype=bool)
    # A separator before each kept row that does not directly continue the previous kept row
    # of the same image.
    gap = np.ones(kept.size, dtype=bool)
    gap[1:] = (np.diff(kept) != 1) | (kept[1:] % height == 0)
    gap[0] = False
    out = np.zeros((kept.size + int(gap.sum()), width), dtype=bool)
    out[np.arange(kept.size) + np.cumsum(gap)] = flat[kept]
    return out


# ----------------------------------------------------------------------------------------------
# The area: one routine for every metric and both modes
# ----------------------------------------------------------------------------------------------


def area_from_masses(
    mass: Tensor,
    normal_above: Tensor,
    normal_at_or_above: Tensor,
    num_normal: float,
    total_mass: float,
    limit: float = 1.0,
    with_bound: bool = False,
) -> tuple[Tensor, Tensor]:
    """Normalised area under the official curve from anomalous masses and their normal ranks.

    Each entry is one anomalous pixel (exact mode) or one histogram bin (binned mode) carrying
    ``mass`` (1 per pixel for ROC, 1 / region area for PRO) and the number of normal pixels
    scoring strictly above it and at-or-above it (its tie group). See the module docstring for
    the formula.

    In binned mode the order inside a bin is unknown: the true curve crosses the bin's box
    [a, b] x [Y, Y + mass / total_mass] monotonically from one corner to the other, where the
    diagonal used here is off by at most half the box; for the box that straddles the limit the
    gap is at most (L - a) * height * max(f / 2, 1 - f / 2), f = (L - a) / (b - a). The sum over
    bins, divided by the limit, is the bound (``with_bound``), attained when every bin is
    ordered adversarially.

    Args:
        mass: (M,) anomalous mass per entry.
        normal_above: (M,) normal pixels with a strictly higher score (or in higher bins).
        normal_at_or_above: (M,) normal pixels with a score (bin) at or above the entry's.
        num_normal: total number of normal pixels.
        total_mass: denominator of the curve's y (anomalous pixels, or regions).
        limit: FPR integration limit in (0, 1].
        with_bound: also compute the binning error bound (else it is returned as 0).

    Returns:
        ``(area, bound)``: float64 scalar tensors, area in [0, 1].
    """
    f64 = torch.float64
    a = normal_above.to(f64) / num_normal
    b = normal_at_or_above.to(f64) / num_normal
    width = b - a
    safe_width = torch.where(width > 0, width, 1.0)
    part = (limit - a).clamp(min=0.0)
    inside = b <= limit
    share = torch.where(inside, (limit - b) + 0.5 * width, part * part / (2.0 * safe_width))
    height = mass.to(f64) / total_mass
    area = (torch.sum(height * share) / limit).clamp(0.0, 1.0)
    if not with_bound:
        return area, torch.zeros((), dtype=f64, device=area.device)
    frac = (part / safe_width).clamp(max=1.0)
    box = torch.where(inside, 0.5 * width, part * torch.maximum(0.5 * frac, 1.0 - 0.5 * frac))
    return area, torch.sum(height * box) / limit


# ----------------------------------------------------------------------------------------------
# Exact mode: from raw scores
# ----------------------------------------------------------------------------------------------


def sort_scores(scores: Tensor) -> Tensor:
    """Ascending copy of a 1-D tensor of scores (on the CPU without torch.sort's index array).

    Args:
        scores: (N,) real scores.

    Returns:
        (N,) sorted ascending, same dtype and device.
    """
    if scores.device.type == "cpu":
        return torch.from_numpy(np.sort(scores.detach().numpy()))
    return torch.sort(scores).values


def _normal_ranks(sorted_normal: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Normal pixels strictly above, and at-or-above, each score."""
    n = sorted_normal.numel()
    scores = scores.to(sorted_normal.dtype)
    above = n - torch.searchsorted(sorted_normal, scores, side="right")
    at_or_above = n - torch.searchsorted(sorted_normal, scores, side="left")
    return above, at_or_above


def _nan(device: torch.device) -> Tensor:
    return torch.tensor(float("nan"), dtype=torch.float64, device=device)


def binary_auroc(preds: Tensor, target: Tensor) -> Tensor:
    """Exact ROC AUC (ties count one half), from raw unbounded scores.

    Equals ``sklearn.metrics.roc_auc_score`` and is invariant to any strictly increasing
    transform of ``preds``.

    Args:
        preds: any shape, real scores (higher = more anomalous).
        target: same number of elements, 0/1 or bool (1 = anomalous).

    Returns:
        float64 scalar tensor; NaN if either class is absent.
    """
    preds = preds.reshape(-1)
    target = target.reshape(-1).to(torch.bool)
    if preds.numel() != target.numel():
        raise StadError(
            f"AUROC got {preds.numel()} scores but {target.numel()} labels: "
            "pass one label per score."
        )
    return auroc_from_scores(preds[~target], preds[target])


def auroc_from_scores(
    negative_scores: Tensor, positive_scores: Tensor, negatives_sorted: bool = False
) -> Tensor:
    """Exact ROC AUC from the scores of the negatives and of the positives, kept apart.

    Args:
        negative_scores: (N,) scores of normal samples/pixels.
        positive_scores: (P,) scores of anomalous samples/pixels.
        negatives_sorted: ``negative_scores`` is already sorted ascending (skips a copy).

    Returns:
        float64 scalar tensor; NaN if either is empty.
    """
    if positive_scores.numel() == 0 or negative_scores.numel() == 0:
        return _nan(negative_scores.device)
    negatives = negative_scores if negatives_sorted else sort_scores(negative_scores)
    # Sorted, the sum over positives does not depend on their order: the same value to the
    # last bit however the images were split over batches or processes.
    positive_scores = sort_scores(positive_scores)
    above, at_or_above = _normal_ranks(negatives, positive_scores)
    ones = torch.ones((), dtype=torch.float64, device=negatives.device).expand(above.shape)
    area, _ = area_from_masses(ones, above, at_or_above, negatives.numel(), positive_scores.numel())
    return area


def auroc_from_histograms(positive_hist: Tensor, negative_hist: Tensor) -> tuple[Tensor, Tensor]:
    """Binned ROC AUC and its error bound from per-bin counts (bins in ascending score order).

    The only pairs the histogram cannot order are a positive and a negative in the same bin; they
    count one half, so the distance to the exact AUROC is at most
    ``0.5 * sum_b pos_b * neg_b / (P * N)``, which is the returned bound.

    Args:
        positive_hist: (num_bins,) anomalous-pixel counts.
        negative_hist: (num_bins,) normal-pixel counts.

    Returns:
        ``(auroc, bound)``: float64 scalar tensors; NaN if a class is absent.
    """
    return _binned_area(positive_hist, negative_hist, float(positive_hist.sum()), 1.0)


# ----------------------------------------------------------------------------------------------
# Average precision (area under the precision-recall curve, scikit-learn's definition)
# ----------------------------------------------------------------------------------------------


def _ap_from_groups(positives: Tensor, negatives: Tensor) -> Tensor:
    """AP = sum over tie groups, highest score first, of (group positives / P) × the precision
    at or above the group (scikit-learn's ``average_precision_score``: no interpolation)."""
    positives, negatives = positives.double(), negatives.double()
    total = float(positives.sum())
    if total == 0:
        return _nan(positives.device)
    tp, fp = torch.cumsum(positives, 0), torch.cumsum(negatives, 0)
    used = positives > 0
    return (positives[used] / total * tp[used] / (tp[used] + fp[used])).sum()


def average_precision_from_scores(negative_scores: Tensor, positive_scores: Tensor) -> Tensor:
    """Exact average precision of the positives against the negatives (ties merged as one
    threshold, as ``sklearn.metrics.average_precision_score``).

    Returns:
        float64 scalar tensor; NaN without positives (scikit-learn warns and returns 0); 1
        without negatives, as scikit-learn.
    """
    if positive_scores.numel() == 0:
        return _nan(negative_scores.device)
    scores = torch.cat(
        [positive_scores.reshape(-1), negative_scores.reshape(-1).to(positive_scores)]
    )
    labels = torch.cat(
        [
            torch.ones(positive_scores.numel(), dtype=torch.float64, device=scores.device),
            torch.zeros(negative_scores.numel(), dtype=torch.float64, device=scores.device),
        ]
    )
    order = torch.argsort(scores, descending=True, stable=True)
    scores, labels = scores[order], labels[order]
    _, counts = torch.unique_consecutive(scores, return_counts=True)
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=scores.device), counts)
    positives = torch.zeros(counts.numel(), dtype=torch.float64, device=scores.device)
    positives.index_add_(0, group, labels)
    return _ap_from_groups(positives, counts.double() - positives)


def average_precision_from_histograms(
    positive_hist: Tensor, negative_hist: Tensor
) -> tuple[Tensor, Tensor]:
    """Binned average precision and its error bound (bins in ascending score order).

    Each bin is one tie group. A positive ranked k-th of its bin's p positives, below T
    positives and F negatives of higher bins, has precision between (T + 1) / (T + F + n + 1)
    (the bin's n negatives first) and (T + p) / (T + F + p) (its positives first) however the
    bin's scores are ordered; the bound sums (p / P) × that range over the bins.

    Returns:
        ``(ap, bound)``: float64 scalar tensors; NaN without positives.
    """
    pos = torch.flip(positive_hist, [0]).double()
    neg = torch.flip(negative_hist, [0]).double()
    value = _ap_from_groups(pos, neg)
    if torch.isnan(value):
        return value, value.clone()
    used = pos > 0
    t = (torch.cumsum(pos, 0) - pos)[used]
    f = (torch.cumsum(neg, 0) - neg)[used]
    p, n = pos[used], neg[used]
    spread = (t + p) / (t + f + p) - (t + 1) / (t + f + n + 1)
    return value, (p / float(pos.sum()) * spread).sum()


def _binned_area(
    mass_hist: Tensor, normal_hist: Tensor, total_mass: float, limit: float
) -> tuple[Tensor, Tensor]:
    """Binned area and bound: each bin is one tie group."""
    num_normal = float(normal_hist.sum())
    if total_mass == 0 or num_normal == 0:
        nan = _nan(normal_hist.device)
        return nan, nan.clone()
    # Normal pixels in strictly higher bins: a reversed exclusive cumulative sum.
    at_or_above = torch.flip(torch.cumsum(torch.flip(normal_hist, [0]), 0), [0])
    above = at_or_above - normal_hist
    used = mass_hist != 0  # only bins holding anomalous mass contribute
    return area_from_masses(
        mass_hist[used],
        above[used],
        at_or_above[used],
        num_normal,
        total_mass,
        limit,
        with_bound=True,
    )


# ----------------------------------------------------------------------------------------------
# AU-PRO
# ----------------------------------------------------------------------------------------------


def check_fpr_limit(fpr_limit: float) -> float:
    """Validate the AU-PRO integration limit.

    Args:
        fpr_limit: upper FPR bound of the integral.

    Returns:
        ``fpr_limit`` as float.

    Raises:
        StadError: unless 0 < fpr_limit <= 1.
    """
    if not 0.0 < float(fpr_limit) <= 1.0:
        raise StadError(
            f"PRO fpr_limit={fpr_limit!r} is out of range: use a value in (0, 1] (default 0.3)."
        )
    return float(fpr_limit)


def pro_from_scores(
    normal_scores: Tensor,
    anomalous_scores: Tensor,
    anomalous_weights: Tensor,
    num_regions: int,
    fpr_limit: float = 0.3,
    normal_sorted: bool = False,
) -> Tensor:
    """Exact normalised AU-PRO from the scores of all test pixels.

    Args:
        normal_scores: (N,) scores of every normal pixel of the test set (good images included).
        anomalous_scores: (A,) scores of every anomalous pixel.
        anomalous_weights: (A,) 1 / area of each anomalous pixel's region.
        num_regions: number of ground-truth regions in the test set.
        fpr_limit: integration limit.
        normal_sorted: ``normal_scores`` is already sorted ascending (skips a copy).

    Returns:
        float64 scalar tensor in [0, 1]; NaN if there are no regions or no normal pixels.
    """
    fpr_limit = check_fpr_limit(fpr_limit)
    if num_regions == 0 or normal_scores.numel() == 0:
        return _nan(normal_scores.device)
    normal = normal_scores if normal_sorted else sort_scores(normal_scores)
    above, at_or_above = _normal_ranks(normal, anomalous_scores)
    area, _ = area_from_masses(
        anomalous_weights, above, at_or_above, normal.numel(), num_regions, fpr_limit
    )
    return area


def pro_from_histograms(
    normal_hist: Tensor, region_weight_hist: Tensor, num_regions: int, fpr_limit: float = 0.3
) -> tuple[Tensor, Tensor]:
    """Binned normalised AU-PRO and its error bound.

    PRO(t) = (1 / R) * sum over anomalous pixels above t of 1 / area(region of the pixel), so one
    float64 histogram of those weights and the region count R carry everything PRO needs.

    Args:
        normal_hist: (num_bins,) normal-pixel counts, ascending score order.
        region_weight_hist: (num_bins,) sum of 1 / region area of the anomalous pixels per bin.
        num_regions: R.
        fpr_limit: integration limit.

    Returns:
        ``(au_pro, bound)``: float64 scalar tensors; NaN if no regions or no normal pixels.
    """
    fpr_limit = check_fpr_limit(fpr_limit)
    return _binned_area(region_weight_hist, normal_hist, float(num_regions), fpr_limit)


def au_pro(anomaly_maps: Tensor, masks: Tensor, fpr_limit: float = 0.3) -> Tensor:
    """Exact normalised AU-PRO of a whole test set in one call.

    Args:
        anomaly_maps: (B, H, W) real scores.
        masks: (B, H, W) 0/1 or bool ground truth.
        fpr_limit: integration limit.

    Returns:
        float64 scalar tensor in [0, 1]; NaN if there are no regions or no normal pixels.
    """
    if anomaly_maps.shape != masks.shape or anomaly_maps.ndim != 3:
        raise StadError(
            f"au_pro needs maps and masks of the same (B, H, W) shape, got "
            f"{tuple(anomaly_maps.shape)} and {tuple(masks.shape)}."
        )
    masks = masks.to(torch.bool)
    weights, num_regions = label_regions(masks)
    return pro_from_scores(
        anomaly_maps[~masks], anomaly_maps[masks], weights, num_regions, fpr_limit
    )


# -- curves (for plots) -------------------------------------------------------------------------
# The points are those of the official curve the areas integrate (module docstring of
# stad.metrics.functional): (0, 0), then one point per distinct score (exact mode) or per
# non-empty bin (binned mode) from the highest down, counting what scores at or above it. The
# trapezoid area under them is therefore compute()'s value.
Curve = tuple[Tensor, Tensor]


def empty_curve() -> Curve:
    return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)


def as_curve(x: np.ndarray, y: np.ndarray) -> Curve:
    return torch.from_numpy(np.ascontiguousarray(x, np.float64)), torch.from_numpy(
        np.ascontiguousarray(y, np.float64)
    )


def curve_from_scores(
    normal: np.ndarray,
    anomalous: np.ndarray,
    weights: np.ndarray | None = None,
    total: float | None = None,
    lowest: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FPR and the anomalous share at or above every distinct score, highest score first.

    Args:
        normal: (N,) normal scores. anomalous: (A,) anomalous scores.
        weights: (A,) mass per anomalous score (PRO: 1 / region area); None counts each as 1.
        total: the mass that makes y = 1 (PRO: the number of regions); default A.
        lowest: skip thresholds below this score (they lie past the FPR limit).

    Returns:
        ``(fpr, y)``: float64 (K + 1,) each, starting at (0, 0).
    """
    normal_sorted = np.sort(normal)
    order = np.argsort(anomalous, kind="stable")
    anomalous_sorted = anomalous[order]
    candidates = np.concatenate([normal, anomalous])
    if lowest is not None:
        candidates = candidates[candidates >= lowest]
    thresholds = np.unique(candidates)[::-1]
    fp = normal.size - np.searchsorted(normal_sorted, thresholds, side="left")
    first = np.searchsorted(anomalous_sorted, thresholds, side="left")
    if weights is None:
        y = (anomalous.size - first) / float(anomalous.size if total is None else total)
    else:
        # Mass at or above each sorted position: a reversed cumulative sum, 0 past the end.
        above = np.r_[np.cumsum(weights[order][::-1])[::-1], 0.0]
        y = above[first] / float(anomalous.size if total is None else total)
    return np.r_[0.0, fp / normal.size], np.r_[0.0, y]


def curve_from_histograms(
    normal_hist: Tensor, mass_hist: Tensor, total: float
) -> tuple[np.ndarray, np.ndarray]:
    """FPR and the anomalous share at or above every non-empty bin, highest bin first.

    Args:
        normal_hist: (num_bins,) normal counts. mass_hist: (num_bins,) anomalous mass per bin.
        total: the mass that makes y = 1.

    Returns:
        ``(fpr, y)``: float64 (K + 1,) each, starting at (0, 0).
    """
    normal = normal_hist.detach().cpu().numpy()[::-1]
    mass = mass_hist.detach().cpu().numpy()[::-1]
    used = (normal != 0) | (mass != 0)
    fp = np.cumsum(normal)[used]  # in the histogram's dtype: exact for int64 counts
    y = np.cumsum(mass)[used] / float(total)
    return np.r_[0.0, fp / float(normal.sum())], np.r_[0.0, y]


def cut_curve_at(fpr: np.ndarray, y: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """The curve from FPR 0 to ``limit``, linearly interpolated at the limit (as the area is)."""
    end = int(np.searchsorted(fpr, limit, side="right"))  # fpr[end - 1] <= limit < fpr[end]
    if end == fpr.size or fpr[end - 1] == limit:
        return fpr[:end], y[:end]
    x0, x1, y0, y1 = fpr[end - 1], fpr[end], y[end - 1], y[end]
    at_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
    return np.r_[fpr[:end], limit], np.r_[y[:end], at_limit]


def thin_curve(x: Tensor, y: Tensor, max_points: int | None, x_range: float = 1.0) -> Curve:
    """At most ``max_points`` points of a monotone curve, endpoints kept, for plotting.

    Points are kept at even steps of the path length |dx| / x_range + |dy|, each with its
    predecessor, so every step longer than one spacing survives exactly and the trapezoid area
    divided by ``x_range`` moves by less than 2 / (max_points // 2 - 1).

    Args:
        x, y: (K,) nondecreasing coordinates.
        max_points: the most points to return (at least 4); None keeps all.
        x_range: the span of x the plot shows (PRO: its FPR limit).

    Returns:
        ``(x, y)``, float64 (≤ max_points,).
    """
    if max_points is None or x.numel() <= max_points:
        return x, y
    if max_points < 4:
        raise StadError(f"thin_curve needs max_points >= 4, got {max_points}")
    xs, ys = x.double().numpy(), y.double().numpy()
    path = xs / x_range + ys
    targets = np.linspace(path[0], path[-1], max_points // 2)[1:-1]
    hits = np.searchsorted(path, targets, side="left")
    keep = np.unique(np.r_[0, hits - 1, hits, xs.size - 1].clip(0, xs.size - 1))
    return as_curve(xs[keep], ys[keep])
