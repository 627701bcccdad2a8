"""RD++, "Revisiting Reverse Distillation for Anomaly Detection" (Tien et al., CVPR 2023).

Teacher: RD4AD's frozen ImageNet encoder (Wide-ResNet-50-2), levels layer1..layer3.
Student: a trainable multi-scale projection of the teacher's levels (per level four 3×3
convolutions c → c/2 → c/4 → c/2 → c, each followed by instance norm and LeakyReLU), then RD's
OCBE and mirrored decoder, which rebuild the teacher's levels from the projected ones.
Training (official ``main.py``): the image and a noisy copy (a rectangle of fractal simplex noise,
the stage's derived stream) go through the teacher; L = L_distill + 0.2 · L_proj, where
L_distill is RD's flat cosine loss between the teacher's clean levels and the decoder's, and
L_proj = (L_ssot + 0.01 · L_rec + 0.1 · L_con) / 1.11: a Sinkhorn distance (geomloss) between the
softmaxed projections of normal images and of a shuffled order of them, 1 − cos between the
projections of the noisy and the clean images, and a cosine-embedding loss (margin 0.5) pushing
the teacher's noisy features away from the clean projections. Projection and decoder train with
one Adam each (here one Adam, two parameter groups), gradients accumulated over 2 batches.
Scorer: RD's per-level 1 − cos of teacher vs decoder on the clean image, resized, summed,
Gaussian σ = 4; image score = max.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from stad.core import Batch, Features, Method, Stage, Stream, Student
from stad.errors import StadError
from stad.methods.common import cosine_distance, pretrained_teacher
from stad.methods.decoders import SummedLevelScorer, resnet_layout
from stad.methods.rd import ReverseStudent, flat_cosine_loss, reverse_student

NOISE = "noisy"  # the stage's derived stream: the batch with simplex noise

# -- teacher: BackboneTeacher (methods/common.py) ---------------------------------------------


# -- student ----------------------------------------------------------------------------------
def projection_layer(channels: int) -> nn.Sequential:
    """One level's projection (official ``ProjLayer``): c → c/2 → c/4 → c/2 → c, 3×3 convs, each
    followed by InstanceNorm2d (no affine) and LeakyReLU (slope 0.01)."""
    widths = [channels, channels // 2, channels // 4, channels // 2, channels]
    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(widths):
        layers += [
            nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1),
            nn.InstanceNorm2d(c_out),
            nn.LeakyReLU(),
        ]
    return nn.Sequential(*layers)


class ProjectedReverseStudent(Student):
    """The multi-scale projection, then RD's OCBE + decoder (``decoder(bn(proj(features)))``)."""

    def __init__(self, projection: nn.ModuleList, reverse: ReverseStudent) -> None:
        super().__init__()
        self.projection = projection
        self.reverse = reverse

    def project(self, features: Features) -> Features:
        """The projected levels (official ``MultiProjectionLayer``)."""
        return [p(f) for p, f in zip(self.projection, features, strict=True)]

    def forward(self, batch: Batch, targets: Features) -> Features:
        return self.reverse(batch, self.project(targets))


# -- scorer: SummedLevelScorer(cosine_distance) (methods/decoders.py) ------------------------


# -- losses -----------------------------------------------------------------------------------
def sinkhorn_loss(settings: dict[str, Any]) -> Any:
    """geomloss's Sinkhorn divergence with the official settings (``Revisit_RDLoss``).

    Raises:
        StadError: geomloss is not installed.
    """
    try:
        import geomloss
    except ImportError:
        raise StadError(
            "RD++'s compactness loss needs geomloss (the official code's Sinkhorn); install it "
            "with pip install 'stad[rdpp]'"
        ) from None
    return geomloss.SamplesLoss(loss="sinkhorn", reach=None, backend="auto", **settings)


