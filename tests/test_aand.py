"""AAND: RAA shapes and pieces against independent references, the two stages (each step lowers
its loss and trains only its part), the gate learning synthetic anomalies, every ablation switch,
the paper defaults, and detection end to end on the generated dataset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import E2E_TRAINING, compose_config, random_batch, with_streams
from hydra.utils import instantiate
from scipy.stats import rankdata
from torch import nn

from stad.core import StageModule, stage_parameters
from stad.errors import DatasetError, IncompatibleError, StadError
from stad.methods import build_method
from stad.methods.aand import (
    ResidualAmplifier,
    amplification_loss,
    focal_loss,
    hard_distillation_loss,
    init_like_official_resnet,
    level_mask,
    positional_encoding,
)
from stad.methods.rd import flat_cosine_loss
from stad.run import run

BACKBONES = {
    "resnet18": ([64, 128, 256], "random"),
    "wide_resnet50_2": ([256, 512, 1024], "random"),
    "tf_efficientnet_lite0": ([24, 40, 112], "package"),
}


def _textured_batch(n: int = 4, size: int = 64, seed: int = 0) -> dict:
    """Smooth random normal images (a batch of the contract)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return {
        "image": F.interpolate(low, size=(size, size), mode="bilinear"),
        "mask": torch.zeros(n, 1, size, size),
        "label": torch.zeros(n, dtype=torch.long),
    }


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by the rank-sum formula (independent of the project's metrics)."""
    s, y = scores.flatten().double().numpy(), labels.flatten().bool().numpy()
    ranks = rankdata(s)
    pos, neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_level_gate_and_map_have_the_contract_shapes(backbone):
    channels, weights = BACKBONES[backbone]
    cfg = compose_config(["method=aand", f"backbone={backbone}", f"backbone.weights={weights}"])
    # Wide-ResNet-50-2 on the meta device: shapes without computing 150 M parameters.
    with torch.device("meta" if backbone == "wide_resnet50_2" else "cpu"):
        method = build_method(cfg.method, cfg.backbone)
        batch = random_batch(size=96)
        targets = method.teacher(batch)
        preds = method.student(batch, targets)
        maps, scores = method(batch)
    assert [t.shape[1] for t in targets] == channels
    assert [t.shape[-1] for t in targets] == [24, 12, 6]  # strides 4, 8, 16
    assert [v.shape for v in targets.vanilla] == [t.shape for t in targets]
    assert [a.shape for a in targets.gates] == [(2, 1, s, s) for s in (24, 12, 6)]
    assert [p.shape for p in preds] == [t.shape for t in targets]
    assert maps.shape == (2, 1, 96, 96) and scores.shape == (2,)
    for raa, c in zip(method.teacher.raa, channels, strict=True):
        assert raa.memory.shape == (100, c)  # 50 normal + 50 anomaly items
        assert raa.query_mlp[0].out_channels == min(2 * c, 1024)
    assert [s.name for s in method.stages] == ["amplify", "distill"]
    assert method.stages[0].trainable == ["teacher.raa"]


def test_gates_are_anomaly_affinities_and_the_teacher_adds_the_gated_residual(tiny_config):
    cfg = tiny_config("method=aand")
    method = build_method(cfg.method, cfg.backbone).eval()
    batch = random_batch()
    out = method.teacher(batch)
    for f0, f_at, a, raa in zip(out.vanilla, out, out.gates, method.teacher.raa, strict=True):
        q = raa.query_mlp(f0 + positional_encoding(f0.shape[1], *f0.shape[-2:], f0))
        cos = F.cosine_similarity(q.unsqueeze(1), raa.memory[None, :, :, None, None], dim=2)
        expected = torch.softmax(cos / 0.2, dim=1)[:, 50:].sum(1, keepdim=True)
        assert torch.allclose(a, expected, atol=1e-5) and (a > 0).all() and (a < 1).all()
        residual = torch.tanh(raa.residual_mlp(f0)) * f0
        assert torch.allclose(f_at, f0 + a * residual, atol=1e-5)
    # The RAA is a side branch: the vanilla levels are the frozen extractor's own.
    vanilla = method.teacher.extractor(batch["image"])
    assert all(torch.equal(a, b) for a, b in zip(out.vanilla, vanilla, strict=True))


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_raa_weights_start_from_the_official_kaiming_fan_out_init():
    # Official ResNet.__init__ (models/resnet_rar.py) builds the RAA modules before torchvision's
    # init loop: conv weights ~ N(0, 2 / fan_out); biases and the memory keep their own init.
    torch.manual_seed(0)
    raa = ResidualAmplifier(256)  # hidden 512
    assert len(_convs(raa)) == 6 and not any(isinstance(m, nn.Linear) for m in raa.modules())
    for conv in _convs(raa):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
        assert conv.weight.mean().abs() < 0.1 * math.sqrt(2 / fan_out)  # zero-mean normal
        assert conv.bias.abs().max() <= 1 / math.sqrt(conv.in_channels)  # PyTorch's default
    assert raa.memory.std().item() == pytest.approx(1.0, rel=0.05)  # randn, untouched
    # method.raa_init=default keeps PyTorch's layer init: std 1 / sqrt(3 fan_in).
    former = ResidualAmplifier(256, init="default")
    for conv in _convs(former):
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.02)
    with pytest.raises(StadError, match="raa_init"):
        ResidualAmplifier(8, init="xavier")


