"""The generic stage runner: frozen modules, per-stage parameters, selection, NaN guard."""

from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from stad.core import Method, Scorer, Stage, StageModule, Student, Teacher, stage_parameters
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


def test_nan_loss_stops_with_a_clear_error():
    method = _method(loss=partial(_loss, scale=float("nan")))
    module = StageModule(method, method.stages[0])
    with pytest.raises(TrainingError, match=r"diverged.*lr"):
        _trainer(limit_val_batches=0).fit(module, DataLoader(_Images(), batch_size=4))


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
