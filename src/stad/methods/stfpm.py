"""STFPM: Student-Teacher Feature Pyramid Matching (Wang et al., BMVC 2021).

Teacher: a frozen ImageNet backbone (ResNet-18 in the paper), levels conv2_x..conv4_x.
Student: the same architecture, randomly initialised as torchvision initialises it (the official
student), fed the same image.
Scorer: per level the squared distance of channel-normalised features, resized to a common
size, multiplied over levels, resized to the input; image score = max of the map.
Stage: one distillation stage (SGD), weights chosen by the lowest anomaly score on normal
training images held out from training (the official code's rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, cast

import torch
from omegaconf import DictConfig
from torch import Tensor

from stad.backbones import create_feature_extractor, initialise
from stad.core import Batch, Features, Method, Scorer, Stage
from stad.methods.common import (
    BackboneStudent,
    pretrained_teacher,
    reduce_map,
    resize,
    squared_distance,
)

# -- teacher and student: BackboneTeacher / BackboneStudent (methods/common.py) --------------


# -- scorer -----------------------------------------------------------------------------------
class FeaturePyramidScorer(Scorer):
    """Product over levels of per-position squared distances of normalised features."""

    def __init__(self, level_size: int | None = 64, reduction: str = "max") -> None:
        super().__init__()
        self.level_size = level_size
        self.reduction = reduction

    def anomaly_map(self, targets: Features, preds: Features, size: Sequence[int]) -> Tensor:
        """B×1×H×W map at ``size``; levels meet at ``level_size`` first (official: 64×64)."""
        common = (self.level_size, self.level_size) if self.level_size else tuple(size)
        out: Tensor | None = None
        for t, s in zip(targets, preds, strict=True):
            level = resize(squared_distance(t.float(), s.float()), common)
            out = level if out is None else out * level
        assert out is not None
        return resize(out, size)

    def forward(self, targets: Features, preds: Features, batch: Batch) -> tuple[Tensor, Tensor]:
        maps = self.anomaly_map(targets, preds, batch["image"].shape[-2:])
        return maps, reduce_map(maps, self.reduction)


# -- losses -----------------------------------------------------------------------------------
def pyramid_loss(method: Method, batch: Batch, factor: float = 1.0) -> dict[str, Tensor]:
    """Σ_levels factor · mean over positions of ||t̂ − ŝ||² (paper: factor ½; official code: 1)."""
    targets = method.teacher(batch)
    preds = method.student(batch, targets)
    levels = [factor * squared_distance(t, s).mean() for t, s in zip(targets, preds, strict=True)]
    return {"loss": torch.stack(levels).sum()}


def held_out_score(method: Method, batch: Batch) -> dict[str, Tensor]:
    """Mean anomaly map of held-out normal images: the official code's selection criterion."""
    targets = method.teacher(batch)
    preds = method.student(batch, targets)
    scorer = cast(FeaturePyramidScorer, method.scorer)  # build() gives STFPM this scorer
    maps = scorer.anomaly_map(targets, preds, batch["image"].shape[-2:])
    return {"loss": maps.mean()}


# -- build ------------------------------------------------------------------------------------
def build(cfg: DictConfig, backbone: DictConfig) -> Method:
    """STFPM from ``conf/method/stfpm.yaml`` and a backbone config."""
    layers = list(cfg.layers)
    teacher, weights = pretrained_teacher(
        backbone.name, layers, backbone.weights, cache=bool(cfg.get("feature_cache", False))
    )
    student_net, _ = create_feature_extractor(backbone.name, layers, "random")
    initialise(student_net, str(cfg.get("student_init", "timm")))  # runs saved before: timm
    scorer = FeaturePyramidScorer(cfg.scorer.level_size, cfg.scorer.reduction)
    stage = Stage.from_config(
        "distill",
        cfg.stages.distill,
        trainable=["student"],
        loss=partial(pyramid_loss, factor=float(cfg.loss_factor)),
        val_loss=held_out_score,
    )
    info: dict[str, Any] = {
        "teacher_weights": weights.as_dict(),
        "layers": layers,
        "loss_factor": float(cfg.loss_factor),
        "student_init": str(cfg.get("student_init", "timm")),
        "score_reduction": cfg.scorer.reduction,
    }
    return Method(teacher, BackboneStudent(student_net), scorer, [stage], info=info)
