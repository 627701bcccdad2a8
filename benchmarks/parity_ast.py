"""AST parity: stad's MVTec AD preset against the official code (github marco-rudolph/AST).

    PYTHONPATH=/tmp/parity-extra-ast python benchmarks/official_parity.py --method ast \
        --official /path/to/AST

Run through ``official_parity.py`` (which imports this file for ``--method ast``). The official
code imports ``efficientnet_pytorch``, which stad does not have: install it into a scratch folder
(``python -m pip install --no-deps --target /tmp/parity-extra-ast efficientnet_pytorch``), never
into stad's environment. Nothing is downloaded: the official ``FeatureExtractor`` calls
``EfficientNet.from_pretrained``, which the harness replaces by ``from_name`` (same network, random
weights) while it builds.

The official ``config.py`` is a module of constants read at import time; the harness sets it to
the paper's MVTec AD setting before importing ``model.py`` (RGB only, no foreground mask, teacher
hidden 1024, clamp 3, features given to the networks as ``pre_extracted``, i.e. extracted once in
evaluation mode as ``preprocess.py`` does). Both sides are built at random initialisation, the
official tensors copied into stad by :func:`ast_key_map`, BatchNorm calibrated as in the other
harnesses, the flow's zero-initialised gammas set to random values on the official side (else the
flow is the identity and z = features), and both fed the same batch.

The two extractors (efficientnet_pytorch, timm) are the same computation, to 1e-14 in float64,
but round differently in float32, and the random networks after them amplify that rounding (the
student's gradients through BatchNorm in training mode most). So the extractor has two rows of
its own (float32 as run, float64), and the rows after it read the official features through
stad's feature cache, as a pre-extracted run does on both sides; the final map and the image
scores are compared once more with stad's own float32 features (", stad's own features"). The
training and evaluation
steps are re-stated from train_teacher.py, train_student.py and eval.py (those scripts import
sklearn / matplotlib and read data folders), calling the official loss and mask functions of
utils.py.
"""

from __future__ import annotations

import contextlib
import copy
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import official_parity as op
import torch
from torch import Tensor, nn

from stad.methods.ast import LOG_DET, Z, depth_channels, foreground_weight

Report = op.Report
KeyMap = Callable[[str], str | None]

PRESET = ["+experiment=ast_mvtec"]
EXTRACT_LAYER = 35  # config.py extract_layer: the last block of timm's blocks[5]
OFFICIAL_MODULES = ("utils", "freia_funcs", "model")

# efficientnet_pytorch MBConvBlock attribute → timm block attribute. Blocks without an expansion
# conv (B5's first stage) are timm DepthwiseSeparableConv, the others InvertedResidual.
_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_RES_BLOCK = {"l1": "0", "bn1": "1", "l2": "3", "bn2": "4"}


# -- the official checkout ---------------------------------------------------------------------


def configure(c: ModuleType, size: int) -> None:
    """Set the official config module to the paper's MVTec AD (RGB) setting at ``size`` px.

    config.py ships the MVTec 3D-AD values (3-D data, teacher hidden 64, clamp 1.9); the values
    derived from them at import time (mode, n_feat, masks, map sizes) are recomputed here.
    """
    c.device = "cpu"
    c.use_3D_dataset = False
    c.mode = "RGB"
    c.n_feat = c.img_feat_dims
    c.training_mask = c.eval_mask = False
    c.pre_extracted = True  # the recommended pipeline: features from preprocess.py (eval mode)
    c.channels_hidden_teacher = 1024  # paper, MVTec AD
    c.clamp = 3.0  # paper, MVTec AD
    c.img_len = size
    c.img_size = (size, size)
    c.img_dims = [3, size, size]
    c.depth_len = size // 4
    c.map_len = size // 32


@contextlib.contextmanager
def official_ast(root: Path, size: int) -> Iterator[dict[str, ModuleType]]:
    """The official modules, imported after their config was set by :func:`configure`.

    model.py and freia_funcs.py bind config values as default arguments when imported, so the
    config must be imported and changed first, then the rest.
    """
    clashing = [n for n in ("config", *OFFICIAL_MODULES) if n in sys.modules]
    if clashing:
        raise SystemExit(f"modules {clashing} are already imported: the official ones would clash")
    with op.official_imports(root, ["config"]) as config:
        configure(config["config"], size)
        with op.official_imports(root, list(OFFICIAL_MODULES)) as mods:
            yield {"config": config["config"], **mods}


