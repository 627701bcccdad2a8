"""Inference ms/image at batch 1 and images/s at batch 32 of every method, and of anomalib's
STFPM, Reverse Distillation and EfficientAd (S and M) beside stad's at the same settings.

stad's numbers come from :func:`stad.timing.measure_inference`, the function the run records
them with (eval mode, no gradients, warm-up, median, accelerator synchronised). anomalib's
torch models are timed the same way in eval mode (maps and scores, as its ``validation_step``),
alternating with stad's, ``--repeats`` times; the ratio is the median of per-repetition ratios.
Weights are random (speed does not depend on them; nothing downloads): EfficientAD's teacher
comes from a random PDN state-dict file (``method.teacher.weights``), so no pretraining runs, and
it is timed as EfficientAD-S and EfficientAD-M (rows ``efficientad_s``, ``efficientad_m``). A
method that cannot be built here gets its error in the CSV instead.

    python benchmarks/inference_speed.py [--methods stfpm rd dskd ast aand us] [--device cpu]
        [--backbone BACKBONE] [--image-size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import _common  # benchmarks/_common.py: the script's folder is on sys.path
import torch
import training_speed

from stad.core import Method
from stad.methods import METHODS
from stad.timing import measure_inference

COLUMNS = ["method", "side", "backbone", "image_size", "ms_per_image_batch1",
           "images_per_s_batch32", "ratio_b1_vs_anomalib", "ratio_b32_vs_anomalib",
           "error"]  # fmt: skip


class _PeerAsMethod(torch.nn.Module):
    """anomalib's torch model behind stad's ``method(batch)`` call, for the same timing code."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model(batch["image"])


# Rows timed per registered method: EfficientAD as its two sizes (name, stad overrides).
VARIANTS = {
    "efficientad": [
        ("efficientad_s", ["method.size=small"]),
        ("efficientad_m", ["method.size=medium"]),
    ]
}


def _stad_method(
    name: str, backbone: str | None, device: torch.device, extra: list[str]
) -> tuple[Method, str]:
    # dataset=mvtec: backbone=auto then resolves to the method's paper backbone (the generated
    # dataset's default would pick the offline EfficientNet-Lite0); no data is read.
    overrides = [f"method={name}", "dataset=mvtec", "backbone.weights=random", *extra]
    if backbone:
        overrides.insert(1, f"backbone={backbone}")
    method, cfg = _common.random_method(overrides)
    return method.to(device), str(cfg.backbone.name)


def _efficientad_peer(size: str) -> torch.nn.Module:
    """anomalib's EfficientAd torch model (unpadded PDNs, padded maps: its defaults), with
    statistics and quantiles set so its normalisation runs as after training."""
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel

    model = EfficientAdModel(teacher_out_channels=384, model_size=size)
    with torch.no_grad():
        model.mean_std["std"].fill_(1.0)
        model.quantiles["qb_st"].fill_(1.0)
        model.quantiles["qb_ae"].fill_(1.0)
    return model


def _peer(name: str, size: int) -> torch.nn.Module | None:
    """anomalib's model of a timed row, or None where anomalib has no such method."""
    if name in training_speed.SETTINGS:
        return training_speed.peer_model(name, size)
    if name in ("efficientad_s", "efficientad_m"):
        return _efficientad_peer("small" if name.endswith("_s") else "medium")
    return None


PEER_BACKBONES = {"efficientad_s": "pdn_small", "efficientad_m": "pdn_medium"}


def bench_method(name: str, args: argparse.Namespace, peer: bool) -> list[dict[str, Any]]:
    """stad's rows for one registered method (EfficientAD: S and M)."""
    rows = []
    for row, extra in VARIANTS.get(name, [(name, [])]):
        rows += _bench_row(name, row, extra, args, peer)
    return rows


