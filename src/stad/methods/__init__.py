"""The methods of the student-teacher line, by name: each module builds a Method from its config."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from stad.core import Method
from stad.errors import lookup
from stad.methods import aand, ast, dskd, rd, stfpm, us

Builder = Callable[[DictConfig, DictConfig], Method]

METHODS: dict[str, Builder] = {
    "stfpm": stfpm.build,
    "ast": ast.build,
    "rd": rd.build,
    "dskd": dskd.build,
    "us": us.build,
    "aand": aand.build,
}


def build_method(cfg: DictConfig, backbone: DictConfig) -> Method:
    """The Method a ``method`` config names, on the given backbone config."""
    builder = lookup(METHODS, "method", cfg.name)
    return builder(cfg, backbone)
