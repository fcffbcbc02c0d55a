# Trainer behaviour against independent references: exact resume, accumulation, precision, schedule, decay groups.
import math

import pytest
import torch

from toolkit.config.schema import ScheduleConfig
from toolkit.checkpoint import load_checkpoint
from toolkit.training.optim import lr_factor, split_decay_groups
from toolkit.training.run_files import prepare_run_folder
from toolkit.training.trainer import Trainer
from toolkit.errors import CheckpointError
from toolkit.models import create_backbone, register_backbone


def make_trainer(recipe):
    return Trainer(recipe, prepare_run_folder(recipe), verbose=False)


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_resume_reproduces_the_uninterrupted_losses(tiny_recipe):
    # 48 samples / batch 8 = 6 steps/epoch; 2 epochs = 12 steps; dropout and flips exercise the saved RNG
    # and the data position, and the resume point (step 5) is inside an epoch.
    overrides = ["train.num_epochs=2", "model.dropout=0.2", "checkpoint.every_steps=5", "checkpoint.keep_last=0"]
    full = make_trainer(tiny_recipe(*overrides, "run.name=full"))
    full_losses = dict(full.fit().losses)
    assert len(full_losses) == 12

    # A crash after step 5 leaves step_00000005.pt; a new process resumes from it with the same recipe.
    resumed = make_trainer(tiny_recipe(*overrides, "run.name=resumed"))
    resumed.resume(full.run_dir / "checkpoints" / "step_00000005.pt")
    assert resumed.step == 5
    resumed_losses = dict(resumed.fit().losses)
    for step in range(6, 13):
        assert resumed_losses[step] == pytest.approx(full_losses[step], abs=1e-6, rel=0), step
    # The losses differ from step to step, so equality above is not a coincidence of constants.
    assert len({round(v, 6) for v in full_losses.values()}) == 12


def test_resume_rejects_checkpoint_of_another_run(tiny_recipe):
    trainer = make_trainer(tiny_recipe("run.name=a", "train.num_epochs=0.25"))
    trainer.fit()
    other = make_trainer(tiny_recipe("run.name=b", "data.synthetic.num_identities=10"))
    with pytest.raises(CheckpointError, match="num_classes=12.*num_classes=10"):
        other.resume(trainer.run_dir)


