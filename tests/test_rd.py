"""Reverse Distillation: shapes of every level, both loss variants, one optimisation step,
config composition, and detection end to end on the generated dataset."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import E2E_TRAINING, assert_steps_lower_the_loss, compose_config, random_batch

from stad.core import StageModule, stage_parameters
from stad.methods import build_method
from stad.methods.rd import flat_cosine_loss, position_cosine_loss, reverse_distillation_loss
from stad.run import run

BACKBONES = {
    "resnet18": ([64, 128, 256], "random"),
    "wide_resnet50_2": ([256, 512, 1024], "random"),
    "tf_efficientnet_lite0": ([24, 40, 112], "package"),
}


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_level_and_the_map_have_the_contract_shapes(backbone):
    channels, weights = BACKBONES[backbone]
    cfg = compose_config(["method=rd", f"backbone={backbone}", f"backbone.weights={weights}"])
    # Wide-ResNet-50-2 on the meta device: shapes without computing 150 M parameters.
    with torch.device("meta" if backbone == "wide_resnet50_2" else "cpu"):
        method = build_method(cfg.method, cfg.backbone)
        batch = random_batch(size=96)
        targets = method.teacher(batch)
        preds = method.student(batch, targets)
        maps, scores = method(batch)
    assert [t.shape[1] for t in targets] == channels
    assert [t.shape[-1] for t in targets] == [24, 12, 6]  # strides 4, 8, 16
    assert [p.shape for p in preds] == [t.shape for t in targets]
    assert maps.shape == (2, 1, 96, 96) and scores.shape == (2,)
    assert method.info["loss"] == "flat"


def test_flat_loss_is_the_official_whole_map_cosine_and_differs_from_the_per_position_one(
    tiny_config,
):
    cfg = tiny_config("method=rd")
    method = build_method(cfg.method, cfg.backbone)
    batch = random_batch()
    t = method.teacher(batch)
    s = method.student(batch, t)
    flat = reverse_distillation_loss(method, batch, "flat")["loss"]
    position = reverse_distillation_loss(method, batch, "position")["loss"]
    expected_flat = sum(
        (
            1
            - (a.flatten(1) * b.flatten(1)).sum(1)
            / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))
        ).mean()
        for a, b in zip(t, s, strict=True)
    )
    expected_position = sum(
        (1 - F.cosine_similarity(a, b, dim=1)).mean() for a, b in zip(t, s, strict=True)
    )
    assert torch.isfinite(flat) and torch.isfinite(position)
    assert torch.allclose(flat, expected_flat, atol=1e-5)
    assert torch.allclose(position, expected_position, atol=1e-5)
    # The two differ where feature norms vary: the whole-map cosine weights positions by norm.
    t = torch.tensor([[1.0, 0.0], [0.0, 0.01]]).T.reshape(1, 2, 1, 2)
    s = torch.tensor([[1.0, 0.0], [0.01, 0.0]]).T.reshape(1, 2, 1, 2)
    assert float(position_cosine_loss(t, s)) == pytest.approx(0.5)
    assert float(flat_cosine_loss(t, s)) < 1e-3


def test_scorer_is_the_official_blurred_sum_of_per_level_cosine_distances(tiny_config):
    """RD4AD's test.py: each level's 1 − cos upsampled with align_corners=True, summed,
    scipy.ndimage.gaussian_filter(σ=4) with its default border (edge repeated), max."""
    from scipy.ndimage import gaussian_filter

    cfg = tiny_config("method=rd")
    method = build_method(cfg.method, cfg.backbone).eval()
    batch = random_batch()
    with torch.no_grad():
        t = method.teacher(batch)
        s = method.student(batch, t)
        maps, scores = method.scorer(t, s, batch)
    summed = sum(
        F.interpolate(
            1 - F.cosine_similarity(a, b).unsqueeze(1),
            size=64,
            mode="bilinear",
            align_corners=True,
        )
        for a, b in zip(t, s, strict=True)
    )
    for i in range(len(maps)):
        official = gaussian_filter(summed[i, 0].double().numpy(), sigma=4)
        np.testing.assert_allclose(maps[i, 0].numpy(), official, rtol=1e-5, atol=1e-6)
        assert abs(float(scores[i]) - official.max()) <= 1e-5 * official.max()


def test_align_corners_changes_an_upsampled_map_inside_not_only_at_the_border():
    """The fix pinned: RD4AD upsamples with align_corners=True; False moves interior pixels."""
    from stad.methods.common import resize

    level = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    pinned, centred = resize(level, (4, 4), align_corners=True), resize(level, (4, 4))
    assert pinned[0, 0, 0, 0] == 0.0 and pinned[0, 0, -1, -1] == 3.0  # corners pinned
    assert torch.isclose(pinned[0, 0, 1, 1], torch.tensor(1.0))  # (1/3, 1/3) of the way: 1.0
    assert torch.isclose(centred[0, 0, 1, 1], torch.tensor(0.75))  # half-pixel centres: 0.75


def test_one_optimisation_step_lowers_the_loss_and_moves_only_the_student(tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config("method=rd")
    method = build_method(cfg.method, cfg.backbone)
    stage = method.stages[0]
    module = StageModule(method, stage)
    module.train()
    assert not method.teacher.extractor.training and method.student.training
    opt = stage.optimizer(list(stage_parameters(method, stage)))
    assert_steps_lower_the_loss(method, stage.loss, opt, random_batch(n=4))


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_config_composes_the_papers_defaults(backbone):
    cfg = compose_config(["dataset=mvtec", "method=rd", f"backbone={backbone}"])
    assert cfg.image_size == 256 and cfg.method.batch_size == 16
    assert cfg.method.loss == "flat" and cfg.method.scorer.sigma == 4
    distill = cfg.method.stages.distill
    assert distill.epochs == 200 and distill.selection == "last"
    assert distill.optimizer.lr == 0.005 and list(distill.optimizer.betas) == [0.5, 0.999]
    assert cfg.backbone.name.startswith(backbone)
    assert compose_config(["dataset=mvtec", "method=rd"]).backbone.name == "wide_resnet50_2.tv_in1k"


@pytest.mark.slow
def test_rd_detects_the_defects_of_the_generated_dataset(tiny_config, tmp_path):
    # 15 short epochs at 128 px, batch 4: measured image AUROC 0.89, pixel AUROC 0.92 (chance 0.5).
    cfg = tiny_config(
        "method=rd",
        "trainer.batch_size=4",
        *E2E_TRAINING,
    )
    record = run(cfg, tmp_path)
    assert record["metrics"]["image_auroc"] > 0.75, record["metrics"]
    assert record["metrics"]["pixel_auroc"] > 0.85, record["metrics"]
    assert record["stages"][0]["selection"] == "last"
    assert record["method_info"]["loss"] == "flat"
