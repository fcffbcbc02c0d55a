# benchmarks/bench_train.py measures equal work on both sides: same first-step loss, every field in its JSON.
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "bench_train.py"
TINY = ["--backbone", "mobilefacenet", "--image-size", "16", "--batch-size", "8", "--num-classes", "12",
        "--embedding-size", "32", "--warmup-steps", "0", "--steps", "2", "--distinct-batches", "2",
        "--max-load", "0", "--threads", "1"]


def _module():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_names_are_the_recipe_names():
    module = _module()
    assert module.canonical_engine("zero3") == "deepspeed:3"
    assert module.canonical_engine("deepspeed") == "deepspeed:2"
    assert module.canonical_engine("fsdp2") == "fsdp"
    assert module.engine_overrides("deepspeed:1") == {"engine": "deepspeed", "zero_stage": 1}
    with pytest.raises(SystemExit, match="unknown engine 'zero7'"):
        module.canonical_engine("zero7")


def test_it_never_replaces_a_committed_result():
    text = SCRIPT.read_text()
    assert "results_path(" in text and "--overwrite" in text


@pytest.mark.slow  # two model builds and four steps in a child process: 15-40 s on 2 busy cores
def test_single_engine_run_writes_every_field_and_both_sides_do_the_same_work(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--engines", "single", "--out", str(out)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| single | 1 |" in proc.stdout
    payload = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().count("| single |") == 1
    assert {"setup", "machine", "load_average", "method", "engines"} <= set(payload)
    assert len(payload["load_average"]["at_start"]) == 3
    (job,) = payload["engines"]
    assert "error" not in job
    for side in ("toolkit", "bare"):
        figures = job[side]
        assert len(figures["step_ms_per_step"]) == 2 and figures["mean_step_ms"] > 0 and figures["samples_per_s"] > 0
        assert set(figures["split_ms"]) == {"data", "forward", "head", "backward", "optimizer", "other"}
        assert sum(figures["split_ms"].values()) == pytest.approx(figures["mean_step_ms"], rel=0.02, abs=0.1)
        assert figures["split_ms"]["forward"] > 0
        assert len(figures["step_peak_increase_mb_per_rank"]) == 1
    assert job["ratio_toolkit_to_bare_median"] > 0 and len(job["ratio_per_step"]) == 2
    assert job["cpu_time_ratio_toolkit_to_bare_median"] > 0
    assert job["memory"]["process_peak_increase_mb_per_rank"][0] > 0
    assert job["parameters"]["head"] == 12 * 32
    # Same initial weights, centers and batch: the same loss. After one update too (same optimizer rule), which
    # shows the backward and the optimizer step did the same work on both sides.
    first, second = job["first_step_loss"], job["second_step_loss"]
    assert first["toolkit"] == pytest.approx(first["bare"], rel=1e-5)
    assert second["toolkit"] == pytest.approx(second["bare"], rel=1e-4)
    assert first["toolkit"] != pytest.approx(second["toolkit"], rel=1e-4)   # the weights did move


def test_peer_options_are_checked_before_any_work():
    module = _module()
    assert module.parse_args(["--peer", "arcface_torch"]).sample_rates == [1.0]
    assert module.parse_args(["--peer", "arcface_torch", "--sample-rates", "1,0.2"]).sample_rates == [1.0, 0.2]
    for argv in (["--sample-rates", "0.2"], ["--precision", "fp16"],   # the bare loop: no sampling, no loss scaling
                 ["--peer", "arcface_torch", "--sample-rates", "1,1.5"]):
        with pytest.raises(SystemExit):
            module.parse_args(argv)


def test_arcface_torch_patches_are_only_those_needed():
    from tests.arcface_torch_source import peer_module

    peer = peer_module()
    gpu = {patch.file for patch in peer.patches_needed("cuda", "fp32", 112) if patch.file != "lr_scheduler.py"}
    assert gpu == set()                                            # their code as it is, on the GPU it was written for
    cpu = {(patch.file, patch.old) for patch in peer.patches_needed("cpu", "bf16", 32)}
    assert cpu >= {("partial_fc_v2.py", ".cuda()"), ("backbones/iresnet.py", "torch.cuda.amp.autocast(self.fp16)"),
                   ("backbones/iresnet.py", "fc_scale = 7 * 7")}


# iresnet18 (arcface_torch's smallest iresnet) at 32x32 (their fc sized by a patch); 512-d embeddings, as theirs: with
# narrow ones the random start's cosines are large enough that their loss's clamp (1e-30) makes the losses differ.
PEER_TINY = ["--peer", "arcface_torch", "--backbone", "iresnet18", "--image-size", "32", "--batch-size", "4",
             "--num-classes", "16", "--embedding-size", "512", "--warmup-steps", "0", "--steps", "2",
             "--distinct-batches", "2", "--max-load", "0", "--threads", "1"]


@pytest.mark.slow  # four model builds and eight steps in 1 + 2 child processes: 15-30 s on 2 busy cores
def test_arcface_torch_peer_runs_their_step_on_the_same_weights(tmp_path):
    from tests.arcface_torch_source import DEFAULT_REPO, insightface_repo

    if insightface_repo() is None:
        pytest.skip(f"insightface's repository is not on this machine (set FACECL_INSIGHTFACE_REPO; looked at "
                    f"{DEFAULT_REPO})")
    out = tmp_path / "peer.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *PEER_TINY, "--engines", "single,ddp", "--ranks", "2",
                           "--sample-rates", "1", "--out", str(out)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    peer = payload["peer"]
    # Every patch to their files is listed (printed too), and only the ones this CPU run needs.
    patched = {(patch["file"], patch["old"]) for patch in peer["patches"]}
    assert {("partial_fc_v2.py", ".cuda()"), ("backbones/iresnet.py", "fc_scale = 7 * 7")} <= patched
    assert all(patch["why"] and patch["new"] for patch in peer["patches"])
    assert all(f"{patch['file']}: {patch['old']!r}" in proc.stdout for patch in peer["patches"])
    assert "commit" in peer and peer["train_v2_deviations"] and peer["step_differences"]
    assert [(job["engine"], job["ranks"], job["sample_rate"]) for job in payload["engines"]] == \
        [("single", 1, 1.0), ("ddp", 2, 1.0)]
    for job in payload["engines"]:
        assert "error" not in job, job
        for side in ("toolkit", "arcface_torch"):
            assert job[side]["samples_per_s"] > 0 and len(job[side]["step_ms_per_step"]) == 2
            assert job[side]["centers_per_step_per_rank"] == [16 // job["ranks"]] * job["ranks"]
        assert job["ratio_toolkit_to_arcface_torch_median"] > 0
        assert job["parameters"]["arcface_torch"]["head"] == 16 * 512 // job["ranks"]
        # Their initial weights (through train.init_from), the same batch, margins and sample rate 1: the same loss.
        first = job["first_step_loss"]
        assert first["toolkit"] == pytest.approx(first["arcface_torch"], rel=1e-5)
    table = out.with_suffix(".md").read_text()
    assert "| single | 1 | 1 |" in table and "| ddp | 2 | 1 |" in table and "fc_scale = 7 * 7" in table
