"""Hostile dataset files: broken, exotic and oddly named inputs, and the data fingerprint.

Every case is read correctly or stopped with one DatasetError naming the file, and nothing is
left half-written (no cache entry for a file that failed). Files are generated in tmp_path; the
expected values are computed independently of stad's decoding (numpy on the written arrays).
"""

from __future__ import annotations

import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageFile
from torch.utils.data import Subset

from stad.data import build_dataset
from stad.data.base import AnomalyDataset, DatasetSplits, Sample, data_fingerprint
from stad.data.fakes import (
    write_fake_btad,
    write_fake_folder,
    write_fake_mtd,
    write_fake_mvtec_loco,
    write_fake_visa,
)
from stad.data.images import DecodeCache, binarise_mask, mask_levels, open_image
from stad.data.mtd import build_mtd
from stad.data.mvtec import build_mvtec
from stad.data.mvtec3d import build_mvtec3d
from stad.data.synthetic3d import DEFECTS as DEFECTS_3D
from stad.data.synthetic3d import write_fake_mvtec3d
from stad.errors import DatasetError

SIZE = 16  # every generated image is SIZE x SIZE


def _rgb(seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _save(array_or_image: np.ndarray | Image.Image, path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = array_or_image
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    img.save(path, **kwargs)
    return path


def _category(root: Path) -> Path:
    """A tiny MVTec AD category (MVTec layout of the folder writer) at ``root``."""
    return write_fake_folder(root, n_train=2, n_test_good=1, defects={"crack": 1}, size_wh=(16, 16))


def _one(path: Path, mask: Path | None = None, **kwargs: object) -> dict:
    """The item of a one-sample dataset (mask given: an anomalous sample)."""
    sample = Sample(path, mask, int(mask is not None), "crack" if mask else "good")
    return AnomalyDataset([sample], SIZE, **kwargs)[0]


# ----------------------------------------------------------------------------- broken files


def _cut(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(b"" if how == "empty" else data[: len(data) // 2])


@pytest.mark.parametrize("ext", [".png", ".jpg"])
@pytest.mark.parametrize("how", ["half", "empty"])
@pytest.mark.parametrize("where", ["train/good/000.png", "test/crack/000.png"])
def test_truncated_and_empty_images_stop_with_the_path(
    tmp_path: Path, ext: str, how: str, where: str
) -> None:
    cat = _category(tmp_path / "ds" / "cat")
    good = cat / where
    bad = good.with_suffix(ext)
    _save(_rgb(), bad, **({"quality": 95} if ext == ".jpg" else {}))
    if bad != good:
        good.unlink()
    _cut(bad, how)
    with pytest.raises(DatasetError, match=r"Cannot (decode|read) image file") as info:
        build_mvtec(tmp_path / "ds", "cat", SIZE, preload=True)
    assert str(bad) in str(info.value)
    # Lazily: the header check, or else decoding on access, fails; never a padded image.
    with pytest.raises(DatasetError, match=r"Cannot (decode|read) image file") as info:
        splits = build_mvtec(tmp_path / "ds", "cat", SIZE, preload=False)
        for item in [*splits.train, *splits.test]:
            assert item["image"].shape == (3, SIZE, SIZE)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("how", ["half", "empty"])
def test_truncated_and_empty_masks_stop_with_the_path(tmp_path: Path, how: str) -> None:
    cat = _category(tmp_path / "ds" / "cat")
    mask = cat / "ground_truth/crack/000_mask.png"
    _cut(mask, how)
    with pytest.raises(DatasetError) as info:
        build_mvtec(tmp_path / "ds", "cat", SIZE)
    assert str(mask) in str(info.value)


def test_failed_decoding_leaves_no_cache_entry(tmp_path: Path) -> None:
    good = _save(_rgb(1), tmp_path / "good.png")
    bad = _save(_rgb(2), tmp_path / "bad.png")
    _cut(bad, "half")
    samples = [Sample(good, None, 0, "good"), Sample(bad, None, 0, "good")]
    cache = DecodeCache(tmp_path / "cache")
    with pytest.raises(DatasetError, match=r"bad\.png"):
        AnomalyDataset(samples, SIZE, cache=cache)
    entries = {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    bad_key = cache.key(bad, None, (SIZE, SIZE))
    assert cache.path(bad_key).name not in entries
    assert not any(name.endswith(".tmp") for name in entries)


def test_pil_never_pads_truncated_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stad.run  # noqa: F401  (imports every dependency a run uses: none may flip the flag)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    path = _save(_rgb(), tmp_path / "fine.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DatasetError, match="LOAD_TRUNCATED_IMAGES") as info:
        open_image(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- image modes


def _png16_rgb(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG, written by hand (PIL cannot write one)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def _palette_rgb(img: Image.Image) -> np.ndarray:
    """Colours of a palette image by looking indices up in its palette (no PIL conversion)."""
    palette = np.array(img.getpalette(), dtype=np.uint8).reshape(-1, 3)
    return palette[np.asarray(img)]


def _as_float(pixels: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, 3) uint8 -> the float32 (3, H, W) in [0, 1] a dataset should serve."""
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32) / 255)


def test_greyscale_is_repeated_over_three_channels(tmp_path: Path) -> None:
    grey = _rgb()[..., 0]
    image = _one(_save(grey, tmp_path / "l.png"))["image"]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    torch.testing.assert_close(image, _as_float(grey), atol=0, rtol=0)


@pytest.mark.parametrize("peak", [65535, 200])
def test_sixteen_bit_grey_is_scaled_by_65535(tmp_path: Path, peak: int) -> None:
    # peak 200: a dark 16-bit image must not be mistaken for 8-bit data (values up to 255).
    ramp = np.linspace(0, peak, SIZE * SIZE).round().astype(np.uint16).reshape(SIZE, SIZE)
    path = _save(ramp, tmp_path / "i16.png")
    assert Image.open(path).mode.startswith("I")
    image = _one(path)["image"]
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535).expand(3, -1, -1)
    assert (image - expected).abs().max() <= 0.5 / 255 + 1e-6


def test_sixteen_bit_rgb_is_scaled_by_65535(tmp_path: Path) -> None:
    pixels = np.random.default_rng(3).integers(0, 65536, (SIZE, SIZE, 3)).astype(np.uint16)
    image = _one(_png16_rgb(tmp_path / "rgb16.png", pixels))["image"]
    expected = torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32) / 65535)
    assert (image - expected).abs().max() <= 1 / 255


def test_rgba_drops_alpha_and_keeps_the_stored_colours(tmp_path: Path) -> None:
    rgb = _rgb(4)
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[:, : SIZE // 2] = 0  # fully transparent half: its colours still count
    alpha[0, -1] = 77
    path = _save(np.dstack([rgb, alpha]), tmp_path / "rgba.png")
    torch.testing.assert_close(_one(path)["image"], _as_float(rgb), atol=0, rtol=0)


def test_la_drops_alpha(tmp_path: Path) -> None:
    grey = _rgb(5)[..., 0]
    alpha = np.zeros_like(grey)
    path = _save(Image.fromarray(np.dstack([grey, alpha]), mode="LA"), tmp_path / "la.png")
    torch.testing.assert_close(_one(path)["image"], _as_float(grey), atol=0, rtol=0)


@pytest.mark.parametrize("transparency", [None, "index", "bytes"])
def test_palette_images_read_through_their_palette(tmp_path: Path, transparency: str | None):
    img = Image.fromarray(_rgb(6)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    if transparency == "index":
        img.info["transparency"] = 0
    elif transparency == "bytes":
        img.info["transparency"] = bytes([0, 128] + [255] * 6)
    path = _save(img, tmp_path / "p.png")
    reread = Image.open(path)
    assert reread.mode == "P" and ("transparency" in reread.info) == (transparency is not None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's "transparency expressed in bytes" warning too
        image = _one(path)["image"]
    torch.testing.assert_close(image, _as_float(_palette_rgb(img)), atol=0, rtol=0)


def test_one_bit_images_are_black_and_white(tmp_path: Path) -> None:
    bits = np.random.default_rng(7).random((SIZE, SIZE)) > 0.5
    path = _save(Image.fromarray(bits).convert("1"), tmp_path / "one.png")
    expected = torch.from_numpy(bits.astype(np.float32)).expand(3, -1, -1)
    torch.testing.assert_close(_one(path)["image"], expected, atol=0, rtol=0)


# ----------------------------------------------------------------------------- masks


def _defect() -> np.ndarray:
    """uint8 (SIZE, SIZE) levels: a block of 255 with a soft edge, a speck of 1, values 3 and 7."""
    levels = np.zeros((SIZE, SIZE), np.uint8)
    levels[2:6, 3:9] = 255
    levels[6, 3:9] = 90  # anti-aliased edge
    levels[1, 3:9] = 20
    levels[10, 10] = 1
    levels[12, 2:4] = 3
    levels[13, 2:4] = 7
    return levels


def _mask_file(tmp_path: Path, storage: str, levels: np.ndarray) -> Path:
    """``levels`` written in one storage of mask files."""
    path = tmp_path / f"mask_{storage}.png"
    binary = (levels > 0).astype(np.uint8)
    if storage == "0/255":
        return _save(binary * 255, path)
    if storage == "0/1":
        return _save(binary, path)
    if storage == "levels":  # soft edges and label values as they are
        return _save(levels, path)
    if storage == "rgb":  # one channel per value: red, green, blue, anything non-zero counts
        rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
        rgb[..., 0] = np.where(levels == 255, 255, 0)
        rgb[..., 2] = np.where((levels > 0) & (levels < 255), levels, 0)
        return _save(rgb, path)
    if storage == "16-bit":
        return _save(levels.astype(np.uint16), path)  # raw values: 1 of 65535 counts
    if storage == "palette":  # index 0 black, every other index some non-black colour
        img = Image.fromarray(levels, mode="P")
        img.putpalette([0, 0, 0] + [v for i in range(1, 256) for v in (i, 0, 255 - i)])
        return _save(img, path)
    if storage == "1-bit":
        return _save(Image.fromarray(binary.astype(bool)).convert("1"), path)
    raise AssertionError(storage)


STORAGES = ["0/255", "0/1", "levels", "rgb", "16-bit", "palette", "1-bit"]


@pytest.mark.parametrize("storage", STORAGES)
def test_any_non_zero_mask_pixel_is_anomalous(tmp_path: Path, storage: str) -> None:
    levels = _defect()
    image = _save(_rgb(), tmp_path / "image.png")
    mask = _one(image, _mask_file(tmp_path, storage, levels))["mask"]
    expected = torch.from_numpy((levels > 0).astype(np.float32))[None]
    torch.testing.assert_close(mask, expected, atol=0, rtol=0)


@pytest.mark.parametrize("preload", [True, False])
def test_mask_of_another_size_names_both_files(tmp_path: Path, preload: bool) -> None:
    image = _save(_rgb(), tmp_path / "image.png")
    mask = _save(np.zeros((SIZE, SIZE + 1), np.uint8), tmp_path / "mask.png")
    with pytest.raises(DatasetError) as info:
        AnomalyDataset([Sample(image, mask, 1, "crack")], SIZE, preload=preload)
    message = str(info.value)
    assert str(mask) in message and str(image) in message and f"{SIZE + 1}x{SIZE}" in message


def _levels_in(storage: str) -> tuple[Image.Image, np.ndarray]:
    """A soft mask (0, 40, 128, 200, 255) in one storage, and its levels on 0..255."""
    levels = np.array([[0, 40, 128, 200, 255]], np.uint8)
    if storage == "L":
        return Image.fromarray(levels, mode="L"), levels
    if storage == "I;16":
        return Image.fromarray(levels.astype(np.uint16) * 257), levels
    if storage == "RGB-blue":
        rgb = np.zeros((1, 5, 3), np.uint8)
        rgb[..., 2] = levels
        return Image.fromarray(rgb), levels
    if storage == "F":
        return Image.fromarray(levels.astype(np.float32) / 255, mode="F"), levels
    if storage == "LA":
        return Image.fromarray(np.dstack([levels, levels[:, ::-1]]), mode="LA"), levels
    binary = np.array([[0, 0, 1, 1, 1]], np.uint8)
    if storage == "0/1":
        return Image.fromarray(binary, mode="L"), binary * 255
    if storage == "1":
        return Image.fromarray(binary.astype(bool)).convert("1"), binary * 255
    raise AssertionError(storage)


@pytest.mark.parametrize("storage", ["L", "I;16", "RGB-blue", "F", "LA", "0/1", "1"])
def test_mask_levels_are_the_same_in_every_storage(storage: str) -> None:
    img, expected = _levels_in(storage)
    np.testing.assert_array_equal(mask_levels(img), expected)
    # The generic rule sees the same defect pixels.
    np.testing.assert_array_equal(binarise_mask(img), (expected > 0).astype(np.uint8))


def test_mtd_thresholds_its_soft_masks_and_visa_counts_label_values(tmp_path: Path) -> None:
    write_fake_mtd(tmp_path / "mtd", n_free=3, n_per_defect=1, defects=("Crack",))
    test = build_mtd(tmp_path / "mtd", SIZE * 2, preload=True).test
    for i, sample in enumerate(test.samples):
        if sample.mask_path is None:
            continue
        raw = np.asarray(Image.open(sample.mask_path))
        assert (raw > 0).sum() > (raw >= 128).sum()  # the fake has soft edges
        expected = Image.fromarray(((raw >= 128) * 255).astype(np.uint8))
        expected = np.asarray(expected.resize((SIZE * 2, SIZE * 2), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(test[i]["mask"][0].numpy(), expected > 0)
    write_fake_visa(tmp_path / "visa", n_train=2, n_test_good=1, n_anomalous=3)
    from stad.data.visa import build_visa

    test = build_visa(tmp_path / "visa", "candle", SIZE).test
    anomalous = [test[i]["mask"] for i, s in enumerate(test.samples) if s.label == 1]
    assert len(anomalous) == 3 and all(m.sum() > 0 for m in anomalous)  # values 1, 2, 3


# ----------------------------------------------------------------------------- MVTec 3D-AD


@pytest.fixture(scope="module")
def cloud_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec3d")
    write_fake_mvtec3d(root, n_train=1, n_validation=1, n_test_good=1, n_per_defect=1)
    return root


def _write_xyz(path: Path, xyz: np.ndarray) -> None:
    """Contiguous samples per pixel, like the dataset's files."""
    tifffile.imwrite(path, xyz, photometric="minisblack", planarconfig="contig")


def _copy(root: Path, to: Path) -> Path:
    shutil.copytree(root, to)
    return to


def _holes(xyz: np.ndarray, value: float) -> np.ndarray:
    """``xyz`` with a patch of missing points (all three coordinates) set to ``value``."""
    out = xyz.copy()
    out[10:14, 12:18] = value
    out[20, 5] = value
    return out


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_points_are_missing_points(
    cloud_root: Path, tmp_path: Path, value: float
) -> None:
    name = "bagel/train/good/xyz/000.tiff"
    xyz = tifffile.imread(cloud_root / name)
    zeros = _copy(cloud_root, tmp_path / "zeros")
    _write_xyz(zeros / name, _holes(xyz, 0.0))
    odd = _copy(cloud_root, tmp_path / "odd")
    _write_xyz(odd / name, _holes(xyz, value))
    reference = build_mvtec3d(zeros, "bagel", SIZE).train[0]
    item = build_mvtec3d(odd, "bagel", SIZE).train[0]
    assert torch.isfinite(item["depth"]).all() and torch.isfinite(item["foreground"]).all()
    torch.testing.assert_close(item["depth"], reference["depth"], atol=0, rtol=0)
    torch.testing.assert_close(item["foreground"], reference["foreground"], atol=0, rtol=0)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.ones((32, 32, 4), np.float32), r"shape \(32, 32, 4\)"),
        (np.ones((3, 32, 32), np.float32), r"shape \(3, 32, 32\)"),
        (np.ones((32, 32), np.float32), r"shape \(32, 32\)"),
        (np.ones((32, 32, 3), np.uint8), "uint8 values"),
    ],
)
@pytest.mark.parametrize("preload", [True, False])
def test_point_cloud_of_wrong_shape_or_type_is_named(
    cloud_root: Path, tmp_path: Path, array: np.ndarray, match: str, preload: bool
) -> None:
    root = _copy(cloud_root, tmp_path / "ds")
    path = root / "bagel/test/good/xyz/000.tiff"
    _write_xyz(path, array)
    with pytest.raises(DatasetError, match=match) as info:
        build_mvtec3d(root, "bagel", SIZE, preload=preload)
    assert str(path) in str(info.value)


def test_truncated_point_cloud_is_named(cloud_root: Path, tmp_path: Path) -> None:
    root = _copy(cloud_root, tmp_path / "ds")
    path = root / "bagel/validation/good/xyz/000.tiff"
    _cut(path, "half")
    with pytest.raises(DatasetError, match="Cannot decode point cloud file") as info:
        build_mvtec3d(root, "bagel", SIZE)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- odd paths

ODD_ROOT = ("dätä set", "ボトル")


def test_unicode_and_spaces_in_paths_read_end_to_end(tmp_path: Path) -> None:
    plain = _category(tmp_path / "plain" / "cat")
    odd_root = tmp_path.joinpath(*ODD_ROOT[:1])
    odd = odd_root / ODD_ROOT[1]
    shutil.copytree(plain, odd)
    # File names with spaces and non-ASCII letters too (the mask keeps the image's stem).
    os.rename(odd / "test/crack/000.png", odd / "test/crack/ö ü 1.png")
    os.rename(odd / "ground_truth/crack/000_mask.png", odd / "ground_truth/crack/ö ü 1_mask.png")
    expected = build_mvtec(tmp_path / "plain", "cat", SIZE)
    for preload in (True, False):
        splits = build_mvtec(odd_root, ODD_ROOT[1], SIZE, preload=preload)
        for mine, theirs in ((splits.train, expected.train), (splits.test, expected.test)):
            assert len(mine) == len(theirs)
            for a, b in zip(mine, theirs, strict=True):
                torch.testing.assert_close(a["image"], b["image"], atol=0, rtol=0)
                torch.testing.assert_close(a["mask"], b["mask"], atol=0, rtol=0)
    assert any("ö ü 1.png" in s.image_path.name for s in splits.test.samples)
    cached = AnomalyDataset(splits.test.samples, SIZE, cache=odd_root / "cäche ü")
    again = AnomalyDataset(splits.test.samples, SIZE, cache=odd_root / "cäche ü")
    assert again.cache is not None and again.cache.misses == 0
    torch.testing.assert_close(cached[0]["image"], again[0]["image"], atol=0, rtol=0)


def test_unicode_path_reads_point_clouds(cloud_root: Path, tmp_path: Path) -> None:
    root = _copy(cloud_root, tmp_path.joinpath(*ODD_ROOT))
    splits = build_mvtec3d(root, "bagel", SIZE)
    assert torch.isfinite(splits.test[0]["depth"]).all()


# ----------------------------------------------------------------------------- decode cache


def test_cache_misses_when_the_size_changes_but_the_mtime_does_not(tmp_path: Path) -> None:
    path = _save(_rgb(8), tmp_path / "a.png")
    samples = [Sample(path, None, 0, "good")]
    AnomalyDataset(samples, SIZE, cache=tmp_path / "cache")
    stat = path.stat()
    _save(_rgb(9, size=SIZE * 2), path)  # another picture, another file size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... with the old mtime
    assert path.stat().st_size != stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    cache = DecodeCache(tmp_path / "cache")
    fresh = AnomalyDataset(samples, SIZE, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1)
    torch.testing.assert_close(fresh[0]["image"], AnomalyDataset(samples, SIZE)[0]["image"])


# ----------------------------------------------------------------------------- fingerprint


def _mvtec_splits(root: Path, preload: bool = False) -> DatasetSplits:
    return build_mvtec(root, "cat", SIZE, preload=preload)


def test_fingerprint_counts_every_file_read(tmp_path: Path) -> None:
    cat = _category(tmp_path / "ds" / "cat")
    files = sorted(p for p in cat.rglob("*") if p.is_file())
    fingerprint = data_fingerprint(_mvtec_splits(tmp_path / "ds"))
    assert fingerprint["files"] == len(files) == 2 + 2 + 1  # train, test good + crack, mask
    assert fingerprint["bytes"] == sum(p.stat().st_size for p in files)
    assert len(fingerprint["sha256"]) == 64


def test_fingerprint_follows_names_and_sizes_not_location(tmp_path: Path) -> None:
    _category(tmp_path / "ds" / "cat")
    first = data_fingerprint(_mvtec_splits(tmp_path / "ds"))
    assert data_fingerprint(_mvtec_splits(tmp_path / "ds", preload=True)) == first
    moved = tmp_path.joinpath("elsewhere", *ODD_ROOT)
    shutil.copytree(tmp_path / "ds", moved)
    assert data_fingerprint(_mvtec_splits(moved)) == first  # same layout, another root

    train = tmp_path / "ds/cat/train/good"
    with (train / "001.png").open("ab") as f:
        f.write(b"\0")  # one byte appended: PNG readers ignore it, the fingerprint does not
    appended = data_fingerprint(_mvtec_splits(tmp_path / "ds"))
    assert appended["sha256"] != first["sha256"] and appended["bytes"] == first["bytes"] + 1

    os.rename(train / "001.png", train / "001b.png")
    renamed = data_fingerprint(_mvtec_splits(tmp_path / "ds"))
    assert renamed["sha256"] != appended["sha256"]
    assert (renamed["files"], renamed["bytes"]) == (appended["files"], appended["bytes"])


def test_fingerprint_sees_a_file_change_split(tmp_path: Path) -> None:
    files = [_save(_rgb(i), tmp_path / f"{i}.png") for i in range(3)]
    samples = [Sample(p, None, 0, "good") for p in files]

    def splits(n_train: int) -> DatasetSplits:
        return DatasetSplits(
            train=AnomalyDataset(samples[:n_train], SIZE, preload=False),
            test=AnomalyDataset(samples[n_train:], SIZE, preload=False),
        )

    one, two = data_fingerprint(splits(1)), data_fingerprint(splits(2))
    assert one["files"] == two["files"] == 3 and one["sha256"] != two["sha256"]


def test_fingerprint_through_torch_wrappers_and_missing_files(tmp_path: Path) -> None:
    files = [_save(_rgb(i), tmp_path / f"{i}.png") for i in range(3)]
    dataset = AnomalyDataset([Sample(p, None, 0, "good") for p in files], SIZE, preload=False)
    subset = data_fingerprint(DatasetSplits(train=Subset(dataset, [0, 2]), test=dataset))
    assert subset["files"] == 3
    direct = DatasetSplits(
        train=AnomalyDataset([dataset.samples[0], dataset.samples[2]], SIZE, preload=False),
        test=dataset,
    )
    assert data_fingerprint(direct) == subset
    files[1].unlink()
    with pytest.raises(DatasetError, match=r"1\.png"):
        data_fingerprint(DatasetSplits(train=dataset, test=dataset))


def _family(name: str, root: Path) -> tuple[dict, int]:
    """A dataset config of each family on a fake layout under ``root``, and the number of files
    its samples read (images + masks + point clouds)."""
    if name == "mvtec":
        _category(root / "cat")
        return {"name": name, "root": str(root), "category": "cat"}, 5
    if name == "folder":
        write_fake_folder(root, n_train=2, n_test_good=1, defects={"a": 1}, size_wh=(16, 16))
        return {"name": name, "root": str(root), "category": "custom"}, 5
    if name == "mvtec3d":
        write_fake_mvtec3d(root, n_train=1, n_validation=1, n_test_good=1, n_per_defect=1)
        n_test = 1 + len(DEFECTS_3D)  # good + one per default defect type
        return {"name": name, "root": str(root), "category": "bagel", "input": "rgbd"}, (
            2 * 2 + 3 * n_test
        )
    if name == "visa":
        write_fake_visa(root, n_train=2, n_test_good=1, n_anomalous=2, size_wh=(16, 16))
        # + the split file, which decides train and test
        return {"name": name, "root": str(root), "category": "candle"}, 2 + 1 + 2 * 2 + 1
    if name == "mvtec_loco":
        write_fake_mvtec_loco(root, n_train=2, n_validation=1, n_test_good=1, size_wh=(16, 16))
        # 2 logical (the first with two channels) and 2 structural images with their masks.
        # + defects_config.json, which holds sPRO's saturation thresholds
        return {"name": name, "root": str(root), "category": "breakfast_box"}, 4 + 4 + 5 + 1
    if name == "mtd":
        write_fake_mtd(root, n_free=4, n_per_defect=1, defects=("Crack",))
        return {"name": name, "root": str(root), "category": "mtd"}, 4 + 2
    if name == "btad":
        write_fake_btad(root, categories=("01",), n_train=2, n_test_ok=1, n_test_ko=1)
        return {"name": name, "root": str(root), "category": "01"}, 2 + 1 + 2
    generator = {"image_size": 32, "n_train": 2, "n_test_good": 1, "n_test_per_defect": 1}
    cfg = {"name": name, "root": str(root), "category": "texture", "generator": generator}
    return cfg, -1  # synthetic: as many as the generator writes (counted on disk below)


FAMILIES = ["mvtec", "mvtec3d", "visa", "mvtec_loco", "mtd", "btad", "folder", "synthetic"]


@pytest.mark.parametrize("name", FAMILIES)
def test_fingerprint_of_every_dataset_family(tmp_path: Path, name: str) -> None:
    cfg, n_files = _family(name, tmp_path / "a")
    splits = build_dataset(OmegaConf.create(cfg), SIZE)
    fingerprint = data_fingerprint(splits)
    if name == "synthetic":
        n_files = sum(1 for p in (tmp_path / "a").rglob("*.png"))
    assert fingerprint["files"] == n_files
    assert fingerprint["bytes"] > 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = build_dataset(OmegaConf.create({**cfg, "root": str(tmp_path / "b")}), SIZE)
    assert data_fingerprint(moved) == fingerprint
    with splits.test.samples[-1].image_path.open("ab") as f:
        f.write(b"\0")
    assert data_fingerprint(splits)["sha256"] != fingerprint["sha256"]
