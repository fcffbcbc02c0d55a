# DeepSpeed config rendering: every number comes from the recipe; a user file may add, never contradict.
import json

import pytest

from tests.conftest import SMOKE_RECIPE
from toolkit.config import load_config
from toolkit.training.builders import build_run_shape
from toolkit.parallel.deepspeed_config import build_deepspeed_config
from toolkit.errors import ConfigError


def config_for(*overrides, world_size=4):
    recipe = load_config(SMOKE_RECIPE, ["parallel.engine=deepspeed", *overrides])
    shape = build_run_shape(recipe, 8000, world_size)
    return build_deepspeed_config(recipe.parallel, micro_batch_size=shape.batch_size,
                                  grad_accum_steps=shape.grad_accum_steps, global_batch_size=shape.global_batch_size)


def test_rendered_numbers_follow_the_recipe():
    config = config_for("data.batch_size=16", "parallel.grad_accum_steps=3", "parallel.clip_grad_norm=5.0",
                        "parallel.zero_stage=3", "parallel.precision=bf16")
    assert config["train_micro_batch_size_per_gpu"] == 16
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 16 * 3 * 4
    assert config["gradient_clipping"] == 5.0
    assert config["zero_optimization"] == {"stage": 3}
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "fp16" not in config and "bf16" not in config


def test_global_batch_recipe_derives_the_micro_batch():
    config = config_for("data.batch_size=0", "data.global_batch_size=96", "parallel.grad_accum_steps=2")
    assert config["train_micro_batch_size_per_gpu"] == 12 and config["train_batch_size"] == 96


def test_offload_and_fp16_sections():
    config = config_for("parallel.offload_optimizer=true", "parallel.zero_stage=2", "parallel.precision=fp16")
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["fp16"]["enabled"] is True


def test_user_file_adds_settings(tmp_path):
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True,
                                                       "reduce_bucket_size": 5e7}, "train_batch_size": 32}))
    config = config_for("data.batch_size=8", "parallel.zero_stage=2", f"parallel.deepspeed_config={extra}")
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5e7}
    assert config["train_batch_size"] == 32


@pytest.mark.parametrize("user,message", [
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage = 3, but the recipe gives zero_optimization.stage = 2"),
    ({"train_batch_size": 40}, "train_batch_size = 40, but the recipe gives train_batch_size = 32"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps = 2, but the recipe gives "
                                         "gradient_accumulation_steps = 1"),
    ({"optimizer": {"type": "Adam"}}, "sets 'optimizer', but the optimizer comes from the recipe's optim section"),
])
def test_user_file_contradicting_the_recipe_is_an_error(tmp_path, user, message):
    extra = tmp_path / "ds.yaml"
    extra.write_text(json.dumps(user))  # JSON is valid YAML
    with pytest.raises(ConfigError, match="parallel.deepspeed_config") as info:
        config_for("data.batch_size=8", "parallel.zero_stage=2", f"parallel.deepspeed_config={extra}")
    assert message in str(info.value)


def test_missing_user_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config_for(f"parallel.deepspeed_config={tmp_path / 'nope.json'}")
