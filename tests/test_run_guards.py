"""What stops a run before or during its work with one clear message: an unwritable output
directory, images smaller than the network's stride, running out of memory, a diverging loss."""

from __future__ import annotations

import pytest
import torch

from stad import run as run_module
from stad.errors import StadError, TrainingError
from stad.results import RECORD_NAME
from stad.run import run


@pytest.mark.slow
def test_an_unwritable_run_directory_stops_before_any_work(tiny_config, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    started = []
    monkeypatch.setattr(run_module, "build_dataset", lambda *a: started.append(a))
    with pytest.raises(StadError, match=r"cannot write the run directory.*output_root="):
        run(tiny_config(), blocker / "run")
    assert not started


@pytest.mark.slow
def test_images_smaller_than_the_total_stride_are_refused(tiny_config, tmp_path):
    cfg = tiny_config("method=rd", "image_size=8")
    with pytest.raises(StadError, match=r"image_size=8 is smaller than the total stride \d+"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / RECORD_NAME).exists()


@pytest.mark.parametrize(
    "error", [torch.cuda.OutOfMemoryError("CUDA out of memory"), MemoryError()]
)
@pytest.mark.slow
def test_out_of_memory_names_the_settings_that_use_less(tiny_config, tmp_path, monkeypatch, error):
    def explode(*args, **kwargs):
        raise error

    monkeypatch.setattr(run_module, "_fit_stage", explode)
    with pytest.raises(StadError) as caught:
        run(tiny_config(), tmp_path / "run")
    message = str(caught.value)
    for hint in ("out of memory", "trainer.batch_size", "image_size", "16-mixed", "stfpm"):
        assert hint in message
    assert not (tmp_path / "run" / RECORD_NAME).exists()


@pytest.mark.slow
def test_a_diverging_loss_names_method_stage_epoch_step_and_fixes(tiny_config, tmp_path):
    cfg = tiny_config("method=rd", "method.stages.distill.optimizer.lr=1e30")
    with pytest.raises(TrainingError) as caught:
        run(cfg, tmp_path / "run")
    message = str(caught.value)
    for part in (
        "method rd",
        "stage 'distill'",
        "epoch 0",
        "step",
        "learning rate",
        "normalisation",
    ):
        assert part in message
    assert not (tmp_path / "run" / RECORD_NAME).exists()


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["threshold.method=median"], "quantile, f1 or fixed"),
        (["threshold.method=f1"], "threshold.labelled"),
        (["threshold.method=fixed"], "threshold.image"),
    ],
)
@pytest.mark.slow
def test_threshold_settings_are_checked_before_training(
    tiny_config, tmp_path, monkeypatch, overrides, words
):
    started = []
    monkeypatch.setattr(run_module, "build_dataset", lambda *a: started.append(a))
    with pytest.raises(StadError, match=words):
        run(tiny_config(*overrides), tmp_path / "run")
    assert not started


@pytest.mark.slow
def test_run_files_are_readable_by_the_team(tiny_config, tmp_path):
    run(tiny_config(), tmp_path / "run")
    for name in (RECORD_NAME, "model.safetensors", "report.html"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644, name
