"""Every dataset × method × backbone × trainer composes and resolves; presets compose."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from stad.methods import METHODS

CONF = Path(__file__).resolve().parents[1] / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_method_config_has_a_registered_builder_and_vice_versa():
    assert set(_options("method")) == set(METHODS)


@pytest.mark.parametrize(
    ("dataset", "method"), list(itertools.product(_options("dataset"), _options("method")))
)
@pytest.mark.slow
def test_every_combination_composes_and_resolves(dataset, method):
    for backbone in _options("backbone"):
        cfg = compose_config([f"dataset={dataset}", f"method={method}", f"backbone={backbone}"])
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved["method"]["name"] == method
        assert resolved["dataset"]["name"] == dataset
        assert isinstance(resolved["image_size"], int)
        assert resolved["backbone"]["name"]


@pytest.mark.parametrize("trainer", _options("trainer"))
def test_every_trainer_preset_composes(trainer):
    resolved = OmegaConf.to_container(compose_config([f"trainer={trainer}"]), resolve=True)
    assert resolved["trainer"]["accelerator"] in ("auto", "cpu", "gpu")


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_preset_composes(experiment):
    cfg = compose_config([f"+experiment={experiment}"])
    OmegaConf.to_container(cfg, resolve=True)


def test_auto_backbone_is_the_paper_backbone_on_real_data_and_offline_on_the_demo():
    real = compose_config(["dataset=mvtec", "method=stfpm"])
    assert real.backbone.name == "resnet18.tv_in1k" and real.backbone.weights == "timm"
    demo = compose_config([])
    assert demo.backbone.name == "tf_efficientnet_lite0" and demo.backbone.weights == "package"
    assert compose_config(["dataset=mvtec", "method=ast"]).method.input == "rgb"
    assert compose_config(["+experiment=ast_mvtec3d_depth"]).method.input == "depth"


@pytest.mark.parametrize(
    ("preset", "val_fraction"),
    [("rd_mvtec", 0.0), ("stfpm_mvtec", 0.0), ("dskd_mvtec", 0.0), ("ast_mvtec", 0.0)]
    + [(f"ast_mvtec3d_{mode}", 0.1) for mode in ("rgb", "depth", "rgbd")],
)
def test_paper_presets_compose_their_shared_bases(preset, val_fraction):
    # _paper / _reproducible / _ast_mvtec3d hold what the presets share (conf/experiment).
    cfg = compose_config([f"+experiment={preset}"])
    assert cfg.trainer.deterministic == "warn"
    assert cfg.threshold.val_fraction == val_fraction
    if preset.startswith("ast_mvtec3d_"):
        assert cfg.dataset.input == preset.rsplit("_", 1)[1] and cfg.method.flow.hidden == 64
        assert cfg.method.stages.teacher.epochs == cfg.method.stages.student.epochs == 72


def test_the_pro_limit_comes_from_the_config():
    from stad.run import _metrics

    assert _metrics(compose_config([]), None)["pro"].fpr_limit == 0.3
    assert _metrics(compose_config(["metrics.pro_fpr_limit=0.05"]), None)["pro"].fpr_limit == 0.05


def test_every_registered_method_has_tiny_test_settings():
    # The registry-driven tests (checkpoint round trip, export) read conftest.TINY_METHODS.
    from conftest import TINY_METHODS

    assert set(TINY_METHODS) == set(METHODS), "add the new method to conftest.TINY_METHODS"
    for name, overrides in TINY_METHODS.items():
        assert compose_config(overrides).method.name == name
