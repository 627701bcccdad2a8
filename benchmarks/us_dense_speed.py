"""Dense teacher inference of Uninformed Students: time and peak memory per patch size.

For each p in {17, 33, 65}: one patch network (paper width, random weights: speed does not depend
on them) evaluated densely on one image (a descriptor for every pixel), whole image at once and in
tiles. Each configuration runs in a fresh process so its peak resident memory (ru_maxrss) is its
own. For comparison, the memory the first layer alone would need if every pixel's p×p patch went
through the patch network separately (the naive evaluation) is computed, not run. Writes
benchmarks/results/us_dense_speed.csv and prints a table.

    python benchmarks/us_dense_speed.py --size 256 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import platform
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from stad.methods.patchnet import PatchNet

FIELDS = [
    "patch_size",
    "image_size",
    "width",
    "tile",
    "threads",
    "seconds_per_image",
    "peak_rss_mb",
    "rss_before_mb",
    "naive_first_layer_gb",
    "device",
    "torch",
]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(p: int, size: int, width: float, tile: int | None, threads: int, repeats: int) -> dict:
    """Seconds per dense evaluation of one size×size image and the process's peak RSS."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = PatchNet(p, width=width).eval()
    image = torch.rand(1, 3, size, size)
    before = _rss_mb()
    with torch.no_grad():
        out = net.dense(image, tile)  # warm-up (allocator, oneDNN kernels)
        assert out.shape == (1, net.out_channels, size, size)
        start = time.perf_counter()
        for _ in range(repeats):
            net.dense(image, tile)
        seconds = (time.perf_counter() - start) / repeats
    first = net.convs[0]
    side = p - first.kernel_size[0] + 1
    naive = size * size * first.out_channels * side * side * 4 / 2**30
    return {
        "patch_size": p,
        "image_size": size,
        "width": width,
        "tile": tile or "",
        "threads": threads,
        "seconds_per_image": round(seconds, 3),
        "peak_rss_mb": round(_rss_mb(), 1),
        "rss_before_mb": round(before, 1),
        "naive_first_layer_gb": round(naive, 1),
        "device": f"cpu {platform.machine()}",
        "torch": torch.__version__,
    }


def main() -> None:
    """Measure every (p, tile) configuration and write the CSV."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--tiles", type=int, nargs="*", default=[0, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for p in (17, 33, 65):
        for tile in args.tiles:
            # A fresh process per configuration: ru_maxrss is then this configuration's peak.
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                job = (p, args.size, args.width, tile or None, args.threads, args.repeats)
                row = pool.submit(measure, *job).result()
            rows.append(row)
            print(
                f"p={p:2d} tile={row['tile'] or 'none':>4}  {row['seconds_per_image']:7.2f} s/image"
                f"  peak RSS {row['peak_rss_mb']:8.1f} MB  (naive first layer "
                f"{row['naive_first_layer_gb']} GB)",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "us_dense_speed.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
