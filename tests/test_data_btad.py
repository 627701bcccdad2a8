"""BTAD reader on a generated layout with each category's own file extensions."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from PIL import Image

from stad.data import build_dataset
from stad.data.btad import build_btad, scan_btad
from stad.data.fakes import BTAD_EXTENSIONS, write_fake_btad
from stad.errors import DatasetError


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("btad")
    write_fake_btad(path)
    return path


@pytest.mark.parametrize("category", ["01", "02", "03"])
def test_each_category_reads_with_its_extensions(root: Path, category: str) -> None:
    report = scan_btad(root, category)
    assert report.usable, report.problems
    assert report.counts() == {"train": {"good": 3}, "test": {"good": 2, "ko": 2}}
    image_ext, mask_ext = BTAD_EXTENSIONS[category]
    anomalous = [s for s in report.splits["test"] if s.label]
    assert {s.image_path.suffix for s in anomalous} == {image_ext}
    assert {s.mask_path.suffix for s in anomalous} == {mask_ext}
    assert all(s.mask_path.stem == s.image_path.stem for s in anomalous)
    splits = build_btad(root, category, 32)
    for i, sample in enumerate(splits.test.samples):
        raw = (
            np.zeros((32, 32))
            if sample.mask_path is None
            else np.asarray(Image.open(sample.mask_path).convert("L"))
        )
        np.testing.assert_array_equal(splits.test[i]["mask"][0].numpy() > 0, raw > 0)


def test_config_keeps_the_category_a_folder_name(root: Path) -> None:
    cfg = compose_config(["dataset=btad", f"dataset.root={root}", "dataset.category=03"])
    assert build_dataset(cfg.dataset, 32).info["category"] == "03"
    assert list(compose_config(["dataset=btad"]).dataset.categories) == ["01", "02", "03"]


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    write_fake_btad(tmp_path, categories=("01",), n_train=2, n_test_ok=1, n_test_ko=2)
    return tmp_path / "01"


def _raises(match: str, fresh: Path) -> str:
    with pytest.raises(DatasetError, match=match) as info:
        build_btad(fresh.parent, fresh.name, 32)
    return str(info.value)


def test_missing_root_and_category(tmp_path: Path, fresh: Path) -> None:
    with pytest.raises(DatasetError, match=r"root .* does not exist.*btad.zip"):
        build_btad(tmp_path / "nowhere", "01", 32)
    with pytest.raises(DatasetError, match=r"02 does not exist.*holds 01"):
        build_btad(fresh.parent, "02", 32)


def test_missing_ground_truth(fresh: Path) -> None:
    shutil.rmtree(fresh / "ground_truth")
    _raises(r"ground_truth/ko does not exist", fresh)


def test_image_without_mask_and_mask_without_image(fresh: Path) -> None:
    (fresh / "ground_truth" / "ko" / "0001.png").unlink()
    shutil.copy(
        fresh / "ground_truth" / "ko" / "0000.png", fresh / "ground_truth" / "ko" / "0042.png"
    )
    message = _raises(r"1 anomalous image.* have no mask: .*0001.bmp", fresh)
    assert "0042.png" in message and "Found: train: 2 images" in message


def test_empty_train_and_extra_test_folder(fresh: Path) -> None:
    for path in (fresh / "train" / "ok").iterdir():
        path.unlink()
    (fresh / "test" / "maybe").mkdir()
    message = _raises(r"train/ok holds no images", fresh)
    assert "other than ok/ and ko/" in message


def test_mask_size_mismatch(fresh: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(fresh / "ground_truth" / "ko" / "0000.png")
    _raises(r"Mask .*0000.png is 8x8 px but its image .*0000.bmp is 32x32", fresh)
