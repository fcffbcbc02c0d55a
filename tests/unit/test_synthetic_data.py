# Synthetic faces: deterministic, identity-consistent, held-out identities disjoint, folds balanced.
import torch

from toolkit.data import EpochBatchSampler, ResumableBatchStream, SyntheticFaces, SyntheticPairs, SyntheticTrainSet


def test_render_is_deterministic_and_in_range():
    faces = SyntheticFaces(image_size=112, seed=3)
    a = faces.render(5, 7)
    b = SyntheticFaces(image_size=112, seed=3).render(5, 7)
    assert a.shape == (3, 112, 112) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    assert not torch.equal(a, faces.render(5, 8))
    assert not torch.equal(a, SyntheticFaces(image_size=112, seed=4).render(5, 7))


def test_samples_of_one_identity_are_closer_than_samples_of_two():
    faces = SyntheticFaces(image_size=48, seed=0)

    def distance(a, b):
        return float((a - b).pow(2).mean())

    same = [distance(faces.render(i, 0), faces.render(i, 1)) for i in range(20)]
    different = [distance(faces.render(i, 0), faces.render(i + 20, 0)) for i in range(20)]
    assert sum(same) / 20 < 0.5 * sum(different) / 20


def test_verification_pairs_use_only_held_out_identities_and_balance_folds():
    faces = SyntheticFaces(image_size=32, seed=0)
    train = SyntheticTrainSet(faces, num_identities=50, samples_per_identity=4)
    pairs = SyntheticPairs(faces, first_identity=50, num_identities=30, num_pairs=200)
    train_ids = {train.label_of(i) for i in range(len(train))}
    pair_ids = set(pairs.identities_P2.flatten().tolist())
    assert train_ids == set(range(50))
    assert pair_ids <= set(range(50, 80)) and len(pair_ids) > 20
    same = pairs.identities_P2[:, 0] == pairs.identities_P2[:, 1]
    assert torch.equal(same, pairs.is_same_P)
    for fold in pairs.is_same_P.view(10, 20):
        assert int(fold.sum()) == 10
    assert len(pairs) == 400 and pairs[3].shape == (3, 32, 32)


def test_epoch_order_is_a_permutation_split_across_ranks():
    world = 3
    seen = []
    for rank in range(world):
        sampler = EpochBatchSampler(100, 8, seed=1, epoch=0, rank=rank, world_size=world)
        batches = list(sampler)
        assert len(batches) == 100 // (8 * world)
        seen += [index for batch in batches for index, _ in batch]
    assert len(seen) == len(set(seen)) == 4 * 8 * world


def test_stream_resumes_exactly_from_its_state():
    faces = SyntheticFaces(image_size=16, seed=0)
    dataset = SyntheticTrainSet(faces, num_identities=6, samples_per_identity=5)
    stream = ResumableBatchStream(dataset, 4, seed=2)
    full = [stream.next_batch() for _ in range(17)]  # crosses two epoch boundaries (7 batches/epoch)
    again = ResumableBatchStream(dataset, 4, seed=2)
    for _ in range(9):
        again.next_batch()
    state = again.state_dict()
    resumed = ResumableBatchStream(dataset, 4, seed=2)
    resumed.load_state_dict(state)
    for images, labels in full[9:]:
        got_images, got_labels = resumed.next_batch()
        assert torch.equal(images, got_images) and torch.equal(labels, got_labels)
    # Different epochs use different orders.
    assert not torch.equal(full[0][1], full[7][1])
