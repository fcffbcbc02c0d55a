# eval.sets may list an IJB release beside the .bin sets: the trainer logs TAR@FAR, equal to the offline evaluator.
import math
import re

import pytest

from tests.eval.factories import write_ijb_release


def test_the_trainer_evaluates_an_ijb_release(tiny_recipe, tmp_path, capsys):
    from toolkit.eval.ijb import IJBEvaluator
    from toolkit.training.run_files import prepare_run_folder
    from toolkit.training.trainer import Trainer

    root = tmp_path / "IJBC"
    write_ijb_release(root)   # 36 templates, 630 pairs: TAR defined at FAR 1e-2 and 1e-1
    recipe = tiny_recipe("run.name=ijb", f"eval.sets=[{root}]", "train.num_epochs=0.2", "data.num_workers=0",
                         "eval.ijb_max_pairs=0")
    trainer = Trainer(recipe, prepare_run_folder(recipe), verbose=True)
    trainer.fit()
    out = capsys.readouterr().out
    entries = [e for e in trainer.result.evaluations if e["set"] == "IJB-C"]
    assert len(entries) == 1 and entries[0]["num_pairs"] > 0
    assert re.search(r"eval IJB-C: TAR@FAR=\S+ [0-9.]+", out), out[-2000:]
    # The same numbers as the offline evaluator on the trained backbone.
    trainer.backbone.train(False)
    offline = IJBEvaluator(root, image_size=recipe.data.image_size, num_workers=0,
                           fars=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1)).evaluate(trainer._embed)
    for key, value in offline.items():
        if key.startswith("TAR@FAR=") and value is not None:
            assert math.isclose(entries[0][key], value, rel_tol=0, abs_tol=1e-9), key
    assert trainer.final_verification() is None   # no pair set: nothing to call "final verification accuracy"


def test_a_folder_that_is_not_a_release_is_a_one_line_error(tiny_recipe, tmp_path):
    from toolkit.errors import ConfigError
    from toolkit.training.builders import build_val_sets

    (tmp_path / "photos").mkdir()
    with pytest.raises(ConfigError, match="not an IJB-B/IJB-C release"):
        build_val_sets(tiny_recipe(f"eval.sets=[{tmp_path / 'photos'}]"))
