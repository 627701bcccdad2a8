"""A killed run resumes from its last epoch checkpoint and ends with the metrics of an
uninterrupted run; a sweep restarted after a kill resumes its unfinished run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stad import resume
from stad.core import StageModule
from stad.results import RECORD_NAME, config_hash
from stad.resume import ResumeError
from stad.rng import rng_state, set_rng_state
from stad.run import run
from stad.sweep import FAILED_NAME, run_job

# Three short epochs of two stages' worth of steps: the kill lands inside the second epoch.
RESUMABLE = [
    "trainer.max_steps=-1",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=3",
    "dataset.category=object",
]
KILL_AT_STEP = 4


class KilledError(RuntimeError):
    """Stands for the process being killed mid-epoch."""


@pytest.fixture
def kill_at_step(monkeypatch):
    """Make training raise at a given global step (a kill), once."""
    original = StageModule.training_step

    def arm(step: int) -> None:
        def step_or_die(self, batch, batch_idx):
            if self.global_step == step:
                monkeypatch.setattr(StageModule, "training_step", original)
                raise KilledError(f"killed at step {step}")
            return original(self, batch, batch_idx)

        monkeypatch.setattr(StageModule, "training_step", step_or_die)

    return arm


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_with_the_uninterrupted_metrics(
    tiny_config, tmp_path, kill_at_step
):
    cfg = tiny_config(*RESUMABLE)
    uninterrupted = run(cfg, tmp_path / "whole")

    kill_at_step(KILL_AT_STEP)
    with pytest.raises(KilledError):
        run(cfg, tmp_path / "killed")
    saved = tmp_path / "killed" / resume.CHECKPOINT_DIR / "distill" / "last.ckpt"
    assert saved.is_file() and not (tmp_path / "killed" / RECORD_NAME).exists()
    # Lightning's checkpoint is plain tensors and containers: it loads weights-only.
    assert "stad" in torch.load(saved, map_location="cpu", weights_only=True)

    with pytest.raises(ResumeError, match="resume=true"):
        run(cfg, tmp_path / "killed")
    resumed = run(tiny_config(*RESUMABLE, "resume=true"), tmp_path / "killed")

    assert resumed["metrics"] == uninterrupted["metrics"]
    assert [s["steps"] for s in resumed["stages"]] == [s["steps"] for s in uninterrupted["stages"]]
    assert not (tmp_path / "killed" / resume.CHECKPOINT_DIR).exists()


@pytest.mark.slow
def test_resume_refuses_another_config(tiny_config, tmp_path, kill_at_step):
    kill_at_step(1)
    with pytest.raises(KilledError):
        run(tiny_config(*RESUMABLE), tmp_path / "run")
    other = tiny_config(*RESUMABLE, "seed=1", "resume=true")
    with pytest.raises(ResumeError, match="another config"):
        run(other, tmp_path / "run")


@pytest.mark.slow
def test_a_restarted_sweep_resumes_its_unfinished_run(tiny_config, tmp_path, kill_at_step):
    cfg = tiny_config(*RESUMABLE)
    kill_at_step(KILL_AT_STEP)
    with pytest.raises(KilledError):
        run_job(cfg, tmp_path / "sweep1" / "0", multirun=True)
    failed = json.loads((tmp_path / "sweep1" / "0" / FAILED_NAME).read_text())
    assert failed["status"] == "failed" and failed["error"] == "KilledError"
    assert failed["config_hash"] == config_hash(cfg)

    result = run_job(tiny_config(*RESUMABLE), tmp_path / "sweep2" / "0", multirun=True)
    assert result["status"] == "done"
    assert Path(result["run_dir"]) == (tmp_path / "sweep1" / "0").resolve()
    assert not (tmp_path / "sweep2" / "0" / RECORD_NAME).exists()


def test_the_random_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]
