# Command-line error handling of launch/train.py: user errors are one `error: ...` line and exit status 2.
"""Each case runs `python launch/train.py` in a subprocess (about 1-3 s each; the file takes well under a minute).

For every bad input: exit status 2, stderr is exactly one non-empty line starting with `error: `, there is
no traceback, and the line names the bad value.
"""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN = REPO_ROOT / "launch" / "train.py"
SMOKE_RECIPE = REPO_ROOT / "recipes" / "smoke_synthetic.yaml"
# A run that started by mistake (a resume error not raised) must still end quickly.
SUBPROCESS_TIMEOUT_S = 120


def run_train(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env_extra or {})}
    return subprocess.run([sys.executable, str(TRAIN), *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, stderr exactly one `error: ...` line, no traceback, and every needle in that line."""
    report = f"exit {proc.returncode}\n--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout[-2000:]}"
    assert proc.returncode == 2, report
    assert "Traceback" not in proc.stderr, report
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, report
    assert proc.stderr.strip() == lines[0].strip(), report
    line = lines[0]
    assert line.startswith("error: "), report
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


@pytest.fixture
def cheap_recipe(tmp_path) -> Path:
    """smoke_synthetic with settings that would make a run short if it started; output under tmp_path."""
    path = tmp_path / "cheap.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(SMOKE_RECIPE),
        "run": {"output_dir": str(tmp_path / "runs"), "trackers": []},
        "data": {"batch_size": 8, "num_workers": 0,
                 "synthetic": {"num_identities": 4, "samples_per_identity": 4, "num_val_identities": 2,
                               "num_val_pairs": 20}},
        "train": {"num_epochs": 0.01},
    }))
    return path


# ----- recipe errors ---------------------------------------------------------------------------------

def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "no_such_recipe.yaml"
    assert_user_error(run_train("--recipe", missing), str(missing))


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("run:\n  name: x\n  output_dir: [runs\nmodel:\n  backbone: mobilefacenet\n")
    line = assert_user_error(run_train("--recipe", bad), str(bad), "line 4")
    assert "malformed YAML" in line


def test_unknown_key(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text(f"base: {SMOKE_RECIPE}\ndata:\n  batchsize: 32\n")
    assert_user_error(run_train("--recipe", bad), str(bad), "data.batchsize", "did you mean 'batch_size'")


def test_unknown_key_from_set():
    assert_user_error(run_train("--recipe", SMOKE_RECIPE, "--set", "optim.lrr=0.1"), "--set", "optim.lrr", "'lr'")


def test_wrong_type():
    assert_user_error(run_train("--recipe", SMOKE_RECIPE, "--set", "data.batch_size=sixty-four"),
                      "data.batch_size", "int", "sixty-four")


def test_semantic_check():
    assert_user_error(run_train("--recipe", SMOKE_RECIPE, "--set", "data.image_size=100"), "data.image_size", "100")


def test_unset_env_var_in_path(monkeypatch):
    monkeypatch.delenv("FACECL_SURELY_UNSET", raising=False)
    assert_user_error(run_train("--recipe", SMOKE_RECIPE, "--set", "run.output_dir=${FACECL_SURELY_UNSET}/runs"),
                      "FACECL_SURELY_UNSET", "run.output_dir")


def test_unknown_backbone(tmp_path):
    assert_user_error(run_train("--recipe", SMOKE_RECIPE, "--set", "model.backbone=iresnet51",
                                "--set", f"run.output_dir={tmp_path / 'runs'}"),
                      "'iresnet51'", "'iresnet50'")


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_unwritable_output_folder(tmp_path):
    # A folder under a regular file cannot be created, even by root.
    blocker = tmp_path / "a_regular_file"
    blocker.write_text("not a folder")
    output_dir = blocker / "runs"
    assert_user_error(run_train("--recipe", SMOKE_RECIPE, "--set", f"run.output_dir={output_dir}"),
                      "run.output_dir", str(output_dir))
    assert blocker.read_text() == "not a folder"


# ----- --resume errors -------------------------------------------------------------------------------

@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_resume_nonexistent_path(cheap_recipe, tmp_path):
    missing = tmp_path / "no_such_checkpoint.pt"
    assert_user_error(run_train("--recipe", cheap_recipe, "--resume", missing), str(missing), "does not exist")


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_resume_random_bytes(cheap_recipe, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(random.Random(0).randbytes(4096))
    assert_user_error(run_train("--recipe", cheap_recipe, "--resume", garbage), str(garbage),
                      "not a FaceCL checkpoint")


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_resume_folder_without_latest_pointer(cheap_recipe, tmp_path):
    folder = tmp_path / "some_folder"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "step_00000001.pt").write_bytes(b"")
    assert_user_error(run_train("--recipe", cheap_recipe, "--resume", folder), str(folder), "latest")


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_resume_latest_pointer_naming_garbage(cheap_recipe, tmp_path):
    folder = tmp_path / "run_with_bad_pointer" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "latest").write_text("../../../etc/passwd\n")
    assert_user_error(run_train("--recipe", cheap_recipe, "--resume", folder.parent), "latest", "etc/passwd")


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_resume_foreign_torch_file(cheap_recipe, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": torch.zeros(1)}, foreign)
    assert_user_error(run_train("--recipe", cheap_recipe, "--resume", foreign), str(foreign),
                      "not a FaceCL checkpoint")


class _SystemPayload:
    """Unpickling this runs `touch <marker>` through os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _OpenPayload:
    """Unpickling this creates <marker> through open(marker, 'w')."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _write_raw_pickle(path: Path, payload) -> None:
    with open(path, "wb") as handle:
        pickle.dump(payload, handle)


def _write_torch_zip(path: Path, payload) -> None:
    torch.save({"format": "facecl-checkpoint", "format_version": 1, "step": 1, "evil": payload}, path)


def _unsafe_load(path: Path) -> None:
    """Load the way an unsafe loader would (plain pickle / weights_only=False), closing anything opened."""
    if zipfile.is_zipfile(path):
        loaded = torch.load(path, weights_only=False)["evil"]
    else:
        with open(path, "rb") as handle:
            loaded = pickle.load(handle)  # noqa: S301 - deliberately unsafe: the control case
    if hasattr(loaded, "close"):
        loaded.close()


@pytest.mark.parametrize(("payload_cls", "writer"), [
    (_SystemPayload, _write_raw_pickle),
    (_OpenPayload, _write_raw_pickle),
    (_SystemPayload, _write_torch_zip),
    (_OpenPayload, _write_torch_zip),
], ids=["os.system-raw-pickle", "open-raw-pickle", "os.system-torch-zip", "open-torch-zip"])
@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_resume_malicious_pickle_does_not_run_code(cheap_recipe, tmp_path, payload_cls, writer):
    # Control: the same kind of file really does run code when loaded unsafely, so the test can fail.
    control_marker = tmp_path / "control_marker"
    control_file = tmp_path / "control.pt"
    writer(control_file, payload_cls(control_marker))
    _unsafe_load(control_file)
    assert control_marker.exists(), "the payload does not run code even when loaded unsafely"

    marker = tmp_path / "pwned_marker"
    evil = tmp_path / "evil.pt"
    writer(evil, payload_cls(marker))
    proc = run_train("--recipe", cheap_recipe, "--resume", evil)
    # The safety contract first: no code ran, exit status 2, no traceback, an error line naming the file.
    assert not marker.exists(), "loading the resume file ran code from the pickle"
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(evil) in last and "not a FaceCL checkpoint" in last, proc.stderr
    # Then the one-line contract (torch's "Detected pickle protocol" warning must not leak to stderr).
    assert_user_error(proc, str(evil), "not a FaceCL checkpoint")


# ----- --debug and --print-config --------------------------------------------------------------------

def test_debug_shows_the_traceback():
    proc = run_train("--recipe", SMOKE_RECIPE, "--set", "optim.lrr=0.1", "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr, proc.stderr
    assert "ConfigError" in proc.stderr and "optim.lrr" in proc.stderr


def test_print_config_prints_the_resolved_recipe(tmp_path):
    output_dir = tmp_path / "should_not_exist"
    proc = run_train("--recipe", SMOKE_RECIPE, "--set", "optim.lr=0.05", "--set", "data.flip=false",
                     "--set", "run.output_dir=${FACECL_TEST_OUT}/runs", "--print-config",
                     env_extra={"FACECL_TEST_OUT": str(output_dir)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["optim"]["lr"] == 0.05
    assert printed["data"]["flip"] is False
    assert printed["run"]["output_dir"] == f"{output_dir}/runs"
    assert printed["run"]["name"] == "smoke_synthetic"
    assert printed["model"]["backbone"] == "mobilefacenet"
    # Inherited from base.yaml and defaults appear resolved, too.
    assert printed["head"]["margin_m3"] == 0.4
    assert printed["parallel"]["engine"] == "single"
    assert not output_dir.exists(), "--print-config created the run folder"


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_a_resume_says_each_changed_recipe_value_and_refuses_another_engine_in_plain_words(cheap_recipe, tmp_path):
    first = run_train("--recipe", cheap_recipe, "--set", f"run.output_dir={tmp_path}", "--set", "run.name=first")
    assert first.returncode == 0, first.stderr
    checkpoint = sorted((tmp_path / "first" / "checkpoints").glob("step_*"))[-1]
    resumed = run_train("--recipe", cheap_recipe, "--set", f"run.output_dir={tmp_path}", "--set", "run.name=second",
                        "--set", "optim.lr=0.05", "--set", "train.num_epochs=2", "--resume", checkpoint)
    assert resumed.returncode == 0, resumed.stderr
    assert "recipe change on resume: optim.lr " in resumed.stdout and "-> 0.05 (accepted)" in resumed.stdout
    assert "recipe change on resume: train.num_epochs " in resumed.stdout
    assert "recipe change on resume: run.name 'first' -> 'second' (accepted)" in resumed.stdout
    line = assert_user_error(run_train("--recipe", cheap_recipe, "--set", f"run.output_dir={tmp_path}", "--set",
                                       "run.name=third", "--set", "parallel.engine=fsdp", "--resume", checkpoint))
    assert "was written with the single-process or DDP engine" in line and "this run uses FSDP2" in line, line
    assert "convert.py consolidate" in line and "train.init_from" in line, line


def test_print_config_checks_names_as_training_does(cheap_recipe):
    line = assert_user_error(run_train("--recipe", cheap_recipe, "--set", "model.backbone=resnet50", "--print-config"),
                             "model.backbone", "unknown backbone 'resnet50'")
    assert "valid backbones:" in line
    assert_user_error(run_train("--recipe", cheap_recipe, "--set", "eval.sets=[lfw.txt]", "--print-config"),
                      "eval.sets: path not found: lfw.txt")


def test_print_config_checks_eval_sets_with_the_benchmark_registry(cheap_recipe, tmp_path):
    """--print-config takes and refuses eval.sets entries exactly as training's benchmark lookup does."""
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    line = assert_user_error(run_train("--recipe", cheap_recipe, "--set", f"eval.sets=[{empty}]", "--print-config"),
                             f"eval.sets: {empty} is no benchmark input")
    assert "(verification)" in line and "(ijb)" in line and "(all_to_all)" in line, line
    features = tmp_path / "features.npz"
    features.write_bytes(b"")
    assert_user_error(run_train("--recipe", cheap_recipe, "--set", f"eval.sets=[{features}]", "--print-config"),
                      "holds its own features, not images")
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "lfw.bin").write_bytes(b"")
    assert_user_error(run_train("--recipe", cheap_recipe, "--set",
                                f"eval.sets=[{tmp_path / 'a' / 'lfw.bin'},{tmp_path / 'b' / 'lfw.bin'}]",
                                "--print-config"),
                      "are both named 'lfw'", "would overwrite each other")
    identities = tmp_path / "identities"
    (identities / "person_0").mkdir(parents=True)
    shown = run_train("--recipe", cheap_recipe, "--set", f"eval.sets=[{identities}]", "--print-config")
    assert shown.returncode == 0, shown.stderr
