"""Parity of stad's DeSTSeg preset (MVTec AD, ResNet-18, 256 px) with the official code.

    PYTHONPATH=/tmp/parity-extra-destseg python benchmarks/official_parity.py --method destseg \\
        --official /path/to/ml-destseg

``--official`` is a checkout of github apple/ml-destseg. ``model/`` needs only torch and timm
(stad has both) once ``model/metrics.py`` (evaluation metrics on anomalib 0.4; stad's metrics
are checked apart) is replaced by an empty module. ``data/data_utils.py`` imports cv2 and
imgaug at module level: cv2 from a scratch folder (``pip install --no-deps --target
/tmp/parity-extra-destseg opencv-python-headless``); imgaug 0.4.0 does not import under NumPy 2
(``np.sctypes``), so the harness puts a stand-in module in its place, which only lets
``data_utils`` import. The one imgaug call, the rotation of the Perlin noise, is left out on
both sides (the blend row gives both the same thresholded noise) and is not compared.

Both sides are built at random initialisation (the official ``TeacherNet`` asks timm for
``pretrained=True``, which the harness turns into ``pretrained=False``: nothing downloads).
BatchNorm layers get random affine parameters and statistics from one training-mode pass; the
official tensors are copied into stad by an explicit key map. Rows: parameter counts; one step
of each stage of ``train.py``'s loop (stage 1: student in training mode on the corrupted image,
cosine loss against the teacher on the clean one, student gradients; stage 2: student frozen in
evaluation mode, focal + L1 loss of the segmentation output against the synthetic mask resized
to 64 px, segmentation gradients), with the same corrupted images and masks on both sides;
evaluation as ``eval.py`` (teacher and student features, segmentation output, the map at 256 px,
the image score = mean of the 100 largest pixels, and the DeST product map); the losses on
crafted inputs; the Perlin noise (``rand_perlin_2d_np``) on the same lattice gradients and the
anomaly blend (``perlin_noise``) on the same noise, texture and opacity.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import official_parity as op
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor, nn

from stad.core import StageModule
from stad.data.streams import build_derived_stream
from stad.methods.destseg import cosine_loss, focal_loss, level_distance
from stad.synthesis import AnomalySynthesizer, TextureSource, perlin_noise

Report = op.Report

PRESET = ["+experiment=destseg_mvtec", "backbone.weights=random"]
MODEL_MODULES = ["model", "model.model_utils", "model.destseg", "model.losses"]
_DECODER = {
    "decoder_layer4": "0",
    "decoder_layer3": "1",
    "decoder_layer2": "2",
    "decoder_layer1": "3",
}
_CONV_NORM = {"conv": "0", "norm": "1"}


def destseg_key_map(key: str) -> str | None:
    """The official DeSTSeg modules (teacher_net, student_net, segmentation_net) → stad."""
    prefix, rest = key.split(".", 1)
    if prefix == "teacher_net":
        return f"teacher.extractor.model.{rest.removeprefix('encoder.')}"
    if prefix == "student_net":
        if rest.startswith("encoder."):
            return f"student.encoder.model.{rest.removeprefix('encoder.')}"
        layer, index, tail = rest.split(".", 2)
        block = op._block_key(tail)
        return f"student.decoder.stages.{_DECODER[layer]}.{index}.{block}" if block else None
    part, tail = rest.split(".", 1)  # segmentation_net.res.* / segmentation_net.head.*
    if part == "res":
        index, inner = tail.split(".", 1)
        block = op._block_key(inner)
        return f"scorer.segmentation.res.{index}.{block}" if block else None
    if not tail.startswith("0."):
        return f"scorer.segmentation.head.{tail}"  # head.1 conv, head.2 bn, head.4 conv
    aspp = tail.removeprefix("0.")
    if aspp.startswith("aspp_fusion_layer."):
        layer, name = aspp.removeprefix("aspp_fusion_layer.").split(".", 1)
        return f"scorer.segmentation.head.0.fuse.{_CONV_NORM[layer]}.{name}"
    branch, inner = aspp.removeprefix("aspp_feature_extractors.").split(".", 1)
    if branch == "0":  # Sequential(AdaptiveAvgPool2d, ConvNormAct2d): pool, conv, bn in stad
        inner = inner.removeprefix("1.")
        layer, name = inner.split(".", 1)
        return f"scorer.segmentation.head.0.branches.0.{int(_CONV_NORM[layer]) + 1}.{name}"
    layer, name = inner.split(".", 1)
    return f"scorer.segmentation.head.0.branches.{branch}.{_CONV_NORM[layer]}.{name}"


@contextlib.contextmanager
def _without(*names: str) -> Iterator[None]:
    """Empty stand-ins for official modules the harness does not use: ``model/__init__.py``
    imports ``model.metrics``, which needs anomalib 0.4's ``anomalib.utils.metrics``."""
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)


