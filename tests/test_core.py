"""The generic stage runner: frozen modules, per-stage parameters, selection, NaN guard."""

from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from stad.core import (
    Calibration,
    CalibrationModule,
    Method,
    Scorer,
    Stage,
    StageModule,
    Student,
    Teacher,
    stage_parameters,
    update_metric,
)
from stad.errors import StadError, TrainingError


class _Images(Dataset):
    def __init__(self, n: int = 8, size: int = 16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, size, size, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {
            "image": self.x[i],
            "mask": torch.zeros(1, *self.x.shape[-2:]),
            "label": torch.tensor(0),
            "path": f"{i}.png",
        }


class _ConvTeacher(Teacher):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, batch):
        return [self.net(batch["image"])]


class _ConvStudent(Student):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, batch, targets):
        return [self.net(batch["image"])]


class _L2Scorer(Scorer):
    def forward(self, targets, preds, batch):
        maps = (targets[0] - preds[0]).pow(2).sum(1, keepdim=True)
        return maps, maps.flatten(1).amax(1)


def _loss(method, batch, scale=1.0):
    t = method.teacher(batch)
    s = method.student(batch, t)
    return {"loss": scale * (t[0].detach() - s[0]).pow(2).mean()}


def _method(**stage_kwargs) -> Method:
    stage = Stage(
        name="distill",
        epochs=2,
        trainable=["student"],
        loss=stage_kwargs.pop("loss", _loss),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        **stage_kwargs,
    )
    return Method(_ConvTeacher(), _ConvStudent(), _L2Scorer(), [stage])


def _trainer(**kw):
    defaults = dict(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kw})


@pytest.mark.slow
def test_only_the_stage_modules_train_and_frozen_batchnorm_keeps_its_statistics():
    method = _method()
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in method.student.state_dict().items()}
    module = StageModule(method, method.stages[0])
    module.train()
    assert not method.teacher.training and method.student.training
    assert {id(p) for p in stage_parameters(method, method.stages[0])} == {
        id(p) for p in method.student.parameters()
    }
    _trainer(limit_val_batches=0).fit(module, DataLoader(_Images(), batch_size=4))
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"frozen teacher changed: {k}"
    assert any(
        not torch.equal(v, student_before[k]) for k, v in method.student.state_dict().items()
    )


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error():
    method = _method(loss=partial(_loss, scale=float("nan")))
    module = StageModule(method, method.stages[0])
    with pytest.raises(TrainingError, match=r"diverged.*lr"):
        _trainer(limit_val_batches=0).fit(module, DataLoader(_Images(), batch_size=4))


@pytest.mark.slow
def test_min_val_loss_selection_restores_the_best_epoch():
    method = _method(selection="min_val_loss")
    module = StageModule(method, method.stages[0])
    seen = []

    class Spy(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            val = float(trainer.callback_metrics["val/loss"])
            state = {k: v.clone() for k, v in method.student.state_dict().items()}
            seen.append((val, state))

    data = DataLoader(_Images(), batch_size=4)
    _trainer(max_epochs=4, callbacks=[Spy()]).fit(module, data, data)
    module.restore_selected()
    best_val, best_state = min(seen, key=lambda s: s[0])
    assert module.best_val_loss == pytest.approx(best_val)
    for k, v in method.student.state_dict().items():
        assert torch.equal(v, best_state[k])


def test_unknown_selection_rule_is_rejected():
    with pytest.raises(StadError, match="selection"):
        _method(selection="best_test_auroc")


def test_scorer_must_return_maps_at_input_resolution():
    class Small(_L2Scorer):
        def forward(self, targets, preds, batch):
            maps, scores = super().forward(targets, preds, batch)
            return maps[..., ::2, ::2], scores

    method = Method(_ConvTeacher(), _ConvStudent(), Small(), [])
    module = StageModule(method)
    with pytest.raises(RuntimeError, match="B×1×H×W"):
        module.test_step(next(iter(DataLoader(_Images(), batch_size=2))), 0)


class _MeanCalibration(Calibration):
    """Mean image score of the normal images it saw, in eval mode and without gradients."""

    def reset(self, method):
        self.total, self.count, self.modes = 0.0, 0, set()

    def update(self, method, batch):
        _, scores = method(batch)
        self.modes.add(method.student.training)
        self.grad = torch.is_grad_enabled()
        self.total += float(scores.sum())
        self.count += scores.numel()

    def finish(self, method):
        method.scorer.offset = self.total / self.count


def test_calibration_sees_every_validation_image_once_in_eval_mode_without_gradients():
    method = _method()
    method.calibration = _MeanCalibration()
    images = _Images(n=5)
    _trainer().validate(CalibrationModule(method), DataLoader(images, batch_size=2), verbose=False)
    cal = method.calibration
    assert cal.count == 5 and cal.modes == {False} and cal.grad is False
    method.eval()
    with torch.no_grad():
        _, expected = method(next(iter(DataLoader(images, batch_size=5))))
    assert method.scorer.offset == pytest.approx(float(expected.mean()), rel=1e-5)


def test_metrics_receive_scores_masks_or_the_whole_batch_by_their_kind():
    class Recorder:
        def __init__(self, takes_batch=False):
            self.takes_batch = takes_batch
            self.args = None

        def update(self, *args):
            self.args = args

    maps, scores = torch.rand(2, 1, 4, 4), torch.rand(2)
    batch = {"label": torch.tensor([0, 1]), "mask": torch.zeros(2, 1, 4, 4), "path": ["a", "b"]}
    image, pixel, whole = Recorder(), Recorder(), Recorder(takes_batch=True)
    update_metric("image_auroc", image, maps, scores, batch)
    update_metric("pro", pixel, maps, scores, batch)
    update_metric("spro", whole, maps, scores, batch)
    assert image.args[0] is scores and image.args[1] is batch["label"]
    assert pixel.args[0] is maps and pixel.args[1] is batch["mask"]
    assert whole.args == (maps, scores, batch)
