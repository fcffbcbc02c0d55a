# The docs stay true: the recipe reference matches the schema, the layer list matches the architecture test,
# the README's quick start has the two CI commands.
import re
import subprocess

from tests.conftest import REPO
from tests.unit.test_architecture import LAYERS
from toolkit.config.reference import recipe_reference_markdown


def readme() -> str:
    return (REPO / "README.md").read_text()


def test_recipe_reference_in_docs_matches_schema():
    text = (REPO / "docs" / "recipes.md").read_text()
    block = re.search(r"<!-- recipe-reference:begin -->\n(.*)<!-- recipe-reference:end -->", text, re.S)
    assert block, "docs/recipes.md lost its recipe-reference markers"
    assert block.group(1) == recipe_reference_markdown(), \
        "regenerate with: python -m toolkit.config.reference --update docs/recipes.md"


def layer_lines(layers: dict[str, int]) -> list[str]:
    """`- layer N: a, b` per layer, top layer first, packages sorted within a layer."""
    by_layer: dict[int, list[str]] = {}
    for package, layer in layers.items():
        by_layer.setdefault(layer, []).append(package)
    return [f"- layer {layer}: {', '.join(sorted(by_layer[layer]))}" for layer in sorted(by_layer, reverse=True)]


def test_architecture_doc_lists_the_layers_of_the_architecture_test():
    text = (REPO / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- layers:begin -->\n(.*?)<!-- layers:end -->", text, re.S)
    assert block, "docs/architecture.md lost its layers markers"
    assert block.group(1).splitlines() == layer_lines(LAYERS), \
        "docs/architecture.md's layer list differs from LAYERS in tests/unit/test_architecture.py"


def test_layer_lines_format():
    assert layer_lines({"b": 0, "a": 0, "top": 1}) == ["- layer 1: top", "- layer 0: a, b"]


def test_ci_runs_exactly_the_readme_quick_start():
    # The same extraction .ci/run performs.
    extracted = subprocess.run(
        ["bash", "-c", "sed -n '/<!-- quickstart:begin -->/,/<!-- quickstart:end -->/p' README.md "
                       "| grep -E '^(pip|python)'"],
        cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    assert extracted == [
        "pip install -r requirements.txt && python launch/train.py --recipe recipes/smoke_synthetic.yaml",
        "python -m pytest -q tests",
    ]
    ci_script = (REPO / ".ci" / "run").read_text()
    assert "quickstart:begin" in ci_script and "python3.11 -m venv" in ci_script
