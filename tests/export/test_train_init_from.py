# train.init_from: a run starts from a consolidated file's backbone and identity centers; a wrong architecture is refused.
import pytest
import torch

from toolkit.export.consolidate import consolidate
from toolkit.training.run_files import prepare_run_folder
from toolkit.training.trainer import Trainer


def test_a_run_starts_from_a_consolidated_file(tiny_recipe, tmp_path):
    source = Trainer(tiny_recipe("run.name=source", "train.num_epochs=0.3", "checkpoint.every_steps=0"),
                     prepare_run_folder(tiny_recipe("run.name=source")), verbose=False)
    source.fit()
    source.save()
    out = tmp_path / "model.safetensors"
    consolidate(source.run_dir, out, with_head=True, progress=False)
    recipe = tiny_recipe("run.name=fine_tune", f"train.init_from={out}", "run.seed=7")
    trainer = Trainer(recipe, prepare_run_folder(recipe), verbose=False)
    expected = source.backbone.unwrapped().state_dict()
    got = trainer.backbone.unwrapped().state_dict()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert torch.equal(trainer.head.module.centers_CD, source.head.module.centers_CD)
    fresh = Trainer(tiny_recipe("run.name=fresh", "run.seed=7"), prepare_run_folder(tiny_recipe("run.name=fresh")),
                    verbose=False)
    assert not torch.equal(fresh.head.module.centers_CD, trainer.head.module.centers_CD)  # the test can fail


def test_init_from_another_architecture_is_a_one_line_error(tiny_recipe, tmp_path):
    from toolkit.errors import FaceCLError

    source = Trainer(tiny_recipe("run.name=source2", "train.num_epochs=0.2"), prepare_run_folder(
        tiny_recipe("run.name=source2")), verbose=False)
    source.save()
    out = tmp_path / "model.safetensors"
    consolidate(source.run_dir, out, progress=False)
    recipe = tiny_recipe("run.name=wrong", f"train.init_from={out}", "model.embedding_size=64")
    with pytest.raises(FaceCLError, match="embedding_size"):
        Trainer(recipe, prepare_run_folder(recipe), verbose=False)
