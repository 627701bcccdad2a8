"""EfficientAD (Batzner, Heckler, König, WACV 2024): a patch-description network (PDN) teacher,
a PDN student and an autoencoder.

The authors released no code; the defaults follow the widely used reference implementation
(github nelson1425/EfficientAD @fcab514, ``common.py``, ``efficientad.py``, ``pretraining.py``),
which reproduces the paper's table; its differences to the paper are noted in the yaml.

Teacher: a PDN (S: 4 convolutions, M: 6; 384 channels, 33×33 receptive field), pretrained by
distilling a frozen backbone's PatchCore-style descriptors (WideResNet-101 layers 2+3 in the
paper) on natural images, the method's pretraining step (cached by its settings), or loaded
from ``teacher.weights``. Its outputs are normalised per channel by their mean/std over the
training images, fitted before training (a calibration pass).
Student: a PDN with 768 channels (the first 384 regress the teacher, the last 384 the
autoencoder) and the convolutional autoencoder; losses: hard-feature loss (squared differences
at or above their 0.999 quantile), the penalty on images from a natural-image folder (the
stage's auxiliary stream), the autoencoder loss and the student-autoencoder loss.
Scorer: local map (teacher vs the first student half) and global map (autoencoder vs the second
half), each mapped by 0.1·(m − q_a)/(q_b − q_a) with its 0.9 and 0.995 quantiles over held-out
normal training images (the calibration after training), averaged; padded by 4 (the PDN has no
padding), resized to the input; image score = max.
Stage: one stage of 70 000 steps at batch 1, Adam, learning rate ×0.1 after 95 %.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from stad.backbones import create_feature_extractor, loading_checkpoint
from stad.core import (
    Batch,
    Calibration,
    Features,
    Method,
    PretrainData,
    Scorer,
    Stage,
    Stream,
    Student,
    Teacher,
)
from stad.errors import StadError, WeightsError
from stad.fileio import is_image_file
from stad.methods.common import reduce_map

# The same ImageNet normalisation and offline natural images as Uninformed Students.
from stad.methods.us_pretrain import files_digest, natural_images, normalize

log = logging.getLogger("stad")


# -- networks (layer order = the reference's nn.Sequential indices, so its files load) ----------
def pdn(size: str, out_channels: int, padding: bool = False) -> nn.Sequential:
    """The patch-description network: ``small`` (PDN-S) or ``medium`` (PDN-M).

    ``padding`` is the pretraining variant (64×64 outputs for 256-px inputs); the teacher and
    student of training have none (56×56), as the reference's ``get_pdn_*``.
    """
    p = 1 if padding else 0
    if size == "small":
        return nn.Sequential(
            nn.Conv2d(3, 128, 4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(128, 256, 4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(256, 256, 3, padding=p),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, out_channels, 4),
        )
    if size == "medium":
        return nn.Sequential(
            nn.Conv2d(3, 256, 4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(256, 512, 4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(512, 512, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(512, 512, 3, padding=p),
            nn.ReLU(inplace=True),
            nn.Conv2d(512, out_channels, 4),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 1),
        )
    raise StadError(f"method.size={size!r}: use small (EfficientAD-S) or medium (EfficientAD-M)")


def pdn_output_size(image_size: int) -> int:
    """Side of an unpadded PDN's output (S and M alike): 56 for 256-px inputs."""
    return (((image_size - 3) // 2 - 3) // 2) - 2 - 3


class Autoencoder(nn.Module):
    """The paper's convolutional autoencoder: 6 strided convolutions down to 1×1, then bilinear
    upsampling to 3, 8, 15, 32, 63, 127 px, each followed by a convolution, and a last upsampling
    to the PDN's output side (56 px for 256-px inputs: the reference's fixed size) with two
    convolutions. Layer indices as the reference's nn.Sequential (``get_autoencoder``)."""

    def __init__(self, out_channels: int = 384) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 32), (32, 32), (32, 64), (64, 64), (64, 64)):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(64, 64, 8))
        for size in (3, 8, 15, 32, 63, 127):
            layers += [
                nn.Upsample(size=size, mode="bilinear"),
                nn.Conv2d(64, 64, 4, stride=1, padding=2),
                nn.ReLU(inplace=True),
                nn.Dropout(0.2),
            ]
        self.last_upsample = len(layers)  # its size follows the input (56 at 256 px)
        layers += [
            nn.Identity(),
            nn.Conv2d(64, 64, 3, stride=1, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, out_channels, 3, stride=1, padding=1),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if min(h, w) < 256:
            raise StadError(
                f"efficientad: {h}×{w} images, but the autoencoder's encoder (5 stride-2 "
                "convolutions, then an 8×8 one) needs at least 256 px (the paper's size); set "
                "image_size=256"
            )
        for k, layer in enumerate(self.layers):
            if k == self.last_upsample:
                size = (pdn_output_size(int(h)), pdn_output_size(int(w)))
                x = F.interpolate(x, size=size, mode="bilinear")
            else:
                x = layer(x)
        return x


# -- teacher ----------------------------------------------------------------------------------
class PDNTeacher(Teacher):
    """Frozen pretrained PDN; outputs normalised by their per-channel training statistics."""

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Sequential, channels: int) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def raw(self, images: Tensor) -> Tensor:
        """Unnormalised PDN outputs of [0, 1] images."""
        return self.net(normalize(images))

    def describe(self, images: Tensor) -> Tensor:
        """(PDN(x) − μ) / σ per channel."""
        return (self.raw(images) - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def forward(self, batch: Batch) -> Features:
        return [self.describe(batch["image"])]


class TeacherStatistics(Calibration):
    """Per-channel mean and std of the teacher's outputs over the training images, fitted
    before training (reference: ``teacher_normalization``; its mean of per-image means equals
    the pooled mean for equally sized images, and so does its variance)."""

    name = "teacher_statistics"
    data = "train"
    fits = ("teacher",)

    def reset(self, method: Method) -> None:
        self.sums: Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def update(self, method: Method, batch: Batch) -> None:
        out = cast(PDNTeacher, method.teacher).raw(batch["image"]).double()
        flat = out.transpose(0, 1).flatten(1)
        sums = torch.stack([flat.sum(1), flat.pow(2).sum(1)])
        self.sums = sums if self.sums is None else self.sums + sums
        self.count += flat.shape[1]

    def finish(self, method: Method) -> None:
        if self.sums is None:
            raise StadError("efficientad: the teacher statistics saw no training image")
        mean = self.sums[0] / self.count
        var = (self.sums[1] / self.count - mean.pow(2)).clamp(min=0.0)
        teacher = cast(PDNTeacher, method.teacher)
        teacher.mean.copy_(mean.float())
        teacher.std.copy_(var.sqrt().float().clamp(min=1e-12))


# -- student ----------------------------------------------------------------------------------
class StudentAndAutoencoder(Student):
    """A PDN with 2 × 384 outputs and the autoencoder; predictions: [student's first half,
    student's second half, autoencoder]."""

    def __init__(self, student: nn.Sequential, ae: Autoencoder, channels: int) -> None:
        super().__init__()
        self.student = student
        self.autoencoder = ae
        self.channels = channels

    def forward(self, batch: Batch, targets: Features) -> Features:
        x = normalize(batch["image"])
        out = self.student(x)
        return [out[:, : self.channels], out[:, self.channels :], self.autoencoder(x)]


# -- scorer -----------------------------------------------------------------------------------
MAPS = ("combined", "local", "global")


def local_and_global(targets: Features, preds: Features) -> tuple[Tensor, Tensor]:
    """Raw local (teacher vs student) and global (autoencoder vs student) maps, B×1×h×w."""
    st, ae_half, ae = preds
    local = (targets[0] - st).pow(2).mean(dim=1, keepdim=True)
    global_ = (ae - ae_half).pow(2).mean(dim=1, keepdim=True)
    return local, global_


class EfficientADScorer(Scorer):
    """0.5 · normalised local map + 0.5 · normalised global map, padded and resized."""

    q_local: Tensor
    q_global: Tensor

    def __init__(self, maps: str = "combined", pad: int = 4, reduction: str = "max") -> None:
        super().__init__()
        if maps not in MAPS:
            raise StadError(f"method.scorer.maps={maps!r}: use one of {', '.join(MAPS)}")
        self.maps, self.pad, self.reduction = maps, pad, reduction
        # (q_start, q_end) per map; (0, 0.1) leaves a map as it is (0.1·(m − 0)/0.1).
        self.register_buffer("q_local", torch.tensor([0.0, 0.1]))
        self.register_buffer("q_global", torch.tensor([0.0, 0.1]))

    @staticmethod
    def _scaled(m: Tensor, q: Tensor) -> Tensor:
        return 0.1 * (m - q[0]) / (q[1] - q[0])

    def forward(self, targets: Features, preds: Features, batch: Batch) -> tuple[Tensor, Tensor]:
        local, global_ = local_and_global(targets, preds)
        local, global_ = self._scaled(local, self.q_local), self._scaled(global_, self.q_global)
        if self.maps == "local":
            maps = local
        elif self.maps == "global":
            maps = global_
        else:
            maps = 0.5 * local + 0.5 * global_
        maps = F.pad(maps, (self.pad,) * 4)
        maps = F.interpolate(maps, size=batch["image"].shape[-2:], mode="bilinear")
        return maps, reduce_map(maps, self.reduction)


class MapQuantiles(Calibration):
    """The 0.9 and 0.995 quantiles of the raw local and global maps over held-out normal
    training images (reference: ``map_normalization``); never test images."""

    def __init__(self, start: float = 0.9, end: float = 0.995) -> None:
        self.start, self.end = start, end

    def reset(self, method: Method) -> None:
        self.local: list[Tensor] = []
        self.global_: list[Tensor] = []

    @torch.no_grad()
    def update(self, method: Method, batch: Batch) -> None:
        targets = method.teacher(batch)
        local, global_ = local_and_global(targets, method.student(batch, targets))
        self.local.append(local.float().cpu())
        self.global_.append(global_.float().cpu())

    def finish(self, method: Method) -> None:
        if not self.local:
            raise StadError("efficientad: the map normalisation saw no held-out image")
        q = torch.tensor([self.start, self.end])
        scorer = cast(EfficientADScorer, method.scorer)
        for name, maps in (("q_local", self.local), ("q_global", self.global_)):
            values = torch.quantile(torch.cat(maps).flatten(), q)
            getattr(scorer, name).copy_(values.to(getattr(scorer, name)))
        method.info["map_quantiles"] = {
            "local": scorer.q_local.tolist(),
            "global": scorer.q_global.tolist(),
            "images": sum(len(m) for m in self.local),
        }


# -- losses -----------------------------------------------------------------------------------
def augment_for_autoencoder(images: Tensor, strength: float = 0.2) -> Tensor:
    """One of brightness, contrast or saturation jitter by a factor U(1 ± strength) per image
    (the reference's RandomChoice of three ColorJitters, here on the resized tensor)."""
    from torchvision.transforms.v2 import functional as TF

    out = []
    for image in images:
        kind = int(torch.randint(3, ()))
        factor = float(torch.empty(()).uniform_(1 - strength, 1 + strength))
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)[kind]
        out.append(adjust(image, factor))
    return torch.stack(out)


