"""Shared fixtures: the real config tree composed and shrunk for fast, offline tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

# A generated dataset small enough for seconds-long end-to-end runs on 2 CPU cores.
TINY_DATA = [
    "dataset.generator.image_size=128",
    "dataset.generator.n_train=32",
    "dataset.generator.n_test_good=8",
    "dataset.generator.n_test_per_defect=3",
]


# A short real training run on the tiny data, for the end-to-end detection tests of each method.
# Training keeps every image (thresholds from training scores), as the detection figures were set.
E2E_TRAINING = [
    "trainer.max_steps=-1",
    "trainer.max_epochs=15",
    "dataset.category=object",
    "threshold.val_fraction=0",
]


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python -m stad <overrides>`` would run (without Hydra's own keys)."""
    with initialize_config_module("stad.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One cache folder for generated datasets, shared by every test of the session."""
    return tmp_path_factory.mktemp("stad-cache")


@pytest.fixture
def tiny_config(data_cache, tmp_path) -> Callable[..., DictConfig]:
    """Compose the real config with tiny generated data, offline weights and a short budget."""

    def make(*overrides: str) -> DictConfig:
        base = [
            f"dataset.root={data_cache}/synthetic",
            f"output_root={tmp_path}/outputs",
            f"decode_cache={data_cache}/decoded",
            "trainer=smoke",
            *TINY_DATA,
        ]
        return compose_config([*base, *overrides])

    return make


def random_batch(n: int = 2, size: int = 64) -> dict:
    """A batch of the contract with random normal images (labels 0, empty masks)."""
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(n, 3, size, size, generator=g),
        "mask": torch.zeros(n, 1, size, size),
        "label": torch.zeros(n, dtype=torch.long),
    }


def assert_steps_lower_the_loss(method, loss, optimizer, batch, steps: int = 3) -> None:
    """A few optimizer steps on one batch lower ``loss(method, batch)["loss"]`` and leave every
    teacher parameter exactly as it was."""
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    before = loss(method, batch)["loss"]
    for _ in range(steps):
        optimizer.zero_grad()
        loss(method, batch)["loss"].backward()
        optimizer.step()
    assert loss(method, batch)["loss"] < before
    after = method.teacher.parameters()
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, after, strict=True))
