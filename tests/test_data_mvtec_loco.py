"""MVTec LOCO AD reader on a generated layout: splits, union masks, sPRO regions, broken copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image

from stad.data import build_dataset
from stad.data.fakes import write_fake_mvtec_loco
from stad.data.mvtec_loco import LocoSample, build_mvtec_loco, scan_mvtec_loco
from stad.errors import DatasetError
from stad.metrics import SPRO, dataset_metric


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("loco")
    write_fake_mvtec_loco(path)
    return path


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A layout a test may break; returns the category folder."""
    return write_fake_mvtec_loco(tmp_path, n_train=2, n_validation=1, n_test_good=1)


def test_scan_lists_three_splits_and_every_channel(root: Path) -> None:
    report = scan_mvtec_loco(root, "breakfast_box", check_channels=True)
    assert report.usable, report.problems
    assert report.counts() == {
        "train": {"good": 4},
        "validation": {"good": 2},
        "test": {"good": 2, "logical_anomalies": 2, "structural_anomalies": 2},
    }
    first = report.splits["test"][2]
    assert isinstance(first, LocoSample) and first.image_path.name == "000.png"
    assert [c.name for c in first.channels] == ["000.png", "001.png"]
    assert first.mask_path == first.channels[0]


def test_build_serves_union_masks_and_registers_spro(root: Path) -> None:
    splits = build_mvtec_loco(root, "breakfast_box", 32)
    assert splits.validation is not None and len(splits.validation) == 2
    assert splits.info["n_regions"] == 5 and splits.info["n_test_anomalous"] == 4
    test = splits.test
    for i, sample in enumerate(test.samples):
        item = test[i]
        assert bool(item["mask"].any()) == bool(getattr(sample, "channels", ()))
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    metric = dataset_metric("spro", splits.metrics["spro"])
    assert isinstance(metric, SPRO) and metric.fpr_limit == 0.05
    # Perfect maps: every anomalous pixel above every normal one.
    batch = {k: [] for k in ("mask", "label", "path", "defect")}
    for i in range(len(test)):
        item = test[i]
        for key in batch:
            batch[key].append(item[key])
    batch["mask"] = torch.stack(batch["mask"])
    batch["label"] = torch.stack(batch["label"])
    maps = batch["mask"] + 0.01 * torch.rand(batch["mask"].shape)
    metric.update(maps, torch.zeros(len(test)), batch)
    values = metric.compute()
    for key in ("", "logical", "structural"):
        assert float(values[key]) == pytest.approx(1.0)


def test_union_mask_matches_the_channels_at_full_resolution(root: Path) -> None:
    size = (32, 40)  # (height, width) of the files: no resizing
    splits = build_mvtec_loco(root, "breakfast_box", size)
    for i, sample in enumerate(splits.test.samples):
        expected = np.zeros(size, dtype=bool)
        for channel in getattr(sample, "channels", ()):
            expected |= np.asarray(Image.open(channel)) > 0
        np.testing.assert_array_equal(splits.test[i]["mask"][0].numpy() > 0, expected)


def test_config_builds_the_dataset(root: Path) -> None:
    cfg = compose_config(
        ["dataset=mvtec_loco", f"dataset.root={root}", "dataset.spro_fpr_limit=0.3"]
    )
    splits = build_dataset(cfg.dataset, 32)
    assert (
        splits.info["dataset"] == "mvtec_loco"
        and dataset_metric("spro", splits.metrics["spro"]).fpr_limit == 0.3
    )


def _raises(match: str, fresh: Path) -> str:
    with pytest.raises(DatasetError, match=match) as info:
        build_mvtec_loco(fresh.parent, fresh.name, 32)
    return str(info.value)


def test_missing_root_category_and_validation(tmp_path: Path, fresh: Path) -> None:
    with pytest.raises(DatasetError, match=r"root .* does not exist.*mvtec-loco"):
        build_mvtec_loco(tmp_path / "nowhere", "breakfast_box", 32)
    with pytest.raises(DatasetError, match=r"pushpins does not exist.*holds breakfast_box"):
        build_mvtec_loco(tmp_path, "pushpins", 32)
    shutil.rmtree(fresh / "validation")
    message = _raises(r"validation/good does not exist", fresh)
    assert "Found: train: 2 images" in message and "Expected: " in message


def test_image_without_masks_and_masks_without_image(fresh: Path) -> None:
    shutil.rmtree(fresh / "ground_truth" / "logical_anomalies" / "001")
    shutil.copytree(
        fresh / "ground_truth" / "structural_anomalies" / "000",
        fresh / "ground_truth" / "structural_anomalies" / "007",
    )
    message = _raises(r"1 logical_anomalies image.* have no ground-truth folder", fresh)
    assert "structural_anomalies/007" in message and "match no test image" in message


def test_empty_mask_folder_and_unknown_test_folder(fresh: Path) -> None:
    for png in (fresh / "ground_truth" / "logical_anomalies" / "001").iterdir():
        png.unlink()
    (fresh / "test" / "scratches").mkdir()
    message = _raises(r"hold no .png mask", fresh)
    assert "scratches" in message


def test_channel_values_must_match_the_config(fresh: Path) -> None:
    channel = fresh / "ground_truth" / "structural_anomalies" / "000" / "000.png"
    pixels = np.asarray(Image.open(channel)).copy()
    pixels[pixels > 0] = 200
    Image.fromarray(pixels).save(channel)
    _raises(r"value 200, which defects_config.json does not list", fresh)
    pixels[0, 0] = 255
    Image.fromarray(pixels).save(channel)
    _raises(r"holds the values \[200, 255\]", fresh)


def test_bad_defects_config_and_size_mismatch(fresh: Path) -> None:
    (fresh / "defects_config.json").write_text(json.dumps([{"defect_name": "x"}]))
    _raises(r"Entry 0 of .*defects_config.json lacks", fresh)
    (fresh / "defects_config.json").unlink()
    _raises(r"defects_config.json does not exist", fresh)


def test_channel_size_mismatch(fresh: Path) -> None:
    channel = fresh / "ground_truth" / "logical_anomalies" / "001" / "000.png"
    Image.fromarray(np.full((20, 40), 255, dtype=np.uint8)).save(channel)
    _raises(r"Mask .*001/000.png is 40x20 px but its image .*001.png is 40x32", fresh)