def random_grayscale(
    images: Tensor, probability: float, generator: torch.Generator | None = None
) -> Tensor:
    """Each image in ITU-R 601 luma on all three channels with ``probability`` (torchvision's
    RandomGrayscale, per image of the batch)."""
    gray = (images * images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
    pick = torch.rand(images.shape[0], generator=generator, device=images.device) < probability
    return torch.where(pick.view(-1, 1, 1, 1), gray.expand_as(images), images)


def penalty_images(images: Tensor, size: int, grayscale: float) -> Tensor:
    """Grayscale with probability ``grayscale`` (per image), then the centre ``size`` crop
    (reference: Resize(2·size), RandomGrayscale(0.3), CenterCrop(size))."""
    images = random_grayscale(images, grayscale)
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def hard_feature_loss(distance: Tensor, quantile: float) -> Tensor:
    """Mean of the squared differences at or above their ``quantile`` (the hard features)."""
    threshold = torch.quantile(distance.detach().flatten().float(), quantile)
    return distance[distance >= threshold].mean()


def efficientad_loss(
    method: Method,
    batch: Batch,
    quantile: float = 0.999,
    penalty_size: int = 256,
    grayscale: float = 0.3,
    jitter: float = 0.2,
) -> dict[str, Tensor]:
    """L_hard + L_penalty + L_ae + L_stae (reference ``efficientad.py``, ``main``)."""
    teacher = cast(PDNTeacher, method.teacher)
    student = cast(StudentAndAutoencoder, method.student)
    images = batch["image"]
    with torch.no_grad():
        target = teacher.describe(images)
    st = student.student(normalize(images))[:, : student.channels]
    hard = hard_feature_loss((target - st).pow(2), quantile)
    losses = {"hard": hard.detach()}
    total = hard
    penalty_batch = batch.get("streams", {}).get("penalty")
    if penalty_batch is not None:
        pen = penalty_images(penalty_batch["image"], penalty_size, grayscale)
        penalty = student.student(normalize(pen))[:, : student.channels].pow(2).mean()
        total = total + penalty
        losses["penalty"] = penalty.detach()
    augmented = augment_for_autoencoder(images, jitter)
    ae = student.autoencoder(normalize(augmented))
    with torch.no_grad():
        target_ae = teacher.describe(augmented)
    st_ae = student.student(normalize(augmented))[:, student.channels :]
    loss_ae = (target_ae - ae).pow(2).mean()
    loss_stae = (ae - st_ae).pow(2).mean()
    losses.update(ae=loss_ae.detach(), stae=loss_stae.detach())
    return {"loss": total + loss_ae + loss_stae, **losses}


def step_lr_at_fraction(
    optimizer: torch.optim.Optimizer,
    steps: int,
    fraction: float = 0.95,
    gamma: float = 0.1,
    cap: int | None = None,
) -> torch.optim.lr_scheduler.StepLR:
    """StepLR dropping by ``gamma`` after ``fraction`` of the steps actually run (min(steps,
    cap)), so a capped schedule keeps the reference's shape (×0.1 at 95 %)."""
    run = min(int(steps), int(cap)) if cap and int(cap) > 0 else int(steps)
    return torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(1, int(fraction * run)), gamma=gamma
    )


