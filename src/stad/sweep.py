"""Sweeps: what one job of a multirun does (resume, skip, run) and the parts of the ``stad``
Hydra sweeper (``hydra_plugins/stad_sweeper``).

A job whose resolved config already has a record (same content hash, see
``stad.results.config_hash``) is not run again unless ``+force=true``; a job whose parts cannot
work together (:class:`~stad.errors.IncompatibleError`) is skipped with its reason; any other
error fails that job only. The sweeper expands ``dataset.category=all`` per dataset, runs every
job, and ends with one summary line per skipped or failed job.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from stad.errors import IncompatibleError, StadError
from stad.results import (
    FAILED_NAME,
    RECORD_NAME,
    claim_run,
    config_hash,
    find_previous_run,
    find_unfinished_run,
    lock_holder,
    read_record,
    register_run,
    register_started,
    release_claim,
    write_json_atomic,
)

log = logging.getLogger("stad")

CATEGORY_KEY = "dataset.category"
ALL_CATEGORIES = "all"
SKIPPED_NAME = "skipped.json"
SUMMARY_NAME = "sweep_summary.json"


# -- one job ----------------------------------------------------------------------------------
def run_job(cfg: DictConfig, run_dir: Path, multirun: bool) -> dict[str, Any] | float:
    """Run one configuration; in a sweep, skip it when its record exists or it is incompatible.

    Returns ``{"status": "done" | "exists" | "skipped", ...}`` (the sweeper's summary reads it),
    or the objective's value when ``objective`` is set (what an optimising sweeper minimises).

    Raises:
        IncompatibleError: outside a sweep, the combination cannot work.
        StadError: any other user-caused problem (the sweeper counts the job as failed).
    """
    key = config_hash(cfg)
    lock = None
    if multirun and _is_first_process():
        # Claimed before the look for a finished run: a launcher that finished it just now
        # released the lock after registering the run, so this one then finds it.
        lock = claim_run(cfg.output_root, key)
        if lock is None:
            return _running_elsewhere(cfg, key)
    try:
        if multirun and not cfg.get("force", False):
            previous = find_previous_run(cfg.output_root, key)
            if previous is not None:
                log.info("already done: %s (config %s); +force=true reruns it", previous, key[:12])
                if cfg.get("objective"):
                    return objective_value(read_record(previous / RECORD_NAME), str(cfg.objective))
                return {"status": "exists", "run_dir": str(previous), "config_hash": key}
        return _run_claimed(cfg, key, run_dir, multirun)
    finally:
        release_claim(lock)


def _is_first_process() -> bool:
    # Under DDP every rank runs the job; rank 0 claims it for all of them.
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def _running_elsewhere(cfg: DictConfig, key: str) -> dict[str, Any]:
    """A job another launcher is running now (its lock is held): skipped here, said so."""
    holder = lock_holder(cfg.output_root, key) or {}
    pid, host, since = (holder.get(k, "?") for k in ("pid", "host", "since"))
    where = f"pid {pid} on {host} since {since}"
    reason = (
        f"another launcher is running this job ({where}); skipped here. A lock left by a "
        f"machine that is gone: remove {Path(cfg.output_root) / 'index' / (key + '.lock')}"
    )
    log.warning("skipped: %s", reason)
    return {"status": "skipped", "reason": reason, "config_hash": key}


def _run_claimed(
    cfg: DictConfig, key: str, run_dir: Path, multirun: bool
) -> dict[str, Any] | float:
    from stad.run import run
    from stad.unified import is_unified, run_unified

    if multirun:
        run_dir = _resume_unfinished(cfg, key, run_dir)
        register_started(cfg.output_root, key, run_dir)
    try:
        record = run(cfg, run_dir, run_unified if is_unified(cfg) else None)
    except IncompatibleError as err:
        if not multirun:
            raise
        log.warning("skipped: %s", err)
        skipped = {"reason": str(err), "config_hash": key, "created": _now()}
        write_json_atomic(run_dir / SKIPPED_NAME, skipped)
        return {"status": "skipped", "reason": str(err), "config_hash": key}
    except Exception as err:
        if multirun:
            write_json_atomic(run_dir / FAILED_NAME, failure_record(cfg, key, err))
        raise
    from stad.distributed import is_rank_zero  # torch and Lightning: only once a job has run

    if is_rank_zero():
        register_run(cfg.output_root, key, run_dir)
    if cfg.get("objective"):
        return objective_value(record, str(cfg.objective))
    return {"status": "done", "run_dir": str(run_dir), "config_hash": key, **record["metrics"]}


def _resume_unfinished(cfg: DictConfig, key: str, run_dir: Path) -> Path:
    """Where this job runs: the directory of its unfinished earlier attempt (resumed), if any."""
    unfinished = find_unfinished_run(cfg.output_root, key)
    if unfinished is None or cfg.get("force", False):
        return run_dir
    log.info("resuming the unfinished run in %s (config %s)", unfinished, key[:12])
    cfg.resume = True
    return unfinished


def failure_record(cfg: DictConfig, key: str, err: BaseException) -> dict[str, Any]:
    """What the leaderboard lists for a run that failed (and never averages in)."""
    return {
        "status": "failed",
        "reason": str(err).splitlines()[0] if str(err) else type(err).__name__,
        "error": type(err).__name__,
        "dataset": cfg.dataset.name,
        "category": cfg.dataset.category,
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "seed": int(cfg.seed),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_hash": key,
        "created": _now(),
    }


def objective_value(record: dict[str, Any], name: str) -> float:
    """The validation metric a hyper-parameter sweeper optimises (never a test metric)."""
    validation = record.get("validation") or {}
    if name not in validation:
        known = ", ".join(k for k, v in validation.items() if isinstance(v, float))
        raise StadError(f"objective={name} is not a validation metric; use one of: {known}")
    return float(validation[name])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- the sweeper's parts (the Hydra plugin: hydra_plugins/stad_sweeper) ----------------------
def cartesian_jobs(overrides: Sequence[Override]) -> list[list[str]]:
    """One override list per job: the cartesian product of every comma list / ``range``.

    Raises:
        HydraException: an interval or other non-discrete sweep (the Optuna sweeper takes those).
    """
    choices: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            raise HydraException(
                f"{key}: the stad sweeper takes lists and ranges, not {override.value_type}; "
                "use hydra/sweeper=optuna for intervals"
            )
    return [list(job) for job in itertools.product(*choices.values())]


def _key_value(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def expand_all_categories(
    jobs: Sequence[Sequence[str]], categories_of: Callable[[list[str]], list[str]]
) -> list[list[str]]:
    """Replace each job's ``dataset.category=all`` by one job per category of its dataset.

    Args:
        jobs: Override lists, one per job (as Hydra's basic sweeper makes them).
        categories_of: The categories of the dataset a job's other overrides select.

    Returns:
        The jobs, in order, without repeats (``all,bottle`` runs bottle once).
    """
    out: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for job in jobs:
        wants_all = [o for o in job if _key_value(o) == (CATEGORY_KEY, ALL_CATEGORIES)]
        rest = [o for o in job if o not in wants_all]
        expanded = (
            [[*rest, f"{CATEGORY_KEY}={c}"] for c in categories_of(rest)] if wants_all else [rest]
        )
        for new in expanded:
            if tuple(new) not in seen:
                seen.add(tuple(new))
                out.append(new)
    return out


@dataclass
class SweepSummary:
    """What happened to each job of a sweep."""

    done: list[str] = field(default_factory=list)
    exists: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    # Override keys that differ between jobs: a job is named by its values of these only.
    varying: set[str] = field(default_factory=set)

    def add(self, result: JobReturn) -> None:
        """File one job's result under its outcome, with a one-line description."""
        overrides = list(result.overrides or [])
        named = [o for o in overrides if _key_value(o)[0] in self.varying]
        job = " ".join(named or overrides)
        if result.status == JobStatus.FAILED:
            self.failed.append(f"{job}: {_one_line(result._return_value)}")
            return
        value = result._return_value
        status = value.get("status", "done") if isinstance(value, dict) else "done"
        if status == "skipped":
            self.skipped.append(f"{job}: {_one_line(value.get('reason'))}")
        elif status == "exists":
            self.exists.append(f"{job}: {value.get('run_dir')}")
        else:
            self.done.append(job)

    def lines(self) -> list[str]:
        """The summary line, then one line per skipped or failed job."""
        n = sum(len(v) for v in (self.done, self.exists, self.skipped, self.failed))
        head = (
            f"sweep: {n} jobs: {len(self.done)} ran, {len(self.exists)} already done, "
            f"{len(self.skipped)} skipped, {len(self.failed)} failed"
        )
        return [
            head,
            *(f"  skipped {s}" for s in self.skipped),
            *(f"  failed  {s}" for s in self.failed),
        ]


def varying_keys(jobs: Sequence[Sequence[str]]) -> set[str]:
    """The override keys whose value is not the same in every job."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in job:
            key, value = _key_value(override)
            values.setdefault(key, set()).add(value)
    return {k for k, v in values.items() if len(v) > 1 or len(jobs) == 1}


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def report(summary: SweepSummary, sweep_dir: Path, seconds: float) -> list[str]:
    """Log the summary, write it as ``sweep_summary.json`` into the sweep directory, return it."""
    lines = summary.lines()
    for line in lines:
        log.info("%s", line)
    data = {
        **vars(summary),
        "varying": sorted(summary.varying),
        "seconds": round(seconds, 1),
        "created": _now(),
    }
    write_json_atomic(Path(sweep_dir) / SUMMARY_NAME, data)
    return lines
