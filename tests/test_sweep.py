"""Sweeps: category expansion, resume by config hash, skipped and failed jobs, launchers."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import compose_config
from hydra import compose, initialize_config_module
from hydra.core.utils import JobReturn, JobStatus

from stad.leaderboard import main as leaderboard
from stad.methods import METHODS
from stad.results import (
    RECORD_NAME,
    config_hash,
    find_previous_run,
    register_run,
    write_json_atomic,
)
from stad.sweep import SUMMARY_NAME, SweepSummary, expand_all_categories, varying_keys

# Tiny jobs: a few images of 64 px, two optimisation steps per stage, one thread each.
FAST = [
    "trainer=smoke",
    "trainer.num_threads=1",
    "image_size=64",
    "examples=0",
    "dataset.generator.image_size=64",
    "dataset.generator.n_train=6",
    "dataset.generator.n_test_good=3",
    "dataset.generator.n_test_per_defect=1",
]


def _sweep(tmp_path: Path, *args: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "stad",
        "-m",
        *args,
        *FAST,
        f"dataset.root={tmp_path}/data",
        f"output_root={tmp_path}/out",
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, **popen)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob(RECORD_NAME))]


def _summary(root: Path) -> dict:
    (latest,) = sorted((root / "out" / "multirun").glob(f"*/{SUMMARY_NAME}"))[-1:]
    return json.loads(latest.read_text())


# -- units ------------------------------------------------------------------------------------
def test_category_all_expands_per_dataset_and_runs_each_category_once():
    cats = {"mvtec": ["bottle", "cable"], "visa": ["candle"]}

    def categories_of(job):
        (name,) = [o.split("=")[1] for o in job if o.startswith("dataset=")]
        return cats[name]

    jobs = [
        ["dataset=mvtec", "dataset.category=all", "seed=0"],
        ["dataset=mvtec", "dataset.category=bottle", "seed=0"],
        ["dataset=visa", "dataset.category=all", "seed=0"],
    ]
    assert expand_all_categories(jobs, categories_of) == [
        ["dataset=mvtec", "seed=0", "dataset.category=bottle"],
        ["dataset=mvtec", "seed=0", "dataset.category=cable"],
        ["dataset=mvtec", "dataset.category=bottle", "seed=0"],
        ["dataset=visa", "seed=0", "dataset.category=candle"],
    ]


def test_summary_names_jobs_by_what_varies_and_files_each_outcome():
    jobs = [["method=stfpm", "seed=0"], ["method=ast", "seed=0"], ["method=rd", "seed=0"]]
    summary = SweepSummary(varying=varying_keys(jobs))
    outcomes = [
        (JobStatus.COMPLETED, {"status": "done"}),
        (JobStatus.COMPLETED, {"status": "skipped", "reason": "needs\ndepth"}),
        (JobStatus.FAILED, ValueError("boom")),
    ]
    for job, (status, value) in zip(jobs, outcomes, strict=True):
        result = JobReturn(overrides=job, status=status)
        result._return_value = value
        summary.add(result)
    assert summary.done == ["method=stfpm"]
    assert summary.skipped == ["method=ast: needs depth"]
    assert summary.failed == ["method=rd: boom"]
    assert summary.lines()[0] == "sweep: 3 jobs: 1 ran, 0 already done, 1 skipped, 1 failed"


@pytest.mark.slow
def test_config_hash_ignores_where_and_how_verbosely_but_not_what():
    base = compose_config([])
    same = compose_config(["output_root=/elsewhere", "trainer.enable_progress_bar=false"])
    assert config_hash(base) == config_hash(same)
    for change in (["seed=1"], ["method=rd"], ["trainer.max_epochs=3"], ["dataset.category=brick"]):
        assert config_hash(compose_config(change)) != config_hash(base), change
    from omegaconf import OmegaConf

    assert config_hash(OmegaConf.to_container(base, resolve=True)) == config_hash(base)


def test_previous_run_is_found_only_with_a_complete_matching_record(tmp_path):
    config = {"seed": 0, "method": {"name": "stfpm"}}
    key = config_hash(config)
    run_dir = tmp_path / "run"
    assert find_previous_run(tmp_path, key) is None
    register_run(tmp_path, key, run_dir)
    assert find_previous_run(tmp_path, key) is None  # indexed, but no record (killed run)
    write_json_atomic(run_dir / RECORD_NAME, {"schema": 1, "config": config, "config_hash": key})
    assert find_previous_run(tmp_path, key) == run_dir.resolve()
    (run_dir / RECORD_NAME).write_text('{"schema": 1, "conf')  # truncated by hand
    assert find_previous_run(tmp_path, key) is None


# -- whole sweeps -----------------------------------------------------------------------------
@pytest.mark.slow
def test_joblib_sweep_over_methods_categories_and_seeds_then_leaderboard_and_resume(tmp_path):
    args = [
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "method=stfpm",
        "dataset.category=texture,object",
        "seed=0,1",
    ]
    out = _sweep(tmp_path, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    records = _records(tmp_path / "out")
    assert len(records) == 4
    assert len({r["config_hash"] for r in records}) == 4

    table = tmp_path / "board.csv"
    assert leaderboard([f"runs={tmp_path / 'out'}", f"out={table}"]) == 0
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    keys = sorted((r["category"], r["method"]) for r in rows)
    expected = [(c, "stfpm") for c in ("mean", "object", "texture")]
    assert keys == expected
    for row in rows:
        assert row["n_seeds"] == "2" and row["seeds"] == "0 1"
        for metric in ("image_auroc", "pixel_auroc", "pro"):
            assert 0.0 <= float(row[metric]) <= 1.0

    again = _sweep(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_records(tmp_path / "out")) == 4
    assert len(_summary(tmp_path)["exists"]) == 4


@pytest.mark.slow
def test_a_killed_sweep_restarted_completes_only_the_missing_runs(tmp_path):
    args = ["method=stfpm", "seed=0,1,2"]
    proc = _sweep(
        tmp_path,
        *args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not _records(tmp_path / "out") and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {r["config_hash"] for r in _records(tmp_path / "out")}
    assert 1 <= len(done_before) < 3

    out = _sweep(tmp_path, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    records = _records(tmp_path / "out")
    assert len(records) == 3 and len({r["config_hash"] for r in records}) == 3
    summary = _summary(tmp_path)
    assert len(summary["exists"]) == len(done_before)
    assert len(summary["done"]) == 3 - len(done_before)


@pytest.mark.slow
def test_category_all_and_incompatible_jobs_skipped_with_a_reason_and_failures_not_fatal(
    tmp_path,
):
    categories = ["texture", "object"]  # all = the dataset's list, here cut to two (time)
    out = _sweep(
        tmp_path,
        "method=ast",
        "method.input=depth",
        "method.flow.hidden=8",
        "dataset.category=all",
        f"dataset.categories=[{','.join(categories)}]",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = _summary(tmp_path)
    assert len(summary["skipped"]) == len(categories) >= 2
    for category, line in zip(categories, summary["skipped"], strict=True):
        assert line.startswith(f"dataset.category={category}:") and "depth" in line
    assert len(list((tmp_path / "out").rglob("skipped.json"))) == len(categories)

    missing = tmp_path / "missing.pth"
    out = _sweep(tmp_path, "backbone=resnet18", f"backbone.weights=random,{missing}")
    assert out.returncode != 0
    summary = _summary(tmp_path)
    assert len(summary["done"]) == 1 and len(summary["failed"]) == 1
    assert "missing.pth" in summary["failed"][0]
    assert "some jobs failed" in out.stderr


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = _sweep(tmp_path, "hydra/launcher=submitit_local", "method=stfpm")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(_records(tmp_path / "out")) == 1
    assert len(_summary(tmp_path)["done"]) == 1


def test_slurm_preset_composes_on_the_submitit_plugin():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_module("stad.conf", version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm_gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.timeout_min > 0


def test_smoke_experiment_sweeps_every_registered_method():
    with initialize_config_module("stad.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=smoke"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params.method.split(",")) == set(METHODS)
    assert len(params["dataset.category"].split(",")) == 2


def test_a_sweep_over_both_settings_runs_skips_and_resumes_and_the_board_keeps_them_apart(
    tmp_path,
):
    args = [
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "method=stfpm",
        "setting=single,unified",
        "dataset.categories=[texture,object]",
    ]
    out = _sweep(tmp_path, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    records = _records(tmp_path / "out")  # the single run's + one per unified category
    assert sorted((r["setting"], r["category"]) for r in records) == [
        ("single", "object"),
        ("unified", "object"),
        ("unified", "texture"),
    ]
    assert len(list((tmp_path / "out").rglob("unified.json"))) == 1
    again = _sweep(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_summary(tmp_path)["exists"]) == 2
    assert len(_records(tmp_path / "out")) == 3

    table = tmp_path / "board.csv"
    assert leaderboard([f"runs={tmp_path / 'out'}", f"out={table}"]) == 0
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    keys = sorted((r["setting"], r["category"]) for r in rows)
    assert keys == [
        ("single", "mean"),
        ("single", "object"),
        ("unified", "mean"),
        ("unified", "object"),
        ("unified", "texture"),
    ]

    skipped = _sweep(tmp_path, "method=aand", "setting=unified")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    (line,) = _summary(tmp_path)["skipped"]
    assert "foreground rule" in line


def test_a_job_is_claimed_by_one_launcher_and_a_dead_launchers_lock_is_taken_over(tmp_path):
    from stad.results import claim_run, lock_holder, release_claim

    lock = claim_run(tmp_path, "k")
    assert lock is not None and lock_holder(tmp_path, "k")["pid"] == os.getpid()
    assert claim_run(tmp_path, "k") is None  # held by a live process (this one)
    release_claim(lock)
    assert not lock.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = claim_run(tmp_path, "k")
    lock.write_text(json.dumps({**lock_holder(tmp_path, "k"), "pid": dead.pid}))
    taken = claim_run(tmp_path, "k")  # its holder no longer runs: taken over
    assert taken == lock and lock_holder(tmp_path, "k")["pid"] == os.getpid()


def test_a_job_another_launcher_is_running_is_skipped_and_says_so(tmp_path):
    from stad.results import claim_run, config_hash
    from stad.sweep import run_job

    cfg = compose_config([f"output_root={tmp_path}"])
    lock = claim_run(tmp_path, config_hash(cfg))  # "another launcher" (this process) holds it
    result = run_job(cfg, tmp_path / "run", multirun=True)
    assert result["status"] == "skipped" and "another launcher is running" in result["reason"]
    assert str(lock) in result["reason"] and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_sweeps_started_together_run_each_job_once(tmp_path):
    args = ["method=stfpm", "seed=0,1"]
    first = _sweep(tmp_path, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = _sweep(tmp_path, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [o[1][-2000:] for o in outs]
    records = _records(tmp_path / "out")
    assert sorted(r["seed"] for r in records) == [0, 1]  # each job ran to completion once
    summaries = [
        json.loads(p.read_text())
        for p in sorted((tmp_path / "out" / "multirun").glob(f"*/{SUMMARY_NAME}"))
    ]
    ran = sum(len(s["done"]) for s in summaries)
    elsewhere = sum("another launcher" in line for s in summaries for line in s["skipped"])
    done_before = sum(len(s["exists"]) for s in summaries)
    assert ran == 2 and ran + elsewhere + done_before == 4
    assert not list((tmp_path / "out" / "index").glob("*.lock"))  # every lock given back
