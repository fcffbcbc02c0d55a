# launch/evaluate.py never replaces earlier results silently: a new folder per evaluation with a `latest` link, and a
# given --output (or --save-features, or --compare's --output) that holds results is refused without --overwrite.
import json
import os
from datetime import datetime, timezone

import pytest

from launch.evaluate import main
from tests.conftest import REPO
from tests.eval.factories import ColourNet, export_onnx, one_error_line, run_cli, write_bin, write_ijb_release


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_outputs")
    write_bin(root / "lfw.bin", num_pairs=40)
    write_bin(root / "agedb_30.bin", num_pairs=20, seed=5)
    write_ijb_release(root / "IJBC", num_subjects=6, templates_per_subject=2)
    export_onnx(ColourNet(16), root / "colour.onnx", image_size=112)
    return root


@pytest.fixture
def colour_model(monkeypatch):
    """Any --model loads as the ColourNet embedder named 'colour' (a run folder included)."""
    from toolkit.eval import models
    from toolkit.eval.models import Embedder

    monkeypatch.setattr(models, "load_model", lambda path, device=None: Embedder.from_module(
        ColourNet(16), name="colour", image_size=32))


def evaluations(base):
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.is_symlink())


def test_a_second_evaluation_of_a_run_keeps_the_first(data, tmp_path, colour_model, capsys):
    run = tmp_path / "runs" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    assert run_cli("--model", str(run), "--benchmark", f"lfw={data / 'lfw.bin'}") == 0
    (first,) = evaluations(run / "eval")
    first_json = (run / "eval" / first / "evaluation.json").read_bytes()
    assert f"written: {run / 'eval' / first}/evaluation.json ({run / 'eval' / 'latest'} points here)" in \
        capsys.readouterr().out
    assert run_cli("--model", str(run), "--benchmark", f"agedb_30={data / 'agedb_30.bin'}", "--name", "agedb") == 0
    second = [name for name in evaluations(run / "eval") if name != first]
    assert len(second) == 1 and second[0].endswith("-agedb")
    assert (run / "eval" / first / "evaluation.json").read_bytes() == first_json   # byte-identical
    assert os.readlink(run / "eval" / "latest") == second[0]
    # Both are found: the run (through eval/latest) is the newest, the first by its folder.
    capsys.readouterr()
    assert main(["--compare", str(run), str(run / "eval" / first)]) == 0
    table = capsys.readouterr().out
    newest = json.loads((run / "eval" / second[0] / "evaluation.json").read_text())
    assert set(newest["benchmarks"]) == {"agedb_30"}
    assert f"| colour ({run / 'eval' / second[0]}) |" in table and f"| colour ({run / 'eval' / first}) |" in table


