# Markdown reference of every recipe key from the schema's doc lines (`python -m toolkit.config.reference --update`).
"""docs/recipes.md's recipe reference is this module's output; a test keeps the two identical."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from toolkit.config.loader import describe_schema


def recipe_reference_markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, text in describe_schema():
        if type_name == "section":
            lines.append(f"| **`{key}`** | section | {default} | {text} |")
        else:
            lines.append(f"| `{key}` | {type_name.replace('|', '/')} | {default.replace('|', '/')} | {text} |")
    return "\n".join(lines) + "\n"


def update_reference(path: Path) -> None:
    """Rewrite the block between the recipe-reference markers of `path`."""
    text = path.read_text()
    pattern = re.compile(r"(<!-- recipe-reference:begin -->\n).*(<!-- recipe-reference:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no recipe-reference markers")
    path.write_text(pattern.sub(lambda m: m.group(1) + recipe_reference_markdown() + m.group(2), text))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--update"]:
        update_reference(Path(sys.argv[2] if len(sys.argv) > 2 else "docs/recipes.md"))
    else:
        print(recipe_reference_markdown(), end="")
