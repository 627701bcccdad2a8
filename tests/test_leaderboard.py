"""The leaderboard: grouping over seeds, swept parameters, revisions, paper numbers, bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from stad.leaderboard import main, paper_results
from stad.results import RECORD_KEYS, RECORD_NAME, config_hash, write_json_atomic


def _record(
    method="stfpm",
    category="bottle",
    seed=0,
    lr=0.4,
    metrics=(0.9, 0.95, 0.8),
    revision="a" * 40,
    dataset="mvtec",
    created="2026-01-01T00:00:00+00:00",
) -> dict:
    config = {
        "seed": seed,
        "output_root": "outputs",
        "dataset": {"name": dataset, "category": category, "root": "/data"},
        "method": {
            "name": method,
            "lr": lr,
            "cache_key": f"{dataset}/{category}",
            "seed": seed,  # e.g. method.seed: ${seed}
        },
        "backbone": {"name": "resnet18"},
    }
    image, pixel, pro = metrics
    record = {key: None for key in RECORD_KEYS}
    record.update(
        schema=1,
        dataset=dataset,
        category=category,
        method=method,
        backbone="resnet18",
        seed=seed,
        metrics={"image_auroc": image, "pixel_auroc": pixel, "pro": pro, "pro_error_bound": 1e-4},
        train_seconds={"distill": 10.0 + seed},
        inference_ms_per_image=5.0,
        versions={"stad": "0.1.0"},
        git_revision=revision,
        config=config,
        config_hash=config_hash(config),
        created=created,
    )
    return record


def _write(root: Path, name: str, record: dict) -> Path:
    path = root / name / RECORD_NAME
    write_json_atomic(path, record)
    return path


def _table(*args: str) -> list[dict]:
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        assert main(list(args)) == 0
    return list(csv.DictReader(io.StringIO(out.getvalue())))


def test_one_row_per_experiment_with_mean_and_std_over_seeds_and_a_dataset_mean(tmp_path):
    values = {
        ("bottle", 0): (0.90, 0.95, 0.80),
        ("bottle", 1): (0.94, 0.97, 0.84),
        ("cable", 0): (0.70, 0.85, 0.60),
        ("cable", 1): (0.80, 0.89, 0.66),
    }
    for (category, seed), metrics in values.items():
        _write(
            tmp_path, f"{category}{seed}", _record(category=category, seed=seed, metrics=metrics)
        )
    rows = {r["category"]: r for r in _table(f"runs={tmp_path}")}
    assert set(rows) == {"bottle", "cable", "mean"}
    bottle = rows["bottle"]
    assert float(bottle["image_auroc"]) == pytest.approx(0.92)
    assert float(bottle["image_auroc_std"]) == pytest.approx(statistics.stdev([0.90, 0.94]))
    assert bottle["n_seeds"] == "2" and bottle["seeds"] == "0 1"
    assert float(bottle["train_seconds"]) == pytest.approx(10.5)
    mean = rows["mean"]
    assert float(mean["pro"]) == pytest.approx(statistics.fmean([0.82, 0.63]))
    per_seed = [statistics.fmean([0.90, 0.70]), statistics.fmean([0.94, 0.80])]
    assert float(mean["image_auroc_std"]) == pytest.approx(statistics.stdev(per_seed))
    assert mean["n_categories"] == "2"
    assert "pro_error_bound" not in bottle
    # cache_key follows the category, method.seed the seed: neither is a swept parameter
    assert all(r["params"] == "" for r in rows.values())


def test_swept_parameters_and_code_revisions_are_never_averaged_together(tmp_path, capsys):
    _write(tmp_path, "a", _record(lr=0.4, seed=0))
    _write(tmp_path, "b", _record(lr=0.1, seed=0))
    _write(tmp_path, "c", _record(lr=0.4, seed=1, revision="b" * 40))
    rows = [r for r in _table(f"runs={tmp_path}") if r["category"] == "bottle"]
    assert sorted((r["params"], r["revision"], r["n_seeds"]) for r in rows) == [
        ("method.lr=0.1", "a" * 12, "1"),
        ("method.lr=0.4", "a" * 12, "1"),
        ("method.lr=0.4", "b" * 12, "1"),
    ]
    assert "2 code revisions" in capsys.readouterr().err


def test_paper_numbers_and_differences_on_the_dataset_mean_row(tmp_path):
    _write(tmp_path, "a", _record(method="rd", metrics=(0.99, 0.98, 0.95)))
    rows = {r["category"]: r for r in _table(f"runs={tmp_path}", "paper=true")}
    mean = rows["mean"]
    assert float(mean["paper_image_auroc"]) == pytest.approx(0.985)
    assert float(mean["diff_image_auroc"]) == pytest.approx(0.99 - 0.985)
    assert "RD4AD" in mean["paper_source"]
    assert rows["bottle"].get("paper_image_auroc", "") == ""


def test_every_paper_number_is_a_fraction_with_a_source():
    papers = paper_results()
    assert {p["method"] for p in papers} >= {"stfpm", "rd", "dskd", "aand", "ast", "us"}
    for p in papers:
        assert p["source"]
        for name in ("image_auroc", "pixel_auroc", "pro"):
            assert p[name] == "" or 0.5 < float(p[name]) <= 1.0


def test_markdown_shows_mean_plus_minus_std(tmp_path):
    _write(tmp_path, "a", _record(seed=0, metrics=(0.9, 0.9, 0.9)))
    _write(tmp_path, "b", _record(seed=1, metrics=(0.8, 0.9, 0.9)))
    out = tmp_path / "board.md"
    assert main([f"runs={tmp_path}", "format=md", f"out={out}"]) == 0
    text = out.read_text()
    assert text.startswith("| dataset | category |")
    assert "0.8500 ± 0.0707" in text


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("empty", ["no run records"]),
        ("corrupt", ["cannot read", "skip_invalid=true"]),
        ("partial", ["partial record", "metrics"]),
        ("duplicate", ["more than one record", "keep_latest=true"]),
        ("missing_dir", ["does not exist"]),
    ],
)
def test_bad_input_stops_with_a_clear_message_and_writes_nothing(tmp_path, capsys, setup, words):
    runs = tmp_path / "runs"
    runs.mkdir()
    _write(runs, "good", _record())
    if setup == "empty":
        (runs / "good" / RECORD_NAME).unlink()
    elif setup == "corrupt":
        (runs / "bad").mkdir()
        (runs / "bad" / RECORD_NAME).write_text('{"schema": 1, "metr')
    elif setup == "partial":
        record = _record(seed=3)
        del record["metrics"]
        _write(runs, "bad", record)
    elif setup == "duplicate":
        _write(runs, "copy", _record())
    target = runs if setup != "missing_dir" else tmp_path / "nowhere"
    out = tmp_path / "board.csv"
    out.write_text("previous table\n")
    assert main([f"runs={target}", f"out={out}"]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
    assert out.read_text() == "previous table\n"  # untouched
    assert not list(tmp_path.glob(".board.csv.*"))  # no temporary file left


def test_skip_invalid_and_keep_latest_let_the_table_through(tmp_path, capsys):
    _write(tmp_path, "old", _record(metrics=(0.5, 0.5, 0.5), created="2026-01-01T00:00:00+00:00"))
    _write(tmp_path, "new", _record(metrics=(0.9, 0.9, 0.9), created="2026-02-01T00:00:00+00:00"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / RECORD_NAME).write_text("not json")
    rows = _table(f"runs={tmp_path}", "skip_invalid=true", "keep_latest=true")
    assert float(rows[0]["image_auroc"]) == pytest.approx(0.9)
    err = capsys.readouterr().err
    assert "left out" in err and "kept" in err


@pytest.mark.slow
def test_module_and_console_entry_points(tmp_path):
    _write(tmp_path, "a", _record())
    out = subprocess.run(
        [sys.executable, "-m", "stad.leaderboard", f"runs={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "dataset,category,method,backbone,setting,params,revision,image_auroc"
    )
    assert json.loads((tmp_path / "a" / RECORD_NAME).read_text())["method"] == "stfpm"


# -- plots ------------------------------------------------------------------------------------
def _plot_runs(root: Path) -> None:
    """Two methods × two categories × two seeds; one method also reports sPRO."""
    for method in ("rd", "stfpm"):
        for category in ("bottle", "cable"):
            for seed in (0, 1):
                base = 0.9 if method == "rd" else 0.8
                shift = 0.02 * seed + (0.05 if category == "cable" else 0.0)
                record = _record(
                    method=method,
                    category=category,
                    seed=seed,
                    metrics=(base + shift, base + shift / 2, base - shift),
                )
                if method == "rd":
                    record["metrics"]["spro"] = 0.5 + shift
                _write(root, f"{method}-{category}-{seed}", record)


def test_plot_writes_one_png_per_metric_with_a_bar_group_per_method(tmp_path, capsys):
    from matplotlib.container import BarContainer, ErrorbarContainer
    from PIL import Image

    from stad.leaderboard import collect, plot_figure

    runs = tmp_path / "runs"
    _plot_runs(runs)
    out = tmp_path / "board.csv"
    assert main([f"runs={runs}", f"out={out}", "plot=true"]) == 0
    plots = tmp_path / "board_plots"
    names = sorted(p.name for p in plots.iterdir())
    assert names == [f"mvtec_{m}.png" for m in ("image_auroc", "pixel_auroc", "pro", "spro")]
    for path in plots.iterdir():
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG" and image.width > 100 and image.height > 100
    assert "wrote 4 plots" in capsys.readouterr().err

    board = collect([runs])
    # Default: one group of bars per method, one bar per category and the mean.
    ax = plot_figure(board.rows, "image_auroc", "mvtec").axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["rd", "stfpm"]
    assert [c.get_label() for c in bars] == ["bottle", "cable", "mean"]
    assert all(len(c.patches) == 2 for c in bars)
    rd = [round(c.patches[0].get_height(), 6) for c in bars]
    assert rd == pytest.approx([0.91, 0.96, 0.935])  # rd: means over seeds, then mean
    # Transposed: one group per category (then the mean), one bar per method.
    ax = plot_figure(board.rows, "image_auroc", "mvtec", group_by="category").axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [c.get_label() for c in bars] == ["rd", "stfpm"]
    assert all(len(c.patches) == 3 for c in bars)  # bottle, cable, mean
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bottle", "cable", "mean"]
    heights = [round(p.get_height(), 6) for p in bars[0].patches]
    assert heights == pytest.approx([0.91, 0.96, 0.935])
    assert len([c for c in ax.containers if isinstance(c, ErrorbarContainer)]) == 2
    # sPRO: only rd has it, so the stfpm series is there with empty bars
    spro = plot_figure(board.rows, "spro", "mvtec", group_by="category").axes[0]
    spro_bars = [c for c in spro.containers if isinstance(c, BarContainer)]
    assert [p.get_height() for p in spro_bars[1].patches] == [0.0, 0.0, 0.0]


def test_plot_labels_series_by_backbone_only_when_several_and_needs_a_folder(tmp_path, capsys):
    from matplotlib.container import BarContainer

    from stad.leaderboard import collect, plot_figure

    for seed, backbone in ((0, "resnet18"), (0, "wide_resnet50_2")):
        record = _record(seed=seed)
        record["backbone"] = backbone
        record["config"]["backbone"]["name"] = backbone
        record["config_hash"] = config_hash(record["config"])
        _write(tmp_path / "runs", backbone, record)
    rows = collect([tmp_path / "runs"]).rows
    ax = plot_figure(rows, "pro", "mvtec", group_by="category").axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [c.get_label() for c in bars] == ["stfpm resnet18", "stfpm wide_resnet50_2"]
    assert not [c for c in ax.containers if not isinstance(c, BarContainer)]  # one seed
    # plot=true needs out= to put the plots beside it
    assert main([f"runs={tmp_path / 'runs'}", "plot=true"]) == 2
    assert "plot=<folder>" in capsys.readouterr().err
    assert main([f"runs={tmp_path / 'runs'}", f"plot={tmp_path / 'figs'}"]) == 0
    assert len(list((tmp_path / "figs").glob("*.png"))) == 3
    assert not list((tmp_path / "figs").glob(".*"))  # no temporary file left


# -- failed runs ------------------------------------------------------------------------------
def _fail(root: Path, name: str, record: dict, error: str = "RuntimeError") -> Path:
    path = root / name / "failed.json"
    write_json_atomic(
        path,
        {
            "status": "failed",
            "reason": f"CUDA out of memory in {name}\nTraceback line",
            "error": error,
            **{k: record[k] for k in ("dataset", "category", "method", "backbone", "seed")},
            "config": record["config"],
            "config_hash": record["config_hash"],
            "created": "2026-01-03T00:00:00+00:00",
        },
    )
    return path


def test_failed_runs_are_listed_apart_and_never_averaged(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write(runs, "s0", _record(seed=0, metrics=(0.9, 0.9, 0.9)))
    _write(runs, "s1", _record(seed=1, metrics=(0.8, 0.9, 0.9)))
    _fail(runs, "s2", _record(seed=2))
    _fail(runs, "cable", _record(category="cable", seed=0), error="StadError")
    # retried with success in the same folder: finished
    _write(runs, "s3", _record(seed=3, metrics=(0.7, 0.9, 0.9)))
    _fail(runs, "s3", _record(seed=3))
    # failed once in another folder, then finished elsewhere (same config hash): finished
    _fail(runs, "s0-first-try", _record(seed=0))
    out = tmp_path / "board.csv"
    assert main([f"runs={runs}", f"out={out}"]) == 0
    rows = {r["category"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"bottle", "mean"}  # the failed cable run makes no row
    assert rows["bottle"]["seeds"] == "0 1 3"
    assert float(rows["bottle"]["image_auroc"]) == pytest.approx(0.8)
    failed = list(csv.DictReader((tmp_path / "board_failed.csv").open()))
    assert [(f["category"], f["seed"], f["error"]) for f in failed] == [
        ("cable", "0", "StadError"),
        ("bottle", "2", "RuntimeError"),
    ]
    assert failed[1]["run_dir"] == str(runs / "s2")
    assert failed[1]["reason"].startswith("CUDA out of memory in s2\n")
    assert failed[1]["method"] == "stfpm" and failed[1]["backbone"] == "resnet18"
    assert f"2 failed runs (not in the table): see {tmp_path / 'board_failed.csv'}" in (
        capsys.readouterr().err
    )
    # once they are retried with success, the stale list goes
    for name, category, seed in (("s2", "bottle", 2), ("cable", "cable", 0)):
        _write(runs, name, _record(category=category, seed=seed))
    assert main([f"runs={runs}", f"out={out}"]) == 0
    assert not (tmp_path / "board_failed.csv").exists()
    assert "no failed runs" in capsys.readouterr().err


def test_failed_runs_on_stderr_when_printing_and_in_the_error_when_nothing_finished(
    tmp_path, capsys
):
    runs = tmp_path / "runs"
    _write(runs, "ok", _record(seed=0))
    _fail(runs, "bad", _record(seed=1))
    (runs / "junk").mkdir()
    (runs / "junk" / "failed.json").write_text("{not json")
    table = _table(f"runs={runs}")
    assert [r["n_seeds"] for r in table] == ["1", "1"]
    err = capsys.readouterr().err
    assert "2 failed runs (not in the table):" in err
    assert "mvtec/bottle/stfpm/resnet18 seed 1: RuntimeError: CUDA out of memory in bad (" in err
    assert "unreadable" in err

    only = tmp_path / "only"
    _fail(only, "bad", _record(seed=1))
    out = tmp_path / "board.csv"
    assert main([f"runs={only}", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert "no run records" in err and "1 runs failed" in err and "CUDA out of memory" in err
    assert not out.exists() and not (tmp_path / "board_failed.csv").exists()


def test_paper_rows_per_category_say_whether_the_setting_is_the_papers(tmp_path):
    """STFPM's per-category official values sit beside a bottle run; a run on another backbone
    or with capped epochs is marked as not comparable, with the reason."""
    paper_like = _record(method="stfpm", metrics=(1.0, 0.98, 0.95))
    paper_like["config"]["backbone"]["name"] = "resnet18.tv_in1k"
    paper_like["config"]["method"].update(paper_backbone="resnet18.tv_in1k", image_size=256)
    paper_like["config"]["image_size"] = 256
    paper_like["config_hash"] = config_hash(paper_like["config"])
    _write(tmp_path / "paper", "a", paper_like)
    rows = _table(f"runs={tmp_path / 'paper'}", "paper=true")
    bottle = next(r for r in rows if r["category"] == "bottle")
    assert float(bottle["paper_image_auroc"]) == pytest.approx(1.0)
    assert float(bottle["diff_pixel_auroc"]) == pytest.approx(0.98 - 0.987894)
    assert bottle["comparable"] == "yes"

    other = _record(method="stfpm", metrics=(0.9, 0.9, 0.8))
    other["config"]["method"].update(
        paper_backbone="resnet18.tv_in1k", image_size=256, stages={"distill": {"epochs": 100}}
    )
    other["config"].update(image_size=128, trainer={"max_epochs": 10})
    other["config_hash"] = config_hash(other["config"])
    _write(tmp_path / "other", "a", other)
    bottle = next(
        r for r in _table(f"runs={tmp_path / 'other'}", "paper=true") if r["category"] == "bottle"
    )
    assert "backbone resnet18 (paper resnet18.tv_in1k)" in bottle["comparable"]
    assert "128 px (paper 256)" in bottle["comparable"]
    assert "distill 10 epochs (paper 100)" in bottle["comparable"]


def test_the_leaderboard_takes_key_value_options_like_every_stad_command(tmp_path, capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "usage: python -m stad.leaderboard key=value" in text
    assert all(k in text for k in ("runs", "out", "format", "paper", "plot_groups"))
    # The old argparse spelling gets one message naming the key=value form.
    assert main([str(tmp_path), "--paper"]) == 2
    assert "is not key=value" in capsys.readouterr().err
    assert main(["format=md"]) == 2
    assert "missing runs=..." in capsys.readouterr().err


def test_html_page_links_every_run_report_and_escapes_what_runs_hold(tmp_path):
    from html.parser import HTMLParser

    for seed in (0, 1):
        record = _record(seed=seed, metrics=(0.9 + seed / 100, 0.95, 0.8))
        record["report"] = "report.html"
        _write(tmp_path / "runs", f"b{seed}", record)
        (tmp_path / "runs" / f"b{seed}" / "report.html").write_text("<html></html>")
    odd = _record(category="<script>x</script>")
    _write(tmp_path / "runs", "odd", odd)
    page = tmp_path / "site" / "board.html"
    assert main([f"runs={tmp_path / 'runs'}", "format=html", f"out={page}"]) == 0
    text = page.read_text()
    assert "<script>x</script>" not in text and "&lt;script&gt;x&lt;/script&gt;" in text

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.hrefs: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "a":
                self.hrefs.append(dict(attrs)["href"])

    parser = Links()
    parser.feed(text)
    assert sorted(parser.hrefs) == ["../runs/b0/report.html", "../runs/b1/report.html"]
    assert all((page.parent / h).is_file() for h in parser.hrefs)  # they open
    assert "0.9050" in text and "± 0.0071" in text  # mean ± std over the two seeds
    assert text.count("<table>") == 1 and "<h2>mvtec · single</h2>" in text  # dataset × setting


def test_latex_tables_print_categories_by_methods_in_percent_best_in_bold(tmp_path):
    _write(tmp_path, "a", _record(category="metal_nut", metrics=(0.9, 0.95, 0.8)))
    _write(tmp_path, "b", _record(category="bottle", metrics=(1.0, 0.97, 0.9)))
    _write(tmp_path, "c", _record(method="rd", category="metal_nut", metrics=(0.95, 0.9, 0.7)))
    _write(tmp_path, "d", _record(method="rd", category="bottle", metrics=(0.99, 0.98, 0.95)))
    out = tmp_path / "tables" / "board.tex"
    assert main([f"runs={tmp_path}", "format=tex", f"out={out}", "paper=true"]) == 0
    written = sorted(p.name for p in out.parent.iterdir())
    assert written == [f"board_mvtec_{m}.tex" for m in ("image_auroc", "pixel_auroc", "pro")]
    lines = (out.parent / "board_mvtec_image_auroc.tex").read_text().splitlines()
    assert lines[2] == "\\begin{tabular}{lrrrr}" and lines[-1] == "\\end{tabular}"
    assert lines[4] == "Category & rd & rd (paper) & stfpm & stfpm (paper) \\\\"
    # STFPM's official README gives per-category values
    assert "metal nut & \\textbf{95.0} & -- & 90.0 & 98.3 \\\\" in lines
    assert "bottle & 99.0 & -- & \\textbf{100.0} & 100.0 \\\\" in lines
    mean = next(line for line in lines if line.startswith("Mean"))
    assert mean == "Mean & \\textbf{97.0} & 98.5 & 95.0 & 95.5 \\\\"  # paper: RD 98.5, STFPM 95.5
    assert lines[lines.index(mean) - 1] == "\\midrule"


# A minimal DOM for the page's sorting script: tables of rows of cells, as Chromium gives them.
_FAKE_DOM = """
const cell = ([v, t]) => ({dataset: v === null ? {} : {v}, textContent: t});
const mk = (cells) => ({cells: cells.map(cell)});
const rows = ROWS.map(mk);
const body = {get rows() { return rows.slice(); },
  appendChild(r) { rows.splice(rows.indexOf(r), 1); rows.push(r); }};
