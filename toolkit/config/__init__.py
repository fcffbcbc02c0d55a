# Recipe configuration: schema, loader and checks (recipe -> validated, read-only Recipe).
"""`load_config(path, overrides)` is the one entry point the launchers use."""

from __future__ import annotations

from toolkit.config.checks import check_recipe
from toolkit.config.loader import describe_schema, dump_recipe, load_recipe, recipe_to_dict
from toolkit.config.schema import Recipe


def load_config(path, overrides=None, *, expand_env: bool = True) -> Recipe:
    """Load, validate and check a recipe; every problem is a one-line ConfigError."""
    return check_recipe(load_recipe(path, overrides, expand_env=expand_env))


__all__ = ["Recipe", "load_config", "load_recipe", "check_recipe", "dump_recipe", "recipe_to_dict",
           "describe_schema"]
