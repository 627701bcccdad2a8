"""The GPU suite: every method at its paper resolution, training and inference speed in fp32 and
bf16 autocast, channels_last off and on, peak GPU memory, anomalib beside where installed.

    bash benchmarks/gpu_suite.sh              # on a machine with one CUDA GPU (no network needed)
    bash benchmarks/gpu_suite.sh --dry-run    # every step at tiny size, on the CPU (minutes)

Everything runs at random weights (speed does not depend on them; nothing downloads):
EfficientAD's teacher is a random PDN state-dict file, Uninformed Students' teachers are
pretrained for 2 steps. Per method and setting:

- training: the median seconds of a few optimiser steps of the method's first training stage at
  its batch size, as seconds per epoch of an MVTec-sized category (``--train-images``, 209 =
  bottle's training set);
- inference: ``stad.timing.measure_inference`` (what runs record): ms/image at batch 1 and
  images/s at batch 32;
- peak GPU memory (``torch.cuda.max_memory_allocated``) over both;
- anomalib's STFPM, RD and EfficientAd inference at the same size and precision where anomalib
  is installed (``benchmarks/inference_speed.py``'s peers).

A deadline (``--budget-s``, default 420 s) keeps the whole suite within 8 minutes: settings not
reached are listed as not measured. The CSV goes to ``benchmarks/results/gpu_suite.csv``; with
``--write-docs`` (the shell wrapper's default on a GPU) the table replaces the GPU section of
docs/performance.md, between its ``gpu-suite`` markers.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common  # benchmarks/_common.py: the script's folder is on sys.path
import torch

from stad.core import Calibration, StageModule, optimizer_groups
from stad.methods import METHODS
from stad.timing import measure_inference

DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
START, END = "<!-- gpu-suite:start -->", "<!-- gpu-suite:end -->"
COLUMNS = ["method", "side", "precision", "channels_last", "image_size", "batch_size",
           "train_s_per_epoch", "ms_per_image_batch1", "images_per_s_batch32", "peak_gpu_mb",
           "note"]  # fmt: skip
# Rows per registered method: EfficientAD as S and M (name, overrides).
VARIANTS = {
    "efficientad": [
        ("efficientad_s", ["method.size=small"]),
        ("efficientad_m", ["method.size=medium"]),
    ]
}
PEERS = {"stfpm", "rd", "efficientad_s", "efficientad_m"}
# A dry run's 64 px is below these methods' floors: EfficientAD's autoencoder needs 256 px, RD++'s
# noise rectangles start at 10 px (3 px at 64, as the tiny tests use).
DRY_RUN_FLOORS = {"efficientad": ["image_size=256"], "rdpp": ["method.noise.min_side=3"]}


def build(name: str, extra: list[str], size: int | None, device: torch.device) -> tuple[Any, Any]:
    """A method at random weights (paper backbone and resolution unless ``size``)."""
    overrides = [f"method={name}", "dataset=mvtec", "backbone.weights=random"]
    if size:  # before the row's own overrides, which may raise it to a method's floor
        overrides.append(f"image_size={size}")
    overrides += extra
    if name == "us":
        overrides.append("method.teacher.steps=2")

    def us_cache(cfg: Any, tmp: Path) -> None:
        if name == "us":
            cfg.method.teacher.cache_dir = str(tmp)  # two-step teachers, not the user's cache

    method, cfg = _common.random_method(overrides, us_cache)
    return method.to(device), cfg


def _autocast(device: torch.device, bf16: bool) -> Any:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_seconds(
    method: Any, size: int, batch: int, device: torch.device, bf16: bool, cl: bool, steps: int
) -> float:
    """Median seconds of one optimiser step of the first training stage (after a warm-up)."""
    stage = next(s for s in method.stages if not isinstance(s, Calibration))
    images = torch.rand(batch, 3, size, size, device=device)
    data = {"image": images, "mask": torch.zeros(batch, 1, size, size, device=device),
            "label": torch.zeros(batch, dtype=torch.long, device=device)}  # fmt: skip
    for name, stream in stage.streams.items():  # derived streams as the runner gives them
        from stad.data.streams import build_derived_stream, is_derived

        if is_derived(stream.source):
            derived = build_derived_stream(stream.source, size, 0)
            derived.set_epoch(0)
            data.setdefault("streams", {})[name] = derived(data)
    module = StageModule(method, stage, channels_last=cl)
    module.train()
    optimizer = stage.optimizer(optimizer_groups(method, stage))
    batch_dict = module._prepare(data)
    times = []
    for i in range(steps + 1):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, bf16):
            loss = module._stage_loss(batch_dict)["loss"]
        loss.backward()
        optimizer.step()
        _sync(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    method.eval()
    return statistics.median(times)


def measure(
    row: str,
    name: str,
    extra: list[str],
    args: argparse.Namespace,
    device: torch.device,
    bf16: bool,
    cl: bool,
) -> dict[str, Any]:
    """One method × precision × memory-format row."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    method, cfg = build(name, extra, args.image_size, device)
    if cl:
        method = method.to(memory_format=torch.channels_last)
    size = int(cfg.image_size)
    batch = args.batch or int(cfg.method.batch_size)
    step = train_seconds(method, size, batch, device, bf16, cl, args.train_steps)
    images = {"image": torch.rand(2, 3, size, size, device=device)}
    speed = measure_inference(
        method,
        images,
        batch_sizes=(1, args.large_batch),
        warmup=1,
        repeats=args.calls,
        budget_s=args.call_budget_s,
        channels_last=cl,
        autocast_dtype=torch.bfloat16 if bf16 else None,
    )
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "method": row,
        "side": "stad",
        "precision": "bf16-autocast" if bf16 else "fp32",
        "channels_last": cl,
        "image_size": size,
        "batch_size": batch,
        "train_s_per_epoch": round(step * args.train_images / batch, 2),
        "ms_per_image_batch1": round(speed.ms_per_image_batch1, 2),
        "images_per_s_batch32": round(speed.images_per_s_batch32, 2),
        "peak_gpu_mb": round(peak, 1) if peak is not None else "",
        "note": "",
    }