const table = {tBodies: [body]};
const listeners = [];
const ths = HEADS.map((h, i) => ({textContent: h, cellIndex: i, dataset: {},
  closest: () => table, addEventListener: (_, f) => listeners.push(f)}));
globalThis.document = {querySelectorAll: () => ths};
globalThis.location = {hash: HASH};
SCRIPT
const order = () => rows.map(r => r.cells[0].textContent).join(',');
const out = [order()];
listeners[1](); out.push(order());
listeners[1](); out.push(order());
console.log(out.join(' | '));
"""


def test_the_pages_script_sorts_numbers_numerically_both_ways_and_on_a_sort_link(tmp_path):
    import re
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.skip("no node on PATH to run the page's script")
    _write(tmp_path, "a", _record())
    page = tmp_path / "board.html"
    assert main([f"runs={tmp_path}", "format=html", f"out={page}"]) == 0
    (script,) = re.findall(r"<script>(.*?)</script>", page.read_text(), flags=re.S)
    rows = [[[None, "b"], ["10", "10.0"]], [[None, "a"], ["9", "9.0"]], [[None, "c"], ["", ""]]]

    def order(hash_: str) -> str:
        program = (
            _FAKE_DOM.replace("ROWS", json.dumps(rows))
            .replace("HEADS", json.dumps(["name", "image_auroc"]))
            .replace("HASH", json.dumps(hash_))
            .replace("SCRIPT", script)
        )
        (tmp_path / "sort.js").write_text(program)
        out = subprocess.run([node, str(tmp_path / "sort.js")], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    # as written | one click: ascending (9 before 10: numbers, not text), empty last | descending
    assert order("") == "b,a,c | a,b,c | b,a,c"
    # #sort=image_auroc sorts on load (then the clicks go on from there)
    assert order("#sort=image_auroc").split(" | ")[0] == "a,b,c"


@pytest.mark.slow
def test_a_headless_browser_opens_the_page_sorted_with_working_report_links(tmp_path):
    import shutil
    from html.parser import HTMLParser

    browsers = ("chromium", "chromium-browser", "google-chrome", "headless_shell")
    browser = next((b for b in map(shutil.which, browsers) if b), None)
    if browser is None:
        pytest.skip(f"no headless browser on PATH (looked for {', '.join(browsers)})")
    for category, value in (("bottle", 0.7), ("cable", 0.9), ("zipper", 0.85)):
        record = _record(category=category, metrics=(value, 0.95, 0.8))
        record["report"] = "report.html"
        _write(tmp_path / "runs", category, record)
        (tmp_path / "runs" / category / "report.html").write_text("<html></html>")
    page = tmp_path / "board.html"
    assert main([f"runs={tmp_path / 'runs'}", "format=html", f"out={page}"]) == 0
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
               page.as_uri() + "#sort=image_auroc"]  # fmt: skip
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    dom = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env).stdout

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows: list[list[str]] = []
            self.links: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            if tag == "a":
                self.links.append(dict(attrs)["href"])

        def handle_data(self, data):
            if self.rows and data.strip():
                self.rows[-1].append(data.strip())

    parsed = Rows()
    parsed.feed(dom)
    categories = [r[1] for r in parsed.rows[1:]]
    assert categories == ["bottle", "mean", "zipper", "cable"]  # by image AUROC, ascending
    assert all((page.parent / link).is_file() for link in parsed.links) and len(parsed.links) == 3


@pytest.mark.slow
def test_the_latex_tables_compile_with_the_documented_preamble(tmp_path):
    import shutil

    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        pytest.skip("no pdflatex on PATH")
    _write(tmp_path, "a", _record(category="metal_nut"))
    out = tmp_path / "board.tex"
    assert main([f"runs={tmp_path}", "format=tex", f"out={out}", "paper=true"]) == 0
    document = tmp_path / "doc.tex"
    document.write_text(
        "\\documentclass{article}\\usepackage{booktabs}\\begin{document}"
        "\\input{board_mvtec_image_auroc}\\end{document}\n"
    )
    done = subprocess.run(
        [pdflatex, "-interaction=nonstopmode", "-halt-on-error", document.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and (tmp_path / "doc.pdf").is_file(), done.stdout[-2000:]
