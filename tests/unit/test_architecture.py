# The package import graph of toolkit/ has no arrow pointing up and no circle (static, from the source).
"""Layers, bottom to top: a package may import only packages of a lower layer. Imports inside
`if TYPE_CHECKING:` blocks count too: an annotation that names an upper package's type is a dependency on it.

The recipe schema (config) sits just below training: only the builders and the trainer read recipe
types; the packages below them take plain arguments, small dataclasses or protocols of their own (e.g.
toolkit/parallel/settings.py's ParallelSettings, which the recipe's ParallelConfig satisfies).
"""

import ast

from tests.conftest import REPO

LAYERS = {
    "quiet": -1,   # process setup (library message filters): imports nothing of the toolkit
    "command_line": -1,   # the argument parser of every command: imports nothing of the toolkit
    "errors": 0,
    "_C": 1, "distributed": 1, "serialization": 1,
    "ops": 2, "checkpoint": 2,
    "models": 3, "data": 3, "heads": 3, "contrastive": 3,
    "parallel": 4,
    "export": 5,
    "eval": 6,
    "config": 7,
    "training": 8,
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "toolkit"


def import_graph() -> dict[str, set[str]]:
    """{package: packages it imports at run time} over every module of toolkit/."""
    edges: dict[str, set[str]] = {}
    for path in sorted((REPO / "toolkit").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        source = _package(module)
        tree = ast.parse(path.read_text())
        targets = edges.setdefault(source, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "toolkit":
                names = [_package(node.module)] if node.module != "toolkit" else [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [_package(alias.name) for alias in node.names if alias.name.startswith("toolkit.")]
            else:
                continue
            targets.update(name for name in names if name != source)
    return edges


def test_every_package_has_a_layer():
    unknown = set(import_graph()) - set(LAYERS) - {"toolkit"}
    assert not unknown, f"packages without a layer in this test: {sorted(unknown)}"


def test_imports_point_down():
    upward = [(source, target) for source, targets in import_graph().items() for target in targets
              if source != "toolkit" and LAYERS.get(target, -1) >= LAYERS[source]]
    assert not upward, f"imports that point up or sideways: {sorted(upward)}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The test can fail: an import of the trainer from ops is found."""
    fake_repo = tmp_path
    (fake_repo / "toolkit" / "ops").mkdir(parents=True)
    (fake_repo / "toolkit" / "ops" / "bad.py").write_text("from toolkit.training.trainer import Trainer\n")
    globals()["REPO"] = fake_repo
    try:
        assert import_graph() == {"ops": {"training"}}
    finally:
        globals()["REPO"] = REPO


def test_annotation_only_imports_count(tmp_path):
    """An upward import inside `if TYPE_CHECKING:` is found too."""
    fake_repo = tmp_path
    (fake_repo / "toolkit" / "parallel").mkdir(parents=True)
    (fake_repo / "toolkit" / "parallel" / "bad.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toolkit.config.schema import Recipe\n")
    globals()["REPO"] = fake_repo
    try:
        assert import_graph() == {"parallel": {"config"}}
    finally:
        globals()["REPO"] = REPO


def test_the_recipe_names_exactly_the_registered_engines_and_their_settings():
    """parallel.engine's Literal in the schema lists the registered strategies, and the recipe's parallel
    section has every attribute the engines read (ParallelSettings)."""
    import dataclasses
    import typing

    from toolkit.config.schema import ParallelConfig
    from toolkit.parallel import strategy_names
    from toolkit.parallel.settings import ParallelSettings

    engine_type = typing.get_type_hints(ParallelConfig)["engine"]
    assert sorted(typing.get_args(engine_type)) == strategy_names()
    fields = {field.name for field in dataclasses.fields(ParallelConfig)}
    assert set(typing.get_type_hints(ParallelSettings)) <= fields
