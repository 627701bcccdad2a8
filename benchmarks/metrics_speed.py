"""Speed and peak memory of ImageAUROC, PixelAUROC and PRO, binned and exact, on an MVTec-sized set.

The test set (default 1725 maps of 256x256, about a third of the images anomalous with random
elliptic blobs) is generated batch by batch from a seed, the way a model would stream its maps,
so the memory measured is the metric's own plus one batch. Each case runs in a fresh subprocess:
its peak resident memory (getrusage maxrss) and, on CUDA, its peak allocated GPU memory are its
own. Only update() and compute() are timed; generating the data is not.

    python benchmarks/metrics_speed.py [--n-images 1725] [--size 256] [--device cpu]
        [--batch-size 32] [--csv benchmarks/results/metrics_speed.csv]

Prints a table and writes a CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

CASES = [
    ("ImageAUROC", "exact"),
    ("PixelAUROC", "binned"),
    ("PixelAUROC", "exact"),
    ("PRO", "binned"),
    ("PRO", "exact"),
]
COLUMNS = [
    "metric",
    "mode",
    "device",
    "n_images",
    "size",
    "batch_size",
    "update_s",
    "compute_s",
    "total_s",
    "peak_rss_mib",
    "metric_rss_mib",
    "peak_cuda_mib",
    "value",
    "error_bound",
    "threads",
    "torch",
]


def make_batch(
    index: int, batch_size: int, n_images: int, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of the synthetic test set: maps (B, 1, H, W) float32, masks (B, 1, H, W).

    Smooth background noise (bilinear-upsampled from 16x16) plus pixel noise; anomalous images
    (~1/3) get 1-3 ellipses whose pixels score higher by a random, sometimes small, margin.
    """
    rng = np.random.default_rng([seed, index])
    count = min(batch_size, n_images - index * batch_size)
    coarse = torch.from_numpy(rng.normal(size=(count, 1, 16, 16)).astype(np.float32))
    maps = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    maps += 0.3 * torch.from_numpy(rng.normal(size=(count, 1, size, size)).astype(np.float32))
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(count, 1, size, size, dtype=torch.bool)
    for i in range(count):
        if rng.random() >= 1 / 3:
            continue
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(size / 64, size / 6, 2)
            masks[i, 0] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        maps[i] += masks[i] * float(rng.uniform(0.2, 2.5))
    return maps, masks


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _maxrss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / scale / 2**10


def run_case(metric_name: str, mode: str, args: argparse.Namespace) -> dict[str, object]:
    """Stream the synthetic set through one metric; return timings and memory."""
    from stad import metrics  # imported here so the parent process stays light

    device = torch.device(args.device)
    n_batches = -(-args.n_images // args.batch_size)
    make_batch(0, args.batch_size, args.n_images, args.size, args.seed)  # warm caches
    baseline = _maxrss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    metric_cls = getattr(metrics, metric_name)
    metric = metric_cls() if metric_name == "ImageAUROC" else metric_cls(mode=mode)
    metric = metric.to(device)
    update_s = 0.0
    for index in range(n_batches):
        maps, masks = make_batch(index, args.batch_size, args.n_images, args.size, args.seed)
        maps, masks = maps.to(device), masks.to(device)
        _synchronize(device)
        start = time.perf_counter()
        if metric_name == "ImageAUROC":
            metric.update(maps.flatten(1).amax(1), masks.flatten(1).any(1))
        else:
            metric.update(maps, masks)
        _synchronize(device)
        update_s += time.perf_counter() - start
        del maps, masks
    start = time.perf_counter()
    value = float(metric.compute())
    _synchronize(device)
    compute_s = time.perf_counter() - start
    peak_rss = _maxrss_mib()
    return {
        "metric": metric_name,
        "mode": mode,
        "device": str(device),
        "n_images": args.n_images,
        "size": args.size,
        "batch_size": args.batch_size,
        "update_s": round(update_s, 3),
        "compute_s": round(compute_s, 3),
        "total_s": round(update_s + compute_s, 3),
        "peak_rss_mib": round(peak_rss, 1),
        "metric_rss_mib": round(peak_rss - baseline, 1),
        "peak_cuda_mib": (
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda"
            else ""
        ),
        "value": round(value, 7),
        "error_bound": f"{float(metric.error_bound()):.2e}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=1725)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", type=Path, default=Path("benchmarks/results/metrics_speed.csv"))
    parser.add_argument(
        "--case", nargs=2, metavar=("METRIC", "MODE"), help="internal: run one case, print JSON"
    )
    return parser.parse_args(argv)


def _print_table(rows: list[dict[str, object]]) -> None:
    shown = ["metric", "mode", "update_s", "compute_s", "total_s", "peak_rss_mib",
             "metric_rss_mib", "peak_cuda_mib", "value", "error_bound"]  # fmt: skip
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in shown}
    print("  ".join(c.ljust(widths[c]) for c in shown))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in shown))


def main(argv: list[str] | None = None) -> None:
    """Run every case in its own subprocess, print the table and write the CSV."""
    args = _parse(argv)
    if args.case:
        print(json.dumps(run_case(args.case[0], args.case[1], args)))
        return
    common = [
        f"--n-images={args.n_images}",
        f"--size={args.size}",
        f"--batch-size={args.batch_size}",
        f"--device={args.device}",
        f"--seed={args.seed}",
    ]
    rows = []
    for metric_name, mode in CASES:
        out = subprocess.run(
            [sys.executable, __file__, *common, "--case", metric_name, mode],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done: {metric_name} {mode}", file=sys.stderr)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    _print_table(rows)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
