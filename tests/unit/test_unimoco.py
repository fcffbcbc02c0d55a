# UniMoCo on one process: UniCon against a direct formula, InfoNCE, queue order, unlabeled training, exact resume.
import math

import pytest
import torch
import torch.nn.functional as F

from toolkit.contrastive import unicon_loss_reference
from toolkit.contrastive.queue import LabelQueue
from toolkit.training.run_files import prepare_run_folder
from toolkit.training.trainer import Trainer


def unicon_direct(query, keys, query_labels, key_labels, own_key, temperature, margin):
    """L_i = log(1 + sum_n exp(s_n + margin) * sum_p exp(-s_p)), written out with loops (float64)."""
    losses = []
    for i in range(query.shape[0]):
        pos, neg = torch.zeros((), dtype=query.dtype), torch.zeros((), dtype=query.dtype)
        for j in range(keys.shape[0]):
            s = (query[i] @ keys[j]) / temperature
            is_positive = j == int(own_key[i]) or (int(query_labels[i]) >= 0
                                                   and int(query_labels[i]) == int(key_labels[j]))
            if is_positive:
                pos = pos + torch.exp(-s)
            else:
                neg = neg + torch.exp(s + margin)
        losses.append(torch.log(1 + neg * pos))
    return torch.stack(losses)


def random_case(seed, num_queries=5, num_keys=12, dim=6):
    gen = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(num_queries, dim, generator=gen, dtype=torch.float64), dim=1)
    keys = F.normalize(torch.randn(num_keys, dim, generator=gen, dtype=torch.float64), dim=1)
    key_labels = torch.randint(-1, 4, (num_keys,), generator=gen)
    query_labels = torch.tensor([0, 1, -1, 3, 2])[:num_queries]
    own_key = torch.arange(num_queries)
    key_labels[own_key] = query_labels  # own keys carry the query's label
    return query, keys, query_labels, key_labels, own_key


@pytest.mark.parametrize("seed,margin", [(0, 0.0), (1, 0.2), (2, -0.1)])
def test_unicon_equals_direct_formula_forward_and_gradients(seed, margin):
    query, keys, q_labels, k_labels, own = random_case(seed)
    q1, k1 = query.clone().requires_grad_(True), keys.clone().requires_grad_(True)
    q2, k2 = query.clone().requires_grad_(True), keys.clone().requires_grad_(True)
    ours = unicon_loss_reference(q1.float(), k1.float(), q_labels, k_labels, own, 0.1, margin)
    direct = unicon_direct(q2, k2, q_labels, k_labels, own, 0.1, margin)
    torch.testing.assert_close(ours.double(), direct, rtol=1e-5, atol=1e-5)
    ours.sum().backward()
    direct.sum().backward()
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k1.grad, k2.grad, rtol=1e-4, atol=1e-5)
    assert float(q2.grad.abs().max()) > 1e-3


def test_unicon_with_one_positive_is_infonce():
    query, keys, _, _, own = random_case(3)
    unlabeled = torch.full((5,), -1)
    loss = unicon_loss_reference(query, keys, unlabeled, torch.full((12,), -1), own, 0.07, 0.0)
    logits = query @ keys.t() / 0.07
    infonce = F.cross_entropy(logits, own, reduction="none")
    torch.testing.assert_close(loss.double(), infonce, rtol=1e-6, atol=1e-6)


def test_unlabeled_query_still_has_its_own_key_as_positive():
    query, keys, _, _, own = random_case(4)
    loss = unicon_loss_reference(query, keys, torch.full((5,), -1), torch.full((12,), -1), own, 0.07)
    assert bool((loss > 0).all())  # the seed implementation would give 0 here (no positive at all)


