"""Uninformed Students' teacher pretraining (Bergmann et al., CVPR 2020), apart from the method:
per patch size p, a patch network learns from random p×p crops of natural images to give, through
a linear decoder, an ImageNet network's pooled descriptor of the crop (L_k), with a
decorrelation loss (L_c) and an optional triplet loss (L_m). One Lightning stage per scale; the
result is cached by a hash of every setting it depends on and reused by every run
(``python -m stad.pretrain method=us``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from stad.backbones import create_classifier, loading_checkpoint
from stad.core import Batch, Method, PretrainData, Stage, StageModule
from stad.core import Teacher as TeacherBase
from stad.errors import DatasetError, StadError
from stad.fileio import is_image_file, list_images
from stad.methods.patchnet import PatchNet

log = logging.getLogger("stad")

# Patch networks see ImageNet-normalised images (teacher, students and pretraining crops alike).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Folders with more images than this are decoded on access instead of kept in memory.
PRELOAD_LIMIT = 2000


def normalize(images: Tensor) -> Tensor:
    """B×3×H×W in [0, 1] → ImageNet-normalised."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def patch_net(p: int, cfg: DictConfig) -> PatchNet:
    """A randomly initialised patch network with the method's architecture settings."""
    return PatchNet(
        p,
        int(cfg.descriptor_dim),
        width=float(cfg.width),
        slope=float(cfg.leaky_slope),
        padding=str(cfg.padding),
        # Runs saved before the switch existed had a linear descriptor layer.
        descriptor_activation=bool(cfg.get("descriptor_activation", False)),
    )


# -- teacher pretraining: crops of natural images ----------------------------------------------
def natural_images(cfg: DictConfig) -> list[Path]:
    """Natural images for the pretraining: ``teacher.pretrain_images`` (any folder, searched
    recursively; ImageNet in the paper), else scikit-image's bundled images (offline)."""
    folder = cfg.teacher.pretrain_images
    if folder:
        folder = Path(str(folder)).expanduser()
        files = sorted(p for p in folder.rglob("*") if is_image_file(p)) if folder.is_dir() else []
        if not files:
            raise StadError(
                f"method.teacher.pretrain_images={folder} holds no images (.png/.jpg/...); give a "
                "folder of natural images (ImageNet in the paper), or null for the offline default"
            )
        return files
    with resources.as_file(resources.files("skimage.data")) as bundled:
        # Its .tif files are multi-page stacks, not photographs.
        files = [f for f in list_images(Path(bundled)) if f.suffix in (".png", ".jpg")]
    if not files:
        raise StadError(
            "scikit-image's bundled images are missing; set "
            "method.teacher.pretrain_images=/path/to/natural/images"
        )
    return files


def uses_train_images(cfg: DictConfig) -> bool:
    """Whether the offline source also crops the dataset's own training images (stad's option,
    off by default: the paper's teacher never sees the target data)."""
    return not cfg.teacher.pretrain_images and bool(cfg.teacher.include_train_images)


def crop_sources(cfg: DictConfig, data: PretrainData) -> list[Path]:
    """Every image file the teacher is pretrained on."""
    files = natural_images(cfg)
    if uses_train_images(cfg):
        files += data.training_images("method.teacher.include_train_images=true")
    return files


def files_digest(files: list[Path]) -> dict[str, Any]:
    """Count and sha256 of the files' names and sizes (a cache key's image entry)."""
    names = "\n".join(f"{f.name}:{f.stat().st_size}" for f in files)
    return {"count": len(files), "sha256": hashlib.sha256(names.encode()).hexdigest()}


