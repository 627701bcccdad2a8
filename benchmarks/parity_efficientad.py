"""Parity of stad's EfficientAD presets (S and M, MVTec AD, 256 px) with the reference code.

    PYTHONPATH=/tmp/parity-extra-ead python benchmarks/official_parity.py --method efficientad \\
        --official /path/to/EfficientAD

``--official`` is a checkout of github nelson1425/EfficientAD (the authors released no code; this
implementation reproduces the paper's table and is what stad's defaults follow). Its
``efficientad.py`` imports tifffile at module level, which stad does not need; it goes into a
scratch folder, never stad's environment::

    python -m pip install --no-deps --target /tmp/parity-extra-ead tifffile

Both sides are built at random initialisation: the reference's ``get_pdn_small``/``medium`` and
``get_autoencoder`` (``common.py``), their tensors copied into stad's modules by an explicit key
map (every stad key covered, every shape checked); the teacher reaches stad as a state-dict file
through ``method.teacher.weights`` (the path a user with ``teacher_small.pth`` takes). Both sides
get the same images. Rows, for S and M:

- parameter counts of teacher, student and autoencoder;
- teacher outputs; the teacher statistics (reference ``teacher_normalization`` over a loader of
  single images, stad's before-training calibration ``TeacherStatistics``);
- student halves and autoencoder outputs (evaluation mode);
- one training step's loss and its four terms and the gradients of student and autoencoder,
  restated from the reference's ``main`` loop (it is inline there), with the same dropout draws
  (same seed), the same autoencoder view (the reference applies its ColorJitter to the PIL image,
  stad to the resized tensor: given the same jittered image here) and the same penalty image
  (grayscale draw off on both sides: the reference draws it with PIL, stad per tensor);
- the map quantiles (reference ``map_normalization`` over a validation loader; stad's
  after-training calibration ``MapQuantiles``), the reference ``predict`` maps (local, global,
  combined), and the final map and image score of ``test`` (pad 4, bilinear resize, max) against
  ``method(batch)``;
- the learning-rate schedule (reference: StepLR(step_size=int(0.95 · 70 000), γ = 0.1)).

Pretraining rows (once): the PDN with padding (``padding=True``, the pretraining network),
the PatchCore-style targets of the reference's ``FeatureExtractor.embed`` against stad's
``patch_descriptors`` on torchvision's Wide-ResNet-101-2 at random weights (its state dict loaded
into stad's timm extractor as a weights file, so the layer-2/3 features are compared as well),
and the target statistics (the reference's ``feature_normalization`` against stad's
``channel_statistics``, same batches).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from unittest import mock

# official_parity.main() registers itself under its module name, so this is the running copy
# (its --set overrides included), not a second import.
import official_parity as op
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stad.backbones import create_feature_extractor
from stad.core import Method
from stad.methods import efficientad as ead
from stad.methods.us_pretrain import normalize

Report = op.Report

PRESETS = {"small": "+experiment=efficientad_s_mvtec", "medium": "+experiment=efficientad_m_mvtec"}
OFFICIAL_MODULES = ["common", "efficientad", "pretraining"]
CHANNELS = 384  # the reference's out_channels
SEED = 7  # the dropout draws of one training step, the same on both sides


def efficientad_parity(root: Path, size: int, n: int, tolerance: float) -> Report:
    """Every EfficientAD row (module docstring) for batches of ``n`` images of ``size`` px."""
    report = op.Report("efficientad", tolerance)
    report.notes.append(f"official revision {op.revision(root)}; image {size} px, batch {n}")
    with op.official_imports(root, OFFICIAL_MODULES) as official:
        for model_size in ("small", "medium"):
            _model_rows(report, official, model_size, size, n)
        _schedule_rows(report, official)
        _pretraining_rows(report, official, n)
    report.notes.append(
        "not compared (different by construction, measured elsewhere or not at all): the "
        "reference jitters the autoencoder view on the PIL image before its resize, stad on the "
        "resized tensor (same factor ranges); the reference's grayscale draws are PIL's "
        "(L = round(0.299 R + 0.587 G + 0.114 B)), stad's the same luma unrounded; the reference "
        "evaluates maps resized to the original image size (bottle: 900 px), stad at the run's "
        "evaluation size; in pretraining the reference's variance pass reads the 10 000 images "
        "after those of its mean pass (endless loader), stad's the same images"
    )
    return report


# -- one model size ----------------------------------------------------------------------------


def _model_rows(
    report: Report, official: dict[str, ModuleType], model_size: str, size: int, n: int
) -> None:
    common, reference = official["common"], official["efficientad"]
    torch.manual_seed(0)
    build = common.get_pdn_small if model_size == "small" else common.get_pdn_medium
    teacher, student, autoencoder = build(CHANNELS), build(2 * CHANNELS), common.get_autoencoder()
    method = _stad_method(report, model_size, teacher, size)
    unused, _ = op.copy_by_key_map(
        method.student, {"student": student, "ae": autoencoder}, _student_key_map
    )
    assert not unused, unused
    tag = "S" if model_size == "small" else "M"
    report.count(f"{tag} teacher", op.count(method.teacher), op.count(teacher))
    report.count(f"{tag} student", op.count(method.student.student), op.count(student))
    report.count(f"{tag} autoencoder", op.count(method.student.autoencoder), op.count(autoencoder))

    images = op.batch_images(size, n, seed=0)
    x = normalize(images)
    teacher.eval()
    method.eval()
    with torch.no_grad():
        report.compare(f"{tag} teacher PDN output", method.teacher.raw(images), teacher(x))
    t_mean, t_std = _teacher_statistics(report, tag, reference, method, teacher, images)
    with torch.no_grad():
        ours = method.student({"image": images}, method.teacher({"image": images}))
        autoencoder.eval()
        out = student(x)
        report.compare(f"{tag} student, first half (eval)", ours[0], out[:, :CHANNELS])
        report.compare(f"{tag} student, second half (eval)", ours[1], out[:, CHANNELS:])
        report.compare(f"{tag} autoencoder output (eval)", ours[2], autoencoder(x))
    _training_rows(report, tag, method, teacher, student, autoencoder, (t_mean, t_std), size, n)
    _evaluation_rows(
        report, tag, reference, method, (teacher, student, autoencoder), (t_mean, t_std)
    )


def _stad_method(report: Report, model_size: str, teacher: nn.Module, size: int) -> Method:
    """stad's preset with the reference teacher's tensors as its weights file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"teacher_{model_size}.pth"
        torch.save(teacher.state_dict(), path)
        method, cfg = op.stad_method(
            [PRESETS[model_size], f"method.teacher.weights={path}", f"image_size={size}"]
        )
    if model_size == "small":
        report.notes.append(
            f"stad presets {', '.join(PRESETS.values())}; teacher loaded from a state-dict file "
            f"(record: {method.info['teacher']['source']}); scorer {dict(cfg.method.scorer)}"
        )
    return method


