"""AST: asymmetric student-teacher networks (Rudolph et al., WACV 2023).

Features: a frozen ImageNet EfficientNet-B5, output of its stride-32 stage of 304 channels (timm
``blocks[5]``; timm's ``features_only`` does not expose it, see :class:`BlockFeatures`), plus with
3-D data the depth map pixel-unshuffled to 64 channels; features are cached (feature_cache.py).
Teacher: a conditional normalizing flow (flows.py) on those features, conditioned on a 32-channel
sinusoidal positional encoding, trained first on the negative log-likelihood.
Student: a residual conv net (not invertible, hence "asymmetric") that regresses the flow's output
z from the same features. Score: per-position squared distance student–teacher (masked by the
object foreground on 3-D data), upsampled to the input.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from stad.backbones import (
    FeatureExtractor,
    WeightsInfo,
    create_classifier,
    create_feature_extractor,
)
from stad.core import Batch, Features, Method, Scorer, Stage, Student, Teacher
from stad.errors import IncompatibleError, StadError
from stad.feature_cache import CachedFeatures, tensors_sha256
from stad.methods.common import reduce_map, resize
from stad.methods.flows import ConditionalFlow, gaussian_nll

INPUTS = ("rgb", "depth", "rgbd")
DEPTH_UNSHUFFLE = 8  # depth resized to 8× the feature grid, pixel-unshuffled: 64 channels
# Indices in the teacher's output list (Features): the flow output, the per-position
# log-determinant B×1×h×w, and the flow's input (the student reads it; it is not a target).
Z, LOG_DET, FLOW_INPUT = 0, 1, 2


# -- features ---------------------------------------------------------------------------------
class BlockFeatures(nn.Module):
    """Output of ``blocks[stage]`` of a timm EfficientNet-style model (stem → blocks[:stage+1]).

    AST's 304-channel stride-32 features are the last block of EfficientNet-B5's stage 6
    (timm ``blocks[5]``, the official code's block index 35). timm's ``features_only`` taps only
    the stages where the stride changes (``blocks.4`` then ``blocks.6``), so this module keeps the
    classifier's stem and first ``stage + 1`` stages and drops the rest.

    Attributes: ``channels``, ``strides`` (one entry each), ``frozen`` (as FeatureExtractor).
    """

    def __init__(self, model: nn.Module, stage: int, *, frozen: bool = True) -> None:
        super().__init__()
        cfg = model.pretrained_cfg
        self.stem = nn.Sequential(model.conv_stem, model.bn1)
        self.blocks = nn.Sequential(*list(model.blocks)[: stage + 1])
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.frozen = frozen
        probe = 64
        with torch.no_grad():
            out = self.blocks(self.stem(torch.zeros(1, 3, probe, probe)))
        self.channels = [int(out.shape[1])]
        self.strides = [probe // int(out.shape[-1])]
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> BlockFeatures:
        """A frozen extractor always stays in eval mode."""
        return super().train(mode and not self.frozen)

    def forward(self, x: Tensor) -> list[Tensor]:
        """B×3×H×W images in [0, 1] → [B×C×H/s×W/s]."""
        return [self.blocks(self.stem((x - self.mean) / self.std))]


def feature_extractor(
    name: str, weights: str, stage: int | None, level: int | None
) -> tuple[nn.Module, WeightsInfo]:
    """The frozen extractor: ``blocks[stage]`` of an EfficientNet-style model, or a timm level."""
    if stage is None:
        if level is None:
            raise StadError("method.features: set feature_stage (EfficientNet) or feature_level")
        extractor, info = create_feature_extractor(name, [int(level)], weights, frozen=True)
        return extractor, info
    model, info = create_classifier(name, weights)
    if not all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks")):
        raise IncompatibleError(
            f"method.feature_stage={stage} needs an EfficientNet-style backbone (timm model with "
            f"conv_stem, bn1, blocks); '{name}' is not one. Fix: use backbone=efficientnet_b5 / "
            "tf_efficientnet_lite0, or set method.feature_stage=null method.feature_level=<timm "
            "out_index>"
        )
    if not 0 <= stage < len(model.blocks):
        raise StadError(
            f"method.feature_stage={stage} out of range: '{name}' has {len(model.blocks)} stages "
            f"(0..{len(model.blocks) - 1})"
        )
    return BlockFeatures(model, stage, frozen=True), info


def positional_encoding(channels: int, height: int, width: int) -> Tensor:
    """2-D sinusoidal positional encoding, channels×height×width (CFlow-AD / AST layout).

    The first half of the channels encodes the column (sin, cos interleaved over frequencies
    1e4^(-2i/half)), the second half the row.
    """
    if channels % 4:
        raise StadError(f"method.pos_enc_channels must be a multiple of 4, got {channels}")
    half = channels // 2
    freq = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))
    cols = torch.arange(float(width))[:, None] * freq  # width × half/2
    rows = torch.arange(float(height))[:, None] * freq  # height × half/2
    enc = torch.zeros(channels, height, width)
    enc[0:half:2] = torch.sin(cols).T[:, None, :].expand(-1, height, -1)
    enc[1:half:2] = torch.cos(cols).T[:, None, :].expand(-1, height, -1)
    enc[half::2] = torch.sin(rows).T[:, :, None].expand(-1, -1, width)
    enc[half + 1 :: 2] = torch.cos(rows).T[:, :, None].expand(-1, -1, width)
    return enc


def batch_positional_encoding(channels: int, like: Tensor) -> Tensor:
    """B×channels×h×w encoding for a B×C×h×w map (same device and dtype)."""
    b, _, h, w = like.shape
    enc = positional_encoding(channels, h, w).to(device=like.device, dtype=like.dtype)
    return enc.unsqueeze(0).expand(b, -1, -1, -1)


def depth_channels(depth: Tensor, grid: tuple[int, int]) -> Tensor:
    """Depth B×1×H×W → B×64×h×w: resized (bilinear) to 8h×8w, then pixel-unshuffled by 8."""
    d = DEPTH_UNSHUFFLE
    depth = F.interpolate(
        depth.float(), size=(grid[0] * d, grid[1] * d), mode="bilinear", align_corners=False
    )
    return F.pixel_unshuffle(depth, d)


def foreground_weight(foreground: Tensor, grid: tuple[int, int], dilate: int = 8) -> Tensor:
    """AST's soft foreground weight on the feature grid: B×1×H×W 0/1 mask → B×1×h×w in [0, 1].

    The mask is resized to 8h×8w (any covered pixel counts, as the code's ``>0`` binarisation),
    dilated with a ``dilate``×``dilate`` square, then bilinearly down-sampled to the grid.
    """
    d = DEPTH_UNSHUFFLE
    size = (grid[0] * d, grid[1] * d)
    fg = (F.interpolate(foreground.float(), size=size, mode="bilinear") > 0).float()
    if dilate > 1:
        # Even kernels are off-centre: scipy's binary_dilation puts the origin at index size//2.
        lo, hi = dilate // 2, dilate - 1 - dilate // 2
        fg = F.max_pool2d(F.pad(fg, (lo, hi, lo, hi)), kernel_size=dilate, stride=1)
    return F.interpolate(fg, size=grid, mode="bilinear", align_corners=False)


def masked_mean(values: Tensor, weight: Tensor | None, average: str = "foreground") -> Tensor:
    """Mean of per-position values B×h×w weighted by a B×1×h×w foreground weight.

    ``foreground`` (paper): Σ w·v / Σ w; ``all`` (code): mean of w·v over all positions.
    """
    if weight is None:
        return values.mean()
    weighted = values * weight[:, 0]
    if average == "all":
        return weighted.mean()
    return weighted.sum() / weight.sum().clamp_min(1e-6)


# -- teacher ----------------------------------------------------------------------------------
class FlowTeacher(Teacher):
    """Frozen features (+ depth) → conditional normalizing flow → z (the student's targets).

    ``forward`` returns ``[z B×C×h×w, log|det J| B×1×h×w, flow input B×C×h×w]``.
    """

    def __init__(
        self,
        features: CachedFeatures,
        flow: ConditionalFlow,
        input_mode: str,
        pos_channels: int,
        stride: int,
    ) -> None:
        super().__init__()
        self.features = features
        self.flow = flow
        self.input_mode = input_mode
        self.pos_channels = pos_channels
        self.stride = stride

    def grid(self, batch: Batch) -> tuple[int, int]:
        """Feature grid size h×w of a batch."""
        h, w = batch["image"].shape[-2:]
        return math.ceil(h / self.stride), math.ceil(w / self.stride)

    def encode(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The flow's input B×C×h×w and its condition (positional encoding) B×P×h×w."""
        parts = []
        if self.input_mode in ("rgb", "rgbd"):
            parts.append(self.features(batch["image"], batch.get("path"))[0].float())
        if self.input_mode in ("depth", "rgbd"):
            if batch.get("depth") is None:
                raise StadError(
                    f"method.input={self.input_mode} needs depth maps, but the dataset's batches "
                    "have no 'depth'; use a 3-D dataset (dataset=mvtec3d) or method.input=rgb"
                )
            parts.append(depth_channels(batch["depth"], self.grid(batch)))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return x, batch_positional_encoding(self.pos_channels, x)

    def foreground(self, batch: Batch) -> Tensor | None:
        """Soft foreground weight B×1×h×w, or None when the batch has no foreground mask."""
        fg = batch.get("foreground")
        return None if fg is None else foreground_weight(fg, self.grid(batch))

    @torch.no_grad()
    def forward(self, batch: Batch) -> Features:
        x, cond = self.encode(batch)
        z, log_det = self.flow(x, cond)
        return [z, log_det.unsqueeze(1), x]


# -- student ----------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """conv3×3–BN–act–conv3×3–BN–act, plus the input (AST's ``res_block``)."""

    def __init__(self, channels: int, slope: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(slope),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(slope),
        )

    def forward(self, x: Tensor) -> Tensor:
        """B×C×h×w → B×C×h×w."""
        return x + self.body(x)


class ResidualStudent(Student):
    """3×3 conv + LeakyReLU → residual blocks → 3×3 conv: predicts z from [pos. enc., features]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        pos_channels: int,
        hidden: int = 1024,
        blocks: int = 4,
        slope: float = 0.01,
    ) -> None:
        super().__init__()
        self.pos_channels = pos_channels
        self.net = nn.Sequential(
            nn.Conv2d(pos_channels + in_channels, hidden, 3, padding=1),
            nn.LeakyReLU(slope),
            *(ResidualBlock(hidden, slope) for _ in range(blocks)),
            nn.Conv2d(hidden, out_channels, 3, padding=1),
        )

    def forward(self, batch: Batch, targets: Features) -> Features:
        x = targets[FLOW_INPUT]
        pos = batch_positional_encoding(self.pos_channels, x)
        return [self.net(torch.cat([pos, x], dim=1))]


# -- scorer -----------------------------------------------------------------------------------
def student_distance(z: Tensor, pred: Tensor) -> Tensor:
    """Per-position squared L2 distance divided by the channel count: B×C×h×w → B×1×h×w."""
    return (z - pred).pow(2).mean(dim=1, keepdim=True)


class AstScorer(Scorer):
    """Student–teacher distance (or the teacher's own NLL) on the grid, masked, upsampled.

    Args:
        kind: ``student`` (AST) or ``teacher_nll`` (the paper's teacher-only baseline: the flow's
            per-position NLL ½||z||² − log|det J|).
        reduction: image score from the grid map: ``auto`` (max when the batch has a foreground
            mask, else mean), ``max``, ``mean`` or ``topk:<fraction>``.
        mask: multiply the map by the foreground weight when there is one (code: eval_mask).
    """

    def __init__(self, kind: str = "student", reduction: str = "auto", mask: bool = True) -> None:
        super().__init__()
        if kind not in ("student", "teacher_nll"):
            raise StadError(f"method.scorer.kind must be student or teacher_nll, got {kind!r}")
        self.kind = kind
        self.reduction = reduction
        self.mask = mask

    def grid_map(self, targets: Features, preds: Features, batch: Batch) -> Tensor:
        """B×1×h×w anomaly map on the feature grid."""
        if self.kind == "teacher_nll":
            z, log_det = targets[Z].float(), targets[LOG_DET].float()
            out = gaussian_nll(z, log_det[:, 0]).unsqueeze(1)
        else:
            out = student_distance(targets[Z].float(), preds[0].float())
        fg = batch.get("foreground")
        if self.mask and fg is not None:
            out = out * foreground_weight(fg, tuple(out.shape[-2:]))
        return out

    def image_reduction(self, batch: Batch) -> str:
        """The reduction used for this batch (``auto`` resolved)."""
        if self.reduction != "auto":
            return self.reduction
        return "max" if batch.get("foreground") is not None else "mean"

    def forward(self, targets: Features, preds: Features, batch: Batch) -> tuple[Tensor, Tensor]:
        grid = self.grid_map(targets, preds, batch)
        maps = resize(grid, batch["image"].shape[-2:])
        return maps, reduce_map(grid, self.image_reduction(batch))


# -- losses -----------------------------------------------------------------------------------
def teacher_nll_loss(
    method: Method, batch: Batch, average: str = "foreground"
) -> dict[str, Tensor]:
    """Stage 1: mean per-position NLL of the flow (foreground-weighted when masked)."""
    teacher: FlowTeacher = method.teacher  # type: ignore[assignment]
    with torch.no_grad():
        x, cond = teacher.encode(batch)
    z, log_det = teacher.flow(x, cond)
    nll = gaussian_nll(z, log_det)
    return {"loss": masked_mean(nll, teacher.foreground(batch), average)}


def student_loss(method: Method, batch: Batch, average: str = "foreground") -> dict[str, Tensor]:
    """Stage 2: mean per-position ||z − ẑ||²/C (foreground-weighted when masked)."""
    teacher: FlowTeacher = method.teacher  # type: ignore[assignment]
    targets = teacher(batch)
    pred = method.student(batch, targets)[0]
    dist = student_distance(targets[Z], pred)[:, 0]
    return {"loss": masked_mean(dist, teacher.foreground(batch), average)}


# -- build ------------------------------------------------------------------------------------
def _input_channels(mode: str, feature_channels: int) -> int:
    depth = DEPTH_UNSHUFFLE**2
    return {"rgb": feature_channels, "depth": depth, "rgbd": feature_channels + depth}[mode]


def _cache_key(extractor: nn.Module, info: WeightsInfo, cfg: DictConfig) -> str:
    """What besides the image determines the cached features: dataset, backbone, weights, tap."""
    feature = f"stage{cfg.feature_stage}" if cfg.feature_stage is not None else "level"
    weights_id = info.sha256 or f"{info.source}:{info.detail}"
    if cfg.get("cache_dir"):
        # On disk, files outlive the run: fingerprint the weights actually loaded (random
        # weights differ by seed and have no file to hash).
        weights_id = tensors_sha256(list(extractor.state_dict().values()))
    return (
        f"{cfg.get('cache_key', '')}|{info.name}|{weights_id}|{feature}|{cfg.get('feature_level')}"
    )


def build(cfg: DictConfig, backbone: DictConfig) -> Method:
    """AST from ``conf/method/ast.yaml`` and a backbone config."""
    mode = str(cfg.input)
    if mode not in INPUTS:
        raise StadError(f"method.input must be one of {', '.join(INPUTS)}, got {mode!r}")
    stage = cfg.get("feature_stage")
    extractor, weights = feature_extractor(
        backbone.name, backbone.weights, stage, cfg.get("feature_level")
    )
    assert isinstance(extractor, (BlockFeatures, FeatureExtractor))
    features = CachedFeatures(extractor, _cache_key(extractor, weights, cfg), cfg.get("cache_dir"))
    channels = _input_channels(mode, extractor.channels[0])
    pos = int(cfg.pos_enc_channels)
    flow = ConditionalFlow(
        channels,
        pos,
        hidden=int(cfg.flow.hidden),
        kernel_sizes=list(cfg.flow.kernel_sizes),
        clamp=float(cfg.flow.clamp),
    )
    teacher = FlowTeacher(features, flow, mode, pos, extractor.strides[0])
    student = ResidualStudent(
        channels,
        channels,
        pos,
        hidden=int(cfg.student.hidden),
        blocks=int(cfg.student.blocks),
        slope=float(cfg.student.leaky_slope),
    )
    scorer = AstScorer(str(cfg.scorer.kind), str(cfg.scorer.reduction), bool(cfg.scorer.mask))
    average = str(cfg.loss_average)
    stages = [
        Stage.from_config(
            "teacher",
            cfg.stages.teacher,
            trainable=["teacher.flow"],
            loss=partial(teacher_nll_loss, average=average),
        )
    ]
    if scorer.kind == "student":
        stages.append(
            Stage.from_config(
                "student",
                cfg.stages.student,
                trainable=["student"],
                loss=partial(student_loss, average=average),
            )
        )
    info: dict[str, Any] = {
        "teacher_weights": weights.as_dict(),
        "features": (
            f"blocks[{stage}]" if stage is not None else f"level {cfg.get('feature_level')}"
        ),
        "feature_channels": extractor.channels[0],
        "feature_stride": extractor.strides[0],
        "input": mode,
        "flow": {
            "hidden": int(cfg.flow.hidden),
            "kernel_sizes": list(cfg.flow.kernel_sizes),
            "clamp": float(cfg.flow.clamp),
        },
        "student": {
            "hidden": int(cfg.student.hidden),
            "blocks": int(cfg.student.blocks),
            "leaky_slope": float(cfg.student.leaky_slope),
        },
        "scorer": scorer.kind,
        "score_reduction": (
            "auto (max over the foreground-masked map when a foreground mask exists, else mean)"
            if scorer.reduction == "auto"
            else scorer.reduction
        ),
        "score_mask": scorer.mask,
        "loss_average": average,
        "feature_cache": str(cfg.get("cache_dir") or "memory"),
        "timm_version": timm.__version__,
    }
    requires = ("depth",) if cfg.input in ("depth", "rgbd") else ()
    return Method(teacher, student, scorer, stages, info=info, requires=requires)
