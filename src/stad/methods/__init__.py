"""The methods of the student-teacher line, by name.

Each module is one method: ``build(cfg, backbone) -> Method`` and, when the method trains
something before (and apart from) its stages, ``pretrain(cfg, backbone, data) -> {part: file}``
(cached by its settings; :class:`stad.core.PretrainData`), whose files it then receives as
``build(cfg, backbone, pretrained)`` (``{}`` when a checkpoint provides every weight).
A new method is one module, one yaml in ``conf/method`` and one line in :data:`METHODS`.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from omegaconf import DictConfig

from stad.backbones import loading_checkpoint
from stad.core import Method, PretrainData
from stad.errors import lookup
from stad.methods import aand, ast, destseg, dskd, efficientad, rd, rdpp, stfpm, us

METHODS: dict[str, ModuleType] = {
    "stfpm": stfpm,
    "ast": ast,
    "rd": rd,
    "dskd": dskd,
    "us": us,
    "aand": aand,
    "efficientad": efficientad,
    "rdpp": rdpp,
    "destseg": destseg,
}


def method_module(name: str) -> ModuleType:
    """The module of a registered method.

    Raises:
        StadError: unknown method (with the known names).
    """
    return lookup(METHODS, "method", name)


def has_pretraining(name: str) -> bool:
    """Whether the method declares a pretraining step."""
    return callable(getattr(method_module(name), "pretrain", None))


def pretrain_method(
    cfg: DictConfig, backbone: DictConfig, data: PretrainData | None = None
) -> dict[str, Path]:
    """Run (or find cached) the method's pretraining step; its files by part name, ``{}`` for a
    method without one."""
    if not has_pretraining(str(cfg.name)):
        return {}
    return method_module(str(cfg.name)).pretrain(cfg, backbone, data or PretrainData())


def build_method(cfg: DictConfig, backbone: DictConfig, data: PretrainData | None = None) -> Method:
    """The Method a ``method`` config names, on the given backbone config, after its
    pretraining step (cached; skipped when a checkpoint provides every weight)."""
    module = method_module(str(cfg.name))
    if not has_pretraining(str(cfg.name)):
        return module.build(cfg, backbone)
    pretrained = {} if loading_checkpoint() else pretrain_method(cfg, backbone, data)
    method = module.build(cfg, backbone, pretrained)
    method.info.setdefault("pretrained", {k: str(v) for k, v in pretrained.items()})
    return method