def _student_key_map(key: str) -> str | None:
    prefix, rest = key.split(".", 1)
    return {"student": f"student.{rest}", "ae": f"autoencoder.layers.{rest}"}[prefix]


def _teacher_statistics(
    report: Report,
    tag: str,
    reference: ModuleType,
    method: Method,
    teacher: nn.Module,
    images: Tensor,
) -> tuple[Tensor, Tensor]:
    x = normalize(images)
    loader = [(x[i : i + 1], 0) for i in range(len(x))]  # the reference's batch-1 train loader
    with _quiet():
        mean, std = reference.teacher_normalization(teacher, loader)
    stats = ead.TeacherStatistics()
    stats.reset(method)
    for i in range(len(images)):
        stats.update(method, {"image": images[i : i + 1]})
    stats.finish(method)
    report.compare(f"{tag} teacher channel mean", method.teacher.mean, mean)
    report.compare(f"{tag} teacher channel std", method.teacher.std, std)
    with torch.no_grad():
        report.compare(
            f"{tag} normalised teacher output",
            method.teacher.describe(images),
            (teacher(x) - mean) / std,
        )
    return mean, std


def _training_rows(
    report: Report,
    tag: str,
    method: Method,
    teacher: nn.Module,
    student: nn.Module,
    autoencoder: nn.Module,
    stats: tuple[Tensor, Tensor],
    size: int,
    n: int,
) -> None:
    images = op.batch_images(size, 1, seed=1)  # batch 1, as both trainings
    jittered = (images * 1.15).clamp(0, 1)  # one brightness draw, given to both sides
    penalty = op.batch_images(2 * size, 1, seed=2)  # the penalty stream's 2 × size image
    crop = penalty[..., size // 2 : size // 2 + size, size // 2 : size // 2 + size]

    student.train(), autoencoder.train(), teacher.eval()
    torch.manual_seed(SEED)
    theirs = _reference_step(
        teacher,
        student,
        autoencoder,
        stats,
        normalize(images),
        normalize(jittered),
        normalize(crop),
    )
    theirs["loss"].backward()

    stage = next(s for s in method.training_stages if s.name == "train")
    method.train()
    with (
        mock.patch.object(ead, "augment_for_autoencoder", lambda batch, strength: jittered),
        mock.patch.object(ead, "random_grayscale", lambda batch, p, generator=None: batch),
    ):
        torch.manual_seed(SEED)
        ours = stage.loss(method, {"image": images, "streams": {"penalty": {"image": penalty}}})
    ours["loss"].backward()
    for key in ("hard", "penalty", "ae", "stae", "loss"):
        report.compare(f"{tag} training loss: {key}", ours[key], theirs[key])
    report.compare(
        f"{tag} gradients: student",
        [p.grad for p in method.student.student.parameters()],
        [p.grad for p in student.parameters()],
    )
    report.compare(
        f"{tag} gradients: autoencoder",
        [p.grad for p in method.student.autoencoder.parameters()],
        [p.grad for p in autoencoder.parameters()],
    )
    method.zero_grad(set_to_none=True)
    student.zero_grad(set_to_none=True)
    autoencoder.zero_grad(set_to_none=True)


def _reference_step(
    teacher: nn.Module,
    student: nn.Module,
    autoencoder: nn.Module,
    stats: tuple[Tensor, Tensor],
    image_st: Tensor,
    image_ae: Tensor,
    image_penalty: Tensor,
) -> dict[str, Tensor]:
    """One iteration of the reference's training loop (efficientad.py ``main``), restated."""
    mean, std = stats
    with torch.no_grad():
        teacher_output_st = (teacher(image_st) - mean) / std
    student_output_st = student(image_st)[:, :CHANNELS]
    distance_st = (teacher_output_st - student_output_st) ** 2
    d_hard = torch.quantile(distance_st, q=0.999)
    loss_hard = torch.mean(distance_st[distance_st >= d_hard])
    student_output_penalty = student(image_penalty)[:, :CHANNELS]
    loss_penalty = torch.mean(student_output_penalty**2)
    loss_st = loss_hard + loss_penalty
    ae_output = autoencoder(image_ae)
    with torch.no_grad():
        teacher_output_ae = (teacher(image_ae) - mean) / std
    student_output_ae = student(image_ae)[:, CHANNELS:]
    loss_ae = torch.mean((teacher_output_ae - ae_output) ** 2)
    loss_stae = torch.mean((ae_output - student_output_ae) ** 2)
    total = loss_st + loss_ae + loss_stae
    return {
        "hard": loss_hard,
        "penalty": loss_penalty,
        "ae": loss_ae,
        "stae": loss_stae,
        "loss": total,
    }


def _evaluation_rows(
    report: Report,
    tag: str,
    reference: ModuleType,
    method: Method,
    nets: tuple[nn.Module, nn.Module, nn.Module],
    stats: tuple[Tensor, Tensor],
) -> None:
    teacher, student, autoencoder = nets
    for net in nets:
        net.eval()
    method.eval()
    held_out = op.batch_images(256, 3, seed=3)
    loader = [(normalize(held_out[i : i + 1]), 0) for i in range(len(held_out))]
    kwargs = {"teacher": teacher, "student": student, "autoencoder": autoencoder}
    kwargs.update(teacher_mean=stats[0], teacher_std=stats[1])
    with _quiet():
        q_st_start, q_st_end, q_ae_start, q_ae_end = reference.map_normalization(
            validation_loader=loader, **kwargs
        )
    quantiles = ead.MapQuantiles()
    quantiles.reset(method)
    for i in range(len(held_out)):
        quantiles.update(method, {"image": held_out[i : i + 1]})
    quantiles.finish(method)
    report.compare(
        f"{tag} map quantiles, local (0.9, 0.995)", method.scorer.q_local, [q_st_start, q_st_end]
    )
    report.compare(
        f"{tag} map quantiles, global (0.9, 0.995)", method.scorer.q_global, [q_ae_start, q_ae_end]
    )

    images = op.batch_images(256, 2, seed=4)
    q = {
        "q_st_start": q_st_start,
        "q_st_end": q_st_end,
        "q_ae_start": q_ae_start,
        "q_ae_end": q_ae_end,
    }
    with torch.no_grad():
        raw = reference.predict(image=normalize(images), **kwargs)
        combined, map_st, map_ae = reference.predict(image=normalize(images), **kwargs, **q)
        targets = method.teacher({"image": images})
        local, global_ = ead.local_and_global(targets, method.student({"image": images}, targets))
        report.compare(f"{tag} local map (raw)", local, raw[1])
        report.compare(f"{tag} global map (raw)", global_, raw[2])
        report.compare(
            f"{tag} local map (normalised)",
            method.scorer._scaled(local, method.scorer.q_local),
            map_st,
        )
        report.compare(
            f"{tag} global map (normalised)",
            method.scorer._scaled(global_, method.scorer.q_global),
            map_ae,
        )
        maps, scores = method({"image": images})
    # reference test(): pad 4, bilinear resize to the image's size, image score = max
    final = F.interpolate(F.pad(combined, (4, 4, 4, 4)), images.shape[-2:], mode="bilinear")
    report.compare(f"{tag} final map (pad 4, bilinear to the input)", maps, final)
    report.compare(f"{tag} image score (max of the map)", scores, final.flatten(1).max(1).values)


# -- schedule and pretraining ------------------------------------------------------------------


def _schedule_rows(report: Report, official: dict[str, ModuleType]) -> None:
    steps = 70000
    theirs = _lrs(
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=int(0.95 * steps), gamma=0.1),
        steps,
    )
    ours = _lrs(lambda opt: ead.step_lr_at_fraction(opt, steps, 0.95, 0.1, cap=None), steps)
    report.compare("learning rate at every one of the 70 000 steps", ours, theirs)