class ImageSource:
    """RGB images by index: kept in memory (shorter side ≤ ``max_side``) or decoded on access."""

    def __init__(self, files: list[Path], max_side: int) -> None:
        self.files = files
        self.max_side = max_side
        self._images = [self._load(f) for f in files] if len(files) <= PRELOAD_LIMIT else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Image.Image:
        return self._images[index] if self._images is not None else self._load(self.files[index])

    def _load(self, path: Path) -> Image.Image:
        try:
            with Image.open(path) as img:
                img.draft("RGB", (self.max_side, self.max_side))  # JPEG: decode at reduced size
                rgb = img.convert("RGB")
        except (OSError, ValueError) as err:
            raise DatasetError(
                f"cannot read pretraining image {path}: {err}; remove it from the folder"
            ) from None
        scale = self.max_side / min(rgb.size)
        if scale < 1:
            size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
            rgb = rgb.resize(size, Image.Resampling.BILINEAR)
        return rgb


class NaturalCrops(Dataset):
    """Random p×p crops (paper): the image zoomed so its shorter side is in [4p, 16p], then a
    random p×p window; with triplets also a positive (shifted by up to ±(p−1)/4, Gaussian noise,
    sometimes greyscale) and a negative (another random crop). Deterministic per index."""

    def __init__(
        self,
        images: ImageSource,
        p: int,
        length: int,
        crops: DictConfig,
        seed: int,
        triplet: bool = False,
    ) -> None:
        self.images, self.p, self.length, self.crops, self.seed = images, p, length, crops, seed
        self.triplet = triplet

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([self.seed, index])
        img = self.images[int(rng.integers(len(self.images)))]
        box = self._box(img, rng)
        item = {"image": self._render(img, box)}
        if self.triplet:
            side = box[2] - box[0]
            shift = rng.uniform(-1, 1, size=2) * float(self.crops.shift) * (self.p - 1)
            dx, dy = shift * side / self.p
            moved = self._clamp(img, (box[0] + dx, box[1] + dy), side)
            positive = self._render(img, moved)
            positive = positive + float(self.crops.noise) * torch.randn(
                positive.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31)))
            )
            if rng.random() < float(self.crops.grey):
                positive = positive.mean(0, keepdim=True).expand(3, -1, -1)
            item["positive"] = positive.clamp(0, 1)
            other = self.images[int(rng.integers(len(self.images)))]
            item["negative"] = self._render(other, self._box(other, rng))
        return item

    def _box(self, img: Image.Image, rng: np.random.Generator) -> tuple[float, ...]:
        lo, hi = self.crops.zoom
        zoomed = rng.uniform(float(lo), float(hi)) * self.p  # shorter side after zooming
        side = min(min(img.size) * self.p / zoomed, min(img.size))
        x0 = rng.uniform(0, img.width - side)
        y0 = rng.uniform(0, img.height - side)
        return (x0, y0, x0 + side, y0 + side)

    @staticmethod
    def _clamp(img: Image.Image, corner: tuple[float, float], side: float) -> tuple[float, ...]:
        x0 = float(np.clip(corner[0], 0, img.width - side))
        y0 = float(np.clip(corner[1], 0, img.height - side))
        return (x0, y0, x0 + side, y0 + side)

    def _render(self, img: Image.Image, box: tuple[float, ...]) -> Tensor:
        crop = img.resize(
            (self.p, self.p),
            Image.Resampling.BILINEAR,
            box=cast(tuple[float, float, float, float], box),
        )
        return torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)


# -- teacher pretraining: network, losses, cache ----------------------------------------------
class PooledDescriptor(nn.Module):
    """Frozen ImageNet classifier → its pooled pre-logits descriptor (ResNet-18: 512-d)."""

    model: Any  # a timm classifier (forward_features, forward_head)
    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        cfg = cast(dict[str, Any], model.pretrained_cfg)
        # Channels-last: EfficientNet's depthwise convolutions run ~2x faster on CPUs.
        self.model = model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.dim = int(cast(int, model.num_features))

    def train(self, mode: bool = True) -> PooledDescriptor:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """B×3×p×p in [0, 1], fed unresized → B×D."""
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        features = self.model.forward_features(x)
        return self.model.forward_head(features, pre_logits=True)


