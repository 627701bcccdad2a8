"""One run: build the data and the method, train every stage, test, write the record."""

from __future__ import annotations

import logging
import math
import os
import platform
import resource
import sys
import time
import warnings
from collections.abc import Callable, Sized
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from stad import resume
from stad.backbones import total_stride
from stad.checkpoint import save_checkpoint
from stad.core import (
    Calibration,
    CalibrationModule,
    Method,
    PretrainData,
    Stage,
    StageModule,
    calibration_state,
)
from stad.data import build_dataset, training_files
from stad.data.base import DatasetSplits, data_fingerprint, decode_cache, mask_rule
from stad.data.datamodule import AnomalyDataModule
from stad.data.streams import build_derived_stream, build_stream, is_derived
from stad.data.validation import SyntheticAnomalySet
from stad.distributed import broadcast_object, check_strategy, gather_examples, is_rank_zero
from stad.errors import IncompatibleError, StadError
from stad.fileio import strict_json
from stad.loggers import log_record, trainer_loggers
from stad.methods import build_method
from stad.metrics import PRO, ImageAUROC, PixelAP, PixelAUROC, dataset_metric
from stad.metrics.per_defect import PerDefect, defect_types
from stad.results import (
    RECORD_NAME,
    SCHEMA_VERSION,
    config_hash,
    git_revision,
    package_versions,
    write_record,
)
from stad.rng import set_rng_state, stable_seed
from stad.thresholds import (
    ThresholdCounts,
    fixed_threshold,
    quantile_threshold,
    sample_pixels,
    with_test_counts,
)
from stad.timing import measure_inference
from stad.viz import save_overlays

if TYPE_CHECKING:
    from torchmetrics import Metric

log = logging.getLogger("stad")


@dataclass
class StageReport:
    """What training one stage cost and how its weights were chosen."""

    name: str
    seconds: float
    epochs: int
    steps: int
    selection: str
    best_val_loss: float | None
    # "train" (a Stage) or "calibration" (a statistics pass placed between stages).
    kind: str = "train"
    # What each auxiliary stream of the stage was (kind, folder, synthesis settings).
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)