def _lrs(make: Any, steps: int) -> Tensor:
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return torch.tensor(out, dtype=torch.float64)


def _pretraining_rows(report: Report, official: dict[str, ModuleType], n: int) -> None:
    import torchvision

    common, pretraining = official["common"], official["pretraining"]
    torch.manual_seed(0)
    for model_size, build in (("S", common.get_pdn_small), ("M", common.get_pdn_medium)):
        theirs = build(CHANNELS, padding=True)
        ours = ead.pdn("small" if model_size == "S" else "medium", CHANNELS, padding=True)
        ours.load_state_dict(theirs.state_dict())
        x = normalize(op.batch_images(256, 1, seed=5))
        with torch.no_grad():
            report.compare(
                f"{model_size} PDN with padding (pretraining), 256 px -> 64×64", ours(x), theirs(x)
            )

    backbone = torchvision.models.wide_resnet101_2(weights=None).eval()
    op.randomise_batchnorm([backbone], lambda: backbone(torch.randn(2, 3, 128, 128)))
    backbone.eval()
    with _quiet():
        extractor = pretraining.FeatureExtractor(
            backbone=backbone,
            layers_to_extract_from=["layer2", "layer3"],
            device="cpu",
            input_shape=(3, 512, 512),
        )
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "wide_resnet101_2.pth"
        torch.save(backbone.state_dict(), weights)
        ours, _ = create_feature_extractor(
            "wide_resnet101_2.tv_in1k", [2, 3], str(weights), frozen=True
        )
    ours.eval()
    images = op.batch_images(512, n, seed=6)
    x = normalize(images)
    with torch.no_grad():
        levels = ours(images)
        hooked = extractor.forward_modules["feature_aggregator"](x)
        report.compare(
            "WRN-101 layer 2 (stad's timm extractor, torchvision's weights)",
            levels[0],
            hooked["layer2"],
        )
        report.compare("WRN-101 layer 3", levels[1], hooked["layer3"])
        targets = extractor.embed(x)
        report.compare(
            "pretraining targets: patch_descriptors vs FeatureExtractor.embed",
            ead.patch_descriptors(levels, CHANNELS),
            targets,
        )
    batches = [targets[i : i + 1] for i in range(len(targets))]
    loader = [(b, 0) for b in batches]  # the reference's statistics pass over the same batches
    fake = SimpleNamespace(embed=lambda image: image)
    with _quiet():
        mean, std = pretraining.feature_normalization(
            extractor=fake, train_loader=_repeat(loader), steps=len(batches)
        )
    ours_mean, ours_std = ead.channel_statistics(iter(batches), len(batches))
    report.compare("pretraining target mean (same batches)", ours_mean, mean)
    report.compare("pretraining target std (same batches)", ours_std, std)


def _repeat(loader: list[Any]) -> Iterator[Any]:
    """The reference iterates its endless loader twice; both passes see the same batches here."""

    class Again:
        def __iter__(self) -> Iterator[Any]:
            return iter(loader)

    return Again()  # type: ignore[return-value]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The reference's tqdm bars (stderr) out of the report."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield
