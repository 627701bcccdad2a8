"""Helpers every benchmark shares: the machine's description, the peer's presence, CSV output.

The peer is anomalib (``pip install 'stad[bench]'``); every benchmark still runs without it,
printing ``anomalib not installed`` and leaving the peer's columns empty.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def anomalib_version() -> str | None:
    """anomalib's version, or None (with the message printed once) when it is not installed."""
    try:
        import anomalib
    except ImportError:
        if not getattr(anomalib_version, "_told", False):
            print("anomalib not installed: peer columns stay empty (pip install 'stad[bench]')")
            anomalib_version._told = True  # type: ignore[attr-defined]
        return None
    return str(anomalib.__version__)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU's with its core count and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def load_average() -> str:
    """1-minute load average (others' work on a shared machine slows every measurement)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def versions() -> dict[str, str]:
    """Versions of python, torch and the peer, for every CSV row."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "anomalib": anomalib_version() or "",
    }


def median(values: Iterable[float]) -> float:
    """Median of the finite values (NaN when none)."""
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else float("nan")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write rows (dicts sharing the first row's keys, in order) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}", file=sys.stderr)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A plain aligned text table of ``columns``."""
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def sync(device: torch.device) -> None:
    """Wait for queued accelerator work before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_and_write(
    args: Any,
    bench_method: Callable[[str, Any, bool], list[dict[str, Any]]],
    columns: Sequence[str],
) -> None:
    """Run ``bench_method`` for every ``args.methods`` (with anomalib beside where installed),
    print the table and write ``args.csv``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    peer = anomalib_version() is not None
    rows = [row for name in args.methods for row in bench_method(name, args, peer)]
    print(f"{rows[0]['device']}; torch {torch.__version__}; anomalib {anomalib_version()}")
    print_table(rows, columns)
    write_csv(args.csv, rows)


def random_method(overrides: Sequence[str], prepare: Callable[[Any, Path], None] | None = None):
    """A method built from ``python -m stad`` overrides at random weights, nothing downloaded:
    EfficientAD's teacher from a random PDN state-dict file instead of its pretraining step;
    ``prepare(cfg, tmp)`` may change the config first. Returns (method, cfg)."""
    import tempfile

    from hydra import compose, initialize_config_module

    from stad.methods import build_method

    with initialize_config_module("stad.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.method.name == "efficientad":
            from stad.methods.efficientad import pdn

            path = Path(tmp) / "teacher.pth"
            torch.save(pdn(str(cfg.method.size), int(cfg.method.channels)).state_dict(), path)
            cfg.method.teacher.weights = str(path)
        if prepare is not None:
            prepare(cfg, Path(tmp))
        method = build_method(cfg.method, cfg.backbone)
    return method, cfg
