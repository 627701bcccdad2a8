"""``trainer=ddp``: each test image evaluated once over the processes, report examples merged into
what one process keeps, and a 2-process (CPU, gloo) run whose record equals a 1-process
evaluation of its saved weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_DATA
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from stad import distributed
from stad.core import StageModule
from stad.data.base import DatasetSplits
from stad.data.datamodule import AnomalyDataModule
from stad.errors import StadError


class _Items(Dataset):
    """``n`` samples whose image is filled with their index."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((1, 2, 2), float(i)), "label": i % 2, "path": f"{i}.png"}


def _as_process(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: rank)


@pytest.mark.parametrize(("n_test", "world"), [(7, 2), (10, 3), (3, 3)])
def test_every_test_image_is_evaluated_on_exactly_one_process(monkeypatch, n_test, world):
    splits = DatasetSplits(train=_Items(9), test=_Items(n_test))
    seen: list[int] = []
    for rank in range(world):
        _as_process(monkeypatch, rank, world)
        dm = AnomalyDataModule(splits, batch_size=2, eval_batch_size=2, val_fraction=0.3)
        for batch in dm.test_dataloader():
            # The batch's index entry names the test image it holds.
            assert torch.equal(batch["image"][:, 0, 0, 0], batch["index"].float())
            seen += batch["index"].tolist()
        # Validation (selection, calibration, thresholds) sees every held-out image everywhere.
        val = torch.cat([b["image"][:, 0, 0, 0] for b in dm.val_dataloader()])
        assert val.tolist() == [float(i) for i in dm.val_dataset.indices]
    assert sorted(seen) == list(range(n_test))


def test_training_images_are_shared_out_and_reshuffled_each_epoch(monkeypatch):
    splits = DatasetSplits(train=_Items(10), test=_Items(4))
    epochs = []
    for epoch in (0, 1):
        shares = []
        for rank in range(2):
            _as_process(monkeypatch, rank, 2)
            loader = AnomalyDataModule(splits, batch_size=5, seed=3).train_dataloader()
            loader.sampler.set_epoch(epoch)  # what Lightning does every epoch
            shares.append([int(v) for b in loader for v in b["image"][:, 0, 0, 0]])
        assert sorted(shares[0] + shares[1]) == list(range(10))
        epochs.append(shares)
    assert epochs[0] != epochs[1]


def _stream(keep: int, scores: torch.Tensor, labels: torch.Tensor, indices: list[int], batch: int):
    """What one StageModule keeps of the test images ``indices``, fed in batches."""
    module = StageModule(nn.Identity(), keep_examples=keep)
    for start in range(0, len(indices), batch):
        idx = torch.tensor(indices[start : start + batch])
        b = {
            "image": torch.zeros(len(idx), 3, 2, 2),
            "mask": torch.zeros(len(idx), 1, 2, 2),
            "label": labels[idx],
            "path": [f"{i}.png" for i in idx.tolist()],
            "index": idx,
        }
        module._keep_examples(b, torch.zeros(len(idx), 1, 2, 2), scores[idx], start)
    return module.examples


def _summary(examples: list[dict]) -> list[tuple]:
    return [(e["index"], e["label"], e["score"]) for e in examples]