def run(
    cfg: DictConfig,
    run_dir: Path,
    body: Callable[[DictConfig, Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train and evaluate the configured method; returns the record written to ``run_dir``.

    ``body`` replaces the single-category run (``stad.unified.run_unified``: the unified
    setting); the out-of-memory message and the checkpoint clean-up hold for both.
    """
    try:
        record = (body or _run)(cfg, run_dir)
    except (torch.cuda.OutOfMemoryError, MemoryError) as err:
        raise StadError(out_of_memory_message(cfg, err)) from None
    if not cfg.get("keep_checkpoints", False) and is_rank_zero():
        resume.clean(run_dir)
    return record


def out_of_memory_message(cfg: DictConfig, err: BaseException) -> str:
    """What ran out of memory and the settings that need less of it."""
    batch = cfg.trainer.batch_size or cfg.method.batch_size
    return (
        f"out of memory ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}) "
        f"training/evaluating {cfg.method.name} at image_size={cfg.image_size}, batch size "
        f"{batch}. Use less memory with a smaller trainer.batch_size (and "
        f"trainer.eval_batch_size={cfg.trainer.eval_batch_size}), a smaller image_size, "
        "trainer.precision=16-mixed or bf16-mixed on a GPU, or method.feature_cache=false "
        "where the method caches teacher features"
    )


def _run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    start_run(cfg, run_dir)
    splits = load_splits(cfg, cfg.dataset)
    # Before training: a file that moves during a long run must not lose the finished run.
    fingerprint = data_fingerprint(splits)
    method = prepare_method(cfg, partial(training_files, splits))
    check_inputs(method, splits, cfg)
    datamodule = build_datamodule(cfg, splits, method)
    channels_last = use_channels_last(cfg)
    reports = train(cfg, method, datamodule, run_dir, channels_last)
    calibrate(cfg, method, datamodule, run_dir, channels_last)
    return evaluate(
        cfg, method, datamodule, splits, run_dir, channels_last, reports, fingerprint
    ).record


def start_run(cfg: DictConfig, run_dir: Path) -> None:
    """Checks and settings before any work: a new, writable run directory, torch's threads
    and seed, a valid threshold config."""
    if (run_dir / RECORD_NAME).exists():
        raise StadError(f"{run_dir} already holds a run record; choose a new hydra.run.dir")
    check_writable(run_dir)
    setup_torch(cfg)
    check_threshold_config(cfg)


def load_splits(cfg: DictConfig, dataset: DictConfig) -> DatasetSplits:
    """The splits of a ``dataset`` config at the run's image size, under the run's decode cache
    and evaluation protocol."""
    protocol = cfg.get("eval_protocol") or {}
    with (
        decode_cache(cfg.get("decode_cache")),
        mask_rule(protocol.get("mask_rule", "nearest"), protocol.get("mask_downscale")),
    ):
        return build_dataset(dataset, int(cfg.image_size))


def prepare_method(cfg: DictConfig, train_files: Callable[[], list[Path]]) -> Method:
    """The configured method after its pretraining step (``train_files``: the training images
    it may crop), checked against the image size, in the run's memory format."""
    method = build_method(cfg.method, cfg.backbone, PretrainData(train_files=train_files))
    method.name = str(cfg.method.name)
    check_image_size(method, int(cfg.image_size), cfg)
    if use_channels_last(cfg):
        method.to(memory_format=torch.channels_last)
    _note_backbone_choice(cfg)
    return method


def build_datamodule(cfg: DictConfig, splits: DatasetSplits, method: Method) -> AnomalyDataModule:
    """Loaders over ``splits`` with the run's batch sizes and the held-out split the method and
    the threshold policy need."""
    return AnomalyDataModule(
        splits,
        batch_size=int(cfg.trainer.batch_size or cfg.method.batch_size),
        eval_batch_size=int(cfg.trainer.eval_batch_size),
        num_workers=int(cfg.trainer.num_workers),
        val_fraction=held_out_fraction(cfg, method),
        seed=int(cfg.seed),
        **held_out_split(cfg),
    )


def train(
    cfg: DictConfig,
    method: Method,
    datamodule: AnomalyDataModule,
    run_dir: Path,
    channels_last: bool,
) -> list[StageReport]:
    """Every stage and calibration pass of the method, in order, resumable."""
    # Every stage's auxiliary streams before the first trains: a missing folder stops the run
    # before hours of training, not between stages.
    streams = {s.name: stream_loaders(cfg, s, datamodule) for s in method.training_stages}
    checkpoints = resume.prepare(run_dir, config_hash(cfg), bool(cfg.get("resume", False)))
    return [
        _fit_stage(
            cfg, method, step, datamodule, run_dir, channels_last, checkpoints, streams[step.name]
        )
        if isinstance(step, Stage)
        else _calibration_pass(cfg, method, step, datamodule, run_dir, channels_last, checkpoints)
        for step in method.stages
    ]


@dataclass
class Evaluated:
    """One evaluated test set: its record (written) and the thresholds chosen for it."""

    record: dict[str, Any]
    thresholds: dict[str, Any]


def evaluate(
    cfg: DictConfig,
    method: Method,
    datamodule: AnomalyDataModule,
    splits: DatasetSplits,
    run_dir: Path,
    channels_last: bool,
    reports: list[StageReport],
    fingerprint: Any,
    checkpoint: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Evaluated:
    """Thresholds on held-out normals, the test metrics, speed, overlays, the checkpoint (or the
    name of one written elsewhere: ``checkpoint``), the report, and the record in ``run_dir``
    (with ``extra`` entries), for a method already trained and calibrated."""
    thresholds = choose_thresholds(cfg, method, datamodule)
    validated = (
        _validate(cfg, method, datamodule, run_dir, channels_last)
        if wants_synthetic_validation(cfg)
        else None
    )
    tested = _test(cfg, method, datamodule, splits, run_dir, channels_last, thresholds)
    # Rank 0 only: processes timing at once on shared CPUs would skew the figure.
    speed = _time_inference(cfg, method, datamodule, channels_last) if is_rank_zero() else None
    examples = gather_examples(tested.examples, int(cfg.examples))  # collective: every rank
    data_info = {**datamodule.info, "fingerprint": fingerprint}
    record = _record(cfg, method, data_info, reports, tested.metrics, tested.extra, tested.ms)
    record.update(extra or {})
    if tested.undefined:  # written as null, with the reason
        record["metrics_undefined"] = tested.undefined
    if tested.per_defect:
        record["per_defect"] = strict_json(tested.per_defect)
    record["inference"] = speed
    record["thresholds"] = with_test_counts(thresholds, tested.counts)
    if validated is not None:
        record["validation"] = validated
    if not is_rank_zero():
        # Under DDP the other processes only evaluated their share; rank 0 writes the run.
        return Evaluated(record, thresholds)
    overlays = save_overlays(examples, run_dir / "overlays")
    record["overlays"] = [str(p.relative_to(run_dir)) for p in overlays]
    record["checkpoint"] = checkpoint or save_checkpoint(run_dir, method, cfg, thresholds).name
    from stad.report import write_report  # matplotlib only once a run has results

    record["report"] = write_report(
        run_dir, record, tested.curves, tested.scores, tested.labels, examples
    ).name
    write_record(run_dir, record)
    log_record(cfg, run_dir, record)
    print_summary(record, run_dir)
    return Evaluated(record, thresholds)


def check_writable(run_dir: Path) -> None:
    """Stop before any work when the run directory cannot be created or written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise StadError(
            f"cannot write the run directory {run_dir} ({err.strerror or err}); choose a "
            "writable place with output_root=<dir> (or hydra.run.dir=<dir>)"
        ) from None


def check_threshold_config(cfg: DictConfig) -> None:
    """Stop before training when the threshold settings cannot work (not after hours of it)."""
    threshold: Any = cfg.get("threshold") or {}
    how = str(threshold.get("method", "quantile"))
    if how not in ("quantile", "f1", "fixed"):
        raise StadError(f"threshold.method={how!r}; use quantile, f1 or fixed")
    if how == "fixed" and threshold.get("image") is None and threshold.get("pixel") is None:
        raise StadError("threshold.method=fixed needs threshold.image=<value> and/or .pixel=")
    if how == "f1":
        from stad.scoring import read_labelled

        if not threshold.get("labelled"):
            raise StadError("threshold.method=f1 needs threshold.labelled=<labelled folder>")
        read_labelled(Path(threshold.labelled))  # its layout errors, now


def check_image_size(method: Method, image_size: int, cfg: DictConfig) -> None:
    """Stop when the images are smaller than the method's ``min_image_size`` (its yaml) or the
    coarsest feature map's stride (their maps would be empty)."""
    smallest = cfg.method.get("min_image_size")
    if smallest and image_size < int(smallest):
        raise StadError(
            f"image_size={image_size} is below {cfg.method.name}'s smallest input "
            f"(method.min_image_size={smallest}); use image_size >= {smallest}"
        )
    stride = total_stride(method)
    if stride is not None and image_size < stride:
        raise StadError(
            f"image_size={image_size} is smaller than the total stride {stride} of "
            f"backbone {cfg.backbone.name} in method {cfg.method.name}: its feature maps would be "
            f"empty; use image_size >= {stride} (the paper uses {cfg.method.image_size})"
        )


def wants_synthetic_validation(cfg: DictConfig) -> bool:
    """Whether the run also evaluates the synthetic-anomaly validation set (an objective)."""
    validation = cfg.get("validation") or {}
    return bool(validation.get("enabled")) or bool(cfg.get("objective"))


def held_out_fraction(cfg: DictConfig, method: Method) -> float:
    """Share of the training images held out as normal validation images: the method's own
    ``val_fraction`` when it selects weights or fits statistics on them, else the synthetic
    validation set's when one is wanted, else none."""
    needs_val = (
        method.calibration is not None
        or any(s.selection == "min_val_loss" for s in method.training_stages)
        or any(isinstance(s, Calibration) and s.data == "val" for s in method.stages)
    )
    fraction = float(cfg.method.get("val_fraction", 0.0)) if needs_val else 0.0
    if fraction == 0.0 and wants_synthetic_validation(cfg):
        fraction = float(cfg.validation.get("val_fraction", 0.2))
    threshold = cfg.get("threshold") or {}
    if fraction == 0.0 and threshold.get("method", "quantile") == "quantile":
        fraction = float(threshold.get("val_fraction", 0.0))
    return fraction


def held_out_split(cfg: DictConfig) -> dict[str, Any]:
    """How the held-out images are drawn: the method's ``val_split`` (``rule``, ``random_state``;
    e.g. STFPM's official sklearn split), else stad's permutation from the run's seed."""
    split = cfg.method.get("val_split") or {}
    state = split.get("random_state")
    return {
        "split_rule": str(split.get("rule", "seeded")),
        "split_random_state": None if state is None else int(state),
    }


def choose_thresholds(
    cfg: DictConfig, method: Method, datamodule: AnomalyDataModule
) -> dict[str, Any]:
    """Image and pixel thresholds, never from test images (``threshold`` in config.yaml)."""
    # Under DDP each process's BatchNorm statistics differ slightly after training (Lightning's
    # test trainer then copies rank 0's everywhere); every process tests with rank 0's
    # thresholds, the ones the checkpoint keeps.
    return broadcast_object(_thresholds(cfg, method, datamodule))


def _thresholds(cfg: DictConfig, method: Method, datamodule: AnomalyDataModule) -> dict[str, Any]:
    threshold = cfg.get("threshold") or {}
    how = str(threshold.get("method", "quantile"))
    if how == "fixed":
        return {
            kind: fixed_threshold(float(threshold[kind]))
            for kind in ("image", "pixel")
            if threshold.get(kind) is not None
        }
    if how == "f1":
        return _f1_thresholds(cfg, method, threshold)
    if how != "quantile":
        raise StadError(f"threshold.method={how!r}; use quantile, f1 or fixed")
    return _quantile_thresholds(cfg, method, datamodule, threshold)


def _quantile_thresholds(
    cfg: DictConfig, method: Method, datamodule: AnomalyDataModule, threshold: Any
) -> dict[str, Any]:
    held_out = len(cast(Sized, datamodule.val_dataset)) > 0
    dataset = datamodule.val_dataset if held_out else datamodule.train_dataset
    source = (
        f"{len(cast(Sized, dataset))} held-out normal images"
        if held_out
        else f"{len(cast(Sized, dataset))} training images (in-sample: none held out)"
    )
    loader = DataLoader(dataset, batch_size=int(cfg.trainer.eval_batch_size), shuffle=False)
    scores, pixels = _normal_scores(method, loader, _device(cfg))
    return {
        "image": quantile_threshold(scores, float(threshold.image_quantile), source),
        "pixel": quantile_threshold(pixels, float(threshold.pixel_quantile), source),
    }


@torch.no_grad()
def _normal_scores(
    method: Method, loader: DataLoader, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores and a bounded sample of anomaly-map pixels of normal images."""
    was_training = method.training
    method.eval().to(device)
    scores: list[torch.Tensor]
    pixels: list[torch.Tensor]
    scores, pixels = [], []
    try:
        for batch in loader:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            maps, image_scores = method(batch)
            scores.append(image_scores.float().cpu())
            pixels.append(sample_pixels(maps, seed=len(pixels)))
    finally:
        method.train(was_training)
    return torch.cat(scores), torch.cat(pixels)


def _f1_thresholds(cfg: DictConfig, method: Method, threshold: Any) -> dict[str, Any]:
    """F1-optimal thresholds on the user's labelled folder (``threshold.labelled``)."""
    from stad.thresholds import labelled_thresholds

    if not threshold.get("labelled"):
        raise StadError("threshold.method=f1 needs threshold.labelled=<folder of labelled images>")
    return labelled_thresholds(method, Path(threshold.labelled), int(cfg.image_size), _device(cfg))


def check_inputs(method: Method, splits: DatasetSplits, cfg: DictConfig) -> None:
    """Stop before training when the dataset lacks an input the method reads (e.g. depth)."""
    if not method.requires or len(cast(Sized, splits.train)) == 0:
        return
    provided = set(splits.train[0])
    missing = [key for key in method.requires if key not in provided]
    if missing:
        raise IncompatibleError(
            f"method {cfg.method.name} (as configured) reads {', '.join(missing)}, which dataset "
            f"{cfg.dataset.name} does not provide (its batches have {', '.join(sorted(provided))})"
            "; pick a dataset with it (e.g. dataset=mvtec3d for depth) or change the method's "
            "input (e.g. method.input=rgb)"
        )


def use_channels_last(cfg: DictConfig) -> bool:
    """``trainer.channels_last``: true, false, or auto (on CUDA only)."""
    value = cfg.trainer.get("channels_last", "auto")
    if str(value) == "auto":
        return _device(cfg).type == "cuda"
    return bool(value)


def _device(cfg: DictConfig) -> torch.device:
    """The device Lightning trains on for this config (one device)."""
    wants_gpu = str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def _time_inference(
    cfg: DictConfig, method: Method, datamodule: AnomalyDataModule, channels_last: bool
) -> dict[str, Any] | None:
    """Inference speed of the trained method on test images, on the run's device."""
    timing: Any = cfg.trainer.get("inference_timing") or {}
    if not timing.get("enabled", False):
        return None
    device = _device(cfg)
    batch = next(iter(datamodule.test_dataloader()))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    precision = str(cfg.trainer.precision)
    autocast = torch.bfloat16 if precision.startswith("bf16") else None
    if precision.startswith("16"):
        autocast = torch.float16
    method.to(device)
    speed = measure_inference(
        method,
        batch,
        batch_sizes=tuple(timing.batch_sizes),
        repeats=int(timing.repeats),
        budget_s=float(timing.budget_s),
        channels_last=channels_last,
        autocast_dtype=autocast,
    )
    return speed.as_dict()


def setup_torch(cfg: DictConfig) -> None:
    """Lightning's logging and warnings, torch's thread count and the run's seed."""
    # Lightning has its own console handler; without this Hydra's root handler repeats each line.
    logging.getLogger("lightning.pytorch").propagate = False
    # Frozen teachers stay in eval mode during fit on purpose (core.StageModule.train).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)


def _note_backbone_choice(cfg: DictConfig) -> None:
    paper = cfg.method.get("paper_backbone")
    if paper and cfg.backbone.name.split(".")[0] != str(paper).split(".")[0]:
        log.info(
            "backbone %s (%s weights); the %s paper uses %s",
            cfg.backbone.name,
            cfg.backbone.weights,
            cfg.method.name,
            paper,
        )


# Keys of the trainer group that stad reads itself; every other key is an argument of
# lightning.Trainer, passed as it is (a new Lightning option needs no code: +trainer.<arg>=...).
STAD_TRAINER_KEYS = frozenset(
    {
        "max_epochs",  # a cap on every stage's epochs (the stage's own length otherwise)
        "max_steps",  # a cap on every stage's steps
        "batch_size",
        "eval_batch_size",
        "num_workers",
        "channels_last",
        "num_threads",
        "checkpoint_epochs",
        "inference_timing",
        "pretrain_steps",
    }
)
# Lightning arguments the runner sets per stage: a user's value would break weight selection,
# resume or the data sharding.
RUNNER_TRAINER_KEYS = frozenset(
    {
        "logger",
        "callbacks",
        "enable_checkpointing",
        "use_distributed_sampler",
        "num_sanity_val_steps",
    }
)


def lightning_options(trainer_cfg: DictConfig) -> dict[str, Any]:
    """The trainer group's Lightning arguments (unset ``limit_*`` values left to Lightning).

    Raises:
        StadError: the config sets an argument the runner owns.
    """
    options = OmegaConf.to_container(trainer_cfg, resolve=True)
    assert isinstance(options, dict)
    owned = sorted(RUNNER_TRAINER_KEYS & set(options))
    if owned:
        raise StadError(
            f"trainer.{owned[0]} is set by stad's runner for every stage and cannot be "
            "configured; remove it from the trainer config"
        )
    return {
        str(k): v
        for k, v in options.items()
        if k not in STAD_TRAINER_KEYS and not (str(k).startswith("limit_") and v is None)
    }


def _trainer(
    cfg: DictConfig,
    run_dir: Path,
    max_epochs: int,
    name: str,
    validate: bool = False,
    callbacks: list[L.Callback] | None = None,
    max_steps: int = -1,
    limit_val_batches: int | float | None = None,
    accumulate: int = 1,
) -> L.Trainer:
    options = lightning_options(cfg.trainer)
    if accumulate > 1:  # the stage's own (Stage.accumulate), over any trainer preset's
        options["accumulate_grad_batches"] = accumulate
    if limit_val_batches is not None:
        options["limit_val_batches"] = limit_val_batches
    if not validate:
        options["limit_val_batches"] = 0
    strategy = str(options.pop("strategy", "auto"))
    check_strategy(strategy, options.get("devices", 1))
    return L.Trainer(
        strategy=strategy,
        max_epochs=max_epochs,
        max_steps=max_steps,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        logger=trainer_loggers(cfg, run_dir, name),
        callbacks=callbacks or [],
        # The datamodule shards the data itself (stad.distributed): Lightning's sampler would
        # repeat test images to even out the shares and split the validation images.
        use_distributed_sampler=False,
        **options,
    )


def stage_epochs(cfg: DictConfig, stage: Stage) -> int:
    """The stage's epochs, capped by ``trainer.max_epochs`` when a preset sets one; -1 (no
    epoch limit) for a stage measured in steps without such a cap."""
    cap = cfg.trainer.get("max_epochs")
    if stage.epochs is None:
        return int(cap) if cap else -1
    return min(stage.epochs, int(cap)) if cap else stage.epochs


def stage_steps(cfg: DictConfig, stage: Stage) -> int:
    """The stage's optimiser steps (-1: as many as its epochs give), capped by
    ``trainer.max_steps`` when that is set (> 0)."""
    cap = int(cfg.trainer.get("max_steps", -1))
    steps = -1 if stage.steps is None else stage.steps
    if cap > 0:
        return cap if steps < 0 else min(steps, cap)
    return steps


def _fit_stage(
    cfg: DictConfig,
    method: Method,
    stage: Stage,
    datamodule: AnomalyDataModule,
    run_dir: Path,
    channels_last: bool,
    checkpoints: Path,
    streams: tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]],
) -> StageReport:
    """Train one stage (or take it from a finished earlier attempt), keeping its state after
    every epoch so a killed run resumes where it was; ``streams`` are its auxiliary streams
    (:func:`stream_loaders`)."""
    done = _resumed(method, stage.name, checkpoints)
    if done is not None:
        return done
    epochs, steps = stage_epochs(cfg, stage), stage_steps(cfg, stage)
    length = f"{epochs} epochs" if steps < 0 else f"{steps} steps"
    log.info("stage %s: %s, training %s", stage.name, length, ", ".join(stage.trainable))
    loaders, derived, described = streams
    module = StageModule(
        method, stage, channels_last=channels_last, streams=loaders, derived_streams=derived
    )
    last = resume.last_checkpoint(checkpoints, stage.name)
    callbacks: list[L.Callback] = (
        [resume.EpochCheckpoint(last)] if cfg.trainer.get("checkpoint_epochs", True) else []
    )
    trainer = _trainer(
        cfg,
        run_dir,
        epochs,
        stage.name,
        validate=stage.selection != "last",
        callbacks=callbacks,
        max_steps=steps,
        accumulate=stage.accumulate,
    )
    ckpt_path = str(last) if last.is_file() else None
    if ckpt_path:
        log.info("stage %s: resuming from %s", stage.name, last)
    datamodule.drop_last_train = stage.drop_last
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    seconds = time.perf_counter() - start
    module.restore_selected()
    best = module.best_val_loss if module.best_val_loss != float("inf") else None
    report = StageReport(
        stage.name,
        seconds,
        trainer.current_epoch,
        trainer.global_step,
        stage.selection,
        best,
        streams=described,
    )
    resume.save_done(checkpoints, stage.name, module.stage_state(), asdict(report))
    return report


def _resumed(method: Method, name: str, checkpoints: Path) -> StageReport | None:
    """The report of a stage or calibration pass an earlier attempt finished, its state
    loaded into ``method`` and the random state restored; None when it has to run."""
    done = resume.load_done(checkpoints, name)
    if done is None:
        return None
    log.info("%s: finished in an earlier attempt, resumed from its checkpoint", name)
    method.load_state_dict(done["state"], strict=False)
    set_rng_state(done["rng"])
    return StageReport(**done["report"])


def stream_loaders(
    cfg: DictConfig, stage: Stage, datamodule: AnomalyDataModule
) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """The stage's auxiliary streams: loaded ones as ``(epoch, round) -> loader`` functions,
    each pass shuffled by a generator seeded from (run seed, stream name, epoch, round) alone;
    derived ones as per-batch callables seeded by the run seed; and what the record says of
    each."""
    loaders: dict[str, Any] = {}
    derived: dict[str, Any] = {}
    described: dict[str, dict[str, Any]] = {}
    for name, stream in stage.streams.items():
        if is_derived(stream.source):
            derived[name] = build_derived_stream(stream.source, int(cfg.image_size), int(cfg.seed))
            described[name] = derived[name].describe()
            continue
        dataset = build_stream(stream.source, int(cfg.image_size), datamodule.train_dataset)
        loaders[name] = partial(_stream_pass, dataset, stream.batch_size, cfg, name)
        describe = getattr(dataset, "describe", None)
        described[name] = (
            describe() if callable(describe) else {"kind": str(stream.source.get("kind"))}
        )
    return loaders, derived, described


def _stream_pass(
    dataset: Any, batch_size: int, cfg: DictConfig, name: str, epoch: int, round_: int
) -> DataLoader:
    seed = stable_seed(int(cfg.seed), name, epoch, round_)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        # Full batches only (a stream smaller than one batch keeps its one batch).
        drop_last=len(dataset) >= batch_size,
        num_workers=int(cfg.trainer.num_workers),
        generator=torch.Generator().manual_seed(seed),
    )


def _calibration_pass(
    cfg: DictConfig,
    method: Method,
    calibration: Calibration,
    datamodule: AnomalyDataModule,
    run_dir: Path,
    channels_last: bool,
    checkpoints: Path,
) -> StageReport:
    """Fit a calibration placed between stages (e.g. statistics of the teacher's features that
    the next stage's targets are normalised by), once: a resumed run restores it."""
    done = _resumed(method, calibration.name, checkpoints)
    if done is not None:
        return done
    log.info("calibration %s on the %s images", calibration.name, calibration.data)
    start = time.perf_counter()
    _fit_calibration(cfg, method, calibration, datamodule, run_dir, channels_last)
    seconds = time.perf_counter() - start
    report = StageReport(calibration.name, seconds, 0, 0, "none", None, kind="calibration")
    state = calibration_state(method, calibration)
    resume.save_done(checkpoints, calibration.name, state, asdict(report))
    return report


def _calibration_loader(
    cfg: DictConfig, calibration: Calibration, datamodule: AnomalyDataModule
) -> DataLoader:
    if calibration.data == "train":
        datamodule.drop_last_train = False
        return datamodule.train_dataloader()
    if len(cast(Sized, datamodule.val_dataset)) == 0:
        raise StadError(
            f"method {cfg.method.name} fits statistics on normal validation images but none are "
            "held out; set method.val_fraction > 0"
        )
    # Not the empty list: the check above found validation images.
    return cast(DataLoader, datamodule.val_dataloader())


def calibrate(
    cfg: DictConfig,
    method: Method,
    datamodule: AnomalyDataModule,
    run_dir: Path,
    channels_last: bool = False,
) -> None:
    """Fit the method's calibration (if any) on the normal validation images."""
    if method.calibration is None:
        return
    log.info("calibration on %d normal validation images", len(cast(Sized, datamodule.val_dataset)))
    _fit_calibration(
        cfg, method, method.calibration, datamodule, run_dir, channels_last, name="calibration"
    )


def _fit_calibration(
    cfg: DictConfig,
    method: Method,
    calibration: Calibration,
    datamodule: AnomalyDataModule,
    run_dir: Path,
    channels_last: bool,
    name: str | None = None,
) -> None:
    """One calibration pass under Lightning's validation loop, over the images it names."""
    loader = _calibration_loader(cfg, calibration, datamodule)
    # A pass over the training images is capped like training (limit_train_batches), not like
    # validation.
    limit = None
    if calibration.data == "train":
        limit = cfg.trainer.get("limit_train_batches")
        limit = 1.0 if limit is None else limit
    trainer = _trainer(
        cfg, run_dir, 1, name or calibration.name, validate=True, limit_val_batches=limit
    )
    module = CalibrationModule(method, calibration, channels_last=channels_last)
    trainer.validate(module, loader, verbose=False)


def _validate(
    cfg: DictConfig,
    method: Method,
    datamodule: AnomalyDataModule,
    run_dir: Path,
    channels_last: bool,
) -> dict[str, Any]:
    """Metrics on held-out normal images and their synthetic-anomaly copies (no test image):
    what a hyper-parameter search may optimise."""
    validation = cfg.validation
    dataset = SyntheticAnomalySet(
        datamodule.val_dataset,
        cast(dict[str, Any], OmegaConf.to_container(validation.synthesis, resolve=True)),
        int(cfg.image_size),
        str(cfg.dataset.category),
        int(validation.seed),
    )
    log.info("validation on %d held-out images + synthetic anomalies", len(dataset) // 2)
    module = StageModule(method, metrics=_metrics(cfg, None), channels_last=channels_last)
    loader = datamodule.sharded_loader(dataset)  # each image on one process under DDP
    _trainer(cfg, run_dir, 1, "validation").test(module, loader, verbose=False)
    values: dict[str, Any] = {}
    for name, metric in module.metrics.items():
        values.update(metric_values(name, cast("Metric", metric).compute()))
    return {**strict_json(values), "n_images": len(dataset), "synthesis": dataset.description}


def _metrics(cfg: DictConfig, splits: DatasetSplits | None) -> dict[str, Any]:
    # PRO's FPR limit: 0.3 in Bergmann et al. and every peer benchmark (config.yaml).
    limit = float(OmegaConf.select(cfg, "metrics.pro_fpr_limit", default=0.3))
    common = {
        "image_auroc": ImageAUROC(),
        "pixel_auroc": PixelAUROC(),
        "pro": PRO(fpr_limit=limit),
        # DeSTSeg and later work report it beside the AUROCs (area under precision-recall).
        "pixel_ap": PixelAP(),
    }
    own = splits.metrics if splits is not None else {}
    return {**common, **{name: dataset_metric(name, args) for name, args in own.items()}}


def metric_values(name: str, value: Any) -> dict[str, float]:
    """A metric's result as record entries: a scalar under its name, a dict as ``name_key``."""
    if isinstance(value, dict):
        return {f"{name}_{k}" if k else name: float(v) for k, v in value.items()}
    return {name: float(value)}


@dataclass
class TestOutcome:
    """What evaluating the test set gives: metrics, curves and examples for the report."""

    metrics: dict[str, float]
    extra: dict[str, Any]
    # metric -> why it is undefined (NaN, written as null), e.g. no anomalous pixel
    undefined: dict[str, str]
    # defect type -> its metrics (metrics.per_defect), empty when off or one type only
    per_defect: dict[str, Any]
    examples: list[dict]
    ms: float
    counts: dict[str, Any]
    curves: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scores: torch.Tensor
    labels: torch.Tensor


def _test(
    cfg: DictConfig,
    method: Method,
    datamodule: AnomalyDataModule,
    splits: DatasetSplits,
    run_dir: Path,
    channels_last: bool,
    thresholds: dict[str, Any],
) -> TestOutcome:
    counts = ThresholdCounts(
        thresholds.get("image", {}).get("value"), thresholds.get("pixel", {}).get("value")
    )
    extra_metrics: dict[str, Any] = {COUNTS: counts}
    defects = defect_types(splits.test) if cfg.get("metrics", {}).get("per_defect", True) else []
    if len(defects) > 1:
        limit = float(OmegaConf.select(cfg, "metrics.pro_fpr_limit", default=0.3))
        extra_metrics[PER_DEFECT] = PerDefect(defects, pro_fpr_limit=limit)
    module = StageModule(
        method,
        metrics={**_metrics(cfg, splits), **extra_metrics},
        keep_examples=int(cfg.examples),
        channels_last=channels_last,
    )
    trainer = _trainer(cfg, run_dir, 1, "test")
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics: dict[str, float] = {}
    undefined: dict[str, str] = {}
    for name, metric in module.metrics.items():
        if name not in (COUNTS, PER_DEFECT):
            values = metric_values(name, cast("Metric", metric).compute())
            reason = getattr(metric, "undefined_reason", None) or "not computable on this test set"
            undefined.update({k: reason for k, v in values.items() if not math.isfinite(v)})
            metrics.update(values)
    extra = {
        f"{name}_error_bound": float(cast(Any, m).error_bound())
        for name, m in module.metrics.items()
        if hasattr(m, "error_bound") and name != PER_DEFECT
    }
    per_defect = (
        cast(Any, module.metrics[PER_DEFECT]).compute() if PER_DEFECT in module.metrics else {}
    )
    ms = 1000.0 * module.inference_seconds / max(module.inference_images, 1)
    scores, labels = _image_scores(cast(ImageAUROC, module.metrics["image_auroc"]))
    return TestOutcome(
        metrics,
        extra,
        undefined,
        per_defect,
        module.examples,
        ms,
        counts.compute(),
        _curves(module.metrics),
        scores,
        labels,
    )


COUNTS = "threshold_counts"
PER_DEFECT = "per_defect"
_CURVES = {"image_roc": "image_auroc", "pixel_roc": "pixel_auroc", "pro": "pro"}


def _curves(metrics: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """ROC and PRO curves of the test set, over every process's images."""
    curves = {}
    for key, name in _CURVES.items():
        curves[key] = metrics[name].curve()  # gathers every process's states itself
    return curves


def _image_scores(metric: ImageAUROC) -> tuple[torch.Tensor, torch.Tensor]:
    return metric.scores()


def peak_memory_mb() -> dict[str, Any]:
    """Peak accelerator memory where there is one, and the process's peak resident memory."""
    out: dict[str, Any] = {"cpu_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_allocated"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def device_description() -> str:
    """The device the run used, in words."""
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _record(
    cfg: DictConfig,
    method: Method,
    data_info: dict[str, Any],
    reports: list[StageReport],
    metrics: dict[str, float],
    extra: dict[str, Any],
    ms_per_image: float,
) -> dict[str, Any]:
    info = dict(method.info)
    return {
        "schema": SCHEMA_VERSION,
        # single: one model per category; unified: one model for several (stad.unified)
        "setting": str(OmegaConf.select(cfg, "setting.name", default="single")),
        "dataset": cfg.dataset.name,
        "category": cfg.dataset.category,
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "weights": info.pop("teacher_weights", None),
        "seed": int(cfg.seed),
        "image_size": int(cfg.image_size),
        # strict JSON: an undefined (NaN) metric is null, its reason in "metrics_undefined"
        "metrics": strict_json({**metrics, **extra}),
        "train_seconds": {r.name: round(r.seconds, 3) for r in reports},
        "stages": [asdict(r) for r in reports],
        "inference_ms_per_image": round(ms_per_image, 3),
        "peak_memory_mb": peak_memory_mb(),
        "device": device_description(),
        "versions": package_versions(),
        "git_revision": git_revision(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_hash": config_hash(cfg),
        "method_info": info,
        "data": data_info,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def _is_extra_metric(name: str) -> bool:
    return name not in ("image_auroc", "pixel_auroc", "pro") and not name.endswith("_error_bound")


def _speed_rows(speed: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not speed:
        return []
    return [
        ("ms/img at batch 1", f"{speed['ms_per_image_batch1']:.1f}"),
        (f"img/s at batch {speed['batch_size']}", f"{speed['images_per_s_batch32']:.1f}"),
    ]


def _threshold_rows(thresholds: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for kind, t in thresholds.items():
        how = f"q{t['quantile']}" if t.get("method") == "quantile" else t.get("method", "?")
        right = t.get("test")
        score = f" -> {right['right']}/{right['total']} test images right" if right else ""
        rows.append((f"{kind} threshold", f"{t['value']:.4g} ({how}, {t.get('source')}){score}"))
    return rows


def _four(value: float | None) -> str:
    return "undefined (null)" if value is None else f"{value:.4f}"


def print_summary(record: dict[str, Any], run_dir: Path) -> None:
    """A short metrics table on stdout."""
    m = record["metrics"]
    rows = [
        ("dataset", f"{record['dataset']}/{record['category']}"),
        ("method", f"{record['method']} ({record['backbone']})"),
        ("image AUROC", _four(m.get("image_auroc"))),
        ("pixel AUROC", _four(m.get("pixel_auroc"))),
        ("PRO (FPR<=0.3)", _four(m.get("pro"))),
        *((name, _four(value)) for name, value in m.items() if _is_extra_metric(name)),
        ("train seconds", f"{sum(record['train_seconds'].values()):.1f}"),
        ("inference ms/img", f"{record['inference_ms_per_image']:.1f}"),
        *_speed_rows(record.get("inference")),
        *_threshold_rows(record.get("thresholds") or {}),
        ("record", str(run_dir / RECORD_NAME)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)
