# The results table shows every metric the evaluations measured (or the --columns asked for), in a stable order,
# and every '-' has a footnote with the reason for that cell.
import json
import re

import numpy as np
import pytest

from launch.evaluate import main
from tests.eval.factories import ColourNet, export_onnx, write_bin, write_ijb_release
from toolkit.eval.table import build_table, format_markdown


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluation with a .bin set, an IJB-C release (1:1 and 1:N) and an all-to-all .npz: (folder, report)."""
    root = tmp_path_factory.mktemp("bench_table")
    write_bin(root / "lfw.bin", num_pairs=40)
    write_ijb_release(root / "IJBC", num_subjects=12, templates_per_subject=3)
    export_onnx(ColourNet(16), root / "colour.onnx", image_size=112)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(30), 5)   # 150 images: 10,875 impostor pairs, enough for FAR 1e-4 only
    features = (rng.normal(0, 1, (30, 16))[labels] + rng.normal(0, 1.5, (150, 16))).astype(np.float32)
    np.savez(root / "mfr.npz", features=features, labels=labels)
    out = root / "out"
    assert main(["--model", str(root / "colour.onnx"), "--benchmark", f"mfr={root / 'mfr.npz'}",
                 "--benchmark", f"ijbc={root / 'IJBC'}", "--benchmark", f"lfw={root / 'lfw.bin'}",
                 "--output", str(out), "--num-workers", "0", "--no-progress"]) == 0
    return out, json.loads((out / "evaluation.json").read_text())


def parse_markdown(text: str) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """(header, {row name: cells}, {footnote number: text}) of a table written by format_markdown."""
    lines = text.strip().splitlines()
    split = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    header, rows = split[0][1:], {row[0]: row[1:] for row in split[2:]}
    notes = dict(re.findall(r"^\[\^(\d+)\]: (.*)$", text, flags=re.M))
    return header, rows, notes


def expected_cells(report: dict) -> dict[str, float | None]:
    """Every metric of the report, read from its JSON by hand: the numbers the table must show."""
    lfw, ijbc, mfr = (report["benchmarks"][k] for k in ("lfw", "ijbc", "mfr"))
    cells = {"LFW": lfw["accuracy_mean"]}
    cells.update({f"IJB-C {float(k):.0e}".replace("e-0", "e-"): p["tar"]
                  for k, p in ijbc["verification"]["tar_at_far"].items()})
    mean = ijbc["identification"]["mean"]
    cells.update({"IJB-C rank-1": mean["rank1"], "IJB-C rank-5": mean["rank5"]})
    cells.update({f"IJB-C TPIR {float(k):.0e}".replace("e-0", "e-"): v for k, v in mean["tpir_at_fpir"].items()})
    cells.update({f"mfr {float(k):.0e}".replace("e-0", "e-"): p["tar"] for k, p in mfr["tar_at_far"].items()})
    return cells


def test_every_measured_metric_is_a_column_with_the_number_of_the_results(evaluated):
    out, report = evaluated
    header, rows, notes = parse_markdown((out / "table.md").read_text())
    expected = expected_cells(report)
    # verification, then IJB (1:1 from the smallest FAR, then 1:N), then all-to-all: not the order given
    assert header == ["LFW", "IJB-C 1e-6", "IJB-C 1e-5", "IJB-C 1e-4", "IJB-C 1e-3", "IJB-C 1e-2", "IJB-C 1e-1",
                      "IJB-C rank-1", "IJB-C rank-5", "IJB-C TPIR 1e-2", "IJB-C TPIR 1e-1",
                      "mfr 1e-6", "mfr 1e-5", "mfr 1e-4"]
    assert set(expected) == set(header)
    for column, text in zip(header, rows["colour"]):
        value = expected[column]
        assert (text == f"{100 * value:.2f}") if value is not None else text.startswith("-[^"), (column, text)
    assert report["table_row"] == {c: (None if v is None else pytest.approx(100 * v)) for c, v in expected.items()}
    # the differing numbers the fixed columns used to hide are there
    assert expected["mfr 1e-4"] is not None and expected["IJB-C 1e-2"] is not None


def test_each_dash_has_a_footnote_with_its_reason(evaluated):
    out, report = evaluated
    header, rows, notes = parse_markdown((out / "table.md").read_text())
    cell = dict(zip(header, rows["colour"]))
    impostors = report["benchmarks"]["ijbc"]["verification"]["num_impostor"]
    assert notes[cell["IJB-C 1e-5"][3:-1]] == (f"IJB-C: FAR 1e-5 needs at least 100,000 impostor pairs, this set has "
                                               f"{impostors:,}")
    assert notes[cell["mfr 1e-6"][3:-1]] == "mfr: FAR 1e-6 needs at least 1,000,000 impostor pairs, this set has 10,875"
    assert notes[cell["IJB-C TPIR 1e-2"][3:-1]].startswith("IJB-C: G1 and G2: FPIR 1e-2 needs at least 100 non-mated")
    dashes = [text for text in rows["colour"] if text.startswith("-")]
    assert len(notes) == len(dashes) and set(report["table_notes"]) == {c for c, t in cell.items() if t.startswith("-")}
    # the reason is in the results themselves
    assert report["benchmarks"]["mfr"]["tar_at_far"]["1e-05"]["reason"].startswith("FAR 1e-5 needs at least 100,000")


def verification_entry(accuracy: float) -> dict:
    return {"kind": "verification", "accuracy_mean": accuracy, "accuracy_std": 0.0, "num_pairs": 6000}


def all_to_all_entry(tar: float, num_impostor: int) -> dict:
    """An entry as written before TAR points carried their reason."""
    return {"kind": "all_to_all", "num_impostor": num_impostor,
            "tar_at_far": {"1e-06": {"tar": None, "threshold": None, "achieved_far": None},
                           "1e-04": {"tar": tar, "threshold": 0.3, "achieved_far": 1e-4}}}


def test_a_row_without_a_benchmark_says_so_and_old_results_get_their_reason():
    reports = {"a": {"model": "a", "benchmarks": {"lfw": verification_entry(0.995),
                                                  "my_pairs": verification_entry(0.9)}},
               "b": {"model": "b", "benchmarks": {"mfr": all_to_all_entry(0.3607, 50_000),
                                                  "lfw": verification_entry(0.99)}}}
    header, rows, notes = parse_markdown(format_markdown(build_table(reports)))
    assert header == ["LFW", "my_pairs", "mfr 1e-6", "mfr 1e-4"]   # known sets first, others by name
    assert rows["a"][:2] == ["99.50", "90.00"] and rows["b"][0] == "99.00" and rows["b"][3] == "36.07"
    assert notes[rows["a"][2][3:-1]] == "not measured: benchmark mfr is not in this evaluation"
    assert rows["a"][2] == rows["a"][3]    # one footnote per distinct reason
    assert notes[rows["b"][1][3:-1]] == "not measured: benchmark my_pairs is not in this evaluation"
    assert notes[rows["b"][2][3:-1]] == "mfr: FAR 1e-6 needs at least 1,000,000 impostor pairs, this set has 50,000"


def test_column_order_does_not_depend_on_the_order_of_the_benchmarks():
    entries = {"mfr": all_to_all_entry(0.5, 20_000), "agedb_30": verification_entry(0.9), "lfw": verification_entry(1)}
    forward = build_table({"m": {"benchmarks": entries}}).columns
    backward = build_table({"m": {"benchmarks": dict(reversed(list(entries.items())))}}).columns
    assert forward == backward == ["LFW", "AgeDB-30", "mfr 1e-6", "mfr 1e-4"]


def test_columns_selects_and_orders(evaluated, tmp_path, capsys):
    out, report = evaluated
    capsys.readouterr()
    assert main(["--compare", str(out), "--columns", "mfr 1e-4, lfw,IJB-C  1e-1", "--output", str(tmp_path / "c")]) == 0
    header, rows, _ = parse_markdown(capsys.readouterr().out)
    assert header == ["mfr 1e-4", "LFW", "IJB-C 1e-1"]
    assert rows["colour"] == [f"{report['table_row'][c]:.2f}" for c in header]
    saved = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert saved["columns"] == header and saved["rows"]["colour"] == {c: report["table_row"][c] for c in header}


def test_an_unknown_column_is_one_line_listing_the_available_ones(evaluated, capsys):
    out, _ = evaluated
    capsys.readouterr()
    assert main(["--compare", str(out), "--columns", "LFW,IJB-C 1e-7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --columns: no column 'IJB-C 1e-7' in these results; "
                                               "available: LFW, IJB-C 1e-6, IJB-C 1e-5,")
    assert main(["--model", "m.onnx", "--benchmark", "lfw=x.bin", "--columns", "LFW"]) == 2
    assert "--columns selects the columns of a --compare table" in capsys.readouterr().err


def test_two_names_for_one_column_are_refused(evaluated, tmp_path, capsys):
    out, report = evaluated
    lfw = report["benchmarks"]["lfw"]["path"]
    assert main(["--features", "unused.npz", "--benchmark", f"lfw={lfw}", "--benchmark", f"LFW={lfw}",
                 "--output", str(tmp_path / "o")]) == 2
    assert "benchmark names LFW, lfw are one column name of the results table (LFW)" in capsys.readouterr().err


def test_old_ijb_results_get_their_reasons_from_the_counts():
    gallery = {"num_probes": 20, "num_mated": 8, "num_non_mated": 12, "rank1": 0.5, "rank5": 1.0,
               "tpir_at_fpir": {"1e-02": None, "1e-01": 0.25}}
    entry = {"kind": "ijb", "benchmark": "IJB-B",
             "verification": {"num_impostor": 5_000, "tar_at_far": {
                 "1e-04": {"tar": None, "threshold": None, "achieved_far": None},
                 "1e-03": {"tar": 0.8, "threshold": 0.2, "achieved_far": 1e-3}}},
             "identification": {"G1": gallery, "G2": dict(gallery, num_non_mated=30),
                                "mean": {"rank1": 0.5, "rank5": 1.0, "tpir_at_fpir": {"1e-02": None, "1e-01": 0.25}}}}
    table = build_table({"m": {"benchmarks": {"ijbb": entry}}})
    assert table.columns == ["IJB-B 1e-4", "IJB-B 1e-3", "IJB-B rank-1", "IJB-B rank-5", "IJB-B TPIR 1e-2",
                             "IJB-B TPIR 1e-1"]
    cells = table.rows["m"]
    assert cells["IJB-B 1e-4"].reason == "IJB-B: FAR 1e-4 needs at least 10,000 impostor pairs, this set has 5,000"
    assert cells["IJB-B TPIR 1e-2"].reason == (
        "IJB-B: G1: FPIR 1e-2 needs at least 100 non-mated probe templates, the gallery has 12; "
        "G2: FPIR 1e-2 needs at least 100 non-mated probe templates, the gallery has 30")
    assert cells["IJB-B 1e-3"].value == pytest.approx(80.0) and cells["IJB-B TPIR 1e-1"].value == pytest.approx(25.0)