@contextlib.contextmanager
def no_download(efficientnet: type) -> Iterator[None]:
    """``EfficientNet.from_pretrained`` builds by ``from_name``: same network, random weights."""
    original = efficientnet.__dict__["from_pretrained"]

    def from_name(cls: type, model_name: str, *args: Any, **kwargs: Any) -> nn.Module:
        return cls.from_name(model_name)

    efficientnet.from_pretrained = classmethod(from_name)
    try:
        yield
    finally:
        efficientnet.from_pretrained = original


def build_official(mods: dict[str, ModuleType]) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Feature extractor (blocks 0..35 of B5), teacher Model (flow), student Model."""
    model, c = mods["model"], mods["config"]
    torch.manual_seed(0)
    with no_download(model.EfficientNet):
        extractor = model.FeatureExtractor(layer_idx=c.extract_layer)
    teacher = model.Model()
    student = model.Model(
        nf=not c.asymmetric_student,
        channels_hidden=c.channels_hidden_student,
        n_blocks=c.n_st_blocks,
    )
    return extractor.eval(), teacher, student


def randomise_gammas(flow: nn.Module) -> None:
    """The coupling subnets' output scale gamma starts at 0 (the flow is then the identity); give
    it random values so that z, the log-Jacobian and the flow's gradients are non-trivial."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=generator))


# -- key map -----------------------------------------------------------------------------------


def ast_key_map(
    stage_lengths: list[int], expanded: set[int], couplings: dict[int, int], n_blocks: int
) -> KeyMap:
    """The map official key → stad key for prefixes ``fe`` (FeatureExtractor), ``flow`` (the
    teacher's ReversibleGraphNet) and ``st`` (the student's Student net).

    ``stage_lengths``: blocks per timm stage (official block index → stage, index in it);
    ``expanded``: official blocks with an expansion conv; ``couplings``: graph node index →
    coupling block; ``n_blocks``: the student's residual blocks.
    """
    position = [(s, j) for s, length in enumerate(stage_lengths) for j in range(length)]

    def extractor_key(rest: str) -> str | None:
        base = "teacher.features.extractor"
        if m := re.fullmatch(r"_conv_stem\.(.+)", rest):
            return f"{base}.stem.0.{m.group(1)}"
        if m := re.fullmatch(r"_bn0\.(.+)", rest):
            return f"{base}.stem.1.{m.group(1)}"
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", rest)
        if m is None or int(m.group(1)) >= len(position):
            return None  # blocks after layer_idx, _conv_head, _bn1, _fc: never computed
        index = int(m.group(1))
        names = _IR_BLOCK if index in expanded else _DS_BLOCK
        stage, j = position[index]
        return f"{base}.blocks.{stage}.{j}.{names[m.group(2)]}.{m.group(3)}"

    def flow_key(rest: str) -> str | None:
        m = re.fullmatch(r"module_list\.(\d+)\.s([12])\.(.+)", rest)
        if m is None:
            return None
        return f"teacher.flow.couplings.{couplings[int(m.group(1))]}.net{m.group(2)}.{m.group(3)}"

    def student_key(rest: str) -> str | None:
        if m := re.fullmatch(r"conv1\.(.+)", rest):
            return f"student.net.0.{m.group(1)}"
        if m := re.fullmatch(r"conv2\.(.+)", rest):
            return f"student.net.{2 + n_blocks}.{m.group(1)}"
        if m := re.fullmatch(r"res\.(\d+)\.(l1|bn1|l2|bn2)\.(.+)", rest):
            block, layer, tail = m.groups()
            return f"student.net.{2 + int(block)}.body.{_RES_BLOCK[layer]}.{tail}"
        return None  # gamma: a parameter Student.forward never uses

    def key_map(key: str) -> str | None:
        prefix, rest = key.split(".", 1)
        if prefix == "fe":
            return extractor_key(rest.removeprefix("feature_extractor."))
        return {"flow": flow_key, "st": student_key}[prefix](rest)

    return key_map


def _official_layout(
    extractor: nn.Module, teacher: nn.Module, method: Any
) -> tuple[list[int], set[int], dict[int, int]]:
    """The facts :func:`ast_key_map` needs, read from both sides' modules."""
    stage_lengths = [len(stage) for stage in method.teacher.features.extractor.blocks]
    if sum(stage_lengths) != EXTRACT_LAYER + 1:
        raise ValueError(f"stad's stages {stage_lengths} do not end at block {EXTRACT_LAYER}")
    blocks = extractor.feature_extractor._blocks
    expanded = {i for i, block in enumerate(blocks) if hasattr(block, "_expand_conv")}
    couplings = {
        i: int(node.name.split("_")[1])
        for i, node in enumerate(teacher.net.node_list)
        if node.name.startswith("conv_")
    }
    return stage_lengths, expanded, couplings


