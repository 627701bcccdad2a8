"""Resumable runs: the training state saved after every epoch of a stage, the state of each
finished stage, and the random-number state with them, so that a killed run started again with
``resume=true`` ends with the metrics an uninterrupted run gives.

Layout inside a run directory (removed once the run has written its record, unless
``keep_checkpoints=true``)::

    checkpoints/run.json                   config hash of the run (a resume must match it)
    checkpoints/<stage>/last.ckpt          Lightning checkpoint after the last finished epoch
    checkpoints/<stage>.done.pt            the stage's selected weights, report and RNG state

Every file is written to a temporary name and renamed, so a kill never leaves half a file, and
read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from stad.distributed import is_rank_zero
from stad.errors import StadError
from stad.fileio import write_atomic
from stad.rng import rng_state

CHECKPOINT_DIR = "checkpoints"
RUN_FILE = "run.json"


class ResumeError(StadError):
    """A run directory cannot be resumed (or must be resumed, not overwritten)."""


# -- the run directory ------------------------------------------------------------------------
def prepare(run_dir: Path, key: str, resume: bool) -> Path:
    """The checkpoint folder of a run starting in ``run_dir`` with config hash ``key``.

    Raises:
        ResumeError: the folder holds an unfinished run but ``resume`` is off, or ``resume`` is
            on and the unfinished run has another config.
    """
    folder = run_dir / CHECKPOINT_DIR
    marker = folder / RUN_FILE
    if marker.is_file():
        saved = json.loads(marker.read_text()).get("config_hash")
        # Under Lightning's launcher the other DDP processes start after rank 0 wrote the
        # marker of this very run: only rank 0 can tell a fresh run from an unfinished one.
        if not resume and is_rank_zero():
            raise ResumeError(
                f"{run_dir} holds an unfinished run; continue it with resume=true (same "
                "config), or choose a new hydra.run.dir"
            )
        if resume and saved != key:
            raise ResumeError(
                f"cannot resume {run_dir}: it was started with another config (hash "
                f"{str(saved)[:12]}, this one {key[:12]}); use the same overrides as the first "
                "start, or a new hydra.run.dir"
            )
        return folder
    if not is_rank_zero():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(marker, json.dumps({"config_hash": key}))
    return folder


def is_unfinished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a started run with checkpoints and no record (or unified
    summary) yet."""
    finished = (run_dir / "record.json").exists() or (run_dir / "unified.json").exists()
    return (run_dir / CHECKPOINT_DIR / RUN_FILE).is_file() and not finished


def clean(run_dir: Path) -> None:
    """Remove the checkpoints of a finished run (its model.safetensors holds the result)."""
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)


# -- one stage --------------------------------------------------------------------------------
def last_checkpoint(folder: Path, stage: str) -> Path:
    """Where the stage's training state after its last finished epoch is kept."""
    return folder / stage / "last.ckpt"


def save_done(folder: Path, stage: str, state: Mapping[str, Tensor], report: dict) -> None:
    """Keep a finished stage: its selected weights, its report and the random state."""
    if not is_rank_zero():
        return
    content = {
        "state": {k: v.detach().cpu().clone() for k, v in state.items()},
        "report": dict(report),
        "rng": rng_state(),
    }
    write_atomic(folder / f"{stage}.done.pt", lambda tmp: torch.save(content, tmp))
    shutil.rmtree(folder / stage, ignore_errors=True)


def load_done(folder: Path, stage: str) -> dict[str, Any] | None:
    """A finished stage's content (``state``, ``report``, ``rng``), or None if not finished."""
    path = folder / f"{stage}.done.pt"
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


class EpochCheckpoint(L.Callback):
    """Saves the stage's full training state (trainable weights, optimizer, scheduler, loop
    counters, random state) after every training epoch, atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
