"""stad.predict: scoring new images with a trained run reproduces the run's own test scores and
AUROC, writes invertible maps, skips and lists files it cannot score, and chooses thresholds."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image
from sklearn.metrics import roc_auc_score

from stad.backbones import weights_from_checkpoint
from stad.checkpoint import load_run, save_checkpoint
from stad.data import build_dataset
from stad.methods import build_method
from stad.predict import main, read_png16_map
from stad.scoring import read_labelled, score_images

# Tiny convolutions gain nothing from threads on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(out: Path, name: str = "predictions.csv") -> list[dict]:
    with open(out / name, newline="") as f:
        return list(csv.DictReader(f))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png"))


@pytest.mark.slow
def test_predicting_the_test_folder_reproduces_the_runs_scores_and_image_auroc(trained, tmp_path):
    out = tmp_path / "out"
    argv = [f"run={trained.run_dir}", f"input={trained.test_dir}", f"output={out}"]
    assert main([*argv, "batch_size=3", "workers=2"]) == 0
    rows = _rows(out)
    assert len(rows) == len(_images(trained.test_dir)) == 20
    assert _rows(out, "skipped.csv") == []
    # Same stem in different defect folders: every output file is its own.
    assert len({r["map_file"] for r in rows}) == len({r["overlay_file"] for r in rows}) == 20
    assert all(
        (out / r["map_file"]).is_file() and (out / r["overlay_file"]).is_file() for r in rows
    )
    labels = [int(Path(r["path"]).parent.name != "good") for r in rows]
    scores = [float(r["score"]) for r in rows]
    assert roc_auc_score(labels, scores) == pytest.approx(
        trained.record["metrics"]["image_auroc"], abs=1e-6
    )
    # Independent reference: the eager method on the dataset's own test split, image by image.
    loaded = load_run(trained.run_dir)
    test = build_dataset(loaded.config.dataset, loaded.image_size).test
    with torch.no_grad():
        want = {
            str(Path(test[i]["path"]).resolve()): float(
                loaded.method({"image": test[i]["image"][None]})[1][0]
            )
            for i in range(len(test))
        }
    got = {str(Path(r["path"]).resolve()): float(r["score"]) for r in rows}
    assert got.keys() == want.keys()
    for path, value in want.items():
        assert got[path] == pytest.approx(value, rel=1e-5, abs=1e-6)
    # The run's thresholds decide: anomalous when score >= the image threshold.
    saved = json.loads((out / "thresholds.json").read_text())
    image_t = trained.record["thresholds"]["image"]["value"]
    assert saved["image"]["value"] == image_t and saved["image"]["origin"] == "run"
    assert [r["decision"] for r in rows] == [
        "anomalous" if s >= image_t else "normal" for s in scores
    ]


@pytest.mark.slow
def test_png16_maps_invert_to_the_float_maps_and_fixed_thresholds_decide(trained, tmp_path):
    good = trained.test_dir / "good"
    loaded = load_run(trained.run_dir)
    reference = score_images(loaded, _images(good), batch_size=4)
    threshold = float(reference.scores.median())
    base = [f"run={trained.run_dir}", f"input={good}", "overlay=false"]
    assert main([*base, f"output={tmp_path / 'npy'}", "map_format=npy"]) == 0
    fixed = ["threshold=fixed", f"image_threshold={threshold}"]
    assert main([*base, f"output={tmp_path / 'png'}", *fixed]) == 0
    npy_rows, png_rows = _rows(tmp_path / "npy"), _rows(tmp_path / "png")
    assert [Path(r["path"]) for r in png_rows] == reference.paths
    for i, (a, b) in enumerate(zip(npy_rows, png_rows, strict=True)):
        exact = np.load(tmp_path / "npy" / a["map_file"])
        assert np.array_equal(exact, reference.maps[i, 0].numpy())
        lo, hi = float(b["map_min"]), float(b["map_max"])
        assert (lo, hi) == (float(exact.min()), float(exact.max()))
        assert float(b["score"]) == hi  # STFPM's image score is the map's maximum
        restored = read_png16_map(tmp_path / "png" / b["map_file"], lo, hi)
        assert restored.shape == (64, 64)
        assert np.abs(restored - exact).max() <= (hi - lo) / 65535
        assert b["decision"] == ("anomalous" if float(b["score"]) >= threshold else "normal")
        assert b["overlay_file"] == ""
    saved = json.loads((tmp_path / "png" / "thresholds.json").read_text())
    assert saved["image"] == {
        "value": threshold,
        "method": "fixed",
        "source": "stad.predict option",
        "origin": "stad.predict",
    }
    assert saved["pixel"]["origin"] == "run"  # what threshold=fixed does not set comes from the run


def test_unreadable_files_are_skipped_with_a_reason_and_listed(trained, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    good = _images(trained.test_dir / "good")
    shutil.copy(good[0], folder / "a.png")
    shutil.copy(good[1], folder / "b.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.png").write_bytes(good[2].read_bytes()[:300])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "tiny.png")  # < stride 16
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main([f"run={trained.run_dir}", f"input={folder}", f"output={out}"]) == 0
    assert [Path(r["path"]).name for r in _rows(out)] == ["a.png", "b.png"]
    skipped = {Path(r["path"]).name: r["reason"] for r in _rows(out, "skipped.csv")}
    assert set(skipped) == {"empty.png", "cut.png", "tiny.png"}
    assert "0 bytes" in skipped["empty.png"] and "stride 16" in skipped["tiny.png"]
    assert "cut.png" in skipped["cut.png"]  # the dataset reader's message names the file
    err = capsys.readouterr().err
    assert all(f"skipped {folder / name}" in err for name in skipped)
    # Nothing scorable: exit status 2, the reasons still listed.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    assert main([f"run={trained.run_dir}", f"input={bad}", f"output={tmp_path / 'o2'}"]) == 2
    assert len(_rows(tmp_path / "o2", "skipped.csv")) == 1
    assert "no image could be scored" in capsys.readouterr().err


def test_f1_threshold_on_a_labelled_folder_is_f1_optimal_and_recorded(trained, tmp_path):
    out = tmp_path / "out"
    labelled = trained.test_dir
    argv = [f"run={trained.run_dir}", f"input={labelled}", f"output={out}", "overlay=false"]
    assert main([*argv, "threshold=f1", f"labelled={labelled}"]) == 0
    saved = json.loads((out / "thresholds.json").read_text())
    image = saved["image"]
    assert saved["threshold"] == "f1" and image["method"] == "f1"
    assert image["origin"] == "stad.predict" and str(labelled) in image["source"]
    # Brute force over every candidate threshold: no other cut has a higher F1.
    rows = _rows(out)
    scores = np.array([float(r["score"]) for r in rows])
    labels = np.array([Path(r["path"]).parent.name != "good" for r in rows])

    def f1(t: float) -> float:
        pred = scores >= t
        tp = (pred & labels).sum()
        return 2 * tp / (pred.sum() + labels.sum())

    best = max(f1(t) for t in scores)
    assert image["f1"] == pytest.approx(best) and f1(image["value"]) == pytest.approx(best)
    # The masks beside the folder (../ground_truth) give an F1 pixel threshold too.
    assert saved["pixel"]["method"] == "f1" and "sampled pixels" in saved["pixel"]["source"]


def test_read_labelled_takes_labels_from_folders_and_matches_masks(trained, tmp_path):
    paths, labels, masks = read_labelled(trained.test_dir)
    assert len(paths) == 20 and sum(labels) == 12
    for path, label, mask in zip(paths, labels, masks, strict=True):
        assert label == int(path.parent.name != "good")
        if label:
            assert mask == trained.test_dir.parent / "ground_truth" / path.parent.name / (
                f"{path.stem}_mask.png"
            )
        else:
            assert mask is None
    assert read_labelled(trained.test_dir, masks=None)[2] is None
    (tmp_path / "scratch").mkdir()
    shutil.copy(paths[-1], tmp_path / "scratch" / "x.png")
    with pytest.raises(Exception, match="good/"):
        read_labelled(tmp_path)


def test_user_errors_exit_2_with_one_message(trained, tmp_path, capsys):
    argv = [f"run={trained.run_dir}", f"input={trained.test_dir / 'good'}"]
    assert main([*argv, "colour=red"]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'colour'" in err and "batch_size" in err and "threshold" in err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    assert main([*argv, f"output={tmp_path / 'used'}"]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    assert main([*argv, "threshold=f1"]) == 2
    assert "labelled=" in capsys.readouterr().err


@pytest.mark.slow
def test_a_method_that_reads_depth_is_refused(tmp_path, capsys):
    cfg = compose_config(
        [
            "method=ast",
            "method.input=rgbd",
            "backbone=tf_efficientnet_lite0",
            "method.flow.hidden=16",
            "method.student.hidden=16",
            "image_size=64",
        ]
    )
    with weights_from_checkpoint():
        method = build_method(cfg.method, cfg.backbone)
    save_checkpoint(tmp_path / "run", method, cfg)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "x.png")
    assert main([f"run={tmp_path / 'run'}", f"input={tmp_path / 'x.png'}"]) == 2
    err = capsys.readouterr().err
    assert "depth" in err and "method.input=rgb" in err


def test_a_run_without_a_checkpoint_prints_one_line_and_exits_2(tmp_path, capsys):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    assert main([f"run={tmp_path}", f"input={tmp_path / 'x.png'}"]) == 2
    captured = capsys.readouterr()
    assert "holds no checkpoint" in captured.err and "Traceback" not in captured.err
    assert captured.err.strip().count("\n") == 0 and captured.err.startswith("stad.predict: error:")
