"""Tests of the generated default dataset: determinism, caching, layout, exact masks, difficulty."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.stats import rankdata

from stad.data import synthetic
from stad.data.synthetic import (
    CATEGORIES,
    DEFAULT_CATEGORIES,
    DEFECTS,
    MARKER,
    ensure_synthetic,
    make_anomalous,
    make_normal,
)
from stad.errors import DatasetError

TINY = {"image_size": 64, "n_train": 8, "n_test_good": 2, "n_test_per_defect": 2}


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _pixel_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann–Whitney) formula, independent of the project's metrics."""
    ranks = rankdata(scores)
    pos = int(labels.sum())
    neg = labels.size - pos
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("cache"), **TINY)


# ---------------------------------------------------------------------------------------------
# Determinism and caching


def test_same_parameters_give_byte_identical_files(tiny_root: Path, tmp_path: Path) -> None:
    again = ensure_synthetic(tmp_path, **TINY)
    assert again != tiny_root
    first, second = _files(tiny_root), _files(again)
    assert len(first) > 20
    assert first == second


def test_seed_changes_the_pictures(tiny_root: Path, tmp_path: Path) -> None:
    other = ensure_synthetic(tmp_path, **{**TINY, "seed": 1})
    assert other.name != tiny_root.name
    a = (tiny_root / "object/train/good/000.png").read_bytes()
    b = (other / "object/train/good/000.png").read_bytes()
    assert a != b


def test_every_parameter_is_part_of_the_key(tmp_path: Path) -> None:
    names = set()
    for change in ({}, {"image_size": 48}, {"n_train": 3}, {"n_test_good": 1}, {"seed": 5}):
        params = {**TINY, "n_train": 2, "n_test_per_defect": 1, **change}
        names.add(ensure_synthetic(tmp_path, categories=["texture"], **params).name)
    assert len(names) == 5
    # Order and duplicates of categories do not matter.
    a = ensure_synthetic(tmp_path, categories=["object", "texture"], **TINY)
    b = ensure_synthetic(tmp_path, categories=["texture", "object", "texture"], **TINY)
    assert a == b


