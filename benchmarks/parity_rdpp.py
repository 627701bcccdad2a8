"""Parity of stad's RD++ preset (MVTec AD, Wide-ResNet-50-2, 256 px) with the official code.

    PYTHONPATH=/tmp/parity-extra-aand python benchmarks/official_parity.py --method rdpp \\
        --official /path/to/Revisiting-Reverse-Distillation

``--official`` is a checkout of github tientrandinh/Revisiting-Reverse-Distillation. Its
``utils/utils_test.py`` imports cv2 and pandas at module level (stad has neither): the scratch
folder of the AAND harness holds them (``pip install --no-deps --target /tmp/parity-extra-aand
opencv-python-headless pandas``). ``utils/utils_train.py`` needs geomloss (stad's ``rdpp`` extra).

Both sides are built at random initialisation (``wide_resnet50_2(pretrained=False)``: main.py's
``pretrained=True`` would download ImageNet weights); as in the RD harness, BatchNorm gets random
affine parameters and statistics from one training-mode pass, and the official tensors are
copied into stad by an explicit key map (RD's map for encoder, OCBE and decoder; the projection
layers ``proj_a/b/c`` index for index). Rows: parameter counts; projected features; one training
step (``main.py``'s loop body: L_distill + 0.2 · L_proj on an image and its noisy copy, the same
noisy image and the same shuffle on both sides) with its terms and the gradients of projection,
OCBE and decoder; decoder outputs, per-level maps, final map and image score through
``utils_test.cal_anomaly_map`` + ``gaussian_filter(σ=4)`` + max (``evaluation_multi_proj``).

The official ``Revisit_RDLoss`` puts its target on ``'cuda'`` unconditionally; on a CPU machine
the harness turns that one ``.to('cuda')`` into a no-op (said in the notes). The simplex noise
itself is not compared here (its module needs numba): stad's noise is the opensimplex package's,
of which the official ``dataset/noise.py`` is a copy, and ``tests/test_rdpp.py`` checks the
octave sum point by point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

# official_parity.main() registers itself under its module name, so this is the running copy
# (its --set overrides included), not a second import.
import official_parity as op
import torch
from scipy.ndimage import gaussian_filter
from torch import Tensor, nn

from stad.methods.common import resize
from stad.synthesis import SimplexNoise

Report = op.Report

PRESET = ["+experiment=rdpp_mvtec", "backbone.weights=random"]
OFFICIAL_MODULES = ["model", "model.resnet", "model.de_resnet", "utils", "utils.utils_train",
                    "utils.utils_test"]  # fmt: skip
_LEVEL = {"proj_a": "0", "proj_b": "1", "proj_c": "2"}


def rdpp_key_map(key: str) -> str | None:
    """The official RD++ modules → stad: RD's map, OCBE + decoder under ``student.reverse``."""
    prefix, rest = key.split(".", 1)
    if prefix == "proj":
        level, tail = rest.split(".", 1)  # proj_a.proj.<index>.<tensor>
        return f"student.projection.{_LEVEL[level]}.{tail.removeprefix('proj.')}"
    mapped = op.rd_key_map(key)
    if mapped is None or prefix == "enc":
        return mapped
    return mapped.replace("student.", "student.reverse.", 1)


def rdpp_parity(root: Path, size: int, n: int, tolerance: float) -> Report:
    """Every RD++ row (module docstring) for a batch of ``n`` images of ``size`` px."""
    report = op.Report("rdpp", tolerance)
    with op.official_imports(root, OFFICIAL_MODULES) as mods:
        torch.manual_seed(0)
        encoder, bn = mods["model.resnet"].wide_resnet50_2(pretrained=False)
        decoder = mods["model.de_resnet"].de_wide_resnet50_2(pretrained=False)
        proj = mods["utils.utils_train"].MultiProjectionLayer(base=64)
        proj_loss = mods["utils.utils_train"].Revisit_RDLoss()
        loss_fucntion = mods["utils.utils_train"].loss_fucntion
        cal_anomaly_map = mods["utils.utils_test"].cal_anomaly_map
    method, cfg = op.stad_method([*PRESET, f"image_size={size}"])
    report.notes.append(f"official revision {op.revision(root)}; image {size} px, batch {n}")
    images = op.batch_images(size, n)
    x = op.normalised(images, method.teacher.extractor)
    encoder.eval()
    op.randomise_batchnorm([encoder, bn, decoder], lambda: decoder(bn(proj(encoder(x)))))
    official = {"enc": encoder, "bn": bn, "dec": decoder, "proj": proj}
    unused, _ = op.copy_by_key_map(method, official, rdpp_key_map)
    report.notes.append(f"official tensors stad does not use: {op._summary(unused)}")
    report.count(
        "teacher (layer1..3)", op.count(method.teacher), op._count_prefix(encoder, "layer4", "fc")
    )
    report.count("projection layers", op.count(method.student.projection), op.count(proj))
    report.count(
        "OCBE", op.count(method.student.reverse.bottleneck), op._count_prefix(bn, "conv4", "bn4")
    )
    report.count("decoder", op.count(method.student.reverse.decoder), op.count(decoder))
    _training_rows(report, method, official, proj_loss, loss_fucntion, images, x)
    _evaluation_rows(report, method, official, cal_anomaly_map, images, x, size)
    report.notes.append(f"stad scorer block: {dict(cfg.method.scorer)}")
    return report