@contextlib.contextmanager
def _no_download() -> Iterator[None]:
    """The official ``TeacherNet`` builds ``timm.create_model("resnet18", pretrained=True)``."""
    original = timm.create_model

    def create(*args: Any, **kwargs: Any) -> nn.Module:
        kwargs["pretrained"] = False
        return original(*args, **kwargs)

    with mock.patch.object(timm, "create_model", create):
        yield


def _data_utils(root: Path, report: Report) -> Any:
    """The official ``data/data_utils.py``, with a stand-in for imgaug when it does not import."""
    try:
        import imgaug.augmenters  # noqa: F401
    except Exception as err:  # imgaug 0.4.0 fails under NumPy 2 with an AttributeError
        for name in [n for n in sys.modules if n == "imgaug" or n.startswith("imgaug.")]:
            sys.modules.pop(name)
        stub = types.ModuleType("imgaug")
        augmenters = types.ModuleType("imgaug.augmenters")

        class _Identity:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                pass

            def __call__(self, images: Any) -> Any:
                return images

        augmenters.Sequential = _Identity  # type: ignore[attr-defined]
        augmenters.Affine = _Identity  # type: ignore[attr-defined]
        stub.augmenters = augmenters  # type: ignore[attr-defined]
        sys.modules["imgaug"], sys.modules["imgaug.augmenters"] = stub, augmenters
        report.notes.append(
            f"imgaug does not import here ({type(err).__name__}: {err}); a stand-in lets "
            "data_utils import (its noise rotation is not compared)"
        )
    try:
        with op.official_imports(root, ["data", "data.data_utils"]) as mods:
            return mods["data.data_utils"]
    except SystemExit as err:
        report.notes.append(f"data/data_utils.py not importable ({err}): synthesis not compared")
        return None


def destseg_parity(root: Path, size: int, n: int, tolerance: float) -> Report:
    """Every DeSTSeg row (module docstring) for a batch of ``n`` images of ``size`` px."""
    report = op.Report("destseg", tolerance)
    with (
        _without("model.metrics"),
        op.official_imports(root, MODEL_MODULES) as mods,
        _no_download(),
    ):
        torch.manual_seed(0)
        official = mods["model.destseg"].DeSTSeg(dest=True, ed=True)
        losses = mods["model.losses"]
        l2_normalize = mods["model.model_utils"].l2_normalize
    method, cfg = op.stad_method([*PRESET, f"image_size={size}"])
    report.notes.append(f"official revision {op.revision(root)}; image {size} px, batch {n}")
    images = op.batch_images(size, n)
    x = op.normalised(images, method.teacher.extractor)

    def calibrate() -> None:  # every BatchNorm sees one batch in training mode
        t = [l2_normalize(f) for f in official.teacher_net.encoder(x)]
        s = [l2_normalize(f) for f in official.student_net(x)]
        products = [
            F.interpolate(-a * b, size=s[0].shape[2:], mode="bilinear", align_corners=False)
            for a, b in zip(t, s, strict=True)
        ]
        official.segmentation_net(torch.cat(products, dim=1))

    parts = [official.teacher_net.encoder, official.student_net, official.segmentation_net]
    op.randomise_batchnorm(parts, calibrate)
    modules = {
        "teacher_net": official.teacher_net,
        "student_net": official.student_net,
        "segmentation_net": official.segmentation_net,
    }
    unused, _ = op.copy_by_key_map(method, modules, destseg_key_map)
    report.notes.append(f"official tensors stad does not use: {op._summary(unused)}")
    report.count("teacher (layer1..3)", op.count(method.teacher), op.count(official.teacher_net))
    report.count(
        "student encoder", op.count(method.student.encoder), op.count(official.student_net.encoder)
    )
    report.count(
        "student decoder",
        op.count(method.student.decoder),
        op._count_prefix(official.student_net, "encoder."),
    )
    report.count(
        "segmentation network", op.count(method.scorer), op.count(official.segmentation_net)
    )
    synth = _synthetic_batch(method, images)
    _training_rows(report, method, official, losses, images, synth)
    _evaluation_rows(report, method, official, images, x, cfg)
    _crafted_loss_rows(report, losses, l2_normalize)
    data_utils = _data_utils(root, report)
    if data_utils is not None:
        _synthesis_rows(report, data_utils, size, cfg)
    return report


def _synthetic_batch(method: Any, images: Tensor) -> dict[str, Tensor]:
    """The preset's stage-2 stream on the batch (seed 0, epoch 0), given to both sides."""
    stream = build_derived_stream(method.stages[1].streams["anomalies"].source, images.shape[-1], 0)
    stream.set_epoch(0)
    return stream({"image": images})


