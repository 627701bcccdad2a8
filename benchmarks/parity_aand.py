"""Parity of stad's AAND preset (MVTec AD, Wide-ResNet-50-2, 256 px) with the official code.

    PYTHONPATH=/tmp/parity-extra-aand python benchmarks/official_parity.py --method aand \\
        --official /path/to/AAND

``--official`` is a checkout of github Hui-design/AAND. Its network and loss modules import
``utils/vis.py``, which imports cv2, seaborn and pandas at module level; stad has none of them,
so they go into a scratch folder, never stad's environment::

    python -m pip install --no-deps --target /tmp/parity-extra-aand \\
        opencv-python-headless seaborn pandas pytz

Both sides are built at random initialisation (the official encoders with ``pretrained=False``:
train.py's ``pretrained=True`` would download torchvision's ImageNet weights). As in the RD and
STFPM harnesses (``official_parity.py``), BatchNorm gets random affine parameters and statistics
from one training-mode pass, the official tensors are copied into stad by an explicit key map
(``aand_key_map``), and both sides get the same images. The official vanilla encoder
(``models/resnet.py``, stage 1's ``inputs``) gets the advanced encoder's backbone weights, as
the two ImageNet loads share them in train.py.

Rows: parameter counts; teacher features F⁰, positional encodings, RAA gates and outputs F^AT;
stage 1 (train.py ``train_Stage1``: focal + 0.1 × amplification loss, its terms and the RAA
gradients) on one pre-made set of (anomalous image, mask, foreground) tensors given to both sides
instead of their synthesisers, with the same sampled positions on both sides; stage 2
(``train_Stage2``: ``loss_fucntion``) and its gradients; decoder outputs; level maps, final map
and image score through test.py's own ``cal_anomaly_map`` + ``gaussian_filter(σ=4)`` + max;
the final map and score end to end; and the stage-1 evaluation map (stad's
``method.score=amplification``, not used by the preset).

The student rows feed both students the official F^AT: the two F^AT differ by float rounding
(~1e-7, the gate's cosine is computed in another order), and the randomly initialised OCBE +
decoder amplify that to ~1e-4 in their outputs and ~7e-2 in their training gradients, in the
official code as much as in stad's (measured and written to the notes on every run).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np

# official_parity.main() registers itself under its module name, so this is the running copy
# (its --set overrides included), not a second import.
import official_parity as op
import torch
from omegaconf import OmegaConf
from scipy.ndimage import gaussian_filter
from torch import Tensor, nn

from stad.methods import aand
from stad.methods.aand import TeacherOnlyScorer, level_mask, positional_encoding
from stad.methods.common import resize
from stad.synthesis import Synthesis

Report = op.Report

PRESET = ["dataset=mvtec", "method=aand", "backbone=wide_resnet50_2"]
# The package roots are listed too, so that op.official_imports drops them from sys.modules
# afterwards (another checkout's models/ or utils/ must not resolve to these); test.py holds
# cal_anomaly_map, the official map, called as is.
OFFICIAL_MODULES = [
    "models",
    "utils",
    "utils.vis",
    "utils.utils",
    "models.recons_net",
    "models.resnet",
    "models.resnet_rar",
    "models.de_resnet",
    "models.loss",
    "test",
]
LEVELS = ("a", "b", "c")  # resnet_rar.py: feat_recons_a/b/c after layer1/2/3

# -- weights -----------------------------------------------------------------------------------

_MLP = {"projs": "query_mlp", "projs2": "residual_mlp"}


def aand_key_map(key: str) -> str | None:
    """Official AAND (resnet_rar.py wide_resnet50_2_rar + BN_layer, de_resnet.py) → stad.

    ``enc``: the advanced encoder: conv1..layer3 → the teacher's extractor (RD's map),
    ``feat_recons_<a|b|c>`` (RAR_single) → ``teacher.raa.<0|1|2>`` (``projs`` → query MLP,
    ``projs2`` → residual MLP, ``K_list.0`` → memory); ``bn`` / ``dec``: RD's OCBE and decoder,
    identical files in both repositories.
    """
    prefix, rest = key.split(".", 1)
    if prefix == "enc" and rest.startswith("feat_recons_"):
        level = LEVELS.index(rest[len("feat_recons_")])
        tail = rest.split(".", 1)[1]
        if m := re.fullmatch(r"(projs2?)\.0\.(\d\.(?:weight|bias))", tail):
            return f"teacher.raa.{level}.{_MLP[m.group(1)]}.{m.group(2)}"
        if tail == "K_list.0":
            return f"teacher.raa.{level}.memory"
        return None
    return op.rd_key_map(key)


class _MemoryAsMatrix:
    """An official module's state as ``op.copy_by_key_map`` reads it (it calls only
    ``state_dict``), each RAA memory ``K_list.0`` (1×2M×C: its leading axis exists only to be
    expanded over the batch) seen as stad's 2M×C, the same elements in the same order."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Tensor]:
        return {
            k: v.squeeze(0) if k.endswith("K_list.0") else v
            for k, v in self.module.state_dict().items()
        }