# -- teacher pretraining (the method's pretraining step) ------------------------------------
def patch_descriptors(levels: Sequence[Tensor], channels: int, pre_dim: int = 1024) -> Tensor:
    """PatchCore-style targets (reference ``pretraining.py``, ``FeatureExtractor.embed``): per
    level, every position's 3×3 neighbourhood (zero-padded) flattened and average-pooled to
    ``pre_dim`` values, deeper levels' patches bilinearly resized to the first level's grid;
    both pooled together to ``channels``. Returns B×channels×H×W at the first level's size."""
    h, w = levels[0].shape[-2:]
    per_level = []
    for feat in levels:
        b, c, fh, fw = feat.shape
        patches = F.unfold(feat, kernel_size=3, padding=1).view(b, c * 9, fh, fw)
        if (fh, fw) != (h, w):
            patches = F.interpolate(patches, size=(h, w), mode="bilinear", align_corners=False)
        flat = patches.permute(0, 2, 3, 1).reshape(-1, 1, c * 9)
        per_level.append(F.adaptive_avg_pool1d(flat, pre_dim).squeeze(1))
    stacked = torch.stack(per_level, dim=1).reshape(-1, 1, len(levels) * pre_dim)
    pooled = F.adaptive_avg_pool1d(stacked, channels).reshape(-1, h, w, channels)
    return pooled.permute(0, 3, 1, 2)


