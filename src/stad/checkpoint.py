"""A trained run as a reusable artefact: one safetensors file with every weight of the method
(frozen teacher included, so scoring new images needs no network), its fitted statistics, the
resolved config, the decision thresholds and the stad version; and the safe way to load it back.

Loading never executes code from the run directory: tensors come from safetensors (no pickle),
the config is JSON, and every ``_target_`` in it must name a class of stad's own namespace or a
torch optimizer / learning-rate scheduler (a tampered run directory cannot run arbitrary code).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

import stad
from stad.backbones import weights_from_checkpoint
from stad.core import Method
from stad.errors import StadError
from stad.fileio import write_atomic

CHECKPOINT_NAME = "model.safetensors"
# Bumped whenever the layout of the file changes; a different format never loads.
CHECKPOINT_FORMAT = 1

# Modules whose classes a saved config may name besides stad's own: optimizers and schedulers.
_TORCH_TARGETS = {
    "torch.optim": torch.optim.Optimizer,
    "torch.optim.lr_scheduler": torch.optim.lr_scheduler.LRScheduler,
}


class CheckpointError(StadError):
    """A run directory holds no usable checkpoint, or one this stad cannot load."""


@dataclass
class LoadedRun:
    """A method rebuilt from a run directory, with what the run decided about it."""

    method: Method
    config: DictConfig
    run_dir: Path
    thresholds: dict[str, Any] = field(default_factory=dict)
    stad_version: str = ""

    @property
    def image_size(self) -> int:
        """The side length the method was trained at (inputs are resized to it)."""
        return int(self.config.image_size)


def save_checkpoint(
    run_dir: Path, method: Method, cfg: DictConfig, thresholds: dict[str, Any] | None = None
) -> Path:
    """Write ``run_dir/model.safetensors`` atomically and return its path."""
    state = method.state_dict().items()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state}
    metadata = {
        "format": str(CHECKPOINT_FORMAT),
        "stad_version": stad.__version__,
        "config": json.dumps(OmegaConf.to_container(cfg, resolve=True)),
        "thresholds": json.dumps(thresholds or {}),
    }
    return write_atomic(
        run_dir / CHECKPOINT_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=metadata)
    )


def read_metadata(run_dir: Path) -> dict[str, Any]:
    """The checkpoint's metadata (format, stad version, config, thresholds), checked."""
    path = checkpoint_path(run_dir)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path} is not a readable stad checkpoint ({err}); retrain the run to write it again"
        ) from None
    _check_format(raw, path)
    return {
        "format": int(raw["format"]),
        "stad_version": raw.get("stad_version", ""),
        "config": json.loads(raw["config"]),
        "thresholds": json.loads(raw.get("thresholds", "{}")),
    }


def checkpoint_path(run_dir: Path) -> Path:
    """``run_dir/model.safetensors``, or a CheckpointError that says what the folder holds."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; pass run=<a run's folder>")
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir} holds no checkpoint ({CHECKPOINT_NAME}); it is not a finished stad run "
            "(or was trained before checkpoints were saved): train it again with python -m stad"
        )
    return path


def _check_format(raw: dict[str, str], path: Path) -> None:
    if "format" not in raw or "config" not in raw:
        raise CheckpointError(f"{path} was not written by stad (no format/config metadata)")
    if raw["format"] != str(CHECKPOINT_FORMAT):
        raise CheckpointError(
            f"{path} has checkpoint format {raw['format']} (written by stad "
            f"{raw.get('stad_version', '?')}); this stad {stad.__version__} reads format "
            f"{CHECKPOINT_FORMAT}: use that stad version or retrain the run"
        )
    ours, theirs = _major_minor(stad.__version__), _major_minor(raw.get("stad_version", ""))
    if ours != theirs:
        raise CheckpointError(
            f"{path} was written by stad {raw.get('stad_version', '?')}, this is stad "
            f"{stad.__version__}; methods may differ between versions: install stad "
            f"{raw.get('stad_version', '?')} to use it, or retrain the run"
        )


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def check_targets(config: Any, where: str = "config") -> None:
    """Refuse a config that would instantiate anything outside stad and torch's optimizers."""
    if isinstance(config, dict):
        target = config.get("_target_")
        if target is not None and not is_allowed_target(str(target)):
            raise CheckpointError(
                f"{where}._target_={target!r} is not a stad class or a torch optimizer/scheduler;"
                " a saved run may only name those (was the run directory edited?)"
            )
        for key, value in config.items():
            check_targets(value, f"{where}.{key}")
    elif isinstance(config, list):
        for i, value in enumerate(config):
            check_targets(value, f"{where}[{i}]")


def is_allowed_target(target: str) -> bool:
    """``stad.*``, or a class of ``torch.optim`` / ``torch.optim.lr_scheduler`` that is an
    optimizer / scheduler (looked up without importing any other module)."""
    if target.startswith("stad.") and ".." not in target:
        return True
    module, _, name = target.rpartition(".")
    base = _TORCH_TARGETS.get(module)
    if base is None or not name.isidentifier():
        return False
    value = getattr(importlib.import_module(module), name, None)
    return isinstance(value, type) and issubclass(value, base)


def load_run(run_dir: Path | str, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the run's method from its checkpoint (offline), in eval mode on ``device``."""
    from stad.methods import build_method

    run_dir = Path(run_dir)
    meta = read_metadata(run_dir)
    check_targets(meta["config"])
    cfg = OmegaConf.create(meta["config"])
    with weights_from_checkpoint():
        method = build_method(cfg.method, cfg.backbone)
    tensors = _read_tensors(checkpoint_path(run_dir))
    _load_state(method, tensors, run_dir, cfg)
    method.eval().to(device)
    return LoadedRun(method, cfg, run_dir, meta["thresholds"], meta["stad_version"])


def _read_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); retrain the run") from None


def _load_state(method: Method, tensors: dict[str, Tensor], run_dir: Path, cfg: Any) -> None:
    expected = method.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"the checkpoint in {run_dir} does not fit method {cfg.method.name} on backbone "
            f"{cfg.backbone.name} as this stad builds it (missing {_few(missing)}; unexpected "
            f"{_few(unexpected)}; other shapes {_few(wrong)}): the run's config or stad version "
            "differs from the one that wrote it; retrain the run"
        )
    method.load_state_dict(tensors, strict=True)


def _few(keys: list[str], shown: int = 3) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
