"""MVTec AD reader, AnomalyDataset and AnomalyDataModule on tiny generated layouts."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stad.data.base import DatasetSplits, Sample
from stad.data.datamodule import AnomalyDataModule, split_indices
from stad.data.images import as_hw, binarise_mask
from stad.data.mvtec import build_mvtec, scan_mvtec
from stad.errors import DatasetError, StadError

CATEGORY = "widget"
SIZE_WH = (32, 32)


def _pixels(seed: int, size_wh: tuple[int, int] = SIZE_WH) -> np.ndarray:
    """Random uint8 RGB pixels (H, W, 3), distinct per seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size_wh[1], size_wh[0], 3), dtype=np.uint8)


def _write_image(path: Path, seed: int, size_wh: tuple[int, int] = SIZE_WH) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(seed, size_wh)).save(path)


def _write_mask(path: Path, size_wh: tuple[int, int] = SIZE_WH, value: int = 255) -> np.ndarray:
    """A mask with an off-centre rectangle of ``value``; returns its binary (H, W) array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size_wh
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[1 : height // 3, width // 2 : width - 1] = value
    Image.fromarray(mask, mode="L").save(path)
    return (mask > 0).astype(np.uint8)


def write_mvtec(
    root: Path,
    category: str = CATEGORY,
    n_train: int = 5,
    defects: dict[str, int] | None = None,
    size_wh: tuple[int, int] = SIZE_WH,
) -> Path:
    """Write a tiny MVTec AD layout; returns the category folder."""
    defects = defects if defects is not None else {"good": 2, "crack": 2, "hole": 1}
    cat = root / category
    for i in range(n_train):
        _write_image(cat / "train" / "good" / f"{i:03d}.png", seed=i, size_wh=size_wh)
    for d, (defect, n) in enumerate(sorted(defects.items())):
        for i in range(n):
            _write_image(cat / "test" / defect / f"{i:03d}.png", 100 * (d + 1) + i, size_wh)
            if defect != "good":
                _write_mask(cat / "ground_truth" / defect / f"{i:03d}_mask.png", size_wh)
    return cat


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    write_mvtec(tmp_path / "mvtec")
    return tmp_path / "mvtec"


# ----------------------------------------------------------------------------- reading back


def test_scan_lists_samples_in_sorted_order(mvtec_root: Path) -> None:
    train, test = scan_mvtec(mvtec_root, CATEGORY)
    cat = mvtec_root / CATEGORY
    assert [s.image_path for s in train] == [cat / f"train/good/{i:03d}.png" for i in range(5)]
    assert all(s.label == 0 and s.mask_path is None and s.defect == "good" for s in train)
    expected = [("crack", 0), ("crack", 1), ("good", 0), ("good", 1), ("hole", 0)]
    assert [(s.defect, int(s.image_path.stem)) for s in test] == expected
    assert [s.label for s in test] == [1, 1, 0, 0, 1]
    for s in test:
        if s.label:
            assert s.mask_path == cat / "ground_truth" / s.defect / f"{s.image_path.stem}_mask.png"
        else:
            assert s.mask_path is None


def test_dataset_items_follow_the_batch_contract(mvtec_root: Path) -> None:
    splits = build_mvtec(mvtec_root, CATEGORY, image_size=32)
    item = splits.test[0]
    assert set(item) == {"image", "mask", "label", "path", "defect"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 32, 32) and item["mask"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].shape == ()
    assert item["label"].item() == 1 and item["defect"] == "crack"
    assert item["path"] == str(mvtec_root / CATEGORY / "test/crack/000.png")
    # At native size the image is the file's pixels / 255, not normalised.
    expected = torch.from_numpy(_pixels(100)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(item["image"], expected, rtol=0, atol=1e-7)
    assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0


def test_normal_test_images_get_all_zero_masks(mvtec_root: Path) -> None:
    splits = build_mvtec(mvtec_root, CATEGORY, image_size=16)
    for i in range(len(splits.test)):
        item = splits.test[i]
        assert bool(item["mask"].any()) == bool(item["label"])
    for i in range(len(splits.train)):
        assert not splits.train[i]["mask"].any()


def test_resize_is_antialiased_bilinear_without_crop(tmp_path: Path) -> None:
    write_mvtec(tmp_path, size_wh=(56, 40))
    splits = build_mvtec(tmp_path, CATEGORY, image_size=(20, 28))
    image = splits.train[0]["image"]
    source = torch.from_numpy(_pixels(0, (56, 40))).permute(2, 0, 1)[None].double() / 255
    reference = F.interpolate(
        source, size=(20, 28), mode="bilinear", antialias=True, align_corners=False
    )[0].float()
    # torch's antialiased bilinear matches PIL's up to uint8 rounding; a crop would not.
    assert image.shape == (3, 20, 28)
    assert (image - reference).abs().max() < 1.5 / 255


def test_nonsquare_mask_is_binarised_then_nearest_resized(tmp_path: Path) -> None:
    # Sizes chosen so no output pixel centre falls exactly on a source pixel border.
    cat = write_mvtec(tmp_path, n_train=1, defects={"good": 1, "crack": 1}, size_wh=(45, 30))
    # Random speckle tells nearest from any smoothing filter; values below 255 (MVTec LOCO uses
    # 236..254) and the values 1 and 128 must all count as anomalous.
    values = np.random.default_rng(5).choice([0, 0, 1, 128, 236, 255], size=(30, 45))
    Image.fromarray(values.astype(np.uint8), mode="L").save(cat / "ground_truth/crack/000_mask.png")
    binary = (values > 0).astype(np.uint8)
    splits = build_mvtec(tmp_path, CATEGORY, image_size=(14, 20))
    mask = splits.test[0]["mask"][0]
    assert set(torch.unique(mask).tolist()) == {0.0, 1.0}
    # Independent nearest reference: output pixel i samples source floor((i + 0.5) * in / out).
    rows = np.floor((np.arange(14) + 0.5) * 30 / 14).astype(int)
    cols = np.floor((np.arange(20) + 0.5) * 45 / 20).astype(int)
    np.testing.assert_array_equal(mask.numpy(), binary[np.ix_(rows, cols)])


def test_greyscale_and_uppercase_and_bmp_images_are_read(tmp_path: Path) -> None:
    cat = write_mvtec(tmp_path, n_train=1, defects={"good": 1, "crack": 1})
    grey = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    Image.fromarray(grey, mode="L").save(cat / "train/good/001.PNG")
    # A .bmp image finds its mask by stem (BTAD once produced names like 0020.bm.png).
    Image.fromarray(_pixels(7)).save(cat / "test/crack/0020.bmp")
    _write_mask(cat / "ground_truth/crack/0020_mask.png")
    splits = build_mvtec(tmp_path, CATEGORY, image_size=32)
    assert splits.info["n_train"] == 2 and splits.info["n_test"] == 3
    image = splits.train[1]["image"]
    assert image.shape == (3, 32, 32)
    for channel in range(3):
        torch.testing.assert_close(image[channel], torch.from_numpy(grey).float() / 255)
    bmp = next(i for i in range(3) if splits.test[i]["path"].endswith("0020.bmp"))
    assert splits.test[bmp]["mask"].any()


def test_non_image_and_hidden_files_are_ignored(mvtec_root: Path) -> None:
    cat = mvtec_root / CATEGORY
    (cat / "train/good/notes.txt").write_text("not an image")
    (cat / "train/good/.DS_Store").write_bytes(b"\0\1garbage")
    (cat / "test/crack/._000.png").write_bytes(b"AppleDouble fork, not a png")
    (cat / "ground_truth/crack/readme.md").write_text("masks")
    (cat / "test/.ipynb_checkpoints").mkdir()
    train, test = scan_mvtec(mvtec_root, CATEGORY)
    assert len(train) == 5 and len(test) == 5
    build_mvtec(mvtec_root, CATEGORY, image_size=16)


def test_build_info_and_preloaded_data_outlive_the_files(mvtec_root: Path) -> None:
    splits = build_mvtec(mvtec_root, CATEGORY, image_size=(16, 24))
    assert splits.info == {
        "dataset": "mvtec",
        "category": CATEGORY,
        "root": str(mvtec_root),
        "n_train": 5,
        "n_test": 5,
        "n_test_anomalous": 3,
        "defects": ["crack", "hole"],
        "image_size": [16, 24],
    }
    before = splits.test[4]["image"].clone()
    for path in (mvtec_root / CATEGORY).rglob("*.png"):
        path.unlink()
    torch.testing.assert_close(splits.test[4]["image"], before)


def test_lazy_dataset_equals_preloaded(mvtec_root: Path) -> None:
    eager = build_mvtec(mvtec_root, CATEGORY, image_size=20, preload=True)
    lazy = build_mvtec(mvtec_root, CATEGORY, image_size=20, preload=False)
    for i in range(len(eager.test)):
        a, b = eager.test[i], lazy.test[i]
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        torch.testing.assert_close(a["mask"], b["mask"], rtol=0, atol=0)


def test_anomalous_image_with_empty_mask_warns(mvtec_root: Path) -> None:
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(
        mvtec_root / CATEGORY / "ground_truth/hole/000_mask.png"
    )
    with pytest.warns(UserWarning, match=r"all-zero mask.*hole/000_mask\.png"):
        build_mvtec(mvtec_root, CATEGORY, image_size=16)


def test_defect_lost_by_resizing_warns(mvtec_root: Path) -> None:
    speck = np.zeros((32, 32), np.uint8)
    speck[1, 1] = 255  # nearest resize to 4 px samples rows/cols 4, 12, 20, 28 only
    Image.fromarray(speck).save(mvtec_root / CATEGORY / "ground_truth/hole/000_mask.png")
    with pytest.warns(UserWarning, match=r"lose their whole defect.*hole/000_mask\.png"):
        build_mvtec(mvtec_root, CATEGORY, image_size=4)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    cat = write_mvtec(tmp_path, n_train=1, defects={"good": 1, "crack": 1})
    ramp = np.linspace(0, 65535, 32 * 32).astype(np.uint16).reshape(32, 32)
    Image.fromarray(ramp).save(cat / "train/good/000.png")
    image = build_mvtec(tmp_path, CATEGORY, image_size=32).train[0]["image"]
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535)
    assert (image - expected).abs().max() <= 1 / 255


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGB", "RGBA", "I;16"])
def test_masks_of_any_mode_are_binarised(mode: str) -> None:
    values = np.zeros((6, 8), np.uint8)
    values[1:3, 2:5] = 255
    values[4, 6] = 40
    img = Image.fromarray(values, mode="L")
    if mode == "P":
        img = img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    elif mode == "I;16":
        img = Image.fromarray(values.astype(np.uint16) * 257)
    elif mode == "1":
        img = img.convert("1", dither=Image.Dither.NONE)  # thresholds at 128: 40 becomes 0
        values[4, 6] = 0
    else:
        img = img.convert(mode)
    expected = values > 0
    np.testing.assert_array_equal(binarise_mask(img), expected.astype(np.uint8))


@pytest.mark.parametrize("bad", [0, -3, (16,), (16, 0), "abc", 16.5, True])
def test_invalid_image_size_raises(bad: object) -> None:
    with pytest.raises(DatasetError, match="image size"):
        as_hw(bad)  # type: ignore[arg-type]


def test_as_hw_accepts_int_and_pairs() -> None:
    assert as_hw(8) == (8, 8)
    assert as_hw([8, 12]) == (8, 12)
    assert as_hw((np.int64(4), 6)) == (4, 6)


def test_sample_rejects_labels_other_than_0_1(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="label"):
        Sample(tmp_path / "a.png", None, 2, "good")


# ----------------------------------------------------------------------------- layout errors


def _message(root: Path, category: str = CATEGORY) -> str:
    with pytest.raises(DatasetError) as info:
        scan_mvtec(root, category)
    return str(info.value)


def test_missing_root(tmp_path: Path) -> None:
    message = _message(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message
    assert "dataset.root" in message and "STAD_DATA" in message


def test_missing_category_lists_existing_ones(mvtec_root: Path) -> None:
    write_mvtec(mvtec_root, category="gadget", n_train=1, defects={"good": 1, "crack": 1})
    message = _message(mvtec_root, "bottle")
    assert str(mvtec_root / "bottle") in message
    assert "gadget" in message and CATEGORY in message


def test_root_pointing_at_a_category_folder_is_explained(mvtec_root: Path) -> None:
    message = _message(mvtec_root / CATEGORY, CATEGORY)
    assert f"dataset.root={mvtec_root}" in message


def test_missing_train_good(mvtec_root: Path) -> None:
    (mvtec_root / CATEGORY / "train/good").rename(mvtec_root / CATEGORY / "train/ok")
    assert "train/good" in _message(mvtec_root)


def test_train_good_without_images(mvtec_root: Path) -> None:
    folder = mvtec_root / CATEGORY / "train/good"
    for path in folder.iterdir():
        path.unlink()
    (folder / "readme.txt").write_text("no images here")
    message = _message(mvtec_root)
    assert str(folder) in message and "no images" in message


def test_missing_test_folder(mvtec_root: Path) -> None:
    (mvtec_root / CATEGORY / "test").rename(mvtec_root / CATEGORY / "testing")
    assert "no test/ folder" in _message(mvtec_root)


def test_missing_ground_truth_folder(mvtec_root: Path) -> None:
    (mvtec_root / CATEGORY / "ground_truth").rename(mvtec_root / CATEGORY / "gt")
    assert "no ground_truth/ folder" in _message(mvtec_root)


def test_anomalous_image_without_mask_is_named(mvtec_root: Path) -> None:
    (mvtec_root / CATEGORY / "ground_truth/crack/001_mask.png").unlink()
    message = _message(mvtec_root)
    assert "no mask" in message
    assert str(mvtec_root / CATEGORY / "test/crack/001.png") in message


def test_mask_without_image_is_named(mvtec_root: Path) -> None:
    orphan = mvtec_root / CATEGORY / "ground_truth/crack/007_mask.png"
    _write_mask(orphan)
    message = _message(mvtec_root)
    assert "match no test image" in message and str(orphan) in message


def test_mask_folder_without_test_folder_is_reported(mvtec_root: Path) -> None:
    orphan = mvtec_root / CATEGORY / "ground_truth/scratch/000_mask.png"
    _write_mask(orphan)
    assert str(orphan) in _message(mvtec_root)


def test_mask_named_like_its_image_is_not_matched(mvtec_root: Path) -> None:
    gt = mvtec_root / CATEGORY / "ground_truth/hole"
    (gt / "000_mask.png").rename(gt / "000.png")
    message = _message(mvtec_root)
    assert str(gt / "000.png") in message and "no mask" in message


def test_empty_defect_folder_is_named(mvtec_root: Path) -> None:
    empty = mvtec_root / CATEGORY / "test/scratch"
    empty.mkdir()
    message = _message(mvtec_root)
    assert str(empty) in message and "without images" in message


def test_test_set_needs_good_and_anomalous_images(tmp_path: Path) -> None:
    write_mvtec(tmp_path, defects={"crack": 1})
    assert "good/" in _message(tmp_path)
    write_mvtec(tmp_path, category="normal_only", defects={"good": 1})
    assert "defect folder" in _message(tmp_path, "normal_only")


def test_two_images_sharing_a_stem_are_ambiguous(mvtec_root: Path) -> None:
    Image.fromarray(_pixels(3)).save(mvtec_root / CATEGORY / "test/crack/000.jpg")
    assert "share the stem '000'" in _message(mvtec_root)


# ----------------------------------------------------------------------------- bad files


def test_unreadable_image_is_named_before_training(mvtec_root: Path) -> None:
    bad = mvtec_root / CATEGORY / "train/good/002.png"
    bad.write_bytes(b"this is not a png at all")
    for preload in (True, False):
        with pytest.raises(DatasetError) as info:
            build_mvtec(mvtec_root, CATEGORY, image_size=16, preload=preload)
        assert str(bad) in str(info.value)


def test_truncated_image_is_named(mvtec_root: Path) -> None:
    bad = mvtec_root / CATEGORY / "test/good/001.png"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DatasetError) as info:
        build_mvtec(mvtec_root, CATEGORY, image_size=16)
    assert str(bad) in str(info.value)


def test_unreadable_mask_is_named(mvtec_root: Path) -> None:
    bad = mvtec_root / CATEGORY / "ground_truth/hole/000_mask.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError) as info:
        build_mvtec(mvtec_root, CATEGORY, image_size=16)
    assert str(bad) in str(info.value)


def test_mask_size_mismatch_is_named(mvtec_root: Path) -> None:
    mask = mvtec_root / CATEGORY / "ground_truth/crack/001_mask.png"
    _write_mask(mask, size_wh=(32, 31))
    for preload in (True, False):
        with pytest.raises(DatasetError) as info:
            build_mvtec(mvtec_root, CATEGORY, image_size=16, preload=preload)
        message = str(info.value)
        assert str(mask) in message and "32x31" in message and "32x32" in message


# ----------------------------------------------------------------------------- datamodule


def _splits(n_train: int, n_test: int = 3) -> DatasetSplits:
    """Splits over in-memory tensors: the datamodule needs only a Dataset."""

    class Items(torch.utils.data.Dataset):
        def __init__(self, n: int, offset: int) -> None:
            self.n, self.offset = n, offset

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> dict:
            return {
                "image": torch.full((3, 4, 4), float(i + self.offset)),
                "mask": torch.zeros(1, 4, 4),
                "label": torch.tensor(0),
                "path": f"{i + self.offset}.png",
                "defect": "good",
            }

    return DatasetSplits(train=Items(n_train, 0), test=Items(n_test, 1000), info={"n": n_train})


def _ids(loader: torch.utils.data.DataLoader) -> list[int]:
    return [int(p.removesuffix(".png")) for batch in loader for p in batch["path"]]


def test_held_out_split_is_deterministic_disjoint_and_complete() -> None:
    first = AnomalyDataModule(_splits(50), batch_size=8, val_fraction=0.2, seed=3)
    again = AnomalyDataModule(_splits(50), batch_size=8, val_fraction=0.2, seed=3)
    other = AnomalyDataModule(_splits(50), batch_size=8, val_fraction=0.2, seed=4)
    val = _ids(first.val_dataloader())
    train = sorted(_ids(first.train_dataloader()))
    assert len(val) == 10 and len(train) == 40
    assert set(val).isdisjoint(train)
    assert sorted(val + train) == list(range(50))
    assert val == _ids(again.val_dataloader())
    assert val != _ids(other.val_dataloader())
    assert len(first.val_dataset) == 10 and len(first.train_dataset) == 40
    assert first.info["n_val"] == 10 and first.info["n"] == 50


def test_split_indices_keeps_at_least_one_of_each() -> None:
    train, val = split_indices(5, 0.01, seed=0)
    assert len(val) == 1 and len(train) == 4
    with pytest.raises(StadError, match="val_fraction"):
        split_indices(2, 0.9, seed=0)


def test_shuffle_order_depends_on_the_seed_only() -> None:
    dm = AnomalyDataModule(_splits(30), batch_size=4, seed=1)
    torch.manual_seed(123)
    order = _ids(dm.train_dataloader())
    torch.manual_seed(999)
    assert _ids(AnomalyDataModule(_splits(30), batch_size=4, seed=1).train_dataloader()) == order
    assert order != list(range(30)) and sorted(order) == list(range(30))


def test_loaders_without_validation() -> None:
    dm = AnomalyDataModule(_splits(10, n_test=7), batch_size=4, eval_batch_size=3)
    assert len(dm.val_dataset) == 0 and list(dm.val_dataloader()) == []
    test = dm.test_dataloader()
    assert _ids(test) == list(range(1000, 1007))
    assert [len(b["path"]) for b in test] == [3, 3, 1]  # drop_last=False
    assert _ids(dm.predict_dataloader()) == _ids(test)
    assert sum(len(b["path"]) for b in dm.train_dataloader()) == 10
    assert not dm.train_dataloader().persistent_workers
    assert dm.test_dataset is dm.splits.test


def test_workers_are_persistent_only_when_used() -> None:
    dm = AnomalyDataModule(_splits(6), batch_size=4, num_workers=1)
    loader = dm.test_dataloader()
    assert loader.persistent_workers and loader.num_workers == 1
    assert _ids(loader) == [1000, 1001, 1002]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"val_fraction": 1.0},
        {"val_fraction": -0.1},
        {"batch_size": 0},
        {"eval_batch_size": 0},
        {"num_workers": -1},
    ],
)
def test_invalid_datamodule_settings_raise(kwargs: dict) -> None:
    settings = {"batch_size": 2, **kwargs}
    with pytest.raises(StadError, match=next(iter(kwargs))):
        AnomalyDataModule(_splits(10), **settings)


class _CountingModule(L.LightningModule):
    """Counts the batches each loop sees."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = {"train": 0, "val": 0}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen["train"] += len(batch["path"])
        return (self.weight * batch["image"].mean()).sum()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.seen["val"] += len(batch["path"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
@pytest.mark.parametrize(("val_fraction", "expected"), [(0.0, (12, 0)), (0.25, (9, 3))])
def test_lightning_fit_uses_the_held_out_split(val_fraction: float, expected: tuple) -> None:
    dm = AnomalyDataModule(_splits(12), batch_size=5, val_fraction=val_fraction)
    model = _CountingModule()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert (model.seen["train"], model.seen["val"]) == expected


def test_a_stage_may_drop_the_last_incomplete_training_batch():
    """AST's official loaders drop it (Stage.drop_last); a set smaller than a batch keeps it."""
    datamodule = AnomalyDataModule(_splits(10), batch_size=4)
    assert len(datamodule.train_dataloader()) == 3
    datamodule.drop_last_train = True
    assert len(datamodule.train_dataloader()) == 2
    small = AnomalyDataModule(_splits(3), batch_size=4)
    small.drop_last_train = True
    assert len(small.train_dataloader()) == 1


@pytest.mark.slow
def test_ast_stages_drop_the_last_batch_as_the_official_loaders(tiny_config):
    from stad.methods import build_method

    cfg = tiny_config("method=ast", "backbone=tf_efficientnet_lite0")
    stages = build_method(cfg.method, cfg.backbone).stages
    assert [s.drop_last for s in stages] == [True, True]
    rd = tiny_config("method=rd")
    assert [s.drop_last for s in build_method(rd.method, rd.backbone).stages] == [False]
