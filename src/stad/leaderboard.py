"""Leaderboards: run records → one table row per dataset, category, method, backbone and swept
hyper-parameters, with mean and std over seeds, per-dataset mean rows and the papers' numbers.

``stad-leaderboard runs=DIR[,DIR...] out=leaderboard.csv`` (or ``python -m stad.leaderboard``;
``--help`` lists every key=value option).
Records from different code revisions or settings are never averaged together: the revision
and every hyper-parameter that differs between records are part of a row's key. Runs that
failed (a ``failed.json`` without a ``record.json``) are listed apart, never averaged in.
``plot=`` draws one bar chart per dataset and metric (a bar group per method, one bar per category
and the mean; ``plot_groups=category`` transposes; error bars: std over seeds).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stad import leaderboard_pages
from stad.cli import Option, optional_path, parse_bool, parse_choice, parse_options, usage
from stad.errors import StadError
from stad.fileio import write_atomic
from stad.leaderboard_pages import KEYS, row_value
from stad.results import (
    FAILED_NAME,
    RECORD_KEYS,
    RECORD_NAME,
    UNHASHED_KEYS,
    config_hash,
    read_record,
)

if TYPE_CHECKING:  # matplotlib is imported only when plotting
    from matplotlib.figure import Figure

# Config keys that name the row already, or tell runs of one experiment apart without being a
# hyper-parameter (the seed is averaged over; paths say where, not what).
NOT_PARAMS = {
    "seed",
    "dataset.category",
    "dataset.root",
    "dataset.name",
    "method.name",
    "backbone.name",
    "setting.name",
    *UNHASHED_KEYS,
}
MEAN_CATEGORY = "mean"
PLOT_DPI = 100
PAPER_FILE = "paper_results.csv"

FAILED_COLUMNS = (
    "dataset",
    "category",
    "method",
    "backbone",
    "seed",
    "error",
    "reason",
    "run_dir",
    "created",
)


@dataclass
class Run:
    """One record, flattened for grouping."""

    path: Path
    record: dict[str, Any]
    config: dict[str, Any]  # dotted key → value
    key: str  # config hash

    @property
    def setting(self) -> str:
        """single (one model per category) or unified (one model for several)."""
        return str(self.record.get("setting") or "single")

    @property
    def revision(self) -> str:
        rev = self.record.get("git_revision")
        if not rev:
            return f"stad-{self.record['versions'].get('stad', '?')}"
        commit, _, dirty = str(rev).partition("-")
        return commit[:12] + (f"-{dirty}" if dirty else "")


@dataclass
class Row:
    """One leaderboard row: the runs of one experiment over seeds (or a dataset's mean)."""

    dataset: str
    category: str
    method: str
    backbone: str
    setting: str
    params: str
    revision: str
    runs: list[Run] = field(default_factory=list)
    values: dict[str, float | str] = field(default_factory=dict)


# -- reading ----------------------------------------------------------------------------------
def find_records(dirs: Sequence[str | Path]) -> list[Path]:
    """Every ``record.json`` under the directories (a record file may be named directly)."""
    paths: list[Path] = []
    for d in map(Path, dirs):
        if not d.exists():
            raise StadError(f"{d} does not exist; pass the output folder(s) of stad runs")
        paths += [d] if d.is_file() else sorted(d.rglob(RECORD_NAME))
    if not paths:
        raise StadError(
            f"no run records ({RECORD_NAME}) under {', '.join(map(str, dirs))}; run "
            "`python -m stad ...` first, or point to its output_root (default: outputs/)"
        )
    return paths


def load_runs(paths: Iterable[Path], skip_invalid: bool = False) -> list[Run]:
    """Read and check every record; a corrupt or partial one stops with all their names
    (or is left out with a warning when ``skip_invalid``)."""
    runs, bad = [], []
    for path in paths:
        try:
            record = read_record(path)
            missing = [k for k in RECORD_KEYS if k not in record]
            if missing:
                raise StadError(f"{path} is a partial record: it lacks {', '.join(missing)}")
        except StadError as err:
            bad.append(str(err))
            continue
        config = flatten(record["config"])
        runs.append(
            Run(path, record, config, record.get("config_hash") or config_hash(record["config"]))
        )
    if bad and not skip_invalid:
        raise StadError(
            f"{len(bad)} unusable record(s):\n  " + "\n  ".join(bad) + "\nFix: delete or "
            "re-run those runs, or pass skip_invalid=true to leave them out"
        )
    for message in bad:
        print(f"stad-leaderboard: warning: left out: {message}", file=sys.stderr)
    return runs


def drop_duplicates(runs: list[Run], keep_latest: bool = False) -> list[Run]:
    """Two records with the same config hash claim the same run: stop, or keep the newest."""
    by_key: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_key[run.key].append(run)
    clashes = {k: v for k, v in by_key.items() if len(v) > 1}
    if clashes and not keep_latest:
        listed = "\n  ".join(" and ".join(str(r.path) for r in group) for group in clashes.values())
        raise StadError(
            f"{len(clashes)} run(s) have more than one record (same config and seed):\n  "
            f"{listed}\nFix: remove the extra records, or pass keep_latest=true to use the newest"
        )
    kept = []
    for group in by_key.values():
        kept.append(max(group, key=lambda r: str(r.record.get("created", ""))))
        if len(group) > 1:
            print(
                f"stad-leaderboard: warning: {len(group)} records of one run; kept {kept[-1].path}",
                file=sys.stderr,
            )
    return kept


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b.c": value}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# -- failed runs ------------------------------------------------------------------------------
@dataclass
class Failure:
    """A run that stopped with an error (its ``failed.json``), for the list of failed runs."""

    path: Path
    info: dict[str, Any]

    @property
    def config_hash(self) -> str | None:
        return self.info.get("config_hash")

    def cell(self, col: str) -> Any:
        if col == "run_dir":
            return str(self.path.parent)
        value = self.info.get(col, "")
        return "" if value is None else value


def find_failures(dirs: Sequence[str | Path]) -> list[Failure]:
    """Every ``failed.json`` under the directories whose run has no record (a run retried with
    success after a failure keeps its old ``failed.json`` beside the new record)."""
    failures = []
    for d in map(Path, dirs):
        if not d.is_dir():
            continue
        for path in sorted(d.rglob(FAILED_NAME)):
            if (path.parent / RECORD_NAME).exists():
                continue
            try:
                info = json.loads(path.read_text())
                if not isinstance(info, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as err:
                info = {"error": "unreadable", "reason": f"cannot read {path}: {err}"}
            failures.append(Failure(path, info))
    return failures


def unfinished(failures: Sequence[Failure], runs: Sequence[Run]) -> list[Failure]:
    """The failures no record supersedes (same config hash: the run was retried elsewhere)."""
    done = {run.key for run in runs}
    return [f for f in failures if f.config_hash is None or f.config_hash not in done]


def failed_csv(failures: Sequence[Failure]) -> str:
    """The failed runs as CSV text, one row each (``FAILED_COLUMNS``)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FAILED_COLUMNS)
    for failure in failures:
        writer.writerow([failure.cell(c) for c in FAILED_COLUMNS])
    return out.getvalue()


def _failure_line(failure: Failure) -> str:
    what = "/".join(str(failure.cell(c)) for c in ("dataset", "category", "method", "backbone"))
    reason = str(failure.cell("reason")).strip().splitlines()
    return (
        f"{what} seed {failure.cell('seed')}: {failure.cell('error')}: "
        f"{reason[0] if reason else ''} ({failure.path.parent})"
    )


def failed_path(out: Path) -> Path:
    """Where the list of failed runs goes, beside the table: ``<stem>_failed.csv``."""
    return out.with_name(f"{out.stem}_failed.csv")


def report_failures(failures: Sequence[Failure], out: Path | None) -> None:
    """List the failed runs: in ``<out stem>_failed.csv`` with a line on stderr, or on stderr.

    A stale list from an earlier call is removed when nothing failed any more.
    """
    if out is None:
        if failures:
            lines = "\n  ".join(_failure_line(f) for f in failures)
            print(
                f"stad-leaderboard: {len(failures)} failed runs (not in the table):\n  {lines}",
                file=sys.stderr,
            )
        return
    path = failed_path(out)
    if failures:
        write_atomic(path, failed_csv(failures))
        print(
            f"stad-leaderboard: {len(failures)} failed runs (not in the table): see {path}",
            file=sys.stderr,
        )
    elif path.exists():
        path.unlink()
        print(f"stad-leaderboard: no failed runs; removed the old {path}", file=sys.stderr)


# -- grouping ---------------------------------------------------------------------------------
def swept_params(runs: Sequence[Run]) -> set[str]:
    """Config keys whose value differs between runs of the same dataset, category, method and
    backbone (so values that merely follow the category, like a cache key, are not params),
    other than keys that merely repeat the seed."""
    cells: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        r = run.record
        cells[(r["dataset"], r["category"], r["method"], r["backbone"], run.setting)].append(run)
    varying: set[str] = set()
    for group in cells.values():
        keys = set().union(*(run.config for run in group))
        for key in keys - NOT_PARAMS:
            if len({repr(run.config.get(key)) for run in group}) > 1:
                varying.add(key)
    return {key for key in varying if not _follows_seed(key, runs)}


def _follows_seed(key: str, runs: Sequence[Run]) -> bool:
    """A key set to the run's seed everywhere (e.g. ``method.seed: ${seed}``) is the seed."""
    return all(run.config.get(key) == run.config.get("seed") for run in runs if key in run.config)


def _params_text(run: Run, varying: set[str]) -> str:
    return " ".join(f"{k}={run.config[k]}" for k in sorted(varying) if k in run.config)


def group_rows(runs: Sequence[Run]) -> list[Row]:
    """One row per dataset, category, method, backbone, swept params and code revision."""
    varying = swept_params(runs)
    rows: dict[tuple, Row] = {}
    for run in runs:
        r = run.record
        key = (
            r["dataset"],
            str(r["category"]),
            r["method"],
            r["backbone"],
            run.setting,
            _params_text(run, varying),
            run.revision,
        )
        rows.setdefault(key, Row(*key)).runs.append(run)
    _warn_split_revisions(rows.values())
    return [rows[k] for k in sorted(rows)]


def _warn_split_revisions(rows: Iterable[Row]) -> None:
    revisions: dict[tuple, set[str]] = defaultdict(set)
    for row in rows:
        revisions[
            (row.dataset, row.category, row.method, row.backbone, row.setting, row.params)
        ].add(row.revision)
    for key, revs in revisions.items():
        if len(revs) > 1:
            print(
                f"stad-leaderboard: note: {'/'.join(filter(None, key))} has runs from "
                f"{len(revs)} code revisions; they stay in separate rows",
                file=sys.stderr,
            )


# -- numbers ----------------------------------------------------------------------------------
def metric_names(runs: Sequence[Run]) -> list[str]:
    """Every metric the records report (common ones first), without error bounds."""
    names = {m for run in runs for m in run.record["metrics"] if not m.endswith("_error_bound")}
    first = [m for m in ("image_auroc", "pixel_auroc", "pro", "pixel_ap") if m in names]
    return first + sorted(names - set(first))


def _metric(value: float | None) -> float:
    """A record's metric; an undefined one (null in the record) counts as NaN."""
    return math.nan if value is None else float(value)


def _mean_std(values: list[float]) -> tuple[float, float | str]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else ""


def summarise(row: Row, metrics: Sequence[str]) -> None:
    """Mean and std over the row's seeds of each metric, seeds, training and inference time."""
    for name in metrics:
        values = [
            _metric(r.record["metrics"][name]) for r in row.runs if name in r.record["metrics"]
        ]
        if values:
            row.values[name], row.values[f"{name}_std"] = _mean_std(values)
    row.values["n_seeds"] = len(row.runs)
    row.values["seeds"] = " ".join(str(s) for s in sorted(r.record["seed"] for r in row.runs))
    row.values["train_seconds"] = statistics.fmean(
        sum(r.record["train_seconds"].values()) for r in row.runs
    )
    row.values["inference_ms_per_image"] = statistics.fmean(
        float(r.record["inference_ms_per_image"]) for r in row.runs
    )
    for key in ("ms_per_image_batch1", "images_per_s_batch32"):
        timed = [float(r.record["inference"][key]) for r in row.runs if r.record.get("inference")]
        if timed:
            row.values[key] = statistics.fmean(timed)


def dataset_means(rows: Sequence[Row], metrics: Sequence[str]) -> list[Row]:
    """Per dataset, method, backbone, setting, params and revision: the mean over its
    categories (the two settings are never averaged together).

    The std is over seeds of the per-seed category mean, when every category has the same seeds.
    """
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        key = (row.dataset, row.method, row.backbone, row.setting, row.params, row.revision)
        groups[key].append(row)
    means = []
    for (dataset, method, backbone, setting, params, revision), members in sorted(groups.items()):
        mean = Row(dataset, MEAN_CATEGORY, method, backbone, setting, params, revision)
        mean.runs = [r for m in members for r in m.runs]
        same_seeds = len({m.values["seeds"] for m in members}) == 1
        for name in metrics:
            per_category = [float(m.values[name]) for m in members if name in m.values]
            if len(per_category) != len(members):
                continue
            mean.values[name] = statistics.fmean(per_category)
            mean.values[f"{name}_std"] = _seed_std(members, name) if same_seeds else ""
        mean.values["n_seeds"] = members[0].values["n_seeds"] if same_seeds else ""
        mean.values["seeds"] = members[0].values["seeds"] if same_seeds else "mixed"
        mean.values["n_categories"] = len(members)
        for name in ("train_seconds", "inference_ms_per_image"):
            mean.values[name] = statistics.fmean(float(m.values[name]) for m in members)
        for name in ("ms_per_image_batch1", "images_per_s_batch32"):
            if all(name in m.values for m in members):
                mean.values[name] = statistics.fmean(float(m.values[name]) for m in members)
        means.append(mean)
    return means


def _seed_std(members: Sequence[Row], name: str) -> float | str:
    by_seed: dict[int, list[float]] = defaultdict(list)
    for member in members:
        for run in member.runs:
            by_seed[run.record["seed"]].append(_metric(run.record["metrics"][name]))
    per_seed = [statistics.fmean(v) for v in by_seed.values()]
    return statistics.stdev(per_seed) if len(per_seed) > 1 else ""


# -- papers -----------------------------------------------------------------------------------
def paper_results(path: Path | None = None) -> list[dict[str, str]]:
    """The papers' reported numbers kept in the package (``paper_results.csv``, with sources)."""
    if path is None:
        text = resources.files("stad").joinpath(PAPER_FILE).read_text()
    else:
        text = Path(path).read_text()
    return list(csv.DictReader(io.StringIO(text)))


def _condition_holds(row: Row, condition: str) -> bool:
    if not condition:
        return True
    key, _, value = condition.partition("=")
    return all(str(run.config.get(key)) == value for run in row.runs)


def setting_differences(config: dict[str, Any]) -> list[str]:
    """Where a run's setting departs from its method's paper setting, read from its config:
    another backbone than ``method.paper_backbone``, another input size than
    ``method.image_size``, fewer epochs than a stage's (``trainer.max_epochs`` or
    ``trainer.max_steps`` caps); empty when it is the paper's setting."""
    out = []
    paper_backbone = config.get("method.paper_backbone")
    backbone = config.get("backbone.name")
    if paper_backbone and backbone and str(backbone) != str(paper_backbone):
        out.append(f"backbone {backbone} (paper {paper_backbone})")
    paper_size, size = config.get("method.image_size"), config.get("image_size")
    if paper_size is not None and size is not None and int(size) != int(paper_size):
        out.append(f"{size} px (paper {paper_size})")
    cap = config.get("trainer.max_epochs")
    for key, value in sorted(config.items()):
        stage_epochs = key.startswith("method.stages.") and key.endswith(".epochs")
        if stage_epochs and cap and int(cap) < int(value):
            out.append(f"{key.split('.')[2]} {cap} epochs (paper {value})")
    steps = config.get("trainer.max_steps")
    if steps not in (None, -1, "-1"):
        out.append(f"max_steps {steps}")
    return out


def paper_setting(paper: dict[str, str]) -> str:
    """The setting a paper row reports: unified when its condition says
    ``setting.name=unified`` (e.g. ADer's multi-class re-runs), else single."""
    return "unified" if paper.get("condition", "") == "setting.name=unified" else "single"


def add_paper(rows: Sequence[Row], metrics: Sequence[str], papers: Sequence[dict]) -> None:
    """``paper_<metric>``, ``diff_<metric>`` (ours − paper), the source and ``comparable``
    (``yes``, or how the runs' setting departs from the paper's) on matching rows; a row is
    compared with the paper numbers of its own setting only."""
    for row in rows:
        for paper in papers:
            if (
                (paper["dataset"], paper["category"], paper["method"])
                != (row.dataset, row.category, row.method)
                or paper_setting(paper) != row.setting
                or not _condition_holds(row, paper.get("condition", ""))
            ):
                continue
            for name in metrics:
                if paper.get(name) and name in row.values:
                    row.values[f"paper_{name}"] = float(paper[name])
                    row.values[f"diff_{name}"] = float(row.values[name]) - float(paper[name])
            row.values["paper_source"] = paper["source"]
            differences = sorted({d for run in row.runs for d in setting_differences(run.config)})
            row.values["comparable"] = "; ".join(differences) if differences else "yes"


# -- writing ----------------------------------------------------------------------------------
KEY_COLUMNS = KEYS


def columns(rows: Sequence[Row], metrics: Sequence[str], paper: bool) -> list[str]:
    """Key columns, then metric mean/std pairs, counts and times, then paper columns."""
    cols = list(KEY_COLUMNS)
    for name in metrics:
        cols += [name, f"{name}_std"]
    cols += ["n_seeds", "seeds", "n_categories", "train_seconds", "inference_ms_per_image"]
    cols += ["ms_per_image_batch1", "images_per_s_batch32"]
    if paper:
        for name in metrics:
            cols += [f"paper_{name}", f"diff_{name}"]
        cols += ["paper_source", "comparable"]
    present = {c for row in rows for c in row.values} | set(KEY_COLUMNS)
    return [c for c in cols if c in present]


def _cell(row: Row, col: str) -> Any:
    value = row_value(row, col)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.10g}"
    return value


def to_csv(rows: Sequence[Row], cols: Sequence[str]) -> str:
    """The table as CSV text."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow([_cell(row, c) for c in cols])
    return out.getvalue()


def to_markdown(rows: Sequence[Row], cols: Sequence[str], metrics: Sequence[str]) -> str:
    """The table as Markdown, each metric as ``mean ± std``."""
    shown = [c for c in cols if not c.endswith("_std") and c != "seeds"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells = []
        for col in shown:
            value = row_value(row, col)
            if col in metrics and value != "":
                std = row.values.get(f"{col}_std", "")
                text = f"{value:.4f}" + (f" ± {std:.4f}" if std != "" else "")
            elif isinstance(value, float):
                text = f"{value:.4g}"
            else:
                text = str(value)
            cells.append(text.replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- plots ----------------------------------------------------------------------------------
def _series_key(row: Row) -> tuple[str, str, str, str, str]:
    return (row.method, row.backbone, row.setting, row.params, row.revision)


def _series_labels(keys: Sequence[tuple[str, str, str, str, str]]) -> list[str]:
    """Method, plus backbone, setting, params and revision where the series differ in them."""
    varies = [len({k[i] for k in keys}) > 1 for i in range(5)]
    return [
        " ".join([key[0], *(str(key[i]) for i in (1, 2, 3, 4) if varies[i] and key[i])])
        for key in keys
    ]


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def plot_figure(rows: Sequence[Row], metric: str, dataset: str, group_by: str = "method") -> Figure:
    """Bar chart of one metric on one dataset, methods × categories: by default a group of bars
    per method (and backbone, params, revision where they differ) with one bar per category and
    the dataset mean; ``group_by="category"`` transposes it. Error bars = std over seeds where
    there are several.

    Args:
        rows: leaderboard rows (category and mean rows, as :func:`collect` returns).
        metric: the metric to draw, e.g. ``image_auroc``.
        dataset: the dataset whose rows to draw.
        group_by: ``"method"`` or ``"category"``: what one group of bars is.

    Returns:
        The figure (on an Agg canvas): one ``BarContainer`` per series, one bar per group.
    """
    # matplotlib alone, on demand: the leaderboard never loads torch (stad.report does).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if group_by not in ("method", "category"):
        raise StadError(f"plot_groups must be method or category, got {group_by!r}")
    mine = [r for r in rows if r.dataset == dataset]
    categories = sorted({r.category for r in mine if r.category != MEAN_CATEGORY})
    categories += [MEAN_CATEGORY] if any(r.category == MEAN_CATEGORY for r in mine) else []
    keys = sorted({_series_key(r) for r in mine})
    cells = {(r.category, _series_key(r)): r for r in mine}
    by_method = group_by == "method"
    groups, series = (keys, categories) if by_method else (categories, keys)
    group_labels = _series_labels(keys) if by_method else categories
    series_labels = categories if by_method else _series_labels(keys)

    def cell(group: Any, item: Any) -> Row | None:
        return cells.get((item, group) if by_method else (group, item))

    width = 0.8 / max(len(series), 1)
    size = (min(18.0, max(5.0, 1.5 + len(groups) * (0.3 + 0.22 * len(series)))), 4.0)
    fig = Figure(figsize=size, dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    spans, with_errors = [], False
    for i, (item, label) in enumerate(zip(series, series_labels, strict=True)):
        found = [cell(g, item) for g in groups]
        heights = [_number(r.values.get(metric)) if r else math.nan for r in found]
        errors = [_number(r.values.get(f"{metric}_std")) if r else math.nan for r in found]
        has_errors = any(math.isfinite(e) for e in errors)
        with_errors |= has_errors
        positions = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(
            positions,
            [h if math.isfinite(h) else 0.0 for h in heights],
            width,
            yerr=[e if math.isfinite(e) else 0.0 for e in errors] if has_errors else None,
            capsize=2 if has_errors else 0,
            label=label,
            color="#444" if item == MEAN_CATEGORY else f"C{i % 10}",
        )
        spans += [
            (h - (e if math.isfinite(e) else 0), h + (e if math.isfinite(e) else 0))
            for h, e in zip(heights, errors, strict=True)
            if math.isfinite(h)
        ]
    _y_limits(ax, spans)
    if not by_method and MEAN_CATEGORY in groups and len(groups) > 1:
        ax.axvline(len(groups) - 1.5, color="#999", linestyle=":", linewidth=1)
    ax.set_xticks(
        range(len(groups)),
        group_labels,
        rotation=45 if len(groups) > 6 else 0,
        ha="right" if len(groups) > 6 else "center",
    )
    ax.set_ylabel(metric)
    note = " (error bars: std over seeds)" if with_errors else ""
    ax.set_title(f"{dataset}: {metric}{note}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(len(series), 6), fontsize=8)
    return fig


def _y_limits(ax: Any, spans: Sequence[tuple[float, float]]) -> None:
    """Fit the axis to the bars and their error bars: most metrics sit near 1, where a 0
    baseline would hide every difference (the tick labels show where the axis starts)."""
    if not spans:
        return
    low, high = min(s[0] for s in spans), max(s[1] for s in spans)
    pad = max(0.02, 0.08 * (high - low))
    bottom = math.floor((low - pad) * 20) / 20
    if low >= 0:
        bottom = max(0.0, bottom)
    top = min(high + pad, 1.02) if high <= 1.0 else high + pad
    ax.set_ylim(bottom, top)


def write_plots(
    rows: Sequence[Row], metrics: Sequence[str], out_dir: Path, group_by: str = "method"
) -> list[Path]:
    """One PNG per dataset and metric, ``<dataset>_<metric>.png``, each written atomically."""
    paths = []
    for dataset in sorted({r.dataset for r in rows}):
        for metric in metrics:
            if not any(metric in r.values for r in rows if r.dataset == dataset):
                continue
            path = out_dir / f"{_file_part(dataset)}_{_file_part(metric)}.png"
            png = io.BytesIO()
            figure = plot_figure(rows, metric, dataset, group_by)
            figure.savefig(png, format="png", dpi=PLOT_DPI)
            write_atomic(path, png.getvalue())
            paths.append(path)
    return paths


def _file_part(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# -- command ----------------------------------------------------------------------------------
@dataclass
class Board:
    """The leaderboard before formatting: rows (each dataset's categories, then its means),
    metric names, and the failed runs it leaves out."""

    rows: list[Row]
    metrics: list[str]
    failures: list[Failure]


def per_defect_runs(runs: Sequence[Run]) -> list[Run]:
    """One pseudo-run per defect type of each run (category ``<category>/<defect>``, the
    type's metrics from the record's ``per_defect``); runs without them are left out, said once."""
    out: list[Run] = []
    without = 0
    for run in runs:
        per_defect = run.record.get("per_defect") or {}
        without += not per_defect
        for defect, values in sorted(per_defect.items()):
            metrics = {k: v for k, v in values.items() if k != "undefined"}
            record = {**run.record, "category": f"{run.record['category']}/{defect}"}
            out.append(Run(run.path, {**record, "metrics": metrics}, run.config, run.key))
    if without:
        print(
            f"stad-leaderboard: note: {without} run(s) have no per-defect results (one defect "
            "type, or metrics.per_defect=false); by=defect leaves them out",
            file=sys.stderr,
        )
    if not out:
        raise StadError("by=defect: no record holds per-defect results")
    return out


def collect(
    dirs: Sequence[str | Path],
    paper: bool = False,
    keep_latest: bool = False,
    skip_invalid: bool = False,
    by: str = "category",
) -> Board:
    """Read every record under ``dirs`` into leaderboard rows (one per category, or with
    ``by="defect"`` one per category and defect type); list the failed runs apart."""
    failures = find_failures(dirs)
    try:
        runs = drop_duplicates(load_runs(find_records(dirs), skip_invalid), keep_latest)
        if not runs:
            raise StadError("no usable run records left; see the warnings above")
    except StadError as err:
        if failures:  # say why the folders have no finished runs
            lines = "\n  ".join(_failure_line(f) for f in failures)
            raise StadError(f"{err}\n{len(failures)} runs failed:\n  {lines}") from err
        raise
    if by == "defect":
        runs = per_defect_runs(runs)
    metrics = metric_names(runs)
    rows = group_rows(runs)
    for row in rows:
        summarise(row, metrics)
    table = _interleave(rows, dataset_means(rows, metrics))
    if paper:
        add_paper(table, metrics, paper_results())
    return Board(table, metrics, unfinished(failures, runs))


def render(board: Board, paper: bool = False, fmt: str = "csv", base: Path | None = None) -> str:
    """The board as CSV, Markdown, HTML (links relative to ``base``, the page's folder) or
    LaTeX text."""
    if fmt == "html":
        return leaderboard_pages.to_html(board.rows, board.metrics, board.failures, base, paper)
    if fmt == "tex":
        tables = leaderboard_pages.latex_tables(board.rows, board.metrics, paper)
        return "\n".join(tables.values())
    cols = columns(board.rows, board.metrics, paper)
    if fmt == "md":
        return to_markdown(board.rows, cols, board.metrics)
    return to_csv(board.rows, cols)


def build_table(
    dirs: Sequence[str | Path],
    paper: bool = False,
    keep_latest: bool = False,
    skip_invalid: bool = False,
    fmt: str = "csv",
) -> str:
    """The leaderboard of every record under ``dirs`` as CSV or Markdown text."""
    return render(collect(dirs, paper, keep_latest, skip_invalid), paper, fmt)


def _interleave(rows: Sequence[Row], means: Sequence[Row]) -> list[Row]:
    """Each dataset's category rows, then its mean rows."""
    out: list[Row] = []
    for dataset in sorted({r.dataset for r in rows}):
        out += [r for r in rows if r.dataset == dataset]
        out += [m for m in means if m.dataset == dataset]
    return out


def parse_paths(text: str) -> list[Path]:
    """Comma-separated folders."""
    paths = [Path(t.strip()).expanduser() for t in text.split(",") if t.strip()]
    if not paths:
        raise ValueError("give at least one folder")
    return paths


def parse_plot(text: str) -> bool | Path | None:
    """``true`` (beside ``out``), ``false``/``null`` (no plots) or a folder."""
    value = text.strip().lower()
    if value in ("", "false", "no", "0", "off", "none", "null"):
        return None
    if value in ("true", "yes", "1", "on"):
        return True
    return Path(text).expanduser()


LEADERBOARD_OPTIONS: dict[str, Option] = {
    "runs": Option(
        parse_paths, None, "folders holding runs, comma-separated (searched recursively)"
    ),
    "out": Option(optional_path, None, "output file (default: print the table)"),
    "format": Option(
        parse_choice("csv", "md", "html", "tex"),
        "csv",
        "table format: csv, md, html (a sortable page linking each run's report) or tex "
        "(booktabs, categories x methods in percent; with out=<file>.tex one file per dataset "
        "and metric, <stem>_<dataset>_<metric>.tex)",
    ),
    "paper": Option(parse_bool, False, "add the papers' numbers and the difference"),
    "keep_latest": Option(parse_bool, False, "of several records of one run, use the newest"),
    "skip_invalid": Option(parse_bool, False, "leave out corrupt or partial records"),
    "plot": Option(
        parse_plot,
        None,
        "one PNG bar chart per dataset and metric: a folder, or true for <out stem>_plots/ "
        "beside out",
    ),
    "by": Option(
        parse_choice("category", "defect"),
        "category",
        "one row per category, or per category and defect type (record.json per_defect; the "
        "dataset mean is then over defect types)",
    ),
    "plot_groups": Option(
        parse_choice("method", "category"),
        "method",
        "one group of bars per method (bars: categories and mean) or per category",
    ),
}
SUMMARY = "Turn stad run records into a leaderboard table (mean and std over seeds)."
COMMAND = "stad.leaderboard"


def _plot_dir(opts: dict[str, Any]) -> Path | None:
    if opts["plot"] is True:
        if opts["out"] is None:
            raise StadError(
                "plot=true needs out=<file> (or plot=<folder>) when the table is printed"
            )
        return opts["out"].with_name(f"{opts['out'].stem}_plots")
    return opts["plot"]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``stad-leaderboard runs=<dir> [key=value ...]``); returns the
    exit status (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage(COMMAND, LEADERBOARD_OPTIONS, SUMMARY))
        return 0
    try:
        opts = parse_options(argv, LEADERBOARD_OPTIONS, COMMAND, required=("runs",))
        plot_dir = _plot_dir(opts)
        board = collect(
            opts["runs"], opts["paper"], opts["keep_latest"], opts["skip_invalid"], opts["by"]
        )
        base = opts["out"].parent if opts["out"] is not None else None
        # LaTeX into a file: one file per dataset and metric, as papers print them
        split_tex = opts["format"] == "tex" and opts["out"] is not None
        text = "" if split_tex else render(board, opts["paper"], opts["format"], base)
    except StadError as err:
        print(f"stad-leaderboard: error: {err}", file=sys.stderr)
        return 2
    out = opts["out"]
    if out is None:
        sys.stdout.write(text)
    elif split_tex:
        tables = leaderboard_pages.latex_tables(board.rows, board.metrics, opts["paper"])
        for name, table in tables.items():
            path = out.with_name(f"{out.stem}_{name}{out.suffix or '.tex'}")
            write_atomic(path, table)
            print(f"stad-leaderboard: wrote {path}", file=sys.stderr)
    else:
        write_atomic(out, text)
        print(f"stad-leaderboard: wrote {out}", file=sys.stderr)
    report_failures(board.failures, out)
    if plot_dir is not None:
        paths = write_plots(board.rows, board.metrics, plot_dir, opts["plot_groups"])
        print(f"stad-leaderboard: wrote {len(paths)} plots to {plot_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
