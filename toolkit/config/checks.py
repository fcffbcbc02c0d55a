# Recipe checks after type validation: every field's declared bounds, then what crosses fields (divisibility, pairs).
"""Semantic checks run after type validation; each error names the key, the value and what is expected. The
range of a single field is declared with the field in the schema (`Bounds`: ge/gt/le/lt in doc() or
required()) and checked here for every field that has one; only checks that involve more than one value, a
set of values or a divisibility are written out below."""

from __future__ import annotations

import dataclasses

from toolkit.config.schema import Recipe
from toolkit.errors import ConfigError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_bounds(section, prefix: str = "") -> None:
    """ConfigError for the first field (in schema order, sections recursively) outside its declared Bounds."""
    for fld in dataclasses.fields(section):
        value = getattr(section, fld.name)
        if dataclasses.is_dataclass(value):
            check_bounds(value, f"{prefix}{fld.name}.")
            continue
        bounds = fld.metadata.get("bounds")
        if bounds is not None and not bounds.contains(value):
            raise ConfigError(f"{prefix}{fld.name} must be {bounds.describe()}, got {value}")


def check_recipe(recipe: Recipe) -> Recipe:
    """Raise ConfigError for values that are well-typed but impossible; return the recipe unchanged."""
    check_bounds(recipe)
    data, syn = recipe.data, recipe.data.synthetic
    _require(data.batch_size >= 0, f"data.batch_size must be positive, got {data.batch_size}")
    _require(data.global_batch_size >= 0, f"data.global_batch_size must be positive, got {data.global_batch_size}")
    _require((data.batch_size > 0) != (data.global_batch_size > 0),
             f"give exactly one of data.batch_size (per rank) and data.global_batch_size (0 = not given); "
             f"got data.batch_size={data.batch_size}, data.global_batch_size={data.global_batch_size}")
    _require(data.image_size >= 16 and data.image_size % 16 == 0,
             f"data.image_size must be a positive multiple of 16, got {data.image_size}")
    _require(data.backend == "synthetic" or bool(data.manifest),
             f"data.backend {data.backend!r} reads shards: set data.manifest to their manifest.json "
             "(written by launch/prepare_data.py)")
    _require(data.backend != "dali" or data.samples_per_label == 1,
             f"data.backend 'dali' does not build identity-grouped batches (data.samples_per_label="
             f"{data.samples_per_label}); use data.backend 'webdataset' for them")
    folds = recipe.eval.num_folds
    _require(syn.num_val_pairs >= 2 * folds and syn.num_val_pairs % (2 * folds) == 0,
             f"data.synthetic.num_val_pairs must be a positive multiple of 2 * eval.num_folds = {2 * folds} "
             f"(equal positives and negatives in every fold), got {syn.num_val_pairs}")
    head = recipe.head
    _require(0.0 <= head.margin_m2 < 3.1416, f"head.margin_m2 must be in [0, pi), got {head.margin_m2}")
    con = recipe.contrastive
    _require(head.weight > 0 or con.weight > 0,
             "head.weight and contrastive.weight are both 0: at least one objective must be on")
    views = data.views
    for name, p in (("color_jitter_p", views.color_jitter_p), ("grayscale_p", views.grayscale_p),
                    ("blur_p", views.blur_p)):
        _require(0.0 <= p <= 1.0, f"data.views.{name} must be a probability in [0, 1], got {p}")
    _require(0 < views.blur_sigma[0] <= views.blur_sigma[1],
             f"data.views.blur_sigma must be (low, high) with 0 < low <= high, got {list(views.blur_sigma)}")
    sched = recipe.schedule
    _require(sched.warmup_steps == 0 or sched.warmup_epochs == 0,
             f"give at most one of schedule.warmup_steps and schedule.warmup_epochs (0 = not given); "
             f"got schedule.warmup_steps={sched.warmup_steps}, schedule.warmup_epochs={sched.warmup_epochs}")
    par = recipe.parallel
    _require(par.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {par.zero_stage}")
    return recipe