@dataclass
class Official:
    """The official networks and the two modules whose functions the harness calls."""

    encoder: nn.Module  # models/resnet.py: the vanilla teacher (stage-1 inputs, stage-1 eval)
    encoder_at: nn.Module  # models/resnet_rar.py: backbone + RAA modules (the advanced teacher)
    bn: nn.Module  # OCBE
    decoder: nn.Module
    loss: ModuleType  # models/loss.py
    test: ModuleType  # test.py


def build_official(root: Path) -> Official:
    """The official networks at random init (seed 0), as train.py builds them for WRN50-2."""
    with op.official_imports(root, OFFICIAL_MODULES) as mods:
        if Path(mods["test"].__file__).parent != root:
            raise SystemExit(f"'test' resolved to {mods['test'].__file__}, not {root}/test.py")
        torch.manual_seed(0)
        encoder_at, bn = mods["models.resnet_rar"].wide_resnet50_2_rar(pretrained=False)
        encoder, _ = mods["models.resnet"].wide_resnet50_2(pretrained=False)
        decoder = mods["models.de_resnet"].de_wide_resnet50_2(pretrained=False)
        return Official(encoder, encoder_at, bn, decoder, mods["models.loss"], mods["test"])


def share_backbone(official: Official) -> None:
    """The vanilla encoder gets the advanced one's backbone (both load the same ImageNet
    weights in train.py); everything the vanilla encoder has must come from there."""
    missing, unexpected = official.encoder.load_state_dict(
        official.encoder_at.state_dict(), strict=False
    )
    if missing or any(not k.startswith("feat_recons_") for k in unexpected):
        raise KeyError(f"vanilla/advanced encoder keys differ: {missing[:3]} {unexpected[:3]}")


# -- the pre-made stage-1 inputs ---------------------------------------------------------------

# Disc (centre row, centre column, radius) per image as fractions of the side, and the
# foreground's right edge: sized so that at level 1 (64×64, batch 2) about 1,260 positions are
# anomalous and about 5,900 normal foreground ones, so both of the official caps (1,000 and
# 5,000 sampled positions) bind there and neither binds at levels 2 and 3.
_DISCS = ((0.40, 0.45, 0.27), (0.60, 0.50, 0.16))
_FOREGROUND_EDGE = 7 / 8
_OPACITY = 0.3  # share of the clean image kept inside the anomaly (DRAEM's β)


def premade_anomalies(images: Tensor) -> Synthesis:
    """One fixed synthesis, given to both sides in place of their (different) synthesisers:
    discs filled with another smooth pattern blended over the clean images."""
    n, _, h, w = images.shape
    rows = torch.arange(h, dtype=torch.float32).view(h, 1) / h
    cols = torch.arange(w, dtype=torch.float32).view(1, w) / w
    discs = [_DISCS[i % len(_DISCS)] for i in range(n)]
    mask = torch.stack(
        [((rows - r) ** 2 + (cols - c) ** 2 <= rad**2).float() for r, c, rad in discs]
    ).unsqueeze(1)
    fill = op.batch_images(h, n, seed=1).flip(-1)
    blended = _OPACITY * images + (1 - _OPACITY) * fill
    anomalous = images * (1 - mask) + blended * mask
    foreground = (cols < _FOREGROUND_EDGE).float().expand(n, 1, h, w).contiguous()
    return Synthesis(image=anomalous, mask=mask, foreground=foreground)