class DistillationNet(TeacherBase):
    """Pretraining: patch network T̂, linear decoder D (d → D) and the frozen target P."""

    def __init__(self, net: PatchNet, target: PooledDescriptor) -> None:
        super().__init__()
        self.net = net
        self.decoder = nn.Linear(net.out_channels, target.dim)
        self.target = target


DECORRELATION_MODES = ("signed", "abs", "squared")


def decorrelation_loss(desc: Tensor, mode: str = "signed") -> Tensor:
    """L_c over the off-diagonal d×d correlations c_ij of the descriptor *dimensions* across the
    batch: ``signed`` Σ_{i≠j} c_ij (the paper's text), ``abs`` Σ |c_ij|, ``squared`` Σ c_ij²
    (the cited L2-Net's penalty).

    The signed sum equals 1ᵀC1 − d, so its minimum −d is reached whenever the standardised
    dimensions sum to zero for every sample, e.g. by a rank-1 collapse onto ± one direction:
    it does not decorrelate. The other two are zero exactly when C is the identity.

    Args:
        desc: B×d descriptors.
    """
    z = desc - desc.mean(0, keepdim=True)
    z = z / (z.pow(2).mean(0, keepdim=True).sqrt() + 1e-6)
    corr = z.T @ z / desc.shape[0]
    if mode not in DECORRELATION_MODES:
        raise StadError(
            f"method.teacher.loss.decorrelation_mode={mode!r}: use one of {DECORRELATION_MODES}"
        )
    if mode == "abs":
        corr = corr.abs()
    elif mode == "squared":
        corr = corr.pow(2)
    return corr.sum() - corr.diagonal().sum()


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """Triplet loss with the hardest of the two negatives (anchor swap), batch mean."""
    d_pos = (anchor - positive).pow(2).sum(1)
    d_neg = torch.minimum((anchor - negative).pow(2).sum(1), (positive - negative).pow(2).sum(1))
    return F.relu(margin + d_pos - d_neg).mean()


def pretraining_loss(method: Method, batch: Batch, loss: DictConfig) -> dict[str, Tensor]:
    """λ_k·L_k + λ_m·L_m + λ_c·L_c on a batch of crops."""
    t = cast(DistillationNet, method.teacher)
    desc = t.net(normalize(batch["image"]))
    distill = (t.decoder(desc) - t.target(batch["image"])).pow(2).sum(1).mean()
    decor = decorrelation_loss(desc, str(loss.decorrelation_mode))
    total = float(loss.distill) * distill + float(loss.decorrelation) * decor
    out = {"distill": distill.detach(), "decorrelation": decor.detach()}
    if float(loss.triplet) > 0:
        pos = t.net(normalize(batch["positive"]))
        neg = t.net(normalize(batch["negative"]))
        trip = triplet_loss(desc, pos, neg, float(loss.margin))
        total = total + float(loss.triplet) * trip
        out["triplet"] = trip.detach()
    return {"loss": total, **out}


def pretraining_settings(
    p: int, cfg: DictConfig, backbone: DictConfig, data: PretrainData
) -> dict[str, Any]:
    """Everything the pretrained teacher of scale p depends on (its cache key)."""
    t = cfg.teacher
    train = data.training_images("include_train_images") if uses_train_images(cfg) else None
    return {
        "p": p,
        "architecture": {
            **{k: cfg[k] for k in ("descriptor_dim", "width", "leaky_slope")},
            "descriptor_activation": bool(cfg.get("descriptor_activation", False)),
        },
        "target": {"name": str(backbone.name), "weights": str(backbone.weights)},
        "images": files_digest(natural_images(cfg)),
        "train_data": files_digest(train) if train else None,
        "schedule": OmegaConf.to_container(
            OmegaConf.masked_copy(t, ["steps", "batch_size", "seed", "max_side", "optimizer"]),
            resolve=True,
        ),
        "loss": OmegaConf.to_container(t.loss, resolve=True),
        "crops": OmegaConf.to_container(t.crops, resolve=True),
    }


