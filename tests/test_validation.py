"""The synthetic-anomaly validation set: held-out normal images only, exact masks, objective."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from stad.data import build_dataset
from stad.data.datamodule import AnomalyDataModule
from stad.data.validation import SyntheticAnomalySet
from stad.errors import StadError
from stad.sweep import objective_value, run_job

SYNTHESIS = {"texture": {"source": "noise"}, "max_opacity": 0.5}


class _Normals(Dataset):
    def __init__(self, n=4, label=0):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 32, 32, generator=g)
        self.label = label

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {
            "image": self.x[i],
            "mask": torch.zeros(1, 32, 32),
            "label": torch.tensor(self.label),
            "path": f"train/good/{i}.png",
            "defect": "good",
            "depth": torch.full((1, 32, 32), float(i)),
        }


def test_normals_then_their_corrupted_copies_with_exact_masks():
    normals = _Normals()
    data = SyntheticAnomalySet(normals, SYNTHESIS, image_size=32, seed=1)
    assert len(data) == 8
    for i in range(4):
        clean, copy = data[i], data[i + 4]
        assert clean["label"] == 0 and copy["label"] == 1
        assert torch.equal(clean["image"], normals[i]["image"]) and not clean["mask"].any()
        changed = (copy["image"] != clean["image"]).any(0, keepdim=True)
        assert copy["mask"].any(), "every corrupted copy holds a defect"
        assert not (changed & (copy["mask"] == 0)).any(), "pixels outside the mask unchanged"
        assert torch.equal(copy["depth"], clean["depth"])
        assert copy["path"] == f"train/good/{i}.png#synthetic"
    again = SyntheticAnomalySet(normals, SYNTHESIS, image_size=32, seed=1)
    assert torch.equal(again.images, data.images)


def test_refuses_anomalous_or_missing_validation_images():
    with pytest.raises(StadError, match="must be normal"):
        SyntheticAnomalySet(_Normals(label=1), SYNTHESIS, image_size=32)
    with pytest.raises(StadError, match="val_fraction"):
        SyntheticAnomalySet(_Normals(n=0), SYNTHESIS, image_size=32)


def test_the_validation_set_comes_from_training_images_never_the_test_set(tiny_config):
    cfg = tiny_config()
    splits = build_dataset(cfg.dataset, 64)
    module = AnomalyDataModule(splits, batch_size=4, val_fraction=0.25, seed=0)
    data = SyntheticAnomalySet(module.val_dataset, SYNTHESIS, image_size=64)
    test_paths = {str(s.image_path) for s in splits.test.samples}
    train_paths = {str(s.image_path) for s in splits.train.samples}
    originals = {p.removesuffix("#synthetic") for p in data.paths}
    assert originals <= train_paths and not originals & test_paths
    assert len(originals) == len(module.val_dataset) == 8


@pytest.mark.slow
def test_a_run_with_an_objective_returns_its_validation_metric(tiny_config, tmp_path):
    cfg = tiny_config("trainer.num_threads=1", "objective=pixel_auroc", "image_size=64")
    value = run_job(cfg, tmp_path / "run", multirun=False)
    from stad.results import read_record

    record = read_record(tmp_path / "run" / "record.json")
    assert value == record["validation"]["pixel_auroc"]
    assert record["validation"]["n_images"] == 2 * record["data"]["n_val"]
    with pytest.raises(StadError, match="not a validation metric"):
        objective_value(record, "test_auroc")


@pytest.mark.slow
def test_optuna_sweeper_searches_on_the_validation_objective(tmp_path, data_cache):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stad",
            "-m",
            "hydra/sweeper=optuna",
            "+experiment=tune_stfpm",
            "hydra.sweeper.n_trials=2",
            "trainer=smoke",
            "trainer.num_threads=1",
            "image_size=64",
            "examples=0",
            "dataset.generator.image_size=64",
            "dataset.generator.n_train=10",
            "dataset.generator.n_test_good=3",
            "dataset.generator.n_test_per_defect=1",
            f"dataset.root={tmp_path}/data",
            f"output_root={tmp_path}/out",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (results,) = Path(tmp_path, "out", "multirun").glob("*/optimization_results.yaml")
    text = results.read_text()
    assert "best_params" in text and "method.stages.distill.optimizer.lr" in text
