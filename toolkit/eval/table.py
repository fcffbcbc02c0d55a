# The results table papers print: one row per model, LFW .. MFR-style columns, as markdown and JSON.
"""Columns and where each number comes from (all in percent, 2 decimals in markdown): every registered
benchmark kind declares its columns and fills them from its report entries (`Benchmark.table_cells`,
toolkit.eval.benchmark); the built-in ones:

| column | source |
|---|---|
| LFW, CFP-FP, AgeDB-30 | mean 10-fold accuracy of the .bin set named lfw / cfp_fp / agedb_30 |
| IJB-B 1e-4 | IJB-B 1:1 TAR at FAR 1e-4 |
| IJB-C 1e-5, IJB-C 1e-4 | IJB-C 1:1 TAR at FAR 1e-5 and 1e-4 |
| MFR-style 1e-6 | all-to-all 1:1 TAR at FAR 1e-6 |

A column whose benchmark was not run (or whose FAR the set is too small for) shows '-'.
"""

from __future__ import annotations

import json
from pathlib import Path

from toolkit.errors import FaceCLError
from toolkit.eval.benchmark import benchmark_class, table_columns
from toolkit.eval.outputs import find_report

def table_row(report: dict) -> dict:
    """{column: percent or None} of one evaluation report (entries of kinds not registered here are left out)."""
    row: dict = {c: None for c in table_columns()}
    for name, result in report.get("benchmarks", {}).items():
        kind = benchmark_class(result.get("kind"))
        if kind is None:
            continue
        cells = kind.table_cells(name, result)
        undeclared = set(cells) - set(kind.columns)
        if undeclared:
            raise ValueError(f"benchmark kind {kind.kind!r} fills columns it does not declare: {sorted(undeclared)}")
        row.update(cells)
    return row


def format_markdown(rows: dict[str, dict]) -> str:
    """Markdown table, one row per model name."""
    columns = table_columns()
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, row in rows.items():
        cells = ["-" if row.get(c) is None else f"{row[c]:.2f}" for c in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(paths: list[str | Path]) -> tuple[str, dict]:
    """(markdown, {model: row}) of several evaluation reports, side by side; a model evaluated more than once is
    labelled with each evaluation's folder."""
    reports = [(report_path, read_report(report_path)) for report_path in map(find_report, paths)]
    names = [report.get("model") or report_path.parent.name for report_path, report in reports]
    rows: dict[str, dict] = {}
    for name, (report_path, report) in zip(names, reports):
        label = f"{name} ({report_path.parent})" if names.count(name) > 1 else name
        rows[label] = table_row(report)
    return format_markdown(rows), rows


def read_report(report_path: Path) -> dict:
    """One evaluation.json; a file that is not JSON is one FaceCLError line."""
    try:
        return json.loads(report_path.read_text())
    except json.JSONDecodeError as exc:
        raise FaceCLError(f"{report_path} is not JSON ({exc})") from None
