# Recipe loading: YAML files with `base:` inheritance, --set overrides, ${VAR} expansion, strict validation.
"""Turn recipe files into a validated, read-only `Recipe`.

Order of resolution: the `base:` chain (deep merge, child wins, paths relative to the file that names
them), then `--set section.key=value` overrides (values parsed as YAML scalars), then validation against
`toolkit.config.schema`. Every raw value remembers the file it came from so that an error can name it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from toolkit.config.schema import Recipe
from toolkit.errors import ConfigError

KeyPath = tuple[str, ...]
_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _RecipeYamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 only accepts `1.0e-3`)."""


_FLOAT_PATTERN = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X)
_RecipeYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_PATTERN, list("-+0123456789."))


class _RecipeYamlDumper(yaml.SafeDumper):
    """SafeDumper that quotes strings the loader would read as floats (`'1e5'`), so dumps load back."""


_RecipeYamlDumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_PATTERN, list("-+0123456789."))


def parse_yaml_text(text: str, source: str) -> Any:
    """yaml.safe_load with float fixes; a syntax error becomes a one-line ConfigError naming `source`."""
    try:
        return yaml.load(text, Loader=_RecipeYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"malformed YAML in {source}{where}: {problem}") from None


def _read_recipe_file(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[KeyPath, str]]:
    """Read one file and its `base:` chain; returns the merged dict and the origin file of every key."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"recipe inheritance cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    raw = parse_yaml_text(path.read_text(), str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(raw).__name__}")
    base_name = raw.pop("base", None)
    own_origin = {key_path: str(path) for key_path in _key_paths(raw)}
    if base_name is None:
        return raw, own_origin
    if not isinstance(base_name, str):
        raise ConfigError(f"'base' in {path} must be a file name, got {base_name!r}")
    base, base_origin = _read_recipe_file(path.parent / base_name, (*chain, path))
    return _deep_merge(base, raw), {**base_origin, **own_origin}


def _key_paths(tree: dict, prefix: KeyPath = ()) -> list[KeyPath]:
    paths = []
    for key, value in tree.items():
        paths.append((*prefix, str(key)))
        if isinstance(value, dict):
            paths.extend(_key_paths(value, (*prefix, str(key))))
    return paths


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(tree: dict, origin: dict[KeyPath, str], overrides: list[str]) -> dict:
    """Apply `section.key=value` strings; values are parsed as YAML scalars (`1e-3`, `true`, `[1, 2]`)."""
    tree = dict(tree)
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"--set expects section.key=value, got {text!r}")
        dotted, value_text = text.split("=", 1)
        key_path = tuple(part for part in dotted.strip().split("."))
        if not all(key_path):
            raise ConfigError(f"--set has an empty key in {dotted!r}")
        value = parse_yaml_text(value_text, f"--set {text}")
        node = tree
        for depth, key in enumerate(key_path[:-1]):
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
            node[key] = child = dict(child)
            node = child
            origin.setdefault(key_path[: depth + 1], "--set")
        node[key_path[-1]] = value
        for sub_path in [key_path, *((*key_path, *p) for p in _key_paths(value if isinstance(value, dict) else {}))]:
            origin[sub_path] = f"--set {text}"
    return tree


def _closest_key(key: str, valid: list[str]) -> str | None:
    """The valid key the user most likely meant: a spelling neighbour, or one spelled by the key's initials
    (`learning_rate` -> `lr`)."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return close[0]
    initials = "".join(word[0] for word in key.lower().split("_") if word)
    return initials if len(initials) > 1 and initials in valid else None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (tuple, list):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if annotation is type(None):
        return "null"
    if dataclasses.is_dataclass(annotation):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


