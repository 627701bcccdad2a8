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
