"""``python -m stad.data.check``: reports, exit codes and the header pass, on generated layouts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stad.data import DATASETS, LAYOUTS
from stad.data.check import LayoutReport, check_sizes
from stad.data.check_command import main
from stad.data.fakes import (
    write_fake_btad,
    write_fake_folder,
    write_fake_mtd,
    write_fake_mvtec_loco,
    write_fake_visa,
)


def test_every_dataset_has_a_layout_scanner() -> None:
    assert set(LAYOUTS) == set(DATASETS)
    conf = Path(__file__).resolve().parents[1] / "conf" / "dataset"
    assert {p.stem for p in conf.glob("*.yaml")} == set(DATASETS)


@pytest.mark.parametrize(
    ("name", "write", "args"),
    [
        ("visa", write_fake_visa, []),
        ("mvtec_loco", lambda root: write_fake_mvtec_loco(root), []),
        ("mtd", write_fake_mtd, []),
        ("btad", lambda root: write_fake_btad(root, categories=("02",)), ["dataset.category=02"]),
        ("folder", write_fake_folder, []),
    ],
)
def test_usable_layouts_exit_0_with_counts(tmp_path, capsys, name, write, args) -> None:
    write(tmp_path)
    assert main([f"dataset={name}", f"dataset.root={tmp_path}", *args]) == 0
    out = capsys.readouterr().out
    assert ": usable" in out and "train: " in out and "test: " in out


def test_broken_layout_exits_2_with_the_message(tmp_path, capsys) -> None:
    write_fake_btad(tmp_path)
    (tmp_path / "02" / "ground_truth" / "ko" / "0000.png").unlink()
    assert main(["dataset=btad", f"dataset.root={tmp_path}", "dataset.category=all"]) == 2
    captured = capsys.readouterr()
    assert captured.out.count(": usable") == 2 and "02: NOT usable" in captured.out
    assert "stad.data.check: error: BTAD at" in captured.err
    assert "have no mask: " in captured.err and "Expected: " in captured.err


def test_header_pass_finds_size_mismatches(tmp_path, capsys) -> None:
    write_fake_folder(tmp_path)
    mask = tmp_path / "ground_truth" / "crack" / "000_mask.png"
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(mask)
    assert main(["dataset=folder", f"dataset.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "differ in size from their image" in err and "000_mask.png is 7x5 px" in err


def test_missing_root_and_bad_overrides_exit_2(tmp_path, capsys) -> None:
    assert main(["dataset=visa", f"dataset.root={tmp_path / 'nowhere'}"]) == 2
    assert "VisA root" in capsys.readouterr().err
    assert main(["dataset=nothing"]) == 2
    assert "dataset/nothing" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "usage:" in capsys.readouterr().out


def test_check_sizes_reads_headers_only(tmp_path) -> None:
    report = LayoutReport("x", tmp_path, "")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    from stad.data.base import Sample

    report.splits = {"test": [Sample(broken, None, 1, "d")]}
    check_sizes(report)
    assert "Cannot read image file" in report.problems[0]


@pytest.mark.slow
def test_module_command_runs_in_a_subprocess(tmp_path) -> None:
    write_fake_btad(tmp_path, categories=("01",))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "stad.data.check", "dataset=btad", f"dataset.root={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "BTAD at" in run.stdout and "usable" in run.stdout
    assert "RuntimeWarning" not in run.stderr  # the package does not import the module twice
