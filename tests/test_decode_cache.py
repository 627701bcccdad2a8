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
    entries = sorted((tmp_path / "cache").rglob("*" + DecodeCache.SUFFIX))
    assert len(entries) == 2
    for entry in entries:
        entry.write_bytes(b"not a cache entry")
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
    n_files = len(list(folder.rglob("*" + DecodeCache.SUFFIX)))
    assert n_files == len(splits.train) + len(splits.test)
    assert build_dataset(cfg.dataset, 64).train.cache is None  # outside the block: off


# ----------------------------------------------------------------------------- the raw format


def _one_entry(tmp_path: Path) -> tuple[DecodeCache, str, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 16, 20), dtype=np.uint8)
    mask = (rng.random((16, 20)) > 0.7).astype(np.uint8)
    cache = DecodeCache(tmp_path / "cache")
    cache.store("ab" + "0" * 62, image, mask, 17)
    return cache, "ab" + "0" * 62, image, mask


def test_raw_entry_round_trips_writable_arrays(tmp_path: Path) -> None:
    cache, key, image, mask = _one_entry(tmp_path)
    loaded = cache.load(key, (16, 20))
    assert loaded is not None
    np.testing.assert_array_equal(loaded[0], image)
    np.testing.assert_array_equal(loaded[1], mask)
    assert loaded[2] == 17 and loaded[0].flags.writeable and loaded[1].flags.writeable
    cache.store(key, image, mask, None)
    assert cache.load(key, (16, 20))[2] is None  # type: ignore[index]


@pytest.mark.parametrize("damage", ["truncate", "extend", "flip_pixel", "flip_count", "magic"])
def test_damaged_raw_entry_is_a_miss(tmp_path: Path, damage: str) -> None:
    cache, key, _, _ = _one_entry(tmp_path)
    path = cache.path(key)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-1]
    elif damage == "extend":
        data += b"\0"
    elif damage == "flip_pixel":
        data[-5] ^= 1  # the checksum covers the payload
    elif damage == "flip_count":
        data[16] ^= 1  # the checksum covers the header's fields too
    else:
        data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cache.load(key, (16, 20)) is None and cache.misses == 1


def test_entry_read_at_another_size_is_a_miss(tmp_path: Path) -> None:
    cache, key, _, _ = _one_entry(tmp_path)
    assert cache.load(key, (20, 16)) is None  # same byte count, other layout
    assert cache.load(key, (16, 21)) is None


def test_reading_the_cache_parses_no_python_source(tmp_path: Path, monkeypatch) -> None:
    """numpy's ``.npy`` header parsing (``ast.literal_eval``) races on CPython <= 3.11.7."""
    import ast

    samples = _samples(tmp_path)
    AnomalyDataset(samples, 16, cache=tmp_path / "cache")

    def refuse(*args, **kwargs):
        raise AssertionError("the decode cache parsed Python source")

    monkeypatch.setattr(ast, "parse", refuse)
    monkeypatch.setattr(np.lib.format, "read_array_header_1_0", refuse)
    monkeypatch.setattr(np.lib.format, "read_array_header_2_0", refuse)
    cache = DecodeCache(tmp_path / "cache")
    AnomalyDataset(samples, 16, cache=cache)
    assert (cache.hits, cache.misses) == (2, 0)
