# pyproject.toml declares every library the code imports (training in the dependencies, each command's in an
# extra), and requirements.txt installs the package with every extra, naming each distribution once.
from __future__ import annotations

import ast
import re
import sys
import tomllib

from tests.conftest import REPO

# import name -> distribution, where they differ
DISTRIBUTION_OF = {"PIL": "pillow", "cv2": "opencv-python-headless", "skimage": "scikit-image", "yaml": "pyyaml",
                   "nvidia": "nvidia-dali-cuda130", "sklearn": "scikit-learn", "mlflow": "mlflow-skinny"}
FIRST_PARTY = {"toolkit", "launch", "__future__"}


def third_party_imports(*folders: str) -> dict[str, set[str]]:
    """distribution -> files importing it, for every .py file under the folders."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                        found.setdefault(DISTRIBUTION_OF.get(top, top), set()).add(str(path.relative_to(REPO)))
    return found


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=\[; ]", line.strip(), maxsplit=1)[0].lower() for line in requirements}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_every_imported_library_is_declared():
    declared = names(project()["dependencies"])
    extras = {extra: names(requirements) for extra, requirements in project()["optional-dependencies"].items()}
    everything = declared | set().union(*extras.values())
    missing = {dist: files for dist, files in third_party_imports("toolkit", "launch").items() if dist not in everything}
    assert not missing, missing
    # what the evaluation and export code import is in their extras (or needed for training anyway)
    for extra, folder in (("eval", "toolkit/eval"), ("export", "toolkit/export")):
        outside = set(third_party_imports(folder)) - declared - extras[extra]
        assert not outside, (extra, outside)
    # [all] is every extra but the test tools
    everything_but_tests = sorted(set(extras) - {"all", "test"})
    all_extra = project()["optional-dependencies"]["all"]
    assert all_extra == [f"facecl[{','.join(everything_but_tests)}]"] or (
        len(all_extra) == 1 and sorted(all_extra[0].removeprefix("facecl[").removesuffix("]").split(",")) ==
        everything_but_tests), all_extra


def test_requirements_install_every_extra_and_name_each_distribution_once():
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[-1] == "-e .[all,test]"
    listed = [re.split(r"[<>=\[; ]", line, maxsplit=1)[0].lower() for line in lines[:-1]]
    assert len(listed) == len(set(listed)), sorted(name for name in listed if listed.count(name) > 1)
    wanted = names(project()["dependencies"]) | set().union(
        *(names(reqs) for extra, reqs in project()["optional-dependencies"].items() if extra != "all"))
    assert wanted <= set(listed), wanted - set(listed)   # CI pins every one of them
