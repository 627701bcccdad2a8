"""Shared fixtures: the real config tree composed and shrunk for fast, offline tests."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from stad.data.synthetic import ensure_synthetic

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


def with_streams(stage, batch: dict, seed: int = 0) -> dict:
    """``batch`` with the stage's derived streams (synthetic anomalies) as the runner gives
    them, their draws restarted at epoch 0 on every call so repeated losses are comparable."""
    from stad.data.streams import build_derived_stream, is_derived

    streams = {}
    for name, stream in stage.streams.items():
        if is_derived(stream.source):
            derived = build_derived_stream(stream.source, batch["image"].shape[-1], seed)
            derived.set_epoch(0)
            streams[name] = derived(batch)
    return {**batch, "streams": streams} if streams else batch


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


# Uninformed Students shrunk to one small scale (its teacher pretrains in seconds).
SMALL_US = [
    "method.scales=[17]",
    "method.width=0.0625",
    "method.descriptor_dim=16",
    "method.teacher.batch_size=4",
]

# Every registered method, made small: the registry-driven tests (checkpoint round trip, export)
# take their method list from stad.methods.METHODS and their settings from here, so a method
# added to the registry without an entry fails them (tests/test_config.py checks the coverage).
TINY_METHODS: dict[str, list[str]] = {
    "stfpm": ["method=stfpm"],
    "rd": ["method=rd"],
    "dskd": ["method=dskd"],
    "aand": ["method=aand"],
    "ast": ["method=ast", "method.input=rgb", "method.flow.hidden=16", "method.student.hidden=16"],
    "us": ["method=us", *SMALL_US, "method.students.count=2"],
    # 64 px: rectangles of simplex noise from 3 px (the paper's 10 px need 88-px images).
    "rdpp": ["method=rdpp", "method.noise.min_side=3"],
    # A narrow segmentation network (its ASPP head is 5 M parameters at the official 256).
    "destseg": ["method=destseg", "method.segmentation.width=32"],
    # 256 px: the autoencoder's encoder needs it; a thin PDN and a tiny teacher pretraining.
    "efficientad": [
        "method=efficientad",
        "image_size=256",
        "method.channels=16",
        "method.teacher.batch_size=2",
        "method.teacher.normalisation_images=2",
        "method.teacher.extractor_size=256",
        "method.teacher.pdn_size=128",
    ],
}


def tiny_image_size(method: str) -> int:
    """The side a registered method's tiny tests use: 64 px unless TINY_METHODS sets one."""
    sizes = [int(o.split("=", 1)[1]) for o in TINY_METHODS[method] if o.startswith("image_size=")]
    return sizes[-1] if sizes else 64


def tiny_method_config(method: str, cache: Path) -> DictConfig:
    """A registered method at its TINY_METHODS settings (64 px unless they set a size), random
    EfficientNet-Lite weights
        (offline), any pretraining cached under ``cache``."""
    from stad.methods import has_pretraining

    return compose_config(
        [
            "backbone=tf_efficientnet_lite0",
            "backbone.weights=random",
            "trainer=smoke",
            "image_size=64",
            *TINY_METHODS[method],
            f"decode_cache={cache}/decoded",
            # Pretrained teachers (US, EfficientAD) cache in the test's folder.
            *([f"method.teacher.cache_dir={cache}/teachers"] if has_pretraining(method) else []),
        ]
    )


# -- a finished tiny run (predict and export tests) ---------------------------------------------
@dataclass
class TrainedRun:
    """A finished tiny STFPM run and the test folder of its generated dataset."""

    run_dir: Path
    test_dir: Path
    record: dict


def train_tiny_run(cache: Path) -> TrainedRun:
    """Train (once per cache folder) a tiny STFPM run (random ResNet-18, a few steps) on the
    generated dataset at 64 px.

    Shared by test_predict.py and test_export.py through the session's ``data_cache``: the first
    caller trains into a temporary folder renamed into place, later callers reuse it.
    """
    cfg = compose_config(
        [
            f"dataset.root={cache}/synthetic",
            f"output_root={cache}/outputs",
            f"decode_cache={cache}/decoded",
            "trainer=smoke",
            *TINY_DATA,
            "image_size=64",
            # ResNet-18 traces ~3x faster than the demo's EfficientNet-Lite0 (export tests).
            "backbone=resnet18",
            "backbone.weights=random",
        ]
    )
    run_dir = cache / "predict-run"
    if not (run_dir / "record.json").is_file():
        from stad.run import run

        scratch = Path(tempfile.mkdtemp(prefix=".predict-run-", dir=cache))
        run(cfg, scratch / "run")
        try:
            os.replace(scratch / "run", run_dir)
        except OSError:  # another process of this session finished first
            assert (run_dir / "record.json").is_file()
        shutil.rmtree(scratch, ignore_errors=True)
    root = ensure_synthetic(
        cfg.dataset.root, categories=[cfg.dataset.category], **cfg.dataset.generator
    )
    record = json.loads((run_dir / "record.json").read_text())
    return TrainedRun(run_dir, root / str(cfg.dataset.category) / "test", record)


@pytest.fixture(scope="session")
def trained(data_cache) -> TrainedRun:
    """One tiny trained run per session, shared by the predict and export tests."""
    return train_tiny_run(data_cache)


@pytest.fixture
def one_thread():
    # Tiny convolutions gain nothing from threads on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
