# Benchmarks never overwrite committed results unless asked.
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _module():
    spec = importlib.util.spec_from_file_location("results_file", REPO / "benchmarks" / "results_file.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_output_never_replaces_a_committed_result(tmp_path, monkeypatch):
    module = _module()
    monkeypatch.setattr(module, "RESULTS_DIR", tmp_path)
    assert module.results_path(None, "bench_x") == tmp_path / "bench_x.json"
    (tmp_path / "bench_x.json").write_text("{}")   # the committed figures
    fresh = module.results_path(None, "bench_x")
    assert fresh != tmp_path / "bench_x.json" and fresh.name.startswith("bench_x-") and not fresh.exists()
    assert module.results_path(None, "bench_x", overwrite=True) == tmp_path / "bench_x.json"


def test_an_explicit_existing_output_needs_overwrite(tmp_path):
    module = _module()
    target = tmp_path / "mine.json"
    target.write_text("{}")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        module.results_path(target, "bench_x")
    assert module.results_path(target, "bench_x", overwrite=True) == target


@pytest.mark.parametrize("script", ["bench_data.py", "bench_kernels.py", "bench_head.py", "bench_sampling.py"])
def test_benchmarks_use_it(script):
    text = (REPO / "benchmarks" / script).read_text()
    assert "results_path(" in text and "--overwrite" in text


def test_quick_mode_writes_to_a_temporary_file_unless_given_one(tmp_path, monkeypatch):
    module = _module()
    monkeypatch.setattr(module, "RESULTS_DIR", tmp_path)
    quick = module.results_path(None, "bench_x_quick", quick=True)
    assert tmp_path not in quick.parents and quick.parent.is_dir() and not quick.exists()
    assert module.results_path(tmp_path / "mine.json", "bench_x_quick", quick=True) == tmp_path / "mine.json"


def test_a_quick_run_says_its_timings_mean_nothing_and_leaves_results_alone():
    results = REPO / "benchmarks" / "results"
    before = sorted(results.iterdir())
    done = subprocess.run([sys.executable, "benchmarks/bench_kernels.py", "--quick", "--device", "cpu"], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "its timings and ratios mean nothing" in done.stdout
    written = Path(done.stdout.split("written: ")[1].split()[0])
    assert results not in written.parents and json.loads(written.read_text())["environment"]["note"].startswith("quick")
    assert sorted(results.iterdir()) == before
