# The shard stream: epoch coverage, labels after the shuffle, identity groups, two views, exact resume, trainer.
from __future__ import annotations

from collections import Counter

import pytest
import torch

from tests.data.conftest import quiet
from tests.data.factories import face_jpeg, identify, write_folder_tree
from toolkit.data.converters import ConvertSettings, ImageFolderSource, convert
from toolkit.data.transforms import ViewAugmentation
from toolkit.data.shard_stream import ShardBatchStream, ShardedTrainSet, StreamPlan, _SubStreamReader, epoch_repeats
from toolkit.errors import FaceCLError


def stream(manifest, batch_size=8, *, samples_per_label=1, **kwargs) -> ShardBatchStream:
    kwargs = {"seed": 3, "image_size": 16, "window_shards": 2, **kwargs}
    return ShardBatchStream(ShardedTrainSet(manifest, samples_per_label=samples_per_label), batch_size, **kwargs)


def seen(images, labels) -> list[tuple[int, int]]:
    """(identity, sample) of every image, checking that the label is the image's identity."""
    found = []
    for image, label in zip(images, labels):
        identity, sample = identify(image)
        assert identity == int(label), f"image of identity {identity} came with label {int(label)}"
        found.append((identity, sample))
    return found


def test_one_epoch_over_two_ranks_yields_every_sample_once(even_shards):
    ranks = [stream(even_shards, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == 80 // 16
    epochs = []
    for _ in range(2):
        counts = Counter()
        for _ in range(ranks[0].batches_per_epoch):
            for rank in ranks:
                images, labels = rank.next_batch()
                assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
                assert float(images.min()) >= -1 and float(images.max()) <= 1 and labels.dtype == torch.int64
                counts.update(seen(images, labels))
        assert counts == Counter({(i, j): 1 for i in range(16) for j in range(5)})
        epochs.append(counts)
    assert ranks[0].fractional_epoch == 2.0
    assert ranks[0].skip_stats() == {}


def test_epochs_differ_and_flip_is_applied(even_shards):
    one = stream(even_shards)
    first = [one.next_batch() for _ in range(one.batches_per_epoch)]
    second = [one.next_batch() for _ in range(one.batches_per_epoch)]
    assert not torch.equal(torch.cat([l for _, l in first]), torch.cat([l for _, l in second]))
    no_flip = stream(even_shards, flip=False)
    plain = [no_flip.next_batch() for _ in range(no_flip.batches_per_epoch)]
    pairs = [(a, b) for (x, _), (y, _) in zip(first, plain) for a, b in zip(x, y)]
    assert torch.equal(torch.cat([l for _, l in first]), torch.cat([l for _, l in plain]))  # same order
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in pairs)
    flipped = sum(not torch.equal(a, b) for a, b in pairs)
    assert 20 <= flipped <= 60  # about half of the 80 images


def test_resume_with_two_workers_sees_exactly_the_same_batches(even_shards):
    reference = stream(even_shards, 4, num_workers=2)
    total = int(1.5 * reference.batches_per_epoch)
    expected = [reference.next_batch() for _ in range(total)]
    for stop in (7, reference.batches_per_epoch):  # mid-epoch (odd: the other worker's turn) and at the boundary
        first = stream(even_shards, 4, num_workers=2)
        for _ in range(stop):
            first.next_batch()
        state = first.state_dict()
        assert all(isinstance(v, (int, float, str)) for v in state.values())
        resumed = stream(even_shards, 4, num_workers=2)
        resumed.load_state_dict(state)
        for step in range(stop, total):
            images, labels = resumed.next_batch()
            assert torch.equal(labels, expected[step][1]) and torch.equal(images, expected[step][0]), step
        assert resumed.fractional_epoch == pytest.approx(1.5)


def test_two_workers_cover_the_epoch_too(even_shards):
    two = stream(even_shards, 4, num_workers=2)
    counts = Counter()
    for _ in range(two.batches_per_epoch):
        counts.update(seen(*two.next_batch()))
    assert counts == Counter({(i, j): 1 for i in range(16) for j in range(5)})


def test_identity_grouped_batches(grouped_shards):
    grouped = stream(grouped_shards, 8, samples_per_label=2)
    train_set = grouped.train_set
    # Full chunks of 4 only: 16 identities with 6..9 images -> 1 or 2 chunks each.
    assert len(train_set) == sum(4 * ((6 + i % 4) // 4) for i in range(16))
    counts = Counter()
    for _ in range(2 * grouped.batches_per_epoch):
        images, labels = grouped.next_batch()
        found = seen(images, labels)
        for a, b in zip(found[0::2], found[1::2]):
            assert a[0] == b[0] and a != b, "a group must be two different images of one identity"
        counts.update(found)
    assert max(counts.values()) <= 2


def test_two_moco_views(grouped_shards):
    views = stream(grouped_shards, 4, views=ViewAugmentation(), samples_per_label=2)
    images, labels = views.next_batch()
    assert images.shape == (4, 2, 3, 16, 16) and labels.shape == (4,)
    assert not torch.equal(images[:, 0], images[:, 1])
    assert float(images.min()) >= -1 and float(images.max()) <= 1


def test_two_moco_views_made_in_a_worker_equal_those_made_in_process(grouped_shards):
    in_process = stream(grouped_shards, 4, views=ViewAugmentation(), samples_per_label=2)
    in_worker = stream(grouped_shards, 4, views=ViewAugmentation(), samples_per_label=2, num_workers=1)
    for _ in range(3):
        (views_a, labels_a), (views_b, labels_b) = in_process.next_batch(), in_worker.next_batch()
        assert torch.equal(labels_a, labels_b) and torch.equal(views_a, views_b)
    in_worker.close()


def test_two_moco_views_of_resized_images(grouped_shards):
    views = stream(grouped_shards, 4, views=ViewAugmentation(), samples_per_label=2, image_size=24)
    images, labels = views.next_batch()
    assert images.shape == (4, 2, 3, 24, 24) and images.dtype == torch.float32 and labels.shape == (4,)
    assert float(images.min()) >= -1 and float(images.max()) <= 1


def test_samples_per_label_must_divide_the_chunks(even_shards):
    with pytest.raises(FaceCLError, match="group_size 1"):
        ShardedTrainSet(even_shards, samples_per_label=2)


def test_a_reader_holds_one_window_at_most(grouped_shards):
    train_set = ShardedTrainSet(grouped_shards)
    plan = StreamPlan(seed=0, rank=0, world_size=1, num_streams=1, batch_size=8, samples_per_label=1, window_shards=2)
    reader = _SubStreamReader(train_set, plan, epoch=0, reader=0, first_unit=0)
    largest_window = 2 * int(train_set.units_per_shard.max())
    for _ in range(30):
        reader.take(8)
        assert len(reader._units) <= largest_window


def test_state_from_another_setup_is_refused(even_shards):
    one = stream(even_shards)
    one.next_batch()
    state = one.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        stream(even_shards, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        stream(even_shards, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="backend"):
        stream(even_shards).load_state_dict({"epoch": 0, "batch_in_epoch": 1, "seed": 3})
    other = stream(even_shards, world_size=2)
    other.load_state_dict(state, allow_world_size_change=True)
    assert other.epoch == 0 and other.batch_in_epoch == 0  # 8 samples read = half a global batch of 16


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_trainer_runs_and_resumes_on_shards(even_shards, tiny_recipe, tmp_path):
    from toolkit.training.run_files import prepare_run_folder
    from toolkit.training.trainer import Trainer

    overrides = ["data.backend=webdataset", f"data.manifest={even_shards}", "data.image_size=16",
                 "data.num_workers=1", "train.num_epochs=0.8", "checkpoint.every_steps=4", "checkpoint.keep_last=0"]
    recipe = tiny_recipe(*overrides)
    full = Trainer(recipe, prepare_run_folder(recipe), verbose=False)
    assert full.num_classes == 16 and full.shape.steps_per_epoch == 10
    full.fit()
    resumed_recipe = tiny_recipe(*overrides, "run.name=resumed")
    resumed = Trainer(resumed_recipe, prepare_run_folder(resumed_recipe), verbose=False)
    resumed.resume(prepare_run_folder(recipe) / "checkpoints" / "step_00000004.pt")
    resumed.fit()
    assert [round(v, 5) for _, v in resumed.result.losses[4:]] == [round(v, 5) for _, v in full.result.losses[4:]]
    assert full.stream.skip_stats() == {}


def test_real_data_without_eval_sets_evaluates_nothing(even_shards, tiny_recipe, capsys):
    """eval.sets: [] on shards: no synthetic faces are verified (they say nothing about a real-data model)."""
    from toolkit.training.run_files import prepare_run_folder
    from toolkit.training.trainer import Trainer

    recipe = tiny_recipe("data.backend=webdataset", f"data.manifest={even_shards}", "data.image_size=16",
                         "data.num_workers=0", "train.num_epochs=0.3", "eval.sets=[]", "eval.every_steps=1")
    trainer = Trainer(recipe, prepare_run_folder(recipe), verbose=True)
    assert trainer.val_sets == {}
    trainer.fit()
    out = capsys.readouterr().out
    assert out.count("evaluation: none (eval.sets is empty and the data is not synthetic)") == 1
    assert trainer.result.evaluations == [] and trainer.final_verification() is None
    results = trainer.write_results()
    assert '"final_verification": null' in results.read_text()


# ----- repeated samples when there are too few shards for the readers -----------------------------------------

@pytest.fixture(scope="module")
def one_big_shard(tmp_path_factory):
    """The 80 images of even_shards in a single shard: every reader beyond the first reads resampled copies."""
    root = tmp_path_factory.mktemp("one_shard")
    tree = {f"id{i:02d}": [(f"{j}.jpg", face_jpeg(i, j)) for j in range(5)] for i in range(16)}
    write_folder_tree(root / "src", tree)
    convert(ImageFolderSource(root / "src"), root / "out", ConvertSettings(shard_size=100, group_size=1, image_size=16),
            progress=False, log=quiet)
    return root / "out" / "manifest.json"


def read_one_epoch(ranks: list[ShardBatchStream]) -> Counter:
    counts = Counter()
    for _ in range(ranks[0].batches_per_epoch):
        for rank in ranks:
            counts.update(identify(image) for image in rank.next_batch()[0])
    return counts


@pytest.mark.parametrize("manifest, world_size, window", [("one_big_shard", 2, 4), ("even_shards", 3, 1),
                                                          ("even_shards", 2, 2)])
def test_predicted_repeats_equal_what_the_ranks_really_read(manifest, world_size, window, request):
    path = request.getfixturevalue(manifest)
    ranks = [stream(path, rank=r, world_size=world_size, window_shards=window) for r in range(world_size)]
    counts = read_one_epoch(ranks)
    predicted = epoch_repeats(ranks[0].train_set, ranks[0].plan, ranks[0].batches_per_epoch)
    assert (predicted.units_read, predicted.distinct_units) == (sum(counts.values()), len(counts))
    if manifest == "one_big_shard":  # both ranks read from the one shard: many images twice
        assert len(counts) < 0.8 * sum(counts.values())


def test_many_repeats_are_one_warning_on_rank_zero_with_the_advice(one_big_shard, even_shards, caplog):
    caplog.set_level("WARNING", logger="toolkit.data")
    ranks = [stream(one_big_shard, rank=r, world_size=2, window_shards=4) for r in range(2)]
    counts = read_one_epoch(ranks)
    lines = [r.getMessage() for r in caplog.records if "repeats" in r.getMessage()]
    assert len(lines) == 1, lines  # rank 0 only
    distinct, read = len(counts), sum(counts.values())
    assert f"({distinct} distinct of {read} read)" in lines[0]
    assert f"{100 * (1 - distinct / read):.0f}% of each epoch's samples are repeats" in lines[0]
    assert "1 usable shard(s) for 2 reader(s)" in lines[0] and "--shard-size 10 gives about 8" in lines[0]
    caplog.clear()
    [stream(even_shards, rank=r, world_size=2, window_shards=2) for r in range(2)]  # 8 shards, every one read once
    assert not [r for r in caplog.records if "repeats" in r.getMessage()]


def test_a_process_that_never_closes_its_stream_still_exits(even_shards):
    """Loader workers ignore SIGTERM (a scheduler's signal must not kill them mid-step), which is the signal
    multiprocessing's exit handler stops daemonic children with before joining them: without closing open
    streams at exit first, a process that leaves a stream open waits for its workers forever (the test suite
    itself once hung after its last test that way)."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    script = ("import sys; from toolkit.data.shard_stream import ShardBatchStream, ShardedTrainSet; "
              f"s = ShardBatchStream(ShardedTrainSet({str(even_shards)!r}), 4, seed=0, image_size=16, num_workers=2); "
              "s.next_batch(); print('took a batch', flush=True)")
    job = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        pytest.fail("the process did not exit within 60 s: its loader workers were never stopped")
    assert job.returncode == 0 and out.strip() == "took a batch", err
