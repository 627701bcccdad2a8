"""torchmetrics wrappers of the metrics: ImageAUROC, PixelAUROC and PRO.

The states accumulate on the device of the inputs (a metric follows its first inputs there) and
reduce across processes with ``dist_reduce_fx`` ("sum" for histograms and counts, "cat" for
lists), so a DDP evaluation equals a single-process one. The math lives in
:mod:`stad.metrics.functional`.

Pixel metrics have two modes:

* ``"binned"`` (default): bounded state, two histograms of ``2 ** num_bits`` bins (16 MiB at the
  default 20 bits) whatever the size of the test set; :meth:`error_bound` says how far the value
  can be from the exact one.
* ``"exact"``: keeps every pixel score (list states); for checks and small test sets.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn
from torchmetrics.utilities.data import dim_zero_cat

from stad.errors import StadError
from stad.metrics import functional as F

__all__ = ["PRO", "ImageAUROC", "PixelAUROC"]

Mode = Literal["binned", "exact"]
_MODES = ("binned", "exact")


def _cat(state: Tensor | list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A list state as one 1-D tensor (empty when nothing was added)."""
    if isinstance(state, Tensor):
        return state.reshape(-1)
    if not state:
        return torch.zeros(0, dtype=dtype, device=device)
    return dim_zero_cat(state).reshape(-1)


def _sorted_state(state: Tensor | list[Tensor], device: torch.device) -> Tensor:
    """A list state of scores as one ascending 1-D tensor, holding a single extra copy."""
    if isinstance(state, list) and state and device.type == "cpu":
        joined = torch.cat([x.reshape(-1) for x in state])  # a fresh tensor: sort it in place
        joined.numpy().sort()
        return joined
    return F.sort_scores(_cat(state, torch.float32, device))


def _score_dtype(preds: Tensor) -> torch.dtype:
    """Keep float64 scores as they are (exactness); everything else becomes float32."""
    return torch.float64 if preds.dtype == torch.float64 else torch.float32


def _check_values(name: str, preds: Tensor, target: Tensor, check_nan: bool = True) -> None:
    """Reject NaN scores and non-binary targets (one device sync for both checks).

    ``check_nan=False`` leaves the NaN check to the caller (the binned modes read it from the
    batch histogram, :func:`_binned_batch`, instead of another pass over every pixel).
    """
    checks = [torch.isnan(preds).any()] if check_nan else []
    if target.dtype != torch.bool:
        checks.append(((target != 0) & (target != 1)).any())
    if not checks:
        return
    flags = torch.stack(checks).tolist()
    if check_nan and flags.pop(0):
        _raise_nan(name)
    if flags and flags[0]:
        raise StadError(
            f"{name} got target values other than 0 and 1: binarise masks with `mask > 0` and "
            "resize them with nearest-neighbour interpolation (never bilinear)."
        )


def _raise_nan(name: str) -> None:
    raise StadError(
        f"{name} got NaN anomaly scores: the model produced NaN (check the training loss "
        "and the score normalisation) before evaluating."
    )


def _drop_channel(x: Tensor) -> Tensor:
    """(B, 1, H, W) -> (B, H, W); anything else unchanged."""
    return x[:, 0] if x.ndim == 4 and x.shape[1] == 1 else x


def _pixel_inputs(
    name: str, preds: Tensor, target: Tensor, validate: bool, check_nan: bool = True
) -> tuple[Tensor, Tensor]:
    """Bring a batch of maps and masks to (B, H, W) scores and a (B, H, W) bool mask.

    Args:
        name: metric name for error messages.
        preds: (B, 1, H, W) or (B, H, W) real anomaly maps.
        target: same shape (either layout), 0/1 of any dtype or bool.
        validate: check values (NaN scores, non-binary targets).
        check_nan: with ``validate``, also check for NaN scores here.

    Returns:
        ``(scores, mask)`` on the device of ``preds``.
    """
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise StadError(
            f"{name}.update expects torch tensors, got {type(preds)} and {type(target)}."
        )
    maps, masks = _drop_channel(preds), _drop_channel(target)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise StadError(
            f"{name} needs anomaly maps and masks of shape (B, 1, H, W) or (B, H, W) with equal "
            f"B, H, W, got {tuple(preds.shape)} and {tuple(target.shape)}: upsample the anomaly "
            "map to the mask resolution before evaluating."
        )
    if maps.is_complex() or maps.dtype == torch.bool:
        raise StadError(f"{name} needs real-valued anomaly maps, got dtype {maps.dtype}.")
    masks = masks.to(maps.device)
    if validate:
        _check_values(name, maps, masks, check_nan)
    return maps.detach().to(_score_dtype(maps)), masks if masks.dtype == torch.bool else masks > 0


