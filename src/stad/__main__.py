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
        if multirun:
            log.error("%s", err)
            raise  # this job fails; the sweeper runs the others and reports it
        _log_to_files(str(err))  # the run's log keeps it; the terminal shows it once, below
        print(f"stad: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def _log_to_files(message: str) -> None:
    """An error record for the file handlers only (Hydra's run log), not the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


# Plugins a config group option needs, and the extra that installs them.
PLUGINS = {
    "hydra/launcher": {
        "joblib": "hydra_plugins.hydra_joblib_launcher",
        "submitit_local": "hydra_plugins.hydra_submitit_launcher",
        "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
    },
    "hydra/sweeper": {"optuna": "hydra_plugins.hydra_optuna_sweeper"},
}


def missing_plugin(argv: list[str]) -> str | None:
    """The message for a launcher/sweeper option whose Hydra plugin is not installed (Hydra
    itself would say only that it cannot find the config), else None."""
    import importlib.util

    for arg in argv:
        group, _, option = arg.lstrip("+").partition("=")
        module = PLUGINS.get(group, {}).get(option)
        if module is not None and importlib.util.find_spec(module) is None:
            return (
                f"{group}={option} needs the Hydra plugin {module.split('.')[-1]}, which is not "
                "installed; install the sweep extra: pip install 'stad[sweep]'"
            )
    return None


def main() -> None:
    """Console entry point (``stad`` and ``python -m stad``)."""
    message = missing_plugin(sys.argv[1:])
    if message:
        print(f"stad: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    _app()


if __name__ == "__main__":
    main()