def test_queue_is_a_ring_in_enqueue_order():
    queue = LabelQueue(size=6, dim=2, global_batch_size=2)
    for step in range(4):
        queue.enqueue(torch.full((2, 2), float(step)), torch.tensor([10 * step, 10 * step + 1]))
    assert queue.labels_K.tolist() == [30, 31, 10, 11, 20, 21]
    assert queue.keys_KP[:, 0].tolist() == [3, 3, 1, 1, 2, 2]
    assert int(queue.pointer) == 2 and int(queue.num_filled) == 6
    with pytest.raises(ValueError, match="multiple of the global batch"):
        LabelQueue(size=10, dim=2, global_batch_size=4)


UNIMOCO = ["contrastive.weight=1.0", "contrastive.queue_size=96", "contrastive.projection=mlp",
           "contrastive.projection_dim=16", "contrastive.projection_hidden=32", "contrastive.momentum=0.9",
           "data.samples_per_label=2"]


def make(recipe):
    return Trainer(recipe, prepare_run_folder(recipe), verbose=False)


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_unlabeled_data_trains_as_moco(tiny_recipe):
    # No labels at all and no identity head: the own key is each query's only positive (plain MoCo).
    recipe = tiny_recipe(*UNIMOCO, "run.name=moco", "head.weight=0.0", "data.synthetic.labeled_fraction=0.0",
                         "contrastive.queue_size=32", "contrastive.momentum=0.5", "contrastive.temperature=0.2",
                         "train.num_epochs=20", "optim.lr=0.1", "schedule.warmup_steps=0", "data.image_size=32",
                         "data.synthetic.num_identities=16", "data.synthetic.samples_per_identity=4")
    trainer = make(recipe)
    losses = [loss for _, loss in trainer.fit().losses]  # 160 steps
    assert all(math.isfinite(v) and v > 0.1 for v in losses)
    fifth = len(losses) // 5
    first, last = sum(losses[:fifth]) / fifth, sum(losses[-fifth:]) / fifth
    assert last < 0.9 * first, (first, last)  # measured: 3.41 -> 2.68
    assert int((trainer.unimoco.queue.labels_K >= 0).sum()) == 0  # nothing labeled ever entered the queue


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_resume_restores_the_queue_and_the_losses(tiny_recipe):
    overrides = [*UNIMOCO, "train.num_epochs=2", "checkpoint.every_steps=4", "checkpoint.keep_last=0"]
    full = make(tiny_recipe(*overrides, "run.name=u_full"))
    full_losses = dict(full.fit().losses)
    resumed = make(tiny_recipe(*overrides, "run.name=u_resumed"))
    # Check the queue right after loading against the uninterrupted run's queue at step 4.
    probe = make(tiny_recipe(*overrides, "run.name=u_probe", "train.num_epochs=2"))
    for _ in range(4):
        probe.train_step()
        probe.step += 1
    resumed.resume(full.run_dir / "checkpoints" / "step_00000004.pt")
    assert torch.equal(resumed.unimoco.queue.keys_KP, probe.unimoco.queue.keys_KP)
    assert torch.equal(resumed.unimoco.queue.labels_K, probe.unimoco.queue.labels_K)
    assert int((resumed.unimoco.queue.labels_K >= 0).sum()) > 0
    resumed_losses = dict(resumed.fit().losses)
    for step in range(5, 9):
        assert resumed_losses[step] == pytest.approx(full_losses[step], abs=1e-6), step


def test_momentum_follows_the_recipe_schedule(tiny_recipe):
    from toolkit.contrastive.unimoco import momentum_at

    cfg = tiny_recipe(*UNIMOCO, "contrastive.momentum_schedule=cosine", "contrastive.momentum=0.99").contrastive
    assert momentum_at(cfg.momentum, cfg.momentum_schedule, 0, 100) == pytest.approx(0.99)
    assert momentum_at(cfg.momentum, cfg.momentum_schedule, 50, 100) == pytest.approx(0.995)
    assert momentum_at(cfg.momentum, cfg.momentum_schedule, 100, 100) == pytest.approx(1.0)