@pytest.mark.parametrize("keep", [1, 4, 5])
def test_merged_examples_equal_what_one_process_keeps(keep):
    g = torch.Generator().manual_seed(keep)
    n = 23
    scores = torch.randint(0, 4, (n,), generator=g).float()  # few values: many ties
    labels = torch.randint(0, 2, (n,), generator=g)
    one = _stream(keep, scores, labels, list(range(n)), batch=4)
    # Reference: highest-scoring normals and lowest-scoring defects, ties to the earlier image,
    # in test order.
    normals = sorted((i for i in range(n) if labels[i] == 0), key=lambda i: (-scores[i], i))
    defects = sorted((i for i in range(n) if labels[i] == 1), key=lambda i: (scores[i], i))
    expected = sorted(normals[: keep // 2] + defects[: (keep + 1) // 2])
    assert [e["index"] for e in one] == expected
    for world in (2, 3):
        parts = [_stream(keep, scores, labels, list(range(r, n, world)), 3) for r in range(world)]
        merged = distributed.select_examples([e for p in parts for e in p], keep)
        assert _summary(merged) == _summary(one)


@pytest.mark.slow
def test_strategies_that_cannot_run_stad_stop_with_a_fix(monkeypatch):
    with pytest.raises(StadError, match="trainer=ddp"):
        distributed.check_strategy("ddp_spawn", 2)
    monkeypatch.setattr(distributed, "_hydra_multirun", lambda: True)
    for var in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(StadError, match="submitit_slurm"):
        distributed.check_strategy("ddp", 2)
    distributed.check_strategy("ddp", 1)
    monkeypatch.setenv("SLURM_PROCID", "0")  # SLURM starts the processes: fine in a multirun
    distributed.check_strategy("ddp", 2)


# -- a whole run on two processes ----------------------------------------------------------------
DDP_SMOKE = [
    "trainer=ddp",
    "trainer.devices=2",
    "trainer.accelerator=cpu",
    "trainer.num_workers=0",
    "trainer.max_epochs=1",
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "trainer.batch_size=2",
    # One image per forward pass on both sides: an image's scores then do not depend on which
    # images share its batch (CPU kernels round differently per batch size).
    "trainer.eval_batch_size=1",
    "trainer.enable_progress_bar=false",
    "trainer.channels_last=false",
    "trainer.inference_timing.enabled=false",
]


def _one_process_evaluation(run_dir: Path, out: Path) -> tuple[dict, list[dict], int]:
    """Metrics, threshold counts and report examples of the run's saved weights, evaluated by
    a single process exactly as a run does; and the number of test images."""
    from stad.checkpoint import load_run
    from stad.data import build_dataset
    from stad.run import _test, choose_thresholds, held_out_fraction, held_out_split
    from stad.thresholds import with_test_counts

    loaded = load_run(run_dir)
    cfg = OmegaConf.merge(loaded.config, {"trainer": {"strategy": "auto", "devices": 1}})
    method = loaded.method
    splits = build_dataset(cfg.dataset, int(cfg.image_size))
    datamodule = AnomalyDataModule(
        splits,
        batch_size=2,
        eval_batch_size=int(cfg.trainer.eval_batch_size),
        val_fraction=held_out_fraction(cfg, method),
        seed=int(cfg.seed),
        **held_out_split(cfg),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP process (OMP_NUM_THREADS=1): the same rounding
    try:
        thresholds = choose_thresholds(cfg, method, datamodule)
        tested = _test(cfg, method, datamodule, splits, out, False, thresholds)
    finally:
        torch.set_num_threads(threads)
    record = {"metrics": {**tested.metrics, **tested.extra}}
    record["thresholds"] = with_test_counts(thresholds, tested.counts)
    return record, tested.examples, len(splits.test)


@pytest.mark.slow
def test_a_two_process_run_writes_once_and_equals_one_process_evaluation(tmp_path, data_cache):
    outputs = tmp_path / "outputs"
    overrides = [
        *DDP_SMOKE,
        f"output_root={outputs}",
        f"dataset.root={data_cache}/synthetic",
        f"decode_cache={data_cache}/decoded",
        *TINY_DATA,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    # Returns once every process has exited: the rank-1 process inherits the output pipes.
    out = subprocess.run(
        [sys.executable, "-m", "stad", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    assert out.stdout.count("image AUROC") == 1  # one summary: rank 0's
    for name in ("record.json", "model.safetensors", "report.html"):
        assert len(list(outputs.rglob(name))) == 1, name
    (run_dir,) = [p.parent for p in outputs.rglob("record.json")]
    assert (run_dir / "train_ddp_process_1.log").exists()  # rank 1 ran (Hydra's log of it)
    record = json.loads((run_dir / "record.json").read_text())

    single, examples, n_test = _one_process_evaluation(run_dir, tmp_path / "single")
    # Same images, same scores; only the order in which synchronised states are summed differs.
    assert record["metrics"] == pytest.approx(single["metrics"], abs=1e-12, rel=0)
    assert record["thresholds"] == single["thresholds"]  # thresholds and counts: exactly
    assert record["thresholds"]["image"]["test"]["total"] == n_test  # no image twice or missing
    # The overlays rank 0 wrote are the examples one process keeps, some from rank 1's share.
    names = [
        f"{i:02d}_{'anomalous' if e['label'] else 'normal'}_{Path(e['path']).stem}.png"
        for i, e in enumerate(examples)
    ]
    assert [Path(p).name for p in record["overlays"]] == names
    assert any(e["index"] % 2 == 1 for e in examples)
