"""VisA reader on a generated layout: the official split file, indexed masks, broken copies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from PIL import Image

from stad.data import build_dataset
from stad.data.fakes import write_fake_visa
from stad.data.visa import build_visa, scan_visa
from stad.errors import DatasetError


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("visa")
    write_fake_visa(path, categories=("candle", "pcb1"))
    return path


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    return write_fake_visa(tmp_path, n_train=2, n_test_good=1, n_anomalous=2)


def test_split_file_decides_the_splits(root: Path) -> None:
    report = scan_visa(root, "pcb1")
    assert report.usable, report.problems
    train, test = report.splits["train"], report.splits["test"]
    assert [p.image_path.name for p in train] == ["0000.JPG", "0001.JPG", "0002.JPG", "0003.JPG"]
    assert [(s.label, s.image_path.name) for s in test] == [
        (0, "0004.JPG"),
        (0, "0005.JPG"),
        (1, "000.JPG"),
        (1, "001.JPG"),
        (1, "002.JPG"),
    ]
    # Defect names from image_anno.csv, a quoted one with a comma included.
    assert [s.defect for s in test] == ["good", "good", "bent", "melt, scratch", "bent"]
    assert all(s.mask_path is not None for s in test if s.label)


def test_indexed_mask_values_are_anomalous(root: Path) -> None:
    splits = build_visa(root, "candle", (32, 40))
    assert splits.info["n_train"] == 4 and splits.info["n_test_anomalous"] == 3
    for i, sample in enumerate(splits.test.samples):
        if sample.label == 1:
            raw = np.asarray(Image.open(sample.mask_path))
            assert raw.max() in (1, 2, 3)  # not 255
            np.testing.assert_array_equal(splits.test[i]["mask"][0].numpy() > 0, raw > 0)


def test_config_builds_the_dataset(root: Path) -> None:
    cfg = compose_config(["dataset=visa", f"dataset.root={root}", "dataset.category=pcb1"])
    assert build_dataset(cfg.dataset, 32).info["category"] == "pcb1"
    assert len(cfg.dataset.categories) == 12


def _rewrite(fresh: Path, old: str, new: str) -> None:
    path = fresh / "split_csv" / "1cls.csv"
    path.write_text(path.read_text().replace(old, new))


def _raises(match: str, root: Path, category: str = "candle", **kwargs: object) -> str:
    with pytest.raises(DatasetError, match=match) as info:
        build_visa(root, category, 32, **kwargs)
    return str(info.value)


def test_missing_root_split_file_and_bad_header(tmp_path: Path, fresh: Path) -> None:
    with pytest.raises(DatasetError, match=r"root .* does not exist.*VisA"):
        build_visa(tmp_path / "nowhere", "candle", 32)
    _raises(r"other.csv does not exist.*split_csv/1cls.csv", fresh, split_file="other.csv")
    _rewrite(fresh, "object,split,label,image,mask", "object;split;label")
    _raises(r"has the columns object;split;label.*object,split,label,image,mask", fresh)


def test_empty_category_and_missing_category_folder(fresh: Path) -> None:
    message = _raises(r"lists no image of category 'pcb1' .*empty category.*candle", fresh, "pcb1")
    assert "pcb1 does not exist" in message


def test_image_without_mask_and_mask_without_image(fresh: Path) -> None:
    (fresh / "candle" / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    Image.fromarray(np.ones((32, 40), np.uint8)).save(
        fresh / "candle" / "Data" / "Masks" / "Anomaly" / "009.png"
    )
    message = _raises(r"1 anomalous image.* have no mask: .*001.JPG", fresh)
    assert "009.png" in message and "1 of 2 anomalous with masks" in message


def test_missing_image_and_bad_rows(fresh: Path) -> None:
    (fresh / "candle" / "Data" / "Images" / "Normal" / "0000.JPG").unlink()
    _raises(r"1 image.* listed in .* do not exist: .*0000.JPG", fresh)
    _rewrite(
        fresh,
        "candle,train,normal,candle/Data/Images/Normal/0001.JPG",
        "candle,val,normal,candle/Data/Images/Normal/0001.JPG",
    )
    _raises(r"malformed row.*val,normal", fresh)


def test_anomalies_in_train_are_rejected(fresh: Path) -> None:
    _rewrite(fresh, "candle,test,anomaly", "candle,train,anomaly")
    _raises(r"puts 2 anomalous image.* in train.*1cls.csv", fresh)


def test_mask_size_mismatch(fresh: Path) -> None:
    Image.fromarray(np.ones((10, 10), np.uint8)).save(
        fresh / "candle" / "Data" / "Masks" / "Anomaly" / "000.png"
    )
    _raises(r"Mask .*000.png is 10x10 px but its image .*000.JPG is 40x32", fresh)
