# The results table papers print: one row per model, LFW .. MFR-style columns, as markdown and JSON.
"""Columns and where each number comes from (all in percent, 2 decimals in markdown):

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
import re
from pathlib import Path

from toolkit.errors import FaceCLError

COLUMNS = ("LFW", "CFP-FP", "AgeDB-30", "IJB-B 1e-4", "IJB-C 1e-5", "IJB-C 1e-4", "MFR-style 1e-6")
_VERIFICATION_COLUMNS = {"lfw": "LFW", "cfpfp": "CFP-FP", "agedb30": "AgeDB-30"}
_REPORT_NAME = "evaluation.json"


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def table_row(report: dict) -> dict:
    """{column: percent or None} of one evaluation report."""
    row: dict = {c: None for c in COLUMNS}
    for name, result in report.get("benchmarks", {}).items():
        kind = result.get("kind")
        if kind == "verification" and _key(name) in _VERIFICATION_COLUMNS:
            row[_VERIFICATION_COLUMNS[_key(name)]] = 100.0 * result["accuracy_mean"]
        elif kind == "ijb":
            tar = result["verification"]["tar_at_far"]
            wanted = {"IJB-B": (("IJB-B 1e-4", "1e-04"),),
                      "IJB-C": (("IJB-C 1e-5", "1e-05"), ("IJB-C 1e-4", "1e-04"))}.get(result["benchmark"], ())
            for column, far in wanted:
                value = tar.get(far, {}).get("tar")
                row[column] = None if value is None else 100.0 * value
        elif kind == "all_to_all":
            value = result["tar_at_far"].get("1e-06", {}).get("tar")
            row["MFR-style 1e-6"] = None if value is None else 100.0 * value
    return row


def format_markdown(rows: dict[str, dict]) -> str:
    """Markdown table, one row per model name."""
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for model, row in rows.items():
        cells = ["-" if row.get(c) is None else f"{row[c]:.2f}" for c in COLUMNS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def find_report(path: str | Path) -> Path:
    """An evaluation.json, or a folder holding one directly or in eval/."""
    path = Path(path)
    for candidate in (path, path / _REPORT_NAME, path / "eval" / _REPORT_NAME):
        if candidate.is_file():
            return candidate
    raise FaceCLError(f"no {_REPORT_NAME} at {path} (give an evaluation.json or the folder that holds it)")


def compare(paths: list[str | Path]) -> tuple[str, dict]:
    """(markdown, {model: row}) of several evaluation reports, side by side."""
    rows: dict[str, dict] = {}
    for path in paths:
        report_path = find_report(path)
        try:
            report = json.loads(report_path.read_text())
        except json.JSONDecodeError as exc:
            raise FaceCLError(f"{report_path} is not JSON ({exc})") from None
        name = report.get("model") or report_path.parent.name
        if name in rows:
            name = f"{name} ({report_path.parent})"
        rows[name] = table_row(report)
    return format_markdown(rows), rows
