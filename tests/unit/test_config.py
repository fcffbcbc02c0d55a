# Unit tests for recipe loading: base inheritance, --set overrides, ${VAR} expansion, validation, checks.
"""Config tests; pure Python (no torch work), the whole file runs in a few seconds."""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from toolkit.config import describe_schema, dump_recipe, load_config
from toolkit.config.schema import Recipe
from toolkit.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIR = REPO_ROOT / "recipes"
# base.yaml is a partial recipe that only exists to be inherited; it is checked separately below.
PARTIAL_RECIPES = {"base.yaml"}
FULL_RECIPES = sorted(p for p in RECIPES_DIR.glob("*.yaml") if p.name not in PARTIAL_RECIPES)

# The smallest complete recipe: exactly the required keys, no base.
MINIMAL = {
    "run": {"name": "unit", "output_dir": "out"},
    "model": {"backbone": "mobilefacenet"},
    "data": {"batch_size": 8},
    "optim": {"name": "sgd", "lr": 0.1},
    "train": {"num_epochs": 1},
}


def write_yaml(path: Path, tree: dict | str) -> Path:
    """Write a recipe (a dict, or raw YAML text) to `path`, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree, sort_keys=False))
    return path


def minimal(**sections) -> dict:
    """MINIMAL with some sections replaced/added (deep-copied, never shared between tests)."""
    tree = copy.deepcopy(MINIMAL)
    for name, value in sections.items():
        tree[name] = value
    return tree


def load_error(path, overrides=None, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"error message must be one line: {message!r}"
    return message


# ----- base: inheritance ------------------------------------------------------------------------------

def test_child_overrides_one_key_and_keeps_the_base_siblings(tmp_path):
    base = write_yaml(tmp_path / "defaults" / "base.yaml", minimal(
        optim={"name": "sgd", "lr": 0.1, "momentum": 0.8, "weight_decay": 0.001},
        data={"batch_size": 16, "flip": False, "synthetic": {"num_identities": 50, "samples_per_identity": 7}},
    ))
    child = write_yaml(tmp_path / "experiments" / "child.yaml", {
        "base": "../defaults/base.yaml",
        "optim": {"lr": 0.2},
        "data": {"synthetic": {"num_identities": 30}},
    })
    assert base.exists()
    recipe = load_config(child)
    assert recipe.optim.lr == 0.2
    assert recipe.optim.momentum == 0.8
    assert recipe.optim.weight_decay == 0.001
    assert recipe.optim.name == "sgd"
    # Two levels deep: data.synthetic.* merges too, and data's other keys survive.
    assert recipe.data.synthetic.num_identities == 30
    assert recipe.data.synthetic.samples_per_identity == 7
    assert recipe.data.batch_size == 16
    assert recipe.data.flip is False
    # Sections the child does not mention come from the base unchanged.
    assert recipe.run.name == "unit"
    assert recipe.model.backbone == "mobilefacenet"


def test_base_path_is_relative_to_the_child_file_not_the_cwd(tmp_path, monkeypatch):
    write_yaml(tmp_path / "a" / "common.yaml", minimal(run={"name": "from_base", "output_dir": "o"}))
    write_yaml(tmp_path / "a" / "b" / "child.yaml", {"base": "../common.yaml", "optim": {"lr": 0.3}})
    # Resolved against the cwd (c/d), "../common.yaml" would be this decoy instead.
    write_yaml(tmp_path / "c" / "common.yaml", minimal(run={"name": "decoy", "output_dir": "o"}))
    (tmp_path / "c" / "d").mkdir()
    monkeypatch.chdir(tmp_path / "c" / "d")
    recipe = load_config(Path("..") / ".." / "a" / "b" / "child.yaml")
    assert recipe.run.name == "from_base"
    assert recipe.optim.lr == 0.3


def test_three_level_chain_each_base_relative_to_its_own_file(tmp_path):
    write_yaml(tmp_path / "l1" / "grandparent.yaml", minimal(
        head={"scale": 30.0, "margin_m3": 0.3},
        optim={"name": "sgd", "lr": 0.1, "momentum": 0.7},
    ))
    # parent's base is relative to parent (l2/), not to the child (l3/).
    write_yaml(tmp_path / "l2" / "parent.yaml", {"base": "../l1/grandparent.yaml", "head": {"scale": 40.0}})
    child = write_yaml(tmp_path / "l3" / "child.yaml", {"base": "../l2/parent.yaml", "optim": {"lr": 0.05}})
    recipe = load_config(child)
    assert recipe.head.scale == 40.0           # parent overrides grandparent
    assert recipe.head.margin_m3 == 0.3        # grandparent kept
    assert recipe.optim.momentum == 0.7        # grandparent kept
    assert recipe.optim.lr == 0.05             # child overrides grandparent


def test_inheritance_cycle_is_an_error_naming_the_files(tmp_path):
    write_yaml(tmp_path / "a" / "first.yaml", {"base": "../b/second.yaml", "optim": {"lr": 0.1}})
    write_yaml(tmp_path / "b" / "second.yaml", {"base": "../a/first.yaml", "optim": {"lr": 0.2}})
    message = load_error(tmp_path / "a" / "first.yaml")
    assert "cycle" in message
    assert "first.yaml" in message and "second.yaml" in message


def test_a_recipe_naming_itself_as_base_is_a_cycle(tmp_path):
    path = write_yaml(tmp_path / "self.yaml", {"base": "self.yaml", **MINIMAL})
    message = load_error(path)
    assert "cycle" in message and "self.yaml" in message


def test_missing_base_file_is_an_error_naming_it(tmp_path):
    child = write_yaml(tmp_path / "child.yaml", {"base": "no_such_base.yaml", **MINIMAL})
    message = load_error(child)
    assert "no_such_base.yaml" in message and "not found" in message


# ----- --set overrides --------------------------------------------------------------------------------

@pytest.fixture
def minimal_recipe(tmp_path) -> Path:
    return write_yaml(tmp_path / "recipe.yaml", MINIMAL)


def test_set_lr_in_exponent_notation_is_a_float(minimal_recipe):
    # YAML 1.1 reads `1e-3` as a string; the loader reads it as a float.
    recipe = load_config(minimal_recipe, ["optim.lr=1e-3"])
    assert type(recipe.optim.lr) is float
    assert recipe.optim.lr == pytest.approx(0.001)


def test_exponent_notation_in_a_file_is_a_float(tmp_path):
    path = write_yaml(tmp_path / "r.yaml",
                      "run: {name: unit}\nmodel: {backbone: mobilefacenet}\ndata: {batch_size: 8}\n"
                      "optim: {name: sgd, lr: 1e-3, eps: 1E-6, weight_decay: 5e-4}\ntrain: {num_epochs: 1}\n")
    recipe = load_config(path)
    assert type(recipe.optim.lr) is float
    assert recipe.optim.lr == pytest.approx(1e-3)
    assert recipe.optim.eps == pytest.approx(1e-6)
    assert recipe.optim.weight_decay == pytest.approx(5e-4)


def test_set_literal_bool_and_tuple_values(minimal_recipe):
    recipe = load_config(minimal_recipe, ["parallel.precision=bf16", "data.flip=false", "optim.betas=[0.8, 0.9]"])
    assert recipe.parallel.precision == "bf16"
    assert recipe.data.flip is False
    assert recipe.optim.betas == (0.8, 0.9)
    assert isinstance(recipe.optim.betas, tuple)


def test_set_nested_key(minimal_recipe):
    recipe = load_config(minimal_recipe, ["data.synthetic.num_identities=10"])
    assert recipe.data.synthetic.num_identities == 10
    # Sibling keys in the nested section keep their defaults.
    assert recipe.data.synthetic.samples_per_identity == 50


def test_set_overrides_win_over_the_file_and_later_ones_win(minimal_recipe):
    recipe = load_config(minimal_recipe, ["optim.lr=0.5", "optim.lr=0.25", "run.name=other"])
    assert recipe.optim.lr == 0.25
    assert recipe.run.name == "other"


def test_set_of_an_unknown_key_is_an_error_mentioning_set(minimal_recipe):
    message = load_error(minimal_recipe, ["optim.lrr=0.1"])
    assert "--set" in message
    assert "optim.lrr" in message
    assert "did you mean 'lr'" in message


def test_set_of_an_unknown_section_is_an_error_mentioning_set(minimal_recipe):
    message = load_error(minimal_recipe, ["optimizer.lr=0.1"])
    assert "--set" in message and "optimizer" in message


def test_set_without_equals_sign_is_an_error(minimal_recipe):
    message = load_error(minimal_recipe, ["optim.lr"])
    assert "--set" in message and "optim.lr" in message


# ----- ${VAR} expansion ------------------------------------------------------------------------------

def test_env_var_in_path_field_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("FACECL_TEST_ROOT", "/data/facecl")
    path = write_yaml(tmp_path / "r.yaml", minimal(run={"name": "unit", "output_dir": "${FACECL_TEST_ROOT}/runs"}))
    assert load_config(path).run.output_dir == "/data/facecl/runs"
    # --set values are expanded as well.
    assert load_config(path, ["run.output_dir=${FACECL_TEST_ROOT}/x"]).run.output_dir == "/data/facecl/x"


def test_unset_env_var_is_an_error_naming_variable_and_key(tmp_path, monkeypatch):
    monkeypatch.delenv("FACECL_SURELY_UNSET", raising=False)
    path = write_yaml(tmp_path / "r.yaml", minimal(run={"name": "unit", "output_dir": "${FACECL_SURELY_UNSET}/r"}))
    message = load_error(path)
    assert "FACECL_SURELY_UNSET" in message
    assert "run.output_dir" in message
    assert str(path) in message


def test_expand_env_false_keeps_the_reference(tmp_path, monkeypatch):
    monkeypatch.delenv("FACECL_SURELY_UNSET", raising=False)
    path = write_yaml(tmp_path / "r.yaml", minimal(run={"name": "unit", "output_dir": "${FACECL_SURELY_UNSET}/r"}))
    assert load_config(path, expand_env=False).run.output_dir == "${FACECL_SURELY_UNSET}/r"


def test_non_path_string_field_is_not_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("FACECL_X", "expanded")
    monkeypatch.delenv("FACECL_SURELY_UNSET", raising=False)
    path = write_yaml(tmp_path / "r.yaml", minimal(run={"name": "n_${FACECL_X}", "output_dir": "o"}))
    assert load_config(path).run.name == "n_${FACECL_X}"
    # Not even an unset variable is an error in a non-path field.
    assert load_config(path, ["run.name=${FACECL_SURELY_UNSET}"]).run.name == "${FACECL_SURELY_UNSET}"


# ----- unknown keys ----------------------------------------------------------------------------------

def _base_and_child(tmp_path, base_extra: dict | None = None, child_extra: dict | None = None):
    base_tree = minimal()
    for section, values in (base_extra or {}).items():
        base_tree[section] = {**base_tree.get(section, {}), **values}
    base = write_yaml(tmp_path / "defaults" / "base.yaml", base_tree)
    child = write_yaml(tmp_path / "exp" / "child.yaml",
                       {"base": "../defaults/base.yaml", "run": {"name": "child"}, **(child_extra or {})})
    return base, child


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    base, child = _base_and_child(tmp_path, base_extra={"optim": {"lerning_rate": 0.1}})
    message = load_error(child)
    assert str(base.resolve()) in message
    assert str(child.resolve()) not in message
    assert "unknown key 'optim.lerning_rate'" in message
    assert "lr" in message.split("optim.lerning_rate", 1)[1]  # the valid key is offered after the bad one


def test_unknown_key_in_child_names_the_child_file(tmp_path):
    base, child = _base_and_child(tmp_path, child_extra={"optim": {"lerning_rate": 0.1}})
    message = load_error(child)
    assert str(child.resolve()) in message
    assert str(base.resolve()) not in message
    assert "unknown key 'optim.lerning_rate'" in message


@pytest.mark.parametrize(("section", "typo", "suggestion"), [
    ("optim", "lrr", "lr"),
    ("optim", "weight_decy", "weight_decay"),
    ("data", "batchsize", "batch_size"),
])
def test_unknown_key_suggests_the_closest_valid_key(tmp_path, section, typo, suggestion):
    tree = minimal()
    tree[section] = {**tree[section], typo: 1}
    path = write_yaml(tmp_path / "r.yaml", tree)
    message = load_error(path)
    assert str(path.resolve()) in message
    assert f"unknown key '{section}.{typo}'" in message
    assert f"did you mean '{suggestion}'" in message


def test_unknown_nested_key_names_the_full_key_path(tmp_path):
    tree = minimal(data={"batch_size": 8, "synthetic": {"num_identites": 10}})
    message = load_error(write_yaml(tmp_path / "r.yaml", tree))
    assert "unknown key 'data.synthetic.num_identites'" in message
    assert "did you mean 'num_identities'" in message


def test_unknown_key_lerning_rate_suggests_lr(tmp_path):
    tree = minimal(optim={"name": "sgd", "lr": 0.1, "lerning_rate": 0.1})
    message = load_error(write_yaml(tmp_path / "r.yaml", tree))
    assert "did you mean 'lr'" in message


def test_unknown_top_level_section(tmp_path):
    tree = minimal()
    tree["optimizer"] = {"momentum": 0.9}
    path = write_yaml(tmp_path / "r.yaml", tree)
    message = load_error(path)
    assert str(path.resolve()) in message
    assert "unknown key 'optimizer'" in message
    assert "did you mean 'optim'" in message


# ----- wrong types -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("section", "key", "value", "expected_type", "shown"), [
    ("data", "batch_size", "sixty-four", "int", "'sixty-four'"),
    ("data", "batch_size", 64.5, "int", "64.5"),
    ("data", "batch_size", True, "int", "True"),       # bool is not an int here
    ("optim", "lr", "fast", "float", "'fast'"),
    ("optim", "lr", False, "float", "False"),
    ("data", "flip", "maybe", "bool", "'maybe'"),
    ("data", "flip", 1, "bool", "1"),
    ("run", "name", 5, "str", "5"),
    ("optim", "betas", [0.9], "tuple[float, float]", "[0.9]"),
])
def test_wrong_type_names_key_expected_type_and_value(tmp_path, section, key, value, expected_type, shown):
    tree = minimal()
    tree[section] = {**tree[section], key: value}
    path = write_yaml(tmp_path / "r.yaml", tree)
    message = load_error(path)
    assert str(path.resolve()) in message
    assert f"'{section}.{key}' must be {expected_type}" in message
    assert f"got {shown}" in message


def test_literal_field_names_the_allowed_values(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", minimal(optim={"name": "adam", "lr": 0.1}))
    message = load_error(path)
    assert "optim.name" in message
    assert "'adam'" in message
    assert "'sgd'" in message and "'adamw'" in message


def test_section_given_a_scalar_is_rejected(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", minimal(optim=3))
    message = load_error(path)
    assert "'optim' must be a mapping" in message and "3" in message


def test_top_level_that_is_not_a_mapping_is_rejected(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", "- just\n- a list\n")
    message = load_error(path)
    assert str(path.resolve()) in message and "mapping" in message


def test_wrong_type_from_set_names_the_override(minimal_recipe):
    message = load_error(minimal_recipe, ["data.batch_size=sixty-four"])
    assert "--set data.batch_size=sixty-four" in message
    assert "'data.batch_size' must be int" in message


# ----- required fields -------------------------------------------------------------------------------

@pytest.mark.parametrize(("section", "key"), [
    ("run", "name"), ("optim", "lr"), ("optim", "name"), ("model", "backbone"),
    ("train", "num_epochs"),
])
def test_missing_required_key_is_an_error(tmp_path, section, key):
    tree = minimal()
    del tree[section][key]
    message = load_error(write_yaml(tmp_path / "r.yaml", tree))
    assert f"required key '{section}.{key}' is missing" in message


def test_batch_size_has_no_silent_default(tmp_path):
    tree = minimal()
    del tree["data"]["batch_size"]
    message = load_error(write_yaml(tmp_path / "r.yaml", tree))
    assert "give exactly one of data.batch_size (per rank) and data.global_batch_size" in message


@pytest.mark.parametrize("section", ["run", "model", "data", "optim", "train"])
def test_missing_required_section_is_an_error(tmp_path, section):
    tree = minimal()
    del tree[section]
    message = load_error(write_yaml(tmp_path / "r.yaml", tree))
    assert f"required key '{section}' is missing" in message


def test_required_fields_have_no_silent_default():
    """Every field documented as required really has no dataclass default."""
    checked = 0
    for cls in (Recipe, *[hint for hint in typing.get_type_hints(Recipe).values() if dataclasses.is_dataclass(hint)]):
        for fld in dataclasses.fields(cls):
            if fld.metadata.get("required"):
                checked += 1
                assert fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING, (
                    f"{cls.__name__}.{fld.name}")
    assert checked >= 10  # 5 sections + run.name, model.backbone, optim.name/lr, train.num_epochs


# ----- malformed YAML ----------------------------------------------------------------------------------

def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path / "broken.yaml", "run:\n  name: unit\n  output_dir: [runs\nmodel:\n  backbone: x\n")
    message = load_error(path)
    assert "malformed YAML" in message
    assert str(path.resolve()) in message
    assert "line 4" in message  # PyYAML reports the unclosed flow sequence where it notices it


def test_malformed_yaml_tab_indent_names_line(tmp_path):
    path = write_yaml(tmp_path / "tabs.yaml", "run:\n  name: unit\n\toutput_dir: runs\n")
    message = load_error(path)
    assert str(path.resolve()) in message and "line 3" in message


def test_malformed_base_file_names_the_base(tmp_path):
    base = write_yaml(tmp_path / "defaults" / "base.yaml", "optim:\n  lr: 0.1\n   momentum: 0.9: x\n")
    child = write_yaml(tmp_path / "exp" / "child.yaml", {"base": "../defaults/base.yaml", **MINIMAL})
    message = load_error(child)
    assert str(base.resolve()) in message and "line 3" in message


def test_malformed_set_value_is_an_error(minimal_recipe):
    message = load_error(minimal_recipe, ["optim.betas=[0.8, 0.9"])
    assert "--set optim.betas=[0.8, 0.9" in message


# ----- semantic checks (checks.py) --------------------------------------------------------------------

@pytest.mark.parametrize(("override", "key", "shown"), [
    ("data.image_size=100", "data.image_size", "100"),
    ("data.image_size=8", "data.image_size", "8"),
    ("parallel.grad_accum_steps=0", "parallel.grad_accum_steps", "0"),
    ("data.synthetic.num_val_pairs=1010", "data.synthetic.num_val_pairs", "1010"),  # not a multiple of 2 * 10
    ("data.batch_size=-1", "data.batch_size", "-1"),
    ("optim.lr=-0.1", "optim.lr", "-0.1"),
    ("train.num_epochs=0", "train.num_epochs", "0.0"),
    ("model.dropout=1.0", "model.dropout", "1.0"),
    ("schedule.min_lr_ratio=1.5", "schedule.min_lr_ratio", "1.5"),
    ("eval.num_folds=1", "eval.num_folds", "1"),
    ("head.margin_m1=0.5", "head.margin_m1", "0.5"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last", "-1"),
])
def test_semantic_check_names_key_and_value(minimal_recipe, override, key, shown):
    message = load_error(minimal_recipe, [override])
    assert message.startswith(key), message
    assert message.endswith(f"got {shown}"), message


def test_num_val_pairs_check_follows_num_folds(minimal_recipe):
    # 1010 pairs is fine with 5 folds (multiple of 10) but not with 10 folds (multiple of 20).
    assert load_config(minimal_recipe, ["eval.num_folds=5", "data.synthetic.num_val_pairs=1010"])
    message = load_error(minimal_recipe, ["eval.num_folds=10", "data.synthetic.num_val_pairs=1010"])
    assert "2 * eval.num_folds = 20" in message


# ----- the shipped recipes ---------------------------------------------------------------------------

def test_there_are_recipes_to_check():
    assert FULL_RECIPES, f"no complete recipes found in {RECIPES_DIR}"


@pytest.mark.parametrize("recipe_path", FULL_RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(recipe_path):
    recipe = load_config(recipe_path, expand_env=False)
    assert isinstance(recipe, Recipe)
    assert recipe.run.name


def test_base_recipe_alone_is_rejected_for_missing_required_keys():
    message = load_error(RECIPES_DIR / "base.yaml", expand_env=False)
    assert "required key" in message and "is missing" in message


# ----- dump_recipe round trip ------------------------------------------------------------------------

def _round_trip(recipe: Recipe, tmp_path: Path) -> Recipe:
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(dump_recipe(recipe))
    return load_config(dumped, expand_env=False)


@pytest.mark.parametrize("recipe_path", FULL_RECIPES, ids=lambda p: p.name)
def test_dump_round_trip_of_every_recipe(recipe_path, tmp_path):
    recipe = load_config(recipe_path, expand_env=False)
    assert _round_trip(recipe, tmp_path) == recipe


def test_dump_round_trip_with_non_default_values(minimal_recipe, tmp_path):
    recipe = load_config(minimal_recipe, [
        "optim.name=adamw", "optim.betas=[0.8, 0.95]", "optim.eps=1e-6", "optim.lr=3e-4",
        "parallel.precision=bf16", "data.flip=false", "train.num_epochs=0.5", "run.name='with space: and colon'",
        "data.synthetic.num_identities=10", "schedule.decay=poly",
    ])
    again = _round_trip(recipe, tmp_path)
    assert again == recipe
    assert again.optim.betas == (0.8, 0.95)


def test_dump_round_trip_of_a_float_looking_string(minimal_recipe, tmp_path):
    recipe = load_config(minimal_recipe, ["run.name='1e5'"])
    assert recipe.run.name == "1e5"
    assert _round_trip(recipe, tmp_path) == recipe


# ----- describe_schema -------------------------------------------------------------------------------

def _leaf_and_section_count(cls=Recipe) -> int:
    hints = typing.get_type_hints(cls)
    count = 0
    for fld in dataclasses.fields(cls):
        count += 1
        if dataclasses.is_dataclass(hints[fld.name]):
            count += _leaf_and_section_count(hints[fld.name])
    return count


def test_describe_schema_documents_every_field():
    rows = describe_schema()
    assert len(rows) == _leaf_and_section_count()
    keys = [key for key, _, _, _ in rows]
    assert len(keys) == len(set(keys))
    for key, type_name, default, doc in rows:
        assert isinstance(doc, str) and doc.strip(), f"field {key} has no doc string"
        assert type_name, key
    table = {key: (type_name, default) for key, type_name, default, _ in rows}
    assert table["optim.lr"] == ("float", "required")
    assert table["data.synthetic.num_identities"][0] == "int"
    assert table["optim.betas"] == ("tuple[float, float]", "[0.9, 0.999]")
    assert table["optim.name"][0] == "one of 'sgd', 'adamw'"


def bounded_fields(cls: type = Recipe, prefix: str = ""):
    """(key, Bounds) of every field that declares a range in the schema."""
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[fld.name]):
            yield from bounded_fields(hints[fld.name], f"{prefix}{fld.name}.")
        elif fld.metadata.get("bounds") is not None:
            yield f"{prefix}{fld.name}", fld.metadata["bounds"]


def outside(bounds):
    """A value just outside the range on each side it has."""
    values = []
    if bounds.ge is not None:
        values.append(bounds.ge - 1)
    if bounds.gt is not None:
        values.append(bounds.gt)
    if bounds.le is not None:
        values.append(bounds.le + 1)
    if bounds.lt is not None:
        values.append(bounds.lt)
    return values


def test_every_declared_bound_is_checked_and_documented():
    from tests.conftest import SMOKE_RECIPE

    fields = dict(bounded_fields())
    assert len(fields) >= 40 and "head.sample_rate" in fields and "train.num_epochs" in fields
    reference = {key: text for key, _, _, text in describe_schema()}
    for key, bounds in fields.items():
        assert reference[key].endswith(f" Must be {bounds.describe()}."), key
        for value in outside(bounds):
            with pytest.raises(ConfigError) as error:
                load_config(SMOKE_RECIPE, [f"{key}={value}"], expand_env=False)
            message, _, got = str(error.value).rpartition(", got ")
            assert message == f"{key} must be {bounds.describe()}" and float(got) == value, key
    assert fields["head.interclass_filter"].describe() == "in [0, 1) (0 disables)"
    assert fields["head.sample_rate"].describe() == "in (0, 1]" and fields["model.embedding_size"].describe() == "positive"
