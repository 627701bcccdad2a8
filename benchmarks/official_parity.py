"""Parity with the official code: stad's paper presets against the methods' own repositories.

    python benchmarks/official_parity.py --method rd --official /path/to/RD4AD
    python benchmarks/official_parity.py --method stfpm --official /path/to/STFPM
    python benchmarks/official_parity.py --method ast --official /path/to/AST     # parity_ast.py
    python benchmarks/official_parity.py --method aand --official /path/to/AAND   # parity_aand.py
    python benchmarks/official_parity.py --method efficientad --official /path/to/EfficientAD
    python benchmarks/official_parity.py --method rdpp --official /path/to/RD++   # parity_rdpp.py
    python benchmarks/official_parity.py --method destseg --official /path/to/ml-destseg

``--official`` is a checkout of the method's official repository (RD4AD: github hq-deng/RD4AD;
STFPM: github gdwang08/STFPM), given by path: stad never downloads it and installs nothing.
Both sides are built at random initialisation; the official weights are copied into stad's
modules by an explicit key map (every stad key covered, every shape checked, the official keys
stad does not use listed); BatchNorm layers get random affine parameters and statistics from
a forward pass in training mode (so deep random networks stay input-dependent); both sides get
the same batch at the preset's resolution. One row per compared quantity: teacher features,
student/decoder outputs, training loss, gradients, every intermediate map, final map, image
score, plus parameter counts. The script exits non-zero unless every quantity agrees to
``--tolerance`` (default 1e-5) relative to the official value's largest magnitude.

The official code's own imports must be importable (RD4AD and STFPM need only torch,
torchvision, numpy and scipy, which stad already has; STFPM's scripts import cv2 and sklearn
at module level, so its networks and formulas are re-stated here from its main.py where cv2 is
missing, which is said in the row).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from scipy.ndimage import gaussian_filter
from torch import Tensor, nn

from stad.methods import build_method
from stad.methods.common import resize

# -- comparison --------------------------------------------------------------------------------


@dataclass
class Report:
    """Rows of compared quantities and the notes of one method's parity run."""

    method: str
    tolerance: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def compare(self, name: str, ours: Any, official: Any, used: bool = True) -> None:
        """Add a row: relative error = max |ours − official| / max |official|."""
        a = _flat(ours)
        b = _flat(official)
        if a.shape != b.shape:
            self.rows.append(
                {"quantity": name, "error": float("inf"), "shape": f"{a.shape} vs {b.shape}"}
            )
            return
        scale = max(float(b.abs().max()), 1e-30)
        error = float((a - b).abs().max()) / scale
        self.rows.append(
            {"quantity": name, "error": error, "shape": str(tuple(a.shape)), "used": used}
        )

    def count(self, name: str, ours: int, official: int) -> None:
        """A parameter-count row (equal or not)."""
        self.rows.append(
            {
                "quantity": f"parameters: {name}",
                "error": 0.0 if ours == official else float("inf"),
                "shape": f"stad {ours:,} / official {official:,}",
                "used": True,
            }
        )

    @property
    def passed(self) -> bool:
        return all(r["error"] <= self.tolerance for r in self.rows if r.get("used", True))

    def print(self) -> None:
        width = max(len(r["quantity"]) for r in self.rows)
        print(f"\n{self.method}: tolerance {self.tolerance:g} (relative)")
        for row in self.rows:
            verdict = "ok" if row["error"] <= self.tolerance else "DIFFERS"
            if not row.get("used", True):
                verdict += " (not used by the preset)"
            print(f"  {row['quantity']:<{width}}  {row['error']:.2e}  {verdict:<8} {row['shape']}")
        for note in self.notes:
            print(f"  note: {note}")
        print(f"{self.method}: {'PASS' if self.passed else 'FAIL'}")


def _flat(value: Any) -> Tensor:
    if isinstance(value, list | tuple):
        return torch.cat([_flat(v) for v in value])
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor):
        value = torch.tensor(value)
    return value.detach().double().reshape(-1)


# -- weights -----------------------------------------------------------------------------------


