"""DSKD: dual-student knowledge distillation (Yao et al.).

Teacher T: a frozen ImageNet ResNet-18, levels conv2_x..conv4_x.
Students: an encoder student S_e (T's architecture, random init, sees the image) and a decoder
student S_d (S_e reversed) that rebuilds T's levels from the deep feature embedding (DFE) of
S_e's features, each normalised as Eq. 3 normalises (x / ‖x‖² per position). The paper trains
the two distillations separately: S_d's loss stops at the DFE's input (``detach_encoder``).
Scorer: T vs S_d only; per level M = λ·½‖t̂ − ŝ‖² + (1 − cos), resized to the input, summed,
Gaussian σ = 4; image score = max.
No public code exists: each unstated choice is a config value (conf/method/dskd.yaml) and is
documented in docs/methods.md.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import torch
from omegaconf import DictConfig
from torch import Tensor

from stad.backbones import FeatureExtractor, create_feature_extractor
from stad.core import Batch, Features, Method, Stage, Student
from stad.methods.common import cosine_distance, pretrained_teacher
from stad.methods.decoders import (
    FusionBottleneck,
    MirroredDecoder,
    SummedLevelScorer,
    resnet_layout,
)

# -- teacher: BackboneTeacher (methods/common.py) ---------------------------------------------


# -- students ---------------------------------------------------------------------------------
class DualStudent(Student):
    """S_e (image → levels), DFE (S_e's normalised levels → embedding), S_d (→ levels)."""

    def __init__(
        self,
        encoder: FeatureExtractor,
        dfe: FusionBottleneck,
        decoder: MirroredDecoder,
        detach_encoder: bool = True,
        input_norm_power: float = 2.0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.dfe = dfe
        self.decoder = decoder
        # True (paper): the two distillations are trained "separately and independently";
        # False: S_d's loss also trains S_e through the DFE (one joint objective).
        self.detach_encoder = detach_encoder
        self.input_norm_power = input_norm_power

    def both(self, batch: Batch, targets: Features) -> tuple[Features, Features]:
        """The levels of S_e and of S_d, shallow first, at the sizes of ``targets``."""
        encoded = self.encoder(batch["image"])
        inputs = [normalise(f, self.input_norm_power) for f in encoded]
        if self.detach_encoder:
            inputs = [f.detach() for f in inputs]
        decoded = self.decoder(self.dfe(inputs), [t.shape[-2:] for t in targets])
        return encoded, decoded

    def forward(self, batch: Batch, targets: Features) -> Features:
        """S_d's levels: the only predictions the scorer compares with the teacher."""
        return self.both(batch, targets)[1]


# -- scorer: SummedLevelScorer(dskd_distance) (methods/decoders.py) ---------------------------
def normalise(x: Tensor, power: float, eps: float = 1e-6) -> Tensor:
    """x / ‖x‖^power per position (paper text: power 2; power 1 gives unit vectors)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps).pow(power)


def dskd_distance(t: Tensor, s: Tensor, lam: float = 0.1, power: float = 2.0) -> Tensor:
    """Per-position M = λ·½‖t̂ − ŝ‖² + (1 − cos(t, s)): B×C×h×w → B×1×h×w."""
    l2 = 0.5 * (normalise(t, power) - normalise(s, power)).pow(2).sum(dim=1, keepdim=True)
    return lam * l2 + cosine_distance(t, s)


# -- losses -----------------------------------------------------------------------------------
def dual_student_loss(method: Method, batch: Batch, lam: float, power: float) -> dict[str, Tensor]:
    """L_e + L_d, each the mean over levels of the spatial mean of M^k."""
    targets = method.teacher(batch)
    encoded, decoded = cast(DualStudent, method.student).both(batch, targets)

    def student_loss(preds: Features) -> Tensor:
        levels = [
            dskd_distance(t, s, lam, power).mean() for t, s in zip(targets, preds, strict=True)
        ]
        return torch.stack(levels).mean()

    loss_e, loss_d = student_loss(encoded), student_loss(decoded)
    return {
        "loss": loss_e + loss_d,
        "loss_encoder": loss_e.detach(),
        "loss_decoder": loss_d.detach(),
    }


# -- build ------------------------------------------------------------------------------------
def build(cfg: DictConfig, backbone: DictConfig) -> Method:
    """DSKD from ``conf/method/dskd.yaml`` and a backbone config."""
    layers = list(cfg.layers)
    teacher, weights = pretrained_teacher(
        backbone.name, layers, backbone.weights, cache=bool(cfg.get("feature_cache", False))
    )
    channels, strides = teacher.extractor.channels, teacher.extractor.strides
    layout = resnet_layout(backbone.name)
    encoder, _ = create_feature_extractor(backbone.name, layers, "random")
    dfe_channels = int(cfg.dfe.width_factor * channels[-1])
    dfe = FusionBottleneck(
        channels, strides, dfe_channels, layout, blocks=int(cfg.dfe.blocks), stride=1
    )
    # S_e reversed: the encoder's stage lengths, deepest level first (ResNet-18: [2, 2, 2]).
    stage_blocks = list(reversed(layout.stage_blocks[: len(layers)]))
    decoder = MirroredDecoder(dfe_channels, dfe.out_stride, channels, strides, layout, stage_blocks)
    input_power = float(cfg.dfe.get("input_norm_power", 1.0))  # runs saved before: unit vectors
    student = DualStudent(encoder, dfe, decoder, bool(cfg.detach_encoder), input_power)
    lam, power = float(cfg.lam), float(cfg.norm_power)
    distance = partial(dskd_distance, lam=lam, power=power)
    scorer = SummedLevelScorer.from_config(distance, cfg.scorer)
    stage = Stage.from_config(
        "distill",
        cfg.stages.distill,
        trainable=["student"],
        loss=partial(dual_student_loss, lam=lam, power=power),
    )
    info: dict[str, Any] = {
        "teacher_weights": weights.as_dict(),
        "layers": layers,
        "lambda": lam,
        "norm_power": power,
        "detach_encoder": bool(cfg.detach_encoder),
        "dfe_input_norm_power": input_power,
        "dfe_channels": dfe_channels,
        "decoder_block": layout.block,
        "decoder_stage_blocks": stage_blocks,
        "gaussian_sigma": float(cfg.scorer.sigma),
        "score_reduction": cfg.scorer.reduction,
    }
    return Method(teacher, student, scorer, [stage], info=info)
