"""DSKD: shapes of both students, the per-level map against the paper's formula, gradients of
the joint loss, one optimisation step, config composition, and detection end to end."""

import pytest
import torch
from conftest import E2E_TRAINING, assert_steps_lower_the_loss, compose_config, random_batch

from stad.core import StageModule, stage_parameters
from stad.methods import build_method
from stad.methods.dskd import dskd_distance
from stad.run import run

BACKBONES = {
    "resnet18": ([64, 128, 256], "random"),
    "wide_resnet50_2": ([256, 512, 1024], "random"),
    "tf_efficientnet_lite0": ([24, 40, 112], "package"),
}


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_both_students_give_every_teacher_level(backbone):
    channels, weights = BACKBONES[backbone]
    cfg = compose_config(["method=dskd", f"backbone={backbone}", f"backbone.weights={weights}"])
    with torch.device("meta" if backbone == "wide_resnet50_2" else "cpu"):
        method = build_method(cfg.method, cfg.backbone)
        batch = random_batch(size=96)
        targets = method.teacher(batch)
        encoded, decoded = method.student.both(batch, targets)
        maps, scores = method(batch)
    assert [t.shape[1] for t in targets] == channels
    assert [t.shape[-1] for t in targets] == [24, 12, 6]
    assert [e.shape for e in encoded] == [t.shape for t in targets]
    assert [d.shape for d in decoded] == [t.shape for t in targets]
    assert maps.shape == (2, 1, 96, 96) and scores.shape == (2,)


def test_level_map_follows_the_paper_formula():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    got = dskd_distance(t, s, lam=0.1, power=2.0)
    tn, sn = t.norm(dim=1, keepdim=True), s.norm(dim=1, keepdim=True)
    cos = (t * s).sum(1, keepdim=True) / (tn * sn)
    expected = 0.1 * 0.5 * (t / tn**2 - s / sn**2).pow(2).sum(1, keepdim=True) + 1 - cos
    assert got.shape == (2, 1, 3, 3)
    assert torch.allclose(got, expected, atol=1e-6)
    # Unit vectors (power 1): the L2 term equals 1 − cos, so M = 1.1·(1 − cos).
    assert torch.allclose(dskd_distance(t, s, 0.1, 1.0), 1.1 * (1 - cos), atol=1e-6)


def test_joint_loss_sums_both_students_and_reaches_the_encoder_through_the_decoder(tiny_config):
    cfg = tiny_config("method=dskd", "method.detach_encoder=false")
    method = build_method(cfg.method, cfg.backbone)
    stage = method.stages[0]
    batch = random_batch()
    losses = stage.loss(method, batch)
    assert torch.allclose(losses["loss"], losses["loss_encoder"] + losses["loss_decoder"])
    targets = method.teacher(batch)
    _, decoded = method.student.both(batch, targets)
    level = sum(dskd_distance(t, d).mean() for t, d in zip(targets, decoded, strict=True)) / 3
    assert torch.allclose(losses["loss_decoder"], level, atol=1e-6)
    # detach_encoder=false (stad's alternative): S_d's loss alone gives S_e gradients.
    level.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.encoder.parameters()
    )


def test_detached_encoder_gets_no_gradient_from_the_decoder_loss(tiny_config):
    # The paper's default: the two distillations are trained separately.
    cfg = tiny_config("method=dskd")
    assert cfg.method.detach_encoder is True
    method = build_method(cfg.method, cfg.backbone)
    batch = random_batch()
    targets = method.teacher(batch)
    _, decoded = method.student.both(batch, targets)
    sum(dskd_distance(t, d).mean() for t, d in zip(targets, decoded, strict=True)).backward()
    assert all(p.grad is None for p in method.student.encoder.parameters())
    assert any(p.grad is not None for p in method.student.decoder.parameters())


@pytest.mark.parametrize("power", [2.0, 1.0])
def test_the_embedding_sees_the_encoder_levels_normalised_as_eq_3(tiny_config, power):
    # paper Eq. 3: x / ‖x‖² per position (power 2, the default); power 1: unit vectors.
    cfg = tiny_config("method=dskd", f"method.dfe.input_norm_power={power}")
    assert compose_config(["method=dskd"]).method.dfe.input_norm_power == 2
    method = build_method(cfg.method, cfg.backbone)
    seen = []
    method.student.dfe.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    batch = random_batch()
    method.student.both(batch, method.teacher(batch))
    encoded = method.student.encoder(batch["image"])
    for got, f in zip(seen[0], encoded, strict=True):
        norm = f.norm(dim=1, keepdim=True)
        torch.testing.assert_close(got, f / norm.pow(power))


def test_mtd_composes_the_papers_128_px(tiny_config):
    # The DSKD paper trains MTD at 128×128 and MVTec AD at 256×256.
    assert compose_config(["method=dskd", "dataset=mtd"]).image_size == 128
    assert compose_config(["method=dskd", "dataset=mvtec"]).image_size == 256


def test_one_optimisation_step_lowers_the_loss_and_moves_only_the_students(tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config("method=dskd")
    method = build_method(cfg.method, cfg.backbone)
    stage = method.stages[0]
    StageModule(method, stage).train()
    opt = stage.optimizer(list(stage_parameters(method, stage)))
    assert_steps_lower_the_loss(method, stage.loss, opt, random_batch(n=4))


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_config_composes_the_papers_defaults(backbone):
    cfg = compose_config(["dataset=mvtec", "method=dskd", f"backbone={backbone}"])
    assert cfg.image_size == 256 and cfg.method.lam == 0.1 and cfg.method.scorer.sigma == 4
    distill = cfg.method.stages.distill
    assert distill.epochs == 200 and distill.selection == "last"
    assert distill.optimizer.lr == 0.001 and list(distill.optimizer.betas) == [0.5, 0.999]
    assert cfg.backbone.name.startswith(backbone)
    assert compose_config(["dataset=mvtec", "method=dskd"]).backbone.name == "resnet18.tv_in1k"


@pytest.mark.slow
def test_dskd_detects_the_defects_of_the_generated_dataset(tiny_config, tmp_path):
    # 15 short epochs at 128 px, batch 8, lr 0.005 for the few steps: measured image AUROC 0.81,
    # pixel AUROC 0.93 (chance 0.5).
    cfg = tiny_config(
        "method=dskd",
        "trainer.batch_size=8",
        "method.stages.distill.optimizer.lr=0.005",
        *E2E_TRAINING,
    )
    record = run(cfg, tmp_path)
    assert record["metrics"]["image_auroc"] > 0.7, record["metrics"]
    assert record["metrics"]["pixel_auroc"] > 0.85, record["metrics"]
    assert record["method_info"]["lambda"] == 0.1
