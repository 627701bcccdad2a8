"""Experiment trackers (conf/logger, stad.loggers): what a run writes, read back by each
tracker's own reader."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_DATA, compose_config

from stad.errors import StadError
from stad.loggers import RUN_ID_FILE, final_values, flat_params, trainer_loggers


def _tiny(data_cache, tmp_path, loggers: str):
    return compose_config(
        [
            f"dataset.root={data_cache}/synthetic",
            f"decode_cache={data_cache}/decoded",
            f"output_root={tmp_path}/out",
            "trainer=smoke",
            "trainer.log_every_n_steps=1",
            *TINY_DATA,
            "image_size=64",
            "backbone=resnet18",
            "backbone.weights=random",
            f"logger={loggers}",
        ]
    )


def test_csv_is_the_default_and_loggers_combine():
    assert list(compose_config().logger) == ["csv"]
    cfg = compose_config(["logger=[csv,tensorboard,mlflow,wandb]"])
    assert list(cfg.logger) == ["csv", "tensorboard", "mlflow", "wandb"]
    assert cfg.logger.wandb.offline is True  # nothing leaves the machine unless asked


def test_where_and_how_a_run_logs_does_not_change_its_config_hash():
    from stad.results import config_hash

    assert config_hash(compose_config()) == config_hash(compose_config(["logger=[tensorboard]"]))


def test_a_missing_tracker_package_names_its_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(StadError, match=r"stad\[wandb\]"):
        trainer_loggers(compose_config(["logger=[wandb]"]), tmp_path, "distill")


def test_params_and_final_values_are_flat_and_finite():
    assert flat_params({"a": {"b": 1, "c": [1, 2]}, "d": "x" * 900}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "x" * 500,
    }
    record = {
        "metrics": {"image_auroc": 0.9, "pixel_auroc": None},
        "thresholds": {"image": {"value": 1.5}, "pixel": {"value": float("nan")}},
    }
    assert final_values(record) == {"test/image_auroc": 0.9, "threshold/image": 1.5}


@pytest.mark.slow
def test_tensorboard_and_mlflow_hold_the_curves_metrics_thresholds_and_config(data_cache, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stad.run import run

    record = run(_tiny(data_cache, tmp_path, "[csv,tensorboard,mlflow]"), tmp_path / "r")
    logs = tmp_path / "r" / "logs"
    assert (logs / "distill" / "metrics.csv").read_text().count("\n") > 1  # csv still there

    def scalars(version: str) -> dict[str, list[float]]:
        events = EventAccumulator(str(logs / "tensorboard" / version))
        events.Reload()
        return {t: [e.value for e in events.Scalars(t)] for t in events.Tags()["scalars"]}

    assert any("loss" in tag for tag in scalars("distill"))  # the stage's training curve
    final = scalars("record")
    assert final["test/image_auroc"] == [pytest.approx(record["metrics"]["image_auroc"])]
    assert final["threshold/image"] == [pytest.approx(record["thresholds"]["image"]["value"])]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    (line,) = (logs / RUN_ID_FILE).read_text().splitlines()
    mlflow_run = client.get_run(line.split("=", 1)[1])  # one MLflow run for the stad run
    metrics = mlflow_run.data.metrics
    assert any(k.startswith("distill-") and "loss" in k for k in metrics)
    assert metrics["record-test/pixel_auroc"] == pytest.approx(record["metrics"]["pixel_auroc"])
    assert metrics["record-threshold/pixel"] == pytest.approx(
        record["thresholds"]["pixel"]["value"]
    )
    params = mlflow_run.data.params
    assert params["method.name"] == "stfpm" and params["seed"] == "0"
    assert json.loads((tmp_path / "r" / "record.json").read_text())["method"] == "stfpm"


@pytest.mark.slow
def test_wandb_writes_its_offline_run_where_the_package_is_installed(data_cache, tmp_path):
    pytest.importorskip("wandb")
    from stad.run import run

    run(_tiny(data_cache, tmp_path, "[wandb]"), tmp_path / "r")
    (offline,) = (tmp_path / "r" / "wandb").glob("offline-run-*")
    assert any(offline.glob("*.wandb"))  # the run's data, for `wandb sync`
