"""Inference speed of any Method: milliseconds per image at batch 1, images per second at 32.

The run calls :func:`measure_inference` once after testing, on a few test images, and writes the
result into its record; ``benchmarks/inference_speed.py`` uses the same function for every
method. Timings are taken in eval mode without gradients, after warm-up calls (lazy
initialisation, cuDNN autotuning, allocator growth), with the accelerator synchronised before
every clock read, and reported as the median over repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from stad.core import Batch, Method

__all__ = ["InferenceSpeed", "measure_inference", "repeat_batch"]


@dataclass(frozen=True)
class InferenceSpeed:
    """Measured inference speed of one method on one device.

    Attributes:
        ms_per_image_batch1: median milliseconds of one forward pass on one image.
        images_per_s_batch32: images per second of forward passes on batches of 32 (the batch
            size is ``batch_size`` when another one was asked for).
        batch_size: the large batch size actually used (32 by default).
        device: where it ran (``cpu`` or the accelerator's name).
        repeats: timed calls behind each median (batch 1, large batch).
    """

    ms_per_image_batch1: float
    images_per_s_batch32: float
    batch_size: int
    device: str
    repeats: tuple[int, int]

    def as_dict(self) -> dict[str, Any]:
        """Plain values for the run record."""
        values = asdict(self)
        values["repeats"] = list(self.repeats)
        return values


def repeat_batch(batch: Batch, size: int) -> Batch:
    """A batch of exactly ``size`` samples, cycling through ``batch``'s samples.

    Tensor entries are indexed along dim 0, list/tuple entries (paths, defect names) likewise;
    anything else is kept as is.

    Args:
        batch: a batch dict with at least ``image`` (B×C×H×W).
        size: the number of samples wanted.
    """
    n = batch["image"].shape[0]
    index = [i % n for i in range(size)]
    out: Batch = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n:
            out[key] = value[torch.tensor(index, device=value.device)]
        elif isinstance(value, list | tuple) and len(value) == n:
            out[key] = [value[i] for i in index]
        else:
            out[key] = value
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(
    method: Method, batch: Batch, warmup: int, repeats: int, budget_s: float
) -> tuple[float, int]:
    """Median seconds of ``method(batch)``; stops early (after >= 1 call) past ``budget_s``."""
    device = batch["image"].device
    for _ in range(warmup):
        method(batch)
    _sync(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - started < budget_s):
        start = time.perf_counter()
        method(batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def measure_inference(
    method: Method,
    batch: Batch,
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 2,
    repeats: int = 10,
    budget_s: float = 20.0,
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> InferenceSpeed:
    """Time a method's full forward (teacher, student, scorer) at batch 1 and a large batch.

    The method's train/eval modes are restored afterwards; its weights are untouched.

    Args:
        method: the (trained or untrained: speed does not depend on weights) method, on the
            device to time.
        batch: a batch dict on that device (``image`` B×C×H×W plus whatever the method reads,
            e.g. ``depth``); its samples are cycled to fill each batch size.
        batch_sizes: ``(small, large)``: 1 and 32 for the run record.
        warmup: untimed calls per batch size.
        repeats: timed calls per batch size (median), fewer when ``budget_s`` runs out.
        budget_s: seconds of timed calls per batch size after which no new call starts.
        channels_last: feed images in channels_last memory format (as the run does when
            ``trainer.channels_last``; convert the method itself beforehand).
        autocast_dtype: run under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``
            for ``bf16-mixed`` runs), or None for the method's own precision.

    Returns:
        The :class:`InferenceSpeed`.
    """
    small, large = batch_sizes
    device = batch["image"].device
    batches = []
    for size in (small, large):
        sized = repeat_batch(batch, size)
        if channels_last:
            sized["image"] = sized["image"].contiguous(memory_format=torch.channels_last)
        batches.append(sized)
    modes = {name: module.training for name, module in method.named_modules()}
    method.eval()
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else torch.autocast(device.type, enabled=False)
    )
    try:
        with torch.inference_mode(), autocast:
            small_s, small_n = _median_seconds(method, batches[0], warmup, repeats, budget_s)
            large_s, large_n = _median_seconds(method, batches[1], warmup, repeats, budget_s)
    finally:
        for name, module in method.named_modules():
            module.training = modes[name]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return InferenceSpeed(
        ms_per_image_batch1=1000.0 * small_s / small,
        images_per_s_batch32=large / large_s,
        batch_size=large,
        device=name,
        repeats=(small_n, large_n),
    )
