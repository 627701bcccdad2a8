"""The ``stad`` Hydra sweeper (``hydra/sweeper=stad``, the default of ``conf/config.yaml``).

Hydra only instantiates plugins defined under the ``hydra_plugins`` package; the logic lives in
``stad.sweep`` and the options in ``conf/hydra/sweeper/stad.yaml``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from stad.sweep import (
    ALL_CATEGORIES,
    CATEGORY_KEY,
    SweepSummary,
    cartesian_jobs,
    expand_all_categories,
    report,
    varying_keys,
)


class StadSweeper(Sweeper):
    """The cartesian product of the comma lists on the command line and in
    ``hydra.sweeper.params`` (like Hydra's basic sweeper), plus: ``dataset.category=all``
    expands to the categories the job's dataset config lists; a failed job does not stop the
    others; a summary of ran / already done / skipped / failed jobs ends the sweep (and fails it
    when a job failed)."""

    def __init__(self, max_batch_size: int | None = None, params: dict | None = None) -> None:
        super().__init__()
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        params = [f"{k}={v}" for k, v in self.params.items()]
        jobs = cartesian_jobs(parser.parse_overrides([*params, *arguments]))
        jobs = expand_all_categories(jobs, self._categories)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        summary = SweepSummary(varying=varying_keys(jobs))
        returns: list[Sequence[JobReturn]] = []
        start = time.perf_counter()
        size = self.max_batch_size or max(len(jobs), 1)
        for first in range(0, len(jobs), size):
            batch = jobs[first : first + size]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=first)
            for result in results:
                summary.add(result)
            returns.append(results)
        lines = report(summary, sweep_dir, time.perf_counter() - start)
        if summary.failed:
            raise HydraException("\n".join(["some jobs failed:", *lines[1:]]))
        return returns

    def _categories(self, job: list[str]) -> list[str]:
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, job)
        categories = cfg.dataset.get("categories")
        if not categories:
            raise HydraException(
                f"{CATEGORY_KEY}={ALL_CATEGORIES}: dataset '{cfg.dataset.name}' lists no "
                "categories (dataset.categories); name them: dataset.category=a,b,c"
            )
        return [str(c) for c in categories]
