"""The leaderboard as a page a team opens (HTML: sortable, each row linked to its runs' reports)
and as a LaTeX table for a paper (booktabs, metrics in percent). ``stad-leaderboard
format=html|tex`` (stad.leaderboard builds the rows)."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stad.leaderboard import Failure, Row

# The columns that name a row (Row attributes); every other column is one of its values.
KEYS = ("dataset", "category", "method", "backbone", "setting", "params", "revision")
TIMES = ("n_seeds", "train_seconds", "inference_ms_per_image")

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
td.key, th.key { text-align: left; }
tr.mean td { font-weight: 600; background: #fafafa; }
td.std, span.std { color: #888; font-size: 90%; }
td.better { color: #1a7f37; } td.worse { color: #c62828; }
.note { color: #666; }
"""
# Click a header to sort by it (numbers numerically, empty cells last; again: the other way);
# no external script.
_SORT = """
function sortBy(th) {
  const col = th.cellIndex, body = th.closest('table').tBodies[0];
  const dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
  const key = r => { const c = r.cells[col], t = c.dataset.v ?? c.textContent;
    const n = parseFloat(t); return isNaN(n) ? t : n; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    if (x === '' || y === '') return (x === '') - (y === '');
    return (x > y ? 1 : x < y ? -1 : 0) * dir; }).forEach(r => body.appendChild(r));
}
document.querySelectorAll('th').forEach(th => th.addEventListener('click', () => sortBy(th)));
// board.html#sort=<column>: every table sorted by it on load (links, tests)
const wanted = decodeURIComponent(location.hash.replace(/^#sort=/, ''));
if (location.hash.startsWith('#sort=')) document.querySelectorAll('th').forEach(th => {
  if (th.textContent === wanted) sortBy(th); });
"""


def row_value(row: Row, col: str) -> Any:
    """A row's entry in a column: a key attribute, else its value ("" when it has none)."""
    return getattr(row, col) if col in KEYS else row.values.get(col, "")


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def report_links(row: Row, base: Path | None) -> list[tuple[str, str]]:
    """(seed, link) to the report of each run of a category row (relative to ``base``, the
    page's folder; absolute when the page is printed)."""
    links = []
    for run in sorted(row.runs, key=lambda r: r.record.get("seed", 0)):
        report = run.record.get("report")
        if not report:
            continue
        target = (run.path.parent / str(report)).resolve()
        href = os.path.relpath(target, base.resolve()) if base is not None else target.as_uri()
        links.append((str(run.record.get("seed", "?")), href))
    return links


def to_html(
    rows: Sequence[Row],
    metrics: Sequence[str],
    failures: Sequence[Failure] = (),
    base: Path | None = None,
    paper: bool = False,
) -> str:
    """A self-contained page: one sortable table per dataset and setting, one row per category
    (and the dataset's means), metrics as mean ± std over seeds, paper values and deltas
    (coloured) with ``paper``, links to each run's report.html, the failed runs below."""
    cols = [*KEYS, *metrics, *TIMES]
    if paper:
        cols += [c for m in metrics for c in (f"paper_{m}", f"diff_{m}")]
        cols += ["paper_source", "comparable"]
    present = {c for r in rows for c in r.values} | set(KEYS)
    cols = [c for c in cols if c in present]
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.dataset, row.setting), []).append(row)
    tables = "\n".join(
        f"<h2>{html.escape(dataset)} · {html.escape(setting)}</h2>\n"
        + _table_html(members, cols, metrics, base)
        for (dataset, setting), members in groups.items()
    )
    failed = ""
    if failures:
        items = "".join(
            f"<li>{html.escape(str(f.cell('dataset')))}/{html.escape(str(f.cell('category')))} "
            f"{html.escape(str(f.cell('method')))} seed {html.escape(str(f.cell('seed')))}: "
            f"{html.escape(str(f.cell('reason')))} ({html.escape(str(f.cell('run_dir')))})</li>"
            for f in failures
        )
        failed = f"<h2>Failed runs ({len(failures)})</h2><ul>{items}</ul>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>stad leaderboard</title><style>{_STYLE}</style></head><body>\n"
        '<h1>stad leaderboard</h1>\n<p class="note">Metrics: mean over seeds (± std); '
        "<i>mean</i> rows average a dataset's categories (the two settings never mixed). "
        "Click a column to sort; <i>reports</i> opens each run's report.html.</p>\n"
        f"{tables}\n{failed}\n<script>{_SORT}</script></body></html>\n"
    )


def _table_html(
    rows: Sequence[Row], cols: Sequence[str], metrics: Sequence[str], base: Path | None
) -> str:
    head = "".join(
        f'<th class="{"key" if c in KEYS or c in _TEXT else ""}">{html.escape(c)}</th>'
        for c in cols
    )
    body = "\n".join(_row_html(r, cols, metrics, base) for r in rows)
    return (
        f'<table><thead><tr>{head}<th class="key">reports</th></tr></thead>\n'
        f"<tbody>\n{body}\n</tbody></table>"
    )


