"""The methods of the student-teacher line, by name: each module builds a Method from its config."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from stad.core import Method
from stad.errors import StadError
from stad.methods import stfpm

Builder = Callable[[DictConfig, DictConfig], Method]

METHODS: dict[str, Builder] = {
    "stfpm": stfpm.build,
}


def build_method(cfg: DictConfig, backbone: DictConfig) -> Method:
    """The Method a ``method`` config names, on the given backbone config."""
    try:
        builder = METHODS[cfg.name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise StadError(f"unknown method '{cfg.name}'; known methods: {known}") from None
    return builder(cfg, backbone)