def _select(values: Tensor, mask: Tensor) -> Tensor:
    """``values[mask]`` for a flat mask; on the CPU through numpy's flatnonzero, ~20x faster
    than torch's boolean indexing when, as in a test set, few pixels are selected."""
    if mask.device.type == "cpu":
        index = torch.from_numpy(np.flatnonzero(mask.numpy()))
        return values.index_select(0, index)
    return values[mask]


def _binned_batch(
    name: str,
    inputs: tuple[Tensor, Tensor],
    scores: Tensor,
    mask: Tensor,
    num_bits: int,
    validate: bool,
) -> tuple[Tensor, Tensor]:
    """Histogram of the bins of every pixel of a batch, and the bins of its anomalous pixels.

    Args:
        name: metric name for error messages.
        inputs: ``(preds, target)`` exactly as passed to ``update`` (the key of the shared
            result, see :class:`_SharedBins`).
        scores: (B, H, W) real scores from ``preds``.
        mask: (B, H, W) bool from ``target``.
        num_bits: bin resolution.
        validate: raise on NaN scores (read from the histogram, see
            :func:`~stad.metrics.functional.histogram_has_nan`).

    Returns:
        ``(hist, anomalous_bins)``: int64 ``(2 ** num_bits,)`` over all pixels, and int32
        ``(A,)`` bins of the anomalous pixels in the order of ``scores[mask]``.
    """
    preds, target = inputs
    hist, anomalous_bins = _SHARED_BINS.get(preds, target, num_bits)
    if hist is None:
        bins = F.score_bins(scores, num_bits).reshape(-1)
        hist = torch.bincount(bins, minlength=1 << num_bits)
        anomalous_bins = _select(bins, mask.reshape(-1))
        del bins
    if validate and F.histogram_has_nan(hist, scores, num_bits):
        _raise_nan(name)
    _SHARED_BINS.put(preds, target, num_bits, hist, anomalous_bins)
    return hist, anomalous_bins


class _SharedBins(threading.local):
    """The last batch's histogram, reused by every binned metric updated with the same tensors.

    A run feeds each test batch to PixelAUROC, PRO (and sPRO) in turn; binning and counting
    every pixel is most of their update time, so the first metric's result serves the others.
    Entries are keyed on the very tensor objects passed to ``update`` (held weakly, so a freed
    and reallocated tensor can never match) and on their version counters (an in-place change
    invalidates); the entry is dropped as soon as the maps are freed. Per thread.
    """

    def __init__(self) -> None:
        self.entry: tuple[Any, ...] | None = None

    def get(self, preds: Tensor, target: Tensor, num_bits: int) -> tuple[Any, Any]:
        entry = self.entry
        if entry is None:
            return None, None
        preds_ref, preds_version, target_ref, target_version, bits, hist, anomalous = entry
        same = (
            preds_ref() is preds
            and target_ref() is target
            and _version(preds) == preds_version
            and _version(target) == target_version
            and bits == num_bits
        )
        return (hist, anomalous) if same else (None, None)

    def put(
        self, preds: Tensor, target: Tensor, num_bits: int, hist: Tensor, anomalous: Tensor
    ) -> None:
        def drop(_: object) -> None:
            self.entry = None

        self.entry = (
            weakref.ref(preds, drop),
            _version(preds),
            weakref.ref(target),
            _version(target),
            num_bits,
            hist,
            anomalous,
        )


def _version(tensor: Tensor) -> int | None:
    # Inference tensors (Lightning's test loop) have no version counter; they are never changed
    # in place between the metrics' updates of one batch (core.update_metric), so identity is
    # the key there.
    return None if tensor.is_inference() else tensor._version


_SHARED_BINS = _SharedBins()


def _numpy(state: Tensor | list[Tensor], dtype: torch.dtype) -> np.ndarray:
    return _cat(state, dtype, torch.device("cpu")).cpu().numpy()


