# Benchmarks never overwrite committed results unless asked.
import importlib.util

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


@pytest.mark.parametrize("script", ["bench_data.py", "bench_kernels.py"])
def test_benchmarks_use_it(script):
    text = (REPO / "benchmarks" / script).read_text()
    assert "results_path(" in text and "--overwrite" in text
