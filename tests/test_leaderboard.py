"""The leaderboard: grouping over seeds, swept parameters, revisions, paper numbers, bad input."""

from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from stad.leaderboard import main, paper_results
from stad.results import RECORD_KEYS, RECORD_NAME, config_hash, write_json_atomic


def _record(
    method="stfpm",
    category="bottle",
    seed=0,
    lr=0.4,
    metrics=(0.9, 0.95, 0.8),
    revision="a" * 40,
    dataset="mvtec",
    created="2026-01-01T00:00:00+00:00",
) -> dict:
    config = {
        "seed": seed,
        "output_root": "outputs",
        "dataset": {"name": dataset, "category": category, "root": "/data"},
        "method": {
            "name": method,
            "lr": lr,
            "cache_key": f"{dataset}/{category}",
            "seed": seed,  # e.g. method.seed: ${seed}
        },
        "backbone": {"name": "resnet18"},
    }
    image, pixel, pro = metrics
    record = {key: None for key in RECORD_KEYS}
    record.update(
        schema=1,
        dataset=dataset,
        category=category,
        method=method,
        backbone="resnet18",
        seed=seed,
        metrics={"image_auroc": image, "pixel_auroc": pixel, "pro": pro, "pro_error_bound": 1e-4},
        train_seconds={"distill": 10.0 + seed},
        inference_ms_per_image=5.0,
        versions={"stad": "0.1.0"},
        git_revision=revision,
        config=config,
        config_hash=config_hash(config),
        created=created,
    )
    return record


def _write(root: Path, name: str, record: dict) -> Path:
    path = root / name / RECORD_NAME
    write_json_atomic(path, record)
    return path


def _table(*args: str) -> list[dict]:
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        assert main(list(args)) == 0
    return list(csv.DictReader(io.StringIO(out.getvalue())))


def test_one_row_per_experiment_with_mean_and_std_over_seeds_and_a_dataset_mean(tmp_path):
    values = {
        ("bottle", 0): (0.90, 0.95, 0.80),
        ("bottle", 1): (0.94, 0.97, 0.84),
        ("cable", 0): (0.70, 0.85, 0.60),
        ("cable", 1): (0.80, 0.89, 0.66),
    }
    for (category, seed), metrics in values.items():
        _write(
            tmp_path, f"{category}{seed}", _record(category=category, seed=seed, metrics=metrics)
        )
    rows = {r["category"]: r for r in _table(str(tmp_path))}
    assert set(rows) == {"bottle", "cable", "mean"}
    bottle = rows["bottle"]
    assert float(bottle["image_auroc"]) == pytest.approx(0.92)
    assert float(bottle["image_auroc_std"]) == pytest.approx(statistics.stdev([0.90, 0.94]))
    assert bottle["n_seeds"] == "2" and bottle["seeds"] == "0 1"
    assert float(bottle["train_seconds"]) == pytest.approx(10.5)
    mean = rows["mean"]
    assert float(mean["pro"]) == pytest.approx(statistics.fmean([0.82, 0.63]))
    per_seed = [statistics.fmean([0.90, 0.70]), statistics.fmean([0.94, 0.80])]
    assert float(mean["image_auroc_std"]) == pytest.approx(statistics.stdev(per_seed))
    assert mean["n_categories"] == "2"
    assert "pro_error_bound" not in bottle
    # cache_key follows the category, method.seed the seed: neither is a swept parameter
    assert all(r["params"] == "" for r in rows.values())


def test_swept_parameters_and_code_revisions_are_never_averaged_together(tmp_path, capsys):
    _write(tmp_path, "a", _record(lr=0.4, seed=0))
    _write(tmp_path, "b", _record(lr=0.1, seed=0))
    _write(tmp_path, "c", _record(lr=0.4, seed=1, revision="b" * 40))
    rows = [r for r in _table(str(tmp_path)) if r["category"] == "bottle"]
    assert sorted((r["params"], r["revision"], r["n_seeds"]) for r in rows) == [
        ("method.lr=0.1", "a" * 12, "1"),
        ("method.lr=0.4", "a" * 12, "1"),
        ("method.lr=0.4", "b" * 12, "1"),
    ]
    assert "2 code revisions" in capsys.readouterr().err


