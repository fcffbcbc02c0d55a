# Figures quoted in README.md and docs/ equal the committed results files they cite (benchmarks/doc_figures.py).
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO


def doc_figures():
    spec = importlib.util.spec_from_file_location("doc_figures", REPO / "benchmarks" / "doc_figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_quoted_figure_equals_its_results_file():
    assert doc_figures().problems(REPO) == []


@pytest.mark.parametrize("results_file, at_least", [("benchmarks/results/head_cpu.json", 6),
                                                     ("benchmarks/results/smoke_recipes.json", 14),
                                                     ("benchmarks/results/kernels_cpu.json", 6),
                                                     ("benchmarks/results/bench_train_iresnet50_single.json", 2),
                                                     ("benchmarks/results/bench_data.json", 1)])
def test_the_headline_figures_are_quoted_through_markers(results_file, at_least):
    module = doc_figures()
    cited = [figure for document in module.documents(REPO) for figure in module.figures_in(document)
             if figure.file == results_file]
    assert len(cited) >= at_least, cited


def plant(tmp_path, quoted: str):
    (tmp_path / "docs").mkdir()
    results = {"results": [{"case": "a", "rate": 0.2, "ratio": 1.2345}, {"case": "a", "rate": 1, "ratio": 2.0}],
               "run": {"accuracy": 0.974}}
    (tmp_path / "r.json").write_text(json.dumps(results))
    (tmp_path / "README.md").write_text("# x\n\nthe head takes "
                                        f"<!-- figure r.json results/case=a,rate=0.2/ratio {{:.2f}}x -->{quoted}"
                                        "<!-- /figure --> the products\n")
    (tmp_path / "docs" / "d.md").write_text("accuracy <!-- figure r.json run/accuracy {:.1%} -->97.4%<!-- /figure -->\n")


def test_a_stale_figure_is_named_with_its_line_and_rewritten_from_the_file(tmp_path):
    module = doc_figures()
    plant(tmp_path, "1.10x")
    assert module.problems(tmp_path) == [
        "README.md:3: quotes '1.10x', r.json results/case=a,rate=0.2/ratio gives '1.23x'"]
    assert module.rewrite(tmp_path) == 1 and module.problems(tmp_path) == []
    assert "takes <!-- figure r.json results/case=a,rate=0.2/ratio {:.2f}x -->1.23x<!-- /figure -->" in \
        (tmp_path / "README.md").read_text()


def test_a_wrong_path_or_an_ambiguous_record_is_a_problem_not_a_pass(tmp_path):
    module = doc_figures()
    plant(tmp_path, "1.23x")
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace("case=a,rate=0.2", "case=a"))
    assert module.problems(tmp_path) == ["README.md:3: r.json results/case=a/ratio: 2 records match 'case=a'"]
    readme.write_text(readme.read_text().replace("results/case=a/ratio", "results/case=a,rate=1/speed"))
    assert module.problems(tmp_path) == ["README.md:3: r.json results/case=a,rate=1/speed: no 'speed'"]
