"""Each run's ``report.html``: one self-contained page to read a run at a glance.

Metrics, thresholds and how many test images they get right, ROC and PRO curves, the image-score
histogram, overlays of the hardest test images, and the run's facts. Every picture is a PNG
embedded as a ``data:`` URI and the CSS is inline, so the page opens offline and survives being
mailed or copied on its own. Plots use matplotlib's object-oriented API on the Agg canvas (no
pyplot state, no display), which :mod:`stad.leaderboard` shares for its bar charts.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from stad.fileio import write_atomic
from stad.metrics.functional import thin_curve
from stad.viz import overlay

REPORT_NAME = "report.html"
DPI = 100
PLOT_POINTS = 2000  # per curve: beyond this a line plot looks the same and costs more
OVERLAY_HEIGHT = 256  # px; larger test images are shrunk in the page (the PNGs are kept apart)
NORMAL_COLOR, ANOMALOUS_COLOR = "#1f77b4", "#d62728"
# Example kinds in the order the page shows them, each sorted hardest first.
KIND_ORDER = {"highest-scoring normal": -1, "lowest-scoring defect": 1}

METRIC_LABELS = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "pro": "PRO (AU-PRO up to FPR 0.3, normalised)",
    "pixel_ap": "pixel AP (area under precision-recall)",
    "spro": "sPRO",
}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1150px; margin: 1.5em auto; padding: 0 1em; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em;
     border-bottom: 1px solid #ddd; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0 1.2em 1em 0; vertical-align: top; }
figcaption { font-size: 0.88em; color: #555; max-width: 780px; }
img { max-width: 100%; } .note { color: #666; font-size: 0.9em; }
"""


# -- files and figures (shared with the leaderboard) ------------------------------------------
def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure on its own Agg canvas (inches; no pyplot, works without a display)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{_data_uri(png)}" alt="{html.escape(alt)}">'


