"""Uninformed Students (Bergmann et al., CVPR 2020): patch-descriptor teacher, student ensembles.

Teacher: per patch size p ∈ {17, 33, 65} a patch network (patchnet.py) pretrained on random p×p
crops of natural images to distil an ImageNet network's pooled descriptor through a linear
decoder, with a decorrelation loss (and an optional triplet loss). Pretraining is its own
module (``us_pretrain.py``) and command (``python -m stad.pretrain method=us``); its result is
cached by a hash of its settings and reused. On the target data the teacher runs densely (one
descriptor per pixel) and its descriptors are normalised per channel by their mean/std over the
training images (a statistics pass, the first stage).
Students: per scale M randomly initialised copies of the architecture regress the normalised
teacher descriptors (one stage per scale).
Scorer: per pixel the regression error e = ‖mean_i S_i − ŷ‖² and the predictive variance
v = mean_i ‖S_i − mean_j S_j‖², each standardised by its mean/std over normal validation images
(the Calibration, fitted after training), ẽ + ṽ averaged over scales; image score = max.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from stad.core import Batch, Calibration, Features, Method, Scorer, Stage, Student
from stad.core import Teacher as TeacherBase
from stad.errors import StadError
from stad.methods.common import reduce_map
from stad.methods.patchnet import PatchNet

# pretrain: this method's pretraining step (stad.methods.build_method runs it before build).
from stad.methods.us_pretrain import (  # noqa: F401
    load_teacher,
    normalize,
    patch_net,
    pretrain,
)

log = logging.getLogger("stad")


# -- teacher ----------------------------------------------------------------------------------
class DescriptorStats(nn.Module):
    """Per-scale, per-channel mean/std of the teacher's descriptors over the training images.

    Fitted by the ``descriptor_stats`` calibration before the students train; identity until
    then.
    """

    count: Tensor
    total: Tensor
    squares: Tensor

    def __init__(self, scales: int, channels: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(scales, dtype=torch.float64))
        self.register_buffer("total", torch.zeros(scales, channels, dtype=torch.float64))
        self.register_buffer("squares", torch.zeros(scales, channels, dtype=torch.float64))

    @torch.no_grad()
    def update(self, index: int, desc: Tensor) -> None:
        """Accumulate B×d×H×W descriptors of scale ``index``."""
        flat = desc.transpose(0, 1).flatten(1).double()
        self.count[index] += flat.shape[1]
        self.total[index] += flat.sum(1)
        self.squares[index] += flat.pow(2).sum(1)

    def mean_std(self, index: int) -> tuple[Tensor, Tensor]:
        """(d,), (d,) float64; 0 and 1 before any update."""
        n = self.count[index].clamp(min=1)
        mean = self.total[index] / n
        var = (self.squares[index] / n - mean.pow(2)).clamp(min=1e-12)
        if self.count[index] == 0:
            return torch.zeros_like(mean), torch.ones_like(mean)
        return mean, var.sqrt()

    def normalize(self, index: int, desc: Tensor) -> Tensor:
        """(y − μ)/σ per channel of B×d×H×W."""
        mean, std = self.mean_std(index)
        shape = (1, -1, 1, 1)
        return (desc - mean.to(desc.dtype).view(shape)) / std.to(desc.dtype).view(shape)


class DenseTeacher(TeacherBase):
    """Frozen pretrained patch networks evaluated densely; normalised descriptors per scale."""

    def __init__(self, nets: list[PatchNet], tile: int | None = None) -> None:
        super().__init__()
        self.scales = [n.patch_size for n in nets]
        self.nets = nn.ModuleList(nets).requires_grad_(False)
        self.stats = DescriptorStats(len(nets), nets[0].out_channels)
        self.tile = tile

    @torch.no_grad()
    def descriptors(self, images: Tensor, index: int) -> Tensor:
        """Raw dense descriptors B×d×H×W of scale ``index`` for B×3×H×W images in [0, 1]."""
        return cast(PatchNet, self.nets[index]).dense(normalize(images), self.tile)

    def scale(self, batch: Batch, index: int) -> Tensor:
        """Normalised descriptors B×d×H×W of one scale."""
        return self.stats.normalize(index, self.descriptors(batch["image"], index))

    def forward(self, batch: Batch) -> Features:
        return [self.scale(batch, k) for k in range(len(self.scales))]


# -- students ---------------------------------------------------------------------------------
class StudentEnsemble(nn.Module):
    """M randomly initialised patch networks of one scale."""

    def __init__(self, nets: list[PatchNet], tile: int | None = None) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.tile = tile

    def forward(self, images: Tensor) -> Tensor:
        """B×3×H×W in [0, 1] → B×M×d×H×W (tiles only when not training)."""
        tile = None if self.training else self.tile
        x = normalize(images)
        return torch.stack(
            [net.dense(x, tile) for net in cast(Iterable[PatchNet], self.nets)], dim=1
        )


class EnsembleStudents(Student):
    """One StudentEnsemble per scale (``ensembles["17"]`` ...); predicts from the image."""

    def __init__(self, ensembles: dict[str, StudentEnsemble]) -> None:
        super().__init__()
        self.ensembles = nn.ModuleDict(ensembles)

    def forward(self, batch: Batch, targets: Features) -> Features:
        return [ens(batch["image"]) for ens in self.ensembles.values()]


# -- scorer -----------------------------------------------------------------------------------
def regression_error(target: Tensor, preds: Tensor) -> Tensor:
    """e = ‖mean_i S_i − ŷ‖² per pixel: target B×d×H×W, preds B×M×d×H×W → B×1×H×W."""
    return (preds.mean(1) - target).pow(2).sum(1, keepdim=True)


def predictive_variance(preds: Tensor) -> Tensor:
    """v = mean_i ‖S_i‖² − ‖mean_i S_i‖² per pixel: B×M×d×H×W → B×1×H×W.

    Computed on the deviations from the first student (a variance does not change under a
    shift), which keeps it accurate when students agree and exactly 0 when they are identical.
    """
    dev = preds - preds[:, :1]
    return (dev.pow(2).sum(2).mean(1) - dev.mean(1).pow(2).sum(1)).clamp(min=0).unsqueeze(1)


class EnsembleScorer(Scorer):
    """Standardised error plus standardised variance, averaged over scales.

    Buffers ``e_mean``, ``e_std``, ``v_mean``, ``v_std`` (one entry per scale) come from the
    calibration on normal validation images; before it, 0 and 1.
    """

    e_mean: Tensor
    e_std: Tensor
    v_mean: Tensor
    v_std: Tensor

    def __init__(self, scales: int, reduction: str = "max") -> None:
        super().__init__()
        self.reduction = reduction
        for name, value in (("e_mean", 0.0), ("e_std", 1.0), ("v_mean", 0.0), ("v_std", 1.0)):
            self.register_buffer(name, torch.full((scales,), value))

    def forward(self, targets: Features, preds: Features, batch: Batch) -> tuple[Tensor, Tensor]:
        maps = []
        for k, (t, s) in enumerate(zip(targets, preds, strict=True)):
            e = (regression_error(t, s) - self.e_mean[k]) / self.e_std[k]
            v = (predictive_variance(s) - self.v_mean[k]) / self.v_std[k]
            maps.append(e + v)
        score = torch.stack(maps).mean(0)
        return score, reduce_map(score, self.reduction)


class ScoreCalibration(Calibration):
    """Mean/std of e and v per scale over every pixel of the normal validation images."""

    def reset(self, method: Method) -> None:
        self.sums: Tensor | None = None  # scales × [n, Σe, Σe², Σv, Σv²]
        self.images = 0

    @torch.no_grad()
    def update(self, method: Method, batch: Batch) -> None:
        targets = method.teacher(batch)
        preds = method.student(batch, targets)
        rows = []
        for t, s in zip(targets, preds, strict=True):
            e, v = regression_error(t, s).double(), predictive_variance(s).double()
            n = torch.tensor(float(e.numel()), dtype=torch.float64, device=e.device)
            rows.append(torch.stack([n, e.sum(), e.pow(2).sum(), v.sum(), v.pow(2).sum()]))
        sums = torch.stack(rows)
        self.sums = sums if self.sums is None else self.sums + sums
        self.images += batch["image"].shape[0]

    def finish(self, method: Method) -> None:
        if self.sums is None:
            raise StadError("us: the calibration saw no validation image; set val_fraction > 0")
        n = self.sums[:, 0]
        scorer = method.scorer
        for col, name in ((1, "e"), (3, "v")):
            mean = self.sums[:, col] / n
            std = (self.sums[:, col + 1] / n - mean.pow(2)).clamp(min=1e-24).sqrt()
            getattr(scorer, f"{name}_mean").copy_(mean.float())
            getattr(scorer, f"{name}_std").copy_(std.float())
        method.info["calibration"] = {
            "images": self.images,
            **{k: getattr(scorer, k).tolist() for k in ("e_mean", "e_std", "v_mean", "v_std")},
        }


# -- stages -----------------------------------------------------------------------------------
def training_pixels(
    net: PatchNet, images: Tensor, sampling: str, crop: int | None
) -> Callable[[PatchNet, Tensor], Tensor]:
    """The pixels one training step regresses, as a function (patch network, normalised images)
    → descriptors, the same for the teacher and every student of the step.

    ``dense``: every pixel (paper), or a random ``crop``×``crop`` window of them when ``crop`` is
    set. ``grid``: the pixels of one random shift-and-stitch branch (every stride-th pixel at a
    random offset; an unbiased subsample of the dense loss at a fraction of its cost); networks
    without pooling fall back to ``dense``.
    """
    h, w = images.shape[-2:]
    if sampling == "grid" and net.stride > 1:
        oy, ox = (int(v) for v in torch.randint(net.stride, (2,)))
        return lambda n, x: n.grid(x, (oy, ox))
    if sampling not in ("grid", "dense"):
        raise StadError(f"method.students.sampling={sampling!r}: use dense (paper) or grid")
    if crop and crop < max(h, w):
        ch, cw = min(crop, h), min(crop, w)
        y, x0 = int(torch.randint(h - ch + 1, ())), int(torch.randint(w - cw + 1, ()))
        return lambda n, x: n.window(x, (y, x0), (ch, cw))
    return lambda n, x: n.dense(x)


class DescriptorStatsCalibration(Calibration):
    """The teacher's per-channel descriptor statistics over the training images (over the
    pixels the students' steps sample, :func:`training_pixels`), fitted before the students
    train: their regression targets are the normalised descriptors."""

    name = "descriptor_stats"
    data = "train"
    fits = ("teacher.stats",)

    def __init__(self, sampling: str = "dense", crop: int | None = None) -> None:
        self.sampling, self.crop = sampling, crop

    def reset(self, method: Method) -> None:
        stats = cast(DenseTeacher, method.teacher).stats
        for buffer in (stats.count, stats.total, stats.squares):
            buffer.zero_()

    @torch.no_grad()
    def update(self, method: Method, batch: Batch) -> None:
        teacher = cast(DenseTeacher, method.teacher)
        images = normalize(batch["image"])
        for k, net in enumerate(cast(Iterable[PatchNet], teacher.nets)):
            run = training_pixels(net, images, self.sampling, self.crop)
            teacher.stats.update(k, run(net, images))

    def finish(self, method: Method) -> None:
        if not bool((cast(DenseTeacher, method.teacher).stats.count > 0).all()):
            raise StadError("us: the descriptor statistics saw no training image")


def student_loss(
    method: Method, batch: Batch, index: int, sampling: str = "dense", crop: int | None = None
) -> dict[str, Tensor]:
    """Σ over the scale's students of the mean over pixels of ‖S_i − ŷ‖² (paper)."""
    teacher = cast(DenseTeacher, method.teacher)
    ensembles = cast(EnsembleStudents, method.student).ensembles
    students = cast(StudentEnsemble, list(ensembles.values())[index]).nets
    images = normalize(batch["image"])
    run = training_pixels(cast(PatchNet, teacher.nets[index]), images, sampling, crop)
    with torch.no_grad():
        target = teacher.stats.normalize(index, run(cast(PatchNet, teacher.nets[index]), images))
    preds = torch.stack([run(net, images) for net in cast(Iterable[PatchNet], students)], dim=1)
    per_student = (preds - target.unsqueeze(1)).pow(2).sum(2).mean(dim=(0, 2, 3))
    return {"loss": per_student.sum()}


