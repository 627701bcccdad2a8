"""Leaderboards: run records → one table row per dataset, category, method, backbone and swept
hyper-parameters, with mean and std over seeds, per-dataset mean rows and the papers' numbers.

``stad-leaderboard DIR... --out leaderboard.csv`` (or ``python -m stad.leaderboard``).
Records from different code revisions or settings are never averaged together: the revision
and every hyper-parameter that differs between records are part of a row's key.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from stad.errors import StadError
from stad.results import RECORD_KEYS, RECORD_NAME, UNHASHED_KEYS, config_hash, read_record

# Config keys that name the row already, or tell runs of one experiment apart without being a
# hyper-parameter (the seed is averaged over; paths say where, not what).
NOT_PARAMS = {
    "seed",
    "dataset.category",
    "dataset.root",
    "dataset.name",
    "method.name",
    "backbone.name",
    *UNHASHED_KEYS,
}
MEAN_CATEGORY = "mean"
PAPER_FILE = "paper_results.csv"


@dataclass
class Run:
    """One record, flattened for grouping."""

    path: Path
    record: dict[str, Any]
    config: dict[str, Any]  # dotted key → value
    key: str  # config hash

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
            "re-run those runs, or pass --skip-invalid to leave them out"
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
            f"{listed}\nFix: remove the extra records, or pass --keep-latest to use the newest"
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


# -- grouping ---------------------------------------------------------------------------------
def swept_params(runs: Sequence[Run]) -> set[str]:
    """Config keys whose value differs between runs of the same dataset, category, method and
    backbone (so values that merely follow the category, like a cache key, are not params),
    other than keys that merely repeat the seed."""
    cells: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        r = run.record
        cells[(r["dataset"], r["category"], r["method"], r["backbone"])].append(run)
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
            _params_text(run, varying),
            run.revision,
        )
        rows.setdefault(key, Row(*key)).runs.append(run)
    _warn_split_revisions(rows.values())
    return [rows[k] for k in sorted(rows)]


def _warn_split_revisions(rows: Iterable[Row]) -> None:
    revisions: dict[tuple, set[str]] = defaultdict(set)
    for row in rows:
        revisions[(row.dataset, row.category, row.method, row.backbone, row.params)].add(
            row.revision
        )
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
    first = [m for m in ("image_auroc", "pixel_auroc", "pro") if m in names]
    return first + sorted(names - set(first))


def _mean_std(values: list[float]) -> tuple[float, float | str]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else ""


def summarise(row: Row, metrics: Sequence[str]) -> None:
    """Mean and std over the row's seeds of each metric, seeds, training and inference time."""
    for name in metrics:
        values = [float(r.record["metrics"][name]) for r in row.runs if name in r.record["metrics"]]
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
    """Per dataset, method, backbone, params and revision: the mean over its categories.

    The std is over seeds of the per-seed category mean, when every category has the same seeds.
    """
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        groups[(row.dataset, row.method, row.backbone, row.params, row.revision)].append(row)
    means = []
    for (dataset, method, backbone, params, revision), members in sorted(groups.items()):
        mean = Row(dataset, MEAN_CATEGORY, method, backbone, params, revision)
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
            by_seed[run.record["seed"]].append(float(run.record["metrics"][name]))
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


def add_paper(rows: Sequence[Row], metrics: Sequence[str], papers: Sequence[dict]) -> None:
    """``paper_<metric>``, ``diff_<metric>`` (ours − paper) and the source on matching rows."""
    for row in rows:
        for paper in papers:
            if (paper["dataset"], paper["category"], paper["method"]) != (
                row.dataset,
                row.category,
                row.method,
            ) or not _condition_holds(row, paper.get("condition", "")):
                continue
            for name in metrics:
                if paper.get(name) and name in row.values:
                    row.values[f"paper_{name}"] = float(paper[name])
                    row.values[f"diff_{name}"] = float(row.values[name]) - float(paper[name])
            row.values["paper_source"] = paper["source"]


# -- writing ----------------------------------------------------------------------------------
KEY_COLUMNS = ("dataset", "category", "method", "backbone", "params", "revision")


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
        cols.append("paper_source")
    present = {c for row in rows for c in row.values} | set(KEY_COLUMNS)
    return [c for c in cols if c in present]


def _cell(row: Row, col: str) -> Any:
    value = getattr(row, col) if col in KEY_COLUMNS else row.values.get(col, "")
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
            value = row.values.get(col, "") if col not in KEY_COLUMNS else getattr(row, col)
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


def write_text_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the complete new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- command ----------------------------------------------------------------------------------
def build_table(
    dirs: Sequence[str | Path],
    paper: bool = False,
    keep_latest: bool = False,
    skip_invalid: bool = False,
    fmt: str = "csv",
) -> str:
    """The leaderboard of every record under ``dirs`` as CSV or Markdown text."""
    runs = drop_duplicates(load_runs(find_records(dirs), skip_invalid), keep_latest)
    if not runs:
        raise StadError("no usable run records left; see the warnings above")
    metrics = metric_names(runs)
    rows = group_rows(runs)
    for row in rows:
        summarise(row, metrics)
    table = _interleave(rows, dataset_means(rows, metrics))
    if paper:
        add_paper(table, metrics, paper_results())
    cols = columns(table, metrics, paper)
    return to_markdown(table, cols, metrics) if fmt == "md" else to_csv(table, cols)


def _interleave(rows: Sequence[Row], means: Sequence[Row]) -> list[Row]:
    """Each dataset's category rows, then its mean rows."""
    out: list[Row] = []
    for dataset in sorted({r.dataset for r in rows}):
        out += [r for r in rows if r.dataset == dataset]
        out += [m for m in means if m.dataset == dataset]
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stad-leaderboard",
        description="Turn stad run records into a leaderboard table (mean and std over seeds).",
    )
    p.add_argument("dirs", nargs="+", help="folders holding runs (searched recursively)")
    p.add_argument("--out", type=Path, help="output file (default: print)")
    p.add_argument("--format", choices=("csv", "md"), default="csv")
    p.add_argument("--paper", action="store_true", help="add the papers' numbers and the diff")
    p.add_argument(
        "--keep-latest", action="store_true", help="of several records of one run, use the newest"
    )
    p.add_argument(
        "--skip-invalid", action="store_true", help="leave out corrupt or partial records"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on bad input)."""
    args = _parser().parse_args(argv)
    try:
        text = build_table(args.dirs, args.paper, args.keep_latest, args.skip_invalid, args.format)
    except StadError as err:
        print(f"stad-leaderboard: error: {err}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_text_atomic(args.out, text)
        print(f"stad-leaderboard: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
