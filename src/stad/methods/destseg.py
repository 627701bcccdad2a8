"""DeSTSeg: segmentation-guided denoising student-teacher (Zhang et al., CVPR 2023).

Teacher: a frozen ImageNet ResNet-18, levels layer1..layer3; every feature is L2-normalised over
its channels (x / (‖x‖ + 1e-12), the official ``l2_normalize``) before it is compared.
Student: a randomly initialised copy of the teacher's encoder one level deeper (layer1..layer4)
and a decoder of residual blocks that rebuilds the teacher's levels from the deepest one
(bilinear upsampling to each level's size, then two BasicBlocks per level).
Scorer: a segmentation network (two residual blocks, an ASPP head, sigmoid) on the channel-wise
products −T̂ ⊙ Ŝ of the normalised teacher and student levels, each resized to level 1 and
concatenated; its output, resized to the input, is the anomaly map; the image score is the mean
of its 100 largest pixels.
Stages (official ``train.py``, one loop of 5000 steps): (1) ``denoise``, 1000 steps: the student
sees the image with a synthetic anomaly and regresses the teacher's features of the clean image
(Σ_levels Σ_batch mean over positions of 1 − cos); (2) ``segment``, 4000 steps: student and
teacher frozen, the segmentation network learns the synthetic masks with focal (γ = 4) + L1
loss. Both stages take the DRAEM-style anomalies as the derived stream ``anomalies``.
Ablations (official constructor ``DeSTSeg(dest, ed)`` and ``eval.py``): ``denoising=false``
(the student sees the clean image), ``student.decoder=false`` (encoder-only student),
``score=denoising`` (the product of the per-level 1 − cos maps, no segmentation stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from stad.backbones import FeatureExtractor, create_feature_extractor
from stad.core import Batch, Features, Method, Scorer, Stage, Stream, Student
from stad.errors import StadError
from stad.methods.common import pretrained_teacher, reduce_map, resize
from stad.methods.decoders import GENERIC_LAYOUT, init_like_torchvision, residual_stage

ANOMALIES = "anomalies"  # both stages' derived stream: the batch with synthetic anomalies


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """x / (‖x‖₂ over channels + eps) (official ``l2_normalize``; ``F.normalize`` clamps the
    norm instead of adding eps). B×C×h×w → B×C×h×w."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def level_distance(t: Tensor, s: Tensor) -> Tensor:
    """1 − ⟨T̂, Ŝ⟩ per position (official ``a_map``): B×C×h×w → B×1×h×w."""
    return 1 - (l2_normalize(t) * l2_normalize(s)).sum(dim=1, keepdim=True)


# -- teacher: BackboneTeacher (methods/common.py), without the feature cache ------------------
# (the segmentation stage feeds it corrupted images, which a per-path cache would mistake for
# the clean ones)


# -- student ----------------------------------------------------------------------------------
class FeatureDecoder(nn.Module):
    """The student's decoder (official ``decoder_layer4..1``): residual blocks on the deepest
    encoder level, then per teacher level, deepest first, a bilinear resize to the level's size
    and residual blocks to its channels."""

    def __init__(self, deep_channels: int, channels: Sequence[int], blocks: int = 2) -> None:
        """Build one residual stage for the deepest level and one per teacher level.

        Args:
            deep_channels: channels of the encoder's extra (deepest) level.
            channels: channels of the teacher levels (shallow first).
            blocks: BasicBlocks per stage (official ``make_layer(BasicBlock, ..., 2)``).
        """
        super().__init__()
        stages = [residual_stage(deep_channels, deep_channels, blocks, GENERIC_LAYOUT)]
        current = deep_channels
        for c in reversed(channels):
            stages.append(residual_stage(current, c, blocks, GENERIC_LAYOUT))
            current = c
        self.stages = nn.ModuleList(stages)
        init_like_torchvision(self)  # official: kaiming fan-out convolutions, unit BatchNorm

    def forward(self, deep: Tensor, sizes: Sequence[Sequence[int]]) -> Features:
        """Deepest level B×C×h×w → one map per teacher level (shallow first, at ``sizes``)."""
        x = self.stages[0](deep)
        outs = []
        for stage, size in zip(self.stages[1:], reversed(sizes), strict=True):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
            x = stage(x)
            outs.append(x)
        return outs[::-1]


