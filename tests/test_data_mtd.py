"""Magnetic Tile Defects reader: the deterministic split, thresholded soft masks, broken copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from PIL import Image

from stad.data import build_dataset
from stad.data.fakes import write_fake_mtd
from stad.data.mtd import build_mtd, scan_mtd, split_digest, split_normals
from stad.errors import DatasetError


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mtd")
    write_fake_mtd(path)
    return path


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    return write_fake_mtd(tmp_path, n_free=4, n_per_defect=2)


def test_counts_and_split(root: Path) -> None:
    report = scan_mtd(root)
    assert report.usable, report.problems
    assert report.counts() == {
        "train": {"good": 8},
        "test": {"good": 2, "Blowhole": 2, "Crack": 2},
    }
    train = {s.image_path for s in report.splits["train"]}
    test_free = {s.image_path for s in report.splits["test"] if s.label == 0}
    assert not train & test_free and len(train | test_free) == 10
    assert "split_digest=" in report.notes[0]


def test_split_depends_on_names_and_seed_only() -> None:
    names = [Path(f"/x/exp1_num_{i}.jpg") for i in range(50)]
    train, test = split_normals(names, 0.8, seed=0)
    assert len(train) == 40 and len(test) == 10
    # Another listing order or folder gives the same split; another seed another one.
    again, _ = split_normals([Path("/y") / p.name for p in reversed(names)], 0.8, seed=0)
    assert [p.name for p in again] == [p.name for p in train]
    other, _ = split_normals(names, 0.8, seed=1)
    assert {p.name for p in other} != {p.name for p in train}
    assert split_digest(train) == split_digest(list(reversed(train)))
    assert split_digest(train) != split_digest(other)
    # Adding images never moves an existing image between train and test (ranks are per name).
    more, _ = split_normals([*names, *(Path(f"/x/new_{i}.jpg") for i in range(5))], 0.8, seed=0)
    assert len({p.name for p in train} - {p.name for p in more}) <= 5


def test_soft_masks_are_thresholded_and_grey_becomes_rgb(root: Path) -> None:
    splits = build_mtd(root, (24, 30))
    assert splits.info["split_digest"] and splits.info["n_test_anomalous"] == 4
    for i, sample in enumerate(splits.test.samples):
        item = splits.test[i]
        assert item["image"].shape == (3, 24, 30)
        assert np.allclose(item["image"][0], item["image"][1])  # grey repeated
        if sample.label == 0:
            continue
        raw = np.asarray(Image.open(sample.mask_path))
        assert ((raw > 0) & (raw < 255)).any()  # the fake mask has soft edges
        hard = np.asarray(Image.fromarray((raw >= 128).astype(np.uint8)).resize((30, 24), 0))
        np.testing.assert_array_equal(item["mask"][0].numpy(), hard)
        assert item["mask"].sum() < (raw > 0).sum()  # > 0 would have been wider


def test_config_builds_the_dataset(root: Path) -> None:
    cfg = compose_config(["dataset=mtd", f"dataset.root={root}", "dataset.train_fraction=0.5"])
    splits = build_dataset(cfg.dataset, 32)
    assert splits.info["n_train"] == 5 and splits.info["train_fraction"] == 0.5


def _raises(match: str, root: Path, **kwargs: object) -> str:
    with pytest.raises(DatasetError, match=match) as info:
        build_mtd(root, 32, **kwargs)
    return str(info.value)


def test_image_without_mask_and_mask_without_image(fresh: Path) -> None:
    masks = sorted((fresh / "MT_Crack" / "Imgs").glob("*.png"))
    masks[0].unlink()
    shutil.copy(masks[1], masks[1].with_name("exp9_num_1.png"))
    message = _raises(r"1 anomalous image.* have no mask", fresh)
    assert "exp9_num_1.png" in message and "match no image" in message


def test_missing_free_empty_class_and_nested_root(tmp_path: Path, fresh: Path) -> None:
    for path in (fresh / "MT_Blowhole" / "Imgs").iterdir():
        path.unlink()
    shutil.rmtree(fresh / "MT_Free")
    message = _raises(r"no MT_Free/ folder", fresh)
    assert "MT_Blowhole/Imgs holds no .jpg images (an empty class)" in message
    nested = tmp_path / "outer"
    write_fake_mtd(nested / "Magnetic-tile-defect-datasets.-master", n_free=2)
    _raises(r"no MT_<class>/ folder.*set dataset.root=.*-master", nested)


def test_parameters_are_checked(fresh: Path) -> None:
    _raises(r"train_fraction=1.0 must lie in", fresh, train_fraction=1.0)
    _raises(r"one category, 'mtd'", fresh, category="Crack")
    _raises(r"leaves 0 for training", fresh, train_fraction=0.1)
    _raises(r"mask_threshold=0", fresh, mask_threshold=0)
