# DALI backend on CPU: the same shards, labels, flip and MoCo views; skipped cleanly where DALI is not installed.
from __future__ import annotations

import pytest
import torch

pytest.importorskip("nvidia.dali")

from tests.data.factories import identify  # noqa: E402
from toolkit.data.dali_stream import DaliOptions  # noqa: E402
from toolkit.data.transforms import ViewAugmentation  # noqa: E402
from toolkit.data.dali_stream import DaliBatchStream  # noqa: E402
from toolkit.data.shard_stream import ShardedTrainSet  # noqa: E402

CPU = DaliOptions(decode_device="cpu", num_threads=2, shuffle_buffer=32)


def test_cpu_pipeline_gives_labelled_normalised_batches(even_shards):
    stream = DaliBatchStream(ShardedTrainSet(even_shards), 8, seed=0, image_size=16, config=CPU)
    seen = []
    for _ in range(stream.batches_per_epoch):
        images, labels = stream.next_batch()
        assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
        assert float(images.min()) >= -1 and float(images.max()) <= 1
        for image, label in zip(images, labels):
            identity, sample = identify(image)
            assert identity == int(label)
            seen.append((identity, sample))
    assert len(set(seen)) >= 60  # a shuffled pass over most of the 80 images
    assert stream.fractional_epoch == 1.0 and stream.skip_stats() == {}


def test_ranks_read_disjoint_parts(even_shards):
    found = []
    for rank in range(2):
        stream = DaliBatchStream(ShardedTrainSet(even_shards), 8, seed=0, rank=rank, world_size=2, image_size=16,
                                 config=CPU)
        found.append({identify(image) for _ in range(3) for image in stream.next_batch()[0]})
    assert not found[0] & found[1]


def test_two_views_and_resize(even_shards):
    stream = DaliBatchStream(ShardedTrainSet(even_shards), 4, seed=0, image_size=32, views=ViewAugmentation(), config=CPU)
    images, labels = stream.next_batch()
    assert images.shape == (4, 2, 3, 32, 32) and labels.shape == (4,)
    assert not torch.equal(images[:, 0], images[:, 1])


def test_state_round_trip(even_shards):
    stream = DaliBatchStream(ShardedTrainSet(even_shards), 8, seed=0, image_size=16, config=CPU)
    for _ in range(3):
        stream.next_batch()
    resumed = DaliBatchStream(ShardedTrainSet(even_shards), 8, seed=0, image_size=16, config=CPU)
    resumed.load_state_dict(stream.state_dict())
    assert resumed.fractional_epoch == stream.fractional_epoch
    resumed.next_batch()
    with pytest.raises(ValueError, match="backend"):
        resumed.load_state_dict({"backend": "webdataset"})
