"""The LightningDataModule of every run: training normals, held-out validation normals, test set.

Validation images are normal training images held out by a seeded permutation, for methods that
need normal validation statistics (score normalisation, quantiles) or a stopping rule. The test
set never selects or normalises anything: it only feeds the final metrics.

Under DDP (``trainer=ddp``) each process trains on its share of the shuffled training images, sees
every validation image (so selection and fitted statistics are the same on every process and
equal a single process's), and tests on its own share of the test set: each test image on
exactly one process, carrying its test-set ``index`` so the processes' report examples merge.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from stad.data.base import DatasetSplits, Item
from stad.distributed import shard_sampler, train_sampler
from stad.errors import StadError


class AnomalyDataModule(L.LightningDataModule):
    """Data loaders over one dataset's splits.

    Args:
        splits: Train (normal images) and test datasets.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes (0 loads in the main process).
        val_fraction: Share of the training images held out as normal validation images, in
            [0, 1); 0 gives no validation loader. A dataset with its own normal validation split
            (``splits.validation``, e.g. MVTec 3D-AD) uses that split instead whenever
            ``val_fraction`` > 0, and trains on all its training images.
        seed: Seeds the held-out split and the training shuffle order.
        split_rule, split_random_state: How the held-out images are drawn
            (:data:`SPLIT_RULES`; :func:`split_indices`).

    Raises:
        StadError: A batch size, worker count or ``val_fraction`` is out of range, or the
            held-out split would leave no training or no validation image.
    """

    def __init__(
        self,
        splits: DatasetSplits,
        batch_size: int,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.0,
        seed: int = 0,
        split_rule: str = "seeded",
        split_random_state: int | None = None,
    ) -> None:
        super().__init__()
        _check_range("batch_size", batch_size, minimum=1)
        if eval_batch_size is not None:
            _check_range("eval_batch_size", eval_batch_size, minimum=1)
        _check_range("num_workers", num_workers, minimum=0)
        if not 0.0 <= val_fraction < 1.0:
            raise StadError(
                f"val_fraction={val_fraction} is outside [0, 1): it is the share of normal "
                "training images held out for validation; set val_fraction to e.g. 0.1 "
                "(or 0 for none)."
            )
        self.splits = splits
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.split_rule = split_rule
        # Set per stage by the runner (Stage.drop_last) before each fit.
        self.drop_last_train = False
        self.split_random_state = split_random_state
        if splits.validation is not None and val_fraction > 0:
            self._train: Dataset[Item] = splits.train
            self._val: Dataset[Item] = splits.validation
            self._val_source = "the dataset's own validation split (normal images)"
        else:
            train_idx, val_idx = split_indices(
                _size(splits.train), val_fraction, seed, split_rule, split_random_state
            )
            self._train = Subset(splits.train, train_idx)
            self._val = Subset(splits.train, val_idx)
            self._val_source = "held-out normal training images"

    @property
    def train_dataset(self) -> Dataset[Item]:
        """Normal training images, less the held-out validation images."""
        return self._train

    @property
    def val_dataset(self) -> Dataset[Item]:
        """Held-out normal training images (empty when ``val_fraction`` is 0)."""
        return self._val

    @property
    def test_dataset(self) -> Dataset[Item]:
        """The test set (normal and anomalous images)."""
        return self.splits.test

    @property
    def info(self) -> dict[str, Any]:
        """The splits' summary plus the validation rule, for the run record."""
        return {
            **self.splits.info,
            "n_fit": _size(self._train),
            "n_val": _size(self._val),
            "val_fraction": self.val_fraction,
            "val_source": self._val_source if _size(self._val) else "none",
            "split_seed": self.seed,
            "split_rule": self.split_rule,
            "split_random_state": self.split_random_state,
        }

    def train_dataloader(self) -> DataLoader[Item]:
        # The shuffle order is a function of the seed and the epoch alone (stad.distributed),
        # whatever the model's initialisation drew from the global RNG.
        # A training set smaller than one batch keeps its only batch: zero steps would train
        # nothing.
        sampler = train_sampler(self._train, self.seed)
        # This process's share decides.
        drop_last = self.drop_last_train and _size(sampler) >= self.batch_size
        return self._loader(self._train, self.batch_size, sampler=sampler, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader[Item] | list[DataLoader[Item]]:
        # Lightning skips validation for an empty list; None would be rejected.
        if _size(self._val) == 0:
            return []
        # Every process sees every validation image, even under DDP: a stage's weight selection
        # and a method's calibration statistics must not depend on the number of processes.
        return self._loader(self._val, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader[Item]:
        return self.sharded_loader(self.splits.test)

    def sharded_loader(self, dataset: Dataset[Item]) -> DataLoader[Item]:
        """An evaluation loader over ``dataset`` in order: the whole set on a single process;
        under DDP this process's share, each image on exactly one process, with its index in
        ``dataset`` as the batch entry ``index``. Metrics that synchronise across processes
        (stad.metrics) then count every image once."""
        sampler = shard_sampler(dataset)
        if sampler is None:
            return self._loader(dataset, self.eval_batch_size)
        return self._loader(IndexedDataset(dataset), self.eval_batch_size, sampler=sampler)

    def predict_dataloader(self) -> DataLoader[Item]:
        return self.test_dataloader()

    def _loader(
        self,
        dataset: Dataset[Item],
        batch_size: int,
        sampler: Sampler[int] | None = None,
        drop_last: bool = False,
    ) -> DataLoader[Item]:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=drop_last,
            # A generator of its own for every loader: creating an iterator draws a seed from
            # it, never from the global RNG, so the random numbers a method draws while
            # training do not depend on when Lightning builds its iterators (a resumed run
            # builds them at other moments than an uninterrupted one).
            generator=torch.Generator().manual_seed(self.seed),
        )


class IndexedDataset(Dataset[Item]):
    """A dataset whose samples also carry their index (``sample["index"]``), so evaluation on
    several processes knows where in the set each image was."""

    def __init__(self, dataset: Dataset[Item]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "index": index}


SPLIT_RULES = ("seeded", "sklearn", "torch_random_split")
"""How held-out images are drawn: ``seeded`` is stad's permutation from the run's seed,
``round(n·fraction)`` held out; ``sklearn`` is ``sklearn.model_selection.train_test_split(range(n),
test_size=fraction, random_state=state)`` (numpy's legacy ``RandomState(state).permutation``,
``ceil(n·fraction)`` held out), e.g. STFPM's official split with ``random_state=0``."""


def split_indices(
    n: int, val_fraction: float, seed: int, rule: str = "seeded", random_state: int | None = None
) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into sorted, disjoint (train, validation) indices.

    With the ``seeded`` rule the validation part is ``round(n * val_fraction)`` indices (at least
    one when the fraction is positive), drawn by a permutation seeded with ``seed``: the same seed
    gives the same split. With ``sklearn`` it is scikit-learn's ``train_test_split`` rule with
    ``random_state`` (default: ``seed``). With ``torch_random_split`` it is
    ``torch.utils.data.random_split(range(n), [int((1 - val_fraction) * n), rest],
    torch.Generator().manual_seed(random_state))`` (EfficientAD's reference code, seed 42).

    Raises:
        StadError: An unknown rule, or a positive fraction would leave no training image.
    """
    if rule not in SPLIT_RULES:
        raise StadError(
            f"unknown held-out split rule {rule!r}; use one of {', '.join(SPLIT_RULES)}"
        )
    if val_fraction <= 0.0:
        return list(range(n)), []
    sklearn = rule == "sklearn"
    state = seed if random_state is None else random_state
    if rule == "torch_random_split":
        n_train = int((1.0 - val_fraction) * n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(state)).tolist()
        if n_train < 1 or n_train >= n:
            raise StadError(
                f"Holding out val_fraction={val_fraction} of {n} training image(s) by "
                f"random_split leaves {n_train} to train on and {n - n_train} held out; "
                "change val_fraction."
            )
        return sorted(order[:n_train]), sorted(order[n_train:])
    n_val = math.ceil(val_fraction * n) if sklearn else max(1, round(n * val_fraction))
    if n_val >= n:
        raise StadError(
            f"Holding out val_fraction={val_fraction} of {n} training image(s) leaves none to "
            "train on; lower val_fraction (or set it to 0)."
        )
    if sklearn:
        order = np.random.RandomState(state).permutation(n).tolist()
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def _check_range(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise StadError(f"{name}={value!r} must be an integer >= {minimum}; fix it in the config.")


def _size(items: Any) -> int:
    """``len`` of a Dataset or Sampler (torch types them without ``__len__``)."""
    return len(items)
