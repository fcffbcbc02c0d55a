# README stays true: the recipe reference matches the schema, the quick start has the two CI commands.
import re
import subprocess

from tests.conftest import REPO
from toolkit.config.reference import recipe_reference_markdown


def readme() -> str:
    return (REPO / "README.md").read_text()


def test_readme_recipe_reference_matches_schema():
    block = re.search(r"<!-- recipe-reference:begin -->\n(.*)<!-- recipe-reference:end -->", readme(), re.S)
    assert block, "README lost its recipe-reference markers"
    assert block.group(1) == recipe_reference_markdown(), "regenerate with: python -m toolkit.config.reference"


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
