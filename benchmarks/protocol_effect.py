"""What an evaluation switch moves: one trained run re-evaluated on its test set under variants
of its config (mask rules, map resampling, blur border), nothing retrained.

    python benchmarks/protocol_effect.py --run outputs/mvtec/bottle/rd/<date> \\
        --variant official: \\
        --variant stad_protocol:eval_protocol.mask_rule=nearest \\
        --variant half_pixel:method.scorer.align_corners=false,method.scorer.blur_border=mirror

Each ``--variant name:key=value,...`` overrides the run's saved config (empty: as saved). Rows
(image AUROC, pixel AUROC, PRO at FPR 0.3) go to ``--csv`` with the run and the command, so
docs/parity.md and docs/metrics.md cite a record that holds each figure.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import _common  # benchmarks/_common.py: the script's folder is on sys.path
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from stad.backbones import weights_from_checkpoint
from stad.checkpoint import _load_state, _read_tensors, checkpoint_path, read_metadata
from stad.core import update_metric
from stad.data import build_dataset
from stad.data.base import decode_cache, mask_rule
from stad.methods import build_method
from stad.metrics import PRO, ImageAUROC, PixelAUROC


def _variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    return name, [o for o in overrides.split(",") if o]


def evaluate(run_dir: Path, overrides: list[str], batch_size: int) -> dict[str, float]:
    """The run's model on its test set, under its config with ``overrides``."""
    meta = read_metadata(run_dir)
    cfg = OmegaConf.merge(OmegaConf.create(meta["config"]), OmegaConf.from_dotlist(overrides))
    with weights_from_checkpoint():
        method = build_method(cfg.method, cfg.backbone)
    _load_state(method, _read_tensors(checkpoint_path(run_dir)), run_dir, cfg)
    method.eval()
    rule = OmegaConf.select(cfg, "eval_protocol.mask_rule", default="nearest")
    downscale = OmegaConf.select(cfg, "eval_protocol.mask_downscale", default=None)
    with decode_cache(cfg.get("decode_cache")), mask_rule(rule, downscale):
        test = build_dataset(cfg.dataset, int(cfg.image_size)).test
    metrics: dict[str, Any] = {
        "image_auroc": ImageAUROC(),
        "pixel_auroc": PixelAUROC(),
        "pro": PRO(fpr_limit=0.3),
    }
    with torch.inference_mode():
        for batch in DataLoader(test, batch_size=batch_size):
            maps, scores = method(batch)
            for name, metric in metrics.items():
                update_metric(name, metric, maps.float(), scores.float(), batch)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained run's directory")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:K=V,...")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--csv", type=Path, default=_common.RESULTS / "protocol_effect.csv")
    args = parser.parse_args()
    rows = []
    for text in args.variant:
        name, overrides = _variant(text)
        values = evaluate(args.run, overrides, args.batch_size)
        rows.append(
            {
                "run": str(args.run),
                "variant": name,
                "overrides": " ".join(overrides) or "(as saved)",
                **{k: f"{v:.4f}" for k, v in values.items()},
                "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            }
        )
        print(rows[-1])
    _common.print_table(rows, ["variant", "overrides", "image_auroc", "pixel_auroc", "pro"])
    existing = []
    if args.csv.exists():
        import csv

        with args.csv.open(newline="") as handle:
            existing = list(csv.DictReader(handle))
    _common.write_csv(args.csv, [*existing, *rows])


if __name__ == "__main__":
    main()