def _training_rows(
    report: Report,
    method: Any,
    official: nn.Module,
    losses: Any,
    images: Tensor,
    synth: dict[str, Tensor],
) -> None:
    extractor = method.teacher.extractor
    x = op.normalised(images, extractor)
    x_aug = op.normalised(synth["image"], extractor)
    batch = {"image": images, "streams": {"anomalies": synth}}
    share = float(synth["mask"].mean())
    report.notes.append(f"synthetic anomalies cover {share:.1%} of the batch's pixels")

    # stage 1 (global_step < de_st_steps): student train, segmentation eval, cosine loss
    official.student_net.train(), official.segmentation_net.eval()
    _, _, de_st_list = official(x_aug, x)
    cosine = losses.cosine_similarity_loss(de_st_list)
    cosine.backward()
    denoise = method.stages[0]
    module = StageModule(method, denoise).train()
    ours = denoise.loss(method, batch)
    ours["loss"].backward()
    report.compare("stage 1 loss (cosine, Σ batch)", ours["loss"], cosine)
    report.compare(
        "stage 1 gradients (student)",
        op._grads(method.student, ("encoder", "decoder")),
        op._official_grads(method.student, {"student_net": official.student_net}, destseg_key_map),
    )
    method.zero_grad(set_to_none=True), official.zero_grad(set_to_none=True)
    del module

    # stage 2: student eval, segmentation train, focal (γ = 4) + L1 on the 64-px mask
    official.student_net.eval(), official.segmentation_net.train()
    segmentation, _, _ = official(x_aug, x)
    mask = F.interpolate(
        synth["mask"], size=segmentation.shape[2:], mode="bilinear", align_corners=False
    )
    mask = torch.where(mask < 0.5, torch.zeros_like(mask), torch.ones_like(mask))
    focal = losses.focal_loss(segmentation, mask, gamma=4)
    l1 = losses.l1_loss(segmentation, mask)
    (focal + l1).backward()
    segment = method.stages[1]
    module = StageModule(method, segment).train()
    ours = segment.loss(method, batch)
    ours["loss"].backward()
    report.compare("stage 2 focal loss", ours["focal"], focal)
    report.compare("stage 2 L1 loss", ours["l1"], l1)
    report.compare("stage 2 loss (focal + L1)", ours["loss"], focal + l1)
    seg = method.scorer.segmentation
    report.compare(
        "stage 2 gradients (segmentation network)",
        op._grads(seg, ("res", "head")),
        op._official_grads(
            seg,
            {"segmentation_net": official.segmentation_net},
            destseg_key_map,
            strip="scorer.segmentation.",
        ),
    )
    method.zero_grad(set_to_none=True), official.zero_grad(set_to_none=True)
    del module


def _evaluation_rows(
    report: Report, method: Any, official: nn.Module, images: Tensor, x: Tensor, cfg: Any
) -> None:
    method.eval(), official.eval()
    batch = {"image": images}
    size = images.shape[-2:]
    with torch.no_grad():
        seg_official, de_st_official, _ = official(x)
        teacher = official.teacher_net(x)
        student = official.student_net(x)
        targets = method.teacher(batch)
        preds = method.student(batch, targets)
        segmentation = method.scorer.segment(targets, preds)
        maps, scores = method(batch)
        de_st = method.scorer.denoising_map(targets, preds)
    report.compare("teacher features", list(targets), list(teacher))
    report.compare("student features (decoder)", list(preds), list(student))
    report.compare("segmentation output (64 px)", segmentation, seg_official)
    # eval.py: bilinear to the mask size, image score = mean of the T = 100 largest pixels
    final = F.interpolate(seg_official, size=size, mode="bilinear", align_corners=False)
    top = torch.sort(final.view(final.size(0), -1), dim=1, descending=True)[0][:, :100]
    report.compare("anomaly map (256 px)", maps, final)
    report.compare("image score (mean of top 100)", scores, top.mean(dim=1))
    report.compare("DeST map (product of levels, 64 px)", de_st, de_st_official, used=False)
    report.notes.append(f"stad scorer: reduction {cfg.method.scorer.reduction}")


