# launch/evaluate.py: outputs checked before any work, damaged feature files, benchmarks that carry their own features.
import json
import os

import numpy as np
import pytest

from tests.eval.factories import ColourNet, export_onnx, one_error_line, run_cli, write_bin


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_out")
    write_bin(root / "lfw.bin", num_pairs=40)
    export_onnx(ColourNet(16), root / "colour.onnx", image_size=112)
    rng = np.random.default_rng(0)
    np.savez(root / "mfr.npz", features=rng.normal(size=(30, 8)).astype(np.float32), labels=np.repeat(np.arange(6), 5))
    return root


def model_args(data) -> list[str]:
    return ["--model", str(data / "colour.onnx"), "--benchmark", f"lfw={data / 'lfw.bin'}"]


def read_only_folder(tmp_path):
    """A folder this process cannot write: a read-only bind mount for root, permission bits otherwise."""
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir(mode=0o555)
        return folder
    return pytest.importorskip("pathlib").Path("/proc/facecl_eval_out")


def test_an_existing_file_as_output_is_one_line_before_any_work(data, tmp_path, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("keep")
    assert run_cli(*model_args(data), "--output", str(existing)) == 2
    assert f"--output {existing} exists and is not a folder" in one_error_line(capsys)
    assert existing.read_text() == "keep"
    assert run_cli(*model_args(data), "--output", str(existing / "sub")) == 2   # a file in the way
    assert f"--output {existing / 'sub'}: cannot write there (a file is in the way)" in one_error_line(capsys)


@pytest.mark.parametrize("option", ["--output", "--save-features"])
def test_an_unwritable_output_is_one_line_before_any_work(data, tmp_path, capsys, option):
    target = read_only_folder(tmp_path) / ("out" if option == "--output" else "feats.npz")
    other = ["--output", str(tmp_path / "o")] if option == "--save-features" else []
    assert run_cli(*model_args(data), option, str(target), *other) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {option} {target}") and "cannot write" in line, line
    assert not (tmp_path / "o").exists()   # nothing left behind


def test_an_input_error_leaves_no_empty_output_folder(data, tmp_path, capsys):
    out = tmp_path / "new_out"
    assert run_cli("--model", str(data / "colour.onnx"), "--benchmark", f"lfw={tmp_path / 'missing.bin'}",
                   "--output", str(out)) == 2
    one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("damage", ["no_num_images", "list_for_dict", "random_bytes"])
def test_a_damaged_feature_file_is_one_plain_line(data, tmp_path, capsys, damage):
    path = tmp_path / "feats.npz"
    if damage == "random_bytes":
        path.write_bytes(np.random.default_rng(1).bytes(4096))
    else:
        benchmarks = {"lfw": {"kind": "verification"}} if damage == "no_num_images" else [["lfw", 80]]
        meta = {"format": "facecl-features-1", "model": "m", "flip": True, "embedding_size": 8, "benchmarks": benchmarks}
        np.savez(path, __meta__=np.array(json.dumps(meta)), **{"lfw/features": np.zeros((80, 8), np.float32),
                                                               "lfw/status": np.zeros(80, np.int8)})
    assert run_cli("--features", str(path), "--benchmark", f"lfw={data / 'lfw.bin'}",
                   "--output", str(tmp_path / "o")) == 2
    line = one_error_line(capsys)
    assert f"{path} is not a valid feature file" in line, line
    assert "allow_pickle" not in line and "KeyError" not in line


def test_random_bytes_as_a_model_file_is_one_plain_line(data, tmp_path, capsys):
    path = tmp_path / "model.pt"
    path.write_bytes(np.random.default_rng(2).bytes(4096))
    assert run_cli("--model", str(path), "--benchmark", f"lfw={data / 'lfw.bin'}", "--output", str(tmp_path / "o")) == 2
    line = one_error_line(capsys)
    assert f"--model {path} is not a model FaceCL can load" in line and "pickled object of type" not in line, line


def test_a_benchmark_with_its_own_features_needs_no_model(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli("--benchmark", f"mfr={data / 'mfr.npz'}", "--output", str(out)) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["benchmarks"]["mfr"]["num_images"] == 30 and report["benchmarks"]["mfr"]["num_genuine"] == 60
    capsys.readouterr()
    assert run_cli("--benchmark", f"lfw={data / 'lfw.bin'}", "--output", str(out)) == 2
    assert "benchmark(s) lfw need embeddings: give --model MODEL or --features FILE" in one_error_line(capsys)
