"""Command line: ``python -m stad.pretrain method=<name> [overrides]`` pretrains and caches the
parts of a method that train before (and apart from) any run, e.g. Uninformed Students' patch
teachers, and prints where they were saved. Runs reuse the cached results.

It composes the same config as ``python -m stad`` (so the same overrides apply) and writes no
run directory.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig

from stad.errors import StadError, lookup

log = logging.getLogger("stad")

Pretrainer = Callable[[DictConfig, DictConfig], dict[str, Path]]


def pretrainers() -> dict[str, Pretrainer]:
    """Methods with a pretraining step, by name: ``pretrain(method_cfg, backbone_cfg)`` returns
    the saved files by part name."""
    from stad.methods import us  # heavy imports after Hydra has handled --help / --cfg

    return {"us": us.pretrain}


@hydra.main(config_path="pkg://stad.conf", config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    import torch

    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    try:
        pretrain = lookup(pretrainers(), "method with a pretraining step", cfg.method.name)
        saved = pretrain(cfg.method, cfg.backbone)
    except StadError as err:
        log.error("%s", err)
        print(f"stad.pretrain: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    for name, path in saved.items():
        print(f"{cfg.method.name} {name}: {path}", flush=True)


def main() -> None:
    """Entry point; Hydra writes nothing to disk for this command (no run directory), and it
    never sweeps (Hydra's basic sweeper, whatever the run config's sweeper is)."""
    sys.argv += [
        "hydra.output_subdir=null",
        "hydra.run.dir=.",
        "hydra/job_logging=stdout",
        "hydra/sweeper=basic",
    ]
    _app()


if __name__ == "__main__":
    main()
