"""DecodeCache: cached datasets equal decoded ones; edits, sizes and corruption are misses."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stad.data.base import AnomalyDataset, Sample
from stad.data.images import DecodeCache
from stad.errors import DatasetError


def _write(path: Path, seed: int, size: int = 24) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _samples(root: Path) -> list[Sample]:
    _write(root / "a.png", 0)
    _write(root / "b.png", 1)
    mask = np.zeros((24, 24), dtype=np.uint8)
    mask[3:9, 5:12] = 255
    Image.fromarray(mask, mode="L").save(root / "b_mask.png")
    return [
        Sample(root / "a.png", None, 0, "good"),
        Sample(root / "b.png", root / "b_mask.png", 1, "crack"),
    ]


def _arrays(dataset: AnomalyDataset) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(item["image"].numpy(), item["mask"].numpy()) for item in dataset]


def _assert_same(left: AnomalyDataset, right: AnomalyDataset) -> None:
    for (image_l, mask_l), (image_r, mask_r) in zip(_arrays(left), _arrays(right), strict=True):
        np.testing.assert_array_equal(image_l, image_r)
        np.testing.assert_array_equal(mask_l, mask_r)


@pytest.mark.parametrize("preload", [True, False])
def test_cached_dataset_equals_decoded_and_second_run_hits(tmp_path: Path, preload: bool) -> None:
    samples = _samples(tmp_path)
    plain = AnomalyDataset(samples, 16)
    first = AnomalyDataset(samples, 16, preload=preload, cache=tmp_path / "cache")
    _assert_same(plain, first)
    assert first.cache is not None and first.cache.hits == 0
    second = AnomalyDataset(samples, 16, preload=preload, cache=tmp_path / "cache")
    _assert_same(plain, second)
    assert second.cache is not None and second.cache.misses == 0 and second.cache.hits >= 2


def test_edited_source_and_other_size_miss(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    cache = DecodeCache(tmp_path / "cache")
    AnomalyDataset(samples, 16, cache=cache)
    _write(tmp_path / "a.png", 7)  # new content; make sure the mtime differs too
    stat = (tmp_path / "a.png").stat()
    os.utime(tmp_path / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    cache = DecodeCache(tmp_path / "cache")
    edited = AnomalyDataset(samples, 16, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)  # b.png hit, the edited a.png decoded again
    _assert_same(edited, AnomalyDataset(samples, 16))
    cache = DecodeCache(tmp_path / "cache")
    AnomalyDataset(samples, (16, 20), cache=cache)
    assert (cache.hits, cache.misses) == (0, 2)


def test_corrupt_entry_is_rebuilt(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    cache = DecodeCache(tmp_path / "cache")
    AnomalyDataset(samples, 16, cache=cache)
    entries = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(entries) == 2
    for entry in entries:
        entry.write_bytes(b"not an npz file")
    cache = DecodeCache(tmp_path / "cache")
    rebuilt = AnomalyDataset(samples, 16, cache=cache)
    assert cache.misses == 2
    _assert_same(rebuilt, AnomalyDataset(samples, 16))
    cache = DecodeCache(tmp_path / "cache")
    AnomalyDataset(samples, 16, cache=cache)
    assert (cache.hits, cache.misses) == (2, 0)


def test_missing_file_still_raises_dataset_error(tmp_path: Path) -> None:
    samples = [Sample(tmp_path / "missing.png", None, 0, "good")]
    with pytest.raises(DatasetError, match=r"missing\.png"):
        AnomalyDataset(samples, 16, cache=tmp_path / "cache")


def test_unwritable_cache_warns_and_still_decodes(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="decode cache"):
        dataset = AnomalyDataset(samples, 16, cache=blocker)
    _assert_same(dataset, AnomalyDataset(samples, 16))


def test_the_run_config_reaches_every_dataset_built_in_its_block(tiny_config, tmp_path: Path):
    from stad.data import build_dataset
    from stad.data.base import decode_cache

    cfg = tiny_config()
    folder = tmp_path / "decoded"
    with decode_cache(folder):
        splits = build_dataset(cfg.dataset, 64)
    assert splits.train.cache is not None and splits.test.cache is not None
    n_files = len(list(folder.rglob("*.npz")))
    assert n_files == len(splits.train) + len(splits.test)
    assert build_dataset(cfg.dataset, 64).train.cache is None  # outside the block: off