def pretraining_settings(cfg: DictConfig, backbone: DictConfig) -> dict[str, Any]:
    """Everything the pretrained teacher depends on (its cache key)."""
    t = cfg.teacher
    return {
        "size": str(cfg.size),
        "channels": int(cfg.channels),
        "source": {"name": str(backbone.name), "weights": str(backbone.weights)},
        "layers": list(t.layers),
        "images": files_digest(natural_images(cfg)),
        "schedule": OmegaConf.to_container(
            OmegaConf.masked_copy(
                t, ["steps", "batch_size", "seed", "extractor_size", "pdn_size", "grayscale"]
            ),
            resolve=True,
        ),
        "optimizer": OmegaConf.to_container(t.optimizer, resolve=True),
        "normalisation_images": int(t.normalisation_images),
    }


def teacher_cache_path(cfg: DictConfig, backbone: DictConfig) -> Path:
    settings = pretraining_settings(cfg, backbone)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Path(str(cfg.teacher.cache_dir)).expanduser() / f"efficientad_{cfg.size}_{key}.pt"


class _Images(torch.utils.data.Dataset):
    """Natural images at the extractor's size (the PDN sees them resized to ``pdn_size``)."""

    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        from PIL import Image

        with Image.open(self.files[index]) as opened:
            img = opened.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
            array = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return array.view(self.size, self.size, 3).permute(2, 0, 1).float() / 255.0


