"""Experiment trackers: where a run's training curves, test metrics, thresholds and config go.

The ``logger`` config group selects them (``conf/logger``; ``logger=[csv,tensorboard]``
combines): each entry names one of the factories below as a ``_partial_`` target with its
options, and the runner calls it once per Lightning trainer (each stage, calibration pass and
test) with the run directory and the trainer's name. After the test the runner hands the record
to :func:`log_record`, which writes the run's config as parameters and the test metrics and
thresholds as final values to every tracker that keeps them.

- ``csv``: ``<run>/logs/<name>/metrics.csv`` (Lightning's CSVLogger; always available).
- ``tensorboard``: event files under ``<run>/logs/tensorboard/<name>`` (``pip install
  'stad[tensorboard]'``); ``tensorboard --logdir outputs/`` shows every run.
- ``mlflow``: one MLflow run per stad run (every trainer logs into it, metric names prefixed with
  the trainer's name), by default in a SQLite store in the output root
  (``<output_root>/mlflow.db``; MLflow's plain-file store is retired), or ``tracking_uri``
  (``pip install 'stad[mlflow]'``).
- ``wandb``: one W&B run per stad run, offline unless ``offline=false`` after ``wandb login``
  (``pip install 'stad[wandb]'``); ``wandb sync <run>/wandb/offline-run-*`` uploads it.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from stad.errors import StadError

log = logging.getLogger("stad")

LoggerFactory = Callable[[Path, str], Any]
# Parameter values longer than this are cut (MLflow refuses values over 6000 characters).
MAX_PARAM_CHARS = 500
RUN_ID_FILE = "tracker-run-ids.txt"


def _require(module: str, extra: str, name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise StadError(
            f"logger {name} needs the {module} package, which is not installed; install it with "
            f"pip install 'stad[{extra}]' or choose another logger (e.g. logger=[csv])"
        )


def _saved_run_id(run_dir: Path, tracker: str) -> str | None:
    """The tracker run this run directory logs into (kept so later trainers and a resumed
    attempt log into the same tracker run)."""
    path = run_dir / "logs" / RUN_ID_FILE
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == tracker and value:
            return value
    return None


def _save_run_id(run_dir: Path, tracker: str, run_id: str) -> None:
    path = run_dir / "logs" / RUN_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(f"{tracker}={run_id}\n")


def _version(root: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3`` ... when a resumed run meets its earlier logs (Lightning
    would delete them)."""
    version, attempt = name, 1
    while (root / version).exists():
        attempt += 1
        version = f"{name}-{attempt}"
    return version


# -- the factories (conf/logger/*.yaml) --------------------------------------------------------
def csv(run_dir: Path, name: str) -> Any:
    """Lightning's CSVLogger: ``<run>/logs/<name>/metrics.csv``."""
    from lightning.pytorch.loggers import CSVLogger

    root = run_dir / "logs"
    return CSVLogger(save_dir=str(run_dir), name="logs", version=_version(root, name))


def tensorboard(run_dir: Path, name: str) -> Any:
    """TensorBoard event files: ``<run>/logs/tensorboard/<name>``."""
    _require("tensorboard", "tensorboard", "tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    root = run_dir / "logs" / "tensorboard"
    return TensorBoardLogger(
        save_dir=str(run_dir / "logs"),
        name="tensorboard",
        version=_version(root, name),
        default_hp_metric=False,
    )


def default_tracking_uri(output_root: str | Path) -> str:
    """A SQLite store in the output root, which every run of a sweep shares."""
    return f"sqlite:///{Path(output_root).expanduser().resolve() / 'mlflow.db'}"


def mlflow(
    run_dir: Path,
    name: str,
    tracking_uri: str | None = None,
    experiment_name: str = "stad",
    output_root: str | Path = "outputs",
) -> Any:
    """An MLflow logger writing into the stad run's one MLflow run (created by the first
    trainer), metric names prefixed with the trainer's name."""
    _require("mlflow", "mlflow", "mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    uri = tracking_uri or default_tracking_uri(output_root)
    run_id = _saved_run_id(run_dir, "mlflow")
    logger = MLFlowLogger(
        experiment_name=experiment_name,
        run_name=str(run_dir.name),
        tracking_uri=uri,
        prefix=name,
        run_id=run_id,
    )
    if run_id is None:
        _save_run_id(run_dir, "mlflow", str(logger.run_id))
    return logger


def wandb(
    run_dir: Path, name: str, project: str = "stad", offline: bool = True
) -> Any:  # pragma: no cover - needs the wandb package (an optional extra)
    """A W&B logger writing into the stad run's one W&B run (offline by default)."""
    _require("wandb", "wandb", "wandb")
    import uuid

    from lightning.pytorch.loggers import WandbLogger

    run_id = _saved_run_id(run_dir, "wandb")
    if run_id is None:
        run_id = uuid.uuid4().hex[:12]
        _save_run_id(run_dir, "wandb", run_id)
    return WandbLogger(
        name=str(run_dir.name),
        save_dir=str(run_dir),
        project=project,
        offline=offline,
        id=run_id,
        resume="allow",
        prefix=name,
    )


# -- what the runner calls --------------------------------------------------------------------
def factories(cfg: DictConfig) -> dict[str, LoggerFactory]:
    """The selected loggers' factories by name (csv alone when the config has no ``logger``)."""
    specs = cfg.get("logger")
    if specs is None:
        return {"csv": csv}
    return {str(name): instantiate(spec) for name, spec in specs.items() if spec is not None}


def trainer_loggers(cfg: DictConfig, run_dir: Path, name: str) -> list[Any]:
    """New loggers for one Lightning trainer named ``name`` (a stage, a calibration, test)."""
    return [factory(run_dir, name) for factory in factories(cfg).values()]


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as ``dotted.key -> text`` (values cut to :data:`MAX_PARAM_CHARS`)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{dotted}."))
        else:
            out[dotted] = str(value)[:MAX_PARAM_CHARS]
    return out


def final_values(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's test metrics and thresholds as ``test/<metric>`` and
    ``threshold/<kind>`` values (undefined metrics left out)."""
    values = {
        f"test/{k}": float(v)
        for k, v in (record.get("metrics") or {}).items()
        if isinstance(v, (int, float)) and math.isfinite(float(v))
    }
    for kind, threshold in (record.get("thresholds") or {}).items():
        value = threshold.get("value") if isinstance(threshold, Mapping) else None
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            values[f"threshold/{kind}"] = float(value)
    return values


def log_record(cfg: DictConfig, run_dir: Path, record: Mapping[str, Any]) -> None:
    """The run's config as parameters and its test metrics and thresholds, to every selected
    tracker (the CSV logger keeps them in the record already)."""
    params = flat_params(record.get("config") or {})
    values = final_values(record)
    for name, factory in factories(cfg).items():
        if name == "csv":
            continue
        try:
            logger = factory(run_dir, "record")
            logger.log_hyperparams(params)
            logger.log_metrics(values, step=0)
            logger.finalize("success")
        except Exception as err:  # the record is written: a tracker must not fail the run
            log.warning(
                "logger %s could not take the record (%s: %s)", name, type(err).__name__, err
            )
