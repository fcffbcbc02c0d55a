# Synthetic faces: deterministic, identity-consistent, held-out identities disjoint, folds balanced.
import pytest
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


def global_batches(dataset, world: int, global_batch: int, count: int, state=None, samples_per_label: int = 1):
    """`count` global batches (every rank's slice, rank order concatenated) of `world` ranks, from `state`."""
    streams = [ResumableBatchStream(dataset, global_batch // world, seed=2, rank=rank, world_size=world,
                                    samples_per_label=samples_per_label) for rank in range(world)]
    if state is not None:
        for stream in streams:
            stream.load_state_dict(state, allow_world_size_change=True)
    batches = []
    for _ in range(count):
        parts = [stream.next_batch() for stream in streams]
        batches.append((torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])))
    return batches, streams


@pytest.mark.parametrize("samples_per_label", [1, 2])
@pytest.mark.parametrize("new_world", [1, 3])
def test_stream_resumes_sample_for_sample_at_another_world_size_with_the_same_global_batch(new_world,
                                                                                           samples_per_label):
    faces = SyntheticFaces(image_size=16, seed=0)
    dataset = SyntheticTrainSet(faces, num_identities=10, samples_per_identity=6)  # 60 samples: 5 batches of 12
    full, _ = global_batches(dataset, 2, 12, 9, samples_per_label=samples_per_label)  # crosses an epoch boundary
    _, saved = global_batches(dataset, 2, 12, 3, samples_per_label=samples_per_label)
    state = saved[0].state_dict()
    resumed, streams = global_batches(dataset, new_world, 12, 6, state, samples_per_label)
    assert all(stream.resumes_sample_exactly for stream in streams)
    for (images, labels), (got_images, got_labels) in zip(full[3:], resumed):
        assert torch.equal(labels, got_labels) and torch.equal(images, got_images)


def test_another_global_batch_resumes_at_the_same_share_of_the_epoch_only():
    faces = SyntheticFaces(image_size=16, seed=0)
    dataset = SyntheticTrainSet(faces, num_identities=10, samples_per_identity=6)
    _, saved = global_batches(dataset, 2, 12, 2)  # 24 of 60 samples read
    stream = ResumableBatchStream(dataset, 8, seed=2, world_size=1)
    stream.load_state_dict(saved[0].state_dict(), allow_world_size_change=True)
    assert not stream.resumes_sample_exactly and stream.batch_in_epoch == 24 // 8
    same_world = ResumableBatchStream(dataset, 4, seed=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size=6"):  # same world size, other batch: refused
        same_world.load_state_dict(saved[0].state_dict(), allow_world_size_change=True)