# -- build ------------------------------------------------------------------------------------
def build(cfg: DictConfig, backbone: DictConfig, pretrained: dict[str, Path]) -> Method:
    """Uninformed Students from ``conf/method/us.yaml``; ``backbone`` is the distillation target
    of the teacher pretraining, ``pretrained`` its cached teachers by scale (:func:`pretrain`;
    empty when a checkpoint provides the weights)."""
    scales = [int(p) for p in cfg.scales]
    if not scales or len(set(scales)) != len(scales):
        raise StadError(f"method.scales={scales}: give distinct patch sizes from 17, 33, 65")
    tile = int(cfg.tile) if cfg.tile else None
    info: dict[str, Any]
    nets, pretraining = [], {}
    for p in scales:
        net, info = load_teacher(p, cfg, pretrained.get(f"p{p}"))
        nets.append(net)
        pretraining[f"p{p}"] = info
    teacher = DenseTeacher(nets, tile)
    ensembles = {
        str(p): StudentEnsemble([patch_net(p, cfg) for _ in range(int(cfg.students.count))], tile)
        for p in scales
    }
    student = EnsembleStudents(ensembles)
    sampling = str(cfg.students.sampling)
    crop = int(cfg.students.crop) if cfg.students.crop else None
    scorer = EnsembleScorer(len(scales), str(cfg.scorer.reduction))
    stages: Sequence[Stage | Calibration] = [DescriptorStatsCalibration(sampling, crop)] + [
        Stage.from_config(
            f"students_p{p}",
            cfg.stages.students,
            trainable=[f"student.ensembles.{p}"],
            loss=partial(student_loss, index=k, sampling=sampling, crop=crop),
        )
        for k, p in enumerate(scales)
    ]
    info = {
        # The weights the teachers were distilled from (recorded when they were pretrained).
        "teacher_weights": next(iter(pretraining.values())).get("target_weights"),
        "scales": scales,
        "students_per_scale": int(cfg.students.count),
        "descriptor_dim": int(cfg.descriptor_dim),
        "width": float(cfg.width),
        "teacher_pretraining": pretraining,
        "score_reduction": str(cfg.scorer.reduction),
    }
    return Method(teacher, student, scorer, stages, info=info, calibration=ScoreCalibration())
