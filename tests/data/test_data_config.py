# Recipe wiring of the shard backends: builders read the manifest; checks refuse impossible data settings.
from __future__ import annotations

import pytest

from toolkit.config import load_config
from toolkit.training import builders
from toolkit.errors import ConfigError, FaceCLError


def test_builders_read_class_count_and_size_from_the_manifest(even_shards, tiny_recipe, monkeypatch):
    monkeypatch.setenv("FACECL_TEST_DATA", str(even_shards.parent))
    recipe = tiny_recipe("data.backend=webdataset", "data.manifest=${FACECL_TEST_DATA}/manifest.json",
                         "data.image_size=16")
    assert recipe.data.manifest == str(even_shards)
    train_set = builders.build_train_set(recipe)
    assert train_set.num_classes == 16 and len(train_set) == 80
    shape = builders.build_run_shape(recipe, len(train_set), world_size=2)
    stream = builders.build_train_stream(recipe, train_set, shape, rank=1)
    images, labels = stream.next_batch()
    assert images.shape == (8, 3, 16, 16) and stream.batches_per_epoch == 5 and stream.skip_stats() == {}
    with pytest.raises(ConfigError, match="smaller than one global batch"):
        builders.build_train_stream(recipe, train_set, builders.build_run_shape(recipe, 800, world_size=12))


def test_unimoco_recipe_gets_two_views_and_groups(grouped_shards, tiny_recipe):
    recipe = tiny_recipe("data.backend=webdataset", f"data.manifest={grouped_shards}", "data.image_size=16",
                         "data.samples_per_label=2", "contrastive.weight=1.0", "data.num_workers=0")
    train_set = builders.build_train_set(recipe)
    stream = builders.build_train_stream(recipe, train_set, builders.build_run_shape(recipe, len(train_set)))
    images, labels = stream.next_batch()
    assert images.shape == (8, 2, 3, 16, 16)
    assert all(labels[0::2] == labels[1::2])


def test_missing_manifest_and_impossible_settings_are_one_line_errors(tiny_recipe, tmp_path):
    with pytest.raises(ConfigError, match="set data.manifest"):
        tiny_recipe("data.backend=webdataset")
    with pytest.raises(ConfigError, match="max_skipped_fraction must be in"):
        tiny_recipe("data.max_skipped_fraction=1.5")
    with pytest.raises(ConfigError, match="identity-grouped"):
        tiny_recipe("data.backend=dali", "data.manifest=m.json", "data.samples_per_label=2")
    recipe = tiny_recipe("data.backend=webdataset", f"data.manifest={tmp_path}/none.json")
    with pytest.raises(FaceCLError, match="manifest not found"):
        builders.build_train_set(recipe)


@pytest.mark.parametrize("name", ["ms1mv3_r100.yaml", "glint360k_r100.yaml"])
def test_real_data_recipes_read_shards_under_data_root(name, monkeypatch):
    from tests.conftest import REPO

    monkeypatch.setenv("DATA_ROOT", "/datasets")
    recipe = load_config(REPO / "recipes" / name)
    assert recipe.data.backend == "webdataset"
    assert recipe.data.manifest.startswith("/datasets/") and recipe.data.manifest.endswith("/manifest.json")
    assert recipe.model.backbone == "iresnet100"