class ProjectionLoss:
    """L_proj = (L_ssot + w_rec · L_rec + w_con · L_con) / normaliser (``Revisit_RDLoss``)."""

    def __init__(
        self,
        sinkhorn: Any,
        reconstruct: float = 0.01,
        contrast: float = 0.1,
        normaliser: float = 1.11,
        margin: float = 0.5,
    ) -> None:
        self.sinkhorn = sinkhorn
        self.reconstruct, self.contrast = reconstruct, contrast
        self.normaliser, self.margin = normaliser, margin

    def terms(
        self, noisy: Features, projected_noisy: Features, projected: Features
    ) -> dict[str, Tensor]:
        """The three terms summed over levels, and their combination under ``"loss"``."""
        b = projected[0].shape[0]
        # One shuffled order of the batch for every level (pairs of normal images).
        order = torch.randperm(b)
        ssot = sum(
            self.sinkhorn(
                torch.softmax(p.reshape(b, -1), -1), torch.softmax(p[order].reshape(b, -1), -1)
            )
            for p in projected
        )
        rec = sum(
            (1 - F.cosine_similarity(pn, p, dim=1)).mean()
            for pn, p in zip(projected_noisy, projected, strict=True)
        )
        # CosineEmbeddingLoss with target −1: mean over the batch of max(0, cos − margin).
        con = sum(
            F.relu(
                F.cosine_similarity(n.reshape(b, -1), p.reshape(b, -1), dim=1) - self.margin
            ).mean()
            for n, p in zip(noisy, projected, strict=True)
        )
        ssot, rec, con = torch.as_tensor(ssot), torch.as_tensor(rec), torch.as_tensor(con)
        total = (ssot + self.reconstruct * rec + self.contrast * con) / self.normaliser
        return {"loss": total, "ssot": ssot, "reconstruct": rec, "contrast": con}


def rdpp_loss(
    method: Method, batch: Batch, projection_loss: ProjectionLoss, weight_proj: float = 0.2
) -> dict[str, Tensor]:
    """L_distill + weight_proj · L_proj on the batch and its noisy copy (``main.py``)."""
    student = method.student
    assert isinstance(student, ProjectedReverseStudent)
    inputs = method.teacher(batch)
    inputs_noise = method.teacher({**batch, "image": batch["streams"][NOISE]["image"]})
    projected_noise, projected = student.project(inputs_noise), student.project(inputs)
    proj = projection_loss.terms(inputs_noise, projected_noise, projected)
    outputs = student.reverse(batch, projected)
    distill = torch.stack(
        [flat_cosine_loss(t, s) for t, s in zip(inputs, outputs, strict=True)]
    ).sum()
    return {
        "loss": distill + weight_proj * proj["loss"],
        "distill": distill.detach(),
        "proj": proj["loss"].detach(),
        **{k: v.detach() for k, v in proj.items() if k != "loss"},
    }


# -- build ------------------------------------------------------------------------------------
def noise_source(cfg: DictConfig) -> dict[str, Any]:
    """The stage's simplex-noise stream (``stad.synthesis.SimplexNoise`` settings)."""
    noise = OmegaConf.to_container(cfg.noise, resolve=True)
    assert isinstance(noise, dict)
    return {"kind": "simplex_noise", **noise}


def build(cfg: DictConfig, backbone: DictConfig) -> Method:
    """RD++ from ``conf/method/rdpp.yaml`` and a backbone config."""
    layers = list(cfg.layers)
    teacher, weights = pretrained_teacher(backbone.name, layers, backbone.weights, cache=False)
    layout = resnet_layout(backbone.name)
    extractor = teacher.extractor
    projection = nn.ModuleList(projection_layer(c) for c in extractor.channels)
    reverse = reverse_student(extractor.channels, extractor.strides, layout)
    student = ProjectedReverseStudent(projection, reverse)
    scorer = SummedLevelScorer.from_config(cosine_distance, cfg.scorer)
    settings = OmegaConf.to_container(cfg.loss.sinkhorn, resolve=True)
    assert isinstance(settings, dict)
    projection_loss = ProjectionLoss(
        sinkhorn_loss({str(k): v for k, v in settings.items()}),
        reconstruct=float(cfg.loss.reconstruct),
        contrast=float(cfg.loss.contrast),
        normaliser=float(cfg.loss.normaliser),
        margin=float(cfg.loss.margin),
    )
    stage = Stage.from_config(
        "distill",
        cfg.stages.distill,
        trainable=["student.projection", "student.reverse"],
        loss=partial(
            rdpp_loss, projection_loss=projection_loss, weight_proj=float(cfg.loss.weight_proj)
        ),
        streams={NOISE: Stream(noise_source(cfg))},
    )
    info: dict[str, Any] = {
        "teacher_weights": weights.as_dict(),
        "layers": layers,
        "projection_channels": list(extractor.channels),
        "decoder_block": layout.block,
        "decoder_stage_blocks": list(layout.stage_blocks[: len(layers)]),
        "gaussian_sigma": float(cfg.scorer.sigma),
        "score_reduction": cfg.scorer.reduction,
    }
    return Method(teacher, student, scorer, [stage], info=info)
