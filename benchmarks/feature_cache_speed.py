"""Speed-up of the frozen-feature cache on AST's teacher stage.

Runs a few epochs of AST's teacher optimisation (frozen extractor → flow NLL, Adam) over the same
images twice: with the cache (the first epoch computes features, later epochs read them) and
without it (every epoch runs the extractor). Prints seconds per epoch and the extractor calls,
and writes a CSV.

    python benchmarks/feature_cache_speed.py --image-size 384 --images 32 --epochs 3
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from stad.core import StageModule, stage_parameters
from stad.methods import build_method


def _epochs(method, images: torch.Tensor, batch_size: int, epochs: int, cache: bool) -> list[float]:
    features = method.teacher.features
    if not cache:
        # An unfrozen-looking extractor bypasses the cache: the honest "no cache" baseline.
        features.extractor.frozen = False
    stage = method.stages[0]
    module = StageModule(method, stage)
    module.train()
    optimizer = stage.optimizer(list(stage_parameters(method, stage)))
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            batch = {
                "image": images[i : i + batch_size],
                "path": [f"img{j}.png" for j in range(i, min(i + batch_size, len(images)))],
            }
            optimizer.zero_grad(set_to_none=True)
            stage.loss(method, batch)["loss"].backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/feature_cache.csv"))
    args = parser.parse_args()

    images = torch.rand(args.images, 3, args.image_size, args.image_size)
    rows = []
    for cache in (True, False):
        torch.manual_seed(0)
        overrides = [
            "method=ast",
            f"backbone={args.backbone}",
            f"method.flow.hidden={args.hidden}",
            f"method.student.hidden={args.hidden}",
        ]
        with initialize_config_module("stad.conf", version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        method = build_method(cfg.method, cfg.backbone)
        seconds = _epochs(method, images, args.batch_size, args.epochs, cache)
        calls = method.teacher.features.forward_passes
        rows.append(
            {
                "cache": cache,
                "backbone": args.backbone,
                "image_size": args.image_size,
                "images": args.images,
                "epoch_seconds": " ".join(f"{s:.2f}" for s in seconds),
                "later_epoch_mean_s": round(sum(seconds[1:]) / max(len(seconds) - 1, 1), 3),
                "extractor_calls": calls,
            }
        )
        label = "cache" if cache else "no cache"
        print(f"{label:9s} epochs {rows[-1]['epoch_seconds']} s, extractor calls {calls}")
    speedup = rows[1]["later_epoch_mean_s"] / rows[0]["later_epoch_mean_s"]
    print(f"later epochs: {speedup:.2f}x faster with the cache")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
