"""A 2-process CPU (gloo) evaluation gives the same metric values as a single process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stad.metrics import PRO, ImageAUROC, PixelAUROC


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maps (B, 1, H, W), masks, image scores (B,) and image labels (B,) for 7 images."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(7, 1, 32, 32, dtype=torch.bool)
    masks[1, 0, 4:12, 4:10] = True
    masks[2, 0, 20:30, 2:8] = True
    masks[2, 0, 1:3, 25:31] = True
    masks[5, 0, 10:20, 10:20] = True
    maps = torch.rand(7, 1, 32, 32, generator=g) + masks * 0.6
    labels = masks.flatten(1).any(1).long()
    return maps, masks, maps.flatten(1).amax(1), labels


def _metrics() -> dict[str, torch.nn.Module]:
    return {
        "image_auroc": ImageAUROC(),
        "pixel_auroc_binned": PixelAUROC(),
        "pixel_auroc_exact": PixelAUROC(mode="exact"),
        "pro_binned": PRO(),
        "pro_exact": PRO(mode="exact"),
    }


def _evaluate(indices: list[int]) -> dict[str, tuple[float, float]]:
    maps, masks, scores, labels = _data()
    metrics = _metrics()
    # Uneven batches on purpose: rank 0 gets 4 images, rank 1 gets 3.
    for start in range(0, len(indices), 2):
        idx = indices[start : start + 2]
        for name, metric in metrics.items():
            if name == "image_auroc":
                metric.update(scores[idx], labels[idx])
            else:
                metric.update(maps[idx], masks[idx])
    return {k: (float(m.compute()), float(m.error_bound())) for k, m in metrics.items()}


def _worker(rank: int, world_size: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        results = _evaluate(list(range(rank, 7, world_size)))
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_equals_single_process(tmp_path: Path) -> None:
    # forkserver: one clean process imports torch and torchmetrics once (~7 s on 2 cores) and
    # forks both workers from it. Plain fork from pytest can deadlock in OpenMP after earlier
    # tests used threads; spawn would import everything twice.
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if method == "forkserver":
        mp.get_context(method).set_forkserver_preload(["torch", "stad.metrics"])
    mp.start_processes(
        _worker,
        args=(2, str(tmp_path / "store"), str(tmp_path / "out")),
        nprocs=2,
        join=True,
        start_method=method,
    )
    single = _evaluate(list(range(7)))
    for rank in range(2):
        distributed = torch.load(tmp_path / f"out.{rank}")
        assert distributed.keys() == single.keys()
        for name, (value, bound) in single.items():
            assert distributed[name][0] == pytest.approx(value, abs=1e-12), name
            assert distributed[name][1] == pytest.approx(bound, abs=1e-12), name