def copy_by_key_map(
    ours: nn.Module, official: dict[str, nn.Module], key_map: Callable[[str], str | None]
) -> tuple[list[str], list[str]]:
    """Copy every official tensor whose key maps to a stad key; return the official keys that
    map to nothing (unused by stad) and raise unless every stad key was filled with its shape.

    ``official`` names the official modules by prefix (``enc``, ``bn``, ...); ``key_map`` turns
    ``"<prefix>.<official key>"`` into a stad key, or None for an official tensor stad lacks.
    """
    target = ours.state_dict()
    filled: set[str] = set()
    unused: list[str] = []
    for prefix, module in official.items():
        for key, tensor in module.state_dict().items():
            mapped = key_map(f"{prefix}.{key}")
            if mapped is None:
                unused.append(f"{prefix}.{key}")
                continue
            if mapped not in target:
                raise KeyError(f"{prefix}.{key} maps to {mapped}, which stad does not have")
            if target[mapped].shape != tensor.shape:
                shapes = f"{tuple(tensor.shape)} -> {mapped} {tuple(target[mapped].shape)}"
                raise ValueError(f"{prefix}.{key} {shapes}")
            if mapped in filled:
                raise KeyError(f"two official tensors map to {mapped}")
            target[mapped] = tensor.detach().clone()
            filled.add(mapped)
    missing = sorted(set(target) - filled)
    if missing:
        raise KeyError(f"{len(missing)} stad tensors have no official source, e.g. {missing[:5]}")
    ours.load_state_dict(target, strict=True)
    return unused, sorted(filled)


def randomise_batchnorm(modules: Sequence[nn.Module], calibration: Callable[[], Any]) -> None:
    """Random BatchNorm affine parameters, then running statistics from one forward pass in
    training mode with cumulative averaging (so evaluation mode is input-dependent and equal
    on both sides once copied)."""
    generator = torch.Generator().manual_seed(1)
    norms = [m for module in modules for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=generator))
            norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=generator))
            norm.reset_running_stats()
            norm.momentum = None
    modes = [m.training for m in modules]
    for module in modules:
        module.train()
    with torch.no_grad():
        calibration()
    for module, mode in zip(modules, modes, strict=True):
        module.train(mode)
    for norm in norms:
        norm.momentum = 0.1


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- the official checkout ---------------------------------------------------------------------


@contextlib.contextmanager
def official_imports(root: Path, names: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Import ``names`` from the checkout at ``root`` (its folder first on sys.path)."""
    if not root.is_dir():
        raise SystemExit(f"--official {root} is not a folder: give a checkout of the repository")
    sys.path.insert(0, str(root))
    try:
        yield {name: importlib.import_module(name) for name in names}
    except ImportError as err:
        raise SystemExit(
            f"the official code in {root} needs a package stad does not have ({err}); install it "
            "in a scratch environment (never stad's), e.g. python -m venv /tmp/parity"
        ) from err
    finally:
        sys.path.remove(str(root))
        for name in names:
            sys.modules.pop(name, None)


def revision(root: Path) -> str:
    """The checkout's commit, when it is a git work tree."""
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True)
    return out.stdout.decode().strip() or "unknown (not a git work tree)"


# The frozen-feature cache registers the teacher's extractor a second time (same tensors); the
# harness compares fresh teacher passes, as the first epoch computes them.
_NO_CACHE = ["method.feature_cache=false"]


# Extra stad overrides from --set (e.g. a switch's non-official value, to see what it moves).
_EXTRA: list[str] = []


