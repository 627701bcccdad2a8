"""MVTec 3D-AD: depth preprocessing functions, the reader and its datasets on generated layouts."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from stad.data import build_dataset
from stad.data.mvtec3d import (
    build_mvtec3d,
    depth_map,
    fill_missing,
    fit_background_plane,
    foreground_mask,
    preprocess_depth,
    scan_mvtec3d,
)
from stad.data.synthetic3d import render_scene, write_fake_mvtec3d
from stad.errors import DatasetError

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset" / "mvtec3d.yaml"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated layout shared by the read-only tests (generation is the slow part)."""
    path = tmp_path_factory.mktemp("mvtec3d")
    write_fake_mvtec3d(path)
    return path


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A generated layout a test may break; returns the category folder."""
    return write_fake_mvtec3d(tmp_path, n_train=2, n_validation=1, n_test_good=1, n_per_defect=1)


# ----------------------------------------------------------------------------- preprocessing


def test_fill_missing_takes_the_mean_of_valid_neighbours() -> None:
    z = np.arange(1, 26, dtype=np.float32).reshape(5, 5)
    z[1, 1] = 0.0
    z[1, 2] = np.nan
    z[4, 4] = 0.0  # a corner: only three neighbours exist
    filled = fill_missing(z, passes=1)
    valid = np.arange(1, 26, dtype=np.float64).reshape(5, 5)
    # (1, 1): its window without the two missing pixels; (1, 2) likewise.
    expect_11 = (valid[0:3, 0:3].sum() - valid[1, 1] - valid[1, 2]) / 7
    expect_12 = (valid[0:3, 1:4].sum() - valid[1, 1] - valid[1, 2]) / 7
    expect_44 = (valid[3, 3] + valid[3, 4] + valid[4, 3]) / 3
    np.testing.assert_allclose(filled[1, 1], expect_11, rtol=1e-6)
    np.testing.assert_allclose(filled[1, 2], expect_12, rtol=1e-6)
    np.testing.assert_allclose(filled[4, 4], expect_44, rtol=1e-6)
    untouched = np.ones((5, 5), dtype=bool)
    untouched[[1, 1, 4], [1, 2, 4]] = False
    np.testing.assert_array_equal(filled[untouched], z[untouched])
    assert filled.dtype == np.float32 and np.isfinite(filled).all()
    np.testing.assert_array_equal(fill_missing(z, passes=1), filled)  # deterministic


def test_fill_missing_grows_one_ring_per_pass() -> None:
    z = np.full((11, 11), 2.0, dtype=np.float32)
    z[1:10, 1:10] = 0.0  # a 9x9 hole: its centre is 5 pixels from the nearest valid one
    after3 = fill_missing(z, passes=3)
    expected_missing = np.zeros((11, 11), dtype=bool)
    expected_missing[4:7, 4:7] = True  # the rings at distance 1..3 are filled, the rest not
    np.testing.assert_array_equal(after3 == 0, expected_missing)
    np.testing.assert_allclose(after3[~expected_missing], 2.0, rtol=1e-6)
    assert (fill_missing(z, passes=4) == 0).sum() == 1
    assert (fill_missing(z, passes=5) != 0).all()


def test_background_plane_recovers_an_exact_plane() -> None:
    rows, cols = np.mgrid[0:13, 0:17].astype(np.float64)
    plane = 0.6 + 0.003 * rows - 0.002 * cols
    z = plane.astype(np.float32).copy()
    z[5:9, 6:11] -= 0.03  # an object does not move the corners
    np.testing.assert_allclose(fit_background_plane(z), plane, atol=1e-6)


def test_background_plane_without_valid_corner_raises() -> None:
    z = np.ones((6, 6), dtype=np.float32)
    z[-2:, :2] = 0.0
    with pytest.raises(ValueError, match="bottom-left"):
        fit_background_plane(z)


def test_foreground_mask_picks_the_bump_not_the_tilted_plane() -> None:
    rows, cols = np.mgrid[0:20, 0:20].astype(np.float64)
    plane = 0.5 + 0.002 * rows + 0.003 * cols  # 9.5 cm of tilt, far above the threshold
    bump = np.zeros((20, 20), dtype=bool)
    bump[6:12, 8:15] = True
    z = (plane - 0.01 * bump).astype(np.float32)
    z[7, 9] = 0.0  # a pixel still missing after filling is never foreground
    fg = foreground_mask(z, fit_background_plane(z))
    expected = bump.copy()
    expected[7, 9] = False
    np.testing.assert_array_equal(fg, expected)
    # A 5 mm step stays below the 7 mm threshold.
    shallow = (plane - 0.005 * bump).astype(np.float32)
    assert not foreground_mask(shallow, fit_background_plane(shallow)).any()


def test_depth_map_is_zero_outside_and_centred_inside() -> None:
    rng = np.random.default_rng(0)
    z = rng.uniform(0.5, 0.6, (8, 8)).astype(np.float32)
    fg = np.zeros((8, 8), dtype=bool)
    fg[2:6, 3:7] = True
    depth = depth_map(z, fg)
    assert (depth[~fg] == 0).all()
    assert abs(float(depth[fg].mean())) < 1e-5
    expected = (z[fg].astype(np.float64) - z[fg].astype(np.float64).mean()) * 100
    np.testing.assert_allclose(depth[fg], expected, rtol=1e-5, atol=1e-6)
    assert (depth_map(z, np.zeros_like(fg)) == 0).all()


def test_generated_scene_foreground_is_the_object() -> None:
    clean = render_scene(32, seed=3, defect="dent", holes=False)
    _, fg = preprocess_depth(clean.xyz[..., 2])
    np.testing.assert_array_equal(fg, clean.object_mask)
    holey = render_scene(32, seed=3, defect="dent", holes=True)
    assert holey.holes.any() and np.isnan(holey.xyz[..., 2]).any()
    _, fg = preprocess_depth(holey.xyz[..., 2])
    assert (fg == holey.object_mask).mean() > 0.97


def test_generated_defects_show_in_rgb_and_depth() -> None:
    good = render_scene(32, seed=5, holes=False)
    for defect in ("dent", "bump"):
        scene = render_scene(32, seed=5, defect=defect, holes=False)
        m = scene.mask.astype(bool)
        assert m.any() and (m <= scene.object_mask).all()
        z_change = scene.xyz[..., 2][m] - good.xyz[..., 2][m]
        np.testing.assert_allclose(np.abs(z_change), 0.008, atol=1e-6)
        rgb_change = np.abs(scene.rgb[m].astype(int) - good.rgb[m].astype(int)).mean()
        assert rgb_change > 40
        np.testing.assert_array_equal(scene.rgb[~m], good.rgb[~m])


def test_generator_is_deterministic(tmp_path: Path) -> None:
    def digest(folder: Path) -> str:
        h = hashlib.sha256()
        for path in sorted(folder.rglob("*.*")):
            h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
        return h.hexdigest()

    a = write_fake_mvtec3d(tmp_path / "a", n_train=1, n_validation=1, n_test_good=1)
    b = write_fake_mvtec3d(tmp_path / "b", n_train=1, n_validation=1, n_test_good=1)
    c = write_fake_mvtec3d(tmp_path / "c", n_train=1, n_validation=1, n_test_good=1, seed=1)
    assert digest(a) == digest(b) != digest(c)


# ----------------------------------------------------------------------------- reader


def test_scan_lists_three_splits(root: Path) -> None:
    train, validation, test = scan_mvtec3d(root, "bagel")
    cat = root / "bagel"
    assert [s.image_path for s in train] == [cat / f"train/good/rgb/{i:03d}.png" for i in range(4)]
    assert [s.xyz_path for s in validation] == [
        cat / f"validation/good/xyz/{i:03d}.tiff" for i in range(2)
    ]
    assert all(s.label == 0 and s.mask_path is None for s in train + validation)
    assert [(s.defect, s.label) for s in test] == [
        ("bump", 1), ("bump", 1), ("dent", 1), ("dent", 1), ("good", 0), ("good", 0)
    ]  # fmt: skip
    for s in test:  # every test image, normal ones included, has its gt mask
        assert s.mask_path == cat / "test" / s.defect / "gt" / f"{s.image_path.stem}.png"
        assert s.xyz_path == cat / "test" / s.defect / "xyz" / f"{s.image_path.stem}.tiff"


@pytest.mark.parametrize("mode", ["rgb", "depth", "rgbd"])
def test_items_per_input_mode(root: Path, mode: str) -> None:
    splits = build_mvtec3d(root, "bagel", image_size=32, input=mode)
    assert splits.info["input"] == mode and splits.info["dataset"] == "mvtec3d"
    item = splits.test[0]
    expected = {"image", "mask", "label", "path", "defect", "foreground"}
    assert set(item) == (expected if mode == "rgb" else expected | {"depth"})
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["foreground"].shape == (1, 32, 32) and item["foreground"].dtype == torch.float32
    assert set(torch.unique(item["foreground"]).tolist()) == {0.0, 1.0}
    if mode != "rgb":
        assert item["depth"].shape == (1, 32, 32) and item["depth"].dtype == torch.float32
    assert item["label"].item() == 1 and item["mask"].any()


def test_depth_item_matches_an_independent_computation(root: Path) -> None:
    splits = build_mvtec3d(root, "bagel", image_size=32)
    for index in (0, len(splits.test) - 1):
        item = splits.test[index]
        sample = splits.test.samples[index]
        z = tifffile.imread(sample.xyz_path)[..., 2]
        depth, fg = preprocess_depth(z)
        np.testing.assert_array_equal(item["foreground"][0].numpy(), fg.astype(np.float32))
        np.testing.assert_allclose(item["depth"][0].numpy(), depth, atol=1e-6)
        d = item["depth"][0]
        assert (d[item["foreground"][0] == 0] == 0).all()
        assert abs(float(d[item["foreground"][0] == 1].mean())) < 1e-4
        assert item["foreground"].sum() > 100  # the object, about a quarter of the image


def test_items_are_copies_of_the_preloaded_maps(root: Path) -> None:
    splits = build_mvtec3d(root, "bagel", image_size=32, input="depth")
    splits.train[0]["depth"].fill_(99.0)
    assert splits.train[0]["depth"].max() < 99.0


def test_resize_is_bilinear_for_depth_and_nearest_for_foreground(tmp_path: Path) -> None:
    # 45 px to 14x20: no output pixel centre falls exactly on a source pixel border.
    write_fake_mvtec3d(tmp_path, n_train=1, n_validation=1, n_test_good=1, n_per_defect=1, size=45)
    splits = build_mvtec3d(tmp_path, "bagel", image_size=(14, 20), input="rgbd")
    item = splits.test[0]
    z = tifffile.imread(splits.test.samples[0].xyz_path)[..., 2]
    depth, fg = preprocess_depth(z)
    reference = F.interpolate(
        torch.from_numpy(depth)[None, None].double(),
        size=(14, 20),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )[0, 0].float()
    assert item["depth"].shape == (1, 14, 20)
    assert (item["depth"][0] - reference).abs().max() < 0.02 * np.ptp(depth)
    # Independent nearest reference: output pixel i samples source floor((i + 0.5) * in / out).
    rows = np.floor((np.arange(14) + 0.5) * 45 / 14).astype(int)
    cols = np.floor((np.arange(20) + 0.5) * 45 / 20).astype(int)
    np.testing.assert_array_equal(item["foreground"][0].numpy(), fg[np.ix_(rows, cols)])


def test_validation_split_is_read(root: Path) -> None:
    splits = build_mvtec3d(root, "bagel", image_size=16, input="rgbd")
    assert splits.validation is not None and len(splits.validation) == 2
    assert splits.info["n_validation"] == 2 and splits.info["n_train"] == 4
    for i in range(2):
        item = splits.validation[i]
        assert "/validation/good/rgb/" in item["path"]
        assert item["label"].item() == 0 and not item["mask"].any()
        assert item["depth"].shape == (1, 16, 16) and item["foreground"].any()


def test_lazy_dataset_serves_the_same_items(root: Path) -> None:
    eager = build_mvtec3d(root, "bagel", image_size=24)
    lazy = build_mvtec3d(root, "bagel", image_size=24, preload=False)
    for key in ("image", "mask", "depth", "foreground"):
        torch.testing.assert_close(lazy.test[3][key], eager.test[3][key])


def test_registry_and_config_build_the_dataset(root: Path) -> None:
    cfg = OmegaConf.load(CONF)
    assert cfg.category == "bagel" and cfg.input == "rgbd"
    cfg.root = str(root)
    cfg.input = "depth"
    splits = build_dataset(cfg, 16)
    assert splits.info["input"] == "depth" and "depth" in splits.train[0]


# ----------------------------------------------------------------------------- bad input


def _write_xyz(path: Path, xyz: np.ndarray) -> None:
    tifffile.imwrite(path, xyz, photometric="minisblack", planarconfig="contig")


def _raises(match: str, root: Path, category: str = "bagel", **kwargs: object) -> str:
    with pytest.raises(DatasetError, match=match) as info:
        build_mvtec3d(root, category, image_size=16, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_missing_root_and_category(tmp_path: Path, fresh: Path) -> None:
    _raises("root .* does not exist.*mvtec-3d-ad", tmp_path / "nowhere")
    message = _raises("Category folder .*cookie does not exist", tmp_path, category="cookie")
    assert "bagel" in message
    _raises("is a category folder.*dataset.category=bagel", fresh, category="x")


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_missing_split(fresh: Path, split: str) -> None:
    shutil.rmtree(fresh / split)
    _raises(f"has no {split}/ folder", fresh.parent)


def test_test_split_without_defects_and_train_with_defects(fresh: Path) -> None:
    shutil.copytree(fresh / "test" / "dent", fresh / "train" / "dent")
    _raises("normal images only.*train/dent", fresh.parent)
    shutil.rmtree(fresh / "train" / "dent")
    shutil.rmtree(fresh / "test" / "dent")
    shutil.rmtree(fresh / "test" / "bump")
    _raises("needs a good/ folder and at least one defect folder", fresh.parent)


def test_rgb_without_xyz_or_gt_and_orphans(fresh: Path) -> None:
    (fresh / "validation/good/xyz/000.tiff").unlink()
    (fresh / "test/dent/gt/000.png").unlink()
    shutil.copy(fresh / "train/good/xyz/000.tiff", fresh / "train/good/xyz/777.tiff")
    message = _raises("malformed", fresh.parent)
    # One message lists every problem.
    assert "validation/good/rgb/000.png" in message and "point cloud" in message
    assert "test/dent/rgb/000.png" in message and "mask (gt/<stem>.png)" in message
    assert "777.tiff" in message and "match no rgb/ image" in message


def test_empty_rgb_folder(fresh: Path) -> None:
    for path in (fresh / "test/bump/rgb").iterdir():
        path.unlink()
    _raises("test/bump/rgb holds no images", fresh.parent)


@pytest.mark.parametrize("preload", [True, False])
def test_xyz_size_mismatch(fresh: Path, preload: bool) -> None:
    _write_xyz(fresh / "train/good/xyz/001.tiff", np.ones((30, 32, 3), dtype=np.float32))
    _raises("Point cloud .*001.tiff is 32x30 px but its image .*001.png is 32x32", fresh.parent,
            preload=preload)  # fmt: skip


def test_gt_size_mismatch(fresh: Path) -> None:
    Image.fromarray(np.zeros((20, 32), dtype=np.uint8)).save(fresh / "test/good/gt/000.png")
    _raises("Mask .*000.png is 32x20 px", fresh.parent)


def test_bad_xyz_files(fresh: Path) -> None:
    _write_xyz(fresh / "train/good/xyz/000.tiff", np.ones((32, 32), dtype=np.float32))
    _raises(r"shape \(32, 32\).*\(height, width, 3\)", fresh.parent)
    (fresh / "train/good/xyz/000.tiff").write_bytes(b"not a tiff")
    _raises("Cannot decode point cloud file .*000.tiff", fresh.parent)


def test_cloud_without_valid_corner(fresh: Path) -> None:
    path = fresh / "train/good/xyz/000.tiff"
    xyz = tifffile.imread(path)
    xyz[:5, :5] = 0.0  # three filling passes cannot reach the 2x2 corner
    _write_xyz(path, xyz)
    _raises("Cannot fit the background of point cloud .*000.tiff.*top-left", fresh.parent)


def test_unknown_input_mode(root: Path) -> None:
    _raises("Unknown MVTec 3D-AD input 'xyz'.*rgb, depth, rgbd", root, input="xyz")


def test_datamodule_validates_on_the_datasets_own_validation_split(tmp_path: Path) -> None:
    from stad.data.datamodule import AnomalyDataModule
    from stad.data.mvtec3d import build_mvtec3d

    write_fake_mvtec3d(tmp_path, n_train=5, n_validation=3)
    splits = build_mvtec3d(tmp_path, "bagel", 32)
    dm = AnomalyDataModule(splits, batch_size=2, val_fraction=0.2)
    assert len(dm.train_dataset) == 5 and len(dm.val_dataset) == 3
    assert "validation split" in dm.info["val_source"]
    assert len(AnomalyDataModule(splits, batch_size=2).val_dataset) == 0
