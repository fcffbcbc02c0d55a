# The 10-fold verification protocol against an independent numpy implementation and hand-built cases.
import numpy as np
import pytest
import torch

from toolkit.eval import evaluate_pairs, verification_accuracy


def numpy_protocol(dist, issame, num_folds=10):
    """Independent re-implementation in numpy (KFold without shuffle, thresholds 0..4 step 0.01)."""
    thresholds = np.arange(0, 4, 0.01)
    n = len(dist)
    indices = np.arange(n)
    folds = np.array_split(indices, num_folds)
    accs = []
    for test_idx in folds:
        train_idx = np.setdiff1d(indices, test_idx)
        train_acc = [np.mean((dist[train_idx] < t) == issame[train_idx]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(np.mean((dist[test_idx] < best) == issame[test_idx]))
    return float(np.mean(accs)), float(np.std(accs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_protocol_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    issame = rng.random(600) < 0.5
    dist = np.where(issame, rng.normal(0.9, 0.35, 600), rng.normal(1.6, 0.35, 600)).clip(0, 4)
    result = verification_accuracy(torch.from_numpy(dist), torch.from_numpy(issame), 10)
    mean, std = numpy_protocol(dist, issame)
    assert result.accuracy_mean == pytest.approx(mean, abs=1e-12)
    assert result.accuracy_std == pytest.approx(std, abs=1e-12)
    assert 0.7 < mean < 0.99


def test_perfectly_separable_pairs_give_full_accuracy_and_random_give_chance():
    issame = torch.tensor([True, False] * 50)
    separable = torch.where(issame, torch.tensor(0.5), torch.tensor(2.0))
    assert verification_accuracy(separable, issame).accuracy_mean == 1.0
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(2000, generator=gen) * 4
    chance = verification_accuracy(noise, torch.rand(2000, generator=gen) < 0.5).accuracy_mean
    assert 0.45 < chance < 0.56


def test_pairs_that_do_not_split_into_folds_are_rejected():
    with pytest.raises(ValueError, match="13 pairs"):
        verification_accuracy(torch.zeros(13), torch.zeros(13, dtype=torch.bool), 10)


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)


def test_evaluate_pairs_normalises_flip_sum_before_distance():
    # Images are 1x1x2 "pictures": pair 0 is the same direction at very different lengths, pair 1 differs.
    # Unnormalised embeddings would call pair 0 different; the protocol normalises first.
    images = torch.tensor([[[[1.0, 1.0]]], [[[10.0, 10.0]]], [[[1.0, 0.0]]], [[[0.0, -1.0]]]] * 10)
    is_same = torch.tensor([True, False] * 10)
    result = evaluate_pairs(_Identity(), images, is_same, device=torch.device("cpu"), batch_size=8, num_folds=10)
    assert result.accuracy_mean == 1.0
