"""The metrics' curves (against sklearn and their own areas) and each run's report.html
(self-contained, every picture a decodable PNG, every section present)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_curve

from stad.metrics import PRO, ImageAUROC, PixelAUROC
from stad.metrics.functional import thin_curve
from stad.report import REPORT_NAME, write_report

DATA_URI = "data:image/png;base64,"


def _case(seed: int, ties: bool = False, n: int = 6, size: int = 24):
    """Maps (B, 1, H, W) with rectangular defects that score higher on average, masks, image
    scores (B,) and labels (B,); ``ties`` quantises scores to a few levels."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, 1, size, size)
    for i in range(n // 3, n):
        top, left = torch.randint(0, size - 8, (2,), generator=g).tolist()
        masks[i, 0, top : top + 3 + i, left : left + 8] = 1
        if i % 2:  # a second region in some images
            masks[i, 0, :2, :3] = 1
    maps = torch.randn(n, 1, size, size, generator=g) + 1.2 * masks
    if ties:
        maps = (maps * 2).round() / 2
    scores = maps.flatten(1).amax(1)
    labels = (masks.flatten(1).amax(1) > 0).long()
    return maps, masks, scores, labels


def _area(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(np.trapezoid(y.numpy(), x.numpy()))


# -- curves -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", [False, True])
def test_image_roc_is_sklearns_curve_and_its_area_is_the_auroc(ties):
    rng = np.random.default_rng(3)
    scores = rng.normal(size=50) + np.r_[np.zeros(30), np.ones(20)]
    if ties:
        scores = scores.round(1)
    labels = np.r_[np.zeros(30), np.ones(20)].astype(int)
    metric = ImageAUROC()
    metric.update(torch.tensor(scores[:25]), torch.tensor(labels[:25]))
    metric.update(torch.tensor(scores[25:]), torch.tensor(labels[25:]))
    fpr, tpr = metric.curve()
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr.numpy(), ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr.numpy(), ref_tpr, atol=1e-12)
    assert _area(fpr, tpr) == pytest.approx(float(metric.compute()), abs=1e-6)


@pytest.mark.parametrize("ties", [False, True])
def test_pixel_roc_area_is_the_auroc_in_both_modes(ties):
    maps, masks, _, _ = _case(0, ties)
    exact, binned = PixelAUROC(mode="exact"), PixelAUROC(mode="binned", num_bits=12)
    for metric in (exact, binned):
        metric.update(maps[:3], masks[:3])
        metric.update(maps[3:], masks[3:])
    fpr, tpr = exact.curve()
    assert _area(fpr, tpr) == pytest.approx(float(exact.compute()), abs=1e-6)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert bool((fpr.diff() >= 0).all() and (tpr.diff() >= 0).all())
    # the exact curve against sklearn's pixel ROC, point by point
    ref_fpr, ref_tpr, _ = roc_curve(
        masks.flatten().numpy(), maps.flatten().numpy(), drop_intermediate=False
    )
    np.testing.assert_allclose(fpr.numpy(), ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr.numpy(), ref_tpr, atol=1e-12)
    b_fpr, b_tpr = binned.curve()
    b_area = _area(b_fpr, b_tpr)
    assert b_area == pytest.approx(float(binned.compute()), abs=1e-6)
    assert abs(b_area - float(exact.compute())) <= float(binned.error_bound()) + 1e-9


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_pro_curve_stops_at_the_limit_and_its_area_over_the_limit_is_pro(ties, limit):
    maps, masks, _, _ = _case(1, ties)
    exact, binned = PRO(limit, mode="exact"), PRO(limit, mode="binned", num_bits=12)
    for metric in (exact, binned):
        metric.update(maps[:2], masks[:2])
        metric.update(maps[2:], masks[2:])
    fpr, pro = exact.curve()
    assert float(fpr[0]) == 0.0 and float(fpr[-1]) == pytest.approx(limit, abs=1e-15)
    assert bool((fpr.diff() >= 0).all() and (pro.diff() >= 0).all())
    assert _area(fpr, pro) / limit == pytest.approx(float(exact.compute()), abs=1e-6)
    b_fpr, b_pro = binned.curve()
    assert float(b_fpr[-1]) == pytest.approx(limit, abs=1e-15)
    b_area = _area(b_fpr, b_pro) / limit
    assert b_area == pytest.approx(float(binned.compute()), abs=1e-6)
    assert abs(b_area - float(exact.compute())) <= float(binned.error_bound()) + 1e-9


def test_thinned_curves_keep_their_ends_and_nearly_their_area():
    maps, masks, _, _ = _case(2, n=9, size=40)
    pixel, pro = PixelAUROC(mode="exact"), PRO(mode="exact")
    pixel.update(maps, masks)
    pro.update(maps, masks)
    for full, thin, x_range in (
        (pixel.curve(), pixel.curve(max_points=60), 1.0),
        (pro.curve(), pro.curve(max_points=60), 0.3),
    ):
        assert full[0].numel() > 1000 and thin[0].numel() <= 60
        assert float(thin[0][0]) == float(full[0][0]) and float(thin[1][0]) == float(full[1][0])
        assert float(thin[0][-1]) == float(full[0][-1])
        assert float(thin[1][-1]) == float(full[1][-1])
        bound = 2 / (60 // 2 - 1)
        assert abs(_area(*thin) - _area(*full)) / x_range < bound
    x = torch.linspace(0, 1, 10, dtype=torch.float64)
    assert thin_curve(x, x, None)[0] is x and thin_curve(x, x, 50)[0] is x


def test_curves_are_empty_when_a_class_is_missing():
    maps = torch.rand(2, 1, 8, 8)
    masks = torch.zeros(2, 1, 8, 8)
    for metric in (PixelAUROC(), PixelAUROC(mode="exact"), PRO(), PRO(mode="exact")):
        metric.update(maps, masks)
        assert [t.numel() for t in metric.curve()] == [0, 0]
    image = ImageAUROC()
    image.update(torch.rand(3), torch.zeros(3))
    assert [t.numel() for t in image.curve()] == [0, 0]


# -- the report -------------------------------------------------------------------------------
class _Page(HTMLParser):
    """Tags, ids, image sources and visible text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.ids: set[str] = set()
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> tuple[str, _Page]:
    source = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(source)
    page.close()
    return source, page


def _decode(src: str) -> Image.Image:
    assert src.startswith(DATA_URI), src[:40]
    image = Image.open(io.BytesIO(base64.b64decode(src[len(DATA_URI) :], validate=True)))
    image.load()
    assert image.format == "PNG" and image.width > 0 and image.height > 0
    return image


def _inputs(seed: int = 0):
    """A record, curves from the metric classes, scores, labels and examples of a tiny run."""
    maps, masks, scores, labels = _case(seed, n=6, size=32)
    image, pixel, pro = ImageAUROC(), PixelAUROC(), PRO()
    image.update(scores, labels)
    pixel.update(maps, masks)
    pro.update(maps, masks)
    metrics = {
        "image_auroc": float(image.compute()),
        "image_auroc_error_bound": 0.0,
        "pixel_auroc": float(pixel.compute()),
        "pixel_auroc_error_bound": float(pixel.error_bound()),
        "pro": float(pro.compute()),
        "pro_error_bound": float(pro.error_bound()),
        "spro": 0.4242,
    }
    curves = {"image_roc": image.curve(), "pixel_roc": pixel.curve(), "pro": pro.curve()}
    g = torch.Generator().manual_seed(seed)
    kinds = {0: "highest-scoring normal", 1: "lowest-scoring defect"}
    examples = [
        {
            "image": torch.rand(3, 32, 32, generator=g),
            "mask": masks[i],
            "map": maps[i],
            "score": float(scores[i]),
            "label": int(labels[i]),
            "path": f"test/{'good' if labels[i] == 0 else 'crack'}/{i:03d}<&>.png",
            "kind": kinds[int(labels[i])],
        }
        for i in (0, 1, 4, 5)
    ]
    record = {
        "dataset": "mvtec",
        "category": "bottle",
        "method": "stfpm",
        "backbone": "resnet18",
        "weights": "timm hub",
        "seed": 7,
        "image_size": 32,
        "metrics": metrics,
        "thresholds": {
            "image": {
                "value": 1.2345,
                "method": "quantile",
                "quantile": 0.99,
                "source": "held-out normal images",
                "n": 20,
                "test": {
                    "right": 5,
                    "total": 6,
                    "normal_right": 1,
                    "normal_total": 2,
                    "anomalous_right": 4,
                    "anomalous_total": 4,
                },
            },
            "pixel": {"value": 2.5, "method": "fixed", "source": "configured"},  # no counts
        },
        "train_seconds": {"distill": 12.5, "finetune": 3.0},
        "inference_ms_per_image": 4.321,
        "peak_memory_mb": {"cpu_rss": 1047.5, "cuda": None},
        "device": "cpu: x86_64, 2 threads",
        "created": "2026-01-02T03:04:05+00:00",
        "git_revision": "0123456789abcdef",
        "versions": {"stad": "0.1.0", "torch": "2.5"},
    }
    return record, curves, scores, labels, examples


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    """One full report (shared: drawing it is the slow part), its record and examples."""
    run_dir = tmp_path_factory.mktemp("run")
    record, curves, scores, labels, examples = _inputs()
    path = write_report(run_dir, record, curves, scores, labels, examples)
    assert path == run_dir / REPORT_NAME
    return path, record, examples


def test_report_is_self_contained_with_every_section_and_decodable_pictures(report):
    path, record, examples = report
    source, page = _parse(path)
    assert {"metrics", "thresholds", "curves", "scores", "examples", "run"} <= page.ids
    # ROC, PRO, histogram, then one overlay per example
    assert len(page.images) == 3 + len(examples)
    sizes = [_decode(src).size for src in page.images]
    overlay_sizes = sizes[3:]
    assert all(w == 3 * h for w, h in overlay_sizes)  # image | map | ground truth
    lowered = source.lower()
    for external in ('src="http', "src='http", "<link", "<script", "url(", "@import"):
        assert external not in lowered
    text = " ".join(" ".join(page.text).split())
    assert f"{record['metrics']['image_auroc']:.4f}" in text
    assert "sPRO" in text and "0.4242" in text
    assert "± " in text  # binning bounds beside the pixel metrics
    assert f"{record['metrics']['image_auroc']:.4f} exact" in text
    # thresholds: value, how chosen, counts; the pixel threshold without counts is tolerated
    assert "1.234500" in text and "q = 0.99" in text and "held-out normal images" in text
    assert "5/6 (83.3%)" in text and "1/2 (50.0%)" in text and "4/4 (100.0%)" in text
    assert "fixed on configured" in text
    # examples grouped by kind, with their (escaped) paths and what each threshold says
    assert text.index("highest-scoring normal") < text.index("lowest-scoring defect")
    assert "test/crack/004<&>.png" in text and "<&>" not in source
    assert "image threshold: " in text and "pixel threshold: " in text
    # run facts
    facts = ("0123456789abcdef", "15.5 (distill 12.5, finetune 3.0)", "cpu_rss 1047.5", "4.321")
    for fact in (*facts, "2026-01-02", "stad 0.1.0, torch 2.5", "teacher weights timm hub"):
        assert fact in text


def test_report_tolerates_a_bare_record_and_missing_inputs(tmp_path):
    record = {"metrics": {"image_auroc": float("nan")}}
    empty = torch.zeros(0)
    path = write_report(tmp_path, record, {"image_roc": (empty, empty)}, empty, empty, [])
    _, page = _parse(path)
    text = " ".join(page.text)
    assert page.images == []
    assert "NaN (undefined)" in text and "No thresholds" in text and "not available" in text
    assert "No image scores" in text and "No examples" in text


def test_report_replaces_the_old_page_atomically(tmp_path):
    (tmp_path / REPORT_NAME).write_text("old")
    record, _, _, _, examples = _inputs(1)
    write_report(tmp_path, record, {}, torch.zeros(0), torch.zeros(0), examples[:1])
    assert (tmp_path / REPORT_NAME).read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_NAME]  # no temporary file left
    assert (tmp_path / REPORT_NAME).stat().st_mode & 0o777 == 0o644


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "headless_shell")


@pytest.mark.slow
def test_a_headless_browser_renders_the_report(report, tmp_path):
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        pytest.skip(f"no headless browser on PATH (looked for {', '.join(BROWSERS)})")
    path = report[0]
    shot = tmp_path / "shot.png"
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # tests may run as root in containers
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",  # never the user's own profile
        "--window-size=1000,1400",
        f"--screenshot={shot}",
        path.as_uri(),
    ]
    # Chromium keeps crash reports under $XDG_CONFIG_HOME whatever the profile: keep them here.
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    subprocess.run(command, capture_output=True, timeout=60, check=False, env=env)
    assert shot.exists(), "the browser wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int64)
    assert pixels.shape[:2] == (1400, 1000)
    # not blank: text, plot colours and overlays give many distinct colours
    colours = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    assert np.unique(colours).size > 200


def test_curves_gather_every_process_once_even_inside_a_callers_sync():
    """Under DDP curve() syncs like compute(); in a caller's sync_context it must not sync again
    (torchmetrics raises on a double sync). A fake two-process world: every state twice."""
    calls = []

    def gather(tensor, group=None):
        calls.append(tensor.shape)
        return [tensor, tensor.clone()]

    maps, masks, scores, labels = _case(4)
    fake = {"dist_sync_fn": gather, "distributed_available_fn": lambda: True}
    metrics = [
        (ImageAUROC(**fake), scores, labels),
        (PixelAUROC(mode="exact", **fake), maps, masks),
        (PRO(mode="binned", num_bits=12, **fake), maps, masks),
    ]
    for metric, preds, target in metrics:
        metric.update(preds, target)
        single = metric.curve()
        assert calls and metric._is_synced is False  # gathered, then the local state is back
        calls.clear()
        with metric.sync_context(dist_sync_fn=gather, distributed_available=lambda: True):
            nested = metric.curve()
        # Doubling every sample leaves the ROC and PRO points where they were.
        for a, b in zip(single, nested, strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-12)
