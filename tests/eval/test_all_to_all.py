# All-to-all TAR at FAR: exact against a brute force over every pair, with ties, refinement passes and ranks.
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from toolkit.eval.all_to_all import all_to_all_tar_at_far


def brute_force(emb: np.ndarray, labels: np.ndarray, fars) -> dict:
    """Every pair i < j scored in float64 and sorted: the threshold is the k-th largest impostor score."""
    scores = emb.astype(np.float64) @ emb.astype(np.float64).T
    iu = np.triu_indices(len(labels), 1)
    s, same = scores[iu], (labels[:, None] == labels[None, :])[iu]
    genuine, impostor = s[same], np.sort(s[~same])[::-1]
    out = {}
    for far in fars:
        k = int(np.ceil(round(far * impostor.size, 9)))
        t = impostor[k - 1]
        out[f"{far:.0e}"] = {"tar": float(np.mean(genuine >= t)), "threshold": float(t),
                             "achieved_far": float(np.mean(impostor >= t))}
    return out


def quantised_set(n=3000, num_ids=400, dim=16, seed=0):
    """Integer features (exact dot products in fp32, so the two computations agree bit for bit) built from
    identity centres plus noise, clipped: many identities, many tied scores."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_ids, n)
    centres = rng.normal(0, 1.2, (num_ids, dim))
    emb = np.clip(np.round(centres[labels] + rng.normal(0, 1.2, (n, dim))), -3, 3).astype(np.float32)
    return emb, labels


@pytest.mark.parametrize("blocks, sample_floor", [((512, 1024), True), ((300, 700), True), ((512, 1024), False)])
def test_exact_against_brute_force_with_ties(blocks, sample_floor):
    emb, labels = quantised_set()
    fars = (1e-3, 1e-4)
    expected = brute_force(emb, labels, fars)
    # Make sure the case is what the test claims: the thresholds are tied with other impostor scores.
    scores = (emb.astype(np.int64) @ emb.astype(np.int64).T)[np.triu_indices(len(labels), 1)]
    for far in fars:
        assert np.count_nonzero(scores == expected[f"{far:.0e}"]["threshold"]) > 10
    got = all_to_all_tar_at_far(torch.from_numpy(emb), labels, fars, normalize=False, row_block=blocks[0],
                                col_block=blocks[1], sample_floor=sample_floor)
    assert got["tar_at_far"] == expected
    # One pass with the sampled floor; histogram then kept values without it.
    assert got["num_passes"] == (1 if sample_floor else 2)
    num_pairs = len(labels) * (len(labels) - 1) // 2
    assert got["num_genuine"] + got["num_impostor"] == num_pairs


def test_refinement_passes_when_the_bracket_is_too_full():
    emb, labels = quantised_set(n=1500, num_ids=200, seed=3)
    fars = (1e-3, 1e-4)
    # Few bins and a tiny max_kept force histogram passes inside the bracket before the values are kept.
    got = all_to_all_tar_at_far(torch.from_numpy(emb), labels, fars, normalize=False, num_bins=64, max_kept=100)
    assert got["num_passes"] >= 3
    assert got["tar_at_far"] == brute_force(emb, labels, fars)


def test_normalised_float_features_match_float64_brute_force():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 300, 3000)
    emb = (rng.normal(0, 1, (300, 32))[labels] + rng.normal(0, 1.5, (3000, 32))).astype(np.float32)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    fars = (1e-3, 1e-4)
    expected = brute_force(unit, labels, fars)
    got = all_to_all_tar_at_far(torch.from_numpy(emb), labels, fars)["tar_at_far"]
    num_genuine = np.count_nonzero(np.triu(labels[:, None] == labels[None, :], 1))
    for key in expected:
        # fp32 tiles vs a float64 matmul: the threshold agrees to rounding, the TAR to at most one pair.
        assert got[key]["threshold"] == pytest.approx(expected[key]["threshold"], abs=2e-6)
        assert abs(got[key]["tar"] - expected[key]["tar"]) <= 1.0 / num_genuine + 1e-12


def test_bf16_inputs_equal_brute_force_on_rounded_inputs():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 100, 1200)
    emb = torch.from_numpy((rng.normal(0, 1, (100, 16))[labels] + rng.normal(0, 1, (1200, 16))).astype(np.float32))
    unit = torch.nn.functional.normalize(emb, dim=1)
    rounded = unit.bfloat16().float().numpy()
    got = all_to_all_tar_at_far(emb, labels, (1e-3,), compute_dtype=torch.bfloat16)
    expected = brute_force(rounded, labels, (1e-3,))
    assert got["compute_dtype"] == "bfloat16"
    assert got["tar_at_far"]["1e-03"]["threshold"] == pytest.approx(expected["1e-03"]["threshold"], abs=1e-6)


def test_far_below_one_impostor_is_none():
    emb, labels = quantised_set(n=200, num_ids=20)
    got = all_to_all_tar_at_far(torch.from_numpy(emb), labels, (1e-6, 1e-3), normalize=False)
    assert got["tar_at_far"]["1e-06"]["tar"] is None
    assert got["tar_at_far"]["1e-03"]["tar"] is not None


def _rank_main(rank, world_size, init_file, emb, labels, queue):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    torch.set_num_threads(1)
    # Histogram passes with refinement (tiny max_kept), and the one-pass path with the sampled floor.
    out = [all_to_all_tar_at_far(torch.from_numpy(emb), labels, (1e-3, 1e-4), normalize=False, row_block=256,
                                 col_block=512, num_bins=256, max_kept=max_kept, rank=rank, world_size=world_size)
           for max_kept in (500, 1 << 24)]
    queue.put((rank, out))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one(tmp_path):
    emb, labels = quantised_set(n=1200, num_ids=150, seed=5)
    single = [all_to_all_tar_at_far(torch.from_numpy(emb), labels, (1e-3, 1e-4), normalize=False, row_block=256,
                                    col_block=512, num_bins=256, max_kept=max_kept) for max_kept in (500, 1 << 24)]
    assert single[0]["num_passes"] >= 2 and single[1]["num_passes"] == 1
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, tmp_path / "init", emb, labels, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        for got, expected in zip(results[rank], single):
            assert got["tar_at_far"] == expected["tar_at_far"]
            assert got["num_impostor"] == expected["num_impostor"]
            assert got["num_passes"] == expected["num_passes"]


def test_a_sampled_floor_that_is_too_high_falls_back_to_the_histogram(monkeypatch):
    import toolkit.eval.all_to_all as module

    emb, labels = quantised_set(n=1500, num_ids=200, seed=4)
    # A floor above every score: nothing is kept in pass 1, so each FAR must take the histogram path.
    monkeypatch.setattr(module, "_sampled_floor", lambda *args, **kwargs: 1e9)
    got = all_to_all_tar_at_far(torch.from_numpy(emb), labels, (1e-3, 1e-4), normalize=False)
    assert got["num_passes"] == 3
    assert got["tar_at_far"] == brute_force(emb, labels, (1e-3, 1e-4))
