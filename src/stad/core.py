"""The student-teacher contract (Teacher, Student, Scorer, Stage, Method) and the one
LightningModule that trains any Method stage by stage and evaluates it.

A method file only declares its parts; it never writes a training loop.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import lightning as L
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from stad.errors import StadError, TrainingError
from stad.rng import rng_state, set_rng_state

Batch = dict[str, Any]
Features = list[Tensor]
LossFn = Callable[["Method", Batch], dict[str, Tensor]]


def example_key(score: float, label: int, index: int) -> tuple[float, int]:
    """How much the report wants to show a test image (larger: more).

    Normal images: the higher the score the more (false alarms first); defects: the lower the
    more (misses first); on equal scores the earlier test image (smaller ``index``).
    """
    return (score if label == 0 else -score, -index)


class Calibration:
    """Statistics a method fits on normal images without learning (e.g. the mean and spread of
    its scores, to standardise them, or of its teacher's features, to normalise the targets);
    never on test images.

    Two places: :attr:`Method.calibration` runs after the last stage on the normal validation
    images; a Calibration listed in :attr:`Method.stages` runs at its position (before the
    stages that follow it) on the images :attr:`data` names. The runner calls :meth:`reset`,
    then :meth:`update` for every batch (no gradients, every module in eval mode), then
    :meth:`finish`.

    Attributes:
        name: short name, used in logs, in the run record and by resume.
        data: ``"val"`` (held-out normal images) or ``"train"`` (the training images, in the
            training loader's order and batch size).
        fits: attribute paths of the Method whose state (buffers) :meth:`finish` sets; a
            resumed run restores them instead of fitting again.
    """

    name: str = "calibration"
    data: str = "val"
    fits: tuple[str, ...] = ()

    def reset(self, method: Method) -> None:
        """Forget what earlier calls accumulated."""

    def update(self, method: Method, batch: Batch) -> None:
        """Accumulate the statistics of one batch of normal images."""
        raise NotImplementedError

    def finish(self, method: Method) -> None:
        """Turn what was accumulated into the method's state (buffers of its scorer, ...)."""
        raise NotImplementedError


CALIBRATION_DATA = ("train", "val")


@runtime_checkable
class DerivedStream(Protocol):
    """A stream computed from each main batch (``stad.data.streams.SyntheticAnomalies``)."""

    def set_epoch(self, epoch: int) -> None:
        """Restart the stream's random draws for ``epoch``."""

    def __call__(self, batch: Batch) -> Batch:
        """The stream's batch for the main batch ``batch``."""
        ...


@dataclass(frozen=True)
class Stream:
    """An auxiliary data stream a stage trains on beside its main loader (e.g. EfficientAD's
    ImageNet images for its penalty term, or synthetic anomalies of the training images).

    The method only describes the data; the runner builds it from :attr:`source` (a mapping
    the data package reads, ``stad.data.streams``) and hands the stage's loss one batch per
    step as ``batch["streams"][name]``. A loaded stream (``folder``, ``train``) is shuffled
    from (run seed, stream name, epoch) alone, like the main loader; a derived one
    (``synthetic_anomalies``) is computed from each main batch, training and validation alike,
    with draws restarted from (run seed, epoch) at every epoch.

    Attributes:
        source: e.g. ``{"kind": "folder", "root": "/data/imagenet/train"}`` or
            ``{"kind": "synthetic_anomalies", "synthesis": {...}}``.
        batch_size: images per step (loaded streams; a derived one has the main batch's).
    """

    source: dict[str, Any]
    batch_size: int = 1


@dataclass
class PretrainData:
    """What the runner offers a method's pretraining step.

    A method module that declares ``pretrain(cfg, backbone, data) -> {part: cached file}``
    has a pretraining step (e.g. Uninformed Students' patch teachers): it runs before
    ``build`` through :func:`stad.methods.build_method` (and ``python -m stad.pretrain``),
    caches its result by its settings, and ``build`` loads the cached files.

    Attributes:
        train_files: lists the run's training image files (by the dataset's own reader), on
            demand: listing a dataset decodes it, and most pretraining steps never need it.
    """

    train_files: Callable[[], list[Path]] | None = None
    _listed: list[Path] | None = field(default=None, repr=False)

    def training_images(self, purpose: str) -> list[Path]:
        """The training image files; ``purpose`` names the setting that asks for them.

        Raises:
            StadError: no dataset was given to the pretraining step.
        """
        if self.train_files is None:
            raise StadError(
                f"{purpose} needs the dataset's training images, but the pretraining step was "
                "given no dataset; run it through python -m stad or python -m stad.pretrain"
            )
        if self._listed is None:
            self._listed = list(self.train_files())
        return list(self._listed)


class Teacher(nn.Module):
    """Gives the regression targets of a batch (usually a list of feature maps)."""

    def forward(self, batch: Batch) -> Features:
        raise NotImplementedError


class Student(nn.Module):
    """Predicts the teacher's targets, from the image or from the teacher's own features."""

    def forward(self, batch: Batch, targets: Features) -> Features:
        raise NotImplementedError


class Scorer(nn.Module):
    """Turns targets and predictions into anomaly maps at input resolution and image scores."""

    def forward(self, targets: Features, preds: Features, batch: Batch) -> tuple[Tensor, Tensor]:
        """Returns maps B×1×H×W (H, W of ``batch["image"]``) and scores (B,)."""
        raise NotImplementedError


SCHEDULER_INTERVALS = ("epoch", "step")


@dataclass
class Stage:
    """One training stage: which sub-modules train, on which loss, with which optimizer, how long.

    Attributes:
        name: short name, used in logs and in the run record.
        epochs: the method's (paper) number of epochs; a trainer preset may cap it. ``None``
            when the stage is measured in ``steps``.
        trainable: attribute paths of the Method whose parameters train (e.g. ``["student"]``);
            every other parameter is frozen and every other module stays in eval mode.
        loss: ``loss(method, batch) -> {"loss": scalar, ...}``; extra entries are logged.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` (a Hydra ``_partial_``).
        scheduler: optional ``scheduler(optimizer) -> LRScheduler``.
        selection: ``"last"`` keeps the final weights; ``"min_val_loss"`` keeps the weights with
            the lowest ``val_loss`` on normal images held out of the training set (never the
            test set).
        val_loss: the selection criterion on held-out normal images (default: ``loss``).
        drop_last: drop the last incomplete training batch of every epoch (e.g. AST's official
            loaders); kept when the training set is smaller than one batch.
        steps: the stage's length in optimiser steps instead of epochs (e.g. EfficientAD's
            70 000); the training loader is repeated as often as needed.
        scheduler_interval: ``"epoch"`` steps the scheduler after every epoch, ``"step"`` after
            every optimiser step.
        streams: auxiliary data streams by name (:class:`Stream`).
        param_groups: optimizer options per trainable path that differ from the optimizer's
            (e.g. ``{"student.projection": {"lr": 1e-3}}``: one optimizer, one parameter group
            per trainable path; Adam is per-parameter, so this equals one optimizer per part).
        accumulate: optimiser steps every ``accumulate`` batches, their gradients summed in
            Lightning's way (the mean of the batches' gradients).
    """

    name: str
    epochs: int | None
    trainable: Sequence[str]
    loss: LossFn
    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[..., Any] | None = None
    selection: str = "last"
    val_loss: LossFn | None = None
    drop_last: bool = False
    steps: int | None = None
    scheduler_interval: str = "epoch"
    streams: dict[str, Stream] = field(default_factory=dict)
    param_groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    accumulate: int = 1

    def __post_init__(self) -> None:
        unknown = sorted(set(self.param_groups) - set(self.trainable))
        if unknown:
            raise StadError(
                f"stage {self.name}: param_groups names {unknown}, which the stage does not "
                f"train (trainable: {list(self.trainable)})"
            )
        if int(self.accumulate) < 1:
            raise StadError(f"stage {self.name}: accumulate={self.accumulate}; use 1 or more")
        if self.selection not in ("last", "min_val_loss"):
            raise StadError(
                f"stage {self.name}: selection must be 'last' or 'min_val_loss', "
                f"got {self.selection!r}"
            )
        if (self.epochs is None) == (self.steps is None):
            raise StadError(
                f"stage {self.name}: give its length as epochs or as steps (exactly one), got "
                f"epochs={self.epochs}, steps={self.steps}"
            )
        length = self.epochs if self.steps is None else self.steps
        if length is None or int(length) < 1:
            unit = "epochs" if self.steps is None else "steps"
            raise StadError(f"stage {self.name}: {unit}={length}; train at least 1")
        if self.scheduler_interval not in SCHEDULER_INTERVALS:
            raise StadError(
                f"stage {self.name}: scheduler_interval must be one of "
                f"{', '.join(SCHEDULER_INTERVALS)}, got {self.scheduler_interval!r}"
            )

    @property
    def length(self) -> str:
        """``"100 epochs"`` or ``"70000 steps"``, for logs."""
        return f"{self.epochs} epochs" if self.steps is None else f"{self.steps} steps"

    @classmethod
    def from_config(
        cls, name: str, cfg: Any, trainable: Sequence[str], loss: LossFn, **kwargs: Any
    ) -> Stage:
        """A stage from its yaml block: ``epochs`` or ``steps``, ``optimizer`` (a ``_partial_``
        target), optional ``scheduler`` (a ``_partial_`` target) and ``scheduler_interval``,
        ``selection``, ``drop_last``, ``param_groups`` and ``accumulate``."""
        scheduler = cfg.get("scheduler")
        groups = cfg.get("param_groups") or {}
        epochs, steps = cfg.get("epochs"), cfg.get("steps")
        return cls(
            name=name,
            epochs=None if epochs is None else int(epochs),
            steps=None if steps is None else int(steps),
            trainable=list(trainable),
            loss=loss,
            optimizer=instantiate(cfg.optimizer),
            scheduler=instantiate(scheduler) if scheduler is not None else None,
            scheduler_interval=str(cfg.get("scheduler_interval", "epoch")),
            selection=str(cfg.get("selection", "last")),
            drop_last=bool(cfg.get("drop_last", False)),
            param_groups={str(k): dict(v) for k, v in groups.items()},
            accumulate=int(cfg.get("accumulate", 1)),
            **kwargs,
        )


class Method(nn.Module):
    """A student-teacher method: teacher + student + scorer + ordered training stages.

    ``stages`` may interleave :class:`Calibration` passes (statistics fitted before the stages
    that follow them); ``calibration`` is fitted on validation images after the last stage.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        scorer: nn.Module,
        stages: Sequence[Stage | Calibration],
        info: dict[str, Any] | None = None,
        calibration: Calibration | None = None,
        requires: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.scorer = scorer
        self.stages = list(stages)
        for step in self.stages:
            if isinstance(step, Calibration) and step.data not in CALIBRATION_DATA:
                raise StadError(
                    f"calibration {step.name}: data must be one of {', '.join(CALIBRATION_DATA)}, "
                    f"got {step.data!r}"
                )
        # Facts the run record reports (loaded weights, loss variants, score reduction ...).
        self.info: dict[str, Any] = dict(info or {})
        # Fitted on normal validation images after the last stage (run.py), when set.
        self.calibration = calibration
        # Batch entries beyond image/mask/label/path the method reads (e.g. "depth"); run.py
        # checks the dataset provides them before anything trains.
        self.requires = tuple(requires)
        # The config's method name (set by run.py), for messages.
        self.name = ""

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Anomaly maps (B×1×H×W) and image scores (B,) of a batch."""
        targets = self.teacher(batch)
        preds = self.student(batch, targets)
        return cast(tuple[Tensor, Tensor], self.scorer(targets, preds, batch))

    @property
    def training_stages(self) -> list[Stage]:
        """The stages that train (``stages`` without its calibration passes)."""
        return [s for s in self.stages if isinstance(s, Stage)]

    def submodule(self, path: str) -> nn.Module:
        """The sub-module at a dotted attribute path such as ``student`` or ``teacher.raa``."""
        return self.get_submodule(path)


def _trainable_modules(method: Method, stage: Stage) -> list[nn.Module]:
    return [method.submodule(p) for p in stage.trainable]


def stage_parameters(method: Method, stage: Stage) -> Iterator[nn.Parameter]:
    """The parameters a stage optimises (each once)."""
    seen: set[int] = set()
    for module in _trainable_modules(method, stage):
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p


def optimizer_groups(method: Method, stage: Stage) -> list[dict[str, Any]]:
    """The stage's parameters as optimizer parameter groups: one per trainable path that has
    options of its own (:attr:`Stage.param_groups`), the rest in one group."""
    if not stage.param_groups:
        return [{"params": list(stage_parameters(method, stage))}]
    seen: set[int] = set()
    groups: list[dict[str, Any]] = []
    rest: list[nn.Parameter] = []
    for path in stage.trainable:
        params = [p for p in method.submodule(path).parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        if path in stage.param_groups:
            groups.append({"params": params, **stage.param_groups[path]})
        else:
            rest += params
    return ([{"params": rest}] if rest else []) + groups


class StageModule(L.LightningModule):
    """Runs one Stage of a Method under Lightning (fit), or evaluates the Method (test).

    Only the stage's sub-modules train; all other modules stay in eval mode so frozen teachers
    never update BatchNorm statistics.
    """

    def __init__(
        self,
        method: Method,
        stage: Stage | None = None,
        metrics: dict[str, Any] | None = None,
        keep_examples: int = 0,
        channels_last: bool = False,
        streams: dict[str, StreamLoaders] | None = None,
        derived_streams: dict[str, DerivedStream] | None = None,
    ) -> None:
        super().__init__()
        self.method = method
        self.channels_last = channels_last
        # The stage's auxiliary streams: name -> (epoch, round) -> a loader over its data.
        self.streams = dict(streams or {})
        # Streams computed from each main batch (synthetic anomalies of its images).
        self.derived_streams = dict(derived_streams or {})
        self._stream_iters: dict[str, Iterator[Batch]] = {}
        self.stage = stage
        self.metrics = nn.ModuleDict(metrics or {})
        self.keep_examples = keep_examples
        self.examples: list[dict[str, Any]] = []
        self.inference_seconds = 0.0
        self.inference_images = 0
        self.best_val_loss = math.inf
        self._best_state: dict[str, Tensor] | None = None
        self._pending_rng: dict[str, Any] | None = None
        if stage is not None:
            self._freeze_all_but_stage(stage)
            # Epoch checkpoints hold only what the stage trains (see on_save_checkpoint).
            self.strict_loading = False

    # -- modes and parameters -------------------------------------------------------------
    def _freeze_all_but_stage(self, stage: Stage) -> None:
        self.method.requires_grad_(False)
        for module in _trainable_modules(self.method, stage):
            module.requires_grad_(True)

    def train(self, mode: bool = True) -> StageModule:
        """Train mode reaches only the stage's trainable sub-modules."""
        super().train(False)
        if mode and self.stage is not None:
            self.training = True
            for module in _trainable_modules(self.method, self.stage):
                module.train(True)
        return self

    def configure_optimizers(self) -> Any:
        assert self.stage is not None, "configure_optimizers needs a stage"
        optimizer = self.stage.optimizer(optimizer_groups(self.method, self.stage))
        if self.stage.scheduler is None:
            return optimizer
        scheduler = self.stage.scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.stage.scheduler_interval},
        }

    def _prepare(self, batch: Batch) -> Batch:
        if self.channels_last:
            # Faster convolutions on CPUs (oneDNN) and tensor cores alike.
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        return batch

    # -- training --------------------------------------------------------------------------
    def _stage_loss(self, batch: Batch, validation: bool = False) -> dict[str, Tensor]:
        assert self.stage is not None
        fn = self.stage.val_loss if validation and self.stage.val_loss else self.stage.loss
        losses = fn(self.method, batch)
        loss = losses["loss"]
        if not torch.isfinite(loss).all():
            raise TrainingError(
                f"method {self.method.name or '?'}: the loss of stage '{self.stage.name}' became "
                f"{loss.item()} at epoch {self.current_epoch}, step {self.global_step}: training "
                "diverged. Likely fixes: lower the learning rate "
                f"(method.stages.{self.stage.name}.optimizer.lr), check the input normalisation "
                "(images in [0, 1], the backbone's mean/std), or train in full precision "
                "(trainer.precision=32-true)."
            )
        return losses

    def _with_streams(self, batch: Batch, loaded: bool = True) -> Batch:
        """The batch with one batch of every auxiliary stream under ``"streams"``: the next of
        each loaded stream (training only), on this module's device, and each derived one."""
        streams: dict[str, Batch] = {}
        if loaded:
            streams = {
                name: self.transfer_batch_to_device(next(it), self.device, 0)
                for name, it in self._stream_iters.items()
            }
        for name, derive in self.derived_streams.items():
            streams[name] = derive(batch)
        if streams:
            batch["streams"] = streams
        return batch

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        losses = self._stage_loss(self._with_streams(self._prepare(batch)))
        bs = batch["image"].shape[0]
        for key, value in losses.items():
            name = "train/loss" if key == "loss" else f"train/{key}"
            self.log(name, value.detach(), prog_bar=key == "loss", batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        losses = self._stage_loss(
            self._with_streams(self._prepare(batch), loaded=False), validation=True
        )
        # Averaged over processes, so every rank of a DDP run selects the same epoch.
        self.log(
            "val/loss",
            losses["loss"],
            prog_bar=True,
            batch_size=batch["image"].shape[0],
            sync_dist=True,
        )

    def on_validation_epoch_end(self) -> None:
        if (
            self.stage is None
            or self.stage.selection != "min_val_loss"
            or self.trainer.sanity_checking
        ):
            return
        val_loss = self.trainer.callback_metrics.get("val/loss")
        if val_loss is not None and float(val_loss) < self.best_val_loss:
            self.best_val_loss = float(val_loss)
            self._best_state = {k: v.detach().clone() for k, v in self.stage_state().items()}

    def stage_state(self) -> dict[str, Tensor]:
        """Parameters and buffers (e.g. BatchNorm statistics) of the stage's trainable modules."""
        assert self.stage is not None
        state: dict[str, Tensor] = {}
        for path in self.stage.trainable:
            for k, v in self.method.submodule(path).state_dict().items():
                state[f"{path}.{k}"] = v
        return state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what this stage changes (frozen parts come from the config and earlier stages),
        the weight-selection state and the random state, so a resumed stage continues exactly."""
        checkpoint["state_dict"] = {f"method.{k}": v for k, v in self.stage_state().items()}
        checkpoint["stad"] = {
            "rng": rng_state(),
            "best_val_loss": self.best_val_loss,
            "best_state": self._best_state,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`on_save_checkpoint` kept beyond the weights."""
        saved = checkpoint.get("stad")
        if saved is None:
            return
        self.best_val_loss = float(saved["best_val_loss"])
        self._best_state = saved["best_state"]
        # Restored when the next epoch starts: Lightning draws random numbers while it sets up
        # the resumed fit, which the uninterrupted run drew before the checkpoint was taken.
        self._pending_rng = saved["rng"]

    def on_train_epoch_start(self) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        # Derived streams restart their draws per epoch, like a sampler's set_epoch.
        for derived in self.derived_streams.values():
            derived.set_epoch(self.current_epoch)
        self._stream_iters = {
            name: _endless(loaders, self.current_epoch) for name, loaders in self.streams.items()
        }

    def restore_selected(self) -> None:
        """Load the weights chosen by the stage's selection rule (no-op for ``last``)."""
        if self._best_state is None:
            return
        self.method.load_state_dict(self._best_state, strict=False)

    # -- evaluation ------------------------------------------------------------------------
    def test_step(self, batch: Batch, batch_idx: int) -> None:
        image = self._prepare(batch)["image"]
        _synchronize(image.device)
        start = time.perf_counter()
        maps, scores = self.method(batch)
        _synchronize(image.device)
        self.inference_seconds += time.perf_counter() - start
        first = self.inference_images  # this test's position of the batch's first image
        self.inference_images += image.shape[0]
        if maps.shape[-2:] != image.shape[-2:] or maps.shape[:2] != (image.shape[0], 1):
            raise RuntimeError(
                f"scorer returned maps of shape {tuple(maps.shape)} for images of shape "
                f"{tuple(image.shape)}; the contract is B×1×H×W at input resolution"
            )
        maps, scores = maps.float(), scores.float()
        for name, metric in self.metrics.items():
            update_metric(name, metric, maps, scores, batch)
        self._keep_examples(batch, maps, scores, first)

    def _keep_examples(self, batch: Batch, maps: Tensor, scores: Tensor, first: int = 0) -> None:
        """Keep the test images a reader most wants to see: the highest-scoring normal images
        (false alarms first) and the lowest-scoring defects (misses first), half of each, ties
        to the earlier image (:func:`example_key`). The processes of a DDP test
        merge theirs with :func:`stad.distributed.gather_examples`."""
        if self.keep_examples == 0:
            return
        # One device-to-host copy per batch, not per image.
        labels, values = batch["label"].tolist(), scores.tolist()
        indices = batch["index"].tolist() if "index" in batch else None
        for i, (label, score) in enumerate(zip(labels, values, strict=True)):
            label = int(label)
            quota = (self.keep_examples + label) // 2
            if quota == 0:
                continue
            # Under DDP the loader gives the test-set index; else images come in test-set order.
            index = int(indices[i]) if indices is not None else first + i
            key = example_key(score, label, index)
            same = [e for e in self.examples if e["label"] == label]
            if len(same) >= quota:
                out = min(same, key=lambda e: example_key(e["score"], label, e["index"]))
                if key <= example_key(out["score"], label, out["index"]):
                    continue
                # By identity: dicts of tensors do not compare with ==.
                self.examples = [e for e in self.examples if e is not out]
            self.examples.append(
                {
                    "image": batch["image"][i].detach().cpu(),
                    "mask": batch["mask"][i].detach().cpu(),
                    "map": maps[i].detach().cpu(),
                    "score": score,
                    "label": label,
                    "index": index,
                    "path": str(batch["path"][i]),
                    "kind": "lowest-scoring defect" if label else "highest-scoring normal",
                }
            )


class CalibrationModule(L.LightningModule):
    """Runs one :class:`Calibration` of a Method over normal images under Lightning
    (``trainer.validate``), so it uses the same device and precision as training."""

    def __init__(
        self,
        method: Method,
        calibration: Calibration | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        calibration = calibration or method.calibration
        if calibration is None:
            raise ValueError("CalibrationModule needs a calibration (or a method with one)")
        self.method = method
        self.calibration = calibration
        self.channels_last = channels_last

    def on_validation_start(self) -> None:
        self.calibration.reset(self.method)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        if self.channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        self.calibration.update(self.method, batch)

    def on_validation_end(self) -> None:
        self.calibration.finish(self.method)


def calibration_state(method: Method, calibration: Calibration) -> dict[str, Tensor]:
    """The state (parameters and buffers) of the modules a calibration fits, by full path."""
    state: dict[str, Tensor] = {}
    for path in calibration.fits:
        for k, v in method.submodule(path).state_dict().items():
            state[f"{path}.{k}"] = v
    return state


StreamLoaders = Callable[[int, int], Iterable[Batch]]
"""``loaders(epoch, round)``: the ``round``-th pass of an auxiliary stream in ``epoch``."""


def _endless(loaders: StreamLoaders, epoch: int) -> Iterator[Batch]:
    """The stream's batches for one epoch, starting a new pass whenever one ends (a stream
    smaller than the epoch repeats, each pass in its own seeded order)."""
    for round_ in itertools.count():
        empty = True
        for batch in loaders(epoch, round_):
            empty = False
            yield batch
        if empty:
            raise StadError("an auxiliary data stream holds no images")


def update_metric(name: str, metric: Any, maps: Tensor, scores: Tensor, batch: Batch) -> None:
    """Feed one test batch to a metric.

    Metrics whose name starts with ``image_`` take (scores, labels), other metrics (maps, masks);
    a metric with ``takes_batch = True`` (e.g. a dataset's own metric that needs more ground
    truth than one mask per image) takes (maps, scores, batch).
    """
    if getattr(metric, "takes_batch", False):
        metric.update(maps, scores, batch)
    elif name.startswith("image_"):
        metric.update(scores, batch["label"])
    else:
        metric.update(maps, batch["mask"])


def _synchronize(device: torch.device) -> None:
    # Timings on an accelerator must wait for its queued work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
