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

KEYS = ("dataset", "category", "method", "backbone", "setting", "params", "revision")
TIMES = ("n_seeds", "train_seconds", "inference_ms_per_image")

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
td.key, th.key { text-align: left; }
tr.mean td { font-weight: 600; background: #fafafa; }
td.std { color: #888; font-size: 90%; }
.note { color: #666; }
"""
# Click a header to sort by it (numbers numerically, empty cells last); no external script.
_SORT = """
document.querySelectorAll('th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
  const key = r => { const t = r.cells[col].dataset.v ?? r.cells[col].textContent;
    const n = parseFloat(t); return isNaN(n) ? t : n; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    if (x === '' || y === '') return (x === '') - (y === '');
    return (x > y ? 1 : x < y ? -1 : 0) * dir; }).forEach(r => body.appendChild(r));
}));
"""


def _value(row: Row, col: str) -> Any:
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
    """A self-contained page: one row per category (and each dataset's means), metrics as
    mean ± std over seeds, links to each run's report.html, the failed runs below."""
    cols = [*KEYS, *metrics, *TIMES]
    if paper:
        cols += [f"paper_{m}" for m in metrics] + ["paper_source", "comparable"]
    present = {c for r in rows for c in r.values} | set(KEYS)
    cols = [c for c in cols if c in present]
    head = "".join(
        f'<th class="{"key" if c in KEYS or c in ("paper_source", "comparable") else ""}">'
        f"{html.escape(c)}</th>"
        for c in cols
    )
    body = "\n".join(_row_html(r, cols, metrics, base) for r in rows)
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
        f'<table><thead><tr>{head}<th class="key">reports</th></tr></thead>\n<tbody>\n{body}'
        f"\n</tbody></table>\n{failed}\n<script>{_SORT}</script></body></html>\n"
    )


def _row_html(row: Row, cols: Sequence[str], metrics: Sequence[str], base: Path | None) -> str:
    cells = []
    for col in cols:
        value = _value(row, col)
        if col in metrics and value != "":
            std = row.values.get(f"{col}_std", "")
            shown = _number(value) + (f' <span class="std">± {std:.4f}</span>' if std != "" else "")
            cells.append(f'<td data-v="{value}">{shown}</td>')
        elif col in KEYS or col in ("paper_source", "comparable"):
            cells.append(f'<td class="key">{html.escape(str(value))}</td>')
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


def to_latex(rows: Sequence[Row], metrics: Sequence[str]) -> str:
    """A booktabs table: one row per dataset, category, method, backbone and setting (the key
    columns that vary), metrics in percent with one decimal (± std over seeds where there are
    several), a rule before each dataset's means."""
    keys = [k for k in KEYS[:5] if len({getattr(r, k) for r in rows}) > 1 or k == "category"]
    names = {"image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC", "pro": "PRO", "pixel_ap": "P-AP"}
    header = [*(k.capitalize() for k in keys), *(names.get(m, m) for m in metrics)]
    lines = [
        "% stad-leaderboard format=tex (needs \\usepackage{booktabs})",
        "\\begin{tabular}{" + "l" * len(keys) + "r" * len(metrics) + "}",
        "\\toprule",
        " & ".join(tex_escape(h) for h in header) + " \\\\",
        "\\midrule",
    ]
    previous_mean = False
    for row in rows:
        is_mean = row.category == "mean"
        if is_mean != previous_mean and lines[-1] != "\\midrule":
            lines.append("\\midrule")
        previous_mean = is_mean
        cells = [tex_escape(str(getattr(row, k))) for k in keys]
        for name in metrics:
            value, std = row.values.get(name, ""), row.values.get(f"{name}_std", "")
            if value == "" or not isinstance(value, float):
                cells.append("--")
                continue
            text = f"{100 * value:.1f}" + (f" $\\pm$ {100 * std:.1f}" if std != "" else "")
            cells.append(f"\\textbf{{{text}}}" if is_mean else text)
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"