class _Validator:
    def __init__(self, origin: dict[KeyPath, str], expand_env: bool):
        self.origin = origin
        self.expand_env = expand_env

    def where(self, key_path: KeyPath) -> str:
        for cut in range(len(key_path), -1, -1):
            if key_path[:cut] in self.origin:
                return self.origin[key_path[:cut]]
        return "<recipe>"

    def build(self, cls: type, raw: Any, key_path: KeyPath) -> Any:
        dotted = ".".join(key_path) or "<top level>"
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.where(key_path)}: '{dotted}' must be a mapping, got {raw!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in fields:
                close = _closest_key(str(key), list(fields))
                hint = f"; did you mean '{close}'?" if close else f"; valid keys: {', '.join(fields)}"
                bad = ".".join((*key_path, str(key)))
                raise ConfigError(f"{self.where((*key_path, str(key)))}: unknown key '{bad}'{hint}")
        values = {}
        for name, fld in fields.items():
            child_path = (*key_path, name)
            if name not in raw:
                if fld.metadata.get("required"):
                    raise ConfigError(f"{self.where(key_path)}: required key '{'.'.join(child_path)}' is missing "
                                      f"({fld.metadata['doc']})")
                continue
            values[name] = self.convert(hints[name], raw[name], child_path, fld.metadata.get("path", False))
        return cls(**values)

    def convert(self, annotation: Any, value: Any, key_path: KeyPath, is_path: bool) -> Any:
        dotted = ".".join(key_path)

        def wrong_type() -> ConfigError:
            return ConfigError(f"{self.where(key_path)}: '{dotted}' must be {_type_name(annotation)}, "
                               f"got {value!r} ({type(value).__name__})")

        if dataclasses.is_dataclass(annotation):
            return self.build(annotation, value, key_path)
        origin = typing.get_origin(annotation)
        if origin in (Union, types.UnionType):
            for option in typing.get_args(annotation):
                if option is type(None) and value is None:
                    return None
            for option in typing.get_args(annotation):
                if option is type(None):
                    continue
                try:
                    return self.convert(option, value, key_path, is_path)
                except ConfigError:
                    pass
            raise wrong_type()
        if origin is Literal:
            if value not in typing.get_args(annotation) or isinstance(value, bool):
                raise wrong_type()
            return value
        if origin in (tuple, list):
            args = typing.get_args(annotation)
            if not isinstance(value, (list, tuple)):
                raise wrong_type()
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise wrong_type()
                return tuple(self.convert(a, v, key_path, is_path) for a, v in zip(args, value))
            item_type = args[0] if args else Any
            converted = [self.convert(item_type, v, key_path, is_path) for v in value]
            return tuple(converted) if origin is tuple else converted
        if annotation is bool:
            if not isinstance(value, bool):
                raise wrong_type()
            return value
        if annotation is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise wrong_type()
            return value
        if annotation is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise wrong_type()
            return float(value)
        if annotation is str:
            if not isinstance(value, str):
                raise wrong_type()
            return self.expand(value, key_path) if is_path else value
        if annotation is Any:
            return value
        raise TypeError(f"schema type {annotation!r} of '{dotted}' is not supported by the loader")

    def expand(self, value: str, key_path: KeyPath) -> str:
        if not self.expand_env:
            return value

        def substitute(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{self.where(key_path)}: '{'.'.join(key_path)}' = {value!r} uses environment "
                                  f"variable {name}, which is not set")
            return os.environ[name]

        return os.path.expanduser(_ENV_VAR.sub(substitute, value))


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, *, expand_env: bool = True) -> Recipe:
    """Read, merge, override and validate a recipe. Raises ConfigError with a one-line message."""
    tree, origin = _read_recipe_file(Path(path))
    origin[()] = str(Path(path).resolve())  # errors about whole sections name the recipe the user gave
    tree = apply_overrides(tree, origin, list(overrides or []))
    return _Validator(origin, expand_env).build(Recipe, tree, ())


def recipe_to_dict(recipe: Any) -> Any:
    """Plain dict/list form of a recipe (tuples become lists), for YAML and JSON."""
    if dataclasses.is_dataclass(recipe):
        return {f.name: recipe_to_dict(getattr(recipe, f.name)) for f in dataclasses.fields(recipe)}
    if isinstance(recipe, (list, tuple)):
        return [recipe_to_dict(v) for v in recipe]
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what resolved.yaml holds and --print-config prints)."""
    return yaml.dump(recipe_to_dict(recipe), Dumper=_RecipeYamlDumper, sort_keys=False, default_flow_style=False)


def describe_schema(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every field, for documentation."""
    rows = []
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        key = f"{prefix}{fld.name}"
        annotation = hints[fld.name]
        if dataclasses.is_dataclass(annotation):
            rows.append((key, "section", "required" if fld.metadata.get("required") else "", fld.metadata["doc"]))
            rows.extend(describe_schema(annotation, key + "."))
            continue
        if fld.metadata.get("required"):
            default = "required"
        elif fld.default is not dataclasses.MISSING:
            default = repr(recipe_to_dict(fld.default))
        else:
            default = repr(recipe_to_dict(fld.default_factory()))
        bounds = fld.metadata.get("bounds")
        text = fld.metadata["doc"] + (f" Must be {bounds.describe()}." if bounds is not None else "")
        rows.append((key, _type_name(annotation), default, text))
    return rows
