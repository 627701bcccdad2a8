"""Warm-cache preload of an MVTec AD category: how long building its train + test datasets takes
when every decoded image is already in the decode cache (the second and later runs of a sweep).

    python benchmarks/preload_speed.py --root ../shared/data/mvtec_ad --category bottle

One cold build fills a fresh cache folder, then ``--repeats`` warm builds read it back (the
dataset's threaded preload, as a run does). Rows are appended to the CSV with the cache format
and the git commit, so formats measured at different commits sit side by side.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import tempfile
import time
from pathlib import Path

import _common  # benchmarks/_common.py: the script's folder is on sys.path

from stad.data.base import decode_cache
from stad.data.images import DecodeCache
from stad.data.mvtec import build_mvtec


def _build_seconds(root: Path, category: str, size: int, folder: Path) -> tuple[float, int]:
    start = time.perf_counter()
    with decode_cache(folder):
        splits = build_mvtec(root, category, size)
    return time.perf_counter() - start, len(splits.train) + len(splits.test)


def _commit() -> str:
    """The checkout's short commit of stad's sources (``+changes`` when they are edited)."""
    here = Path(__import__("stad").__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        edited = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "src"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return ""
    return head + ("+changes" if edited else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--csv", type=Path, default=_common.RESULTS / "preload_speed.csv")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "decoded"
        cold, n_images = _build_seconds(args.root, args.category, args.image_size, folder)
        warm = [
            _build_seconds(args.root, args.category, args.image_size, folder)[0]
            for _ in range(args.repeats)
        ]
    row = {
        "format": getattr(DecodeCache, "FORMAT", "npz"),
        "commit": _commit(),
        "category": args.category,
        "image_size": args.image_size,
        "images": n_images,
        "cold_s": f"{cold:.3f}",
        "warm_median_s": f"{_common.median(warm):.4f}",
        "warm_min_s": f"{min(warm):.4f}",
        "warm_images_per_s": f"{n_images / _common.median(warm):.0f}",
        "repeats": args.repeats,
        "device": _common.cpu_name(),
        "load": _common.load_average(),
        **_common.versions(),
    }
    _common.print_table([row], list(row)[:10])
    rows = []
    if args.csv.exists():
        with args.csv.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    _common.write_csv(args.csv, [*rows, row])


if __name__ == "__main__":
    main()
