"""The run record: atomic writes, no overwriting, schema checks."""

import json

import pytest

from stad.errors import StadError
from stad.results import RECORD_KEYS, RECORD_NAME, read_record, write_json_atomic, write_record


def _record() -> dict:
    rec = {k: None for k in RECORD_KEYS}
    rec.update(schema=1, metrics={"image_auroc": 0.9, "pixel_auroc": 0.8, "pro": 0.7})
    return rec


def test_write_and_read_back(tmp_path):
    path = write_record(tmp_path, _record())
    assert path.name == RECORD_NAME
    assert read_record(path)["metrics"]["pro"] == 0.7
    assert [p.name for p in tmp_path.iterdir()] == [RECORD_NAME]  # no temp files left


def test_refuses_to_overwrite_another_runs_record(tmp_path):
    write_record(tmp_path, _record())
    with pytest.raises(StadError, match="already exists"):
        write_record(tmp_path, _record())


def test_incomplete_record_is_rejected_before_writing(tmp_path):
    with pytest.raises(ValueError, match="lacks keys"):
        write_record(tmp_path, {"schema": 1})
    assert not (tmp_path / RECORD_NAME).exists()


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_foreign_or_truncated_file_is_a_clear_error(tmp_path):
    (tmp_path / "a.json").write_text('{"schema": 1, "metr')
    with pytest.raises(StadError, match=r"a\.json"):
        read_record(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(StadError, match="not a stad run record"):
        read_record(tmp_path / "b.json")


def test_a_record_written_before_its_index_entry_still_counts_as_done(tmp_path):
    """A sweep killed between a run's record and its index entry must not rerun it (seen in CI:
    a restarted sweep completed one configuration twice)."""
    from stad.results import find_previous_run, register_run, register_started

    run_dir = tmp_path / "out" / "run0"
    run_dir.mkdir(parents=True)
    record = _record()
    record["config_hash"] = "abc123"
    register_started(tmp_path / "out", "abc123", run_dir)
    assert find_previous_run(tmp_path / "out", "abc123") is None  # started, no record yet
    write_record(run_dir, record)
    assert find_previous_run(tmp_path / "out", "abc123") == run_dir.resolve()  # no index entry
    assert find_previous_run(tmp_path / "out", "other") is None
    register_run(tmp_path / "out", "abc123", run_dir)
    assert find_previous_run(tmp_path / "out", "abc123") == run_dir.resolve()


def _strict_load(text: str):
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_every_non_finite_number_is_written_as_null(tmp_path):
    import numpy as np
    import torch

    data = {
        "schema_free": [float("nan"), float("inf"), -float("inf"), 0.5],
        "nested": {"a": np.float64("nan"), "b": torch.tensor(float("nan")), "c": np.float32(2.0)},
    }
    path = tmp_path / "x.json"
    write_json_atomic(path, data)
    back = _strict_load(path.read_text())
    assert back["schema_free"] == [None, None, None, 0.5]
    assert back["nested"] == {"a": None, "b": None, "c": 2.0}


@pytest.mark.slow
def test_an_image_level_run_writes_strict_json_with_the_reason(tmp_path):
    from conftest import compose_config

    from stad.data.fakes import write_fake_folder
    from stad.leaderboard import main as leaderboard
    from stad.run import run

    root = write_fake_folder(tmp_path / "data", defects={"crack": 3}, mask_dir=None)
    cfg = compose_config(
        [
            "dataset=folder",
            f"dataset.root={root}",
            "dataset.mask_dir=null",
            "backbone=tf_efficientnet_lite0",
            "backbone.weights=random",
            "trainer=smoke",
            "image_size=64",
            f"output_root={tmp_path}/out",
        ]
    )
    run(cfg, tmp_path / "run")
    record = _strict_load((tmp_path / "run" / RECORD_NAME).read_text())
    metrics = record["metrics"]
    assert isinstance(metrics["image_auroc"], float)
    for name in ("pixel_auroc", "pro", "pixel_ap"):
        assert metrics[name] is None, (name, metrics)
        assert "anomalous pixel" in record["metrics_undefined"][name]
    # The leaderboard and the report read it.
    leaderboard([f"runs={tmp_path / 'run'}", f"out={tmp_path / 'board.csv'}"])
    assert "image_auroc" in (tmp_path / "board.csv").read_text()
    assert "undefined" in (tmp_path / "run" / "report.html").read_text()
