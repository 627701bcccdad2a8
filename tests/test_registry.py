"""Every registered method, driven by the registry (stad.methods.METHODS) and the shared tiny
settings (conftest.TINY_METHODS): maps and scores of the contract's shapes, and a few steps of
every training stage lower its loss while nothing outside the stage changes. Checkpoint round
trips and exports of the same methods: test_checkpoint.py, test_export.py."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch, tiny_image_size, tiny_method_config, with_streams

from stad.core import Calibration, StageModule, stage_parameters
from stad.methods import METHODS, build_method


def _batch(method, n: int = 2, size: int = 64) -> dict:
    batch = random_batch(n, size)
    if "depth" in method.requires:
        batch["depth"] = torch.rand(n, 1, size, size)
        batch["foreground"] = torch.ones(n, 1, size, size)
    batch["path"] = [f"{i}.png" for i in range(n)]
    return batch


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("registry")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_gives_maps_at_input_resolution_and_one_score_per_image(name, cache):
    cfg = tiny_method_config(name, cache)
    torch.manual_seed(0)
    method = build_method(cfg.method, cfg.backbone).eval()
    size = tiny_image_size(name)
    batch = _batch(method, n=3, size=size)
    with torch.no_grad():
        maps, scores = method(batch)
    assert maps.shape == (3, 1, size, size) and scores.shape == (3,)
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_stage_of_every_method_learns_and_touches_only_what_it_trains(name, cache):
    cfg = tiny_method_config(name, cache)
    torch.manual_seed(0)
    method = build_method(cfg.method, cfg.backbone)
    batch = _batch(method, size=tiny_image_size(name))
    stages = 0
    for step in method.stages:
        if isinstance(step, Calibration):  # statistics a later stage needs, fitted in order
            method.eval()
            step.reset(method)
            step.update(method, batch)
            step.finish(method)
            continue
        stages += 1
        trained = {id(p) for p in stage_parameters(method, step)}
        frozen = {n: p.clone() for n, p in method.named_parameters() if id(p) not in trained}
        StageModule(method, step).train()
        optimizer = step.optimizer([p for p in method.parameters() if id(p) in trained])
        step_batch = with_streams(step, batch)
        before = float(step.loss(method, step_batch)["loss"])
        for _ in range(3):
            optimizer.zero_grad()
            step.loss(method, step_batch)["loss"].backward()
            optimizer.step()
        after = float(step.loss(method, step_batch)["loss"])
        assert after < before, f"{name} stage {step.name}: loss {before} -> {after}"
        for n, p in method.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), f"{name} stage {step.name} changed {n}"
    assert stages == len(method.training_stages) >= 1
