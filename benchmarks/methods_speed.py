"""Training and inference speed of methods side by side, same image size and backbone.

For each method: the first training stage's loss + backward + optimizer step on random images
(training images/s), and the full forward (teacher, student, scorer) in eval mode (inference
ms/image). Weights are random: speed does not depend on them. Writes a CSV and prints a table.

    python benchmarks/methods_speed.py --methods stfpm rd dskd --backbone tf_efficientnet_lite0
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from stad.core import Method, StageModule, stage_parameters
from stad.methods import build_method


def _compose(method: str, backbone: str, image_size: int):
    overrides = [f"method={method}", f"backbone={backbone}", "backbone.weights=random"]
    with initialize_config_module("stad.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    cfg.image_size = image_size
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(n: int, size: int, device: torch.device, channels_last: bool) -> dict:
    image = torch.rand(n, 3, size, size, device=device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return {
        "image": image,
        "mask": torch.zeros(n, 1, size, size, device=device),
        "label": torch.zeros(n, dtype=torch.long, device=device),
    }


def train_images_per_second(method: Method, batch: dict, steps: int, warmup: int) -> float:
    """Images per second of the first stage's optimisation step."""
    stage = method.stages[0]
    module = StageModule(method, stage)
    module.train()
    optimizer = stage.optimizer(list(stage_parameters(method, stage)))
    device = batch["image"].device
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        stage.loss(method, batch)["loss"].backward()
        optimizer.step()
    _sync(device)
    return steps * batch["image"].shape[0] / (time.perf_counter() - start)


@torch.no_grad()
def inference_ms_per_image(method: Method, batch: dict, repeats: int, warmup: int) -> float:
    """Milliseconds per image of the full eval-mode forward (maps and scores)."""
    method.eval()
    device = batch["image"].device
    for i in range(warmup + repeats):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        method(batch)
    _sync(device)
    return 1000 * (time.perf_counter() - start) / (repeats * batch["image"].shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["stfpm"])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/methods_speed.csv"))
    args = parser.parse_args()

    device = torch.device(args.device)
    channels_last = not args.no_channels_last
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {platform.machine()}, {torch.get_num_threads()} threads"
    rows = []
    for method_name in args.methods:
        torch.manual_seed(0)
        cfg = _compose(method_name, args.backbone, args.image_size)
        method = build_method(cfg.method, cfg.backbone).to(device)
        if channels_last:
            method = method.to(memory_format=torch.channels_last)
        batch = _batch(args.batch_size, args.image_size, device, channels_last)
        train = train_images_per_second(method, batch, args.steps, args.warmup)
        infer = inference_ms_per_image(method, batch, args.steps, args.warmup)
        rows.append(
            {
                "method": method_name,
                "backbone": args.backbone,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "device": name,
                "train_images_per_s": round(train, 2),
                "inference_ms_per_image": round(infer, 2),
                "torch": torch.__version__,
            }
        )
        print(f"{method_name:8s} train {train:8.2f} img/s   inference {infer:8.2f} ms/img")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
