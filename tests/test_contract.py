"""Contract v2 through the real runner: a throw-away method registered in one line, trained by
steps with a per-step scheduler, with an auxiliary image stream, a statistics pass before its
stage, and the trainer group passed to Lightning."""

from __future__ import annotations

import subprocess
import sys
import types
from functools import partial

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from stad import methods
from stad.core import Calibration, Method, Scorer, Stage, StageModule, Stream, Student, Teacher
from stad.errors import StadError
from stad.run import lightning_options, run


class _Teacher(Teacher):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, batch):
        return [self.net(batch["image"]) - self.mean.view(1, -1, 1, 1)]


class _Student(Student):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, batch, targets):
        return [self.net(batch["image"])]


class _Scorer(Scorer):
    def forward(self, targets, preds, batch):
        maps = (targets[0] - preds[0]).pow(2).sum(1, keepdim=True)
        return maps, maps.flatten(1).amax(1)


class _MeanFeatures(Calibration):
    """The teacher's mean feature over the training images, before the stage trains."""

    name, data, fits = "feature_mean", "train", ("teacher",)

    def __init__(self, seen: list) -> None:
        self.seen = seen

    def reset(self, method):
        self.total, self.count = torch.zeros(4), 0

    @torch.no_grad()
    def update(self, method, batch):
        self.seen.extend(batch["path"])
        f = method.teacher.net(batch["image"])
        self.total += f.sum(dim=(0, 2, 3))
        self.count += f.shape[0] * f.shape[2] * f.shape[3]

    def finish(self, method):
        method.teacher.mean.copy_(self.total / self.count)


def _loss(method, batch, log):
    log.append(
        {
            "lr": float(method._optimizer.param_groups[0]["lr"]) if method._optimizer else None,
            "stream": list(batch["streams"]["extra"]["path"]),
            "stream_shape": tuple(batch["streams"]["extra"]["image"].shape),
            "mean": method.teacher.mean.clone(),
        }
    )
    t = method.teacher(batch)
    s = method.student(batch, t)
    return {"loss": (t[0].detach() - s[0]).pow(2).mean()}


def _toy_module(log: list, seen: list, folder) -> types.ModuleType:
    """A method module as a contributor writes one: build() declares the parts."""

    def build(cfg, backbone):
        stage = Stage(
            "distill",
            epochs=None,
            steps=int(cfg.toy_steps),
            trainable=["student"],
            loss=partial(_loss, log=log),
            optimizer=partial(torch.optim.SGD, lr=1.0),
            scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
            scheduler_interval="step",
            streams={"extra": Stream({"kind": "folder", "root": str(folder)}, batch_size=2)},
        )
        method = Method(_Teacher(), _Student(), _Scorer(), [_MeanFeatures(seen), stage])
        method._optimizer = None
        return method

    return types.SimpleNamespace(build=build)


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """The throw-away method registered with one line, and what its loss and statistics saw."""
    folder = tmp_path / "extra"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    log, seen = [], []
    monkeypatch.setitem(methods.METHODS, "toy", _toy_module(log, seen, folder))
    # The optimizer, so the loss can read the learning rate each step saw.
    configure = StageModule.configure_optimizers

    def spy(self):
        out = configure(self)
        self.method._optimizer = out["optimizer"] if isinstance(out, dict) else out
        return out

    monkeypatch.setattr(StageModule, "configure_optimizers", spy)
    return types.SimpleNamespace(log=log, seen=seen, folder=folder)


def _toy_config(tiny_config, *overrides):
    cfg = tiny_config(
        "image_size=32",
        "trainer.max_steps=-1",
        "trainer.max_epochs=null",
        "trainer.limit_train_batches=null",
        "trainer.batch_size=8",
        "threshold.val_fraction=0",
        *overrides,
    )
    OmegaConf.set_struct(cfg, False)
    cfg.method.name = "toy"
    cfg.method.toy_steps = 7
    return cfg


@pytest.mark.slow
def test_a_stage_measured_in_steps_steps_its_scheduler_per_step(tiny_config, toy, tmp_path):
    record = run(_toy_config(tiny_config), tmp_path / "run")
    stage = record["stages"][1]
    # 32 training images in batches of 8: 4 steps per epoch, so 7 steps need a second epoch.
    assert stage["name"] == "distill" and stage["steps"] == 7 and stage["epochs"] == 2
    assert [round(e["lr"], 6) for e in toy.log] == [0.5**k for k in range(7)]


