"""AST: config, features, flow teacher, student, masks, scorer, caching in training, end to end."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

from stad.backbones import create_classifier
from stad.core import StageModule
from stad.errors import StadError
from stad.methods import build_method
from stad.methods.ast import (
    FLOW_INPUT,
    LOG_DET,
    AstScorer,
    BlockFeatures,
    Z,
    depth_channels,
    foreground_weight,
    masked_mean,
    positional_encoding,
    student_loss,
)
from stad.methods.flows import gaussian_nll
from stad.run import run

SMALL = ("method.flow.hidden=16", "method.student.hidden=16")


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny convolutions here gain nothing from threads, and on a shared 2-core machine
    # OpenMP's spinning threads made them ~30× slower; restore the setting for other tests.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(n=2, size=128, foreground=False, depth=False):
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(n, 3, size, size, generator=g),
        "mask": torch.zeros(n, 1, size, size),
        "label": torch.zeros(n, dtype=torch.long),
        "path": [f"/nonexistent/{i}.png" for i in range(n)],
    }
    if foreground:
        fg = torch.zeros(n, 1, size, size)
        fg[..., size // 4 : size // 2, size // 4 : size // 2] = 1
        batch["foreground"] = fg
    if depth:
        batch["depth"] = torch.randn(n, 1, size, size, generator=g) * batch.get("foreground", 1)
    return batch


def test_config_has_the_paper_defaults_and_takes_the_input_from_the_dataset():
    cfg = compose_config(["method=ast", "dataset=mvtec"])
    m = cfg.method
    assert cfg.image_size == 768 and m.batch_size == 8 and m.input == "rgb"
    assert (m.flow.hidden, m.flow.clamp, list(m.flow.kernel_sizes)) == (1024, 3.0, [3, 3, 3, 5])
    assert m.stages.teacher.epochs == 240 and m.stages.student.epochs == 240
    assert m.stages.student.optimizer.lr == 2e-4 and m.stages.teacher.optimizer.weight_decay == 1e-5
    assert m.scorer.reduction == "auto" and m.student.leaky_slope == 0.01
    assert cfg.backbone.name == m.paper_backbone
    assert compose_config(["method=ast", "dataset=mvtec3d"]).method.input == "rgbd"


def test_efficientnet_b5_block_5_gives_the_304_channel_stride_32_features():
    # Random weights: only the architecture matters (no download in tests).
    model, _ = create_classifier("tf_efficientnet_b5", "random")
    features = BlockFeatures(model, 5)
    assert features.channels == [304] and features.strides == [32]
    assert not any(p.requires_grad for p in features.parameters())
    features.train()
    assert not features.training  # frozen: stays in eval mode


def test_block_features_equal_the_classifier_intermediate_output():
    model, _ = create_classifier("tf_efficientnet_lite0", "package")
    model.eval()
    features = BlockFeatures(model, 5)
    x = torch.rand(1, 3, 64, 64)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model.bn1(model.conv_stem((x - mean) / std))
        for block in model.blocks[:6]:
            ref = block(ref)
        assert torch.allclose(features(x)[0], ref, atol=1e-5)


def test_shapes_and_contract_of_teacher_student_scorer(tiny_config):
    cfg = tiny_config("method=ast", "backbone=tf_efficientnet_lite0", *SMALL)
    method = build_method(cfg.method, cfg.backbone).eval()
    batch = _batch()
    targets = method.teacher(batch)
    assert targets[Z].shape == (2, 192, 4, 4) and targets[LOG_DET].shape == (2, 1, 4, 4)
    assert targets[FLOW_INPUT].shape == (2, 192, 4, 4)
    # gamma = 0 at init: the flow only permutes channels.
    assert torch.allclose(targets[LOG_DET], torch.zeros(2, 1, 4, 4))
    preds = method.student(batch, targets)
    assert preds[0].shape == targets[Z].shape
    maps, scores = method(batch)
    assert maps.shape == (2, 1, 128, 128) and scores.shape == (2,)
    grid = (targets[Z] - preds[0]).pow(2).mean(1, keepdim=True)
    assert torch.allclose(scores, grid.flatten(1).mean(1), rtol=1e-5)  # auto, no foreground: mean
    assert [s.name for s in method.stages] == ["teacher", "student"]
    assert method.stages[0].trainable == ["teacher.flow"]
    assert method.info["input"] == "rgb" and method.info["score_reduction"].startswith("auto")


def test_rgbd_inputs_concatenate_64_depth_channels_after_the_features(tiny_config):
    cfg = tiny_config("method=ast", "backbone=tf_efficientnet_lite0", "method.input=rgbd", *SMALL)
    method = build_method(cfg.method, cfg.backbone).eval()
    batch = _batch(foreground=True, depth=True)
    x, cond = method.teacher.encode(batch)
    assert x.shape == (2, 192 + 64, 4, 4) and cond.shape == (2, 32, 4, 4)
    assert torch.equal(x[:, 192:], depth_channels(batch["depth"], (4, 4)))
    with pytest.raises(StadError, match="depth"):
        method.teacher.encode(_batch())
    depth_only = tiny_config(
        "method=ast", "backbone=tf_efficientnet_lite0", "method.input=depth", *SMALL
    )
    method = build_method(depth_only.method, depth_only.backbone)
    assert method.teacher.encode(batch)[0].shape == (2, 64, 4, 4)


def test_depth_is_pixel_unshuffled_from_8x_the_grid():
    depth = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32)
    out = depth_channels(depth, (4, 4))  # 32 = 8 × 4: no resize
    assert out.shape == (1, 64, 4, 4)
    assert out[0, :, 1, 2].tolist() == depth[0, 0, 8:16, 16:24].flatten().tolist()


def test_positional_encoding_layout():
    enc = positional_encoding(32, 3, 5)
    assert enc.shape == (32, 3, 5)
    assert torch.allclose(enc[0], torch.sin(torch.arange(5.0)).expand(3, 5))  # column, freq 1
    assert torch.allclose(enc[17], torch.cos(torch.arange(3.0))[:, None].expand(3, 5))  # row
    with pytest.raises(StadError):
        positional_encoding(30, 2, 2)


def test_foreground_weight_dilates_and_downsamples():
    fg = torch.zeros(1, 1, 64, 64)
    assert torch.equal(foreground_weight(torch.ones(1, 1, 64, 64), (8, 8)), torch.ones(1, 1, 8, 8))
    # Grid cell j samples the 8×-grid pixels 8j+3 and 8j+4. The 8×8 dilation (scipy's: p−4..p+3)
    # takes rows/cols 28..32 to 24..35: cell 3 (27, 28) fully, cell 4 (35, 36) half, cell 2 not.
    fg[..., 28:33, 28:33] = 1
    w = foreground_weight(fg, (8, 8))
    assert w[0, 0, 3, 3] == 1 and w[0, 0, 3, 4] == 0.5 and w[0, 0, 4, 4] == 0.25
    assert (w > 0).sum() == 4
    assert foreground_weight(fg, (8, 8), dilate=1)[0, 0, 4, 4] == 0


def test_masked_loss_ignores_background_positions():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 8, 4, 4, generator=g)
    pred = torch.randn(2, 8, 4, 4, generator=g)
    weight = torch.zeros(2, 1, 4, 4)
    weight[..., :2, :2] = 1

    class FakeTeacher:
        def __call__(self, batch):
            return [z, torch.zeros(2, 1, 4, 4), z]

        def foreground(self, batch):
            return weight

    method = SimpleNamespace(teacher=FakeTeacher(), student=lambda batch, targets: [batch["pred"]])

    def loss(p):  # the paper's foreground average (the code's "all" divides by every position)
        return student_loss(method, {"pred": p}, average="foreground")["loss"]

    changed = pred.clone()
    changed[..., 3, 3] += 100.0  # background
    assert torch.allclose(loss(pred), loss(changed))
    changed[..., 0, 0] += 1.0  # foreground
    assert not torch.allclose(loss(pred), loss(changed))
    expected = (z - pred).pow(2).mean(1)[..., :2, :2].mean()
    assert torch.allclose(loss(pred), expected)
    values = torch.rand(2, 4, 4)
    assert torch.allclose(masked_mean(values, weight), (values * weight[:, 0]).mean())  # code
    assert torch.allclose(masked_mean(values, None), values.mean())


# stad's earlier scoring: map = distance × weight, bilinear to the input, scores on the grid.
GRID_SCORING = {
    "map_source": "distance",
    "upsample": "bilinear",
    "upsample_factor": None,
    "score_source": "grid",
}


def test_scorer_masks_reduces_and_offers_the_teacher_only_baseline():
    z = torch.randn(2, 8, 4, 4)
    pred = z.clone()
    pred[0, :, 3, 3] += 2.0  # outside the foreground: masked away
    pred[1, :, 1, 1] += 1.0  # inside
    batch = _batch(size=32, foreground=True)
    batch["foreground"][:] = 0
    batch["foreground"][..., :16, :16] = 1
    maps, scores = AstScorer("student", "auto", **GRID_SCORING)([z, None, z], [pred], batch)
    assert maps.shape == (2, 1, 32, 32)
    assert scores[0] == 0 and torch.isclose(scores[1], torch.tensor(1.0))  # auto → max
    _, unmasked = AstScorer("student", "max", mask=False, **GRID_SCORING)(
        [z, None, z], [pred], batch
    )
    assert torch.isclose(unmasked[0], torch.tensor(4.0))
    # The code's scoring (defaults): max over the ×8 bicubic map, which samples the grid between
    # cell centres, so a one-cell peak of 1 reads a little less; still 0 outside the foreground.
    maps, scores = AstScorer("student", "auto")([z, None, z], [pred], batch)
    assert maps.shape == (2, 1, 32, 32) and scores[0] == 0 and 0.8 < scores[1] < 1.0
    log_det = torch.randn(2, 1, 4, 4)
    nll_maps, nll_scores = AstScorer("teacher_nll", "mean", mask=False, **GRID_SCORING)(
        [z, log_det, z], [pred], batch
    )
    nll = gaussian_nll(z, log_det[:, 0])
    assert torch.allclose(nll_scores, nll.flatten(1).mean(1), rtol=1e-5)
    assert torch.allclose(F.avg_pool2d(nll_maps, 8)[:, 0].mean((1, 2)), nll_scores, rtol=1e-4)


def test_teacher_nll_scorer_trains_only_the_flow(tiny_config):
    cfg = tiny_config(
        "method=ast", "backbone=tf_efficientnet_lite0", "method.scorer.kind=teacher_nll", *SMALL
    )
    method = build_method(cfg.method, cfg.backbone)
    assert [s.name for s in method.stages] == ["teacher"]


@pytest.mark.slow
def test_later_epochs_and_the_student_stage_run_no_backbone_forward(tiny_config):
    cfg = tiny_config("method=ast", "backbone=tf_efficientnet_lite0", *SMALL)
    method = build_method(cfg.method, cfg.backbone)
    features = method.teacher.features
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 64, 64, generator=g)
    paths = [f"img{i}.png" for i in range(6)]
    batches = [
        {"image": images[i : i + 2], "path": paths[i : i + 2], "label": torch.zeros(2)}
        for i in range(0, 6, 2)
    ]
    counts = []

    class Count(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            counts.append(features.forward_passes)

    for stage in method.stages:
        trainer = L.Trainer(
            max_epochs=3,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Count()],
        )
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=True)
        trainer.fit(StageModule(method, stage), train_dataloaders=loader)
    # One pass per batch in the first epoch of the first stage, none afterwards.
    assert counts == [0, 3, 3, 3, 3, 3] and features.forward_passes == 3


@pytest.mark.slow
def test_ast_detects_the_defects_of_the_generated_dataset(tiny_config, tmp_path):
    # Stride-16 features (blocks[3]) give an 8×8 grid at 128 px; 20 epochs per stage.
    # Measured: image AUROC 0.94, pixel AUROC 0.96 in ~15 s (chance: 0.5).
    cfg = tiny_config(
        "method=ast",
        "backbone=tf_efficientnet_lite0",
        "method.feature_stage=3",
        "method.flow.hidden=64",
        "method.student.hidden=64",
        "method.scorer.reduction=max",
        "trainer.max_steps=-1",
        "trainer.max_epochs=20",
        "trainer.batch_size=8",
        "dataset.category=object",
        # The official loaders drop the last incomplete batch (the preset does); on this tiny
        # training set that would drop a large share of the images every epoch.
        "method.stages.teacher.drop_last=false",
        "method.stages.student.drop_last=false",
    )
    record = run(cfg, tmp_path / "run")
    assert record["metrics"]["image_auroc"] > 0.8, record["metrics"]
    assert record["metrics"]["pixel_auroc"] > 0.85, record["metrics"]
    assert [s["name"] for s in record["stages"]] == ["teacher", "student"]
    assert record["method_info"]["score_reduction"] == "max"


@pytest.mark.slow
def test_rgbd_smoke_run_on_the_fake_3d_dataset(tmp_path):
    synthetic3d = pytest.importorskip("stad.data.synthetic3d")
    synthetic3d.write_fake_mvtec3d(tmp_path / "mvtec3d", "bagel", size=64)
    cfg = compose_config(
        [
            "dataset=mvtec3d",
            f"dataset.root={tmp_path}/mvtec3d",
            "dataset.category=bagel",
            f"output_root={tmp_path}/outputs",
            "trainer=smoke",
            "image_size=64",
            "method=ast",
            "backbone=tf_efficientnet_lite0",
            *SMALL,
        ]
    )
    record = run(cfg, tmp_path / "run")
    info = record["method_info"]
    assert info["input"] == "rgbd" and info["score_reduction"].startswith("auto")
    assert 0.0 <= record["metrics"]["image_auroc"] <= 1.0


@pytest.mark.slow
def test_disk_cache_key_fingerprints_the_loaded_weights(tiny_config, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    batch = {"image": torch.rand(1, 3, 64, 64), "path": [str(image)]}
    overrides = ("method=ast", f"method.cache_dir={tmp_path}/cache", *SMALL)
    keys = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        cfg = tiny_config(*overrides, "backbone=tf_efficientnet_lite0", "backbone.weights=random")
        method = build_method(cfg.method, cfg.backbone)
        method.teacher.encode(batch)
        keys.append((method.teacher.features.key, method.teacher.features.forward_passes))
    assert keys[0] == (keys[1][0], 1) and keys[1][1] == 0  # same weights: read from disk
    assert keys[2][0] != keys[0][0] and keys[2][1] == 1  # other random weights: recomputed