def test_official_init_loop_sets_norm_layers_to_identity():
    block = nn.Sequential(nn.Conv2d(4, 64, 3), nn.BatchNorm2d(64), nn.GroupNorm(4, 64))
    for norm in block[1:]:
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    init_like_official_resnet(block)
    for norm in block[1:]:
        assert torch.equal(norm.weight, torch.ones(64)) and torch.equal(norm.bias, torch.zeros(64))
    assert block[0].weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.1)


def test_positional_encoding_is_the_2d_sine_cosine_table():
    c, h, w = 8, 3, 5
    pe = positional_encoding(c, h, w, torch.zeros(1))[0]
    half = c // 2
    for k in range(half // 2):
        freq = 1e4 ** (-2 * k / half)
        for y in range(h):
            for x in range(w):
                assert pe[2 * k, y, x] == pytest.approx(math.sin(x * freq), abs=1e-6)
                assert pe[2 * k + 1, y, x] == pytest.approx(math.cos(x * freq), abs=1e-6)
                assert pe[half + 2 * k, y, x] == pytest.approx(math.sin(y * freq), abs=1e-6)
                assert pe[half + 2 * k + 1, y, x] == pytest.approx(math.cos(y * freq), abs=1e-6)
    assert positional_encoding(6, 2, 2, torch.zeros(1)).shape == (1, 6, 2, 2)


def test_focal_amplification_and_hkd_losses_match_their_formulas():
    a = torch.tensor([0.9, 0.2, 0.6, 0.1])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    expected = (
        sum(
            -0.8 * (1 - p) ** 2 * math.log(p) if t else -0.2 * p**2 * math.log(1 - p)
            for p, t in zip(a.tolist(), y.tolist(), strict=True)
        )
        / 4
    )
    assert float(focal_loss(a, y)) == pytest.approx(expected, rel=1e-5)

    g = torch.Generator().manual_seed(0)
    f0, f_at = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    anomalous = torch.zeros(2, 1, 3, 3)
    anomalous[0, 0, 1, 1] = anomalous[1, 0, 0, 2] = 1
    foreground = torch.ones(2, 1, 3, 3)
    foreground[1, 0, 2, 2] = 0
    terms = []
    for bi in range(2):
        for i in range(9):
            yi, xi = divmod(i, 3)
            if anomalous[bi, 0, yi, xi] or not foreground[bi, 0, yi, xi]:
                continue
            for bj in range(2):
                for j in range(9):
                    yj, xj = divmod(j, 3)
                    if not anomalous[bj, 0, yj, xj]:
                        continue
                    n = f0[bi, :, yi, xi]
                    s0 = F.cosine_similarity(n, f0[bj, :, yj, xj], dim=0)
                    s1 = F.cosine_similarity(n, f_at[bj, :, yj, xj], dim=0)
                    terms.append(F.relu(s1 - (s0 - 0.3)))
    ours = amplification_loss(f0, f_at, anomalous, foreground, margin=0.3)
    assert float(ours) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
    assert float(amplification_loss(f0, f_at, torch.zeros_like(anomalous), foreground)) == 0
    # Identical features: the amplified anomaly is as similar as the vanilla one → margin 0.3.
    assert float(amplification_loss(f0, f0, anomalous, foreground)) == pytest.approx(0.3)

    t, s = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    per_position = (1 - F.cosine_similarity(t, s, dim=1)).flatten(1)
    top = per_position.sort(dim=1, descending=True).values[:, :10].mean()
    assert float(hard_distillation_loss(t, s, 10)) == pytest.approx(float(top), rel=1e-5)
    assert float(hard_distillation_loss(t, s, 1000)) == pytest.approx(float(per_position.mean()))


def test_level_masks_average_pool_then_threshold():
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, :2, :2] = 1  # a whole 2×2 cell of the 4×4 level: 1 > 0.3
    mask[0, 0, 4, 4] = 1  # a quarter of a cell: 0.25 ≤ 0.3
    level = level_mask(mask, (4, 4))
    assert level[0, 0].nonzero().tolist() == [[0, 0]]


