# Markdown reference of every recipe key, generated from the schema's doc lines (`python -m toolkit.config.reference`).
"""The README's recipe reference is this module's output; a test keeps the two identical."""

from __future__ import annotations

from toolkit.config.loader import describe_schema


def recipe_reference_markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, text in describe_schema():
        if type_name == "section":
            lines.append(f"| **`{key}`** | section | {default} | {text} |")
        else:
            lines.append(f"| `{key}` | {type_name.replace('|', '/')} | {default.replace('|', '/')} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(recipe_reference_markdown(), end="")
