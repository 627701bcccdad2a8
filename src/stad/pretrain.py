"""Command line: ``python -m stad.pretrain method=<name> [overrides]`` runs a method's
pretraining step (e.g. Uninformed Students' patch teachers) and prints where its cached results
were saved; runs of the same settings reuse them. A method without a pretraining step says so.

It composes the same config as ``python -m stad`` (so the same overrides apply) and writes no
run directory. The step is the one ``python -m stad`` runs before training
(:func:`stad.methods.pretrain_method`), with the same dataset offered to it.
"""

from __future__ import annotations

import logging
import sys
from functools import partial

import hydra
from omegaconf import DictConfig

from stad.errors import StadError

log = logging.getLogger("stad")

# Image size at which the dataset is built only to list its training files.
SCAN_SIZE = 32


def _list_training_files(dataset_cfg: DictConfig) -> list:
    from stad.data import build_dataset, training_files

    return training_files(build_dataset(dataset_cfg, SCAN_SIZE))


@hydra.main(config_path="pkg://stad.conf", config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    import torch

    # Heavy imports after Hydra has handled --help / --cfg.
    from stad.core import PretrainData
    from stad.methods import has_pretraining, pretrain_method

    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    name = str(cfg.method.name)
    try:
        if not has_pretraining(name):
            print(f"{name}: no pretraining step; nothing to do", flush=True)
            return
        data = PretrainData(train_files=partial(_list_training_files, cfg.dataset))
        saved = pretrain_method(cfg.method, cfg.backbone, data)
    except StadError as err:
        log.error("%s", err)
        print(f"stad.pretrain: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    for part, path in saved.items():
        print(f"{name} {part}: {path}", flush=True)


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