def test_key_encoder_is_the_ema_of_the_query_encoder(tiny_recipe):
    trainer = make(tiny_recipe(*UNIMOCO, "run.name=ema"))
    encoders = trainer.backbone.unwrapped()
    keys_before = [k.detach().clone() for _, k in encoders.momentum_pairs()]
    assert all(torch.equal(q, k) for (q, _), k in zip(encoders.momentum_pairs(), keys_before))  # starts as a copy
    trainer.train_step()
    for (query, key), before in zip(encoders.momentum_pairs(), keys_before):
        torch.testing.assert_close(key, 0.9 * before + 0.1 * query, rtol=0, atol=1e-6)
        assert not key.requires_grad
    assert not all(torch.equal(k, b) for (_, k), b in zip(encoders.momentum_pairs(), keys_before))


def test_queue_size_must_be_a_multiple_of_the_global_batch(tiny_recipe):
    from toolkit.errors import ConfigError

    with pytest.raises(ConfigError, match="queue_size 100 is not a multiple of the global batch 8"):
        make(tiny_recipe(*UNIMOCO, "contrastive.queue_size=100", "run.name=bad"))


@pytest.mark.parametrize("head_implementation", ["fused", "fused_linear"])
def test_fused_kernels_in_the_trainer_match_the_references(tiny_recipe, head_implementation):
    from toolkit import ops

    if not ops.FUSED_KERNELS_AVAILABLE:
        pytest.skip(f"fused kernels not built: {ops.UNAVAILABLE_REASON}")
    # lr ~ 0: the weights stay put, so every step compares the implementations on new batches and a fuller
    # queue without the chaotic amplification of tiny rounding differences by training.
    common = [*UNIMOCO, "data.synthetic.labeled_fraction=0.5", "optim.lr=1e-12"]
    reference = make(tiny_recipe(*common, "run.name=ref", "contrastive.implementation=reference",
                                 "head.implementation=reference"))
    fused = make(tiny_recipe(*common, "run.name=fused", "contrastive.implementation=fused",
                             f"head.implementation={head_implementation}"))
    for _ in range(3):
        expected, got = reference.train_step(measure_grad_norm=True), fused.train_step(measure_grad_norm=True)
        assert float(got) == pytest.approx(float(expected), rel=1e-5)
        for name in ("loss_id", "loss_con"):
            assert float(fused.last_loss_parts[name]) == pytest.approx(float(reference.last_loss_parts[name]),
                                                                       rel=1e-5, abs=1e-6)
        for part in ("backbone", "head"):
            assert float(fused.last_grad_norms[part]) == pytest.approx(float(reference.last_grad_norms[part]),
                                                                       rel=1e-4, abs=1e-6)
    assert float(reference.last_loss_parts["loss_id"]) > 0 and float(reference.last_grad_norms["head"]) > 0


def test_contrastive_only_run_builds_no_identity_centers(tiny_recipe, capsys):
    """head.weight 0: no center shard, no head optimizer or schedule; the startup lines count each part."""
    from toolkit.models import create_backbone

    recipe = tiny_recipe(*UNIMOCO, "run.name=no_head", "head.weight=0.0")
    trainer = Trainer(recipe, prepare_run_folder(recipe), verbose=True)
    assert trainer.head is None and list(trainer.parts) == ["backbone"] and list(trainer.schedulers) == ["backbone"]
    trainer.describe()
    lines = capsys.readouterr().out
    backbone = create_backbone(recipe.model.backbone, embedding_size=recipe.model.embedding_size,
                               input_size=recipe.data.image_size)
    encoders = trainer.backbone.unwrapped()
    expected_backbone = sum(p.numel() for p in backbone.parameters())
    expected_projection = sum(p.numel() for p in encoders.projection.parameters())
    assert f"backbone {recipe.model.backbone}: {expected_backbone / 1e6:.2f}M params" in lines
    assert f"projection: {expected_projection / 1e6:.2f}M" in lines
    assert f"momentum key encoder: {(expected_backbone + expected_projection) / 1e6:.2f}M" in lines
    assert "head: none" in lines
    before = [p.detach().clone() for p in encoders.parameters()]
    trainer.train_step()   # trains without a head
    assert any(not torch.equal(a, b) for a, b in zip(before, encoders.parameters()))