def _array_png(rgb: np.ndarray, max_height: int = OVERLAY_HEIGHT) -> bytes:
    """H×W×3 uint8 as PNG: large images shrunk to ``max_height``, tiny ones enlarged (pixels
    kept sharp) to at least half of it."""
    image = Image.fromarray(rgb)
    if image.height > max_height:
        width = max(1, round(image.width * max_height / image.height))
        image = image.resize((width, max_height), Image.Resampling.BILINEAR)
    elif image.height < max_height // 2:
        factor = -(-max_height // 2 // image.height)
        size = (image.width * factor, image.height * factor)
        image = image.resize(size, Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- the page ---------------------------------------------------------------------------------
def write_report(
    run_dir: Path,
    record: Mapping[str, Any],
    curves: Mapping[str, tuple[Tensor, Tensor]],
    image_scores: Tensor,
    image_labels: Tensor,
    examples: Sequence[Mapping[str, Any]],
) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path.

    Args:
        run_dir: the run's output folder.
        record: the run record (``stad.results``); ``metrics`` is shown, ``thresholds`` and the
            run facts when present.
        curves: ``image_roc`` and ``pixel_roc`` as (fpr, tpr), ``pro`` as (fpr, pro) up to the
            FPR limit, each a pair of (K,) tensors (the metrics' ``curve()``); missing or empty
            ones are reported as not available.
        image_scores: (N,) test image scores.
        image_labels: (N,) 0/1 test labels (1 = anomalous).
        examples: dicts with ``image`` (3×H×W in [0, 1]), ``mask`` and ``map`` (1×H×W),
            ``score``, ``label``, ``path`` and ``kind`` ("highest-scoring normal" or
            "lowest-scoring defect").

    Returns:
        The path of the written page.
    """
    thresholds = record.get("thresholds") or {}
    image_threshold = _value(thresholds.get("image"))
    body = [
        _header(record),
        _metrics_section(record.get("metrics") or {}),
        _per_defect_section(record.get("per_defect") or {}),
        _thresholds_section(thresholds),
        _curves_section(curves, record.get("metrics") or {}),
        _histogram_section(image_scores, image_labels, image_threshold),
        _examples_section(examples, image_threshold, _value(thresholds.get("pixel"))),
        _facts_section(record),
    ]
    title = f"stad: {_run_name(record)}"
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    path = Path(run_dir) / REPORT_NAME
    write_atomic(path, page)
    return path


def _run_name(record: Mapping[str, Any]) -> str:
    return f"{record.get('method', '?')} on {record.get('dataset', '?')}/" + str(
        record.get("category", "?")
    )


def _header(record: Mapping[str, Any]) -> str:
    title = _run_name(record)
    facts = [f"backbone {record.get('backbone', '?')}", f"seed {record.get('seed', '?')}"]
    if record.get("created"):
        facts.append(str(record["created"]))
    return f'<h1>{html.escape(title)}</h1>\n<p class="sub">{html.escape(" · ".join(facts))}</p>'


def _section(anchor: str, heading: str, *parts: str) -> str:
    return (
        f'<section id="{anchor}">\n<h2>{html.escape(heading)}</h2>\n'
        + "\n".join(parts)
        + ("\n</section>")
    )


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: set[int]) -> str:
    """An HTML table of already-escaped cells; columns in ``numeric`` align right."""
    head = "".join(f"<th>{h}</th>" for h in header)
    lines = [f"<table>\n<tr>{head}</tr>"]
    for row in rows:
        cells = "".join(
            f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        lines.append(f"<tr>{cells}</tr>")
    return "\n".join(lines) + "\n</table>"


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "undefined"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    if isinstance(value, float) and math.isnan(value):
        return "NaN (undefined)"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# -- metrics and thresholds -------------------------------------------------------------------
def _metrics_section(metrics: Mapping[str, Any]) -> str:
    rows = []
    for name, value in metrics.items():
        if name.endswith("_error_bound"):
            continue
        bound = metrics.get(f"{name}_error_bound")
        rows.append(
            (
                html.escape(METRIC_LABELS.get(name, name)),
                _number(value),
                _bound(bound),
            )
        )
    if not rows:
        return _section("metrics", "Metrics", "<p>No metrics in this record.</p>")
    table = _table(("metric", "value", "binning error bound"), rows, {1, 2})
    note = (
        '<p class="note">Test-set values. The bound is the largest possible distance of a '
        "binned (bounded-memory) pixel metric from the exact one.</p>"
    )
    return _section("metrics", "Metrics", table, note)


PER_DEFECT_METRICS = ("image_auroc", "pixel_auroc", "pro", "pixel_ap")


def _per_defect_section(per_defect: Mapping[str, Any]) -> str:
    """One row per defect type (empty when the record has none)."""
    if not per_defect:
        return ""
    rows = [
        (html.escape(str(defect)), *(_number(values.get(m)) for m in PER_DEFECT_METRICS))
        for defect, values in sorted(per_defect.items())
    ]
    headers = ("defect type", *(METRIC_LABELS.get(m, m).split(" (")[0] for m in PER_DEFECT_METRICS))
    table = _table(headers, rows, {1, 2, 3, 4})
    note = (
        '<p class="note">Each type against all normal test images: image AUROC of its images, '
        "pixel metrics over its images and the normal ones (binned at 2<sup>16</sup> bins; "
        "record.json holds each bound).</p>"
    )
    return _section("per-defect", "Per defect type", table, note)


def _bound(bound: Any) -> str:
    if not isinstance(bound, (int, float)):
        return ""
    return "exact" if bound == 0 else f"± {float(bound):.1e}"


def _value(threshold: Any) -> float | None:
    if isinstance(threshold, Mapping) and isinstance(threshold.get("value"), (int, float)):
        return float(threshold["value"])
    return None


def _how_chosen(threshold: Mapping[str, Any]) -> str:
    details = []
    if "quantile" in threshold:
        details.append(f"q = {threshold['quantile']:g}")
    if "f1" in threshold:
        details.append(f"F1 = {float(threshold['f1']):.3f}")
    if "n" in threshold:
        details.append(f"n = {threshold['n']}")
    text = str(threshold.get("method", "?"))
    if details:
        text += f" ({', '.join(details)})"
    if threshold.get("source"):
        text += f" on {threshold['source']}"
    return html.escape(text)


def _share(test: Mapping[str, Any], key: str) -> str:
    right, total = test.get(f"{key}right"), test.get(f"{key}total")
    if not isinstance(right, int) or not isinstance(total, int):
        return "–"
    percent = f" ({100.0 * right / total:.1f}%)" if total else ""
    return f"{right}/{total}{percent}"


def _thresholds_section(thresholds: Mapping[str, Any]) -> str:
    heading = "Thresholds"
    if not thresholds:
        return _section("thresholds", heading, "<p>No thresholds in this run's record.</p>")
    rows = []
    for kind in sorted(thresholds, key=lambda k: (k != "image", k)):
        threshold = thresholds[kind]
        if not isinstance(threshold, Mapping):
            continue
        test = threshold.get("test") or {}
        rows.append(
            (
                html.escape(kind),
                _number(threshold.get("value", "–"), 6),
                _how_chosen(threshold),
                _share(test, ""),
                _share(test, "normal_"),
                _share(test, "anomalous_"),
            )
        )
    header = ("threshold", "value", "how chosen", "test images right", "normal", "anomalous")
    parts = [_table(header, rows, {1, 3, 4, 5})]
    pixels = (thresholds.get("pixel") or {}).get("test_pixels")
    if isinstance(pixels, Mapping) and {"tpr", "fpr"} <= set(pixels):
        parts.append(
            f"<p>Pixel threshold on test pixels: TPR {float(pixels['tpr']):.4f}, "
            f"FPR {float(pixels['fpr']):.4f}.</p>"
        )
    parts.append(
        '<p class="note">An image counts as anomalous when its score is at or above the image '
        "threshold, or (pixel threshold) when any pixel of its map is at or above it. The "
        "thresholds are chosen without test images; the counts are on the test set.</p>"
    )
    return _section("thresholds", heading, *parts)


# -- plots ------------------------------------------------------------------------------------
def _curve(curves: Mapping[str, Any], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    pair = curves.get(key)
    if pair is None:
        return None
    x, y = (torch.as_tensor(v).double().reshape(-1).cpu() for v in pair)
    if x.numel() < 2 or x.numel() != y.numel():
        return None
    x_range = float(x[-1] - x[0]) or 1.0
    x, y = thin_curve(x, y, PLOT_POINTS, x_range)
    return x.numpy(), y.numpy()


def _legend(name: str, metrics: Mapping[str, Any], key: str) -> str:
    value = metrics.get(key)
    return f"{name} ({value:.4f})" if isinstance(value, float) else name


def _roc_png(curves: Mapping[str, Any], metrics: Mapping[str, Any]) -> bytes | None:
    lines = [
        (_curve(curves, "image_roc"), _legend("image", metrics, "image_auroc"), "C0"),
        (_curve(curves, "pixel_roc"), _legend("pixel", metrics, "pixel_auroc"), "C1"),
    ]
    if all(points is None for points, _, _ in lines):
        return None
    fig = new_figure(4.2, 3.8)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbb", linestyle="--", linewidth=1, label="chance")
    for points, label, color in lines:
        if points is not None:
            ax.plot(*points, color=color, linewidth=1.6, label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title("ROC (AUROC in brackets)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return figure_png(fig)


def _pro_png(curves: Mapping[str, Any], metrics: Mapping[str, Any]) -> bytes | None:
    points = _curve(curves, "pro")
    if points is None:
        return None
    fpr, pro = points
    fig = new_figure(4.2, 3.8)
    ax = fig.add_subplot()
    ax.plot(fpr, pro, color="C2", linewidth=1.6, label=_legend("PRO", metrics, "pro"))
    ax.fill_between(fpr, pro, color="C2", alpha=0.15)
    ax.set(
        xlim=(0, float(fpr[-1])),
        ylim=(0, 1.01),
        xlabel="false positive rate (pixels)",
        ylabel="per-region overlap",
    )
    ax.set_title(f"PRO up to FPR {float(fpr[-1]):g} (area / limit in brackets)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return figure_png(fig)


def _curves_section(curves: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    parts = []
    for png, alt, caption in (
        (_roc_png(curves, metrics), "ROC curves", "ROC curves of image scores and of pixels."),
        (
            _pro_png(curves, metrics),
            "PRO curve",
            "Per-region overlap against the pixel FPR; its area divided by the limit is PRO.",
        ),
    ):
        if png is None:
            parts.append(f"<p>{alt}: not available (a class is missing from the test set).</p>")
        else:
            parts.append(f"<figure>{_img(png, alt)}<figcaption>{caption}</figcaption></figure>")
    return _section("curves", "ROC and PRO curves", *parts)


def _histogram_png(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> bytes:
    finite = np.isfinite(scores)
    scores, labels = scores[finite], labels[finite]
    edges = np.histogram_bin_edges(scores, bins=int(np.clip(np.sqrt(scores.size) * 2, 10, 40)))
    fig = new_figure(5.6, 3.4)
    ax = fig.add_subplot()
    for mask, name, color in (
        (~labels, "normal", NORMAL_COLOR),
        (labels, "anomalous", ANOMALOUS_COLOR),
    ):
        if mask.any():
            ax.hist(
                scores[mask],
                bins=edges.tolist(),
                color=color,
                alpha=0.55,
                label=f"{name} ({int(mask.sum())})",
            )
    if threshold is not None:
        ax.axvline(
            threshold,
            color="k",
            linestyle="--",
            linewidth=1.2,
            label=f"image threshold ({threshold:.4g})",
        )
    ax.set(xlabel="image anomaly score", ylabel="test images")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure_png(fig)


def _histogram_section(image_scores: Tensor, image_labels: Tensor, threshold: float | None) -> str:
    heading = "Image scores"
    scores = torch.as_tensor(image_scores).double().reshape(-1).cpu().numpy()
    labels = torch.as_tensor(image_labels).reshape(-1).cpu().numpy() > 0
    if scores.size == 0 or scores.size != labels.size or not np.isfinite(scores).any():
        return _section("scores", heading, "<p>No image scores available.</p>")
    png = _histogram_png(scores, labels, threshold)
    caption = "Test image scores, normal against anomalous" + (
        "; the dashed line is the image threshold." if threshold is not None else "."
    )
    return _section(
        "scores",
        heading,
        f"<figure>{_img(png, 'image score histogram')}<figcaption>{caption}</figcaption></figure>",
    )


# -- examples ---------------------------------------------------------------------------------
def _ordered(examples: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Mapping]]]:
    """Examples grouped by kind: known kinds first, each hardest first."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for example in examples:
        kind = example.get("kind") or ("anomalous" if example.get("label") else "normal")
        groups.setdefault(str(kind), []).append(example)
    rank = {kind: i for i, kind in enumerate(KIND_ORDER)}
    out = []
    for kind in sorted(groups, key=lambda k: rank.get(k, len(rank))):
        sign = KIND_ORDER.get(kind, -1)
        out.append((kind, sorted(groups[kind], key=lambda e: sign * float(e["score"]))))
    return out


def _verdicts(example: Mapping[str, Any], image_t: float | None, pixel_t: float | None) -> str:
    """What each threshold makes of the example, and whether that is right."""
    truth = bool(example.get("label"))
    verdicts = []
    for name, threshold, values in (
        ("image threshold", image_t, example["score"]),
        ("pixel threshold", pixel_t, example["map"]),
    ):
        if threshold is None:
            continue
        flagged = bool((torch.as_tensor(values).double() >= threshold).any())
        verdict = "anomalous" if flagged else "normal"
        verdicts.append(f"{name}: {verdict} ({'right' if flagged == truth else 'wrong'})")
    return "; ".join(verdicts)


def _examples_section(
    examples: Sequence[Mapping[str, Any]], image_t: float | None, pixel_t: float | None
) -> str:
    heading = "Hardest test images"
    if not examples:
        return _section(
            "examples", heading, "<p>No examples kept (the run's <code>examples</code> is 0).</p>"
        )
    values = np.concatenate([torch.as_tensor(e["map"]).float().numpy().ravel() for e in examples])
    vmin, vmax = float(np.percentile(values, 1)), float(np.percentile(values, 99.9))
    parts = [
        '<p class="note">Each row: the image, its anomaly map over it (blue low, red high; one '
        f"colour scale for all rows, map values {vmin:.4g} to {vmax:.4g}) and the ground truth "
        "(white = defect).</p>"
    ]
    for kind, group in _ordered(examples):
        parts.append(f"<h3>{html.escape(kind)} ({len(group)})</h3>")
        for example in group:
            rgb = overlay(
                torch.as_tensor(example["image"]).float().cpu(),
                torch.as_tensor(example["map"]).float().cpu(),
                torch.as_tensor(example["mask"]).float().cpu(),
                vmin,
                vmax,
            )
            label = "anomalous" if example.get("label") else "normal"
            path = str(example.get("path", ""))
            caption = f"{_short(path)}: score {float(example['score']):.5g}, {label}"
            verdict = _verdicts(example, image_t, pixel_t)
            if verdict:
                caption += f"; {verdict}"
            parts.append(
                f'<figure title="{html.escape(path)}">{_img(_array_png(rgb), path or kind)}'
                f"<figcaption>{html.escape(caption)}</figcaption></figure><br>"
            )
    return _section("examples", heading, *parts)


def _short(path: str, parts: int = 3) -> str:
    """The last folders of a path (defect type and file name); the page keeps the full one in
    the figure's tooltip."""
    return "/".join(Path(path).parts[-parts:]) if path else ""


# -- run facts --------------------------------------------------------------------------------
def _train_seconds(value: Any) -> str:
    if not isinstance(value, Mapping) or not value:
        return "–" if value is None else str(value)
    total = sum(float(v) for v in value.values())
    stages = ", ".join(f"{k} {float(v):.1f}" for k, v in value.items())
    return f"{total:.1f} ({stages})"


def _fact(value: Any) -> str:
    """A record value as escaped text: numbers rounded, dicts as ``key value`` pairs without
    the empty ones."""
    if value is None or value == "":
        return "–"
    if isinstance(value, Mapping):
        pairs = [(k, v) for k, v in value.items() if v not in (None, "")]
        return ", ".join(f"{html.escape(str(k))} {_fact(v)}" for k, v in pairs) or "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return html.escape(str(value))


def _facts_section(record: Mapping[str, Any]) -> str:
    facts = [
        ("dataset", record.get("dataset")),
        ("category", record.get("category")),
        ("method", record.get("method")),
        ("backbone", record.get("backbone")),
        ("teacher weights", record.get("weights")),
        ("seed", record.get("seed")),
        ("image size", record.get("image_size")),
        ("train seconds", _train_seconds(record.get("train_seconds"))),
        ("inference ms / image", record.get("inference_ms_per_image")),
        ("peak memory MB", record.get("peak_memory_mb")),
        ("device", record.get("device")),
        ("created", record.get("created")),
        ("git revision", record.get("git_revision")),
        ("config hash", record.get("config_hash")),
        ("command", record.get("command")),
        ("versions", record.get("versions")),
    ]
    rows = [(html.escape(name), _fact(value)) for name, value in facts]
    return _section("run", "Run", _table(("fact", "value"), rows, set()))