@contextlib.contextmanager
def _cuda_target_on_cpu() -> Iterator[None]:
    """``Revisit_RDLoss`` calls ``.to('cuda')`` on its target: a no-op here."""
    original = torch.Tensor.to

    def to(self: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args and args[0] == "cuda" and not torch.cuda.is_available():
            return self
        return original(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "to", to):
        yield


def _training_rows(
    report: Report,
    method: Any,
    official: dict[str, nn.Module],
    proj_loss: Any,
    loss_fucntion: Any,
    images: Tensor,
    x: Tensor,
) -> None:
    encoder, bn, decoder, proj = (official[k] for k in ("enc", "bn", "dec", "proj"))
    noise = SimplexNoise(seed=1)
    noise.set_epoch(0)
    noisy = noise(images)  # one noisy copy, given to both sides
    x_noise = op.normalised(noisy, method.teacher.extractor)

    # main.py's loop body: encoder in eval mode, bn / proj / decoder in training mode
    bn.train(), proj.train(), decoder.train()
    torch.manual_seed(3)  # the shuffle of the SSOT pairs (torch.randperm on both sides)
    inputs = encoder(x)
    inputs_noise = encoder(x_noise)
    feature_space_noise, feature_space = proj(inputs, features_noise=inputs_noise)
    with _cuda_target_on_cpu():
        l_proj = proj_loss(inputs_noise, feature_space_noise, feature_space)
    outputs = decoder(bn(feature_space))
    l_distill = loss_fucntion(inputs, outputs)
    official_loss = l_distill + 0.2 * l_proj
    official_loss.backward()
    report.notes.append("official Revisit_RDLoss: its target's .to('cuda') made a no-op on CPU")

    method.train()
    stage = method.stages[0]
    batch = {"image": images, "streams": {"noisy": {"image": noisy}}}
    torch.manual_seed(3)
    ours = stage.loss(method, batch)
    ours["loss"].backward()
    terms = ", ".join(f"{k} {float(ours[k]):.4g}" for k in ("ssot", "reconstruct", "contrast"))
    report.notes.append(f"stad's L_proj terms on this batch: {terms}")
    report.compare(
        "projected features (clean)", method.student.project(method.teacher(batch)), feature_space
    )
    report.compare("training loss: L_distill", ours["distill"], l_distill)
    report.compare("training loss: L_proj", ours["proj"], l_proj)
    report.compare("training loss: L_distill + 0.2 L_proj", ours["loss"], official_loss)
    report.compare(
        "gradients (projection, OCBE, decoder)",
        op._grads(method.student, ("projection", "reverse")),
        op._official_grads(method.student, {"proj": proj, "bn": bn, "dec": decoder}, rdpp_key_map),
    )
    method.zero_grad(set_to_none=True)
    _crafted_projection_loss(report, stage, proj_loss)


def _crafted_projection_loss(report: Report, stage: Any, proj_loss: Any) -> None:
    """Both projection losses on features where every term is active: projections close to the
    noisy features (cosine above the 0.5 margin), a batch of 4."""
    g = torch.Generator().manual_seed(7)
    shapes = [(4, 8, 6, 6), (4, 16, 3, 3), (4, 32, 2, 2)]
    noisy = [torch.randn(s, generator=g) for s in shapes]
    projected = [n + 0.3 * torch.randn(n.shape, generator=g) for n in noisy]
    projected_noisy = [torch.randn(s, generator=g) for s in shapes]
    torch.manual_seed(5)
    with _cuda_target_on_cpu():
        theirs = proj_loss(noisy, projected_noisy, projected)
    torch.manual_seed(5)
    ours = stage.loss.keywords["projection_loss"].terms(noisy, projected_noisy, projected)
    report.compare("L_proj on crafted features (contrast term active)", ours["loss"], theirs)
    report.notes.append(
        "crafted features: stad's terms "
        + ", ".join(f"{k} {float(ours[k]):.4g}" for k in ("ssot", "reconstruct", "contrast"))
        + " (L_ssot compares a batch with a shuffled copy of itself: as point clouds the two are "
        "one distribution, so the debiased Sinkhorn divergence is 0 up to rounding, in the "
        "official code as in stad's)"
    )


def _evaluation_rows(
    report: Report,
    method: Any,
    official: dict[str, nn.Module],
    cal_anomaly_map: Any,
    images: Tensor,
    x: Tensor,
    size: int,
) -> None:
    encoder, bn, decoder, proj = (official[k] for k in ("enc", "bn", "dec", "proj"))
    method.eval()
    for module in official.values():
        module.eval()
    batch = {"image": images}
    with torch.no_grad():
        inputs = encoder(x)
        outputs = decoder(bn(proj(inputs)))
        targets = method.teacher(batch)
        preds = method.student(batch, targets)
        maps, scores = method.scorer(targets, preds, batch)
    report.compare("teacher features", list(targets), inputs)
    report.compare("decoder outputs", list(preds), outputs)
    official_maps, official_levels, official_scores = [], [[] for _ in inputs], []
    for i in range(len(images)):  # evaluation_multi_proj: batch 1
        total, levels = cal_anomaly_map(
            [t[i : i + 1] for t in inputs], [s[i : i + 1] for s in outputs], size, amap_mode="a"
        )
        for k, level in enumerate(levels):
            official_levels[k].append(torch.from_numpy(level))
        blurred = gaussian_filter(total, sigma=4)
        official_maps.append(torch.from_numpy(blurred))
        official_scores.append(float(blurred.max()))
    scorer = method.scorer
    for k, (t, s) in enumerate(zip(targets, preds, strict=True)):
        ours = resize(scorer.distance(t.float(), s.float()), (size, size), scorer.align_corners)
        report.compare(
            f"level {k + 1} map (upsampled)", ours[:, 0], torch.stack(official_levels[k])
        )
    report.compare("final map (summed, Gaussian σ=4)", maps[:, 0], torch.stack(official_maps))
    report.compare("image score (max)", scores, torch.tensor(official_scores))
