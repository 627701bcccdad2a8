"""Training images/s of STFPM and Reverse Distillation: stad against anomalib, same settings.

Both sides train the same architecture (same timm backbone with random weights: speed does not
depend on them, and nothing downloads), at the same image size and batch size, on the same
in-memory batch, with their own optimiser (STFPM: SGD; RD: Adam), one full step each time:
teacher forward, student forward, loss, backward, optimiser step. stad runs its Stage loss
exactly as ``StageModule`` does in a run, with the run's default memory format
(``trainer.channels_last``); anomalib runs its torch model and loss exactly as its
Lightning ``training_step`` does. Lightning's own loop overhead is left out on both sides.

The two sides alternate, ``--repeats`` times, so the ratio (median of per-repetition ratios)
compares them under the same machine load. stad's step is also split into where the time goes:
teacher forward, student forward (+ loss), backward + optimiser step, from three timings of the
same batch (teacher alone; loss under ``no_grad``; full step).

    python benchmarks/training_speed.py [--methods stfpm rd] [--device cpu] [--repeats 3]
        [--steps 3] [--rd-image-size 128 --rd-batch-size 8]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import _common  # benchmarks/_common.py: the script's folder is on sys.path
import torch
from hydra import compose, initialize_config_module

from stad.core import StageModule, stage_parameters
from stad.methods import build_method
from stad.run import use_channels_last

# Per method: stad's backbone config (conf/backbone), anomalib's backbone name, and the
# paper's image and batch sizes (conf/method).
SETTINGS = {
    "stfpm": {"backbone": "resnet18", "peer_backbone": "resnet18", "size": 256,
              "batch": 32},
    "rd": {"backbone": "wide_resnet50_2", "peer_backbone": "wide_resnet50_2",
           "size": 256, "batch": 16},
}  # fmt: skip
COLUMNS = ["method", "side", "image_size", "batch_size", "images_per_s", "ratio_vs_anomalib",
           "teacher_ms_per_image", "student_forward_ms_per_image",
           "backward_step_ms_per_image"]  # fmt: skip

Step = Callable[[], None]


# -- stad -------------------------------------------------------------------------------------
def stad_step(
    method_name: str,
    backbone: str,
    images: torch.Tensor,
    channels_last: bool | None,
    feature_cache: bool,
) -> Any:
    """stad's training step and the pieces of it for the breakdown.

    ``channels_last`` None takes the run's default (``trainer.channels_last=auto``: on CUDA
    only). With ``feature_cache`` (the methods' default) the repeated steps on one batch time a
    later epoch, whose teacher features come from the cache filled in the first epoch.
    """
    overrides = [
        f"method={method_name}",
        f"backbone={backbone}",
        "backbone.weights=random",
        f"method.feature_cache={str(feature_cache).lower()}",
        f"trainer.accelerator={'cpu' if images.device.type == 'cpu' else 'gpu'}",
    ]
    with initialize_config_module("stad.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if channels_last is None:
        channels_last = use_channels_last(cfg)
    method = build_method(cfg.method, cfg.backbone).to(images.device)
    if channels_last:  # what run.py does
        method = method.to(memory_format=torch.channels_last)
    stage = method.stages[0]
    module = StageModule(method, stage, channels_last=channels_last)
    module.train()
    optimizer = stage.optimizer(list(stage_parameters(method, stage)))
    batch = module._prepare(_batch(images))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module._stage_loss(batch)["loss"].backward()
        optimizer.step()

    def teacher() -> None:
        method.teacher(batch)

    def forward() -> None:
        with torch.no_grad():
            module._stage_loss(batch)

    return step, teacher, forward, channels_last


def _batch(images: torch.Tensor) -> dict[str, Any]:
    n, _, h, w = images.shape
    return {
        "image": images,
        "mask": torch.zeros(n, 1, h, w, device=images.device),
        "label": torch.zeros(n, dtype=torch.long, device=images.device),
        "path": [f"img{i}.png" for i in range(n)],
    }


# -- anomalib ---------------------------------------------------------------------------------
@contextmanager
def _random_init_teacher(module: Any):
    """anomalib's STFPM always asks timm for pretrained teacher weights (a download); make its
    feature extractor random-init while the model is built. Nothing else changes."""
    original = module.TimmFeatureExtractor

    def random_init(*args: Any, **kwargs: Any) -> Any:
        kwargs["pre_trained"] = False
        return original(*args, **kwargs)

    module.TimmFeatureExtractor = random_init
    try:
        yield
    finally:
        module.TimmFeatureExtractor = original


def peer_model(name: str, size: int) -> torch.nn.Module:
    """anomalib's STFPM / RD torch model on the method's backbone, random weights."""
    backbone = SETTINGS[name]["peer_backbone"]
    layers = ["layer1", "layer2", "layer3"]
    if name == "stfpm":
        from anomalib.models.image.stfpm import torch_model

        with _random_init_teacher(torch_model):
            return torch_model.STFPMModel(layers=layers, backbone=backbone)
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
    from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

    return ReverseDistillationModel(
        backbone=backbone,
        input_size=(size, size),
        layers=layers,
        anomaly_map_mode=AnomalyMapGenerationMode.ADD,
        pre_trained=False,
    )


def anomalib_step(name: str, images: torch.Tensor) -> Step:
    """anomalib's training step: its torch model in train mode, its loss, its optimiser."""
    model = peer_model(name, images.shape[-1]).to(images.device)
    if name == "stfpm":
        from anomalib.models.image.stfpm.loss import STFPMLoss

        loss_fn: Any = STFPMLoss()
        # anomalib's Stfpm.configure_optimizers
        params = model.student_model.parameters()
        optimizer = torch.optim.SGD(params, lr=0.4, momentum=0.9, weight_decay=0.001)
    else:
        from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss

        loss_fn = ReverseDistillationLoss()
        # anomalib's ReverseDistillation.configure_optimizers
        params = list(model.decoder.parameters()) + list(model.bottleneck.parameters())
        optimizer = torch.optim.Adam(params, lr=0.005, betas=(0.5, 0.99))
    model.train()

    def step() -> None:
        teacher_features, student_features = model(images)
        loss = loss_fn(teacher_features, student_features)
        loss.item()  # its training_step logs loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


# -- timing -----------------------------------------------------------------------------------
def seconds_per_call(fn: Step, calls: int, warmup: int, device: torch.device) -> float:
    """Median seconds of ``calls`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        _common.sync(device)
        start = time.perf_counter()
        fn()
        _common.sync(device)
        times.append(time.perf_counter() - start)
    return _common.median(times)


def bench_method(name: str, args: argparse.Namespace, peer: bool) -> list[dict[str, Any]]:
    """Interleaved repetitions of stad's and anomalib's step for one method."""
    settings = SETTINGS[name]
    size = args.rd_image_size if name == "rd" and args.rd_image_size else settings["size"]
    batch_size = args.rd_batch_size if name == "rd" and args.rd_batch_size else settings["batch"]
    if name == "stfpm" and args.stfpm_batch_size:
        batch_size = args.stfpm_batch_size
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.rand(batch_size, 3, size, size, device=device)
    cl = {"auto": None, "on": True, "off": False}[args.channels_last]
    ours, teacher, forward, cl = stad_step(
        name, settings["backbone"], images, cl, not args.no_feature_cache
    )
    theirs = anomalib_step(name, images) if peer else None
    samples: dict[str, list[float]] = {"stad": [], "anomalib": [], "ratio": []}
    parts: dict[str, list[float]] = {"teacher": [], "forward": []}
    for repeat in range(args.repeats):
        load = _common.load_average()
        mine = seconds_per_call(ours, args.steps, args.warmup, device)
        samples["stad"].append(mine)
        parts["teacher"].append(seconds_per_call(teacher, args.steps, 1, device))
        parts["forward"].append(seconds_per_call(forward, args.steps, 1, device))
        line = f"{name} repeat {repeat}: stad {batch_size / mine:.2f} img/s"
        if theirs is not None:
            peer_s = seconds_per_call(theirs, args.steps, args.warmup, device)
            samples["anomalib"].append(peer_s)
            samples["ratio"].append(peer_s / mine)
            line += f", anomalib {batch_size / peer_s:.2f} img/s, ratio {peer_s / mine:.2f}"
        print(f"{line} (load {load})", flush=True)
    step_s = _common.median(samples["stad"])
    teacher_s = _common.median(parts["teacher"])
    forward_s = _common.median(parts["forward"])
    common = {
        "method": name,
        "image_size": size,
        "batch_size": batch_size,
        "device": _common.device_name(device),
        "repeats": args.repeats,
        "steps": args.steps,
        "load_1min": _common.load_average(),
        **_common.versions(),
    }
    per_image = 1000 / batch_size
    rows = [
        {
            **common,
            "side": "stad",
            "channels_last": cl,
            "feature_cache": not args.no_feature_cache,
            "images_per_s": round(batch_size / step_s, 2),
            "ratio_vs_anomalib": (
                round(_common.median(samples["ratio"]), 2) if samples["ratio"] else ""
            ),
            "teacher_ms_per_image": round(teacher_s * per_image, 1),
            "student_forward_ms_per_image": round((forward_s - teacher_s) * per_image, 1),
            "backward_step_ms_per_image": round((step_s - forward_s) * per_image, 1),
        }
    ]
    if samples["anomalib"]:
        peer_s = _common.median(samples["anomalib"])
        rows.append(
            {
                **common,
                "side": "anomalib",
                "channels_last": False,
                "images_per_s": round(batch_size / peer_s, 2),
            }
        )
    return rows


def main() -> None:
    """Benchmark every method, print the table and write the CSV."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--stfpm-batch-size", type=int, default=0, help="0: the paper's (32)")
    parser.add_argument("--rd-image-size", type=int, default=0, help="0: the paper's (256)")
    parser.add_argument("--rd-batch-size", type=int, default=0, help="0: the paper's (16)")
    parser.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default="auto",
        help="stad's memory format (auto: the run's default, on CUDA only)",
    )
    parser.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="recompute the frozen teacher every step (first epoch) instead of a later epoch",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--csv", type=Path, default=_common.RESULTS / "training_speed.csv")
    _common.run_and_write(parser.parse_args(), bench_method, COLUMNS)


if __name__ == "__main__":
    main()