def test_a_model_file_evaluates_into_eval_results_which_git_ignores(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert run_cli("--model", str(data / "colour.onnx"), "--benchmark", f"lfw={data / 'lfw.bin'}") == 0
    base = tmp_path / "eval_results" / "colour"
    assert len(evaluations(base)) == 2 and (base / "latest" / "evaluation.json").is_file()
    assert "/eval_results/" in (REPO / ".gitignore").read_text().splitlines()
    capsys.readouterr()
    assert main(["--compare", "eval_results/colour"]) == 0
    assert "| colour |" in capsys.readouterr().out


def test_evaluations_in_the_same_second_get_their_own_folders(tmp_path):
    from toolkit.eval.outputs import new_evaluation_folder

    now = datetime(2025, 3, 1, 14, 25, 1, tzinfo=timezone.utc)
    folders = [new_evaluation_folder(tmp_path, "x", now=now) for _ in range(3)]
    assert [f.name for f in folders] == ["20250301T142501Z-x", "20250301T142501Z-x-2", "20250301T142501Z-x-3"]


def test_a_given_output_with_results_is_refused_before_any_work(data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ("--benchmark", f"lfw={data / 'lfw.bin'}", "--output", str(out))
    assert run_cli("--model", str(data / "colour.onnx"), *args) == 0
    earlier = (out / "evaluation.json").read_bytes()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model: loading it would fail, so the refusal comes first")
    capsys.readouterr()
    assert run_cli("--model", str(broken), *args) == 2
    line = one_error_line(capsys)
    assert line == (f"error: --output {out} already holds results (evaluation.json, table.md); pass --overwrite "
                    f"to replace them, or leave out --output for a new folder per evaluation")
    assert (out / "evaluation.json").read_bytes() == earlier


def test_overwrite_replaces_a_given_output_and_its_stale_plots(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--model", str(data / "colour.onnx"), "--benchmark", f"ijbc={data / 'IJBC'}",
                   "--output", str(out)) == 0
    assert (out / "roc_ijbc.png").is_file()
    assert run_cli("--model", str(data / "colour.onnx"), "--benchmark", f"lfw={data / 'lfw.bin'}",
                   "--output", str(out), "--overwrite") == 0
    assert set(json.loads((out / "evaluation.json").read_text())["benchmarks"]) == {"lfw"}
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "table.md"]   # the IJB plot went too


def test_an_existing_feature_file_needs_overwrite(data, tmp_path, capsys):
    feats = tmp_path / "f.npz"
    feats.write_bytes(b"earlier features")
    args = ("--model", str(data / "colour.onnx"), "--benchmark", f"lfw={data / 'lfw.bin'}",
            "--output", str(tmp_path / "o"), "--save-features", str(feats))
    assert run_cli(*args) == 2
    assert one_error_line(capsys) == f"error: --save-features {feats} already exists; pass --overwrite to replace it"
    assert feats.read_bytes() == b"earlier features" and not (tmp_path / "o").exists()
    assert run_cli(*args, "--overwrite") == 0
    assert feats.read_bytes()[:2] == b"PK"   # an .npz now


def test_an_earlier_comparison_needs_overwrite(data, tmp_path, capsys):
    assert run_cli("--model", str(data / "colour.onnx"), "--benchmark", f"lfw={data / 'lfw.bin'}",
                   "--output", str(tmp_path / "e")) == 0
    cmp = tmp_path / "cmp"
    assert main(["--compare", str(tmp_path / "e"), "--output", str(cmp)]) == 0
    capsys.readouterr()
    assert main(["--compare", str(tmp_path / "e"), "--output", str(cmp)]) == 2
    assert f"--output {cmp} already holds results (comparison.json, comparison.md)" in one_error_line(capsys)
    assert main(["--compare", str(tmp_path / "e"), "--output", str(cmp), "--overwrite"]) == 0


def test_name_errors_are_one_line(data, tmp_path, capsys):
    model = ("--model", str(data / "colour.onnx"), "--benchmark", f"lfw={data / 'lfw.bin'}")
    assert run_cli(*model, "--name", "a/b") == 2
    assert "--name 'a/b': use letters, digits" in one_error_line(capsys)
    assert run_cli(*model, "--name", "latest") == 2
    one_error_line(capsys)
    assert run_cli(*model, "--name", "x", "--output", str(tmp_path / "o")) == 2
    assert "with --output DIR, name DIR itself" in one_error_line(capsys)


def test_a_failed_default_evaluation_leaves_no_empty_folders(data, tmp_path, monkeypatch, capsys):
    import numpy as np

    from toolkit.eval.features import save_features

    monkeypatch.chdir(tmp_path)
    feats = tmp_path / "f.npz"
    save_features(feats, {"lfw": {"features": np.ones((10, 16), np.float32), "status": np.zeros(10, np.int8)}},
                  kinds={"lfw": "verification"}, model="m", flip=True)
    assert run_cli("--features", str(feats), "--benchmark", f"lfw={data / 'lfw.bin'}") == 2
    assert "has 10 feature rows but" in one_error_line(capsys)
    assert not (tmp_path / "eval_results").exists()
