"""The binned metrics' fast paths give the plain computation's answers.

Shared batch binning (PixelAUROC and PRO fed the same tensors), NaN detection from the
histogram, and region labelling restricted to the mask rows holding anomalous pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch

from stad.errors import StadError
from stad.metrics import PRO, PixelAUROC
from stad.metrics import functional as F


def _case(seed: int, n: int = 4, size: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    masks = torch.from_numpy(rng.random((n, size, size)) < 0.08)
    maps = torch.from_numpy(rng.normal(size=(n, size, size)).astype(np.float32)) + masks * 1.0
    return maps, masks


def test_shared_binning_follows_in_place_changes() -> None:
    maps, masks = _case(0)
    auroc, pro = PixelAUROC(), PRO()
    auroc.update(maps, masks)
    pro.update(maps, masks)  # served from the shared binning of the same tensors
    fresh = PRO()
    fresh.update(maps.clone(), masks.clone())
    assert float(pro.compute()) == float(fresh.compute())
    maps[masks] -= 3.0  # in place: the version counter changes, the shared result is stale
    changed = PRO()
    changed.update(maps, masks)
    reference = PRO()
    reference.update(maps.clone(), masks.clone())
    assert float(changed.compute()) == float(reference.compute())
    assert float(changed.compute()) < float(fresh.compute())


@pytest.mark.parametrize("bits", [0x7F800001, 0x7FC00000, 0xFFC00000, 0xFF800123])
def test_every_nan_pattern_is_caught(bits: int) -> None:
    maps, masks = _case(1)
    nan = torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)
    assert torch.isnan(nan).all()
    maps[2, 3, 4] = nan[0]
    for metric in (PixelAUROC(), PRO()):
        with pytest.raises(StadError, match="NaN"):
            metric.update(maps, masks)


def test_infinities_are_not_nan() -> None:
    maps, masks = _case(2)
    maps[0, 0, 0], maps[1, 1, 1] = float("inf"), float("-inf")
    metric = PixelAUROC()
    metric.update(maps, masks)
    assert 0.0 <= float(metric.compute()) <= 1.0


@pytest.mark.parametrize(("size", "seed"), [(20, 0), (24, 1), (13, 2), (32, 3)])
def test_row_restricted_labelling_equals_full_labelling(size: int, seed: int) -> None:
    _, masks = _case(seed, n=5, size=size)
    masks[1, -1, :] = True  # touches the next image's first row: must stay separate
    masks[2, 0, :] = True
    masks[3] = False  # an empty image between anomalous ones
    weights, count = F.label_regions(masks)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, expected_count = scipy.ndimage.label(masks.numpy(), structure=structure)
    areas = np.bincount(labels.ravel())
    expected = 1.0 / areas[labels[masks.numpy()]]
    assert count == expected_count
    np.testing.assert_array_equal(weights.numpy(), expected)


def test_shared_binning_works_on_inference_tensors():
    with torch.inference_mode():
        maps = torch.rand(2, 1, 16, 16)
        masks = torch.zeros(2, 1, 16, 16)
        masks[0, 0, 4:8, 4:8] = 1
        auroc, pro = PixelAUROC(), PRO()
        auroc.update(maps, masks)
        pro.update(maps, masks)
        assert 0.0 <= float(auroc.compute()) <= 1.0 and 0.0 <= float(pro.compute()) <= 1.0
