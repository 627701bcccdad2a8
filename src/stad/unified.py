"""The unified (multi-class) setting: one model trained on the normal training images of several
categories together, then tested on each category's test set apart (UniAD, NeurIPS 2022; ADer's
benchmark).

A unified run directory holds the model, one sub-directory per category with a complete run
record (the leaderboard reads it like a single-category record; ``"setting": "unified"``), its
report and overlays, and ``unified.json``: the per-category metrics and their mean (the mean of
per-category values, as the peers compute it).

Each category keeps its own held-out normal images (the split a single-category run of that
category with the same seed would draw), so the union trains on exactly the images the
single-category runs train on. Decision thresholds are chosen on each category's held-out normals;
statistics a method fits after training (``method.calibration``, e.g. EfficientAD's map
quantiles, Uninformed Students' e/v statistics) follow ``setting.calibration``: ``per_category``
(each category's held-out normals; each category directory then holds its own checkpoint) or
``joint`` (all categories' held-out normals together; one checkpoint).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sized
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import ConcatDataset

from stad.checkpoint import save_checkpoint
from stad.core import Method
from stad.data import category_name, training_files
from stad.data.base import DatasetSplits, data_fingerprint
from stad.data.datamodule import AnomalyDataModule
from stad.distributed import is_rank_zero
from stad.errors import IncompatibleError, StadError
from stad.fileio import strict_json, write_json_atomic
from stad.results import RECORD_NAME, UNIFIED_NAME, config_hash, read_record
from stad.run import (
    build_datamodule,
    calibrate,
    check_inputs,
    check_threshold_config,
    check_writable,
    evaluate,
    load_splits,
    prepare_method,
    setup_torch,
    train,
    use_channels_last,
)

log = logging.getLogger("stad")

SUMMARY_NAME = UNIFIED_NAME
CALIBRATIONS = ("per_category", "joint")
# The metrics unified.json averages over categories (every other metric of the records too).
MAIN_METRICS = ("image_auroc", "pixel_auroc", "pro", "pixel_ap")


def is_unified(cfg: DictConfig) -> bool:
    """Whether the config asks for the unified setting (``setting=unified``)."""
    return str(OmegaConf.select(cfg, "setting.name", default="single")) == "unified"


def unified_categories(cfg: DictConfig) -> list[str]:
    """The categories trained together (``setting.categories``), checked against the dataset's.

    Raises:
        StadError: an empty list, a repeated category or one the dataset does not have.
    """
    wanted = [category_name(c) for c in (cfg.setting.get("categories") or [])]
    known = [category_name(c) for c in (cfg.dataset.get("categories") or [])]
    if not wanted:
        raise StadError(
            "setting=unified needs categories: set setting.categories=[a,b,...] or give the "
            f"dataset a categories list (dataset {cfg.dataset.name} has none)"
        )
    repeated = sorted({c for c in wanted if wanted.count(c) > 1})
    if repeated:
        raise StadError(f"setting.categories names {', '.join(repeated)} more than once")
    unknown = [c for c in wanted if known and c not in known]
    if unknown:
        raise StadError(
            f"setting.categories names {', '.join(unknown)}, which dataset {cfg.dataset.name} "
            f"does not have; its categories: {', '.join(known)}"
        )
    return wanted


def check_unified_method(cfg: DictConfig) -> None:
    """Stop (IncompatibleError: a sweep skips the job) when the method declares it cannot share
    one model across categories (``method.unified_incompatible``: the reason)."""
    reason = cfg.method.get("unified_incompatible")
    if reason:
        raise IncompatibleError(f"method {cfg.method.name} cannot run setting=unified: {reason}")


def calibration_mode(cfg: DictConfig) -> str:
    """``setting.calibration``: per_category or joint."""
    mode = str(cfg.setting.get("calibration", "per_category"))
    if mode not in CALIBRATIONS:
        raise StadError(f"setting.calibration={mode!r}; use one of {', '.join(CALIBRATIONS)}")
    return mode


def category_config(cfg: DictConfig, category: str) -> DictConfig:
    """The run config as seen by one category: ``dataset.category`` set to it (what its data,
    record and the method's per-category values read)."""
    out = cast(DictConfig, OmegaConf.merge(cfg, {"dataset": {"category": category}}))
    return out


def check_image_sizes(splits: dict[str, DatasetSplits]) -> None:
    """One model needs one input size: stop when the categories' images come at different
    sizes (every reader resizes to the run's ``image_size``, so this guards odd readers)."""
    sizes = {c: tuple(s.info.get("image_size") or ()) for c, s in splits.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{c}: {'×'.join(map(str, v)) or '?'}" for c, v in sizes.items())
        raise StadError(
            f"the categories of setting=unified come at different input sizes ({listed}); one "
            "model needs one size: set image_size (every image is resized to it)"
        )


def union_splits(
    cfg: DictConfig, datamodules: dict[str, AnomalyDataModule], splits: dict[str, DatasetSplits]
) -> DatasetSplits:
    """The training images of every category (each less its held-out normals) and the held-out
    normals of every category, as one dataset's splits."""
    trains = [dm.train_dataset for dm in datamodules.values()]
    vals = [dm.val_dataset for dm in datamodules.values()]
    n_val = sum(len(cast(Sized, v)) for v in vals)
    info = {
        "dataset": str(cfg.dataset.name),
        "category": "unified",
        "categories": list(datamodules),
        "n_train_per_category": {
            c: len(cast(Sized, dm.train_dataset)) for c, dm in datamodules.items()
        },
        "n_val_per_category": {
            c: len(cast(Sized, dm.val_dataset)) for c, dm in datamodules.items()
        },
        "image_size": next(iter(splits.values())).info.get("image_size"),
    }
    return DatasetSplits(
        train=ConcatDataset(trains),
        test=ConcatDataset([s.test for s in splits.values()]),
        info=info,
        validation=ConcatDataset(vals) if n_val else None,
    )


def union_datamodule(cfg: DictConfig, union: DatasetSplits, method: Method) -> AnomalyDataModule:
    """Loaders over the union: every category's training images shuffled together, the
    held-out normals already taken per category (no second split)."""
    return AnomalyDataModule(
        union,
        batch_size=int(cfg.trainer.batch_size or cfg.method.batch_size),
        eval_batch_size=int(cfg.trainer.eval_batch_size),
        num_workers=int(cfg.trainer.num_workers),
        # > 0 takes union.validation as it is (the per-category held-out normals)
        val_fraction=0.5 if union.validation is not None else 0.0,
        seed=int(cfg.seed),
    )


def run_unified(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train one model on every category of ``setting.categories``, test each category apart;
    returns the summary written to ``run_dir/unified.json``."""
    if (run_dir / SUMMARY_NAME).exists():
        raise StadError(f"{run_dir} already holds a unified run; choose a new hydra.run.dir")
    check_unified_method(cfg)
    categories = unified_categories(cfg)
    mode = calibration_mode(cfg)
    check_writable(run_dir)
    setup_torch(cfg)
    check_threshold_config(cfg)
    configs = {c: category_config(cfg, c) for c in categories}
    splits = {c: load_splits(cfg, configs[c].dataset) for c in categories}
    check_image_sizes(splits)
    fingerprints = {c: data_fingerprint(s) for c, s in splits.items()}

    def train_files() -> list[Path]:
        return [f for s in splits.values() for f in training_files(s)]

    method = prepare_method(cfg, train_files)
    for c in categories:
        check_inputs(method, splits[c], configs[c])
    datamodules = {c: build_datamodule(configs[c], splits[c], method) for c in categories}
    union = union_splits(cfg, datamodules, splits)
    log.info(
        "unified: training one model on %d images of %d categories (%s), nothing re-balanced",
        sum(union.info["n_train_per_category"].values()),
        len(categories),
        ", ".join(f"{c} {n}" for c, n in union.info["n_train_per_category"].items()),
    )
    channels_last = use_channels_last(cfg)
    joint = union_datamodule(cfg, union, method)
    reports = train(cfg, method, joint, run_dir, channels_last)
    if mode == "joint":
        calibrate(cfg, method, joint, run_dir, channels_last)
    shared = mode == "joint" or method.calibration is None
    checkpoint = None
    if shared and is_rank_zero():
        checkpoint = save_checkpoint(run_dir, method, cfg).name
    about = {
        "categories": categories,
        "calibration": mode if method.calibration is not None else "none",
        "n_train_per_category": union.info["n_train_per_category"],
        "n_train": sum(union.info["n_train_per_category"].values()),
    }
    records = {}
    for c in categories:
        cat_dir = run_dir / c
        if (cat_dir / RECORD_NAME).exists() and cfg.get("resume", False):
            log.info("unified: %s evaluated in an earlier attempt", c)
            records[c] = read_record(cat_dir / RECORD_NAME)
            continue
        cat_dir.mkdir(parents=True, exist_ok=True)
        if mode == "per_category":
            calibrate(configs[c], method, datamodules[c], cat_dir, channels_last)
        evaluated = evaluate(
            configs[c],
            method,
            datamodules[c],
            splits[c],
            cat_dir,
            channels_last,
            reports,
            fingerprints[c],
            checkpoint=f"../{checkpoint}" if checkpoint else None,
            extra={"setting": "unified", "unified": about},
        )
        records[c] = evaluated.record
    summary = summarise(cfg, records, about, reports)
    if is_rank_zero():
        write_json_atomic(run_dir / SUMMARY_NAME, summary)
        print_means(summary, run_dir)
    return summary


def summarise(
    cfg: DictConfig, records: dict[str, dict[str, Any]], about: dict[str, Any], reports: list
) -> dict[str, Any]:
    """Per-category metrics and their means (a metric undefined for a category is left out of
    its mean, and the mean names how many categories it averages)."""
    per_category = {c: r["metrics"] for c, r in records.items()}
    names = [m for m in MAIN_METRICS if any(m in v for v in per_category.values())]
    names += sorted(
        {m for v in per_category.values() for m in v if m not in names and "_error" not in m}
    )
    means: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for name in names:
        values = [v[name] for v in per_category.values() if v.get(name) is not None]
        if values:
            means[name] = statistics.fmean(float(x) for x in values)
            counts[name] = len(values)
    return {
        "setting": "unified",
        "dataset": str(cfg.dataset.name),
        "method": str(cfg.method.name),
        "backbone": str(cfg.backbone.name),
        "seed": int(cfg.seed),
        **about,
        "metrics": strict_json(means),
        "metrics_n_categories": counts,
        "per_category": strict_json(per_category),
        "records": {c: f"{c}/{RECORD_NAME}" for c in records},
        "train_seconds": {r.name: round(r.seconds, 3) for r in reports},
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_hash": config_hash(cfg),
    }


def print_means(summary: dict[str, Any], run_dir: Path) -> None:
    """The per-category table and the mean on stdout."""
    names = [m for m in MAIN_METRICS if m in summary["metrics"]]
    width = max(len(c) for c in [*summary["per_category"], "mean"])
    head = f"{'category':<{width}}  " + "  ".join(f"{n:>11}" for n in names)
    lines = [f"unified {summary['method']} on {summary['dataset']}", head]
    for c, metrics in [*summary["per_category"].items(), ("mean", summary["metrics"])]:
        cells = ["       null" if metrics.get(n) is None else f"{metrics[n]:>11.4f}" for n in names]
        lines.append(f"{c:<{width}}  " + "  ".join(cells))
    lines.append(f"summary: {run_dir / SUMMARY_NAME}")
    print("\n".join(lines), flush=True)
