# The results table: one row per evaluation, a column per metric the evaluations measured, '-' with its footnote.
"""Columns come from the results being tabulated: every cell that a registered benchmark kind makes of a
report entry (`Benchmark.table_cells`, toolkit.eval.benchmark), named after the benchmark
(`benchmark_label`: lfw -> LFW, ijbc -> IJB-C, any other name as given). The built-in kinds:

| columns | value (percent) |
|---|---|
| LFW, CFP-FP, AgeDB-30, any .bin set's name | mean 10-fold accuracy |
| IJB-C 1e-6 .. IJB-C 1e-1 (IJB-B alike) | 1:1 TAR at that FAR |
| IJB-C rank-1, rank-5, TPIR 1e-2, TPIR 1e-1 | 1:N, mean of galleries G1 and G2 (when the release has the 1:N files) |
| NAME 1e-6, NAME 1e-5, NAME 1e-4 | all-to-all TAR at that FAR |

Order (the same whatever order the benchmarks were given in): by kind in detection order (verification,
ijb, all_to_all, then other registered kinds by their order); within a kind the known benchmarks first in
the order of `KNOWN_BENCHMARKS` (LFW, CFP-FP, CFP-FF, AgeDB-30, CALFW, CPLFW, VGG2-FP, IJB-B, IJB-C), then the
others alphabetically; within a benchmark the kind's order (smallest FAR first, then 1:N). `columns` (the
`--columns` option) selects and orders them instead.

A cell without a number is '-' with a footnote that says why: the set is too small for that FAR (the reason
the scoring recorded, e.g. "FAR 1e-5 needs at least 100,000 impostor pairs, this set has 420"), or the
evaluation of that row did not measure it ("not measured: benchmark IJB-C is not in this evaluation").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from toolkit.errors import FaceCLError
from toolkit.eval.benchmark import KNOWN_BENCHMARKS, TableCell, benchmark_class, benchmark_label, registered_kinds
from toolkit.eval.outputs import find_report


@dataclass
class Table:
    """Rows of cells: {row name: {column: cell}}, every row holding every column (a missing one says why)."""

    columns: list[str]
    rows: dict[str, dict[str, TableCell]]


@dataclass(frozen=True)
class _Placed:
    """A cell of one report with where its column goes and the benchmark it belongs to."""

    order: tuple
    benchmark: str
    cell: TableCell


def _report_cells(report: dict) -> list[_Placed]:
    """Every table cell of one report (entries of kinds not registered here are left out), in table order."""
    position = {cls.kind: i for i, cls in enumerate(registered_kinds())}
    placed = []
    for name, result in report.get("benchmarks", {}).items():
        kind = benchmark_class(result.get("kind"))
        if kind is None:
            continue
        label = benchmark_label(name)
        known = KNOWN_BENCHMARKS.index(label) if label in KNOWN_BENCHMARKS else len(KNOWN_BENCHMARKS)
        for i, cell in enumerate(kind.table_cells(name, result)):
            if not isinstance(cell, TableCell):   # a kind's programming error, not the user's
                raise TypeError(f"benchmark kind {kind.kind!r}: table_cells returns TableCell objects, got {cell!r}")
            placed.append(_Placed((position[kind.kind], known, label.lower(), label, i), label, _named(cell, label)))
    return sorted(placed, key=lambda p: p.order)


def _named(cell: TableCell, benchmark: str) -> TableCell:
    """A cell whose reason names its benchmark ('IJB-C: FAR 1e-6 needs ...'), so that a footnote stands alone."""
    if cell.value is not None or cell.reason is None or cell.reason.startswith(f"{benchmark}:"):
        return cell
    return TableCell(cell.column, None, f"{benchmark}: {cell.reason}")


def table_row(report: dict) -> dict[str, float | None]:
    """{column: percent or None} of one report, in table order (evaluation.json's `table_row`)."""
    return {p.cell.column: p.cell.value for p in _report_cells(report)}


def table_notes(report: dict) -> dict[str, str]:
    """{column: why it has no number} for the cells of `table_row` that are None (evaluation.json's `table_notes`)."""
    return {p.cell.column: p.cell.reason for p in _report_cells(report) if p.cell.value is None}


def build_table(reports: dict[str, dict], columns: Sequence[str] | None = None) -> Table:
    """The table of several reports ({row name: report}): the columns of every metric they hold, in table order,
    or `columns` (names matched ignoring case and repeated spaces; an unknown one is a FaceCLError line that lists
    the available ones)."""
    per_row = {name: _report_cells(report) for name, report in reports.items()}
    first: dict[str, _Placed] = {}
    for placed in per_row.values():
        for p in placed:
            first.setdefault(p.cell.column, p)
    available = sorted(first, key=lambda column: first[column].order)
    chosen = available if columns is None else select_columns(columns, available)
    rows = {}
    for name, placed in per_row.items():
        cells = {p.cell.column: p.cell for p in placed}
        benchmarks = {p.benchmark for p in placed}
        rows[name] = {c: cells.get(c) or _not_in_evaluation(c, first[c].benchmark, benchmarks) for c in chosen}
    return Table(chosen, rows)


def _not_in_evaluation(column: str, benchmark: str, benchmarks_of_row: set[str]) -> TableCell:
    """The cell of a column that another row has and this one does not."""
    if benchmark in benchmarks_of_row:
        return TableCell(column, None, f"not measured: this evaluation's {benchmark} results have no {column}")
    return TableCell(column, None, f"not measured: benchmark {benchmark} is not in this evaluation")


def parse_columns(spec: str) -> list[str]:
    """--columns 'LFW,IJB-C 1e-4' -> ['LFW', 'IJB-C 1e-4']."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise FaceCLError(f"--columns {spec!r}: give column names separated by commas, e.g. 'LFW,IJB-C 1e-4'")
    return names


def select_columns(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The available columns named by `requested`, in its order (each once)."""
    by_key = {_column_key(column): column for column in available}
    chosen: list[str] = []
    for name in requested:
        column = by_key.get(_column_key(name))
        if column is None:
            raise FaceCLError(f"--columns: no column {name!r} in these results; available: {', '.join(available)}")
        if column not in chosen:
            chosen.append(column)
    return chosen


def _column_key(name: str) -> str:
    return " ".join(name.split()).lower()


def format_markdown(table: Table) -> str:
    """Markdown: one row per row name, numbers with 2 decimals, each '-' with a footnote [^n] giving its reason
    (one footnote per distinct reason, numbered in reading order)."""
    notes: dict[str, int] = {}
    header = ["model", *table.columns]
    lines = [_markdown_line(header), "|---" * len(header) + "|"]
    for name, cells in table.rows.items():
        lines.append(_markdown_line([name, *(_cell_text(cells[c], notes) for c in table.columns)]))
    if notes:
        lines.append("")
        lines.extend(f"[^{number}]: {reason}" for reason, number in notes.items())
    return "\n".join(lines)


def _markdown_line(texts: list[str]) -> str:
    return "| " + " | ".join(texts) + " |"


def _cell_text(cell: TableCell, notes: dict[str, int]) -> str:
    if cell.value is not None:
        return f"{cell.value:.2f}"
    number = notes.setdefault(cell.reason or "not measured", len(notes) + 1)
    return f"-[^{number}]"


def table_json(table: Table) -> dict:
    """{"columns": [...], "rows": {row: {column: percent or null}}, "notes": {row: {column: reason}}}."""
    return {"columns": list(table.columns),
            "rows": {name: {c: cell.value for c, cell in cells.items()} for name, cells in table.rows.items()},
            "notes": {name: {c: cell.reason for c, cell in cells.items() if cell.value is None}
                      for name, cells in table.rows.items()}}


def evaluation_markdown(report: dict) -> str:
    """The markdown table of one evaluation (table.md and the console)."""
    return format_markdown(build_table({report["model"]: report}))


def compare(paths: list[str | Path], columns: Sequence[str] | None = None) -> Table:
    """The table of several evaluations side by side (paths as `find_report` takes them); a model evaluated more
    than once is labelled with each evaluation's folder."""
    reports = [(report_path, read_report(report_path)) for report_path in map(find_report, paths)]
    names = [report.get("model") or report_path.parent.name for report_path, report in reports]
    labelled = {}
    for name, (report_path, report) in zip(names, reports):
        labelled[f"{name} ({report_path.parent})" if names.count(name) > 1 else name] = report
    return build_table(labelled, columns)


def read_report(report_path: Path) -> dict:
    """One evaluation.json; a file that is not JSON is one FaceCLError line."""
    try:
        return json.loads(report_path.read_text())
    except json.JSONDecodeError as exc:
        raise FaceCLError(f"{report_path} is not JSON ({exc})") from None
