"""Command line: ``python -m stad [overrides]`` (Hydra) trains and evaluates one configuration."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stad.errors import StadError

log = logging.getLogger("stad")


@hydra.main(config_path="pkg://stad.conf", config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from stad.run import run  # heavy imports after Hydra has handled --help / --cfg

    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except StadError as err:
        log.error("%s", err)
        print(f"stad: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    """Console entry point (``stad`` and ``python -m stad``)."""
    _app()


if __name__ == "__main__":
    main()