_TEXT = ("paper_source", "comparable")


def _row_html(row: Row, cols: Sequence[str], metrics: Sequence[str], base: Path | None) -> str:
    cells = []
    for col in cols:
        value = row_value(row, col)
        if col in metrics and value != "":
            std = row.values.get(f"{col}_std", "")
            shown = _number(value) + (f' <span class="std">± {std:.4f}</span>' if std != "" else "")
            cells.append(f'<td data-v="{value}">{shown}</td>')
        elif col in KEYS or col in _TEXT:
            cells.append(f'<td class="key">{html.escape(str(value))}</td>')
        elif col.startswith("diff_") and isinstance(value, float):
            tone = "better" if value >= 0 else "worse"
            cells.append(f'<td class="{tone}" data-v="{value}">{value:+.4f}</td>')
        else:
            digits = 1 if col in TIMES else 4
            cells.append(f"<td>{_number(value, digits)}</td>")
    links = ""
    if row.category != "mean":
        links = " ".join(
            f'<a href="{html.escape(href)}">seed {html.escape(seed)}</a>'
            for seed, href in report_links(row, base)
        )
    kind = ' class="mean"' if row.category == "mean" else ""
    return f'<tr{kind}>{"".join(cells)}<td class="key">{links}</td></tr>'


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}  # fmt: skip


def tex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def _series(row: Row, varying: Sequence[str]) -> str:
    """A table column's name: the method, plus backbone / setting / params where they vary."""
    return " ".join([row.method, *(str(getattr(row, k)) for k in varying if getattr(row, k))])


def latex_tables(
    rows: Sequence[Row], metrics: Sequence[str], paper: bool = False
) -> dict[str, str]:
    """One booktabs table per dataset and metric, as papers print them: a row per category and
    the mean, a column per method (backbone, setting and params named where they vary), values
    in percent (± std over seeds where there are several), the best of our runs in each row in
    bold, and
    with ``paper`` the paper's value beside each method where one is known. Keyed
    ``<dataset>_<metric>``."""
    varying = [
        k for k in ("backbone", "setting", "params") if len({getattr(r, k) for r in rows}) > 1
    ]
    tables = {}
    for dataset in dict.fromkeys(r.dataset for r in rows):
        mine = [r for r in rows if r.dataset == dataset]
        series = list(dict.fromkeys(_series(r, varying) for r in mine))
        categories = list(dict.fromkeys(r.category for r in mine if r.category != "mean"))
        if any(r.category == "mean" for r in mine):
            categories.append("mean")
        cells = {(r.category, _series(r, varying)): r for r in mine}
        for metric in metrics:
            if not any(metric in r.values for r in mine):
                continue
            tables[f"{dataset}_{metric}"] = _latex_table(
                dataset, metric, categories, series, cells, paper
            )
    return tables


def _latex_table(
    dataset: str,
    metric: str,
    categories: Sequence[str],
    series: Sequence[str],
    cells: dict[tuple[str, str], Row],
    paper: bool,
) -> str:
    names = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pro": "PRO",
             "pixel_ap": "pixel AP"}  # fmt: skip
    columns = [(s, "ours") for s in series]
    if paper:
        columns = [(s, kind) for s in series for kind in ("ours", "paper")]
    header = ["Category"] + [s if kind == "ours" else f"{s} (paper)" for s, kind in columns]
    lines = [
        f"% stad-leaderboard format=tex: {dataset}, {names.get(metric, metric)} (%)",
        "% \\usepackage{booktabs}",
        "\\begin{tabular}{l" + "r" * len(columns) + "}",
        "\\toprule",
        " & ".join(tex_escape(h) for h in header) + " \\\\",
        "\\midrule",
    ]
    for category in categories:
        if category == "mean":
            lines.append("\\midrule")
        values = []
        for name, kind in columns:
            row = cells.get((category, name))
            key = metric if kind == "ours" else f"paper_{metric}"
            value = row.values.get(key, "") if row is not None else ""
            std = row.values.get(f"{metric}_std", "") if row is not None and kind == "ours" else ""
            values.append((value, std))
        # the best of our runs in bold (the paper's columns are references)
        ours = [v for (v, _), (_, kind) in zip(values, columns, strict=True) if kind == "ours"]
        best = max((v for v in ours if isinstance(v, float)), default=None)
        out = [tex_escape(category.replace("_", " ") if category != "mean" else "Mean")]
        for (value, std), (_, kind) in zip(values, columns, strict=True):
            if not isinstance(value, float):
                out.append("--")
                continue
            text = f"{100 * value:.1f}" + (
                f" $\\pm$ {100 * std:.1f}" if isinstance(std, float) else ""
            )
            bold = kind == "ours" and best is not None and value == best
            out.append(f"\\textbf{{{text}}}" if bold else text)
        lines.append(" & ".join(out) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"
