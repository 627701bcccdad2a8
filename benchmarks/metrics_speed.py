"""Pixel AUROC + PRO on an MVTec-sized test set: stad (binned and exact) against anomalib.

The test set (default 1725 maps of 256x256 like MVTec AD's test split, 73 % of the images
anomalous with 1-5 elliptic regions each) is generated once from a seed into a temporary file;
every case then streams it batch by batch, the way a model would produce its maps, so the memory
measured is the metrics' own plus one batch. Each case runs in a fresh subprocess, so its peak
resident memory (getrusage maxrss) and, on CUDA, its peak allocated GPU memory are its own.
Only ``update()`` and ``compute()`` are timed; reading the data is not.

Cases (each computes pixel AUROC and PRO with FPR limit 0.3 from the same tensors):

- ``stad``: stad's PixelAUROC + PRO, binned (the default, bounded memory);
- ``stad_exact``: the same in exact mode (keeps every pixel; the reference values);
- ``stad_pixel_auroc`` / ``stad_pro``: each binned metric alone;
- ``anomalib``: anomalib's AUROC + AUPRO (skipped when anomalib is not installed).

Cases run interleaved, ``--repeats`` times, so the ratio of anomalib's time to stad's comes from
runs side by side under the same machine load (median of the per-repetition ratios).

    python benchmarks/metrics_speed.py [--n-images 1725] [--size 256] [--device cpu]
        [--batch-size 32] [--repeats 3] [--csv benchmarks/results/metrics_speed.csv]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import _common  # benchmarks/_common.py: the script's folder is on sys.path
import numpy as np
import torch

ANOMALOUS_FRACTION = 0.73  # MVTec AD test split: 1258 of 1725 images
MAX_REGIONS = 5
FPR_LIMIT = 0.3
CASES = ["stad", "stad_exact", "stad_pixel_auroc", "stad_pro", "anomalib"]
SUMMARY = ["case", "total_s", "update_s", "compute_s", "peak_rss_mib", "metric_rss_mib",
           "peak_cuda_mib", "pixel_auroc", "pro", "max_error", "ratio_vs_anomalib"]  # fmt: skip


# -- the test set -----------------------------------------------------------------------------
def make_batch(
    index: int, batch_size: int, n_images: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``index`` of the synthetic test set: maps (B, H, W) float32, masks (B, H, W) bool.

    Smooth background noise (bilinear-upsampled from 16x16) plus pixel noise; anomalous images
    get 1-5 ellipses whose pixels score higher by a random, sometimes small, margin.
    """
    rng = np.random.default_rng([seed, index])
    count = min(batch_size, n_images - index * batch_size)
    coarse = torch.from_numpy(rng.standard_normal((count, 1, 16, 16), dtype=np.float32))
    maps = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[:, 0]
    maps = maps.numpy() + 0.3 * rng.standard_normal((count, size, size), dtype=np.float32)
    masks = np.zeros((count, size, size), dtype=bool)
    for i in range(count):
        if rng.random() >= ANOMALOUS_FRACTION:
            continue
        for _ in range(rng.integers(1, MAX_REGIONS + 1)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(size / 64, size / 8, 2)
            y0, y1 = max(0, int(cy - ry)), min(size, int(cy + ry) + 1)
            x0, x1 = max(0, int(cx - rx)), min(size, int(cx + rx) + 1)
            yy, xx = np.ogrid[y0:y1, x0:x1]
            masks[i, y0:y1, x0:x1] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        maps[i] += masks[i] * np.float32(rng.uniform(0.2, 2.5))
    return maps.astype(np.float32), masks


def write_test_set(folder: Path, args: argparse.Namespace) -> None:
    """Generate the whole set into ``folder``/maps.f32 and masks.u8 (raw, image after image)."""
    n_batches = -(-args.n_images // args.batch_size)
    with (folder / "maps.f32").open("wb") as maps_file, (folder / "masks.u8").open("wb") as mf:
        for index in range(n_batches):
            maps, masks = make_batch(index, args.batch_size, args.n_images, args.size, args.seed)
            maps_file.write(maps.tobytes())
            mf.write(masks.tobytes())


def read_batch(folder: Path, index: int, args: argparse.Namespace) -> tuple[np.ndarray, ...]:
    """Batch ``index`` read into fresh (anonymous) memory: no file pages count as the metric's."""
    pixels = args.size * args.size
    start = index * args.batch_size
    count = min(args.batch_size, args.n_images - start)
    shape = (count, args.size, args.size)
    maps = np.fromfile(folder / "maps.f32", np.float32, count * pixels, offset=start * pixels * 4)
    masks = np.fromfile(folder / "masks.u8", np.bool_, count * pixels, offset=start * pixels)
    return maps.reshape(shape), masks.reshape(shape)


# -- one case ---------------------------------------------------------------------------------
def _maxrss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / scale / 2**10


def build_metrics(case: str) -> tuple[dict[str, Any], Any]:
    """The case's metrics by name, and how to feed one batch to them."""
    if case == "anomalib":
        from anomalib.metrics import AUPRO, AUROC

        fields = ["anomaly_map", "gt_mask"]
        metrics = {"pixel_auroc": AUROC(fields=fields), "pro": AUPRO(fields=fields)}

        def feed(metric: Any, maps: torch.Tensor, masks: torch.Tensor) -> None:
            metric.update(SimpleNamespace(anomaly_map=maps, gt_mask=masks))

        return metrics, feed
    from stad.metrics import PRO, PixelAUROC

    mode = "exact" if case == "stad_exact" else "binned"
    metrics = {"pixel_auroc": PixelAUROC(mode=mode), "pro": PRO(fpr_limit=FPR_LIMIT, mode=mode)}
    if case == "stad_pixel_auroc":
        del metrics["pro"]
    if case == "stad_pro":
        del metrics["pixel_auroc"]
    return metrics, lambda metric, maps, masks: metric.update(maps, masks)


def _warm_up(case: str, folder: Path, args: argparse.Namespace, device: torch.device) -> None:
    """Update and compute throw-away metrics on two images: lazy imports and first-call setup
    stay out of the timings, on both sides alike. Leaves one batch's worth of memory touched
    (the baseline of the memory measurement)."""
    metrics, feed = build_metrics(case)
    maps_np, masks_np = read_batch(folder, 0, args)
    maps, masks = torch.from_numpy(maps_np).to(device), torch.from_numpy(masks_np).to(device)
    for metric in metrics.values():
        metric.to(device)
        feed(metric, maps[:2], masks[:2])
        metric.compute()


def run_case(case: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Stream the test set through one case's metrics; return timings, memory and values."""
    device = torch.device(args.device)
    n_batches = -(-args.n_images // args.batch_size)
    _warm_up(case, folder, args, device)
    metrics, feed = build_metrics(case)
    metrics = {name: metric.to(device) for name, metric in metrics.items()}
    baseline = _maxrss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    update_s = 0.0
    for index in range(n_batches):
        maps_np, masks_np = read_batch(folder, index, args)
        maps = torch.from_numpy(maps_np).to(device)
        masks = torch.from_numpy(masks_np).to(device)
        _common.sync(device)
        start = time.perf_counter()
        for metric in metrics.values():
            feed(metric, maps, masks)
        _common.sync(device)
        update_s += time.perf_counter() - start
        del maps, masks, maps_np, masks_np
    start = time.perf_counter()
    values = {name: float(metric.compute()) for name, metric in metrics.items()}
    _common.sync(device)
    compute_s = time.perf_counter() - start
    peak_rss = _maxrss_mib()
    bounds = {
        name: float(metric.error_bound())
        for name, metric in metrics.items()
        if hasattr(metric, "error_bound")
    }
    return {
        "case": case,
        "update_s": update_s,
        "compute_s": compute_s,
        "total_s": update_s + compute_s,
        "peak_rss_mib": round(peak_rss, 1),
        "metric_rss_mib": round(peak_rss - baseline, 1),
        "peak_cuda_mib": (
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda"
            else ""
        ),
        **values,
        "error_bound": max(bounds.values(), default=""),
    }


# -- the comparison ---------------------------------------------------------------------------
def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=1725)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--csv", type=Path, default=_common.RESULTS / "metrics_speed.csv")
    parser.add_argument("--case", help="internal: run one case on --data, print JSON")
    parser.add_argument("--data", type=Path, help="internal: folder of the generated test set")
    return parser.parse_args(argv)


def _summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per case: medians over repetitions, the error against exact, the ratio."""
    exact = next((r for r in runs if r["case"] == "stad_exact"), None)
    peer = {r["repeat"]: r["total_s"] for r in runs if r["case"] == "anomalib"}
    rows = []
    for case in args.cases:
        mine = [r for r in runs if r["case"] == case]
        if not mine:
            continue
        last = mine[-1]
        errors = [
            abs(last[k] - exact[k])
            for k in ("pixel_auroc", "pro")
            if exact is not None and k in last and case != "stad_exact"
        ]
        ratios = [peer[r["repeat"]] / r["total_s"] for r in mine if r["repeat"] in peer]
        rows.append(
            {
                "case": case,
                "device": last["device"],
                "n_images": args.n_images,
                "size": args.size,
                "batch_size": args.batch_size,
                "repeats": len(mine),
                "total_s": round(_common.median(r["total_s"] for r in mine), 3),
                "total_s_all": " ".join(f"{r['total_s']:.2f}" for r in mine),
                "update_s": round(_common.median(r["update_s"] for r in mine), 3),
                "compute_s": round(_common.median(r["compute_s"] for r in mine), 3),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
                "metric_rss_mib": max(r["metric_rss_mib"] for r in mine),
                "peak_cuda_mib": last["peak_cuda_mib"],
                "pixel_auroc": round(last["pixel_auroc"], 6) if "pixel_auroc" in last else "",
                "pro": round(last["pro"], 6) if "pro" in last else "",
                "error_bound": f"{last['error_bound']:.1e}" if last["error_bound"] != "" else "",
                "max_error": f"{max(errors):.1e}" if errors else "",
                "ratio_vs_anomalib": round(_common.median(ratios), 1) if ratios else "",
                "load_1min": " ".join(r["load_1min"] for r in mine),
                **_common.versions(),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Generate the set, run every case ``--repeats`` times interleaved, print and write."""
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case, args.data, args)))
        return
    cases = list(args.cases)
    if "anomalib" in cases and _common.anomalib_version() is None:
        cases.remove("anomalib")
    common = [
        f"--n-images={args.n_images}",
        f"--size={args.size}",
        f"--batch-size={args.batch_size}",
        f"--device={args.device}",
        f"--seed={args.seed}",
        f"--threads={args.threads}",
    ]
    device = _common.device_name(torch.device(args.device))
    runs = []
    with tempfile.TemporaryDirectory(prefix="stad-bench-") as tmp:
        folder = Path(tmp)
        write_test_set(folder, args)
        for repeat in range(args.repeats):
            for case in cases:
                load = _common.load_average()
                out = subprocess.run(
                    [sys.executable, __file__, *common, "--case", case, "--data", tmp],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                run = json.loads(out.stdout.strip().splitlines()[-1])
                runs.append({**run, "repeat": repeat, "load_1min": load, "device": device})
                print(f"repeat {repeat} {case}: {run['total_s']:.2f} s (load {load})", flush=True)
                # Written after every case: a long run stopped early keeps what it measured.
                _common.write_csv(args.csv, _summarise(runs, args))
    rows = _summarise(runs, args)
    print(f"{device}; torch {torch.__version__}; anomalib {_common.anomalib_version()}")
    _common.print_table(rows, SUMMARY)
    _common.write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