class _AnomalyMetric(Metric):
    """Shared behaviour: follow the inputs' device, report an error bound next to the value."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validate_args = validate_args
        self._bound: Tensor | None = None
        # Why the last compute() was NaN (None when it was defined).
        self.undefined_reason: str | None = None

    def _follow(self, preds: Tensor) -> None:
        # Accumulate where the model runs: move the states to the inputs, never the reverse.
        if preds.device != self.device:
            self.to(preds.device)
        self._bound = None

    def _warn_nan(self, why: str) -> None:
        self.undefined_reason = why
        rank_zero_warn(f"{type(self).__name__} is undefined (NaN): {why}.", UserWarning)

    def error_bound(self) -> Tensor:
        """Largest possible distance between :meth:`compute`'s value and the exact metric.

        Zero in exact mode. Computes (and synchronises) the metric if needed.

        Returns:
            float64 scalar tensor (NaN when the metric itself is NaN).
        """
        self.compute()  # every real compute() stores the bound; a cached value keeps its bound
        if self._bound is None:
            raise RuntimeError(f"{type(self).__name__}.compute() did not store an error bound")
        return self._bound

    def _synced(self) -> Any:
        """The states gathered across processes, as ``compute`` sees them (a context); a no-op
        inside a caller's own ``sync_context`` (syncing twice is an error)."""
        if self._is_synced:
            return contextlib.nullcontext()
        return self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync,
            should_unsync=self._should_unsync,
        )

    def reset(self) -> None:
        """Clear the states and the stored error bound."""
        super().reset()
        self._bound = None
        self.undefined_reason = None


