"""The per-run record: one JSON file per run, its schema, writing (atomic, stad.fileio) and
reading."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stad.errors import StadError
from stad.fileio import write_json_atomic

RECORD_NAME = "record.json"
# Written instead of a record by a sweep job that failed (the leaderboard lists it apart).
FAILED_NAME = "failed.json"
SCHEMA_VERSION = 1

# Every record has these top-level keys; leaderboard columns are derived from them.
# A unified run's summary (stad.unified): its categories' records lie in its sub-directories.
UNIFIED_NAME = "unified.json"
RECORD_KEYS = (
    "schema",
    "dataset",
    "category",
    "method",
    "backbone",
    "weights",
    "seed",
    "image_size",
    "metrics",
    "train_seconds",
    "inference_ms_per_image",
    "peak_memory_mb",
    "device",
    "versions",
    "git_revision",
    "config",
    "method_info",
    "data",
    "created",
)
METRIC_KEYS = ("image_auroc", "pixel_auroc", "pro")

# Settings that change where a run writes or how it reports progress, never its numbers; the
# config hash that identifies a run (resume, duplicate detection) leaves them out.
UNHASHED_KEYS = (
    "output_root",
    "logger",
    "decode_cache",
    "force",
    "resume",
    "keep_checkpoints",
    "examples",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "trainer.num_workers",
    "trainer.num_threads",
    "trainer.eval_batch_size",
)
INDEX_DIR = "index"


def write_record(run_dir: Path, record: Mapping[str, Any]) -> Path:
    """Write ``record.json`` into a run directory; refuses to replace another run's record."""
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"record lacks keys {missing}")
    path = Path(run_dir) / RECORD_NAME
    if path.exists():
        raise StadError(
            f"{path} already exists: another run wrote there. Fix: choose a new "
            "hydra.run.dir (the default includes a timestamp)."
        )
    write_json_atomic(path, record)
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    """Read one record; a truncated or foreign file raises StadError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StadError(f"cannot read run record {path}: {err}") from err
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        raise StadError(f"{path} is not a stad run record (schema {SCHEMA_VERSION})")
    return data


def git_revision(start: Path | None = None) -> str | None:
    """The git commit of the stad source tree (suffixed '-dirty' with local changes), if any."""
    cwd = start or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    """Versions of the packages that can move the numbers."""
    import importlib.metadata as md
    import platform

    versions = {"python": platform.python_version()}
    for pkg in ("stad", "torch", "torchvision", "timm", "lightning", "torchmetrics", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    return versions


def config_hash(config: DictConfig | Mapping[str, Any]) -> str:
    """Content hash (sha256 hex) of a resolved run config, without :data:`UNHASHED_KEYS`.

    Two runs with the same hash trained the same thing: same data, method, backbone, trainer
    settings and seed. Works on a live config and on the ``config`` stored in a record alike.
    """
    if isinstance(config, DictConfig):
        data = OmegaConf.to_container(config, resolve=True)
    else:
        data = copy.deepcopy(dict(config))
    assert isinstance(data, dict)
    # The single-category setting is what every run was before settings existed: its hash
    # stays what it was, so earlier runs are still found (sweep skip, resume, leaderboard).
    if data.get("setting") == {"name": "single"}:
        data.pop("setting")
    for dotted in UNHASHED_KEYS:
        *parents, leaf = dotted.split(".")
        node: Any = data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _index_path(output_root: str | Path, key: str) -> Path:
    return Path(output_root) / INDEX_DIR / f"{key}.json"


def register_run(output_root: str | Path, key: str, run_dir: Path) -> None:
    """Note in ``<output_root>/index/`` that the run with config hash ``key`` lives in
    ``run_dir`` (so a re-run sweep finds it without reading every record)."""
    write_json_atomic(_index_path(output_root, key), {"run_dir": str(Path(run_dir).resolve())})


def find_previous_run(output_root: str | Path, key: str) -> Path | None:
    """The run directory holding a complete record for config hash ``key``, if one exists.

    Looks in the index first, then in the directory the run was started in: a sweep killed
    after a run wrote its record but before the index entry was written must not run it again.
    """
    for marker in (_index_path(output_root, key), _started_path(output_root, key)):
        try:
            run_dir = Path(json.loads(marker.read_text())["run_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _holds_record_of(run_dir, key):
            return run_dir
    return None


def _holds_record_of(run_dir: Path, key: str) -> bool:
    if (run_dir / UNIFIED_NAME).is_file():  # a finished unified run (stad.unified)
        try:
            return json.loads((run_dir / UNIFIED_NAME).read_text()).get("config_hash") == key
        except (OSError, ValueError, AttributeError):
            return False
    if not (run_dir / RECORD_NAME).is_file():
        return False
    try:
        record = read_record(run_dir / RECORD_NAME)
    except StadError:
        return False
    recorded = record.get("config_hash") or config_hash(record["config"])
    return recorded == key


def _started_path(output_root: str | Path, key: str) -> Path:
    return Path(output_root) / INDEX_DIR / f"{key}.started.json"


def register_started(output_root: str | Path, key: str, run_dir: Path) -> None:
    """Note that the run with config hash ``key`` started in ``run_dir`` (a sweep restarted after
    a kill resumes it there instead of starting it over)."""
    path = _started_path(output_root, key)
    write_json_atomic(path, {"run_dir": str(Path(run_dir).resolve())})


def find_unfinished_run(output_root: str | Path, key: str) -> Path | None:
    """The run directory of an unfinished run with config hash ``key`` that can resume."""
    from stad.resume import is_unfinished

    try:
        run_dir = Path(json.loads(_started_path(output_root, key).read_text())["run_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run_dir if is_unfinished(run_dir) else None


# -- one launcher per job ---------------------------------------------------------------------
def _lock_path(output_root: str | Path, key: str) -> Path:
    return Path(output_root) / INDEX_DIR / f"{key}.lock"


def _holder_alive(holder: Mapping[str, Any]) -> bool:
    """Whether the process that holds a lock still runs (one on another host counts as alive:
    it cannot be asked)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def lock_holder(output_root: str | Path, key: str) -> dict[str, Any] | None:
    """Who holds the job's lock (pid, host, since), or None."""
    try:
        holder = json.loads(_lock_path(output_root, key).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def claim_run(output_root: str | Path, key: str) -> Path | None:
    """Claim the job with config hash ``key`` for this process, so that two launchers started
    on one output root run it once: an exclusive lock file in the index (created with
    ``O_EXCL``, atomic on local and NFS v3+ filesystems). Returns the lock's path, or None when
    a live process holds it; the lock of a process that no longer runs on this host is taken
    over (its attempt resumes from its checkpoints)."""
    path = _lock_path(output_root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(output_root, key)
            if holder is None:  # its taker is writing it (held), or it went away just now
                if path.exists():
                    return None
                continue
            if _holder_alive(holder):
                return None
            stale = path.with_name(f"{path.name}.stale-{os.getpid()}")
            try:  # one taker wins the rename; the others see the new lock on their next try
                os.rename(path, stale)
                stale.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as handle:
            since = datetime.now(timezone.utc).isoformat(timespec="seconds")
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": since}, handle)
        return path
    return None


def release_claim(lock: Path | None) -> None:
    """Give a claimed job's lock back (the job finished, failed or was skipped)."""
    if lock is not None:
        lock.unlink(missing_ok=True)