def _endless(loader: torch.utils.data.DataLoader) -> Any:
    while True:
        yield from loader


def channel_statistics(batches: Iterable[Tensor], images: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std, pooled over positions and images, of the first B×C×H×W
    batches that hold at least ``images`` images; both 1×C×1×1 (reference
    ``feature_normalization``: the mean of per-batch means, equal to the pooled mean for equal
    batches; its variance pass reads the *next* batches of its endless loader, stad's the same
    ones: docs/parity.md)."""
    total: Tensor | None = None
    squares: Tensor | None = None
    count, seen = 0, 0
    for batch in batches:
        flat = batch.double().transpose(0, 1).flatten(1)
        total = flat.sum(1) if total is None else total + flat.sum(1)
        squares = flat.pow(2).sum(1) if squares is None else squares + flat.pow(2).sum(1)
        count += flat.shape[1]
        seen += batch.shape[0]
        if seen >= images:
            break
    if total is None or squares is None:
        raise StadError("efficientad: no image for the teacher pretraining's target statistics")
    mean = (total / count).float().view(1, -1, 1, 1)
    std = (squares / count - (total / count).pow(2)).clamp(min=1e-12).sqrt().float()
    return mean, std.view(1, -1, 1, 1)


def distil_teacher(cfg: DictConfig, backbone: DictConfig) -> tuple[nn.Sequential, dict]:
    """Train the teacher PDN (with padding, as the reference's pretraining) to regress the
    normalised patch descriptors of the frozen backbone on natural images; returns the network
    and what the record says about it."""
    t = cfg.teacher
    generator = torch.Generator().manual_seed(int(t.seed))
    torch.manual_seed(int(t.seed))
    extractor, weights = create_feature_extractor(
        str(backbone.name), list(t.layers), str(backbone.weights), frozen=True
    )
    extractor.eval()
    net = pdn(str(cfg.size), int(cfg.channels), padding=True)
    files = natural_images(cfg)
    loader = torch.utils.data.DataLoader(
        _Images(files, int(t.extractor_size)),
        batch_size=int(t.batch_size),
        shuffle=True,
        generator=generator,
        drop_last=len(files) >= int(t.batch_size),
    )
    batches = _endless(loader)

    def views(images: Tensor) -> tuple[Tensor, Tensor]:
        # The same grayscale draw for both views (reference: applied before both transforms).
        images = random_grayscale(images, float(t.grayscale), generator)
        small = F.interpolate(images, size=int(t.pdn_size), mode="bilinear", antialias=True)
        return images, small

    channels = int(cfg.channels)

    @torch.no_grad()
    def target_of(images: Tensor) -> Tensor:
        return patch_descriptors(extractor(images), channels)

    # Target statistics over the first images (reference: feature_normalization, 10 000).
    targets = (target_of(views(next(batches))[0]) for _ in itertools.count())
    mean, std = channel_statistics(targets, int(t.normalisation_images))
    from hydra.utils import instantiate

    optimizer = instantiate(t.optimizer)(net.parameters())
    start, last = time.perf_counter(), float("nan")
    net.train()
    # A bar on a terminal (tqdm: Lightning's dependency), none in logs and CI (disable=None).
    from tqdm.auto import tqdm

    bar = tqdm(
        range(int(t.steps)), desc="efficientad: teacher pretraining", unit="step", disable=None
    )
    for step in bar:
        big, small = views(next(batches))
        target = (target_of(big) - mean) / std
        pred = net(normalize(small))
        if pred.shape[-2:] != target.shape[-2:]:
            raise StadError(
                f"efficientad: the PDN gives {tuple(pred.shape[-2:])} outputs for "
                f"{t.pdn_size}-px images but the backbone's descriptors are "
                f"{tuple(target.shape[-2:])} for {t.extractor_size}-px images; keep "
                "extractor_size = 2 × pdn_size with a stride-8 first level (method.teacher.layers)"
            )
        loss = (target - pred).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        last = float(loss.detach())
        bar.set_postfix(loss=f"{last:.4f}", refresh=False)
        if step % 100 == 0:
            log.info("efficientad: teacher pretraining step %d/%d, loss %.4f", step, t.steps, last)
    info = {
        "seconds": round(time.perf_counter() - start, 1),
        "steps": int(t.steps),
        "final_loss": last,
        "images": len(files),
        "distilled_from": weights.as_dict(),
    }
    return net.eval(), info


def load_reference_weights(path: Path, size: str, channels: int) -> dict[str, Tensor]:
    """A teacher state dict saved by the reference implementation (``teacher_small.pth``:
    ``torch.save(pdn.state_dict())`` of its nn.Sequential), checked against stad's PDN.

    Raises:
        WeightsError: the file is missing, unreadable, or its keys or shapes do not fit.
    """
    if not path.is_file():
        raise WeightsError(f"method.teacher.weights={path} does not exist; give a PDN state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(
            f"method.teacher.weights={path} cannot be read as a state dict ({err}); save it with "
            "torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    want = pdn(size, channels).state_dict()
    got = {k.removeprefix("net."): v for k, v in dict(state).items()}
    wrong = [k for k in want if k not in got or tuple(got[k].shape) != tuple(want[k].shape)]
    extra = [k for k in got if k not in want]
    if wrong or extra:
        raise WeightsError(
            f"method.teacher.weights={path} does not fit the {size} PDN with {channels} "
            f"channels: missing or mis-shaped {wrong[:4]}, unexpected {extra[:4]}; use a "
            f"teacher_{size}.pth of the same size (method.size)"
        )
    return {k: got[k] for k in want}


def pretrain(cfg: DictConfig, backbone: DictConfig, data: PretrainData) -> dict[str, Path]:
    """The method's pretraining step: the teacher PDN's file, distilled on a cache miss, or the
    user's ``teacher.weights`` (checked, no training)."""
    if cfg.teacher.weights:
        path = Path(str(cfg.teacher.weights)).expanduser()
        load_reference_weights(path, str(cfg.size), int(cfg.channels))
        return {"teacher": path}
    path = teacher_cache_path(cfg, backbone)
    if path.is_file():
        return {"teacher": path}
    log.info("efficientad: pretraining the %s teacher (%d steps)", cfg.size, cfg.teacher.steps)
    with torch.random.fork_rng(devices=[]):
        net, info = distil_teacher(cfg, backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": net.state_dict(), "info": json.dumps(info)}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
    return {"teacher": path}


def _teacher_net(cfg: DictConfig, pretrained: dict[str, Path]) -> tuple[nn.Sequential, dict]:
    net = pdn(str(cfg.size), int(cfg.channels))
    path = pretrained.get("teacher")
    if loading_checkpoint() or path is None:
        return net, {"source": "checkpoint"}
    if cfg.teacher.weights:
        net.load_state_dict(load_reference_weights(path, str(cfg.size), int(cfg.channels)))
        return net, {"source": "file", "path": str(path)}
    saved = torch.load(path, map_location="cpu", weights_only=True)
    # The distilled PDN has padding; the unpadded training PDN has the same parameters.
    net.load_state_dict(saved["state_dict"])
    return net, {"source": "distilled", "path": str(path), **json.loads(saved["info"])}


# -- build ------------------------------------------------------------------------------------
def _penalty_stream(cfg: DictConfig, image_size: int) -> dict[str, Stream]:
    root = cfg.penalty.root
    if not root:
        return {}
    folder = Path(str(root)).expanduser()
    if not folder.is_dir() or not any(is_image_file(p) for p in folder.rglob("*")):
        raise StadError(
            f"method.penalty.root={folder} holds no readable image; give an ImageNet- or "
            "Imagenette-style folder, or method.penalty.root=null to train without the penalty"
        )
    source = {"kind": "folder", "root": str(folder), "size": 2 * image_size}
    return {"penalty": Stream(source, batch_size=int(cfg.penalty.batch_size))}


def build(cfg: DictConfig, backbone: DictConfig, pretrained: dict[str, Path]) -> Method:
    """EfficientAD from ``conf/method/efficientad.yaml``; ``backbone`` is the distillation
    source of the teacher pretraining, ``pretrained`` its cached file."""
    channels = int(cfg.channels)
    net, teacher_info = _teacher_net(cfg, pretrained)
    teacher = PDNTeacher(net, channels)
    student_net = pdn(str(cfg.size), 2 * channels)
    student = StudentAndAutoencoder(student_net, Autoencoder(channels), channels)
    sc = cfg.scorer
    scorer = EfficientADScorer(str(sc.maps), int(sc.pad), str(sc.reduction))
    image_size = int(cfg.image_size)
    loss = partial(
        efficientad_loss,
        quantile=float(cfg.loss.hard_quantile),
        penalty_size=image_size,
        grayscale=float(cfg.penalty.grayscale),
        jitter=float(cfg.loss.ae_jitter),
    )
    stage = Stage.from_config(
        "train",
        cfg.stages.train,
        trainable=["student"],
        loss=loss,
        streams=_penalty_stream(cfg, image_size),
    )
    quantiles = MapQuantiles(float(cfg.scorer.q_start), float(cfg.scorer.q_end))
    info: dict[str, Any] = {
        "size": str(cfg.size),
        "teacher": teacher_info,
        "penalty": str(cfg.penalty.root) if cfg.penalty.root else None,
        "maps": str(cfg.scorer.maps),
        "score_reduction": str(cfg.scorer.reduction),
    }
    return Method(
        teacher, student, scorer, [TeacherStatistics(), stage], info=info, calibration=quantiles
    )
