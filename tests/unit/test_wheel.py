# The built wheel, installed into a fresh virtual environment, runs every command without the checkout: its
# console scripts answer --help, and a tiny convert + evaluate gives what the checkout's commands give.
"""What this test does not do: download the dependencies. The fresh environment gets the wheel alone (`--no-deps
--no-index`) and borrows the libraries of the environment running the tests through a .pth line (a plain path:
that environment's own .pth files, among them the editable install of this checkout, are not processed). That
every requirement of facecl[all] is then met is checked with the wheel's own metadata, and that the code imports
nothing undeclared is tests/unit/test_packaging.py's job. The wheel is built without the kernels
(FACECL_BUILD_EXTENSION=0; toolkit.ops falls back to its PyTorch references, as documented) to keep this test
short: compiling them is the build's business, tested by every other test here."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_OVERRIDES, SMOKE_RECIPE
from tests.eval.factories import run_cli, write_bin

COMMANDS = ("facecl-train", "facecl-evaluate", "facecl-convert", "facecl-prepare-data", "facecl-plan")
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "runs", "eval_results", "build", "dist", "*.egg-info",
                                    "__pycache__", "*.so", ".pytest_cache", "tests", "benchmarks", "docs")

REQUIREMENTS_MET = r"""
import importlib.metadata as metadata
from packaging.requirements import Requirement
from packaging.version import Version
unmet = []
for text in metadata.requires("facecl"):
    requirement = Requirement(text)
    if requirement.name == "facecl" or requirement.marker is not None and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in ("", "all", "eval", "export", "dali", "wandb",
                                                                        "mlflow")):
        continue
    try:
        installed = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        unmet.append(f"{requirement} (missing)")
        continue
    if not requirement.specifier.contains(Version(installed), prereleases=True):
        unmet.append(f"{requirement} (installed {installed})")
print("UNMET:", unmet)
"""


def run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv holding the facecl wheel (built from a copy of the sources), deps borrowed."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    env = {**os.environ, "FACECL_BUILD_EXTENSION": "0"}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"),
         str(source)], cwd=root, env=env)
    wheels = list((root / "dist").glob("facecl-*.whl"))
    assert len(wheels) == 1, wheels
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
    Path(purelib.stdout.strip(), "borrowed_libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheels[0])], cwd=root)
    return venv


def fresh_env() -> dict:
    """The test's environment without anything that would point Python at the checkout; the reference losses
    everywhere (the wheel has no kernels), so that the wheel's and the checkout's runs compute the same thing."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PYTHONNOUSERSITE": "1", "FACECL_FORCE_REFERENCE": "1"}


@pytest.mark.slow  # builds a wheel and a venv, then trains, converts and evaluates a tiny model: about 40 s
def test_the_wheel_runs_every_command_from_a_fresh_venv(wheel_venv, tmp_path):
    work = tmp_path / "elsewhere"   # not the checkout: nothing can be imported from it by accident
    work.mkdir()
    python = wheel_venv / "bin" / "python"
    located = run([str(python), "-c", "import toolkit, toolkit.launch.train as t; print(toolkit.__file__, t.__file__)"],
                  cwd=work, env=fresh_env()).stdout
    assert located.count(str(wheel_venv)) == 2 and str(REPO) not in located, located
    unmet = run([str(python), "-c", REQUIREMENTS_MET], cwd=work, env=fresh_env()).stdout
    assert "UNMET: []" in unmet, unmet

    for command in COMMANDS:
        text = run([str(wheel_venv / "bin" / command), "--help"], cwd=work, env=fresh_env()).stdout
        assert text.startswith(f"usage: {command} "), (command, text[:200])

    # A tiny training, export and evaluation by the wheel's commands; the export and the evaluation are repeated by
    # the checkout's commands (in this process, reference losses too) on the same run folder and must agree.
    recipe = work / "tiny.yaml"
    shutil.copy(SMOKE_RECIPE, recipe)
    shutil.copy(SMOKE_RECIPE.parent / "base.yaml", work / "base.yaml")   # what the smoke recipe builds on
    overrides = [*TINY_OVERRIDES, "train.num_epochs=0.5", "eval.every_steps=0", "checkpoint.save_final=true",
                 f"run.output_dir={work}", "run.name=tiny"]
    run([str(wheel_venv / "bin" / "facecl-train"), "--recipe", str(recipe),
         *(item for override in overrides for item in ("--set", override))], cwd=work, env=fresh_env())
    run([str(wheel_venv / "bin" / "facecl-convert"), "export", str(work / "tiny"), "--format", "safetensors",
         "--out", str(work / "wheel.safetensors")], cwd=work, env=fresh_env())
    from launch.convert import main as convert_main

    assert convert_main(["export", str(work / "tiny"), "--format", "safetensors",
                         "--out", str(work / "checkout.safetensors")]) == 0
    from safetensors.torch import load_file

    wheel_model, checkout_model = load_file(work / "wheel.safetensors"), load_file(work / "checkout.safetensors")
    assert sorted(wheel_model) == sorted(checkout_model) and len(wheel_model) > 10
    for key, tensor in wheel_model.items():
        assert tensor.equal(checkout_model[key]), key

    write_bin(work / "pairs.bin", num_pairs=40, size=16)
    run([str(wheel_venv / "bin" / "facecl-evaluate"), "--model", str(work / "wheel.safetensors"), "--benchmark",
         f"pairs={work / 'pairs.bin'}", "--output", str(work / "eval_wheel")], cwd=work, env=fresh_env())
    assert run_cli("--model", str(work / "checkout.safetensors"), "--benchmark", f"pairs={work / 'pairs.bin'}",
                   "--output", str(work / "eval_checkout")) == 0
    results = {}
    for name in ("wheel", "checkout"):
        benchmark = json.loads((work / f"eval_{name}" / "evaluation.json").read_text())["benchmarks"]["pairs"]
        results[name] = {key: value for key, value in benchmark.items() if key != "path"}
    assert results["wheel"]["num_pairs"] == 40 and results["wheel"]["num_skipped"] == 0
    assert results["wheel"]["accuracy_mean"] == pytest.approx(results["checkout"]["accuracy_mean"], abs=1e-9)
    assert results["wheel"]["best_thresholds"] == results["checkout"]["best_thresholds"]
