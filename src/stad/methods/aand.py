"""AAND: advancing the pre-trained teacher by anomaly amplification, then normality distillation.

Teacher: a frozen ImageNet encoder (Wide-ResNet-50-2 in the paper), levels layer1..layer3, with
a Residual Anomaly Amplification (RAA) side branch after each level. RAA: a matching-guided
residual gate (features + sin/cos positional encoding → MLP → cosine matching against a learnable
memory of normal and anomaly items; gate a = softmax mass on the anomaly items) and an
attribute-scaling residual generator (v = tanh(MLP(F⁰)) ⊙ F⁰); the advanced feature is
F^AT = F⁰ + a ⊙ v. The next frozen block receives F⁰, not F^AT.
Student: RD's one-class bottleneck and mirrored decoder (rd.reverse_student).
Scorer: per level 1 − cos(F^AT, student), resized, summed, Gaussian σ = 4, max (as RD).
Stages: (1) ``amplify`` trains only the RAA modules on synthetic anomalies (focal loss on the
gate + amplification loss with a dynamic margin); (2) ``distill`` freezes the advanced teacher
and trains bottleneck + decoder with RD's cosine loss + hard knowledge distillation (HKD) on the
top-k worst positions.
Exact losses follow the official code (github Hui-design/AAND: models/recons_net.py,
models/loss.py, train.py); its differences with the paper text are listed in docs/methods.md.
Ablations (config): ``raa=false`` (RD + HKD), ``hkd=false``, ``score=gate|amplification``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from stad.backbones import FeatureExtractor, initialise
from stad.core import Batch, Features, Method, Scorer, Stage, Stream, Student, Teacher
from stad.errors import IncompatibleError, StadError
from stad.methods.common import (
    GaussianBlur,
    cosine_distance,
    pretrained_teacher,
    reduce_map,
    resize,
)
from stad.methods.decoders import SummedLevelScorer, resnet_layout
from stad.methods.rd import flat_cosine_loss, reverse_student


# -- teacher ----------------------------------------------------------------------------------
def positional_encoding(channels: int, height: int, width: int, like: Tensor) -> Tensor:
    """2-D sin/cos encoding (official ``positionalencoding2d``): the first half of the channels
    encodes the column, the second half the row, alternating sin and cos.

    Returns:
        1×C×H×W on ``like``'s device and dtype (channel counts not divisible by 4 are padded up
        and cut back).
    """
    dim = 4 * math.ceil(channels / 4)
    half = dim // 2
    freq = torch.exp(
        torch.arange(0.0, half, 2, device=like.device) * -(math.log(1e4) / half)
    )  # half/2 frequencies
    cols = torch.arange(width, device=like.device, dtype=torch.float32)[:, None] * freq
    rows = torch.arange(height, device=like.device, dtype=torch.float32)[:, None] * freq
    pe = torch.zeros(dim, height, width, device=like.device)
    pe[0:half:2] = cols.sin().T[:, None, :].expand(-1, height, -1)
    pe[1:half:2] = cols.cos().T[:, None, :].expand(-1, height, -1)
    pe[half::2] = rows.sin().T[:, :, None].expand(-1, -1, width)
    pe[half + 1 :: 2] = rows.cos().T[:, :, None].expand(-1, -1, width)
    return pe[:channels].unsqueeze(0).to(like.dtype)


def _pointwise_mlp(channels: int, hidden: int) -> nn.Sequential:
    """Three 1×1 convolutions C → hidden → hidden → C with ReLUs (official ``projs``)."""
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 1),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1),
        nn.ReLU(),
        nn.Conv2d(hidden, channels, 1),
    )


RAA_INITS = ("kaiming_fan_out", "default")


def init_like_official_resnet(module: nn.Module) -> None:
    """The init loop of torchvision's ``ResNet.__init__``, which the official ResNet
    (``models/resnet_rar.py``) runs *after* building its RAA modules, so it reaches them
    (``stad.backbones.initialise(..., "torchvision")``). Conv biases, Linear layers and bare
    parameters (the memory) keep their own init, as there.
    """
    initialise(module, "torchvision")


def init_raa(module: nn.Module, scheme: str) -> None:
    """Initialise an RAA module: ``kaiming_fan_out`` (official) or ``default`` (PyTorch's own
    layer init, stad's former choice: left as constructed)."""
    if scheme not in RAA_INITS:
        raise StadError(
            f"method.raa_init={scheme!r} is unknown; use kaiming_fan_out (official) or default"
        )
    if scheme == "kaiming_fan_out":
        init_like_official_resnet(module)


class ResidualAmplifier(nn.Module):
    """RAA module of one level: matching-guided residual gate + attribute-scaling generator."""

    def __init__(
        self,
        channels: int,
        memory_size: int = 50,
        temperature: float = 0.2,
        hidden_max: int = 1024,
        init: str = "kaiming_fan_out",
    ) -> None:
        """Build the two MLPs and the memory.

        Args:
            channels: C of the level.
            memory_size: M normal and M anomaly items (2M learnable C-vectors, randn init).
            temperature: softmax temperature of the cosine matching.
            hidden_max: MLP hidden width = min(2C, hidden_max).
            init: weight init of the MLPs (:func:`init_raa`).
        """
        super().__init__()
        hidden = min(2 * channels, hidden_max)
        self.query_mlp = _pointwise_mlp(channels, hidden)
        self.residual_mlp = _pointwise_mlp(channels, hidden)
        self.memory = nn.Parameter(torch.randn(2 * memory_size, channels))
        self.memory_size = memory_size
        self.temperature = temperature
        init_raa(self, init)

    def gate(self, f0: Tensor) -> Tensor:
        """Anomaly weight a ∈ (0, 1) per position: B×C×h×w → B×1×h×w."""
        q = self.query_mlp(f0 + positional_encoding(f0.shape[1], f0.shape[-2], f0.shape[-1], f0))
        q = F.normalize(q.flatten(2), dim=1)  # B×C×N
        k = F.normalize(self.memory, dim=1)  # 2M×C
        affinity = torch.softmax(torch.einsum("mc,bcn->bmn", k, q) / self.temperature, dim=1)
        return affinity[:, self.memory_size :].sum(dim=1).view(f0.shape[0], 1, *f0.shape[-2:])

    def residual(self, f0: Tensor) -> Tensor:
        """v = tanh(MLP(F⁰)) ⊙ F⁰: per-position, per-channel scaling in (−1, 1)."""
        return torch.tanh(self.residual_mlp(f0)) * f0

    def forward(self, f0: Tensor, gate: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """F^AT = F⁰ + g ⊙ v, g = the given gate (stage 1: ground truth) or the predicted one.

        Returns:
            F^AT (B×C×h×w) and the predicted gate (B×1×h×w).
        """
        predicted = self.gate(f0)
        weight = predicted if gate is None else gate
        return f0 + weight * self.residual(f0), predicted


class AmplifiedFeatures(list):
    """The advanced teacher's levels F^AT (the list), with the vanilla levels F⁰ and the
    predicted gates attached for the gate and amplification scorers and the stage-1 loss."""

    def __init__(self, levels: Features, vanilla: Features, gates: Features) -> None:
        super().__init__(levels)
        self.vanilla = vanilla
        self.gates = gates


class AdvancedTeacher(Teacher):
    """A frozen encoder with RAA side branches (``raa``; None = the vanilla teacher)."""

    def __init__(self, extractor: FeatureExtractor, raa: nn.ModuleList | None) -> None:
        super().__init__()
        self.extractor = extractor
        self.raa = raa

    def amplify(self, images: Tensor, gates: Sequence[Tensor] | None = None) -> AmplifiedFeatures:
        """F^AT of every level (with gradients into the RAA modules).

        Args:
            images: B×3×H×W in [0, 1].
            gates: per level B×1×h×w gates to use instead of the predicted ones (stage 1).
        """
        with torch.no_grad():
            vanilla = self.extractor(images)
        if self.raa is None:
            return AmplifiedFeatures(vanilla, vanilla, [])
        levels, predicted = [], []
        for i, (f0, module) in enumerate(zip(vanilla, self.raa, strict=True)):
            f_at, a = module(f0, None if gates is None else gates[i])
            levels.append(f_at)
            predicted.append(a)
        return AmplifiedFeatures(levels, vanilla, predicted)

    @torch.no_grad()
    def forward(self, batch: Batch) -> Features:
        return self.amplify(batch["image"])


# -- student: ReverseStudent (rd.py) for the default; none for the teacher-only scorers -------
class NoStudent(Student):
    """For the gate / amplification scorers, which need no student (stage 2 is skipped)."""

    def forward(self, batch: Batch, targets: Features) -> Features:
        return []


# -- scorers ----------------------------------------------------------------------------------
class TeacherOnlyScorer(Scorer):
    """Maps from the advanced teacher alone: ``gate`` = Σ_levels of the predicted gates;
    ``amplification`` = Σ_levels 1 − cos(F⁰, F^AT) (the official stage-1 evaluation)."""

    def __init__(self, source: str, cfg: Any) -> None:
        """``cfg``: the method's ``scorer`` block (as :meth:`SummedLevelScorer.from_config`)."""
        super().__init__()
        self.source = source
        self.blur = GaussianBlur(float(cfg.sigma), border=str(cfg.get("blur_border", "mirror")))
        self.reduction = str(cfg.reduction)
        self.align_corners = bool(cfg.get("align_corners", False))

    def forward(self, targets: Features, preds: Features, batch: Batch) -> tuple[Tensor, Tensor]:
        size = batch["image"].shape[-2:]
        if self.source == "gate":
            levels = [
                resize(a.float(), size, self.align_corners)
                for a in cast(AmplifiedFeatures, targets).gates
            ]
        else:
            levels = [
                resize(cosine_distance(f0.float(), f.float()), size, self.align_corners)
                for f0, f in zip(cast(AmplifiedFeatures, targets).vanilla, targets, strict=True)
            ]
        maps = self.blur(torch.stack(levels).sum(dim=0))
        return maps, reduce_map(maps, self.reduction)


# -- stage 1: anomaly amplification -----------------------------------------------------------
def level_mask(mask: Tensor, size: Sequence[int], threshold: float = 0.3) -> Tensor:
    """A pixel mask at a feature level: average-pooled to ``size``, then > threshold (official
    ``AdaptiveAvgPool2d`` + ``mask_thresh``). B×1×H×W → B×1×h×w in {0, 1}."""
    return (
        F.adaptive_avg_pool2d(mask.float(), cast(tuple[int, int], tuple(size))) > threshold
    ).float()


def focal_loss(gate: Tensor, target: Tensor, alpha: float = 0.8, gamma: float = 2.0) -> Tensor:
    """Official ``BCEFocalLoss`` on probabilities: mean of
    −α(1−a)^γ·y·log a − (1−α)·a^γ·(1−y)·log(1−a). The gate is clamped away from 0 and 1 so the
    logs stay finite (the official code does not clamp)."""
    a = gate.clamp(1e-6, 1 - 1e-6)
    loss = -alpha * (1 - a) ** gamma * target * torch.log(a) - (1 - alpha) * a**gamma * (
        1 - target
    ) * torch.log(1 - a)
    return loss.mean()


def _positions(x: Tensor) -> Tensor:
    """B×C×h×w → (B·h·w)×C."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _sample(count: int, limit: int, device: torch.device) -> Tensor:
    return torch.randperm(count, device=device)[:limit]


def amplification_loss(
    f0: Tensor,
    f_at: Tensor,
    anomalous: Tensor,
    foreground: Tensor,
    margin: float = 0.3,
    max_normal: int = 5000,
    max_anomalous: int = 1000,
) -> Tensor:
    """Push amplified anomalous features away from normal ones beyond a dynamic margin.

    With up to ``max_normal`` random normal foreground positions i and ``max_anomalous`` random
    anomalous positions j: mean ReLU(cos(F⁰_i, F^AT_j) − (cos(F⁰_i, F⁰_j) − margin)); the margin
    is dynamic because it starts from the vanilla teacher's own similarity of each pair.

    Args:
        f0, f_at: B×C×h×w vanilla and amplified features.
        anomalous, foreground: B×1×h×w level masks in {0, 1}.

    Returns:
        A scalar; 0 when the level has no anomalous or no normal foreground position.
    """
    a = anomalous.flatten().bool()
    normal = (~a) & foreground.flatten().bool()
    if not a.any() or not normal.any():
        return f_at.sum() * 0.0
    v0, vat = _positions(f0), _positions(f_at)
    n_idx = normal.nonzero().squeeze(1)
    a_idx = a.nonzero().squeeze(1)
    n_idx = n_idx[_sample(n_idx.numel(), max_normal, n_idx.device)]
    a_idx = a_idx[_sample(a_idx.numel(), max_anomalous, a_idx.device)]
    ref = F.normalize(v0[n_idx], dim=1)
    vanilla_sim = ref @ F.normalize(v0[a_idx], dim=1).T
    amplified_sim = ref @ F.normalize(vat[a_idx], dim=1).T
    return F.relu(amplified_sim - (vanilla_sim - margin)).mean()


ANOMALIES = "anomalies"  # the stage-1 stream of synthetic anomalies of the training images


class AnomalyAmplificationLoss:
    """Stage-1 loss: Σ_levels focal(gate, ground truth) + weight · Σ_levels amplification loss,
    on the batch's synthetic anomalies (the stage's derived stream ``batch["streams"]
    ["anomalies"]``: image, exact mask, foreground); F^AT uses the ground-truth gate (official
    code)."""

    def __init__(
        self,
        mask_threshold: float = 0.3,
        focal_alpha: float = 0.8,
        focal_gamma: float = 2.0,
        weight: float = 0.1,
        margin: float = 0.3,
        max_normal: int = 5000,
        max_anomalous: int = 1000,
    ) -> None:
        self.mask_threshold = mask_threshold
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.weight = weight
        self.margin = margin
        self.max_normal = max_normal
        self.max_anomalous = max_anomalous

    def __call__(self, method: Method, batch: Batch) -> dict[str, Tensor]:
        synth = batch["streams"][ANOMALIES]
        teacher = cast(AdvancedTeacher, method.teacher)
        with torch.no_grad():
            vanilla = teacher.extractor(synth["image"])
        sizes = [f.shape[-2:] for f in vanilla]
        targets = [level_mask(synth["mask"], s, self.mask_threshold) for s in sizes]
        foregrounds = [level_mask(synth["foreground"], s, self.mask_threshold) for s in sizes]
        focal, amplify = [], []
        for f0, module, y, fg in zip(
            vanilla, cast(nn.ModuleList, teacher.raa), targets, foregrounds, strict=True
        ):
            f_at, gate = module(f0, y.to(f0.dtype))
            focal.append(focal_loss(gate, y, self.focal_alpha, self.focal_gamma))
            amplify.append(
                amplification_loss(
                    f0, f_at, y, fg, self.margin, self.max_normal, self.max_anomalous
                )
            )
        focal_total, amplify_total = torch.stack(focal).sum(), torch.stack(amplify).sum()
        return {
            "loss": focal_total + self.weight * amplify_total,
            "focal": focal_total.detach(),
            "amplification": amplify_total.detach(),
            "anomalous_share": synth["mask"].mean(),
        }


# -- stage 2: normality distillation ----------------------------------------------------------
def hard_distillation_loss(t: Tensor, s: Tensor, top_k: int = 10) -> Tensor:
    """HKD: mean over the batch of the mean of the ``top_k`` largest per-position 1 − cos."""
    distance = cosine_distance(t, s).flatten(1)
    return distance.topk(min(top_k, distance.shape[1]), dim=1).values.mean()


def normality_distillation_loss(
    method: Method, batch: Batch, top_k: int = 10, hkd_weight: float = 1.0
) -> dict[str, Tensor]:
    """Σ_levels flat-map cosine (RD's code) + hkd_weight · HKD (official ``loss_fucntion``)."""
    targets = method.teacher(batch)
    preds = method.student(batch, targets)
    flat = torch.stack([flat_cosine_loss(t, s) for t, s in zip(targets, preds, strict=True)]).sum()
    if hkd_weight == 0:
        return {"loss": flat, "cosine": flat.detach()}
    hard = torch.stack(
        [hard_distillation_loss(t, s, top_k) for t, s in zip(targets, preds, strict=True)]
    ).sum()
    return {"loss": flat + hkd_weight * hard, "cosine": flat.detach(), "hkd": hard.detach()}


def multistep_at_fractions(
    optimizer: torch.optim.Optimizer,
    epochs: int,
    fractions: Sequence[float] = (0.8, 0.9),
    gamma: float = 0.2,
    cap: int | None = None,
) -> torch.optim.lr_scheduler.MultiStepLR:
    """MultiStepLR with milestones at fractions of the epochs actually run (min(epochs, cap)),
    so a shortened schedule keeps the official shape (×0.2 at 80 % and 90 %)."""
    run = min(int(epochs), int(cap)) if cap else int(epochs)
    # Equal milestones (very short runs) stay twice: MultiStepLR then applies γ² there.
    milestones = sorted(max(1, int(f * run + 1e-9)) for f in fractions)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=gamma)


# -- build ------------------------------------------------------------------------------------
SCORES = ("student", "gate", "amplification")


def _check(cfg: DictConfig) -> None:
    if cfg.score not in SCORES:
        raise StadError(
            f"method.score={cfg.score!r} is unknown; use student (paper), gate or amplification"
        )
    if not cfg.raa and cfg.score != "student":
        raise IncompatibleError(
            f"method.score={cfg.score} reads the RAA modules, but method.raa=false removes them; "
            "use method.score=student with raa=false"
        )


def anomaly_source(cfg: DictConfig) -> dict[str, Any]:
    """Stage 1's stream: the training images with DRAEM-style anomalies (official
    ``SynthesisDataset.augment_image``), which the runner draws per batch from (seed, epoch)."""
    return {
        "kind": "synthetic_anomalies",
        "synthesis": cast(dict[str, Any], OmegaConf.to_container(cfg.synthesis, resolve=True)),
        "size": int(cfg.synthesis_size),
        "category": cfg.get("category"),
    }


def build(cfg: DictConfig, backbone: DictConfig) -> Method:
    """AAND from ``conf/method/aand.yaml`` and a backbone config."""
    _check(cfg)
    layers = list(cfg.layers)
    base, weights = pretrained_teacher(backbone.name, layers, backbone.weights)
    extractor = base.extractor
    raa = None
    raa_init = str(cfg.get("raa_init", "default"))  # runs saved before the switch: PyTorch's init
    if cfg.raa:
        raa = nn.ModuleList(
            ResidualAmplifier(
                c,
                int(cfg.memory_size),
                float(cfg.temperature),
                int(cfg.hidden_max),
                raa_init,
            )
            for c in extractor.channels
        )
    teacher = AdvancedTeacher(extractor, raa)
    stages: list[Stage] = []
    info: dict[str, Any] = {
        "teacher_weights": weights.as_dict(),
        "layers": layers,
        "raa": bool(cfg.raa),
        "hkd": bool(cfg.hkd),
        "score": str(cfg.score),
        "gaussian_sigma": float(cfg.scorer.sigma),
        "score_reduction": cfg.scorer.reduction,
    }
    if raa is not None:
        amp = cfg.amplification
        amplify_loss = AnomalyAmplificationLoss(
            mask_threshold=float(cfg.mask_threshold),
            focal_alpha=float(amp.focal_alpha),
            focal_gamma=float(amp.focal_gamma),
            weight=float(amp.weight),
            margin=float(amp.margin),
            max_normal=int(amp.max_normal),
            max_anomalous=int(amp.max_anomalous),
        )
        amplify = Stage.from_config("amplify", cfg.stages.amplify, ["teacher.raa"], amplify_loss)
        amplify.streams[ANOMALIES] = Stream(anomaly_source(cfg))
        stages.append(amplify)
        info.update(memory_size=int(cfg.memory_size), margin=float(amp.margin), raa_init=raa_init)
    if cfg.score == "student":
        student: Student = reverse_student(
            extractor.channels, extractor.strides, resnet_layout(backbone.name)
        )
        scorer: Scorer = SummedLevelScorer.from_config(cosine_distance, cfg.scorer)
        hkd_weight = float(cfg.distillation.hkd_weight) if cfg.hkd else 0.0
        top_k = int(cfg.distillation.top_k)
        distill_loss = partial(normality_distillation_loss, top_k=top_k, hkd_weight=hkd_weight)
        stages.append(Stage.from_config("distill", cfg.stages.distill, ["student"], distill_loss))
        info.update(top_k=top_k, hkd_weight=hkd_weight)
    else:
        student = NoStudent()
        scorer = TeacherOnlyScorer(str(cfg.score), cfg.scorer)
    return Method(teacher, student, scorer, stages, info=info)
