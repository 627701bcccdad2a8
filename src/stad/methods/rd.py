"""Reverse Distillation, RD4AD (Deng & Li, CVPR 2022).

Teacher: a frozen ImageNet encoder (Wide-ResNet-50-2 in the paper), levels layer1..layer3.
Student: the one-class bottleneck embedding (OCBE) of the teacher's levels, then a mirrored
decoder (de-WRN50-2) that rebuilds every teacher level from that compact embedding.
Scorer: per level 1 − cos per position, resized to the input, summed, Gaussian σ = 4; image
score = max of the map.
Stage: bottleneck and decoder train together with Adam on the cosine loss; the last weights are
kept (the official code has no early stopping).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from stad.core import Batch, Features, Method, Stage, Student
from stad.errors import StadError
from stad.methods.common import cosine_distance, pretrained_teacher
from stad.methods.decoders import (
    FusionBottleneck,
    MirroredDecoder,
    ResNetLayout,
    SummedLevelScorer,
    resnet_layout,
)

# -- teacher: BackboneTeacher (methods/common.py) ---------------------------------------------


# -- student ----------------------------------------------------------------------------------
class ReverseStudent(Student):
    """OCBE + decoder: sees only the teacher's features, never the image."""

    def __init__(self, bottleneck: FusionBottleneck, decoder: MirroredDecoder) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.decoder = decoder

    def forward(self, batch: Batch, targets: Features) -> Features:
        sizes = [t.shape[-2:] for t in targets]
        return self.decoder(self.bottleneck(targets), sizes)


def reverse_student(
    channels: list[int], strides: list[int], layout: ResNetLayout
) -> ReverseStudent:
    """OCBE and de-ResNet mirroring a teacher (official RD layout).

    The OCBE fuses the levels at the last one's size, then runs the encoder's next stage (the
    teacher's layer4 length, first block stride 2) out to twice the last level's channels
    (WRN50-2: 3072 → 2048 channels at 1/32). The decoder's stages have the encoder's layer1..3
    lengths in decoder order (de-WRN50-2: [3, 4, 6]).
    """
    n = len(channels)
    embed_blocks = layout.stage_blocks[min(n, len(layout.stage_blocks) - 1)]
    bottleneck = FusionBottleneck(
        channels, strides, 2 * channels[-1], layout, blocks=embed_blocks, stride=2
    )
    decoder = MirroredDecoder(
        bottleneck.out_channels,
        bottleneck.out_stride,
        channels,
        strides,
        layout,
        stage_blocks=layout.stage_blocks[:n],
    )
    return ReverseStudent(bottleneck, decoder)


# -- scorer: SummedLevelScorer(cosine_distance) (methods/decoders.py) ------------------------


# -- losses -----------------------------------------------------------------------------------
def flat_cosine_loss(t: Tensor, s: Tensor) -> Tensor:
    """Official code: mean over the batch of 1 − cos of each whole flattened map (C·h·w)."""
    return (1.0 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean()


def position_cosine_loss(t: Tensor, s: Tensor) -> Tensor:
    """Paper text (eq. 2): mean over positions of 1 − cos of the C-dimensional vectors."""
    return cosine_distance(t, s).mean()


LOSSES = {"flat": flat_cosine_loss, "position": position_cosine_loss}


def reverse_distillation_loss(
    method: Method, batch: Batch, variant: str = "flat"
) -> dict[str, Tensor]:
    """Σ_levels of the chosen cosine loss between teacher and decoder maps."""
    level_loss = LOSSES[variant]
    targets = method.teacher(batch)
    preds = method.student(batch, targets)
    levels = [level_loss(t, s) for t, s in zip(targets, preds, strict=True)]
    return {"loss": torch.stack(levels).sum()}


# -- build ------------------------------------------------------------------------------------
def build(cfg: DictConfig, backbone: DictConfig) -> Method:
    """RD from ``conf/method/rd.yaml`` and a backbone config."""
    if cfg.loss not in LOSSES:
        raise StadError(
            f"method.loss={cfg.loss!r} is not an RD loss; use 'flat' (official code) or "
            "'position' (paper text)"
        )
    layers = list(cfg.layers)
    teacher, weights = pretrained_teacher(
        backbone.name, layers, backbone.weights, cache=bool(cfg.get("feature_cache", False))
    )
    layout = resnet_layout(backbone.name)
    extractor = teacher.extractor
    student = reverse_student(extractor.channels, extractor.strides, layout)
    scorer = SummedLevelScorer.from_config(cosine_distance, cfg.scorer)
    stage = Stage.from_config(
        "distill",
        cfg.stages.distill,
        trainable=["student"],
        loss=partial(reverse_distillation_loss, variant=str(cfg.loss)),
    )
    info: dict[str, Any] = {
        "teacher_weights": weights.as_dict(),
        "layers": layers,
        "loss": str(cfg.loss),
        "decoder_block": layout.block,
        "decoder_stage_blocks": list(layout.stage_blocks[: len(layers)]),
        "gaussian_sigma": float(cfg.scorer.sigma),
        "score_reduction": cfg.scorer.reduction,
    }
    return Method(teacher, student, scorer, [stage], info=info)