def teacher_path(p: int, cfg: DictConfig, backbone: DictConfig, data: PretrainData) -> Path:
    """Cache file of the pretrained teacher of scale p for these settings."""
    settings = pretraining_settings(p, cfg, backbone, data)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Path(str(cfg.teacher.cache_dir)).expanduser() / f"us_teacher_p{p}_{key}.pt"


def pretrain_teacher(
    p: int, cfg: DictConfig, backbone: DictConfig, data: PretrainData
) -> tuple[PatchNet, dict]:
    """Train the patch network of scale p on natural-image crops (a Lightning stage)."""
    t = cfg.teacher
    model, weights = create_classifier(str(backbone.name), str(backbone.weights))
    torch.manual_seed(int(t.seed) + p)
    net = DistillationNet(patch_net(p, cfg), PooledDescriptor(model))
    stage = Stage(
        name=f"teacher_pretraining_p{p}",
        epochs=1,
        trainable=["teacher.net", "teacher.decoder"],
        loss=partial(pretraining_loss, loss=t.loss),
        optimizer=instantiate(t.optimizer),
    )
    method = Method(net, nn.Identity(), nn.Identity(), [stage])
    crops = NaturalCrops(
        ImageSource(crop_sources(cfg, data), int(t.max_side)),
        p,
        int(t.steps) * int(t.batch_size),
        t.crops,
        int(t.seed),
        triplet=float(t.loss.triplet) > 0,
    )
    loader = DataLoader(crops, batch_size=int(t.batch_size), num_workers=int(t.num_workers))
    trainer = L.Trainer(
        accelerator=str(t.accelerator),
        devices=1,
        max_epochs=1,
        max_steps=int(t.steps),
        logger=False,
        enable_checkpointing=False,
        # Lightning's bar on a terminal only (log files and CI stay clean).
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    log.info(
        "us: pretraining the p=%d teacher (%d steps on %d images)", p, t.steps, len(crops.images)
    )
    trainer.fit(StageModule(method, stage), train_dataloaders=loader)
    losses = {k: float(v) for k, v in trainer.callback_metrics.items()}
    info = {
        "seconds": round(time.perf_counter() - start, 1),
        "steps": trainer.global_step,
        "final_losses": losses,
        "target_weights": weights.as_dict(),
    }
    return net.net.cpu(), info


def pretrain_scale(p: int, cfg: DictConfig, backbone: DictConfig, data: PretrainData) -> Path:
    """The cache file of the pretrained teacher of scale p, pretraining it on a miss."""
    path = teacher_path(p, cfg, backbone, data)
    if path.is_file():
        return path
    # Its own random stream: a cache miss must not change the students' initialisation.
    with torch.random.fork_rng(devices=[]):
        trained, info = pretrain_teacher(p, cfg, backbone, data)
    saved = {"state_dict": trained.state_dict(), "info": json.dumps(info)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(saved, tmp)
    os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
    log.info("us: saved the p=%d teacher to %s", p, path)
    return path


def pretrain(cfg: DictConfig, backbone: DictConfig, data: PretrainData) -> dict[str, Path]:
    """The method's pretraining step (stad.methods.pretrain_method; ``python -m stad.pretrain
    method=us``): the cached teachers of every configured scale by name, pretrained on a miss."""
    return {f"p{p}": pretrain_scale(int(p), cfg, backbone, data) for p in cfg.scales}


def load_teacher(p: int, cfg: DictConfig, path: Path | None) -> tuple[PatchNet, dict]:
    """The pretrained teacher of scale p from its cache file (``path``, from :func:`pretrain`);
    an untrained network when a checkpoint will provide the weights (``path`` None).

    Raises:
        StadError: the cache file is missing.
    """
    net = patch_net(p, cfg)
    if loading_checkpoint() or path is None:
        return net, {"cache": "checkpoint"}
    if not path.is_file():
        raise StadError(
            f"us: the pretrained p={p} teacher {path} is missing; pretrain it with "
            "python -m stad.pretrain method=us (python -m stad does so itself)"
        )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(saved["state_dict"])
    return net, {"path": str(path), **json.loads(saved["info"])}
