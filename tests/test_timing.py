"""stad.timing: batch filling, modes restored, numbers consistent with the calls made."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from stad.core import Method, Scorer, Stage, Student, Teacher
from stad.timing import measure_inference, repeat_batch


class _SleepTeacher(Teacher):
    """Takes a fixed time per call plus per image, so the expected figures are known."""

    def __init__(self, per_call_s: float, per_image_s: float) -> None:
        super().__init__()
        self.per_call_s = per_call_s
        self.per_image_s = per_image_s
        self.sizes: list[int] = []
        self.grad_enabled: list[bool] = []
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, batch):
        n = batch["image"].shape[0]
        self.sizes.append(n)
        self.grad_enabled.append(torch.is_grad_enabled())
        time.sleep(self.per_call_s + self.per_image_s * n)
        return [self.conv(batch["image"])]


class _Identity(Student):
    def forward(self, batch, targets):
        return targets


class _MeanScorer(Scorer):
    def forward(self, targets, preds, batch):
        maps = targets[0].mean(1, keepdim=True)
        return maps, maps.flatten(1).amax(1)


def _method(per_call_s: float = 0.0, per_image_s: float = 0.0) -> Method:
    stage = Stage("s", 1, ["student"], lambda m, b: {}, torch.optim.SGD)
    return Method(_SleepTeacher(per_call_s, per_image_s), _Identity(), _MeanScorer(), [stage])


def test_repeat_batch_cycles_samples() -> None:
    batch = {
        "image": torch.arange(3.0).view(3, 1, 1, 1),
        "path": ["a", "b", "c"],
        "label": torch.tensor([0, 1, 0]),
        "meta": "kept",
    }
    out = repeat_batch(batch, 5)
    assert out["image"].flatten().tolist() == [0, 1, 2, 0, 1]
    assert out["path"] == ["a", "b", "c", "a", "b"]
    assert out["label"].tolist() == [0, 1, 0, 0, 1]
    assert out["meta"] == "kept"
    assert repeat_batch(batch, 1)["image"].shape == (1, 1, 1, 1)


def test_measure_inference_times_what_it_says() -> None:
    method = _method(per_call_s=0.004, per_image_s=0.001)
    method.train()
    batch = {"image": torch.rand(2, 3, 8, 8)}
    speed = measure_inference(method, batch, batch_sizes=(1, 8), warmup=1, repeats=3)
    teacher = method.teacher
    assert teacher.sizes == [1] * 4 + [8] * 4  # 1 warm-up + 3 timed per size
    assert not any(teacher.grad_enabled)
    # Sleeps are lower bounds: 5 ms for one image; 8 images take >= 12 ms (<= 667 img/s).
    assert 5.0 <= speed.ms_per_image_batch1 < 200.0
    assert 8 / 0.2 < speed.images_per_s_batch32 <= 8 / 0.012
    assert speed.batch_size == 8 and speed.device == "cpu" and speed.repeats == (3, 3)
    assert method.training and teacher.training  # modes restored
    assert set(speed.as_dict()) >= {"ms_per_image_batch1", "images_per_s_batch32"}


def test_budget_stops_after_one_call() -> None:
    method = _method(per_call_s=0.05)
    speed = measure_inference(
        method, {"image": torch.rand(1, 3, 4, 4)}, batch_sizes=(1, 2), warmup=0, budget_s=0.0
    )
    assert speed.repeats == (1, 1)
    assert speed.ms_per_image_batch1 == pytest.approx(50.0, rel=2.0)


@pytest.mark.slow
def test_a_run_records_its_inference_speed_and_keeps_nhwc_for_cuda(tiny_config, tmp_path):
    from stad.run import run, use_channels_last

    cfg = tiny_config(
        "trainer.num_threads=1",
        "image_size=64",
        "trainer.inference_timing.enabled=true",
        "trainer.inference_timing.batch_sizes=[1,2]",
        "trainer.inference_timing.repeats=1",
    )
    record = run(cfg, tmp_path)
    speed = record["inference"]
    assert speed["batch_size"] == 2 and speed["device"] == "cpu"
    assert speed["ms_per_image_batch1"] > 0 and speed["images_per_s_batch32"] > 0
    auto = tiny_config("trainer=default", "trainer.accelerator=cpu")
    assert auto.trainer.channels_last == "auto" and use_channels_last(auto) is False
    assert use_channels_last(tiny_config("trainer.channels_last=true")) is True
