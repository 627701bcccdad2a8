"""AST: asymmetric student-teacher networks (Rudolph et al., WACV 2023).

Features: a frozen ImageNet EfficientNet-B5, output of its stride-32 stage of 304 channels (timm
``blocks[5]``; timm's ``features_only`` does not expose it, see :class:`BlockFeatures`), plus with
3-D data the depth map pixel-unshuffled to 64 channels; features are cached (feature_cache.py).
Teacher: a conditional normalizing flow (flows.py) on those features, conditioned on a 32-channel
sinusoidal positional encoding, trained first on the negative log-likelihood.
Student: a residual conv net (not invertible, hence "asymmetric") that regresses the flow's output
z from the same features. Score: per-position squared distance student–teacher (masked by the
object foreground on 3-D data), upsampled to the input.

Where stad's generic parts compute something else than the official code (TF "same" padding of
the backbone, map upsampling, which map the image score reads, foreground masking), a switch in
conf/method/ast.yaml selects the code's behaviour (the default) or stad's earlier one.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, cast

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
from stad.methods.common import reduce_map
from stad.methods.flows import ConditionalFlow, gaussian_nll
from stad.static_padding import Pad, apply_static_padding

INPUTS = ("rgb", "depth", "rgbd")
UPSAMPLE_MODES = ("bilinear", "bicubic")
SCORE_SOURCES = ("eval", "grid")
MAP_SOURCES = ("loss", "distance")
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

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, stage: int, *, frozen: bool = True) -> None:
        super().__init__()
        cfg = cast(dict[str, Any], model.pretrained_cfg)
        self.stem = nn.Sequential(cast(nn.Module, model.conv_stem), cast(nn.Module, model.bn1))
        self.blocks = nn.Sequential(*list(cast(nn.Sequential, model.blocks))[: stage + 1])
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
    name: str,
    weights: str,
    stage: int | None,
    level: int | None,
    static_padding_size: int | None = None,
) -> tuple[nn.Module, WeightsInfo, dict[str, Pad]]:
    """The frozen extractor: ``blocks[stage]`` of an EfficientNet-style model, or a timm level.

    With ``static_padding_size`` every TF-"same"-padded layer pads by the amounts computed for a
    ``static_padding_size``² input, whatever the input (the official code's efficientnet_pytorch
    rule); returns those pads by layer name (empty: timm's dynamic padding, or none to change).
    """
    extractor, info = _build_extractor(name, weights, stage, level)
    pads: dict[str, Pad] = {}
    if static_padding_size is not None:
        pads = apply_static_padding(extractor, int(static_padding_size))
    return extractor, info, pads


def _build_extractor(
    name: str, weights: str, stage: int | None, level: int | None
) -> tuple[nn.Module, WeightsInfo]:
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
    blocks = cast(nn.Sequential, model.blocks)
    if not 0 <= stage < len(blocks):
        raise StadError(
            f"method.feature_stage={stage} out of range: '{name}' has {len(blocks)} stages "
            f"(0..{len(blocks) - 1})"
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
    dilated with a ``dilate``×``dilate`` square as the code's ``scipy.ndimage.binary_dilation``
    (utils.py ``dilation``), then bilinearly down-sampled to the grid.
    """
    d = DEPTH_UNSHUFFLE
    size = (grid[0] * d, grid[1] * d)
    fg = (F.interpolate(foreground.float(), size=size, mode="bilinear") > 0).float()
    if dilate > 1:
        fg = binary_dilation(fg, dilate)
    return F.interpolate(fg, size=grid, mode="bilinear", align_corners=False)


def binary_dilation(mask: Tensor, size: int) -> Tensor:
    """scipy.ndimage.binary_dilation of B×1×H×W 0/1 masks with a ``size``×``size`` square of ones
    (border: background).

    scipy centres a structure of even size at index size//2 and dilates with the reflected
    structure, so a single pixel p spreads to p − size//2 … p + (size − 1 − size//2): p−4 … p+3
    for the code's 8×8. A stride-1 max pool over [i − lo, i + hi] reaches p from i = p − hi …
    p + lo, hence lo = size − 1 − size//2 on the left / top and hi = size//2 on the right / bottom.
    """
    lo, hi = size - 1 - size // 2, size // 2
    return F.max_pool2d(F.pad(mask, (lo, hi, lo, hi)), kernel_size=size, stride=1)


def masked_mean(values: Tensor, weight: Tensor | None, average: str = "all") -> Tensor:
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
        use_foreground: bool = True,
    ) -> None:
        super().__init__()
        self.features = features
        self.flow = flow
        self.input_mode = input_mode
        self.pos_channels = pos_channels
        self.stride = stride
        self.use_foreground = use_foreground

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
        """Soft foreground weight B×1×h×w, or None when the batch has no foreground mask or the
        mask is off (``method.foreground_mask``)."""
        fg = batch.get("foreground")
        if fg is None or not self.use_foreground:
            return None
        return foreground_weight(fg, self.grid(batch))

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

    With ``w`` the soft foreground weight (when a mask is in use) and ``d`` the per-position
    distance, the grid *loss map* is ``w·d`` (``d`` without a mask): the per-position loss the
    student trains on. The anomaly map starts from the loss map (``map_source="loss"``, as the
    code) or from ``d`` (``"distance"``) and is multiplied by ``w`` once more when ``mask``; so
    with a mask the code's map is ``w²·d``. It is then upsampled: by ``upsample_factor`` (the code
    evaluates the ×8 map at 192 px) and held at the input size by nearest-neighbour, or, without a
    factor, straight to the input size.

    Args:
        kind: ``student`` (AST) or ``teacher_nll`` (the paper's teacher-only baseline: the flow's
            per-position NLL ½||z||² − log|det J|; its map is ``w·nll``, as the code's
            ``get_nf_loss``, ``map_source`` does not apply).
        reduction: image score: ``auto`` (max when the batch has a foreground mask, else mean),
            ``max``, ``mean`` or ``topk:<fraction>``.
        mask: multiply the map by the foreground weight when a mask is in use (code: eval_mask).
        use_foreground: whether the foreground mask is in use at all (``method.foreground_mask``).
        map_source: ``loss`` or ``distance`` (see above).
        upsample: ``bicubic`` (code) or ``bilinear``, ``align_corners=False`` both.
        upsample_factor: integer factor from the grid (code: 8), or None: to the input size.
        score_source: ``eval`` (code's eval.py: ``mean`` = mean of the grid loss map, i.e. the
            per-sample loss; ``max`` / ``topk`` on the upsampled map) or ``grid`` (every
            reduction on the grid anomaly map).
    """

    def __init__(
        self,
        kind: str = "student",
        reduction: str = "auto",
        mask: bool = True,
        *,
        use_foreground: bool = True,
        map_source: str = "loss",
        upsample: str = "bicubic",
        upsample_factor: int | None = 8,
        score_source: str = "eval",
    ) -> None:
        super().__init__()
        _check_choice("scorer.kind", kind, ("student", "teacher_nll"))
        _check_choice("scorer.map_source", map_source, MAP_SOURCES)
        _check_choice("scorer.upsample", upsample, UPSAMPLE_MODES)
        _check_choice("scorer.score_source", score_source, SCORE_SOURCES)
        if upsample_factor is not None and int(upsample_factor) < 1:
            raise StadError(
                f"method.scorer.upsample_factor must be >= 1 or null, got {upsample_factor}"
            )
        self.kind = kind
        self.reduction = reduction
        self.mask = mask
        self.use_foreground = use_foreground
        self.map_source = map_source
        self.upsample = upsample
        self.upsample_factor = None if upsample_factor is None else int(upsample_factor)
        self.score_source = score_source

    def weight(self, batch: Batch, grid: tuple[int, int]) -> Tensor | None:
        """Foreground weight B×1×h×w, or None without a mask in use."""
        fg = batch.get("foreground")
        if fg is None or not self.use_foreground:
            return None
        return foreground_weight(fg, grid)

    def grid_maps(self, targets: Features, preds: Features, batch: Batch) -> tuple[Tensor, Tensor]:
        """(loss map, anomaly map), both B×1×h×w on the feature grid."""
        if self.kind == "teacher_nll":
            z, log_det = targets[Z].float(), targets[LOG_DET].float()
            raw = gaussian_nll(z, log_det[:, 0]).unsqueeze(1)
        else:
            raw = student_distance(targets[Z].float(), preds[0].float())
        w = self.weight(batch, cast(tuple[int, int], tuple(raw.shape[-2:])))
        if w is None:
            return raw, raw
        loss = raw * w  # code: get_st_loss / get_nf_loss multiply by the mask (utils.py)
        if self.kind == "teacher_nll":
            return loss, (loss if self.mask else raw)
        base = loss if self.map_source == "loss" else raw
        return loss, base * w if self.mask else base

    def grid_map(self, targets: Features, preds: Features, batch: Batch) -> Tensor:
        """B×1×h×w anomaly map on the feature grid."""
        return self.grid_maps(targets, preds, batch)[1]

    def upsampled(self, grid: Tensor, size: tuple[int, int]) -> Tensor:
        """The grid map ×``upsample_factor`` (the code's evaluation resolution), or at ``size``."""
        if self.upsample_factor is None:
            target = size
        else:
            target = (grid.shape[-2] * self.upsample_factor, grid.shape[-1] * self.upsample_factor)
        if tuple(grid.shape[-2:]) == tuple(target):
            return grid
        return F.interpolate(grid, size=target, mode=self.upsample, align_corners=False)

    def image_reduction(self, batch: Batch) -> str:
        """The reduction used for this batch (``auto`` resolved)."""
        if self.reduction != "auto":
            return self.reduction
        return "max" if batch.get("foreground") is not None else "mean"

    def forward(self, targets: Features, preds: Features, batch: Batch) -> tuple[Tensor, Tensor]:
        loss, grid = self.grid_maps(targets, preds, batch)
        size = tuple(batch["image"].shape[-2:])
        fine = self.upsampled(grid, size)
        # The evaluation runs at the input size: hold each pixel of the ×factor map there (each
        # 192-px pixel becomes a 4×4 block at 768), so its values, and its max, are the code's.
        maps = (
            fine
            if tuple(fine.shape[-2:]) == size
            else F.interpolate(fine, size=size, mode="nearest-exact")
        )
        reduction = self.image_reduction(batch)
        if self.score_source == "grid":
            return maps, reduce_map(grid, reduction)
        # Code (eval.py): the mean score is the per-sample loss, the max is over the upsampled map.
        return maps, reduce_map(loss if reduction == "mean" else fine, reduction)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise StadError(f"method.{key} must be one of {', '.join(choices)}, got {value!r}")


# -- losses -----------------------------------------------------------------------------------
def teacher_nll_loss(method: Method, batch: Batch, average: str = "all") -> dict[str, Tensor]:
    """Stage 1: mean per-position NLL of the flow (foreground-weighted when masked)."""
    teacher: FlowTeacher = method.teacher  # type: ignore[assignment]
    with torch.no_grad():
        x, cond = teacher.encode(batch)
    z, log_det = teacher.flow(x, cond)
    nll = gaussian_nll(z, log_det)
    return {"loss": masked_mean(nll, teacher.foreground(batch), average)}


def student_loss(method: Method, batch: Batch, average: str = "all") -> dict[str, Tensor]:
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
    """What besides the image determines the cached features: dataset, backbone, weights, tap,
    padding rule."""
    feature = f"stage{cfg.feature_stage}" if cfg.feature_stage is not None else "level"
    # Static padding changes the features but no weight: it must be part of the key.
    if cfg.get("static_padding_size") is not None:
        feature += f"|pad{int(cfg.static_padding_size)}"
    weights_id = info.sha256 or f"{info.source}:{info.detail}"
    if cfg.get("cache_dir"):
        # On disk, files outlive the run: fingerprint the weights actually loaded (random
        # weights differ by seed and have no file to hash).
        weights_id = tensors_sha256(list(extractor.state_dict().values()))
    return (
        f"{cfg.get('cache_key', '')}|{info.name}|{weights_id}|{feature}|{cfg.get('feature_level')}"
    )


def use_foreground(setting: Any, mode: str) -> bool:
    """Resolve ``method.foreground_mask``: ``auto`` is the code's rule (config.py: training_mask =
    eval_mask = mode != 'RGB'), i.e. on with depth / rgbd input, off with rgb; or a boolean."""
    if isinstance(setting, bool):
        return setting
    if str(setting) == "auto":
        return mode != "rgb"
    raise StadError(f"method.foreground_mask must be auto, true or false, got {setting!r}")


def build_scorer(cfg: DictConfig, foreground: bool) -> AstScorer:
    """The scorer from ``method.scorer`` (older configs without the code switches get stad's
    earlier behaviour: bilinear straight to the input size, scores on the grid, map × w once)."""
    sc = cfg.scorer
    factor = sc.get("upsample_factor")
    return AstScorer(
        str(sc.kind),
        str(sc.reduction),
        bool(sc.mask),
        use_foreground=foreground,
        map_source=str(sc.get("map_source", "distance")),
        upsample=str(sc.get("upsample", "bilinear")),
        upsample_factor=None if factor is None else int(factor),
        score_source=str(sc.get("score_source", "grid")),
    )


def build(cfg: DictConfig, backbone: DictConfig) -> Method:
    """AST from ``conf/method/ast.yaml`` and a backbone config."""
    mode = str(cfg.input)
    if mode not in INPUTS:
        raise StadError(f"method.input must be one of {', '.join(INPUTS)}, got {mode!r}")
    stage = cfg.get("feature_stage")
    pad_size = cfg.get("static_padding_size")
    extractor, weights, pads = feature_extractor(
        backbone.name,
        backbone.weights,
        stage,
        cfg.get("feature_level"),
        None if pad_size is None else int(pad_size),
    )
    foreground = use_foreground(cfg.get("foreground_mask", True), mode)
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
    teacher = FlowTeacher(features, flow, mode, pos, extractor.strides[0], foreground)
    student = ResidualStudent(
        channels,
        channels,
        pos,
        hidden=int(cfg.student.hidden),
        blocks=int(cfg.student.blocks),
        slope=float(cfg.student.leaky_slope),
    )
    scorer = build_scorer(cfg, foreground)
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
        "static_padding": {
            "size": None if pad_size is None else int(pad_size),
            "pads": {name: list(pad) for name, pad in pads.items()},
        },
        "foreground_mask": foreground,
        "scorer": scorer.kind,
        "score_reduction": (
            "auto (max when a foreground mask exists, else mean)"
            if scorer.reduction == "auto"
            else scorer.reduction
        ),
        "score_source": scorer.score_source,
        "score_mask": scorer.mask,
        "map_source": scorer.map_source,
        "upsample": scorer.upsample,
        "upsample_factor": scorer.upsample_factor,
        "loss_average": average,
        "feature_cache": str(cfg.get("cache_dir") or "memory"),
        "timm_version": timm.__version__,
    }
    requires = ("depth",) if cfg.input in ("depth", "rgbd") else ()
    return Method(teacher, student, scorer, stages, info=info, requires=requires)