def peer_row(
    row: str, size: int, args: argparse.Namespace, device: torch.device, bf16: bool
) -> dict[str, Any]:
    """anomalib's inference at the same size and precision (needs anomalib)."""
    import inference_speed

    model = inference_speed._PeerAsMethod(inference_speed._peer(row, size)).to(device)
    speed = measure_inference(
        model,  # type: ignore[arg-type]
        {"image": torch.rand(2, 3, size, size, device=device)},
        batch_sizes=(1, args.large_batch),
        warmup=1,
        repeats=args.calls,
        budget_s=args.call_budget_s,
        autocast_dtype=torch.bfloat16 if bf16 else None,
    )
    return {"method": row, "side": "anomalib", "precision": "bf16-autocast" if bf16 else "fp32",
            "channels_last": False, "image_size": size, "batch_size": "",
            "train_s_per_epoch": "", "ms_per_image_batch1": round(speed.ms_per_image_batch1, 2),
            "images_per_s_batch32": round(speed.images_per_s_batch32, 2), "peak_gpu_mb": "",
            "note": ""}  # fmt: skip


def _unmeasured(row: str, bf16: bool, cl: bool, note: str) -> dict[str, Any]:
    precision = "bf16-autocast" if bf16 else "fp32"
    return {
        "method": row,
        "side": "stad",
        "precision": precision,
        "channels_last": cl,
        "note": note,
    }


def settings(args: argparse.Namespace) -> Iterator[tuple[str, str, list[str], bool, bool]]:
    """(row, method, overrides, bf16, channels_last) for every requested row. A dry run times
    every method once (fp32, channels_last off) and the other three settings on the first
    method only: each code path runs, in minutes."""
    combos = [(bf16, cl) for bf16 in (False, True) for cl in (False, True)]
    for index, name in enumerate(args.methods):
        for row, extra in VARIANTS.get(name, [(name, [])]):
            for bf16, cl in combos if index == 0 or not args.dry_run else combos[:1]:
                yield row, name, extra, bf16, cl


def markdown(rows: list[dict[str, Any]], device: str, seconds: float) -> str:
    """The GPU section's table and the machine line."""
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |\n" for r in rows)
    return (f"{START}\nMeasured by `bash benchmarks/gpu_suite.sh` on {device} in {seconds:.0f} s "
            f"({_common.versions()}).\n\n{head}{body}{END}")  # fmt: skip


def write_docs(text: str, path: Path = DOCS) -> None:
    """Replace the section between the gpu-suite markers of docs/performance.md."""
    page = path.read_text()
    if START in page and END in page:
        page = page[: page.index(START)] + text + page[page.index(END) + len(END) :]
    else:
        page += f"\n## GPU suite\n\n{text}\n"
    path.write_text(page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every step at tiny size (CPU)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--train-images", type=int, default=209)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--csv", type=Path, default=_common.RESULTS / "gpu_suite.csv")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    args.image_size, args.batch, args.large_batch = None, None, 32
    args.calls, args.call_budget_s = 5, 10.0
    if args.dry_run:  # tiny: 64 px (EfficientAD's floor: 256), batch 2, one step, batches 1/2
        args.image_size, args.batch, args.large_batch = 64, 2, 2
        args.train_steps, args.calls, args.call_budget_s = 1, 1, 1.0
    device = torch.device(args.device)
    device_name = _common.device_name(device)
    peers = _common.anomalib_version() is not None
    start, rows = time.perf_counter(), []
    for row, name, extra, bf16, cl in settings(args):
        if time.perf_counter() - start > args.budget_s:
            rows.append(_unmeasured(row, bf16, cl, "not measured (time budget)"))
            continue
        size_extra = DRY_RUN_FLOORS.get(name, []) if args.dry_run else []
        try:
            result = measure(row, name, [*extra, *size_extra], args, device, bf16, cl)
        except Exception as err:  # report and go on: one method must not stop the suite
            message = " ".join(f"error: {type(err).__name__}: {err}".split())[:160]
            result = _unmeasured(row, bf16, cl, message)
        rows.append(result)
        print(" ".join(f"{k}={result.get(k, '')}" for k in COLUMNS), flush=True)
        if peers and row in PEERS and not cl and not result.get("note"):
            rows.append(peer_row(row, int(result["image_size"]), args, device, bf16))
    seconds = time.perf_counter() - start
    _common.write_csv(args.csv, rows)
    text = markdown(rows, device_name, seconds)
    if args.write_docs and not args.dry_run:
        write_docs(text)
    print(text)
    print(f"gpu suite: {len(rows)} rows in {seconds:.0f} s on {device_name}", file=sys.stderr)
    failed = [r for r in rows if str(r.get("note", "")).startswith("error:")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