def test_second_call_returns_the_cache_without_writing(
    tiny_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*")}

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a complete dataset was generated again")

    monkeypatch.setattr(synthetic, "_write_category", fail)
    assert ensure_synthetic(tiny_root.parent, **TINY) == tiny_root
    assert {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*")} == before


def test_category_images_do_not_depend_on_other_categories(tiny_root: Path, tmp_path: Path) -> None:
    alone = ensure_synthetic(tmp_path, categories=["object"], **TINY)
    assert _files(alone / "object") == _files(tiny_root / "object")


# ---------------------------------------------------------------------------------------------
# Layout


def test_layout_matches_mvtec(tiny_root: Path) -> None:
    assert (tiny_root / MARKER).is_file()
    assert sorted(p.name for p in tiny_root.iterdir() if p.is_dir()) == sorted(DEFAULT_CATEGORIES)
    for category in DEFAULT_CATEGORIES:
        base = tiny_root / category
        train = sorted((base / "train/good").glob("*.png"))
        assert [p.name for p in train] == [f"{i:03d}.png" for i in range(TINY["n_train"])]
        assert sorted(p.name for p in (base / "test").iterdir()) == sorted(
            ("good", *DEFECTS[category])
        )
        assert len(list((base / "test/good").glob("*.png"))) == TINY["n_test_good"]
        assert not (base / "ground_truth/good").exists()
        assert sorted(p.name for p in (base / "ground_truth").iterdir()) == sorted(
            DEFECTS[category]
        )
        for image_path in [*train, *(base / "test").rglob("*.png")]:
            with Image.open(image_path) as img:
                assert img.mode == "RGB"
                assert img.size == (TINY["image_size"], TINY["image_size"])
        for defect in DEFECTS[category]:
            images = sorted((base / "test" / defect).glob("*.png"))
            masks = sorted((base / "ground_truth" / defect).glob("*.png"))
            assert len(images) == TINY["n_test_per_defect"]
            assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]
            for mask_path in masks:
                with Image.open(mask_path) as img:
                    assert img.mode == "L"
                    mask = np.asarray(img)
                assert mask.shape == (TINY["image_size"],) * 2
                assert set(np.unique(mask)) <= {0, 255}
                assert (mask > 0).sum() > 0, f"empty mask {mask_path}"


def test_files_are_what_the_public_functions_return(tiny_root: Path) -> None:
    size = TINY["image_size"]
    stored = np.asarray(Image.open(tiny_root / "texture/train/good/001.png"))
    assert np.array_equal(stored, make_normal("texture", 1, image_size=size))
    stored = np.asarray(Image.open(tiny_root / "object/test/good/001.png"))
    assert np.array_equal(stored, make_normal("object", 1, image_size=size, stream="good"))
    _, defective, mask = make_anomalous("object", "missing_part", 1, image_size=size)
    assert np.array_equal(
        np.asarray(Image.open(tiny_root / "object/test/missing_part/001.png")), defective
    )
    stored_mask = np.asarray(
        Image.open(tiny_root / "object/ground_truth/missing_part/001_mask.png")
    )
    assert np.array_equal(stored_mask > 0, mask)


# ---------------------------------------------------------------------------------------------
# Atomicity and concurrency


def test_no_temporary_folders_are_left(tiny_root: Path) -> None:
    assert [p.name for p in tiny_root.parent.iterdir()] == [tiny_root.name]


def test_incomplete_folder_is_regenerated(tmp_path: Path) -> None:
    params = {**TINY, "n_train": 2, "n_test_per_defect": 1}
    root = ensure_synthetic(tmp_path, categories=["texture"], **params)
    reference = _files(root)
    (root / MARKER).unlink()  # as if a non-atomic writer had crashed half-way
    (root / "texture/train/good/000.png").write_bytes(b"truncated")
    (root / "junk.txt").write_text("left over")
    assert ensure_synthetic(tmp_path, categories=["texture"], **params) == root
    assert _files(root) == reference
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


def test_crash_midway_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = synthetic.make_anomalous

    def crash_on_third(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "make_anomalous", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path, **TINY)
    assert list(tmp_path.iterdir()) == []


def test_publish_keeps_a_finished_copy_and_discards_ours(tmp_path: Path) -> None:
    root, ours = tmp_path / "root", tmp_path / "ours"
    (root / "x").mkdir(parents=True)
    (root / MARKER).write_text("{}")
    ours.mkdir()
    (ours / "mine").write_text("ours")
    synthetic._publish(ours, root)
    assert not ours.exists()
    assert (root / "x").is_dir()
    assert not (root / "mine").exists()


def test_concurrent_callers_end_with_one_complete_copy(tmp_path: Path) -> None:
    params = {**TINY, "n_train": 3, "n_test_per_defect": 1}
    results: list[Path] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def worker() -> None:
        barrier.wait()
        try:
            results.append(ensure_synthetic(tmp_path, categories=["object"], **params))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(results)) == 1
    root = results[0]
    assert (root / MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [root.name]
    reference = ensure_synthetic(tmp_path / "ref", categories=["object"], **params)
    assert _files(root) == _files(reference)


# ---------------------------------------------------------------------------------------------
# Exact masks


@pytest.mark.parametrize(("category", "defect"), [(c, d) for c in CATEGORIES for d in DEFECTS[c]])
def test_defect_changes_exactly_the_masked_pixels(category: str, defect: str) -> None:
    for index in range(2):
        clean, defective, mask = make_anomalous(category, defect, index, image_size=64)
        assert clean.shape == defective.shape == (64, 64, 3)
        assert mask.shape == (64, 64)
        assert mask.dtype == bool
        assert mask.any()
        # Outside the mask: byte-identical to the clean image.
        assert np.array_equal(clean[~mask], defective[~mask])
        # Inside: (almost) every pixel really changed; the rest are filled holes of a region.
        change = np.abs(defective.astype(int) - clean.astype(int)).max(-1)
        assert (change[mask] > synthetic._NOISE_TOL).mean() > 0.8
        # The clean image is an ordinary normal image (same generator as train/good).
        assert np.array_equal(clean, make_normal(category, index, image_size=64, stream=defect))


def test_exact_mask_reverts_small_changes_and_specks() -> None:
    clean = np.full((20, 20, 3), 100, np.uint8)
    modified = clean.copy()
    modified[2:8, 2:8] = 160  # a real defect, 36 px
    modified[4:6, 4:6] = 101  # inside it: a hole that barely changed
    modified[15, 15] = 200  # a lone speck
    modified[10:13, 10:13] = 102  # noise-level change
    region = np.ones((20, 20), bool)
    region[2, 2:8] = False  # not allowed to touch this row
    defective, mask = synthetic._exact_mask(clean, modified, region)
    expected = np.zeros((20, 20), bool)
    expected[3:8, 2:8] = True
    assert np.array_equal(mask, expected)
    assert np.array_equal(defective[~mask], clean[~mask])
    assert np.array_equal(defective[mask], modified[mask])


# ---------------------------------------------------------------------------------------------
# Difficulty: visible, moderate, not trivial

_SIZE = 128


@pytest.mark.parametrize("category", DEFAULT_CATEGORIES)
def test_defects_have_moderate_contrast_and_size(category: str) -> None:
    """Per image, the mean |defective − clean| inside the mask (0–1 scale) lies in [0.02, 0.45]
    and the mask covers 0.2–6 % of the image; no more than 10 % of defect pixels saturate."""
    for defect in DEFECTS[category]:
        contrasts = []
        for index in range(3):
            clean, defective, mask = make_anomalous(category, defect, index, image_size=_SIZE)
            diff = np.abs(defective.astype(float) - clean.astype(float))[mask] / 255.0
            contrasts.append(diff.mean())
            assert 0.002 <= mask.mean() <= 0.06, (defect, mask.mean())
            saturated = ((defective[mask] == 0) | (defective[mask] == 255)).mean()
            assert saturated < 0.1, (defect, saturated)
        assert min(contrasts) >= 0.02 and max(contrasts) <= 0.45, (defect, contrasts)


def _trivial_scores(category: str, images: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Per-pixel scores of a detector that needs no learning.

    Object: |image − mean training image| over the training std (pose jitter is the only
    variation). Texture: squared colour distance to the image's median colour in units of the
    image's std, averaged over 5×5 pixels (flags anything off-colour or unusually dark/bright).
    """
    if category == "object":
        mean, std = train.mean(0), train.std(0) + 0.02
        return (np.abs(images - mean) / std).sum(-1)
    flat = images.reshape(len(images), -1, 3)
    median = np.median(flat, 1)[:, None, None]
    std = flat.std(1)[:, None, None]
    return ndimage.uniform_filter((((images - median) / std) ** 2).sum(-1), (1, 5, 5))


@pytest.mark.parametrize("category", DEFAULT_CATEGORIES)
def test_trivial_detector_sees_defects_but_does_not_solve_them(category: str) -> None:
    """Pixel AUROC of a learning-free detector over a small test set lies in [0.6, 0.99):
    the defects differ from normal variation, yet the task needs more than a per-pixel rule."""
    as_float = np.float32(1 / 255)
    train = np.stack([make_normal(category, i, image_size=_SIZE) for i in range(8)]) * as_float
    images, masks = [], []
    for i in range(4):
        images.append(make_normal(category, i, image_size=_SIZE, stream="good"))
        masks.append(np.zeros((_SIZE, _SIZE), bool))
    for defect in DEFECTS[category]:
        for i in range(2):
            _, defective, mask = make_anomalous(category, defect, i, image_size=_SIZE)
            images.append(defective)
            masks.append(mask)
    scores = _trivial_scores(category, np.stack(images) * as_float, train)
    auroc = _pixel_auroc(scores.ravel(), np.stack(masks).ravel())
    assert 0.6 <= auroc < 0.99, auroc


# ---------------------------------------------------------------------------------------------
# Errors a user can cause


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"categories": ["carpet"]}, "unknown synthetic category 'carpet'"),
        ({"categories": []}, "no synthetic categories"),
        ({"image_size": 8}, "image_size=8 is too small"),
        ({"n_train": 0}, "n_train=0"),
        ({"seed": -1}, "seed=-1 is negative"),
    ],
)
def test_bad_parameters_raise_dataset_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        ensure_synthetic(tmp_path, **{**TINY, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_unknown_defect_raises_dataset_error() -> None:
    with pytest.raises(DatasetError, match="unknown defect 'hole' for synthetic category 'object'"):
        make_anomalous("object", "hole", 0, image_size=64)


def test_unwritable_cache_raises_dataset_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DatasetError, match="cannot write the synthetic dataset"):
        ensure_synthetic(blocker / "cache", **TINY)


def test_textures_come_from_the_installed_scikit_image() -> None:
    import skimage.data

    texture = synthetic._source_texture("brick.png", 0.0)
    assert texture.shape == (512, 512)
    assert np.allclose(texture * 255, skimage.data.brick(), atol=0.5)