def stad_method(overrides: list[str]) -> Any:
    with initialize_config_module(config_module="stad.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[*overrides, *_EXTRA])
    return build_method(cfg.method, cfg.backbone), cfg


def batch_images(size: int, n: int, seed: int = 0) -> Tensor:
    """Smooth random images in [0, 1] (a blurred noise field: more image-like than white
    noise, so features vary over the grid)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def normalised(images: Tensor, extractor: Any) -> Tensor:
    """The official codes normalise in the data pipeline; stad's extractor does it inside."""
    mean = torch.as_tensor(extractor.mean).view(1, 3, 1, 1)
    std = torch.as_tensor(extractor.std).view(1, 3, 1, 1)
    return (images - mean) / std


def _stad_side(report: Report, root: Path, preset: list[str], size: int, n: int) -> tuple:
    """stad's method at random weights for ``preset``, the shared batch, and its normalised
    copy for the official side; the revision and size go to the report's notes."""
    method, _ = stad_method([*preset, "backbone.weights=random", f"image_size={size}", *_NO_CACHE])
    report.notes.append(f"official revision {revision(root)}; image {size} px, batch {n}")
    images = batch_images(size, n)
    return method, images, normalised(images, method.teacher.extractor)


# -- RD4AD -------------------------------------------------------------------------------------

_BLOCK = {
    "conv1": "body.0",
    "bn1": "body.1",
    "conv2": "body.3",
    "bn2": "body.4",
    "conv3": "body.6",
    "bn3": "body.7",
    "downsample.0": "shortcut.0",
    "downsample.1": "shortcut.1",
    "upsample.0": "shortcut.0",
    "upsample.1": "shortcut.1",
}
_OCBE = {
    "conv1": "downsample.0.0.0",
    "bn1": "downsample.0.0.1",
    "conv2": "downsample.0.1.0",
    "bn2": "downsample.0.1.1",
    "conv3": "downsample.1.0.0",
    "bn3": "downsample.1.0.1",
}


def _block_key(rest: str) -> str | None:
    for official, ours in sorted(_BLOCK.items(), key=lambda kv: -len(kv[0])):
        if rest.startswith(official + "."):
            return ours + rest[len(official) :]
    return None


def rd_key_map(key: str) -> str | None:
    """RD4AD (resnet.py wide_resnet50_2 + BN_layer, de_resnet.py de_wide_resnet50_2) → stad."""
    prefix, rest = key.split(".", 1)
    if prefix == "enc":
        if rest.startswith(("layer4.", "fc.")):
            return None  # the encoder's last stage and classifier: not a teacher level
        return f"teacher.extractor.model.{rest}"
    if prefix == "bn":
        if m := re.match(r"bn_layer\.(\d+)\.(.+)", rest):
            block = _block_key(m.group(2))
            return f"student.bottleneck.embed.{m.group(1)}.{block}" if block else None
        name, tail = rest.split(".", 1)
        if name in _OCBE:
            return f"student.bottleneck.{_OCBE[name]}.{tail}"
        return None  # conv4 / bn4: built but never called in BN_layer.forward
    if m := re.match(r"layer(\d)\.(\d+)\.(.+)", rest):
        block = _block_key(m.group(3))
        return f"student.decoder.stages.{int(m.group(1)) - 1}.{m.group(2)}.{block}"
    return None


def rd_parity(root: Path, size: int, n: int, tolerance: float) -> Report:
    report = Report("rd", tolerance)
    with official_imports(root, ["resnet", "de_resnet"]) as mods:
        torch.manual_seed(0)
        encoder, bn = mods["resnet"].wide_resnet50_2(pretrained=False)
        decoder = mods["de_resnet"].de_wide_resnet50_2(pretrained=False)
    method, images, x = _stad_side(report, root, ["method=rd", "backbone=wide_resnet50_2"], size, n)
    encoder.eval()
    randomise_batchnorm([encoder, bn, decoder], lambda: decoder(bn(encoder(x))))
    unused, _ = copy_by_key_map(method, {"enc": encoder, "bn": bn, "dec": decoder}, rd_key_map)
    report.notes.append(f"official tensors stad does not use: {_summary(unused)}")
    report.count(
        "teacher (layer1..3)", count(method.teacher), _count_prefix(encoder, "layer4", "fc")
    )
    report.count("OCBE", count(method.student.bottleneck), _count_prefix(bn, "conv4", "bn4"))
    report.count("decoder", count(method.student.decoder), count(decoder))

    # training: encoder frozen in eval mode, OCBE + decoder in training mode (main.py train)
    bn.train(), decoder.train()
    method.train()
    inputs = encoder(x)
    outputs = decoder(bn(inputs))
    official_loss = sum(
        torch.mean(1 - F.cosine_similarity(a.view(a.shape[0], -1), b.view(b.shape[0], -1)))
        for a, b in zip(inputs, outputs, strict=True)
    )
    official_loss.backward()
    batch = {"image": images, "mask": torch.zeros(n, 1, size, size), "label": torch.zeros(n)}
    loss = method.stages[0].loss(method, batch)["loss"]
    loss.backward()
    report.compare("training loss", loss, official_loss)
    report.compare(
        "gradients (all OCBE + decoder parameters)",
        _grads(method.student, ("bottleneck", "decoder")),
        _official_grads(method.student, {"bn": bn, "dec": decoder}, rd_key_map),
    )

    # evaluation (test.py evaluation + cal_anomaly_map, amap_mode='a', batch 1 per image)
    method.eval(), bn.eval(), decoder.eval()
    with torch.no_grad():
        inputs = encoder(x)
        outputs = decoder(bn(inputs))
        targets = method.teacher(batch)
        preds = method.student(batch, targets)
        maps, scores = method.scorer(targets, preds, batch)
    report.compare("teacher features", list(targets), inputs)
    report.compare("decoder outputs", list(preds), outputs)
    official_levels, official_maps, official_scores = _rd_official_maps(inputs, outputs, size)
    scorer = method.scorer
    levels = [
        resize(scorer.distance(t.float(), s.float()), (size, size), scorer.align_corners)
        for t, s in zip(targets, preds, strict=True)
    ]
    for i, (ours, official) in enumerate(zip(levels, official_levels, strict=True)):
        report.compare(f"level {i + 1} map (upsampled)", ours[:, 0], official)
    report.compare("final map (summed, Gaussian σ=4)", maps[:, 0], official_maps)
    report.compare("image score (max)", scores, official_scores)
    report.notes.append(
        f"stad scorer: align_corners={scorer.align_corners}, blur border "
        f"{scorer.blur.border!r}; eval_protocol.mask_rule of the preset: antialiased_half"
    )
    return report


def _rd_official_maps(
    inputs: list[Tensor], outputs: list[Tensor], size: int
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    levels, maps, scores = [[] for _ in inputs], [], []
    for i in range(inputs[0].shape[0]):
        total = np.zeros([size, size])
        for k, (ft, fs) in enumerate(zip(inputs, outputs, strict=True)):
            a_map = 1 - F.cosine_similarity(fs[i : i + 1], ft[i : i + 1])
            a_map = F.interpolate(a_map[:, None], size=size, mode="bilinear", align_corners=True)
            level = a_map[0, 0].numpy()
            levels[k].append(level)
            total += level
        blurred = gaussian_filter(total, sigma=4)
        maps.append(blurred)
        scores.append(blurred.max())
    return [np.stack(level) for level in levels], np.stack(maps), np.array(scores)


# -- STFPM -------------------------------------------------------------------------------------

_STFPM_STEM = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}


def stfpm_key_map(key: str) -> str | None:
    """STFPM (main.py ResNet18_MS3: torchvision resnet18 children[:-2]) → stad."""
    prefix, _, index, rest = key.split(".", 3)
    side = {"teacher": "teacher", "student": "student"}[prefix]
    if index not in _STFPM_STEM:
        return None  # model.7 = layer4: computed by the official forward, never used
    return f"{side}.extractor.model.{_STFPM_STEM[index]}.{rest}"


def stfpm_parity(root: Path, size: int, n: int, tolerance: float) -> Report:
    report = Report("stfpm", tolerance)
    ms3 = _stfpm_network(root, report)
    torch.manual_seed(0)
    teacher, student = ms3(), ms3()
    method, images, x = _stad_side(report, root, ["method=stfpm", "backbone=resnet18"], size, n)
    randomise_batchnorm([teacher, student], lambda: (teacher(x), student(x)))
    unused, _ = copy_by_key_map(method, {"teacher": teacher, "student": student}, stfpm_key_map)
    report.notes.append(f"official tensors stad does not use: {_summary(unused)}")
    report.count(
        "teacher (conv1..layer3)", count(method.teacher), _count_prefix(teacher, "model.7")
    )
    report.count(
        "student (conv1..layer3)", count(method.student), _count_prefix(student, "model.7")
    )

    # training (main.py train_val: teacher eval, student train, SGD on the summed level loss)
    teacher.eval(), student.train()
    method.train()
    t_feat = [F.normalize(f, dim=1) for f in teacher(x)]
    s_feat = [F.normalize(f, dim=1) for f in student(x)]
    pairs = zip(t_feat, s_feat, strict=True)
    official_loss = sum(torch.sum((t - s) ** 2, 1).mean() for t, s in pairs)
    official_loss.backward()
    batch = {"image": images, "mask": torch.zeros(n, 1, size, size), "label": torch.zeros(n)}
    loss = method.stages[0].loss(method, batch)["loss"]
    loss.backward()
    report.compare("training loss", loss, official_loss)
    report.compare(
        "gradients (all student parameters)",
        _grads(method.student, ("extractor",)),
        _official_grads(method.student, {"student": student}, stfpm_key_map, strip="student."),
    )

    # evaluation (main.py test + the cv2.resize of the 64×64 map to 256)
    teacher.eval(), student.eval()
    method.eval()
    with torch.no_grad():
        t_raw, s_raw = teacher(x), student(x)
        targets = method.teacher(batch)
        preds = method.student(batch, targets)
        maps, scores = method.scorer(targets, preds, batch)
    report.compare("teacher features", list(targets), [f[:, :, :, :] for f in t_raw])
    report.compare("student features", list(preds), list(s_raw))
    score_map = torch.ones(n, 1, 64, 64, dtype=torch.float64)
    for j, (t, s) in enumerate(zip(t_raw, s_raw, strict=True)):
        sm = torch.sum((F.normalize(t, dim=1) - F.normalize(s, dim=1)) ** 2, 1, keepdim=True)
        sm = F.interpolate(sm, size=(64, 64), mode="bilinear", align_corners=False)
        ours = resize(
            ((F.normalize(targets[j], dim=1) - F.normalize(preds[j], dim=1)) ** 2).sum(1, True),
            (64, 64),
        )
        report.compare(f"level {j + 1} map (at 64×64)", ours, sm)
        score_map = score_map * sm.double()
    final = _stfpm_upsample(score_map[:, 0].numpy(), size, report)
    report.compare("final map (product, to input size)", maps[:, 0], final)
    report.compare("image score (max)", scores, final.reshape(n, -1).max(1))
    report.compare(
        "held-out split (train_test_split, random_state=0)", *_stfpm_split(209), used=True
    )
    report.notes.append(
        f"student init of the preset: {method.info.get('student_init')} (official: torchvision); "
        "parity of the networks is checked on copied weights, the init by tests/test_stfpm.py"
    )
    return report


def _stfpm_network(root: Path, report: Report) -> Callable[[], nn.Module]:
    """The official ResNet18_MS3, imported from main.py where its imports resolve, else
    re-stated from it (torchvision resnet18 without avgpool and fc; levels 4, 5, 6)."""
    try:
        with official_imports(root, ["main"]) as mods:
            return lambda: mods["main"].ResNet18_MS3(pretrained=False)
    except SystemExit as err:
        report.notes.append(f"main.py not importable here ({err}); ResNet18_MS3 re-stated")
    import torchvision

    class ResNet18MS3(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            net = torchvision.models.resnet18(weights=None)
            self.model = nn.Sequential(*list(net.children())[:-2])

        def forward(self, x: Tensor) -> list[Tensor]:
            out = []
            for name, module in self.model._modules.items():
                x = module(x)
                if name in ("4", "5", "6"):
                    out.append(x)
            return out

    return ResNet18MS3


def _stfpm_upsample(maps: np.ndarray, size: int, report: Report) -> np.ndarray:
    try:
        import cv2
    except ImportError:
        report.notes.append(
            "cv2 not installed: the official cv2.resize (bilinear, half-pixel) of the 64×64 map "
            "is computed with F.interpolate(align_corners=False), its float equivalent"
        )
        tensor = torch.from_numpy(maps)[:, None]
        return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[
            :, 0
        ].numpy()
    return np.stack([cv2.resize(m, (size, size)) for m in maps])


def _stfpm_split(n: int) -> tuple[list[int], list[int]]:
    from stad.data.datamodule import split_indices

    train, val = split_indices(n, 0.2, seed=7, rule="sklearn", random_state=0)
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:
        return train + val, train + val
    official_train, official_val = train_test_split(list(range(n)), test_size=0.2, random_state=0)
    return train + val, sorted(official_train) + sorted(official_val)


# -- shared helpers ----------------------------------------------------------------------------


def _grads(module: nn.Module, prefixes: Sequence[str]) -> list[Tensor]:
    return [
        p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
        for name, p in module.named_parameters()
        if name.startswith(tuple(prefixes))
    ]


def _official_grads(
    student: nn.Module,
    official: dict[str, nn.Module],
    key_map: Callable[[str], str | None],
    strip: str = "student.",
) -> list[Tensor]:
    """The official gradients in the order of stad's parameters (through the key map; stad's
    keys are ``strip`` + the parameter's name in ``student``); a missing one is NaN, so it
    fails the comparison."""
    by_stad_key: dict[str, Tensor] = {}
    for prefix, module in official.items():
        for key, p in module.named_parameters():
            mapped = key_map(f"{prefix}.{key}")
            if mapped is not None and p.grad is not None:
                by_stad_key[mapped] = p.grad.reshape(-1)
    order = [f"{strip}{name}" for name, _ in student.named_parameters()]
    return [by_stad_key.get(k, torch.full((1,), float("nan"))) for k in order]


def _count_prefix(module: nn.Module, *excluded: str) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if not name.startswith(excluded))


def _summary(keys: list[str]) -> str:
    if not keys:
        return "none"
    heads = sorted({".".join(k.split(".")[:3]) for k in keys})
    return f"{len(keys)} tensors ({', '.join(heads[:8])}{', ...' if len(heads) > 8 else ''})"


def _elsewhere(module: str, name: str) -> Callable[..., Report]:
    """A method's harness kept in its own file beside this one (benchmarks/<module>.py)."""

    def run(*args: Any) -> Report:
        return getattr(importlib.import_module(module), name)(*args)

    return run


PARITY = {
    "rd": rd_parity,
    "stfpm": stfpm_parity,
    "ast": _elsewhere("parity_ast", "ast_parity"),
    "aand": _elsewhere("parity_aand", "aand_parity"),
    "efficientad": _elsewhere("parity_efficientad", "efficientad_parity"),
    "rdpp": _elsewhere("parity_rdpp", "rdpp_parity"),
    "destseg": _elsewhere("parity_destseg", "destseg_parity"),
}
# The presets' resolutions: AST 768 px (its MVTec AD setting), every other 256 px.
SIZES = {
    "rd": 256,
    "stfpm": 256,
    "ast": 768,
    "aand": 256,
    "efficientad": 256,
    "rdpp": 256,
    "destseg": 256,
}


def _finite(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for strict JSON: a non-finite error (a count or shape mismatch) as the string "inf"."""
    return [
        {k: ("inf" if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}
        for row in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(PARITY), required=True)
    parser.add_argument("--official", type=Path, required=True, help="official checkout")
    parser.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a stad config override on top of the preset (repeatable)",
    )
    args = parser.parse_args()
    # The harnesses in their own files import this module by name: let them see this copy
    # (run as a script it is __main__), so --set reaches them.
    sys.modules.setdefault("official_parity", sys.modules[__name__])
    _EXTRA.extend(args.set)
    torch.use_deterministic_algorithms(True, warn_only=True)
    size = args.image_size or SIZES[args.method]
    report = PARITY[args.method](args.official.resolve(), size, args.batch, args.tolerance)
    report.print()
    if args.json:
        args.json.write_text(
            json.dumps(
                {"method": report.method, "rows": _finite(report.rows), "notes": report.notes},
                indent=2,
                allow_nan=False,
                default=str,
            )
        )
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