def _crafted_loss_rows(report: Report, losses: Any, l2_normalize: Any) -> None:
    """Both losses on inputs where every term is active (probabilities near 0 and 1)."""
    g = torch.Generator().manual_seed(7)
    probs = torch.rand(3, 1, 16, 16, generator=g).pow(3)
    probs[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 1e-8, 1 - 1e-7])
    target = (torch.rand(3, 1, 16, 16, generator=g) > 0.7).float()
    report.compare(
        "focal loss, crafted (γ = 4, α = −1)",
        focal_loss(probs, target, 4.0),
        losses.focal_loss(probs, target, gamma=4),
    )
    report.compare(
        "focal loss, crafted (γ = 2, α = 0.25)",
        focal_loss(probs, target, 2.0, 0.25),
        losses.focal_loss(probs, target, alpha=0.25, gamma=2),
    )
    t = [torch.randn(4, c, s, s, generator=g) for c, s in ((8, 8), (16, 4), (32, 2))]
    s_ = [a + torch.randn(a.shape, generator=g) for a in t]
    # DeSTSeg.forward's a_map on the official l2_normalize
    from_official = [
        1 - torch.sum(l2_normalize(a) * l2_normalize(b), dim=1, keepdim=True)
        for a, b in zip(t, s_, strict=True)
    ]
    report.compare(
        "cosine loss, crafted (batch 4)",
        cosine_loss(t, s_),
        losses.cosine_similarity_loss(from_official),
    )
    report.compare(
        "per-level 1 − cos maps, crafted",
        [level_distance(a, b) for a, b in zip(t, s_, strict=True)],
        from_official,
    )


class _Given(TextureSource):
    """A texture source that returns the given textures."""

    def __init__(self, textures: Tensor) -> None:
        self.textures = textures

    def sample(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return self.textures


def _synthesis_rows(report: Report, data_utils: Any, size: int, cfg: Any) -> None:
    # Perlin noise on the same lattice gradients (np.random.rand → the torch generator's draws)
    ours_noise, theirs_noise = [], []
    for scales in ((1, 1), (2, 8), (32, 4), (32, 32)):
        g = torch.Generator().manual_seed(sum(scales))
        ours_noise.append(perlin_noise((size, size), scales, g))
        replay = torch.Generator().manual_seed(sum(scales))

        def rand(*shape: int, replay: torch.Generator = replay) -> np.ndarray:
            return torch.rand(*shape, generator=replay).double().numpy()

        with mock.patch.object(data_utils.np.random, "rand", rand):
            theirs_noise.append(
                torch.from_numpy(data_utils.rand_perlin_2d_np((size, size), scales))
            )
    report.compare("Perlin noise, same gradients (2^0..2^5 scales)", ours_noise, theirs_noise)

    # the blend on one noise, texture and opacity (rotation: identity on both sides)
    n, seed = 2, 11
    gen = torch.Generator().manual_seed(5)
    pixels = (torch.rand(n, 3, size, size, generator=gen) * 255).round().to(torch.uint8)
    texture = (torch.rand(n, 3, size, size, generator=gen) * 255).round().to(torch.uint8)
    noise = torch.stack(
        [perlin_noise((size, size), (4, 4), torch.Generator().manual_seed(i)) for i in range(n)]
    )
    # the preset's settings (opacity, clean share, augmentations, threshold), given textures
    settings = OmegaConf.to_container(cfg.method.synthesis, resolve=True)
    assert isinstance(settings, dict)
    options = {str(k): v for k, v in settings.items() if k not in ("texture", "foreground")}
    synthesizer = AnomalySynthesizer(_Given(texture.float() / 255), seed=seed, **options)
    blob = (noise > synthesizer.threshold).float()[:, None]
    with mock.patch("stad.synthesis.perlin_masks", return_value=blob.clone()):
        ours = synthesizer(pixels.float() / 255)
    replay = torch.Generator().manual_seed(seed)  # AnomalySynthesizer's draws, in its order
    torch.rand(n, generator=replay)  # clean images
    for _ in range(n):
        torch.randperm(10, generator=replay)  # texture augmentations (the preset applies none)
    beta = torch.rand(n, generator=replay)  # opacity / 0.8
    theirs_images, theirs_masks = [], []
    for i in range(n):
        draws = iter([beta[i : i + 1], torch.zeros(1)])  # beta, then "no_anomaly" (≤ 1.0)
        with (
            mock.patch.object(data_utils, "rand_perlin_2d_np", lambda *a, i=i: noise[i].numpy()),
            mock.patch.object(data_utils, "rot", lambda images: images),
            mock.patch.object(data_utils.torch, "rand", lambda *a, draws=draws: next(draws)),
        ):
            image = Image.fromarray(pixels[i].permute(1, 2, 0).numpy())
            dtd = Image.fromarray(texture[i].permute(1, 2, 0).numpy())
            aug, msk = data_utils.perlin_noise(image, dtd, aug_prob=1.0)
        theirs_images.append(torch.from_numpy(np.ascontiguousarray(aug)).permute(2, 0, 1))
        theirs_masks.append(torch.from_numpy(msk))
    report.compare("synthetic mask (noise > 0.5)", ours.mask, torch.stack(theirs_masks))
    report.compare("corrupted image (blend, β ~ U(0, 0.8))", ours.image, torch.stack(theirs_images))