def _unused_summary(unused: list[str]) -> str:
    """Official tensors stad does not use, grouped (block ranges instead of every key)."""
    blocks = sorted({int(m.group(1)) for k in unused if (m := re.search(r"_blocks\.(\d+)\.", k))})
    others = sorted(
        {
            re.sub(r"\.(weight|bias|running_\w+|num_batches_tracked)$", "", k)
            for k in unused
            if "_blocks." not in k
        }
    )
    parts = [f"extractor _blocks {blocks[0]}..{blocks[-1]}"] if blocks else []
    return f"{len(unused)} tensors ({', '.join([*parts, *others])})"


# -- gradients ---------------------------------------------------------------------------------


def _grads_in_stad_order(
    ours: nn.Module,
    stad_prefix: str,
    official: dict[str, nn.Module],
    key_map: KeyMap,
) -> tuple[list[Tensor], list[Tensor]]:
    """Both sides' gradients, in the order of ``ours``'s parameters (named ``stad_prefix`` +
    name in stad's state dict); a missing gradient is NaN on the official side so it fails."""
    mine = [
        p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
        for p in ours.parameters()
    ]
    return mine, op._official_grads(ours, official, key_map, strip=stad_prefix)


# -- the official steps (re-stated from train_teacher.py, train_student.py, eval.py) ----------


def official_foreground(mods: dict[str, ModuleType], n: int) -> Tensor:
    """fg_down of the scripts: MVTec AD has no foreground, DefectDataset gives ones at depth_len,
    dilated (dilate_mask) and bilinearly down-sampled to the map."""
    c, utils = mods["config"], mods["utils"]
    fg = torch.ones(n, 1, c.depth_len, c.depth_len)
    fg = utils.dilation(fg, c.dilate_size) if c.dilate_mask else fg
    return utils.downsampling(fg, (c.map_len, c.map_len), bin=False)


