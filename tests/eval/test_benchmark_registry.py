# A benchmark kind is one class and its registration: a toy kind runs through launch/evaluate.py, the results
# table, feature files and training without a change anywhere else; detection order and its error line.
import json
import re

import numpy as np
import pytest
import torch

from launch.evaluate import main
from tests.eval.factories import ColourNet, write_identity_folder
from toolkit.data.labelled_images import LabelledFolder
from toolkit.errors import FaceCLError
from toolkit.eval.benchmark import Benchmark, TableCell, benchmark_for, register_benchmark, registered_kinds


@pytest.fixture
def toy_kind(monkeypatch):
    """Registers kind "toy" for one test: a folder of identity sub-folders holding a toy.txt; its metric is the
    mean cosine of same-identity pairs minus that of other pairs, shown in a results-table column "Toy"."""
    import toolkit.eval.benchmark as registry

    registered_kinds()   # the built-in kinds are in; the test's registration goes into a copy
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_benchmark("toy", order=80)   # before all_to_all, which takes any folder of sub-folders
    class Toy(Benchmark):
        description = "a folder of identity sub-folders with a toy.txt"

        @classmethod
        def detect(cls, path):
            return path.is_dir() and (path / "toy.txt").is_file()

        @property
        def num_images(self):
            return len(LabelledFolder(self.path))

        def images(self, image_size):
            return LabelledFolder(self.path, image_size)

        def score(self, emb_ND, status_N, *, output_dir=None, rank=0, world_size=1, group=None, model_name="model"):
            result = self.result_head(status_N)
            labels = LabelledFolder(self.path).labels_N
            unit = torch.nn.functional.normalize(torch.as_tensor(emb_ND), dim=1)
            cosine = (unit @ unit.T).numpy()
            same = labels[:, None] == labels[None, :]
            genuine = same & ~np.eye(len(labels), dtype=bool)
            result["separation"] = float(cosine[genuine].mean() - cosine[~same].mean())
            return result

        @classmethod
        def summary_lines(cls, name, result):
            return [f"{name}: separation {result['separation']:.4f}{cls.skipped_note(result)}"]

        @classmethod
        def table_cells(cls, name, result):
            return [TableCell.of_fraction("Toy", result["separation"])]

        @classmethod
        def scalars(cls, result):
            return {"separation": result["separation"]}

    return Toy


@pytest.fixture
def toy_folder(tmp_path):
    root = tmp_path / "toy"
    write_identity_folder(root, num_identities=5, per_identity=4)
    (root / "toy.txt").write_text("a toy benchmark\n")
    return root


def test_built_in_kinds_are_asked_in_a_fixed_order():
    assert [cls.kind for cls in registered_kinds()] == ["verification", "ijb", "all_to_all"]


def test_a_new_kind_runs_through_evaluate_py_the_table_and_feature_files(toy_kind, toy_folder, tmp_path,
                                                                          monkeypatch, capsys):
    from toolkit.eval import models
    from toolkit.eval.models import Embedder

    monkeypatch.setattr(models, "load_model", lambda path, device=None: Embedder.from_module(
        ColourNet(16), name="colour", image_size=32))
    common = ["--num-workers", "0", "--no-progress", "--batch-size", "8"]
    assert main(["--model", "colour", "--benchmark", f"toy={toy_folder}", "--output", str(tmp_path / "a"),
                 "--save-features", str(tmp_path / "f.npz"), *common]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "evaluation.json").read_text())
    result = report["benchmarks"]["toy"]
    assert result["kind"] == "toy" and result["num_images"] == 20 and result["separation"] > 0.1
    assert f"toy: separation {result['separation']:.4f}" in printed
    assert "| model | Toy |" in printed   # the kind's column, the only metric measured
    assert report["table_row"]["Toy"] == pytest.approx(100 * result["separation"])
    # Cached features are re-scored from the kind's metadata (num_images), without the model.
    assert main(["--features", str(tmp_path / "f.npz"), "--benchmark", f"toy={toy_folder}",
                 "--output", str(tmp_path / "b"), *common]) == 0
    assert json.loads((tmp_path / "b" / "evaluation.json").read_text())["benchmarks"]["toy"] == result
    capsys.readouterr()
    assert main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert len(rows) == 2 and all(f"| {report['table_row']['Toy']:.2f} |" in row for row in rows)


