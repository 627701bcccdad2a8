"""Checkpoints: every method round-trips through model.safetensors offline; incompatible or
tampered checkpoints stop with one clear message and never run code."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_batch, tiny_image_size, tiny_method_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import stad
from stad.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    check_targets,
    is_allowed_target,
    load_run,
    save_checkpoint,
)
from stad.methods import METHODS, build_method


@pytest.fixture
def built(tmp_path):
    """A small method with random weights (US pretrains for two steps into tmp_path)."""

    def make(method: str):
        cfg = tiny_method_config(method, tmp_path)
        torch.manual_seed(0)
        return cfg, build_method(cfg.method, cfg.backbone).eval()

    return make


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_reloads_offline_with_identical_outputs(method, built, tmp_path):
    cfg, original = built(method)
    thresholds = {"image": {"value": 0.5, "method": "fixed", "source": "test"}}
    save_checkpoint(tmp_path / "run", original, cfg, thresholds)
    loaded = load_run(tmp_path / "run")
    assert loaded.thresholds == thresholds and loaded.stad_version == stad.__version__
    size = tiny_image_size(method)
    batch = random_batch(2, size)
    if "depth" in original.requires:
        batch["depth"] = torch.rand(2, 1, size, size)
        batch["foreground"] = torch.ones(2, 1, size, size)
    with torch.no_grad():
        want = original(dict(batch))
        got = loaded.method(dict(batch))
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_checkpoint_holds_config_version_and_every_weight(built, tmp_path):
    cfg, method = built("stfpm")
    path = save_checkpoint(tmp_path / "run", method, cfg)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["method"]["name"] == "stfpm"
    assert meta["stad_version"] == stad.__version__
    assert set(load_file(path)) == set(method.state_dict())


def test_missing_checkpoint_names_the_fix(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_run(tmp_path / "run")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_run(tmp_path / "nowhere")


def _rewrite(path, **changes: str) -> None:
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)


def test_another_stad_version_or_format_stops_with_a_message(built, tmp_path):
    cfg, method = built("stfpm")
    path = save_checkpoint(tmp_path / "run", method, cfg)
    _rewrite(path, stad_version="9.3.0")
    with pytest.raises(CheckpointError, match=r"stad 9\.3\.0.*retrain"):
        load_run(tmp_path / "run")
    _rewrite(path, stad_version=stad.__version__, format="99")
    with pytest.raises(CheckpointError, match="format 99"):
        load_run(tmp_path / "run")


def test_a_checkpoint_of_another_config_stops_with_a_message(built, tmp_path):
    cfg, method = built("stfpm")
    path = save_checkpoint(tmp_path / "run", method, cfg)
    config = json.loads(json.loads(json.dumps(_meta(path)))["config"])
    config["backbone"]["name"] = "resnet18"
    _rewrite(path, config=json.dumps(config))
    with pytest.raises(CheckpointError, match="does not fit method stfpm"):
        load_run(tmp_path / "run")


def _meta(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_a_tampered_target_is_refused_before_anything_is_built(built, tmp_path, monkeypatch):
    cfg, method = built("stfpm")
    path = save_checkpoint(tmp_path / "run", method, cfg)
    config = json.loads(_meta(path)["config"])
    config["method"]["stages"]["distill"]["optimizer"]["_target_"] = "os.system"
    _rewrite(path, config=json.dumps(config))
    built_anything = []
    monkeypatch.setattr("stad.methods.build_method", lambda *a: built_anything.append(a))
    with pytest.raises(CheckpointError, match=r"os\.system"):
        load_run(tmp_path / "run")
    assert not built_anything


@pytest.mark.parametrize(
    ("target", "allowed"),
    [
        ("stad.methods.aand.multistep_at_fractions", True),
        ("torch.optim.Adam", True),
        ("torch.optim.lr_scheduler.MultiStepLR", True),
        ("torch.optim.lr_scheduler.LambdaLR", True),
        ("os.system", False),
        ("builtins.eval", False),
        ("torch.load", False),
        ("torch.optim.Optimizer.__init__", False),
        ("subprocess.Popen", False),
        ("stad..x", False),
    ],
)
def test_only_stad_and_torch_optimizer_targets_are_allowed(target, allowed):
    assert is_allowed_target(target) is allowed


def test_targets_are_checked_at_any_depth():
    check_targets({"a": [{"_target_": "torch.optim.SGD"}]})
    with pytest.raises(CheckpointError, match=r"config\.a\[0\]\.b\._target_"):
        check_targets({"a": [{"b": {"_target_": "posix.system"}}]})


def test_a_truncated_checkpoint_stops_with_a_message(built, tmp_path):
    cfg, method = built("stfpm")
    path = save_checkpoint(tmp_path / "run", method, cfg)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="retrain"):
        load_run(tmp_path / "run")
    assert (tmp_path / "run" / CHECKPOINT_NAME).exists()