class ImageAUROC(_AnomalyMetric):
    """Exact ROC AUC of image scores against image labels over the test set.

    Every score is kept (a test set has at most a few thousand images). Raw, unbounded scores
    are fine: only their order matters.

    Example:
        >>> metric = ImageAUROC()
        >>> metric.update(torch.tensor([0.1, 5.0, 98.0]), torch.tensor([0, 1, 1]))
        >>> float(metric.compute())
        1.0
    """

    preds: list[Tensor]
    target: list[Tensor]

    def __init__(self, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(validate_args=validate_args, **kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of image scores.

        Args:
            preds: (B,) real image scores (B x 1 accepted).
            target: (B,) labels, 0/1 or bool (1 = anomalous).
        """
        if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
            raise StadError(
                f"ImageAUROC.update expects tensors, got {type(preds)}, {type(target)}."
            )
        scores, labels = preds.detach().reshape(-1), target.reshape(-1)
        if preds.squeeze().ndim > 1 or scores.numel() != labels.numel():
            raise StadError(
                f"ImageAUROC needs one score per image, shapes (B,) and (B,), got "
                f"{tuple(preds.shape)} and {tuple(target.shape)}: reduce the anomaly map to an "
                "image score first."
            )
        self._follow(scores)
        labels = labels.to(scores.device)
        if self.validate_args:
            _check_values("ImageAUROC", scores, labels)
        self.preds.append(scores.to(_score_dtype(scores)))
        self.target.append(labels > 0)

    def compute(self) -> Tensor:
        """Image AUROC (float64 scalar; NaN with a warning when a class is missing)."""
        preds = _cat(self.preds, torch.float32, self.device)
        target = _cat(self.target, torch.bool, self.device)
        value = F.binary_auroc(preds, target)
        if torch.isnan(value):
            self._warn_nan("the test set needs both normal and anomalous images")
        self._bound = torch.zeros((), dtype=torch.float64, device=value.device)
        return value

    def scores(self) -> tuple[Tensor, Tensor]:
        """Every image score and label seen so far, over all processes (gathered like
        :meth:`compute`): ``(scores float32 (N,), labels int64 (N,))`` on the CPU, in update
        order per process."""
        with self.sync_context():
            preds = _cat(self.preds, torch.float32, self.device)
            target = _cat(self.target, torch.bool, self.device)
        return preds.float().cpu(), target.long().cpu()

    def curve(self, max_points: int | None = None) -> tuple[Tensor, Tensor]:
        """The exact ROC curve whose area :meth:`compute` returns.

        The points of ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``: (0, 0), then
        one per distinct score from the highest down.

        Args:
            max_points: thin to at most this many points for plotting (:func:`thin_curve`);
                None keeps every point.

        Returns:
            ``(fpr, tpr)``: float64 (K,) CPU tensors; empty when a class is missing.
        """
        with self._synced():
            scores = _numpy(self.preds, torch.float32)
            labels = _numpy(self.target, torch.bool).astype(bool)
        if labels.all() or not labels.any():
            return F.empty_curve()
        fpr, tpr = F.curve_from_scores(scores[~labels], scores[labels])
        return F.thin_curve(*F.as_curve(fpr, tpr), max_points)


class _PixelMetric(_AnomalyMetric):
    """Mode handling shared by the pixel metrics."""

    def __init__(
        self,
        mode: Mode = "binned",
        num_bits: int = F.DEFAULT_NUM_BITS,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(validate_args=validate_args, **kwargs)
        if mode not in _MODES:
            raise StadError(
                f"{type(self).__name__} mode={mode!r} is unknown: use 'binned' (bounded memory, "
                "default) or 'exact' (keeps every pixel)."
            )
        self.mode = mode
        self.num_bits = F.check_num_bits(num_bits)

    @property
    def num_bins(self) -> int:
        """Number of histogram bins of the binned mode."""
        return 1 << self.num_bits

    def _histogram(self, bins: Tensor) -> Tensor:
        return torch.bincount(bins, minlength=self.num_bins)

    def _pixel_inputs(self, name: str, preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        # Binned modes check NaN on the batch histogram (_binned_batch), not pixel by pixel.
        exact = self.mode == "exact"
        return _pixel_inputs(name, preds, target, self.validate_args, check_nan=exact)

    def _binned_batch(
        self, name: str, inputs: tuple[Tensor, Tensor], scores: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        return _binned_batch(name, inputs, scores, mask, self.num_bits, self.validate_args)


class PixelAUROC(_PixelMetric):
    """ROC AUC over all test pixels (anomaly map against the 0/1 ground-truth mask).

    Args:
        mode: "binned" (default; two int64 histograms, bounded memory) or "exact" (every pixel).
        num_bits: binned resolution: 2**num_bits bins, 2**(num_bits-9) per octave of scores.
        validate_args: check for NaN scores and non-binary masks (one device sync per batch).
        kwargs: passed to ``torchmetrics.Metric`` (e.g. ``compute_on_cpu``).
    """

    # States (add_state): the histograms in binned mode, the score lists in exact mode.
    positive_hist: Tensor
    negative_hist: Tensor
    normal_scores: list[Tensor]
    anomalous_scores: list[Tensor]

    def __init__(
        self,
        mode: Mode = "binned",
        num_bits: int = F.DEFAULT_NUM_BITS,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(mode=mode, num_bits=num_bits, validate_args=validate_args, **kwargs)
        if self.mode == "binned":
            zeros = torch.zeros(self.num_bins, dtype=torch.int64)
            self.add_state("positive_hist", default=zeros.clone(), dist_reduce_fx="sum")
            self.add_state("negative_hist", default=zeros.clone(), dist_reduce_fx="sum")
        else:
            self.add_state("normal_scores", default=[], dist_reduce_fx="cat")
            self.add_state("anomalous_scores", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of anomaly maps.

        Args:
            preds: (B, 1, H, W) or (B, H, W) real anomaly maps.
            target: masks of the same shape, 0/1 or bool.
        """
        scores, mask = self._pixel_inputs("PixelAUROC", preds, target)
        self._follow(scores)
        if self.mode == "binned":
            hist, anomalous_bins = self._binned_batch("PixelAUROC", (preds, target), scores, mask)
            # The few anomalous pixels move from the all-pixel count to the positive one.
            ones = torch.ones((), dtype=torch.int64, device=hist.device)
            ones = ones.expand(anomalous_bins.shape)
            self.positive_hist.index_add_(0, anomalous_bins, ones)
            self.negative_hist += hist
            self.negative_hist.index_add_(0, anomalous_bins, -ones)
        else:
            self.normal_scores.append(scores[~mask])
            self.anomalous_scores.append(scores[mask])

    def compute(self) -> Tensor:
        """Pixel AUROC (float64 scalar; NaN with a warning when a class is missing)."""
        if self.mode == "binned":
            value, self._bound = F.auroc_from_histograms(self.positive_hist, self.negative_hist)
        else:
            normal = _sorted_state(self.normal_scores, self.device)
            anomalous = _cat(self.anomalous_scores, normal.dtype, self.device)
            value = F.auroc_from_scores(normal, anomalous, negatives_sorted=True)
            self._bound = torch.zeros((), dtype=torch.float64, device=value.device)
        if torch.isnan(value):
            self._warn_nan("the test set needs both normal and anomalous pixels")
        return value

    def curve(self, max_points: int | None = None) -> tuple[Tensor, Tensor]:
        """The pixel ROC curve whose area :meth:`compute` returns.

        Exact mode: one point per distinct score; binned mode: one per non-empty bin (each bin
        a tie group), so its area is the binned value, within :meth:`error_bound` of the exact.

        Args:
            max_points: thin to at most this many points for plotting (:func:`thin_curve`);
                None keeps every point (up to one per bin or per distinct pixel score).

        Returns:
            ``(fpr, tpr)``: float64 (K,) CPU tensors, from (0, 0) to (1, 1); empty when a class
            is missing.
        """
        with self._synced():
            if self.mode == "binned":
                positives = float(self.positive_hist.sum())
                if positives == 0 or int(self.negative_hist.sum()) == 0:
                    return F.empty_curve()
                fpr, tpr = F.curve_from_histograms(
                    self.negative_hist, self.positive_hist, positives
                )
            else:
                normal = _numpy(self.normal_scores, torch.float32)
                anomalous = _numpy(self.anomalous_scores, torch.float32)
                if normal.size == 0 or anomalous.size == 0:
                    return F.empty_curve()
                fpr, tpr = F.curve_from_scores(normal, anomalous)
        return F.thin_curve(*F.as_curve(fpr, tpr), max_points)


class PixelAP(PixelAUROC):
    """Average precision over all test pixels (the area under the precision-recall curve as
    ``sklearn.metrics.average_precision_score`` computes it: no interpolation, ties one
    threshold), with the states and modes of :class:`PixelAUROC`.

    Binned mode: each bin is one tie group; :meth:`error_bound` bounds the distance to the exact
    value from the histograms (:func:`~stad.metrics.functional.average_precision_from_histograms`).
    """

    def compute(self) -> Tensor:
        """Pixel AP (float64 scalar; NaN with a warning when no test pixel is anomalous)."""
        if self.mode == "binned":
            value, self._bound = F.average_precision_from_histograms(
                self.positive_hist, self.negative_hist
            )
        else:
            normal = _cat(self.normal_scores, torch.float32, self.device)
            anomalous = _cat(self.anomalous_scores, normal.dtype, self.device)
            value = F.average_precision_from_scores(normal, anomalous)
            self._bound = torch.zeros((), dtype=torch.float64, device=value.device)
        if torch.isnan(value):
            self._warn_nan("the test set needs anomalous pixels")
        return value

    def curve(self, max_points: int | None = None) -> tuple[Tensor, Tensor]:
        """Not offered: the report plots the ROC curves; the AP is a number."""
        raise NotImplementedError("PixelAP has no curve; use PixelAUROC.curve for the ROC")


class PRO(_PixelMetric):
    """Normalised area under the per-region-overlap curve up to an FPR limit (Bergmann et al.).

    Regions are the 8-connected components of each mask; PRO(t) is the mean over all regions of
    the test set of the fraction of the region above t, FPR(t) the fraction of all normal pixels
    above t. The area from FPR 0 to ``fpr_limit`` (curve interpolated at the limit) is divided by
    ``fpr_limit``, as in MVTec's official evaluation code. The connected-component labelling runs
    on the CPU per batch; everything else stays on the inputs' device.

    Args:
        fpr_limit: upper FPR limit of the integral, in (0, 1].
        mode: "binned" (default; an int64 normal histogram and a float64 histogram of
            1 / region area, bounded memory) or "exact" (every pixel).
        num_bits: binned resolution: 2**num_bits bins, 2**(num_bits-9) per octave of scores.
        validate_args: check for NaN scores and non-binary masks.
        kwargs: passed to ``torchmetrics.Metric``.
    """

    # States (add_state): the histograms in binned mode, the score lists in exact mode.
    num_regions: Tensor
    normal_hist: Tensor
    region_weight_hist: Tensor
    normal_scores: list[Tensor]
    anomalous_scores: list[Tensor]
    anomalous_weights: list[Tensor]

    def __init__(
        self,
        fpr_limit: float = 0.3,
        mode: Mode = "binned",
        num_bits: int = F.DEFAULT_NUM_BITS,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(mode=mode, num_bits=num_bits, validate_args=validate_args, **kwargs)
        self.fpr_limit = F.check_fpr_limit(fpr_limit)
        self.add_state(
            "num_regions", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum"
        )
        if self.mode == "binned":
            self.add_state(
                "normal_hist",
                default=torch.zeros(self.num_bins, dtype=torch.int64),
                dist_reduce_fx="sum",
            )
            self.add_state(
                "region_weight_hist",
                default=torch.zeros(self.num_bins, dtype=torch.float64),
                dist_reduce_fx="sum",
            )
        else:
            self.add_state("normal_scores", default=[], dist_reduce_fx="cat")
            self.add_state("anomalous_scores", default=[], dist_reduce_fx="cat")
            self.add_state("anomalous_weights", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of anomaly maps.

        Args:
            preds: (B, 1, H, W) or (B, H, W) real anomaly maps.
            target: masks of the same shape, 0/1 or bool.
        """
        scores, mask = self._pixel_inputs("PRO", preds, target)
        self._follow(scores)
        if self.mode == "binned":  # first: a NaN batch raises before any state changes
            hist, anomalous_bins = self._binned_batch("PRO", (preds, target), scores, mask)
        weights, num_regions = F.label_regions(mask)
        self.num_regions += num_regions
        if self.mode == "binned":
            self.normal_hist += hist
            ones = torch.ones((), dtype=torch.int64, device=hist.device)
            self.normal_hist.index_add_(0, anomalous_bins, -ones.expand(anomalous_bins.shape))
            # index_add_ rather than bincount(weights=...): deterministic on CUDA.
            self.region_weight_hist.index_add_(0, anomalous_bins, weights)
        else:
            self.normal_scores.append(scores[~mask])
            self.anomalous_scores.append(scores[mask])
            self.anomalous_weights.append(weights)

    def compute(self) -> Tensor:
        """AU-PRO up to ``fpr_limit`` (float64 scalar in [0, 1]; NaN warns if undefined)."""
        num_regions = int(self.num_regions)
        if self.mode == "binned":
            value, self._bound = F.pro_from_histograms(
                self.normal_hist, self.region_weight_hist, num_regions, self.fpr_limit
            )
            num_normal = int(self.normal_hist.sum())
        else:
            normal = _sorted_state(self.normal_scores, self.device)
            value = F.pro_from_scores(
                normal,
                _cat(self.anomalous_scores, normal.dtype, self.device),
                _cat(self.anomalous_weights, torch.float64, self.device),
                num_regions,
                self.fpr_limit,
                normal_sorted=True,
            )
            num_normal = normal.numel()
            self._bound = torch.zeros((), dtype=torch.float64, device=value.device)
        if num_regions == 0:
            self._warn_nan("the test set has no anomalous pixel (no ground-truth region)")
        elif num_normal == 0:
            self._warn_nan("the test set has no normal pixel")
        return value

    def curve(self, max_points: int | None = None) -> tuple[Tensor, Tensor]:
        """The PRO curve from FPR 0 to ``fpr_limit``, whose area / limit :meth:`compute` returns.

        Points as in :meth:`PixelAUROC.curve` with PRO in place of the TPR, the last one
        interpolated at exactly ``fpr_limit``.

        Args:
            max_points: thin to at most this many points for plotting (:func:`thin_curve`);
                None keeps every point.

        Returns:
            ``(fpr, pro)``: float64 (K,) CPU tensors, fpr from 0 to ``fpr_limit``; empty
            without ground-truth regions or normal pixels.
        """
        with self._synced():
            num_regions = int(self.num_regions)
            if self.mode == "binned":
                if num_regions == 0 or int(self.normal_hist.sum()) == 0:
                    return F.empty_curve()
                fpr, pro = F.curve_from_histograms(
                    self.normal_hist, self.region_weight_hist, num_regions
                )
            else:
                normal = _numpy(self.normal_scores, torch.float32)
                if num_regions == 0 or normal.size == 0:
                    return F.empty_curve()
                # Scores below the (n + 1)-th highest normal one lie past the limit (n = limit
                # share of the normal pixels); that one is the first point beyond it.
                rank = min(normal.size - 1, int(self.fpr_limit * normal.size))
                lowest = np.partition(normal, normal.size - 1 - rank)[normal.size - 1 - rank]
                fpr, pro = F.curve_from_scores(
                    normal,
                    _numpy(self.anomalous_scores, torch.float32),
                    _numpy(self.anomalous_weights, torch.float64),
                    num_regions,
                    lowest,
                )
        fpr, pro = F.cut_curve_at(fpr, pro, self.fpr_limit)
        return F.thin_curve(*F.as_curve(fpr, pro), max_points, x_range=self.fpr_limit)