def _shared_permutation(count: int) -> Tensor:
    """A 'random' order that depends on the count alone, the same on both sides."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(count))


@contextlib.contextmanager
def same_subsampling(loss_module: ModuleType) -> Iterator[None]:
    """Both amplification losses draw the same sampled positions: stad's ``aand._sample``
    (torch.randperm) and the official ``np.random.permutation`` in models/loss.py (the only use
    of ``np`` there) return the same permutation, drawn in the same order (normal, then
    anomalous, per level); without it the two RNGs pick different pairs once a cap binds."""
    numpy = SimpleNamespace(
        random=SimpleNamespace(permutation=lambda k: _shared_permutation(int(k)).numpy())
    )

    def sample(count: int, limit: int, device: torch.device) -> Tensor:
        return _shared_permutation(count)[:limit].to(device)

    with mock.patch.object(aand, "_sample", sample), mock.patch.object(loss_module, "np", numpy):
        yield


# -- the harness -------------------------------------------------------------------------------


def aand_parity(root: Path, size: int, n: int, tolerance: float) -> Report:
    """Every AAND row (module docstring) for a batch of ``n`` images of ``size`` px."""
    report = op.Report("aand", tolerance)
    official = build_official(root)
    method, cfg = op.stad_method([*PRESET, "backbone.weights=random", f"image_size={size}"])
    report.notes.append(f"official revision {op.revision(root)}; image {size} px, batch {n}")
    images = op.batch_images(size, n)
    x = op.normalised(images, method.teacher.extractor)
    _calibrate_and_copy(report, official, method, x)
    _count_rows(report, official, method)
    batch = {"image": images, "mask": torch.zeros(n, 1, size, size), "label": torch.zeros(n)}
    _stage1_rows(report, official, method, batch)
    method.zero_grad(set_to_none=True)
    _stage2_rows(report, official, method, batch, x)
    _evaluation_rows(report, official, method, batch, x, cfg.method.scorer)
    return report


def _calibrate_and_copy(report: Report, official: Official, method: Any, x: Tensor) -> None:
    def calibration() -> Any:
        return official.decoder(official.bn(official.encoder_at(x, flag=True)[1]))

    op.randomise_batchnorm([official.encoder_at, official.bn, official.decoder], calibration)
    share_backbone(official)
    sources = {
        "enc": _MemoryAsMatrix(official.encoder_at),
        "bn": official.bn,
        "dec": official.decoder,
    }
    unused, _ = op.copy_by_key_map(method, sources, aand_key_map)
    report.notes.append(
        f"official tensors stad does not use: {op._summary(unused)}; the vanilla encoder "
        "(models/resnet.py) holds a copy of enc's backbone and is not mapped; RAR_single's "
        "pos_enc is a plain list (no state), compared as a row; K_list.0 1×2M×C copied as 2M×C"
    )


def _count_rows(report: Report, official: Official, method: Any) -> None:
    enc = official.encoder_at
    raa = sum(p.numel() for k, p in enc.named_parameters() if k.startswith("feat_recons_"))
    report.count(
        "teacher (layer1..3)",
        op.count(method.teacher.extractor),
        op._count_prefix(enc, "layer4", "fc", "feat_recons_"),
    )
    report.count("RAA modules (3 levels)", op.count(method.teacher.raa), raa)
    report.count(
        "OCBE", op.count(method.student.bottleneck), op._count_prefix(official.bn, "conv4", "bn4")
    )
    report.count("decoder", op.count(method.student.decoder), op.count(official.decoder))


def _official_stage1_mode(encoder_at: nn.Module) -> None:
    """train.py train_Stage1: only feat_recons trains; the module is in training mode with
    every BatchNorm switched back to evaluation."""
    for name, p in encoder_at.named_parameters():
        p.requires_grad_(name.startswith("feat_recons_"))
    encoder_at.train()
    for m in encoder_at.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.eval()


def _stage1_rows(report: Report, official: Official, method: Any, batch: dict) -> None:
    synth = premade_anomalies(batch["image"])
    xs = op.normalised(synth.image, method.teacher.extractor)
    _official_stage1_mode(official.encoder_at)
    official.encoder.eval()
    with torch.no_grad():
        inputs = official.encoder(xs)
    _, inputs_at, _, atten = official.encoder_at(xs, flag=False, atten_mask=synth.mask)
    focal, _, _ = official.loss.get_focal_loss(atten, synth.mask)
    with same_subsampling(official.loss):
        _, anomaly = official.loss.get_amplify_loss(inputs, inputs_at, synth.mask, synth.foreground)
    official_loss = focal * 1.0 + anomaly * 0.1  # train.py: loss_focal*1.0 + loss_anomaly*0.1
    official_loss.backward()

    method.train()
    stage = method.stages[0]
    # The stage's synthetic-anomaly stream, as the runner hands it to the loss.
    anomalies = {"image": synth.image, "mask": synth.mask, "foreground": synth.foreground}
    with same_subsampling(official.loss):
        out = stage.loss(method, {**batch, "streams": {"anomalies": anomalies}})
    out["loss"].backward()

    sizes = [f.shape[-2:] for f in inputs]
    ours_targets = [level_mask(synth.mask, s, _mask_threshold(method)) for s in sizes]
    official_targets = [
        (official.loss.resize_lib[i](synth.mask) > official.loss.mask_thresh).float()
        for i in range(len(sizes))
    ]
    report.compare("stage 1: level targets (avg-pool > 0.3)", ours_targets, official_targets)
    with torch.no_grad():
        vanilla = method.teacher.extractor(synth.image)
        amplified = [
            module(f0, y)[0]
            for f0, module, y in zip(vanilla, method.teacher.raa, ours_targets, strict=True)
        ]
    report.compare("stage 1: teacher F⁰ of the anomalous images", list(vanilla), list(inputs))
    report.compare("stage 1: F^AT with ground-truth gates (3 levels)", amplified, list(inputs_at))
    report.compare("stage 1: focal term (3 levels)", out["focal"], focal)
    report.compare("stage 1: amplification term (3 levels)", out["amplification"], anomaly)
    report.compare("stage 1 loss (focal + 0.1 × amplification)", out["loss"], official_loss)
    ours, theirs = _mapped_grads(method.teacher.raa, "teacher.raa", official, aand_key_map)
    report.compare("stage 1 gradients (all RAA parameters)", ours, theirs)
    counts = _describe_levels(ours_targets, synth.foreground, _mask_threshold(method))
    report.notes.append(f"stage-1 inputs: {counts}")


def _mask_threshold(method: Any) -> float:
    return float(method.stages[0].loss.mask_threshold)


def _describe_levels(targets: Sequence[Tensor], foreground: Tensor, threshold: float) -> str:
    parts = []
    for t in targets:
        fg = level_mask(foreground, t.shape[-2:], threshold).bool()
        anomalous = t.bool()
        normal = (~anomalous & fg).sum().item()
        parts.append(f"{t.shape[-1]}² {int(anomalous.sum())} anomalous / {normal} normal fg")
    return (
        "pre-made discs on both images, positions per level "
        + ", ".join(parts)
        + " (caps 1,000 / 5,000: both bind at level 1); the same sampled positions on both "
        "sides (same_subsampling)"
    )


def _mapped_grads(
    ours: nn.Module,
    prefix: str,
    official: Official,
    key_map: Callable[[str], str | None],
) -> tuple[list[Tensor], list[Tensor]]:
    """Gradients of ``ours`` (stad's ``prefix``) and of their official sources, in stad's order
    (an official source without a gradient gives NaN, so the row fails)."""
    by_key: dict[str, Tensor] = {}
    for key, p in official.encoder_at.named_parameters():
        mapped = key_map(f"enc.{key}")
        if mapped is not None and p.grad is not None:
            by_key[mapped] = p.grad.reshape(-1)
    names = [f"{prefix}.{name}" for name, _ in ours.named_parameters()]
    theirs = [by_key.get(k, torch.full((1,), float("nan"))) for k in names]
    return op._grads(ours, ("",)), theirs


def _official_stage2(
    official: Official, inputs: Sequence[Tensor], student: nn.Module
) -> tuple[Tensor, list[Tensor]]:
    """train.py train_Stage2 on given teacher features: OCBE + decoder in training mode,
    ``loss_fucntion``, backward; the loss and the gradients in the order of stad's ``student``."""
    official.bn.train(), official.decoder.train()
    official.bn.zero_grad(set_to_none=True), official.decoder.zero_grad(set_to_none=True)
    loss = official.loss.loss_fucntion(list(inputs), official.decoder(official.bn(list(inputs))))
    loss.backward()
    sources = {"bn": official.bn, "dec": official.decoder}
    return loss.detach(), [g.clone() for g in op._official_grads(student, sources, aand_key_map)]


@contextlib.contextmanager
def teacher_returns(method: Any, levels: Sequence[Tensor]) -> Iterator[None]:
    """stad's teacher answers ``levels`` (the official F^AT) instead of computing its own, so
    the student side is compared on identical inputs."""
    fixed = aand.AmplifiedFeatures(list(levels), [], [])
    with mock.patch.object(method.teacher, "forward", lambda batch: fixed):
        yield


def _stage2_rows(report: Report, official: Official, method: Any, batch: dict, x: Tensor) -> None:
    """Stage 2 on the official F^AT for both sides; first, from the same starting state, the
    official code on stad's F^AT, to measure how far its own gradients move with a float-level
    change of its inputs."""
    official.encoder_at.eval()
    with torch.no_grad():  # train.py: the advanced teacher in eval mode, under no_grad
        _, f_at, _, _ = official.encoder_at(x, flag=True)
        ours_at = list(method.teacher(batch))
    start = {
        name: {k: v.clone() for k, v in m.state_dict().items()}
        for name, m in (("bn", official.bn), ("dec", official.decoder))
    }
    _, moved = _official_stage2(official, ours_at, method.student)
    official.bn.load_state_dict(start["bn"]), official.decoder.load_state_dict(start["dec"])
    official_loss, official_grads = _official_stage2(official, f_at, method.student)

    method.train()
    with teacher_returns(method, f_at):
        loss = method.stages[1].loss(method, batch)["loss"]
    loss.backward()
    ours = op._grads(method.student, ("bottleneck", "decoder"))
    report.compare(
        "stage 2 loss (flat cosine + HKD top-10), on the official F^AT", loss, official_loss
    )
    report.compare(
        "stage 2 gradients (all OCBE + decoder parameters), on the official F^AT",
        ours,
        official_grads,
    )
    report.notes.append(
        "sensitivity: the official stage 2 fed stad's F^AT instead of its own "
        f"({_rel(ours_at, f_at):.1e} apart) moves its own gradients by "
        f"{_rel(moved, official_grads):.1e} (the randomly initialised OCBE + decoder in training "
        "mode amplify float rounding), so the student rows take both sides' student on the same "
        "official F^AT; stad's end-to-end gradients are those of the official code on stad's "
        "F^AT (same inputs give bit-equal gradients, row above)"
    )


def _rel(ours: Sequence[Tensor], official: Sequence[Tensor]) -> float:
    a, b = op._flat(list(ours)), op._flat(list(official))
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def _evaluation_rows(
    report: Report, official: Official, method: Any, batch: dict, x: Tensor, scorer_cfg: Any
) -> None:
    method.eval()
    for module in (official.encoder, official.encoder_at, official.bn, official.decoder):
        module.eval()
    size = batch["image"].shape[-1]
    scorer = method.scorer
    with torch.no_grad():
        f0, f_at, _, gates = official.encoder_at(x, flag=True)
        vanilla = official.encoder(x)
        outputs = official.decoder(official.bn(f_at))
        targets = method.teacher(batch)
        outputs_from_ours = official.decoder(official.bn(list(targets)))
        preds = method.student(batch, list(f_at))
        maps, scores = scorer(list(f_at), preds, batch)
        amplification = TeacherOnlyScorer("amplification", scorer_cfg)(targets, [], batch)
        end_preds = method.student(batch, targets)
        end_maps, end_scores = scorer(targets, end_preds, batch)  # = method(batch)
    for k in range(len(f0)):
        report.compare(f"teacher features F⁰ level {k + 1}", targets.vanilla[k], f0[k])
    pe = [positional_encoding(f.shape[1], *f.shape[-2:], f)[0] for f in targets.vanilla]
    official_pe = [getattr(official.encoder_at, f"feat_recons_{c}").pos_enc[0] for c in LEVELS]
    report.compare("positional encodings (3 levels)", pe, official_pe)
    for k in range(len(f0)):
        report.compare(f"RAA gate level {k + 1} (predicted)", targets.gates[k], gates[k])
        report.compare(f"RAA output F^AT level {k + 1}", targets[k], f_at[k])
    for k in range(len(f0)):
        report.compare(f"decoder output level {k + 1}, on the official F^AT", preds[k], outputs[k])
    for k, (t, s) in enumerate(zip(f_at, preds, strict=True)):
        level = resize(scorer.distance(t.float(), s.float()), (size, size), scorer.align_corners)
        theirs = _official_map(official.test, [f_at[k]], [outputs[k]], size, sigma=0)
        report.compare(
            f"level {k + 1} map (1 − cos, upsampled), on the official F^AT", level[:, 0], theirs
        )
    final = _official_map(official.test, f_at, outputs, size, sigma=4)
    report.compare("final map (summed, Gaussian σ=4), on the official F^AT", maps[:, 0], final)
    best = final.reshape(len(final), -1).max(1)
    report.compare("image score (max), on the official F^AT", scores, best)
    report.compare("final map, end to end (each side its own teacher)", end_maps[:, 0], final)
    report.compare("image score, end to end (each side its own teacher)", end_scores, best)
    stage1_map = _official_map(official.test, vanilla, f_at, size, sigma=4)
    report.compare(
        "stage-1 evaluation map 1 − cos(F⁰, F^AT) (score=amplification)",
        amplification[0][:, 0],
        stage1_map,
        used=False,
    )
    report.notes.append(
        "end to end (stad's teacher, its F^AT through stad's student): decoder outputs "
        f"{_levels(end_preds, outputs)} from the official; the official decoder itself fed "
        f"stad's F^AT: {_levels(outputs_from_ours, outputs)} (F^AT {_rel(targets, f_at):.1e} "
        "apart: stad's gate normalises q and K before the dot product, the official "
        "pair_cosine divides the dot product by the norms)"
    )
    report.notes.append(
        f"stad scorer: align_corners={scorer.align_corners}, blur border {scorer.blur.border!r}; "
        "official maps from test.py cal_anomaly_map(amap_mode='a') per image (batch 1), then "
        "gaussian_filter(σ=4) and np.max (evaluation_Stage2)"
    )
    report.notes.append(
        f"official encoders built with pretrained=False (train.py: True, an ImageNet download); "
        f"{_scorer_summary(scorer_cfg)}"
    )


def _levels(ours: Sequence[Tensor], official: Sequence[Tensor]) -> str:
    return " / ".join(f"{_rel([a], [b]):.1e}" for a, b in zip(ours, official, strict=True))


def _official_map(
    test: ModuleType, fs: Sequence[Tensor], ft: Sequence[Tensor], size: int, sigma: float
) -> np.ndarray:
    """test.py: per image, cal_anomaly_map (summed levels), then gaussian_filter(σ) (σ=0: the
    bare map of the levels given)."""
    out = []
    for i in range(fs[0].shape[0]):
        amap, _ = test.cal_anomaly_map(
            [f[i : i + 1] for f in fs], [f[i : i + 1] for f in ft], size, amap_mode="a"
        )
        out.append(gaussian_filter(amap, sigma=sigma) if sigma else amap)
    return np.stack(out)


def _scorer_summary(cfg: Any) -> str:
    return "stad scorer block: " + str(OmegaConf.to_container(cfg, resolve=True))
