"""What a run needs to give the same evaluation on several processes (``trainer=ddp``) as on one.

Lightning's DDP keeps the trained parameters equal on every process (not the BatchNorm statistics
each process updates from its own batches), and every validate/test trainer starts by copying rank
0's weights and buffers to all processes, so evaluation runs on the weights rank 0 saves. This
module covers the rest:

- which process this is (:func:`rank`, :func:`is_rank_zero`): only rank 0 writes the run;
- data: every training image on one process per epoch (:func:`train_sampler`), every test image
  on exactly one process (:func:`shard_sampler`, no padding repeats);
- state outside Lightning's loops: rank 0's thresholds everywhere (:func:`broadcast_object`), the
  report's examples merged over the processes (:func:`gather_examples`) into exactly what one
  process would have kept;
- launching: strategies and Hydra modes stad's run cannot work with stop early
  (:func:`check_strategy`).

Every function is a no-op on a single process, and every collective one must be called by all
processes in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler, Sampler

from stad.core import example_key
from stad.errors import StadError


# -- which process ----------------------------------------------------------------------------
def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the run (1 before Lightning has set up a process group)."""
    return dist.get_world_size() if _initialized() else 1


def rank() -> int:
    """This process's global rank. Before a process group exists, the rank Lightning read from
    the environment (``LOCAL_RANK`` set by its launcher, ``RANK``, ``SLURM_PROCID``)."""
    if _initialized():
        return dist.get_rank()
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_rank_zero() -> bool:
    """Whether this process writes the run's files (always, on a single process)."""
    return rank() == 0


# -- data ---------------------------------------------------------------------------------------
def train_sampler(dataset: Dataset, seed: int) -> Sampler:
    """This process's share of the shuffled training images (all of them on one process).

    Lightning calls ``set_epoch`` every epoch, so the shuffle changes per epoch, is the same on
    every process, and depends on the seed and the epoch alone: a run resumed at epoch k sees the
    order an uninterrupted run sees there. Shares are padded to equal length (DDP needs equal step
    counts).
    """
    return DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed, drop_last=False
    )


def shard_sampler(dataset: Dataset) -> Sampler | None:
    """This process's share of an evaluation set, or None on a single process.

    Process ``r`` of ``n`` gets indices ``r, r + n, r + 2n, ...``: each image exactly once over
    the processes, none repeated to even out the shares (Lightning's default sampler repeats
    images, which metrics would then count twice).
    """
    if world_size() == 1:
        return None
    return UnrepeatedDistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=False
    )


# -- state outside Lightning's loops ------------------------------------------------------------
def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Process ``src``'s ``obj`` (picklable) on every process. Collective."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# -- report examples ----------------------------------------------------------------------------
def _key(example: dict[str, Any]) -> tuple[float, int]:
    return example_key(example["score"], example["label"], example["index"])


def select_examples(examples: Sequence[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """The ``keep`` examples :class:`stad.core.StageModule` keeps from any superset of them:
    ``keep // 2`` normal images and ``(keep + 1) // 2`` defects, the largest by
    :func:`example_key`, in test-set order (``index``)."""
    chosen: list[dict[str, Any]] = []
    for label in (0, 1):
        same = [e for e in examples if e["label"] == label]
        chosen += sorted(same, key=_key, reverse=True)[: (keep + label) // 2]
    return sorted(chosen, key=lambda e: e["index"])


def gather_examples(examples: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """Merge the examples every process kept of its share of the test set into those one
    process would have kept of the whole set (the same list). Collective.

    Args:
        examples: This process's examples (dicts with CPU tensors and ``score``, ``label`` and
            ``index``, the image's index in the test set).
        keep: ``StageModule.keep_examples``.
    """
    if world_size() == 1:
        return examples
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, examples)
    return select_examples([e for part in parts for e in part], keep)


# -- launching ----------------------------------------------------------------------------------
# Lightning strategies that run each fit/test in fresh processes and bring back only the weights:
# stad's evaluation state (metrics, examples, selected weights) would stay in those processes.
_SPAWNING = ("ddp_spawn", "ddp_fork", "ddp_notebook")


def _processes_started_externally() -> bool:
    """torchrun, SLURM or Lightning's own launcher (ranks > 0) started this process."""
    return any(k in os.environ for k in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID"))


def _hydra_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_strategy(strategy: str, devices: Any) -> None:
    """Stop before training when the DDP strategy cannot run stad's sequence of trainers.

    Raises:
        StadError: a spawning strategy (``ddp_spawn`` ...), or ``ddp`` on several devices inside
            a Hydra multirun, where Lightning's launcher would re-run the whole sweep per process.
    """
    if strategy.startswith(_SPAWNING):
        raise StadError(
            f"trainer.strategy={strategy} runs every fit and test in new processes and brings "
            "back only the weights, which loses stad's metrics and selected weights; use "
            "trainer=ddp (trainer.strategy=ddp)"
        )
    several = str(devices) not in ("1", "[0]")
    if (
        strategy.startswith("ddp")
        and several
        and _hydra_multirun()
        and not _processes_started_externally()
    ):
        raise StadError(
            f"trainer.strategy={strategy} with trainer.devices={devices} starts its other "
            "processes by running the command again, which would repeat the whole multirun (-m); "
            "run each job on its own (python -m stad ... trainer=ddp), or let SLURM start the "
            "processes (hydra/launcher=submitit_slurm with hydra.launcher.tasks_per_node="
            f"{devices})"
        )
