"""Per-defect-type results: each type against all normal test images, in the record, the
report and ``stad-leaderboard by=defect``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from stad.metrics.per_defect import PerDefect, defect_types


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = 12
    defects = ["good"] * 4 + ["crack"] * 4 + ["hole"] * 4
    labels = torch.tensor([0] * 4 + [1] * 8)
    masks = torch.zeros(n, 1, 16, 16)
    for i in range(4, n):
        r, c = (
            int(torch.randint(0, 10, (), generator=g)),
            int(torch.randint(0, 10, (), generator=g)),
        )
        masks[i, 0, r : r + 5, c : c + 5] = 1
    maps = torch.rand(n, 1, 16, 16, generator=g) + 0.5 * masks * (labels.view(-1, 1, 1, 1) > 0)
    scores = maps.flatten(1).max(1).values
    return maps, scores, labels, masks, defects


@pytest.mark.parametrize("seed", [0, 1])
def test_each_type_is_scored_against_all_normal_images(seed):
    maps, scores, labels, masks, defects = _case(seed)
    metric = PerDefect(["crack", "hole"])
    for start in (0, 5):  # two batches, types mixed
        part = slice(start, start + 7 if start == 5 else 5)
        batch = {"label": labels[part], "mask": masks[part], "defect": defects[part]}
        metric.update(maps[part], scores[part], batch)
    out = metric.compute()
    assert set(out) == {"crack", "hole"}
    for d in ("crack", "hole"):
        keep = np.array([x in ("good", d) for x in defects])
        y = labels.numpy()[keep]
        assert out[d]["image_auroc"] == pytest.approx(roc_auc_score(y, scores.numpy()[keep]))
        pix_y = masks.numpy()[keep].ravel()
        pix_s = maps.numpy()[keep].ravel()
        bound = out[d]["pixel_auroc_error_bound"]
        assert abs(out[d]["pixel_auroc"] - roc_auc_score(pix_y, pix_s)) <= bound + 1e-12
        bound = out[d]["pixel_ap_error_bound"]
        assert abs(out[d]["pixel_ap"] - average_precision_score(pix_y, pix_s)) <= bound + 1e-12
        assert 0.0 <= out[d]["pro"] <= 1.0


def test_the_defect_types_come_from_the_test_sets_samples():
    class S:
        def __init__(self, label, defect):
            self.label, self.defect = label, defect

    from types import SimpleNamespace

    dataset = SimpleNamespace(samples=[S(0, "good"), S(1, "crack"), S(1, "hole"), S(1, "crack")])
    assert defect_types(dataset) == ["crack", "hole"]
    assert defect_types(object()) == []


@pytest.mark.slow
def test_a_run_records_reports_and_tabulates_its_defect_types(tmp_path):
    from conftest import compose_config

    from stad.leaderboard import main as leaderboard
    from stad.run import run

    cfg = compose_config(
        [
            "trainer=smoke",
            "image_size=64",
            "dataset.generator.image_size=64",
            "backbone.weights=random",
            f"output_root={tmp_path}/out",
        ]
    )
    record = run(cfg, tmp_path / "run")
    per_defect = record["per_defect"]
    assert len(per_defect) >= 2
    for values in per_defect.values():
        assert set(values) >= {"image_auroc", "pixel_auroc", "pro", "pixel_ap"}
    assert "Per defect type" in (tmp_path / "run" / "report.html").read_text()
    out = tmp_path / "board.csv"
    assert leaderboard([f"runs={tmp_path / 'run'}", "by=defect", f"out={out}"]) == 0
    text = out.read_text()
    for defect in per_defect:
        assert f"/{defect}" in text
    # Off by a switch.
    cfg = compose_config([*cfg_overrides(tmp_path), "metrics.per_defect=false"])
    assert "per_defect" not in run(cfg, tmp_path / "run2")


def cfg_overrides(tmp_path):
    return [
        "trainer=smoke",
        "image_size=64",
        "dataset.generator.image_size=64",
        "backbone.weights=random",
        f"output_root={tmp_path}/out2",
    ]