@pytest.mark.slow
def test_the_auxiliary_stream_gives_each_step_a_batch_seeded_per_epoch(tiny_config, toy, tmp_path):
    run(_toy_config(tiny_config), tmp_path / "a")
    first = [e["stream"] for e in toy.log]
    assert all(e["stream_shape"] == (2, 3, 32, 32) for e in toy.log)  # resized to image_size
    names = {p.rsplit("/", 1)[-1] for step in first for p in step}
    assert names == {"0.png", "1.png", "2.png"}
    # 3 images in full batches of 2: a pass is one batch of two different images.
    assert all(len(set(step)) == 2 for step in first)
    toy.log.clear()
    run(_toy_config(tiny_config), tmp_path / "b")
    assert [e["stream"] for e in toy.log] == first  # from (seed, stream, epoch) alone
    toy.log.clear()
    run(_toy_config(tiny_config, "seed=1"), tmp_path / "c")
    assert [e["stream"] for e in toy.log] != first


@pytest.mark.slow
def test_a_calibration_before_a_stage_sees_the_training_images_once(tiny_config, toy, tmp_path):
    record = run(_toy_config(tiny_config), tmp_path / "run")
    assert record["stages"][0] == {
        **record["stages"][0],
        "name": "feature_mean",
        "kind": "calibration",
        "steps": 0,
    }
    assert len(toy.seen) == len(set(toy.seen)) == record["data"]["n_fit"]
    assert all("/train/" in p for p in toy.seen)
    # Fitted before the first training step, and never changed by training.
    assert bool(toy.log[0]["mean"].abs().sum() > 0)
    assert all(torch.equal(e["mean"], toy.log[0]["mean"]) for e in toy.log)


def test_a_stage_needs_exactly_one_of_epochs_and_steps():
    kwargs = dict(trainable=["student"], loss=None, optimizer=None)
    with pytest.raises(StadError, match="exactly one"):
        Stage("s", epochs=None, **kwargs)
    with pytest.raises(StadError, match="exactly one"):
        Stage("s", epochs=2, steps=5, **kwargs)
    with pytest.raises(StadError, match="train at least 1"):
        Stage("s", epochs=None, steps=0, **kwargs)
    with pytest.raises(StadError, match="scheduler_interval"):
        Stage("s", epochs=1, scheduler_interval="batch", **kwargs)
    assert Stage("s", epochs=None, steps=70000, **kwargs).length == "70000 steps"


def test_stage_from_config_reads_steps_and_the_scheduler_interval():
    cfg = OmegaConf.create(
        {
            "steps": 70000,
            "scheduler_interval": "step",
            "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4},
            "scheduler": {
                "_target_": "torch.optim.lr_scheduler.StepLR",
                "_partial_": True,
                "step_size": 66500,
                "gamma": 0.1,
            },
        }
    )
    stage = Stage.from_config("train", cfg, ["student"], loss=None)
    assert (stage.epochs, stage.steps, stage.scheduler_interval) == (None, 70000, "step")
    module = StageModule(
        Method(_Teacher(), _Student(), _Scorer(), [stage]), stage, channels_last=False
    )
    assert module.configure_optimizers()["lr_scheduler"]["interval"] == "step"


def test_an_unknown_stream_kind_or_an_empty_folder_is_one_clear_error(tmp_path):
    from stad.data.streams import build_stream

    with pytest.raises(StadError, match="unknown auxiliary data stream kind 'imagenet'"):
        build_stream({"kind": "imagenet"}, 32, [])
    with pytest.raises(StadError, match="holds no images"):
        build_stream({"kind": "folder", "root": str(tmp_path)}, 32, [])


def test_the_trainer_group_passes_lightning_options_through(tiny_config):
    cfg = tiny_config("+trainer.gradient_clip_val=0.5", "+trainer.accumulate_grad_batches=2")
    options = lightning_options(cfg.trainer)
    assert options["gradient_clip_val"] == 0.5 and options["accumulate_grad_batches"] == 2
    assert options["precision"] == "32-true" and options["accelerator"] == "cpu"
    # stad's own keys stay with stad.
    assert not {"batch_size", "channels_last", "max_epochs", "inference_timing"} & set(options)
    with pytest.raises(StadError, match=r"trainer\.logger is set by stad's runner"):
        lightning_options(tiny_config("+trainer.logger=false").trainer)


@pytest.mark.slow
def test_the_pretrain_command_serves_every_method():
    done = subprocess.run(
        [sys.executable, "-m", "stad.pretrain", "method=stfpm"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "stfpm: no pretraining step; nothing to do" in done.stdout
    assert methods.has_pretraining("us") and not methods.has_pretraining("rd")
