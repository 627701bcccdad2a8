"""Command line: ``python -m stad [overrides]`` (Hydra) trains and evaluates one configuration."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from stad.errors import StadError

log = logging.getLogger("stad")


def _register_sweeper() -> None:
    # Hydra finds plugins by walking the hydra_plugins package on disk, which misses an editable
    # install's import hook; registering by hand works for every kind of install.
    from hydra.core.plugins import Plugins

    from hydra_plugins.stad_sweeper.stad_sweeper import StadSweeper

    Plugins.instance().register(StadSweeper)


_register_sweeper()


@hydra.main(config_path="pkg://stad.conf", config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> Any:
    from stad.sweep import run_job  # heavy imports after Hydra has handled --help / --cfg

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        return run_job(cfg, Path(hydra_cfg.runtime.output_dir), multirun)
    except StadError as err:
        log.error("%s", err)
        if multirun:
            raise  # this job fails; the sweeper runs the others and reports it
        print(f"stad: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    """Console entry point (``stad`` and ``python -m stad``)."""
    _app()


if __name__ == "__main__":
    main()
