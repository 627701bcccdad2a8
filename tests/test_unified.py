"""The unified (multi-class) setting: one model for several categories, a record per category."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_DATA, compose_config
from omegaconf import OmegaConf

from stad.errors import IncompatibleError, StadError
from stad.leaderboard import collect, paper_setting, render
from stad.results import config_hash
from stad.unified import SUMMARY_NAME, check_unified_method, unified_categories


def _base(data_cache) -> list[str]:
    """Tiny STFPM runs on the generated data (random ResNet-18, a few steps, 64 px)."""
    return [
        f"dataset.root={data_cache}/synthetic",
        f"decode_cache={data_cache}/decoded",
        "trainer=smoke",
        *TINY_DATA,
        "image_size=64",
        "backbone=resnet18",
        "backbone.weights=random",
    ]


def _unified(data_cache, *extra):
    return compose_config([*_base(data_cache), "setting=unified", *extra])


def test_setting_unified_composes_with_the_dataset_categories():
    cfg = compose_config(["setting=unified", "dataset=mvtec"])
    assert cfg.setting.name == "unified"
    assert cfg.dataset.category == "unified"  # the run directory's name
    assert unified_categories(cfg) == list(cfg.dataset.categories)
    assert compose_config().setting.name == "single"


def test_the_single_setting_keeps_the_config_hash_of_runs_made_before_settings_existed():
    cfg = compose_config()
    before = OmegaConf.to_container(cfg, resolve=True)
    before.pop("setting")
    assert config_hash(cfg) == config_hash(before)
    assert config_hash(compose_config(["setting=unified"])) != config_hash(cfg)


@pytest.mark.parametrize(
    ("categories", "message"),
    [
        ("[object,bottle]", "bottle, which dataset synthetic does not have"),
        ("[object,object]", "names object more than once"),
        ("[]", "needs categories"),
    ],
)
def test_a_bad_category_list_stops_with_one_message(categories, message):
    cfg = compose_config(["setting=unified", f"setting.categories={categories}"])
    with pytest.raises(StadError, match=message):
        unified_categories(cfg)


def test_a_method_that_cannot_share_one_model_is_incompatible():
    cfg = compose_config(["setting=unified", "method=aand"])
    with pytest.raises(IncompatibleError, match="foreground rule"):
        check_unified_method(cfg)
    check_unified_method(compose_config(["setting=unified"]))  # STFPM can


def _run(cfg, run_dir):
    from stad.run import run
    from stad.unified import is_unified, run_unified

    return run(cfg, run_dir, run_unified if is_unified(cfg) else None)


def test_one_model_trains_on_every_category_and_each_is_tested_apart(data_cache, tmp_path):
    cfg = _unified(data_cache, "setting.categories=[object,texture]")
    summary = _run(cfg, tmp_path / "u")
    assert summary["categories"] == ["object", "texture"]
    counts = summary["n_train_per_category"]
    assert summary["n_train"] == sum(counts.values()) and all(n > 0 for n in counts.values())
    # one model: the run's checkpoint; a record per category the leaderboard reads as any other
    assert (tmp_path / "u" / "model.safetensors").is_file()
    on_disk = json.loads((tmp_path / "u" / SUMMARY_NAME).read_text())
    for category in ("object", "texture"):
        record = json.loads((tmp_path / "u" / category / "record.json").read_text())
        assert record["setting"] == "unified" and record["category"] == category
        assert record["checkpoint"] == "../model.safetensors"
        assert record["data"]["category"] == category  # tested on its own test set
        assert record["thresholds"]["image"]["source"].endswith("held-out normal images")
        assert on_disk["per_category"][category]["image_auroc"] == record["metrics"]["image_auroc"]
    for name, mean in on_disk["metrics"].items():  # the mean of the per-category values
        values = [on_disk["per_category"][c][name] for c in ("object", "texture")]
        assert math.isclose(mean, sum(values) / 2)
    # the leaderboard keeps the settings apart: a column, never averaged together
    single = compose_config(_base(data_cache))
    _run(single, tmp_path / "s")
    board = collect([tmp_path])
    rows = {(r.category, r.setting): r for r in board.rows}
    assert {("object", "single"), ("object", "unified"), ("texture", "unified")} <= set(rows)
    assert {("mean", "single"), ("mean", "unified")} <= set(rows)
    assert rows[("mean", "unified")].values["n_categories"] == 2
    assert rows[("mean", "single")].values["n_categories"] == 1
    assert ",setting," in render(board).splitlines()[0]


def test_a_unified_run_of_one_category_equals_the_single_run(data_cache, tmp_path):
    base = _base(data_cache)
    single = _run(compose_config(base), tmp_path / "s")
    unified = _run(
        compose_config([*base, "setting=unified", "setting.categories=[object]"]), tmp_path / "u"
    )
    assert unified["per_category"]["object"] == single["metrics"]


def test_paper_rows_compare_with_runs_of_their_own_setting():
    assert paper_setting({"condition": "setting.name=unified"}) == "unified"
    assert paper_setting({"condition": ""}) == "single"
    assert paper_setting({"condition": "dataset.input=rgb"}) == "single"


@pytest.mark.slow
def test_statistics_fitted_after_training_are_per_category_unless_joint(data_cache, tmp_path):
    from conftest import SMALL_US
    from safetensors.torch import load_file

    us = [
        "method=us",
        *SMALL_US,
        "method.students.count=2",
        f"method.teacher.cache_dir={data_cache}/teachers",
        "setting.categories=[object,texture]",
    ]
    _run(_unified(data_cache, *us), tmp_path / "per")
    states = {
        c: load_file(tmp_path / "per" / c / "model.safetensors") for c in ("object", "texture")
    }
    assert not (tmp_path / "per" / "model.safetensors").exists()
    fitted = [k for k in states["object"] if k.endswith(("e_mean", "e_std", "v_mean", "v_std"))]
    assert fitted, sorted(states["object"])[:20]
    assert any(not torch.equal(states["object"][k], states["texture"][k]) for k in fitted)
    records = {c: json.loads((tmp_path / "per" / c / "record.json").read_text()) for c in states}
    assert all(r["checkpoint"] == "model.safetensors" for r in records.values())
    assert records["object"]["unified"]["calibration"] == "per_category"

    _run(_unified(data_cache, *us, "setting.calibration=joint"), tmp_path / "joint")
    assert (tmp_path / "joint" / "model.safetensors").is_file()
    assert not (tmp_path / "joint" / "object" / "model.safetensors").exists()
