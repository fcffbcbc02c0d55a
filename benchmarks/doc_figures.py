# Figures quoted in README.md and docs/ are read from committed results files: check them, or rewrite them.
"""A quoted figure is written between two markers that name where it comes from:

    <!-- figure FILE PATH FORMAT -->97.40%<!-- /figure -->

FILE is a JSON file of the repository (benchmarks/results/...), PATH walks it with '/' between steps (a
dict key; in a list, `field=value,field=value` picks the one record whose fields have those values), and
FORMAT is a Python format string applied to the value (`{:.2f}%`, `{:.0f}`, `` `{}` ``). Markdown renders
only the text between the markers.

    python benchmarks/doc_figures.py            # check: lists every figure that differs from its file (exit 1)
    python benchmarks/doc_figures.py --write    # rewrite every quoted figure from its file

tests/unit/test_doc_figures.py runs the check, so a figure cannot go stale: a new results file changes the
text, or the test fails and names the line.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from toolkit.command_line import CommandParser  # noqa: E402

FIGURE = re.compile(r"<!-- figure (?P<file>\S+) (?P<path>\S+) (?P<format>.+?) -->(?P<text>.*?)<!-- /figure -->")


def documents(repo: Path) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Figure:
    document: Path
    line: int
    file: str
    path: str
    format: str
    text: str

    def where(self, repo: Path) -> str:
        return f"{self.document.relative_to(repo)}:{self.line}"


def figures_in(document: Path) -> list[Figure]:
    text = document.read_text()
    return [Figure(document, text.count("\n", 0, match.start()) + 1, match["file"], match["path"], match["format"],
                   match["text"]) for match in FIGURE.finditer(text)]


def _matches(record: dict, selector: str) -> bool:
    for condition in selector.split(","):
        field, _, wanted = condition.partition("=")
        value = record.get(field)
        try:
            if float(value) != float(wanted):
                return False
        except (TypeError, ValueError):
            if str(value) != wanted:
                return False
    return True


def lookup(data, path: str):
    """The value at `path` (see the module docstring); a KeyError names the step that found nothing."""
    for step in path.split("/"):
        if isinstance(data, list):
            found = [record for record in data if isinstance(record, dict) and _matches(record, step)]
            if len(found) != 1:
                raise KeyError(f"{len(found)} records match {step!r}")
            data = found[0]
        elif isinstance(data, dict) and step in data:
            data = data[step]
        else:
            raise KeyError(f"no {step!r}")
    return data


def expected_text(repo: Path, figure: Figure) -> str:
    source = repo / figure.file
    if not source.is_file():
        raise KeyError(f"{figure.file} does not exist")
    return figure.format.format(lookup(json.loads(source.read_text()), figure.path))


def problems(repo: Path = REPO) -> list[str]:
    """One line per quoted figure that differs from its results file (or whose file or path is wrong)."""
    found = []
    for document in documents(repo):
        for figure in figures_in(document):
            try:
                expected = expected_text(repo, figure)
            except KeyError as error:
                found.append(f"{figure.where(repo)}: {figure.file} {figure.path}: {error.args[0]}")
                continue
            if figure.text != expected:
                found.append(f"{figure.where(repo)}: quotes {figure.text!r}, {figure.file} {figure.path} gives "
                             f"{expected!r}")
    return found


def rewrite(repo: Path = REPO) -> int:
    """Rewrites every quoted figure from its file; returns how many changed."""
    changed = 0
    for document in documents(repo):
        def replace(match: re.Match) -> str:
            nonlocal changed
            figure = Figure(document, 0, match["file"], match["path"], match["format"], match["text"])
            text = expected_text(repo, figure)
            changed += text != figure.text
            return match.group(0).replace(f"-->{figure.text}<!--", f"-->{text}<!--")

        old = document.read_text()
        new = FIGURE.sub(replace, old)
        if new != old:
            document.write_text(new)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite the quoted figures from their files")
    args = parser.parse_args(argv)
    if args.write:
        print(f"{rewrite()} figure(s) rewritten")
        return 0
    found = problems()
    total = sum(len(figures_in(document)) for document in documents(REPO))
    for line in found:
        print(line)
    print(f"{total} quoted figure(s), {len(found)} differ from their files")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
