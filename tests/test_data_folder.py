"""The folder dataset: users' layouts named in the config, with and without masks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from PIL import Image

from stad.data import build_dataset
from stad.data.fakes import write_fake_folder
from stad.data.folder import build_folder, scan_folder
from stad.errors import DatasetError

CUSTOM = {
    "normal_dir": "normal",
    "normal_test_dir": "test_ok",
    "abnormal_dir": "test_ng",
    "mask_dir": "masks",
    "mask_rule": "{stem}",
}


def test_default_layout_is_mvtec_like(tmp_path: Path) -> None:
    root = write_fake_folder(tmp_path)
    report = scan_folder(root)
    assert report.usable, report.problems
    assert report.counts() == {"train": {"good": 4}, "test": {"good": 2, "crack": 2, "hole": 1}}
    splits = build_folder(root, "widgets", 32)
    for i, sample in enumerate(splits.test.samples):
        if sample.label:
            assert sample.mask_path.name == f"{sample.image_path.stem}_mask.png"
            raw = np.asarray(Image.open(sample.mask_path)) > 0
            np.testing.assert_array_equal(splits.test[i]["mask"][0].numpy() > 0, raw)


def test_custom_layout_loose_images_and_same_name_masks(tmp_path: Path) -> None:
    root = write_fake_folder(tmp_path, defects={"scratch": 1}, loose=2, **CUSTOM)
    cfg = compose_config(
        ["dataset=folder", f"dataset.root={root}", "dataset.category=parts"]
        + [f"dataset.{k}='{v}'" for k, v in CUSTOM.items()]  # quoted: Hydra reads {} itself
    )
    assert list(cfg.dataset.categories) == ["parts"]
    splits = build_dataset(cfg.dataset, 32)
    assert splits.info["defects"] == ["scratch", "test_ng"] and splits.info["n_test"] == 5
    assert all(s.mask_path is not None for s in splits.test.samples if s.label)


def test_without_masks(tmp_path: Path) -> None:
    root = write_fake_folder(tmp_path, mask_dir=None)
    report = scan_folder(root, mask_dir=None)
    assert report.usable and "only image metrics" in report.notes[0]
    assert all(s.mask_path is None for s in report.splits["test"])
    assert build_folder(root, "x", 32, mask_dir=None).info["masks"] is False


def _raises(match: str, root: Path, **kwargs: object) -> str:
    with pytest.raises(DatasetError, match=match) as info:
        build_folder(root, "x", 32, **kwargs)
    return str(info.value)


def test_broken_layouts(tmp_path: Path) -> None:
    _raises(r"root .* does not exist", tmp_path / "nowhere")
    root = write_fake_folder(tmp_path / "a")
    _raises(r"mask_rule='mask' must contain \{stem\}", root, mask_rule="mask")
    _raises(r"normal_dir and normal_test_dir are the same", root, normal_test_dir="train/good")
    _raises(r"test_ng does not exist", root, abnormal_dir="test_ng")
    _raises(r"Mask folder .*labels does not exist.*mask_dir=null", root, mask_dir="labels")
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    shutil.copytree(root / "ground_truth" / "hole", root / "ground_truth" / "dent")
    message = _raises(r"1 anomalous image.* have no mask: .*crack/001.png", root)
    assert "dent/000_mask.png" in message


def test_empty_defect_folder_and_no_anomalies(tmp_path: Path) -> None:
    root = write_fake_folder(tmp_path, defects={"crack": 1}, mask_dir=None)
    (root / "test" / "hole").mkdir()
    _raises(r"Defect folder.* without images: .*hole", root, mask_dir=None)
    shutil.rmtree(root / "test" / "crack")
    _raises(r"holds no anomalous images", root, mask_dir=None)