def _fixed_amplify_loss(method, batch):
    # Same synthetic anomalies and the same position samples at every call.
    stage = method.stages[0]
    torch.manual_seed(0)
    return stage.loss(method, with_streams(stage, batch))


@pytest.mark.slow
def test_one_step_of_each_stage_lowers_its_loss_and_trains_only_its_part(tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config("method=aand", "method.synthesis.clean_probability=0")
    method = build_method(cfg.method, cfg.backbone)
    amplify, distill = method.stages
    batch = _textured_batch(n=4)
    extractor_before = [p.clone() for p in method.teacher.extractor.parameters()]

    module = StageModule(method, amplify)
    module.train()
    assert method.teacher.raa.training and not method.teacher.extractor.training
    assert not method.student.training
    opt = amplify.optimizer(list(stage_parameters(method, amplify)))
    student_before = [p.clone() for p in method.student.parameters()]
    before = _fixed_amplify_loss(method, batch)
    assert before["amplification"] > 0 and before["focal"] > 0
    for _ in range(3):
        opt.zero_grad()
        _fixed_amplify_loss(method, batch)["loss"].backward()
        opt.step()
    assert _fixed_amplify_loss(method, batch)["loss"] < before["loss"]
    assert all(
        torch.equal(a, b) for a, b in zip(student_before, method.student.parameters(), strict=True)
    )

    module = StageModule(method, distill)
    module.train()
    assert not method.teacher.raa.training and method.student.training
    opt = distill.optimizer(list(stage_parameters(method, distill)))
    raa_before = [p.clone() for p in method.teacher.raa.parameters()]
    before = distill.loss(method, batch)
    assert set(before) == {"loss", "cosine", "hkd"}
    for _ in range(3):
        opt.zero_grad()
        distill.loss(method, batch)["loss"].backward()
        opt.step()
    assert distill.loss(method, batch)["loss"] < before["loss"]
    assert all(
        torch.equal(a, b) for a, b in zip(raa_before, method.teacher.raa.parameters(), strict=True)
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(extractor_before, method.teacher.extractor.parameters(), strict=True)
    )


STEPS = 25


@pytest.mark.slow
def test_the_gate_learns_to_separate_synthetic_anomalies(tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config("method=aand", "method.synthesis.clean_probability=0")
    method = build_method(cfg.method, cfg.backbone)
    amplify = method.stages[0]
    StageModule(method, amplify).train()
    opt = amplify.optimizer(list(stage_parameters(method, amplify)))

    def gate_auroc() -> float:
        # Fresh anomalies on unseen images: the gate of the finest level vs its target.
        out = with_streams(amplify, _textured_batch(n=8, seed=99), seed=123)["streams"]
        with torch.no_grad():
            gates = method.teacher.amplify(out["anomalies"]["image"]).gates
        target = level_mask(out["anomalies"]["mask"], gates[0].shape[-2:])
        return _auroc(gates[0], target)

    before = gate_auroc()
    for step in range(STEPS):
        opt.zero_grad()
        batch = with_streams(amplify, _textured_batch(n=6, seed=step), seed=step)
        amplify.loss(method, batch)["loss"].backward()
        opt.step()
    after = gate_auroc()
    assert after > 0.8 and after > before + 0.2, (before, after)


@pytest.mark.parametrize(
    ("switches", "stages", "keys"),
    [
        (["method.raa=false"], ["distill"], {"loss", "cosine", "hkd"}),
        (["method.hkd=false"], ["amplify", "distill"], {"loss", "cosine"}),
        (["method.score=gate"], ["amplify"], None),
        (["method.score=amplification"], ["amplify"], None),
    ],
)
@pytest.mark.slow
def test_each_ablation_switch_builds_and_runs(tiny_config, switches, stages, keys):
    cfg = tiny_config("method=aand", *switches)
    method = build_method(cfg.method, cfg.backbone)
    assert [s.name for s in method.stages] == stages
    batch = _textured_batch(n=2)
    for stage in method.stages:
        losses = stage.loss(method, with_streams(stage, batch))
        assert torch.isfinite(losses["loss"])
        if stage.name == "distill":
            assert set(losses) == keys
    maps, scores = method.eval()(batch)
    assert maps.shape == (2, 1, 64, 64) and torch.isfinite(scores).all()
    if "method.raa=false" in switches:
        assert method.teacher.raa is None and method.info["raa"] is False
        t = method.teacher(batch)
        s = method.student(batch, t)
        flat = sum(flat_cosine_loss(a, b) for a, b in zip(t, s, strict=True))
        hkd = sum(hard_distillation_loss(a, b, 10) for a, b in zip(t, s, strict=True))
        assert torch.allclose(method.stages[0].loss(method, batch)["loss"], flat + hkd)
    if "method.score=gate" in switches:
        gates = method.teacher(batch).gates
        expected = sum(  # resampled as the stage-2 maps (method.scorer.align_corners)
            F.interpolate(a, size=(64, 64), mode="bilinear", align_corners=True) for a in gates
        )
        sharp = build_method(
            tiny_config("method=aand", *switches, "method.scorer.sigma=0").method, cfg.backbone
        )
        sharp.load_state_dict(method.state_dict())
        assert torch.allclose(sharp.eval()(batch)[0], expected, atol=1e-5)


def test_teacher_only_scores_without_raa_are_incompatible(tiny_config):
    cfg = tiny_config("method=aand", "method.raa=false", "method.score=gate")
    with pytest.raises(IncompatibleError, match="raa=false"):
        build_method(cfg.method, cfg.backbone)


def test_a_missing_texture_folder_stops_the_run_before_training_with_the_path(
    tiny_config, tmp_path, monkeypatch
):
    cfg = tiny_config(
        "method=aand",
        "method.synthesis.texture.source=folder",
        f"method.synthesis.texture.root={tmp_path}/dtd/images",
    )

    def no_training(*args, **kwargs):
        raise AssertionError("a stage trained before the streams were checked")

    monkeypatch.setattr("stad.run._fit_stage", no_training)
    with pytest.raises(DatasetError, match="dtd/images"):
        run(cfg, tmp_path / "run")


@pytest.mark.parametrize(("dataset", "count"), [("mvtec", 15), ("visa", 12), ("mvtec3d", 10)])
def test_every_category_of_the_papers_datasets_has_its_foreground_rule(dataset, count):
    # The official per-category rules live with the datasets (dataset.foreground_rules).
    cfg = compose_config([f"dataset={dataset}", "method=aand"])
    rules = cfg.method.synthesis.foreground.rules
    assert set(rules) == set(cfg.dataset.categories) and len(rules) == count
    other = compose_config(["dataset=synthetic", "method=aand"]).method.synthesis.foreground
    assert other.rules is None and other.default.kind == "all"


def test_config_composes_the_papers_defaults():
    cfg = compose_config(["dataset=mvtec", "method=aand"])
    m = cfg.method
    assert cfg.backbone.name == "wide_resnet50_2.tv_in1k" and cfg.image_size == 256
    assert m.batch_size == 16 and m.memory_size == 50 and m.distillation.top_k == 10
    assert m.amplification.margin == 0.3 and m.amplification.weight == 0.1
    assert m.raa and m.hkd and m.score == "student"
    assert m.raa_init == "kaiming_fan_out" and m.synthesis.texture.channel_order == "bgr"
    assert m.stages.amplify.epochs == 100 and m.stages.distill.epochs == 120
    for stage in (m.stages.amplify, m.stages.distill):
        assert stage.optimizer.lr == 0.005 and list(stage.optimizer.betas) == [0.5, 0.999]
        assert stage.selection == "last"
    assert m.synthesis.foreground.rules[m.category].kind == "disc"  # bottle
    param = torch.nn.Parameter(torch.zeros(1))
    for stage, milestones in ((m.stages.amplify, [80, 90]), (m.stages.distill, [96, 108])):
        scheduler = instantiate(stage.scheduler)(torch.optim.Adam([param]))
        assert sorted(scheduler.milestones) == milestones and scheduler.gamma == 0.2
    # A capped schedule keeps its shape: 10 epochs → ×0.2 after epochs 8 and 9.
    capped = compose_config(["dataset=mvtec", "method=aand", "trainer.max_epochs=10"])
    scheduler = instantiate(capped.method.stages.amplify.scheduler)(torch.optim.Adam([param]))
    assert sorted(scheduler.milestones) == [8, 9]


@pytest.mark.slow
def test_aand_detects_the_defects_of_the_generated_dataset(tiny_config, tmp_path):
    # 2 + 10 short epochs at 128 px, batch 4: measured image AUROC 0.77, pixel AUROC 0.95
    # (chance 0.5) with the official RAA init and BGR textures; raa_init=default with rgb
    # textures 0.79 / 0.93. Earlier, 15 + 15 epochs gave 0.92 / 0.96.
    cfg = tiny_config(
        "method=aand",
        "trainer.batch_size=4",
        *E2E_TRAINING,
        "method.stages.amplify.epochs=2",
        "method.stages.distill.epochs=10",
    )
    record = run(cfg, tmp_path)
    assert record["metrics"]["image_auroc"] > 0.7, record["metrics"]
    assert record["metrics"]["pixel_auroc"] > 0.85, record["metrics"]
    assert [s["name"] for s in record["stages"]] == ["amplify", "distill"]
    anomalies = record["stages"][0]["streams"]["anomalies"]
    assert anomalies["kind"] == "synthetic_anomalies"
    assert anomalies["textures"]["source"] == "skimage"
