"""The random state of torch, numpy and Python, captured and restored in types that
``torch.load(weights_only=True)`` reads (resumable stages, per-stage seeding of the contract)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """torch, numpy and Python random states in types ``torch.load(weights_only=True)`` reads."""
    state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    kind, keys, pos, has_gauss, gauss = state
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": list(random.getstate()),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (ints, strings) alone, the same in every process and
    Python session (unlike ``hash``, which is salted per process for strings)."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