def _bench_row(
    name: str, row: str, extra: list[str], args: argparse.Namespace, peer: bool
) -> list[dict[str, Any]]:
    """stad's speed for one row, and anomalib's beside it where it has the method."""
    device = torch.device(args.device)
    size = args.rd_image_size if name == "rd" and args.rd_image_size else args.image_size
    common = {
        "method": row,
        "image_size": size,
        "device": _common.device_name(device),
        "load_1min": _common.load_average(),
        **_common.versions(),
    }
    torch.manual_seed(0)
    batch = {"image": torch.rand(4, 3, size, size, device=device)}
    batch.update(_extras(batch["image"]))
    try:
        method, backbone = _stad_method(name, args.backbone, device, extra)
        if args.channels_last:
            method = method.to(memory_format=torch.channels_last)
    except Exception as err:  # a method that cannot be built here: report, go on
        return [{**common, "side": "stad", "error": f"{type(err).__name__}: {err}"[:200]}]
    # The peer only at the paper's backbone (EfficientAD has none: its PDNs are its own).
    paper = not args.backbone or name == "efficientad"
    peer_net = _peer(row, size) if peer and paper else None
    peer_model = _PeerAsMethod(peer_net) if peer_net is not None else None
    if peer_model is not None:
        peer_model = peer_model.to(device)
    ours, theirs = [], []
    for repeat in range(args.repeats):
        speed = measure_inference(
            method,
            batch,
            repeats=args.calls,
            budget_s=args.budget,
            channels_last=args.channels_last,
        )
        ours.append(speed)
        line = f"{row} repeat {repeat}: stad {speed.ms_per_image_batch1:.1f} ms/img (b1), "
        line += f"{speed.images_per_s_batch32:.2f} img/s (b32)"
        if peer_model is not None:
            their = measure_inference(peer_model, batch, repeats=args.calls, budget_s=args.budget)
            theirs.append(their)
            line += f"; anomalib {their.ms_per_image_batch1:.1f} ms/img, "
            line += f"{their.images_per_s_batch32:.2f} img/s"
        print(f"{line} (load {_common.load_average()})", flush=True)
    rows = [
        {
            **common,
            "side": "stad",
            "backbone": PEER_BACKBONES.get(row, backbone),
            "channels_last": args.channels_last,
            "ms_per_image_batch1": round(_common.median(s.ms_per_image_batch1 for s in ours), 2),
            "images_per_s_batch32": round(_common.median(s.images_per_s_batch32 for s in ours), 2),
        }
    ]
    if theirs:
        pairs = list(zip(ours, theirs, strict=True))
        rows[0]["ratio_b1_vs_anomalib"] = round(
            _common.median(t.ms_per_image_batch1 / o.ms_per_image_batch1 for o, t in pairs), 2
        )
        rows[0]["ratio_b32_vs_anomalib"] = round(
            _common.median(o.images_per_s_batch32 / t.images_per_s_batch32 for o, t in pairs), 2
        )
        rows.append(
            {
                **common,
                "side": "anomalib",
                "backbone": PEER_BACKBONES.get(row)
                or training_speed.SETTINGS[name]["peer_backbone"],
                "channels_last": False,
                "ms_per_image_batch1": round(
                    _common.median(s.ms_per_image_batch1 for s in theirs), 2
                ),
                "images_per_s_batch32": round(
                    _common.median(s.images_per_s_batch32 for s in theirs), 2
                ),
            }
        )
    return rows


def _extras(images: torch.Tensor) -> dict[str, Any]:
    """Batch entries beside the image some methods read (3-D ones: depth)."""
    n, _, h, w = images.shape
    return {
        "mask": torch.zeros(n, 1, h, w, device=images.device),
        "label": torch.zeros(n, dtype=torch.long, device=images.device),
        "path": [f"img{i}.png" for i in range(n)],
    }


def main() -> None:
    """Benchmark every method, print the table and write the CSV."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default=None, help="one backbone for all (default: paper)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--rd-image-size", type=int, default=0, help="0: --image-size")
    parser.add_argument("--repeats", type=int, default=3, help="alternations with the peer")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per measurement")
    parser.add_argument(
        "--channels-last",
        action="store_true",
        default=torch.cuda.is_available(),
        help="stad in channels_last (default: on CUDA only, as trainer.channels_last=auto)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--csv", type=Path, default=_common.RESULTS / "inference_speed.csv")
    _common.run_and_write(parser.parse_args(), bench_method, COLUMNS)


if __name__ == "__main__":
    main()