def test_paper_numbers_and_differences_on_the_dataset_mean_row(tmp_path):
    _write(tmp_path, "a", _record(method="rd", metrics=(0.99, 0.98, 0.95)))
    rows = {r["category"]: r for r in _table(str(tmp_path), "--paper")}
    mean = rows["mean"]
    assert float(mean["paper_image_auroc"]) == pytest.approx(0.985)
    assert float(mean["diff_image_auroc"]) == pytest.approx(0.99 - 0.985)
    assert "RD4AD" in mean["paper_source"]
    assert rows["bottle"].get("paper_image_auroc", "") == ""


def test_every_paper_number_is_a_fraction_with_a_source():
    papers = paper_results()
    assert {p["method"] for p in papers} >= {"stfpm", "rd", "dskd", "aand", "ast", "us"}
    for p in papers:
        assert p["source"]
        for name in ("image_auroc", "pixel_auroc", "pro"):
            assert p[name] == "" or 0.5 < float(p[name]) <= 1.0


def test_markdown_shows_mean_plus_minus_std(tmp_path):
    _write(tmp_path, "a", _record(seed=0, metrics=(0.9, 0.9, 0.9)))
    _write(tmp_path, "b", _record(seed=1, metrics=(0.8, 0.9, 0.9)))
    out = tmp_path / "board.md"
    assert main([str(tmp_path), "--format", "md", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("| dataset | category |")
    assert "0.8500 ± 0.0707" in text


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("empty", ["no run records"]),
        ("corrupt", ["cannot read", "--skip-invalid"]),
        ("partial", ["partial record", "metrics"]),
        ("duplicate", ["more than one record", "--keep-latest"]),
        ("missing_dir", ["does not exist"]),
    ],
)
def test_bad_input_stops_with_a_clear_message_and_writes_nothing(tmp_path, capsys, setup, words):
    runs = tmp_path / "runs"
    runs.mkdir()
    _write(runs, "good", _record())
    if setup == "empty":
        (runs / "good" / RECORD_NAME).unlink()
    elif setup == "corrupt":
        (runs / "bad").mkdir()
        (runs / "bad" / RECORD_NAME).write_text('{"schema": 1, "metr')
    elif setup == "partial":
        record = _record(seed=3)
        del record["metrics"]
        _write(runs, "bad", record)
    elif setup == "duplicate":
        _write(runs, "copy", _record())
    target = runs if setup != "missing_dir" else tmp_path / "nowhere"
    out = tmp_path / "board.csv"
    out.write_text("previous table\n")
    assert main([str(target), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
    assert out.read_text() == "previous table\n"  # untouched
    assert not list(tmp_path.glob(".board.csv.*"))  # no temporary file left


def test_skip_invalid_and_keep_latest_let_the_table_through(tmp_path, capsys):
    _write(tmp_path, "old", _record(metrics=(0.5, 0.5, 0.5), created="2026-01-01T00:00:00+00:00"))
    _write(tmp_path, "new", _record(metrics=(0.9, 0.9, 0.9), created="2026-02-01T00:00:00+00:00"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / RECORD_NAME).write_text("not json")
    rows = _table(str(tmp_path), "--skip-invalid", "--keep-latest")
    assert float(rows[0]["image_auroc"]) == pytest.approx(0.9)
    err = capsys.readouterr().err
    assert "left out" in err and "kept" in err


def test_module_and_console_entry_points(tmp_path):
    _write(tmp_path, "a", _record())
    out = subprocess.run(
        [sys.executable, "-m", "stad.leaderboard", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("dataset,category,method,backbone,params,revision,image_auroc")
    assert json.loads((tmp_path / "a" / RECORD_NAME).read_text())["method"] == "stfpm"
