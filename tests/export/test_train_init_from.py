# train.init_from: a run starts from a consolidated file's or arcface_torch's backbone and centers; wrong ones refused.
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


def test_a_run_starts_from_an_arcface_torch_mbf_and_its_softmax_files(tiny_recipe, tmp_path):
    # Their mbf (naming re-stated in tests/export/test_init_from.py) at the tiny recipe's 16x16, 32-d, 12 classes.
    from tests.export.test_init_from import TheirMobileFaceNet, bn_stats_, split

    torch.manual_seed(0)
    their = bn_stats_(TheirMobileFaceNet((1, 4, 6, 2), 2, num_features=32, gdc_kernel=1), seed=3)
    folder = tmp_path / "arcface_torch"
    folder.mkdir()
    torch.save({"module." + k: v for k, v in their.state_dict().items()}, folder / "model.pt")
    centers = torch.randn(12, 32)
    start = 0
    for rank, count in enumerate(split(12, 5)):
        torch.save({"epoch": 1, "state_dict_softmax_fc": {"weight": centers[start:start + count].clone()}},
                   folder / f"checkpoint_gpu_{rank}.pt")
        start += count
    recipe = tiny_recipe("run.name=from_mbf", "model.backbone=mobilefacenet_mbf",
                         f"train.init_from={folder / 'model.pt'}", f"train.init_from_softmax={folder}")
    trainer = Trainer(recipe, prepare_run_folder(recipe), verbose=False)
    got = trainer.backbone.unwrapped().state_dict()
    assert torch.equal(got["stem_grouped.0.weight"], their.layers[1].layers[0].weight)
    assert torch.equal(got["embedding_bn.running_var"], their.features.layers[3].running_var)
    assert torch.equal(trainer.head.module.centers_CD, centers)