def official_eval(
    mods: dict[str, ModuleType], teacher: nn.Module, student: nn.Module, feat: Tensor
) -> dict[str, Tensor]:
    """eval.py evaluate(): teacher z and jac, student z, st_pixel before and after the ×8
    bicubic upsampling, and the two image scores (mean over the map, max over the ×8 map)."""
    c, utils = mods["config"], mods["utils"]
    n = feat.shape[0]
    depth = torch.zeros(n, 1, c.depth_len, c.depth_len)
    fg_down = official_foreground(mods, n)
    up = nn.Upsample(scale_factor=c.depth_len // c.map_len, mode="bicubic", align_corners=False)
    teacher.eval(), student.eval()
    with torch.no_grad():
        z_t, jac_t = teacher(feat, depth)
        z, _ = student(feat, depth)
        st_loss = utils.get_st_loss(z_t, z, fg_down, per_sample=True)
        st_pixel = utils.get_st_loss(z_t, z, fg_down, per_pixel=True)
        if c.eval_mask:
            st_pixel = st_pixel * fg_down[:, 0]
        fine = up(st_pixel[:, None])[:, 0]
    return {
        "z": z_t,
        "jac": jac_t,
        "student": z,
        "grid": st_pixel,
        "fine": fine,
        "mean": st_loss,
        "max": fine.flatten(1).amax(1),
    }


def official_teacher_step(mods: dict[str, ModuleType], teacher: nn.Module, feat: Tensor) -> Tensor:
    """train_teacher.py: model.train(), z, jac = model(features, depth), get_nf_loss, backward."""
    c, utils = mods["config"], mods["utils"]
    n = feat.shape[0]
    teacher.train()
    z, jac = teacher(feat, torch.zeros(n, 1, c.depth_len, c.depth_len))
    loss = utils.get_nf_loss(z, jac, official_foreground(mods, n))
    loss.backward()
    return loss


def official_student_step(
    mods: dict[str, ModuleType], teacher: nn.Module, student: nn.Module, feat: Tensor
) -> tuple[Tensor, Tensor]:
    """train_student.py: teacher in eval mode without gradients, student in training mode,
    get_st_loss, backward. Returns (student output, loss)."""
    c, utils = mods["config"], mods["utils"]
    n = feat.shape[0]
    depth = torch.zeros(n, 1, c.depth_len, c.depth_len)
    teacher.eval(), student.train()
    with torch.no_grad():
        z_t, _ = teacher(feat, depth)
    z, _ = student(feat, depth)
    loss = utils.get_st_loss(z_t, z, official_foreground(mods, n))
    loss.backward()
    return z, loss


# -- the harness -------------------------------------------------------------------------------


def ast_parity(root: Path, size: int, n: int, tolerance: float) -> Report:
    """Every compared quantity of AST's MVTec AD preset at ``size`` px, batch ``n``."""
    report = op.Report("ast", tolerance)
    with official_ast(root, size) as mods:
        extractor, teacher, student = build_official(mods)
        method, images, x = _stad_side(report, root, size, n, mods["config"])
        key_map = _calibrate_and_copy(report, method, extractor, teacher, student, x)
        _count_rows(report, method, key_map, extractor, teacher, student)
        feat = _feature_rows(report, mods["config"], method, extractor, images, x)
        official = official_eval(mods, teacher, student, feat)
        cached = _cached_batch(method, images, feat)
        _eval_rows(report, method, teacher, official, cached)
        _end_to_end_rows(report, method, official, _plain_batch(images))
        _training_rows(report, mods, method, key_map, teacher, student, feat, cached)
        _three_d_rows(report, mods, size, n)
    return report


def _plain_batch(images: Tensor) -> dict[str, Any]:
    """A batch without image paths: stad's feature cache is bypassed, its extractor runs."""
    n, _, h, w = images.shape
    return {"image": images, "mask": torch.zeros(n, 1, h, w), "label": torch.zeros(n)}


def _cached_batch(method: Any, images: Tensor, feat: Tensor) -> dict[str, Any]:
    """A batch whose features stad's cache already holds: the official ones.

    The extractors agree exactly in float64 but not bit for bit in float32 (row "teacher
    features"), and the random flow and the student in training mode amplify that rounding; so
    the rows after the features get the same features on both sides, as a pre-extracted run
    (the official pre_extracted, stad's feature cache) feeds them, and each row measures its
    own computation. _end_to_end_rows repeats the evaluation through stad's own extractor.
    """
    cache = method.teacher.features
    if not cache.enabled:
        raise RuntimeError("stad's feature cache is off: the extractor is not frozen")
    batch = _plain_batch(images)
    batch["path"] = [f"parity-ast/image{i}.png" for i in range(images.shape[0])]
    size = (int(images.shape[-2]), int(images.shape[-1]))
    for path, f in zip(batch["path"], feat, strict=True):
        cache._store(path, size, (f.detach().clone(),))  # the entry the first epoch would write
    return batch


def _feature_rows(
    report: Report, c: ModuleType, method: Any, extractor: nn.Module, images: Tensor, x: Tensor
) -> Tensor:
    """The extractors in float32 (as run) and in float64 (the same computation, or not);
    returns the official float32 features (preprocess.py: eval mode, no_grad)."""
    ours = method.teacher.features.extractor
    with torch.no_grad():
        feat = extractor(x)
        report.compare("teacher features (FeatureExtractor, block 35), float32", ours(images), feat)
        ours64, theirs64 = copy.deepcopy(ours).double(), copy.deepcopy(extractor).double()
        mean = torch.tensor(c.norm_mean, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(c.norm_std, dtype=torch.float64).view(1, 3, 1, 1)
        ours64.mean, ours64.std = mean, std  # the same constants on both sides in float64
        images64 = images.double()
        report.compare(
            "teacher features, float64 (both extractors and the input in double)",
            ours64(images64),
            theirs64((images64 - mean) / std),
        )
    return feat


def _stad_eval(method: Any, batch: dict[str, Any]) -> dict[str, Tensor]:
    """stad's evaluation: features, condition, teacher and student outputs, maps, scores."""
    method.eval()
    scorer = method.scorer
    with torch.no_grad():
        x, cond = method.teacher.encode(batch)
        targets = method.teacher(batch)
        preds = method.student(batch, targets)
        maps, scores = scorer(targets, preds, batch)
        max_scorer = copy.copy(scorer)
        max_scorer.reduction = "max"
        _, max_scores = max_scorer(targets, preds, batch)
        grid = scorer.grid_map(targets, preds, batch)
    return {
        "x": x,
        "cond": cond,
        "z": targets[Z],
        "jac": targets[LOG_DET][:, 0],
        "student": preds[0],
        "grid": grid[:, 0],
        "maps": maps[:, 0],
        "mean": scores,
        "max": max_scores,
        "reduction": scorer.image_reduction(batch),
    }


def _stad_side(
    report: Report, root: Path, size: int, n: int, c: ModuleType
) -> tuple[Any, Tensor, Tensor]:
    """stad's preset at random weights, the batch, and its copy normalised as utils.py's
    transforms.Normalize(c.norm_mean, c.norm_std) does (stad's extractor normalises inside).

    No ``method.feature_cache`` override (AST has no such key): its cache is keyed by image
    path, and batches without paths bypass it.
    """
    method, _ = op.stad_method([*PRESET, "backbone.weights=random", f"image_size={size}"])
    report.notes.append(f"official revision {op.revision(root)}; image {size} px, batch {n}")
    images = op.batch_images(size, n)
    mean = torch.tensor(c.norm_mean).view(1, 3, 1, 1)
    std = torch.tensor(c.norm_std).view(1, 3, 1, 1)
    return method, images, (images - mean) / std


def _calibrate_and_copy(
    report: Report,
    method: Any,
    extractor: nn.Module,
    teacher: nn.Module,
    student: nn.Module,
    x: Tensor,
) -> KeyMap:
    """BatchNorm of the extractor and the student calibrated, gammas drawn, tensors copied;
    returns the key map (the gradient rows map back through it)."""
    op.randomise_batchnorm([extractor], lambda: extractor(x))
    extractor.eval()
    with torch.no_grad():
        feat = extractor(x)
    pos = teacher.pos_enc.tile(feat.shape[0], 1, 1, 1)
    op.randomise_batchnorm([student.net], lambda: student.net([pos, feat]))
    randomise_gammas(teacher.net)
    key_map = ast_key_map(*_official_layout(extractor, teacher, method), n_blocks=4)
    official = {"fe": extractor, "flow": teacher.net, "st": student.net}
    unused, _ = op.copy_by_key_map(method, official, key_map)
    report.notes.append(f"official tensors stad does not use: {_unused_summary(unused)}")
    report.notes.append(
        "official EfficientNet.from_pretrained replaced by from_name while building (no "
        "download); flow gammas drawn in [0.5, 1) (0 at init: identity flow)"
    )
    return key_map


def _count_rows(
    report: Report,
    method: Any,
    key_map: KeyMap,
    extractor: nn.Module,
    teacher: nn.Module,
    student: nn.Module,
) -> None:
    """Parameter counts per component (official: the tensors the forward computes with)."""
    used = sum(p.numel() for name, p in extractor.named_parameters() if key_map(f"fe.{name}"))
    report.count("feature extractor (stem + blocks 0..35)", op.count(method.teacher.features), used)
    report.count("teacher flow", op.count(method.teacher.flow), op.count(teacher.net))
    gamma = student.net.gamma.numel()
    report.count(
        "student (official without its unused gamma)",
        op.count(method.student),
        op.count(student.net) - gamma,
    )


def _eval_rows(
    report: Report,
    method: Any,
    teacher: nn.Module,
    official: dict[str, Tensor],
    batch: dict[str, Any],
) -> None:
    """Evaluation mode, the official features on both sides (before any training step moves
    BatchNorm statistics)."""
    ours = _stad_eval(method, batch)
    n = ours["x"].shape[0]
    report.compare(
        "positional encoding (model.py positionalencoding2d)",
        ours["cond"],
        teacher.pos_enc.tile(n, 1, 1, 1),
    )
    report.compare("teacher output z (eval)", ours["z"], official["z"])
    report.compare("teacher log-Jacobian (eval)", ours["jac"], official["jac"])
    report.compare("student output (eval)", ours["student"], official["student"])
    report.compare("anomaly map before upsampling (st_pixel, grid)", ours["grid"], official["grid"])
    _map_and_score_rows(report, ours, official, "")
    report.notes.append(
        f"stad's image score on MVTec AD: {ours['reduction']} (reduction "
        f"{method.scorer.reduction!r}); eval.py reports both. |z| up to "
        f"{official['z'].abs().max():.3g}: the official clamp of each coupling output to "
        "±1e6, which stad lacks, is not reached"
    )


def _map_and_score_rows(
    report: Report, ours: dict[str, Tensor], official: dict[str, Tensor], suffix: str
) -> None:
    """The final map at the official resolution and at stad's, and the two image scores."""
    maps, fine = ours["maps"], official["fine"]
    factor = maps.shape[-1] // fine.shape[-1]
    report.compare(
        f"final map at the official {fine.shape[-1]} px (×8 bicubic){suffix}",
        maps[:, ::factor, ::factor],
        fine,
    )
    held = fine.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    report.compare(
        f"final map at stad's {maps.shape[-1]} px (official held {factor}×{factor}){suffix}",
        maps,
        held,
    )
    preset_mean = ours["reduction"] == "mean"
    report.compare(
        f"image score: mean over the map (st_loss per sample){suffix}",
        ours["mean"],
        official["mean"],
        used=preset_mean,
    )
    report.compare(
        f"image score: max over the ×8 map{suffix}",
        ours["max"],
        official["max"],
        used=not preset_mean,
    )
    if not suffix:
        report.notes.append(
            f"stad evaluates the map at {maps.shape[-1]} px (each pixel of the official "
            f"{fine.shape[-1]}-px map held over {factor}×{factor}); the presets hold masks made "
            f"at {fine.shape[-1]} px the same way (eval_protocol.mask_downscale), so pixel "
            "metrics equal the official ones at that size"
        )


def _end_to_end_rows(
    report: Report, method: Any, official: dict[str, Tensor], batch: dict[str, Any]
) -> None:
    """Map and scores again, stad's features from its own float32 extractor."""
    _map_and_score_rows(report, _stad_eval(method, batch), official, ", stad's own features")


def _training_rows(
    report: Report,
    mods: dict[str, ModuleType],
    method: Any,
    key_map: KeyMap,
    teacher: nn.Module,
    student: nn.Module,
    feat: Tensor,
    batch: dict[str, Tensor],
) -> None:
    """One training step of each stage: loss and gradients (no optimizer step)."""
    official_loss = official_teacher_step(mods, teacher, feat)
    method.train()
    loss = method.stages[0].loss(method, batch)["loss"]
    loss.backward()
    report.compare("teacher training loss (get_nf_loss, NLL)", loss, official_loss)
    report.compare(
        "gradients of every teacher-flow parameter",
        *_grads_in_stad_order(method.teacher.flow, "teacher.flow.", {"flow": teacher.net}, key_map),
    )
    official_z, official_st_loss = official_student_step(mods, teacher, student, feat)
    with torch.no_grad():
        targets = method.teacher(batch)
    z = method.student(batch, targets)[0]
    report.compare("student output (training mode)", z, official_z)
    st_loss = method.stages[1].loss(method, batch)["loss"]
    st_loss.backward()
    report.compare("student training loss (get_st_loss)", st_loss, official_st_loss)
    report.compare(
        "gradients of every student parameter",
        *_grads_in_stad_order(method.student, "student.", {"st": student.net}, key_map),
    )
    extractor_grads = [p.grad for p in method.teacher.features.parameters() if p.grad is not None]
    if extractor_grads:
        report.notes.append("stad's extractor received gradients: it should be frozen")


def _three_d_rows(report: Report, mods: dict[str, ModuleType], size: int, n: int) -> None:
    """The 3-D branch (MVTec 3D-AD presets only): depth channels and the foreground weight."""
    c, utils = mods["config"], mods["utils"]
    depth = op.batch_images(size, n, seed=4)[:, :1] * 100 - 50
    fg = (op.batch_images(size, n, seed=5)[:, :1] > 0.6).float()
    transform = utils.DefectDataset.transform  # uses nothing of self
    official_depth = torch.stack(
        [transform(None, d[0].numpy(), c.depth_len, binary=False) for d in depth]
    )
    official_fg = torch.stack([transform(None, f[0].numpy(), c.depth_len, binary=True) for f in fg])
    official_fg = utils.dilation(official_fg, c.dilate_size)
    official_fg = utils.downsampling(official_fg, (c.map_len, c.map_len), bin=False)
    grid = (c.map_len, c.map_len)
    report.compare(
        "3-D only: depth channels (resize to depth_len, PixelUnshuffle 8)",
        depth_channels(depth, grid),
        nn.PixelUnshuffle(c.depth_downscale)(official_depth),
        used=False,
    )
    report.compare(
        "3-D only: foreground weight (binarise, dilate 8×8, downsample)",
        foreground_weight(fg, grid),
        official_fg,
        used=False,
    )
