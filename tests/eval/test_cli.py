# launch/evaluate.py end to end on synthetic benchmarks: ONNX and torch models, feature files, bad input.
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from launch.evaluate import main
from tests.eval.factories import (ColourNet, export_onnx, write_bin, write_identity_folder, write_ijb_release)
from toolkit.eval.features import load_features, save_features


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    write_bin(root / "lfw.bin", num_pairs=40)
    write_ijb_release(root / "IJBC", num_subjects=10, templates_per_subject=3)
    write_identity_folder(root / "faces", num_identities=8, per_identity=5)
    export_onnx(ColourNet(16), root / "colour.onnx", image_size=112)
    return root


def run_cli(*argv) -> int:
    return main([*argv, "--num-workers", "0", "--no-progress", "--batch-size", "64"])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_onnx_model_every_benchmark_then_rescore_from_features(data, tmp_path, capsys):
    out = tmp_path / "out"
    feats = tmp_path / "feats.npz"
    code = run_cli("--model", str(data / "colour.onnx"), "--benchmark", f"lfw={data / 'lfw.bin'}",
                   "--benchmark", f"ijbc={data / 'IJBC'}", "--benchmark", f"mfr={data / 'faces'}",
                   "--output", str(out), "--save-features", str(feats))
    assert code == 0
    printed = capsys.readouterr().out
    assert "| model | LFW | IJB-C 1e-6 |" in printed
    report = json.loads((out / "evaluation.json").read_text())
    lfw, ijbc, mfr = (report["benchmarks"][k] for k in ("lfw", "ijbc", "mfr"))
    assert lfw["num_pairs"] == 40 and 0.5 <= lfw["accuracy_mean"] <= 1.0
    assert ijbc["benchmark"] == "IJB-C" and ijbc["num_skipped"] == 0
    assert ijbc["verification"]["tar_at_far"]["1e-01"]["tar"] > 0.5  # colour-coded subjects separate
    assert ijbc["verification"]["tar_at_far"]["1e-06"]["tar"] is None  # 400-odd impostor pairs only
    assert set(ijbc["identification"]) == {"G1", "G2", "mean"}
    assert (out / "roc_ijbc.png").read_bytes()[:4] == b"\x89PNG"
    assert mfr["num_images"] == 40 and mfr["num_genuine"] == 8 * 10
    assert report["table_row"]["LFW"] == pytest.approx(100 * lfw["accuracy_mean"])
    # Re-scoring the saved features without the model gives the same numbers.
    out2 = tmp_path / "out2"
    assert run_cli("--features", str(feats), "--benchmark", f"lfw={data / 'lfw.bin'}",
                   "--benchmark", f"ijbc={data / 'IJBC'}", "--benchmark", f"mfr={data / 'faces'}",
                   "--output", str(out2)) == 0
    again = json.loads((out2 / "evaluation.json").read_text())
    for name in ("lfw", "ijbc", "mfr"):
        a, b = dict(report["benchmarks"][name]), dict(again["benchmarks"][name])
        a.pop("roc_png", None), b.pop("roc_png", None)
        assert a == b
    capsys.readouterr()
    assert main(["--compare", str(out), str(out2 / "evaluation.json"), "--output", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) >= 4 and table[2].startswith(f"| colour ({out}) |")   # one model twice: labelled by folder
    rows = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"]
    assert len(rows) == 2 and all(row["LFW"] == report["table_row"]["LFW"] for row in rows.values())


def test_flip_is_on_by_default_and_can_be_turned_off(data, tmp_path):
    for flag, name in (((), "flip"), (("--no-flip",), "noflip")):
        assert run_cli("--model", str(data / "colour.onnx"), "--benchmark", f"mfr={data / 'faces'}",
                       "--output", str(tmp_path / name), "--save-features", str(tmp_path / f"{name}.npz"), *flag) == 0
    _, flip = load_features(tmp_path / "flip.npz")
    _, noflip = load_features(tmp_path / "noflip.npz")
    # ColourNet pools 2 x 2 cells, so a mirror image embeds differently: f(x) + f(flip(x)) != 2 f(x).
    assert not np.allclose(flip["mfr"]["features"], 2 * noflip["mfr"]["features"], atol=1e-3)


def _fake_export(monkeypatch, image_size=32, embedding_size=16):
    """The export contract, load_backbone(path, device) -> (eval-mode backbone, metadata), on a registry
    backbone with seeded weights, so the torch path is tested whatever toolkit.export does with files."""
    from toolkit.models import create_backbone

    def load_backbone(path, device="cpu"):
        torch.manual_seed(0)
        model = create_backbone("mobilefacenet", embedding_size=embedding_size, input_size=image_size)
        return model.to(device).eval(), {"backbone": "mobilefacenet", "embedding_size": embedding_size,
                                         "image_size": image_size, "input_normalisation": "(rgb - 127.5) / 127.5",
                                         "step": 7}

    module = types.ModuleType("toolkit.export")
    module.load_backbone = load_backbone
    monkeypatch.setitem(sys.modules, "toolkit.export", module)
    return load_backbone


def test_torch_model_gives_the_numbers_training_prints(data, tmp_path, monkeypatch):
    load_backbone = _fake_export(monkeypatch)
    checkpoint = tmp_path / "step_00000007.pt"
    checkpoint.write_bytes(b"stand-in: the fake load_backbone does not read it")
    out = tmp_path / "out"
    assert run_cli("--model", str(checkpoint), "--benchmark", f"lfw={data / 'lfw.bin'}", "--output", str(out)) == 0
    ours = json.loads((out / "evaluation.json").read_text())["benchmarks"]["lfw"]
    # The trainer's path: evaluate_pairs on the same VerificationBin.
    from toolkit.data.verification_bin import VerificationBin
    from toolkit.eval import evaluate_pairs

    model, _ = load_backbone(checkpoint)
    pairs = VerificationBin(data / "lfw.bin", image_size=32)
    expected = evaluate_pairs(model, pairs, pairs.is_same_P, device=torch.device("cpu"), batch_size=64)
    assert ours["accuracy_mean"] == pytest.approx(expected.accuracy_mean, abs=1e-12)
    assert ours["accuracy_std"] == pytest.approx(expected.accuracy_std, abs=1e-12)
    assert tuple(ours["best_thresholds"]) == expected.best_thresholds


def _extract_rank(rank, world_size, init_file, folder, queue):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    torch.set_num_threads(1)
    from toolkit.eval.extract import extract_embeddings
    from toolkit.eval.models import Embedder
    from toolkit.data.labelled_images import LabelledFolder

    embed = Embedder.from_module(ColourNet(16), name="c", image_size=32)
    emb, status = extract_embeddings(embed, LabelledFolder(folder, 32), batch_size=7, num_workers=0,
                                     rank=rank, world_size=world_size, progress=False)
    queue.put((rank, emb, status))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_extract_the_same_embeddings(data, tmp_path):
    import torch.multiprocessing as mp

    from toolkit.eval.extract import extract_embeddings
    from toolkit.eval.models import Embedder
    from toolkit.data.labelled_images import LabelledFolder

    single, status = extract_embeddings(Embedder.from_module(ColourNet(16), name="c", image_size=32),
                                        LabelledFolder(data / "faces", 32), batch_size=7, num_workers=0,
                                        progress=False)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_extract_rank, args=(r, 2, tmp_path / "init", data / "faces", queue))
             for r in range(2)]
    for p in procs:
        p.start()
    got = {r: (e, s) for r, e, s in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        np.testing.assert_allclose(got[rank][0], single, rtol=1e-5, atol=1e-6)
        assert (got[rank][1] == status).all()


# ---- bad input ----

def test_missing_image_is_skipped_and_counted_below_the_threshold(data, tmp_path, capsys):
    release = tmp_path / "IJBC"
    shutil.copytree(data / "IJBC", release)
    (release / "loose_crop" / "5.jpg").unlink()
    out = tmp_path / "out"
    args = ("--model", str(data / "colour.onnx"), "--benchmark", f"ijbc={release}", "--output", str(out))
    assert run_cli(*args, "--max-skipped-fraction", "0.05") == 0
    result = json.loads((out / "evaluation.json").read_text())["benchmarks"]["ijbc"]
    assert result["num_skipped"] == 1 and result["skipped"] == {"missing or unreadable image": 1}
    assert "1 skipped" in capsys.readouterr().out
    # Above the threshold the run fails with one line and status 2, and the results it was to replace stay.
    earlier = (out / "evaluation.json").read_bytes()
    assert run_cli(*args, "--max-skipped-fraction", "0.001", "--overwrite") == 2
    assert "1 of 120 images skipped" in one_error_line(capsys)
    assert (out / "evaluation.json").read_bytes() == earlier


def test_landmarks_outside_the_image_are_skipped_and_counted(data, tmp_path, capsys):
    release = tmp_path / "IJBC"
    shutil.copytree(data / "IJBC", release)
    path = release / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    name, *rest = lines[3].split()
    lines[3] = " ".join([name, "500", "500", *rest[2:]])
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run_cli("--model", str(data / "colour.onnx"), "--benchmark", f"ijbc={release}", "--output", str(out),
                   "--max-skipped-fraction", "0.05") == 0
    result = json.loads((out / "evaluation.json").read_text())["benchmarks"]["ijbc"]
    assert result["skipped"] == {"unusable landmarks": 1}


def test_metadata_with_wrong_columns_exits_2(data, tmp_path, capsys):
    release = tmp_path / "IJBC"
    shutil.copytree(data / "IJBC", release)
    path = release / "meta" / "ijbc_face_tid_mid.txt"
    path.write_text(path.read_text() + "extra.jpg 1 2 3\n")
    assert run_cli("--model", str(data / "colour.onnx"), "--benchmark", f"ijbc={release}",
                   "--output", str(tmp_path / "o")) == 2
    line = one_error_line(capsys)
    assert "ijbc_face_tid_mid.txt line 121: expected 3 columns" in line


def test_feature_file_of_another_dimension_exits_2(data, tmp_path, capsys):
    good = tmp_path / "good.npz"
    assert run_cli("--model", str(data / "colour.onnx"), "--benchmark", f"lfw={data / 'lfw.bin'}",
                   "--output", str(tmp_path / "o"), "--save-features", str(good)) == 0
    meta, entries = load_features(good)
    entries["lfw"]["features"] = np.zeros((80, 8), np.float32)  # the metadata says 16
    bad = tmp_path / "bad.npz"
    arrays = {"__meta__": np.array(json.dumps(meta)), "lfw/features": entries["lfw"]["features"],
              "lfw/status": entries["lfw"]["status"]}
    np.savez(bad, **arrays)
    capsys.readouterr()
    assert run_cli("--features", str(bad), "--benchmark", f"lfw={data / 'lfw.bin'}",
                   "--output", str(tmp_path / "o2")) == 2
    assert "features have shape (80, 8), expected N x 16" in one_error_line(capsys)
    # Two feature sets of different dimensions cannot be saved as one file either.
    with pytest.raises(Exception, match="different dimensions"):
        save_features(tmp_path / "x.npz", {"a": {"features": np.zeros((2, 3)), "status": np.zeros(2)},
                                           "b": {"features": np.zeros((2, 4)), "status": np.zeros(2)}},
                      kinds={"a": "verification", "b": "verification"}, model="m", flip=True)


def test_feature_file_for_another_benchmark_size_exits_2(data, tmp_path, capsys):
    feats = tmp_path / "f.npz"
    save_features(feats, {"lfw": {"features": np.ones((10, 16), np.float32), "status": np.zeros(10, np.int8)}},
                  kinds={"lfw": "verification"}, model="m", flip=True)
    assert run_cli("--features", str(feats), "--benchmark", f"lfw={data / 'lfw.bin'}",
                   "--output", str(tmp_path / "o")) == 2
    assert "has 10 feature rows but" in one_error_line(capsys)


@pytest.mark.parametrize("filename, content", [("model.onnx", b"not an onnx graph"),
                                               ("model.pt", b"not a checkpoint either")])
def test_a_file_that_is_not_a_model_exits_2(data, tmp_path, capsys, filename, content):
    path = tmp_path / filename
    path.write_bytes(content)
    assert run_cli("--model", str(path), "--benchmark", f"lfw={data / 'lfw.bin'}", "--output", str(tmp_path / "o")) == 2
    assert str(path) in one_error_line(capsys)


def test_usage_errors_exit_2(data, tmp_path, capsys):
    assert run_cli("--model", str(data / "colour.onnx"), "--benchmark", "lfw") == 2
    assert "NAME=PATH" in one_error_line(capsys)
    assert run_cli("--model", str(data / "colour.onnx"), "--benchmark", f"x={tmp_path / 'nope'}") == 2
    assert "path not found" in one_error_line(capsys)
    assert main(["--compare", str(tmp_path)]) == 2
    assert "no evaluation.json" in one_error_line(capsys)


def test_default_output_of_a_run_folder_is_its_eval_folder(data, tmp_path, monkeypatch, capsys):
    _fake_export(monkeypatch)
    run = tmp_path / "runs" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    assert run_cli("--model", str(run), "--benchmark", f"lfw={data / 'lfw.bin'}") == 0
    assert (run / "eval" / "latest" / "evaluation.json").is_file()
    capsys.readouterr()
    assert main(["--compare", str(run)]) == 0
    assert "| r1 |" in capsys.readouterr().out


def test_all_to_all_from_shards_equals_the_same_faces_in_a_folder(data, tmp_path):
    from toolkit.data.shards import Manifest, ShardEntry, ShardWriter, sample_key
    from tests.eval.factories import jpeg_bytes, subject_colour

    rng = np.random.default_rng(3)
    (tmp_path / "shards").mkdir()
    writer = ShardWriter(tmp_path / "shards" / "s-000000.tar")
    for identity in range(5):
        (tmp_path / "faces" / f"id{identity}").mkdir(parents=True)
        for k in range(3):
            image = np.clip(subject_colour(identity) + rng.integers(-30, 30, size=(32, 32, 3)), 0, 255)
            jpeg = jpeg_bytes(image.astype(np.uint8))
            (tmp_path / "faces" / f"id{identity}" / f"{k}.jpg").write_bytes(jpeg)
            writer.add(sample_key(identity, k), jpeg, identity)
    size, sha = writer.close()
    manifest = Manifest(num_classes=5, num_samples=15, image_size=32, group_size=3,
                        shards=[ShardEntry("s-000000.tar", 15, 5, sha, size)], root=tmp_path / "shards")
    (tmp_path / "shards" / "manifest.json").write_text(manifest.to_json())
    reports = {}
    for name, path in (("folder", tmp_path / "faces"), ("shards", tmp_path / "shards" / "manifest.json")):
        assert run_cli("--model", str(data / "colour.onnx"), "--benchmark", f"mfr={path}",
                       "--output", str(tmp_path / name)) == 0
        reports[name] = json.loads((tmp_path / name / "evaluation.json").read_text())["benchmarks"]["mfr"]
    assert reports["shards"]["num_genuine"] == 5 * 3
    assert reports["shards"]["tar_at_far"] == reports["folder"]["tar_at_far"]


def test_all_to_all_on_a_features_and_labels_npz(data, tmp_path):
    from tests.eval.test_all_to_all import brute_force

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 30, 400)
    feats = (rng.normal(0, 1, (30, 8))[labels] + rng.normal(0, 1, (400, 8))).astype(np.float32)
    np.savez(tmp_path / "mfr.npz", features=feats, labels=labels)
    assert run_cli("--model", str(data / "colour.onnx"), "--benchmark", f"mfr={tmp_path / 'mfr.npz'}",
                   "--output", str(tmp_path / "o")) == 0
    got = json.loads((tmp_path / "o" / "evaluation.json").read_text())["benchmarks"]["mfr"]
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    expected = brute_force(unit, labels, (1e-4,))["1e-04"]
    assert got["tar_at_far"]["1e-04"]["threshold"] == pytest.approx(expected["threshold"], abs=2e-6)
    assert got["tar_at_far"]["1e-06"]["tar"] is None  # 76,000-odd impostor pairs


def test_every_rank_gets_the_same_batches():
    from toolkit.eval.extract import _Slice

    data = [(torch.full((1,), float(i)), 0) for i in range(10)]
    slices = [_Slice(data, r * 4, 4) for r in range(3)]  # 10 items over 3 ranks: chunks of 4
    assert [len(s) for s in slices] == [4, 4, 4]
    assert [float(slices[2][i][0]) for i in range(4)] == [8.0, 9.0, 9.0, 9.0]  # padded with the last item
