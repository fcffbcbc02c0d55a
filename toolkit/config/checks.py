# Cross-field recipe checks that the type schema alone cannot express (ranges, divisibility).
"""Semantic checks run after type validation; each error names the key, the value and what is expected."""

from __future__ import annotations

from toolkit.config.schema import Recipe
from toolkit.errors import ConfigError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_recipe(recipe: Recipe) -> Recipe:
    """Raise ConfigError for values that are well-typed but impossible; return the recipe unchanged."""
    data, syn = recipe.data, recipe.data.synthetic
    _require(data.batch_size >= 0, f"data.batch_size must be positive, got {data.batch_size}")
    _require(data.global_batch_size >= 0, f"data.global_batch_size must be positive, got {data.global_batch_size}")
    _require((data.batch_size > 0) != (data.global_batch_size > 0),
             f"give exactly one of data.batch_size (per rank) and data.global_batch_size (0 = not given); "
             f"got data.batch_size={data.batch_size}, data.global_batch_size={data.global_batch_size}")
    _require(data.image_size >= 16 and data.image_size % 16 == 0,
             f"data.image_size must be a positive multiple of 16, got {data.image_size}")
    _require(data.num_workers >= 0, f"data.num_workers must be >= 0, got {data.num_workers}")
    _require(data.backend == "synthetic" or bool(data.manifest),
             f"data.backend {data.backend!r} reads shards: set data.manifest to their manifest.json "
             "(written by launch/prepare_data.py)")
    _require(0.0 <= data.max_skipped_fraction <= 1.0,
             f"data.max_skipped_fraction must be in [0, 1], got {data.max_skipped_fraction}")
    _require(data.webdataset.window_shards >= 1,
             f"data.webdataset.window_shards must be >= 1, got {data.webdataset.window_shards}")
    _require(data.webdataset.prefetch_batches >= 1,
             f"data.webdataset.prefetch_batches must be >= 1, got {data.webdataset.prefetch_batches}")
    _require(data.dali.num_threads >= 1, f"data.dali.num_threads must be >= 1, got {data.dali.num_threads}")
    _require(data.dali.shuffle_buffer >= 1, f"data.dali.shuffle_buffer must be >= 1, got {data.dali.shuffle_buffer}")
    _require(data.dali.prefetch_batches >= 1,
             f"data.dali.prefetch_batches must be >= 1, got {data.dali.prefetch_batches}")
    _require(data.backend != "dali" or data.samples_per_label == 1,
             f"data.backend 'dali' does not build identity-grouped batches (data.samples_per_label="
             f"{data.samples_per_label}); use data.backend 'webdataset' for them")
    _require(syn.num_identities >= 2, f"data.synthetic.num_identities must be >= 2, got {syn.num_identities}")
    _require(syn.samples_per_identity >= 1,
             f"data.synthetic.samples_per_identity must be >= 1, got {syn.samples_per_identity}")
    _require(syn.num_val_identities >= 2,
             f"data.synthetic.num_val_identities must be >= 2, got {syn.num_val_identities}")
    _require(0.0 <= syn.labeled_fraction <= 1.0,
             f"data.synthetic.labeled_fraction must be in [0, 1], got {syn.labeled_fraction}")
    folds = recipe.eval.num_folds
    _require(folds >= 2, f"eval.num_folds must be >= 2, got {folds}")
    _require(syn.num_val_pairs >= 2 * folds and syn.num_val_pairs % (2 * folds) == 0,
             f"data.synthetic.num_val_pairs must be a positive multiple of 2 * eval.num_folds = {2 * folds} "
             f"(equal positives and negatives in every fold), got {syn.num_val_pairs}")
    _require(recipe.model.embedding_size > 0,
             f"model.embedding_size must be positive, got {recipe.model.embedding_size}")
    _require(0.0 <= recipe.model.dropout < 1.0, f"model.dropout must be in [0, 1), got {recipe.model.dropout}")
    head = recipe.head
    _require(head.scale > 0, f"head.scale must be positive, got {head.scale}")
    _require(head.margin_m1 >= 1.0, f"head.margin_m1 must be >= 1 (1 disables it), got {head.margin_m1}")
    _require(0.0 <= head.margin_m2 < 3.1416, f"head.margin_m2 must be in [0, pi), got {head.margin_m2}")
    _require(0.0 < head.sample_rate <= 1.0, f"head.sample_rate must be in (0, 1], got {head.sample_rate}")
    _require(0.0 <= head.interclass_filter < 1.0,
             f"head.interclass_filter must be in [0, 1) (0 disables), got {head.interclass_filter}")
    _require(head.lr_multiplier > 0, f"head.lr_multiplier must be positive, got {head.lr_multiplier}")
    _require(head.weight >= 0, f"head.weight must be >= 0, got {head.weight}")
    con = recipe.contrastive
    _require(con.weight >= 0, f"contrastive.weight must be >= 0, got {con.weight}")
    _require(head.weight > 0 or con.weight > 0,
             "head.weight and contrastive.weight are both 0: at least one objective must be on")
    _require(con.queue_size >= 0, f"contrastive.queue_size must be >= 0, got {con.queue_size}")
    _require(con.temperature > 0, f"contrastive.temperature must be positive, got {con.temperature}")
    _require(0.0 <= con.momentum < 1.0, f"contrastive.momentum must be in [0, 1), got {con.momentum}")
    _require(con.projection_dim > 0, f"contrastive.projection_dim must be positive, got {con.projection_dim}")
    _require(data.samples_per_label >= 1, f"data.samples_per_label must be >= 1, got {data.samples_per_label}")
    views = data.views
    for name, p in (("color_jitter_p", views.color_jitter_p), ("grayscale_p", views.grayscale_p),
                    ("blur_p", views.blur_p)):
        _require(0.0 <= p <= 1.0, f"data.views.{name} must be a probability in [0, 1], got {p}")
    _require(0 < views.blur_sigma[0] <= views.blur_sigma[1],
             f"data.views.blur_sigma must be (low, high) with 0 < low <= high, got {list(views.blur_sigma)}")
    optim = recipe.optim
    _require(optim.lr > 0, f"optim.lr must be positive, got {optim.lr}")
    _require(optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {optim.weight_decay}")
    _require(optim.reference_batch_size >= 0,
             f"optim.reference_batch_size must be >= 0, got {optim.reference_batch_size}")
    sched = recipe.schedule
    _require(sched.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {sched.warmup_steps}")
    _require(sched.warmup_epochs >= 0, f"schedule.warmup_epochs must be >= 0, got {sched.warmup_epochs}")
    _require(sched.warmup_steps == 0 or sched.warmup_epochs == 0,
             f"give at most one of schedule.warmup_steps and schedule.warmup_epochs (0 = not given); "
             f"got schedule.warmup_steps={sched.warmup_steps}, schedule.warmup_epochs={sched.warmup_epochs}")
    _require(0.0 <= sched.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio must be in [0, 1], got {sched.min_lr_ratio}")
    par = recipe.parallel
    _require(par.grad_accum_steps >= 1, f"parallel.grad_accum_steps must be >= 1, got {par.grad_accum_steps}")
    _require(par.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {par.zero_stage}")
    _require(par.timeout_s > 0, f"parallel.timeout_s must be positive, got {par.timeout_s}")
    _require(par.clip_grad_norm >= 0, f"parallel.clip_grad_norm must be >= 0 (0 disables), got {par.clip_grad_norm}")
    _require(recipe.train.num_epochs > 0, f"train.num_epochs must be positive, got {recipe.train.num_epochs}")
    _require(recipe.train.max_nonfinite_steps >= 1,
             f"train.max_nonfinite_steps must be >= 1, got {recipe.train.max_nonfinite_steps}")
    _require(recipe.run.log_every >= 1, f"run.log_every must be >= 1, got {recipe.run.log_every}")
    _require(recipe.eval.every_steps >= 0, f"eval.every_steps must be >= 0, got {recipe.eval.every_steps}")
    _require(recipe.checkpoint.every_steps >= 0,
             f"checkpoint.every_steps must be >= 0, got {recipe.checkpoint.every_steps}")
    _require(recipe.checkpoint.keep_last >= 0, f"checkpoint.keep_last must be >= 0, got {recipe.checkpoint.keep_last}")
    return recipe