@register_backbone("test_linear")
def _linear_backbone(*, embedding_size=512, dropout=0.0, input_size=112, activation_checkpointing=False):
    """No batch norm, so micro-batches and a full batch must give identical gradients."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * input_size * input_size, embedding_size))


def test_gradient_accumulation_equals_one_large_batch(tiny_recipe):
    common = ["model.backbone=test_linear", "train.num_epochs=0.5", "optim.name=sgd", "optim.momentum=0.0",
              "optim.weight_decay=0.0", "data.flip=false"]
    accumulated = make_trainer(tiny_recipe(*common, "run.name=acc", "data.batch_size=4", "parallel.grad_accum_steps=3"))
    large = make_trainer(tiny_recipe(*common, "run.name=big", "data.batch_size=12"))
    accumulated.train_step()
    large.train_step()
    for p_acc, p_big in zip(accumulated.backbone.unwrapped().parameters(), large.backbone.unwrapped().parameters()):
        torch.testing.assert_close(p_acc, p_big, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(accumulated.head.module.centers_CD, large.head.module.centers_CD, atol=1e-6, rtol=1e-5)
    # And the step did move the weights.
    fresh = make_trainer(tiny_recipe(*common, "run.name=fresh", "data.batch_size=12"))
    assert not torch.allclose(fresh.head.module.centers_CD, large.head.module.centers_CD)


def test_bf16_autocast_step_tracks_fp32_step(tiny_recipe):
    fp32 = make_trainer(tiny_recipe("run.name=fp32", "parallel.precision=fp32"))
    bf16 = make_trainer(tiny_recipe("run.name=bf16", "parallel.precision=bf16"))
    loss32, loss16 = float(fp32.train_step()), float(bf16.train_step())
    assert loss16 != loss32  # autocast really ran in bf16
    assert abs(loss16 - loss32) < 0.02 * abs(loss32)


def test_gradient_clipping_bounds_each_part_by_its_own_norm(tiny_recipe):
    common = ["model.backbone=test_linear", "optim.momentum=0.0", "optim.weight_decay=0.0", "schedule.warmup_steps=0",
              "schedule.decay=constant", "optim.lr=1.0"]
    clipped = make_trainer(tiny_recipe(*common, "run.name=clip", "parallel.clip_grad_norm=0.01"))
    parts = {"backbone": list(clipped.backbone.unwrapped().parameters()), "head": list(clipped.head.module.parameters())}
    before = {name: [p.detach().clone() for p in params] for name, params in parts.items()}
    clipped.train_step()
    for name, params in parts.items():
        assert float(clipped.last_grad_norms[name]) > 0.01  # the raw norm was above the limit
        update_sq = sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(params, before[name]))
        assert math.sqrt(update_sq) == pytest.approx(0.01, rel=1e-3), name  # lr 1 x gradient clipped to 0.01


def test_lr_schedule_warmup_cosine_poly():
    cosine = ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 110, cosine) == pytest.approx(0.1)
    assert lr_factor(9, 110, cosine) == pytest.approx(1.0)
    assert lr_factor(10, 110, cosine) == pytest.approx(1.0)
    assert lr_factor(60, 110, cosine) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, 110, cosine) == pytest.approx(0.1)
    poly = ScheduleConfig(warmup_steps=0, decay="poly", poly_power=2.0)
    assert lr_factor(25, 100, poly) == pytest.approx(0.75 ** 2)


def test_no_weight_decay_on_norm_and_bias_parameters():
    model = create_backbone("iresnet18", embedding_size=64, input_size=32)
    decay, no_decay = split_decay_groups([model])
    decay_ids = {id(p) for p in decay}
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, torch.nn.modules.batchnorm._NormBase)
            assert (id(param) in decay_ids) == (not is_norm and pname != "bias"), f"{name}.{pname}"
    assert any(p.ndim == 4 for p in decay) and any(p.ndim == 1 for p in decay)  # convs and PReLU decay


def test_checkpoint_holds_everything_needed(tiny_recipe):
    trainer = make_trainer(tiny_recipe("run.name=ck", "train.num_epochs=0.5"))
    trainer.fit()
    payload = load_checkpoint(trainer.run_dir)
    assert payload["step"] == 3
    for key in ("engine", "head_shards", "schedulers", "rng_per_rank", "data", "history"):
        assert key in payload
    (shard,) = payload["head_shards"]
    assert (shard["class_start"], shard["class_count"], shard["num_classes"]) == (0, 12, 12)
    assert torch.equal(shard["centers"], trainer.head.module.centers_CD.detach())
    assert "momentum_buffer" in shard["optimizer_state"]
    for key in ("backbone", "optimizer", "scaler"):  # single/DDP: the backbone travels in the same file
        assert key in payload["engine"]
    assert len(payload["rng_per_rank"]) == 1
    assert payload["data"]["batch_in_epoch"] == 3
    assert payload["schedulers"]["backbone"]["last_epoch"] == 3


def test_eval_sets_from_bin_files_match_the_same_pairs_in_memory(tiny_recipe, tmp_path):
    """eval.sets: .bin files (insightface format) are evaluated by name; the same pairs stored as JPEG give
    the same accuracy as evaluating them from memory."""
    import io
    import pickle

    import numpy as np
    from PIL import Image

    reference = make_trainer(tiny_recipe("run.name=evalref", "train.num_epochs=2"))
    reference.fit()
    pairs = reference.val_sets["synthetic"]
    encoded = []
    for index in range(len(pairs)):
        pixels = ((pairs[index] * 0.5 + 0.5).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=100)
        encoded.append(buffer.getvalue())
    for name in ("lfw", "agedb_30"):
        (tmp_path / f"{name}.bin").write_bytes(pickle.dumps((encoded, pairs.is_same_P.tolist()), protocol=4))
    sets = f"eval.sets=[{tmp_path / 'lfw.bin'}, {tmp_path / 'agedb_30.bin'}]"
    from_files = make_trainer(tiny_recipe("run.name=evalbin", "train.num_epochs=2", sets))
    from_files.backbone.unwrapped().load_state_dict(reference.backbone.unwrapped().state_dict())
    entries = from_files.evaluate()
    assert [e["set"] for e in entries] == ["lfw", "agedb_30"]
    # Reference: the same JPEG bytes decoded here and evaluated from memory with the same model. (The
    # tiny model is near chance, so the JPEG round trip alone can move its accuracy by several pairs;
    # compare like with like.)
    from toolkit.eval import evaluate_pairs

    decoded = [torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32))
               .permute(2, 0, 1).div(127.5).sub(1.0) for data in encoded]
    from_files.backbone.train(False)
    expected = evaluate_pairs(from_files._embed, decoded, pairs.is_same_P, device=from_files.device,
                              batch_size=64, num_folds=10).accuracy_mean
    from_files.backbone.train(True)
    assert abs(entries[0]["accuracy_mean"] - expected) <= 0.026   # at most one pair of 40 (decoder rounding)
    assert entries[0]["accuracy_mean"] == entries[1]["accuracy_mean"]
    assert from_files.final_verification()["set"] == "lfw"


def test_lr_follows_the_global_batch_by_the_linear_scaling_rule(tiny_recipe):
    # 8 per rank x 3 accumulation = 24; quoted lr 0.1 at a global batch of 48 -> 0.05.
    trainer = make_trainer(tiny_recipe("run.name=lr", "optim.lr=0.1", "optim.reference_batch_size=48",
                                       "parallel.grad_accum_steps=3", "schedule.warmup_steps=0",
                                       "schedule.decay=constant"))
    assert trainer.shape.global_batch_size == 24
    assert trainer.peak_lr == pytest.approx(0.05)
    assert trainer.schedulers["backbone"].get_last_lr()[0] == pytest.approx(0.05)
    assert trainer.head.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_a_resume_at_another_world_size_keeps_the_checkpoints_global_batch(tiny_recipe):
    """The per-rank batch stays (memory) and the accumulation changes; else the accumulation stays and the
    per-rank batch changes; else the resume is refused with the way out, or the recipe's shape is allowed."""
    from toolkit.errors import ConfigError
    from toolkit.training.builders import SavedShape, build_run_shape

    recipe = tiny_recipe("data.batch_size=6")
    saved = SavedShape(world_size=2, batch_size=6, grad_accum_steps=1)   # global batch 12
    one = build_run_shape(recipe, 120, 1, saved=saved)
    assert (one.batch_size, one.grad_accum_steps, one.global_batch_size) == (6, 2, 12)
    three = build_run_shape(recipe, 120, 3, saved=saved)
    assert (three.batch_size, three.grad_accum_steps, three.global_batch_size) == (4, 1, 12)
    assert build_run_shape(recipe, 120, 3).global_batch_size == 18   # a fresh start takes the recipe's shape
    with pytest.raises(ConfigError, match=r"global batch 12 .6 per rank x 2 ranks x 1 accumulation. cannot be split "
                                          r"over 5 ranks.*--allow-batch-change"):
        build_run_shape(recipe, 120, 5, saved=saved)
    allowed = build_run_shape(recipe, 120, 5, saved=saved, allow_batch_change=True)
    assert (allowed.batch_size, allowed.global_batch_size) == (6, 30)