def test_a_new_kind_is_evaluated_during_training(toy_kind, toy_folder, tiny_recipe, capsys):
    from toolkit.training.run_files import prepare_run_folder
    from toolkit.training.trainer import Trainer

    recipe = tiny_recipe("run.name=toy", f"eval.sets=[{toy_folder}]", "train.num_epochs=0.2")
    trainer = Trainer(recipe, prepare_run_folder(recipe), verbose=True)
    assert isinstance(trainer.val_sets["toy"], toy_kind)
    trainer.fit()
    (entry,) = trainer.result.evaluations
    assert entry["set"] == "toy" and entry["kind"] == "toy" and entry["num_images"] == 20
    assert re.search(rf"eval toy: separation {entry['separation']:.4f}", capsys.readouterr().out)
    assert trainer.final_verification() is None   # not a 10-fold pair set


def test_detection_order_and_the_line_when_no_kind_matches(toy_kind, toy_folder, tmp_path):
    assert benchmark_for(toy_folder, "t").kind == "toy"
    (toy_folder / "toy.txt").unlink()
    assert benchmark_for(toy_folder, "t").kind == "all_to_all"   # the same folder, without the marker
    (tmp_path / "empty").mkdir()
    with pytest.raises(FaceCLError) as error:
        benchmark_for(tmp_path / "empty", "x")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"benchmark x: {tmp_path / 'empty'} is no benchmark input: ")
    kinds = re.findall(r"\((\w+)\)(?:, |$)", message)
    assert kinds == ["verification", "ijb", "toy", "all_to_all"], message


def test_a_kind_is_registered_once_and_only_for_a_benchmark(toy_kind):
    with pytest.raises(ValueError, match="'toy' is already registered by"):
        register_benchmark("toy")(type("OtherToy", (toy_kind,), {}))
    with pytest.raises(TypeError, match="decorates a Benchmark subclass"):
        register_benchmark("not_a_benchmark")(dict)


def test_an_identity_folder_in_eval_sets_is_evaluated_all_to_all(tiny_recipe, tmp_path, capsys):
    """A built-in kind the trainer names nowhere: its result is the evaluation.json entry, its log the TARs."""
    from toolkit.training.run_files import prepare_run_folder
    from toolkit.training.trainer import Trainer

    write_identity_folder(tmp_path / "faces", num_identities=30, per_identity=6)   # 15,660 impostor pairs
    recipe = tiny_recipe("run.name=a2a", f"eval.sets=[{tmp_path / 'faces'}]", "train.num_epochs=0.2")
    trainer = Trainer(recipe, prepare_run_folder(recipe), verbose=True)
    trainer.fit()
    (entry,) = trainer.result.evaluations
    assert entry["set"] == "faces" and entry["kind"] == "all_to_all" and entry["num_genuine"] == 30 * 15
    tar = entry["tar_at_far"]["1e-04"]["tar"]
    assert tar is not None and entry["tar_at_far"]["1e-05"]["tar"] is None
    assert f"eval faces: TAR@FAR=1e-04 {tar:.4f}\n" in capsys.readouterr().out


def test_a_bin_set_that_does_not_split_into_folds_is_one_line(tmp_path, capsys):
    from tests.eval.factories import write_bin

    write_bin(tmp_path / "odd.bin", num_pairs=45)
    features = tmp_path / "f.npz"
    from toolkit.eval.features import save_features

    save_features(features, {"odd": {"features": np.ones((90, 4), np.float32), "status": np.zeros(90, np.int8)}},
                  kinds={"odd": "verification"}, model="m", flip=True)
    assert main(["--features", str(features), "--benchmark", f"odd={tmp_path / 'odd.bin'}",
                 "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'odd.bin'} has 45 pairs, not divisible into 10 folds"]