class DenoisingStudent(Student):
    """Encoder (random init, one level deeper than the teacher) + :class:`FeatureDecoder`; with
    ``decoder=None`` the encoder's teacher levels themselves (official ``ed=False``)."""

    def __init__(self, encoder: FeatureExtractor, decoder: FeatureDecoder | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def features(self, images: Tensor) -> Features:
        """The student's levels for images B×3×H×W in [0, 1]."""
        levels = self.encoder(images)
        if self.decoder is None:
            return levels
        *shallow, deep = levels
        return self.decoder(deep, [f.shape[-2:] for f in shallow])

    def forward(self, batch: Batch, targets: Features) -> Features:
        return self.features(batch["image"])


# -- scorer: the segmentation network ---------------------------------------------------------
def conv_bn_relu(c_in: int, c_out: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    """Convolution (no bias, 'same' padding) + BatchNorm + ReLU (official ``ConvNormAct2d``)."""
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (official ``ASPP``): a global-average branch (1×1 conv,
    resized back) and one 3×3 branch per dilation rate, concatenated and fused by a 3×3 conv."""

    def __init__(self, c_in: int, c_out: int, rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(c_in, c_out, 1))
        dilated = [conv_bn_relu(c_in, c_out, 1 if r == 1 else 3, r) for r in rates]
        self.branches = nn.ModuleList([pooled, *dilated])
        self.fuse = conv_bn_relu((1 + len(rates)) * c_out, c_out, 3)

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        outs[0] = F.interpolate(outs[0], size=x.shape[-2:], mode="bilinear", align_corners=False)
        return cast(Tensor, self.fuse(torch.cat(outs, dim=1)))


class SegmentationNet(nn.Module):
    """Two residual blocks to ``width`` channels, ASPP, 3×3 conv + BN + ReLU, 1×1 conv, sigmoid
    (official ``SegmentationNet``)."""

    def __init__(
        self, c_in: int, width: int = 256, blocks: int = 2, rates: Sequence[int] = (6, 12, 18)
    ) -> None:
        super().__init__()
        self.res = residual_stage(c_in, width, blocks, GENERIC_LAYOUT)
        init_like_torchvision(self.res)  # official: the init loop runs before the head exists
        self.head = nn.Sequential(
            ASPP(width, width, rates),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """B×C_in×h×w → B×1×h×w probabilities."""
        return torch.sigmoid(self.head(self.res(x)))


def reduce_scores(maps: Tensor, reduction: str) -> Tensor:
    """Image scores (B,): ``topn:<count>`` is the mean of the ``count`` largest pixels (official
    ``eval.py``: sort, mean of the first T = 100); any other value goes to ``reduce_map``."""
    if reduction.startswith("topn:"):
        flat = maps.flatten(1)
        k = min(int(reduction.split(":", 1)[1]), flat.shape[1])
        return flat.topk(k, dim=1).values.mean(dim=1)
    return reduce_map(maps, reduction)


SOURCES = ("segmentation", "denoising")


class SegmentationScorer(Scorer):
    """Maps from the segmentation network (``segmentation``) or the product of the per-level
    1 − cos maps (``denoising``, the official DeST row), resized to the input."""

    def __init__(
        self,
        segmentation: SegmentationNet | None,
        source: str = "segmentation",
        reduction: str = "topn:100",
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise StadError(
                f"method.score={source!r} is unknown; use segmentation (paper) or denoising"
            )
        self.segmentation = segmentation
        self.source = source
        self.reduction = reduction

    def segment(self, targets: Features, preds: Features) -> Tensor:
        """The segmentation output at level 1's size: B×1×h₁×w₁ in (0, 1)."""
        assert self.segmentation is not None, "score=denoising has no segmentation network"
        size = targets[0].shape[-2:]
        products = [
            resize(-l2_normalize(t.detach()) * l2_normalize(s), size)
            for t, s in zip(targets, preds, strict=True)
        ]
        return cast(Tensor, self.segmentation(torch.cat(products, dim=1)))

    def denoising_map(self, targets: Features, preds: Features) -> Tensor:
        """Π_levels (1 − cos), each resized to level 1's size: B×1×h₁×w₁."""
        size = targets[0].shape[-2:]
        levels = [resize(level_distance(t, s), size) for t, s in zip(targets, preds, strict=True)]
        return torch.cat(levels, dim=1).prod(dim=1, keepdim=True)

    def forward(self, targets: Features, preds: Features, batch: Batch) -> tuple[Tensor, Tensor]:
        coarse = (
            self.segment(targets, preds)
            if self.source == "segmentation"
            else self.denoising_map(targets, preds)
        )
        maps = resize(coarse.float(), batch["image"].shape[-2:])
        return maps, reduce_scores(maps, self.reduction)


# -- losses -----------------------------------------------------------------------------------
def cosine_loss(targets: Features, preds: Features) -> Tensor:
    """Σ_levels Σ_batch mean over positions of 1 − ⟨T̂, Ŝ⟩ (official ``cosine_similarity_loss``:
    the sum over batch and positions divided by h·w; it grows with the batch size)."""
    terms = [level_distance(t.detach(), s) for t, s in zip(targets, preds, strict=True)]
    return torch.stack([d.sum() / (d.shape[-2] * d.shape[-1]) for d in terms]).sum()


def focal_loss(probs: Tensor, target: Tensor, gamma: float = 4.0, alpha: float = -1.0) -> Tensor:
    """Official ``focal_loss`` on probabilities: mean of BCE(p, y) · (1 − p_t)^γ with
    p_t = p·y + (1 − p)(1 − y), α-weighted when α ≥ 0 (DeSTSeg: α = −1, none). BCE is torch's
    (logs clamped at −100), in float32 outside autocast."""
    with torch.autocast(device_type=probs.device.type, enabled=False):
        p, y = probs.float(), target.float()
        bce = F.binary_cross_entropy(p, y, reduction="none")
        p_t = p * y + (1 - p) * (1 - y)
        loss = bce * (1 - p_t) ** gamma
        if alpha >= 0:
            loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
        return loss.mean()


def segmentation_target(mask: Tensor, size: Sequence[int], threshold: float = 0.5) -> Tensor:
    """The synthetic mask at the segmentation output's size: bilinear (no antialiasing), then
    ≥ threshold (official ``train.py``). B×1×H×W → B×1×h×w in {0, 1}."""
    down = F.interpolate(mask.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return (down >= threshold).float()


def denoising_loss(method: Method, batch: Batch, denoising: bool = True) -> dict[str, Tensor]:
    """Stage 1: the student on the corrupted image (``denoising``; else on the clean one)
    against the teacher on the clean image."""
    student = cast(DenoisingStudent, method.student)
    targets = method.teacher(batch)
    images = batch["streams"][ANOMALIES]["image"] if denoising else batch["image"]
    loss = cosine_loss(targets, student.features(images))
    return {"loss": loss, "cosine": loss.detach()}


def segmentation_loss(
    method: Method, batch: Batch, gamma: float = 4.0, threshold: float = 0.5
) -> dict[str, Tensor]:
    """Stage 2: focal + L1 between the segmentation output on the corrupted image (teacher and
    student frozen) and the synthetic mask at the output's size."""
    synth = batch["streams"][ANOMALIES]
    scorer = cast(SegmentationScorer, method.scorer)
    corrupted = {**batch, "image": synth["image"]}
    with torch.no_grad():
        targets = method.teacher(corrupted)
        preds = method.student(corrupted, targets)
    probs = scorer.segment(targets, preds)
    target = segmentation_target(synth["mask"], probs.shape[-2:], threshold)
    focal = focal_loss(probs, target, gamma)
    l1 = F.l1_loss(probs.float(), target)
    return {
        "loss": focal + l1,
        "focal": focal.detach(),
        "l1": l1.detach(),
        "anomalous_share": target.mean(),
    }


# -- build ------------------------------------------------------------------------------------
def anomaly_source(cfg: DictConfig, salt: int) -> dict[str, Any]:
    """A stage's stream of synthetic anomalies of its batches (``stad.synthesis``), drawn from
    (run seed, epoch, ``salt``): each stage draws its own anomalies, as the official single
    training loop does."""
    synthesis = cast(dict[str, Any], OmegaConf.to_container(cfg.synthesis, resolve=True))
    return {
        "kind": "synthetic_anomalies",
        "synthesis": {**synthesis, "salt": salt},
        "size": int(cfg.synthesis_size),
        "category": cfg.get("category"),
    }


def _student(cfg: DictConfig, backbone: DictConfig, layers: list[int]) -> DenoisingStudent:
    decoder = bool(cfg.student.decoder)
    levels = [*layers, layers[-1] + 1] if decoder else layers
    try:
        encoder, _ = create_feature_extractor(backbone.name, levels, "random")
    except StadError as err:
        raise StadError(
            f"DeSTSeg's student encoder needs the level after method.layers={layers} ({err})"
        ) from None
    if not decoder:
        return DenoisingStudent(encoder, None)
    *shallow, deep = encoder.channels
    return DenoisingStudent(encoder, FeatureDecoder(deep, shallow, int(cfg.student.blocks)))


def build(cfg: DictConfig, backbone: DictConfig) -> Method:
    """DeSTSeg from ``conf/method/destseg.yaml`` and a backbone config."""
    layers = list(cfg.layers)
    teacher, weights = pretrained_teacher(backbone.name, layers, backbone.weights, cache=False)
    student = _student(cfg, backbone, layers)
    score = str(cfg.score)
    seg_cfg = cfg.segmentation
    segmentation = None
    if score == "segmentation":
        segmentation = SegmentationNet(
            sum(teacher.extractor.channels),
            int(seg_cfg.width),
            int(seg_cfg.blocks),
            list(seg_cfg.rates),
        )
    scorer = SegmentationScorer(segmentation, score, str(cfg.scorer.reduction))
    denoising = bool(cfg.denoising)
    denoise = Stage.from_config(
        "denoise",
        cfg.stages.denoise,
        trainable=["student"],
        loss=partial(denoising_loss, denoising=denoising),
    )
    if denoising:
        denoise.streams[ANOMALIES] = Stream(anomaly_source(cfg, salt=0))
    stages = [denoise]
    info: dict[str, Any] = {
        "teacher_weights": weights.as_dict(),
        "layers": layers,
        "student_levels": list(student.encoder.layers),
        "student_init": "random (timm)",
        "denoising": denoising,
        "student_decoder": student.decoder is not None,
        "score": score,
        "score_reduction": scorer.reduction,
    }
    if segmentation is not None:
        loss = partial(
            segmentation_loss,
            gamma=float(cfg.loss.focal_gamma),
            threshold=float(cfg.loss.mask_threshold),
        )
        segment = Stage.from_config(
            "segment",
            cfg.stages.segment,
            trainable=["scorer.segmentation.res", "scorer.segmentation.head"],
            loss=loss,
            streams={ANOMALIES: Stream(anomaly_source(cfg, salt=1))},
        )
        stages.append(segment)
        info.update(
            segmentation_channels=sum(teacher.extractor.channels),
            focal_gamma=float(cfg.loss.focal_gamma),
        )
    return Method(teacher, student, scorer, stages, info=info)
