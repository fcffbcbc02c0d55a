# arcface_torch configs -> recipes (launch/convert.py from-arcface): every real config converts and --print-configs.
"""Three kinds of checks of toolkit/config/from_arcface.py:

- every config of insightface's arcface_torch/configs/ (fixture `arcface_torch_copy`; skipped without a snapshot):
  converted through the command, loaded, run through `launch/train.py --print-config` (one subprocess for all),
  every key of the config and its base.py either mapped or listed as unmapped with a reason, and the printed
  values restated from the config's own numbers;
- hand-written configs in arcface_torch's style (below, text of our own) with expectations written out: margins,
  backbone with drop path and mask ratio (what arcface_torch's code masks: 0.1 whenever its ratio is above 0),
  sample rate, filter, precision, accumulation, the lr used as given
  (FaceCL's own lr / warmup / batch functions at a stated GPU count), warmup epochs, epochs, batch per GPU;
  arcface_torch's summed accumulation against FaceCL's averaged one on a small SGD and AdamW problem;
- bad input: a value that is not a literal, an unknown network, a statement that is not an assignment: one line.

FaceCL's data.batch_size is per rank (GPU) and micro-step, as arcface_torch's batch_size: the converter copies it
and leaves data.global_batch_size at 0, so the global batch is batch_size x GPUs x grad_accum_steps in both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO
from toolkit.config import load_config
from toolkit.config.from_arcface import SMALLEST_SAMPLE_RATE, convert_arcface_config, read_arcface_config
from toolkit.errors import ConfigError
from toolkit.models import list_backbones
from toolkit.training.builders import build_run_shape
from toolkit.training.optim import lr_factor, scaled_lr, warmup_steps_of

CONVERT = REPO / "launch" / "convert.py"
TRAIN = REPO / "launch" / "train.py"
BASE_YAML = REPO / "recipes" / "base.yaml"

# arcface_torch's defaults file, in our own words: the keys and values of its configs/base.py.
BASE_PY = """\
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.save_all_states = False
config.output = "ms1mv3_arcface_r50"
config.embedding_size = 512
config.sample_rate = 1
config.interclass_filtering_threshold = 0
config.fp16 = False
config.batch_size = 128
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.verbose = 2000
config.frequent = 10
config.dali = False
config.dali_aug = False
config.gradient_acc = 1
config.seed = 2048
config.num_workers = 2
config.wandb_key = "0123456789abcdef"
config.suffix_run_name = None
config.using_wandb = False
config.wandb_entity = "entity"
config.wandb_project = "project"
config.wandb_log_all = True
config.save_artifacts = False
config.wandb_resume = False
"""

VIT_B_WEBFACE42M = """\
from easydict import EasyDict as edict

# ViT-B on WebFace42M, 64 GPUs x 48
config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "vit_b_dp005_mask_005"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.3
config.interclass_filtering_threshold = 0.4
config.fp16 = True
config.weight_decay = 0.1
config.batch_size = 48
config.optimizer = "adamw"
config.lr = 0.001
config.verbose = 2000
config.dali = False
config.rec = "/data/faces/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 40
config.warmup_epoch = config.num_epoch // 10
config.val_targets = ["lfw", "cfp_fp"]
"""

R100_MS1MV3 = """\
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r100"
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.1
config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', "agedb_30"]
"""

MBF_GLINT = """\
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "mbf"
config.output = "runs/glint_mbf"
config.sample_rate = 0.2
config.fp16 = True
config.momentum = 0.8
config.weight_decay = 1e-4
config.batch_size = 256
config.lr = 0.2
config.dali = True
config.rec = "/train_tmp/glint360k"
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 20
config.warmup_epoch = 2
config.val_targets = []
"""

R50_ACCUMULATED_FP32 = """\
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.output = None
config.fp16 = False
config.batch_size = 64
config.gradient_acc = 4
config.optimizer = "sgd"
config.lr = 0.1
config.weight_decay = 5e-4
config.frequent = 50
config.rec = "/train_tmp/faces_emore"
config.num_classes = 85742
config.num_image = 5822653
config.num_epoch = 25
config.warmup_epoch = 1.5
config.val_targets = ["lfw"]
"""

VIT_T_ACCUMULATED_ADAMW = """\
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "vit_t_dp005_mask0"
config.output = None
config.sample_rate = 0
config.fp16 = True
config.weight_decay = 0.1
config.batch_size = 256
config.gradient_acc = 12
config.optimizer = "adamw"
config.lr = 0.001
config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 40
config.warmup_epoch = config.num_epoch // 10
config.val_targets = []
"""


def write_config(folder: Path, name: str, text: str, base: str = BASE_PY) -> Path:
    """configs/NAME.py and configs/base.py under `folder`, as arcface_torch lays them out."""
    configs = folder / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / "base.py").write_text(base)
    path = configs / f"{name}.py"
    path.write_text(text)
    return path


def convert(folder: Path, name: str, text: str, **kwargs):
    """(conversion, loaded recipe) of one hand-written config; the recipe inherits recipes/base.yaml."""
    conversion = convert_arcface_config(write_config(folder, name, text), registered_backbones=list_backbones(),
                                        **kwargs)
    out = folder / f"{name}.yaml"
    out.write_text(conversion.recipe_yaml(str(BASE_YAML), path=str(out)))
    return conversion, load_config(out, expand_env=False)


def result(conversion, key):
    return next(k for k in conversion.keys if k.key == key)


def load_convert_command():
    spec = importlib.util.spec_from_file_location("_convert_command", CONVERT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_command(module, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = module.main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


# The --print-config of many recipes in one process: train.py's own main() per recipe, stdout and stderr kept apart.
PRINT_CONFIGS = """\
import contextlib, importlib.util, io, json, sys
spec = importlib.util.spec_from_file_location("_train_command", sys.argv[1])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
results = {}
for recipe in sys.argv[2:]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = train.main(["--recipe", recipe, "--print-config"])
    results[recipe] = [status, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


def print_configs(recipes: list[Path], data_root: Path) -> dict[str, tuple[int, str, str]]:
    env = {**os.environ, "DATA_ROOT": str(data_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PRINT_CONFIGS, str(TRAIN), *map(str, recipes)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def touch_eval_sets(conversion, data_root: Path) -> None:
    """Empty stand-ins for the .bin files the recipe names (--print-config checks that they exist)."""
    for path in conversion.values["eval.sets"][0]:
        target = Path(path.replace("${DATA_ROOT}", str(data_root)))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()


# ----- every config of arcface_torch ------------------------------------------------------------------------------

def test_every_arcface_torch_config_converts_loads_and_prints_its_values(arcface_torch_copy, tmp_path):
    configs = sorted(p for p in (arcface_torch_copy / "configs").glob("*.py") if p.name not in ("base.py",
                                                                                                 "__init__.py"))
    assert len(configs) >= 40, [p.name for p in configs]
    command = load_convert_command()
    data_root = tmp_path / "data"
    recipes = {}
    for config in configs:
        out = tmp_path / "recipes" / f"{config.stem}.yaml"
        out.parent.mkdir(exist_ok=True)
        status, stdout, stderr = run_command(command, "from-arcface", config, "--out", out)
        assert status == 0 and stderr == "", (config.name, stderr)
        conversion = convert_arcface_config(config, registered_backbones=list_backbones())
        merged = {**read_arcface_config(config.parent / "base.py"), **read_arcface_config(config)}
        # every key of the config and of base.py: mapped to recipe keys, or unmapped with a reason, once each
        assert sorted(k.key for k in conversion.keys) == sorted(merged), config.name
        for k in conversion.keys:
            assert k.mapped or k.note, (config.name, k.key)
            assert f"  {k.key} = " in stdout, (config.name, k.key)   # the printed report names it
        header = out.read_text().split("\nbase:")[0]
        assert all(f"#   {k.key} = " in header for k in conversion.unmapped), config.name
        key = merged["wandb_key"].value   # a credential's place: never printed nor written
        assert key not in stdout and key not in out.read_text() and "wandb_key = <not shown>" in stdout
        touch_eval_sets(conversion, data_root)
        recipes[config.stem] = out
    results = print_configs(list(recipes.values()), data_root)
    for stem, out in recipes.items():
        status, printed, stderr = results[str(out)]
        assert status == 0 and stderr == "", (stem, stderr)
        check_printed_values(arcface_torch_copy / "configs" / f"{stem}.py", yaml.safe_load(printed), data_root)


def check_printed_values(config: Path, resolved: dict, data_root: Path) -> None:
    """The printed recipe against the config's own numbers, restated (train_v2.py's reading of each key)."""
    stem = config.stem
    values = {key: a.value for key, a in {**read_arcface_config(config.parent / "base.py"),
                                          **read_arcface_config(config)}.items()}
    accum = values.get("gradient_acc", 1)
    m1, m2, m3 = values["margin_list"]
    head, optim, data = resolved["head"], resolved["optim"], resolved["data"]
    assert (head["margin_m1"], head["margin_m2"], head["margin_m3"]) == ((1.0, 0.0, m3) if m3 > 0 else (m1, m2, m3))
    assert head["scale"] == 64.0
    assert head["sample_rate"] == (min(1.0, values["sample_rate"]) if values["sample_rate"] > 0
                                   else SMALLEST_SAMPLE_RATE), stem
    assert head["interclass_filter"] == values.get("interclass_filtering_threshold", 0)
    assert resolved["parallel"]["precision"] == ("fp16" if values["fp16"] else "fp32")
    assert resolved["parallel"]["grad_accum_steps"] == accum
    assert resolved["parallel"]["engine"] == "ddp"
    assert data["batch_size"] == values["batch_size"] and data["global_batch_size"] == 0
    assert optim["name"] == values["optimizer"] and optim["reference_batch_size"] == 0
    lr_factor_of_accum = accum if values["optimizer"] == "sgd" else 1
    assert optim["lr"] == pytest.approx(values["lr"] * lr_factor_of_accum), stem
    schedule = resolved["schedule"]
    assert (schedule["decay"], schedule["poly_power"], schedule["warmup_steps"]) == ("poly", 1.0, 0)
    if values["rec"] != "synthetic":
        assert resolved["train"]["num_epochs"] == values["num_epoch"]
        assert schedule["warmup_epochs"] == max(0, values["warmup_epoch"])
        assert data["backend"] == ("dali" if values["dali"] else "webdataset")
        folder = Path(values["rec"]).name
        assert data["manifest"] == f"{data_root}/{folder}_shards/manifest.json"
        assert resolved["eval"]["sets"] == [f"{data_root}/{folder}/{t}.bin" for t in values["val_targets"]]
    else:
        assert data["backend"] == "synthetic" and resolved["eval"]["sets"] == []
    network = values["network"]
    model = resolved["model"]
    if network.startswith("vit"):
        assert model["backbone"] == network[:5]
        assert model["drop_path"] == (0.05 if "dp005" in network else 0.1)
        assert model["mask_ratio"] == (0.0 if network.endswith(("mask0", "mask_0", "vit_h")) else 0.1)
        assert model["activation_checkpointing"] == (network[:5] in ("vit_b", "vit_l", "vit_h"))
    if network.startswith("r") and network != "r2060":
        assert model["backbone"] == f"iresnet{network[1:]}" and not model["activation_checkpointing"]
    assert model["dropout"] == 0.0 and model["embedding_size"] == values["embedding_size"]


def test_base_py_itself_and_a_missing_base_py_are_one_line_errors(tmp_path):
    config = write_config(tmp_path, "r100", R100_MS1MV3)
    with pytest.raises(ConfigError, match="is arcface_torch's base.py"):
        convert_arcface_config(config.parent / "base.py")
    (config.parent / "base.py").unlink()
    with pytest.raises(ConfigError, match=r"base.py not found: arcface_torch reads configs/base.py first.*--base"):
        convert_arcface_config(config)


# ----- hand-written configs, expectations written out -------------------------------------------------------------

def test_vit_b_webface42m_partial_fc_with_filter(tmp_path):
    conversion, recipe = convert(tmp_path, "wf42m_vit_b", VIT_B_WEBFACE42M)
    # named mask 0.05, but arcface_torch's ViT calls random_masking(x) without the ratio: its default 0.1 trains
    assert (recipe.model.backbone, recipe.model.drop_path, recipe.model.mask_ratio) == ("vit_b", 0.05, 0.1)
    assert "random_masking(x) without its mask_ratio" in result(conversion, "network").note
    assert recipe.model.activation_checkpointing and recipe.model.embedding_size == 512
    assert (recipe.head.margin_m1, recipe.head.margin_m2, recipe.head.margin_m3, recipe.head.scale) == \
        (1.0, 0.0, 0.4, 64.0)
    assert (recipe.head.sample_rate, recipe.head.interclass_filter) == (0.3, 0.4)
    assert (recipe.parallel.precision, recipe.parallel.grad_accum_steps, recipe.parallel.clip_grad_norm) == \
        ("fp16", 1, 5.0)
    assert (recipe.optim.name, recipe.optim.lr, recipe.optim.weight_decay, recipe.optim.eps) == \
        ("adamw", 0.001, 0.1, 1e-8)
    assert (recipe.train.num_epochs, recipe.schedule.warmup_epochs, recipe.schedule.warmup_steps) == (40, 4.0, 0)
    assert (recipe.data.batch_size, recipe.data.global_batch_size) == (48, 0)
    assert recipe.data.backend == "webdataset"
    assert recipe.data.manifest == "${DATA_ROOT}/WebFace42M_shards/manifest.json"
    assert recipe.eval.sets == ["${DATA_ROOT}/WebFace42M/lfw.bin", "${DATA_ROOT}/WebFace42M/cfp_fp.bin"]
    assert (recipe.run.output_dir, recipe.run.name) == ("work_dirs", "wf42m_vit_b")
    assert result(conversion, "warmup_epoch").value == "config.num_epoch // 10 (= 4)"
    # On the 64 GPUs it was written for, FaceCL's own numbers equal train_v2.py's: global batch, lr, warmup.
    shape = build_run_shape(recipe, num_samples=42474557, world_size=64)
    assert shape.global_batch_size == 48 * 64
    assert scaled_lr(recipe.optim, shape.global_batch_size) == 0.001
    arcface_warmup_steps = 42474557 // (48 * 64) * 4          # cfg.num_image // cfg.total_batch_size * warmup_epoch
    assert warmup_steps_of(recipe.schedule, shape.steps_per_epoch) == arcface_warmup_steps == 55304
    # the shards and what to run for them are named
    assert any("prepare_data.py recordio --rec $DATA_ROOT/WebFace42M/train.rec --out $DATA_ROOT/WebFace42M_shards"
               in line for line in conversion.todo)
    assert "export DATA_ROOT=/data/faces" in conversion.todo[0]
    assert "manifest.json should say num_classes 2059906" in result(conversion, "num_classes").note


def test_r100_ms1mv3_arcface_keeps_its_lr_at_any_global_batch(tmp_path):
    conversion, recipe = convert(tmp_path, "ms1mv3_r100", R100_MS1MV3)
    assert recipe.model.backbone == "iresnet100" and not recipe.model.activation_checkpointing
    assert (recipe.model.drop_path, recipe.model.mask_ratio) == (0.0, 0.0)
    assert "model.drop_path" not in conversion.values    # ViT settings only for ViTs (an iresnet refuses them)
    assert (recipe.head.margin_m1, recipe.head.margin_m2, recipe.head.margin_m3) == (1.0, 0.5, 0.0)
    assert (recipe.head.sample_rate, recipe.head.interclass_filter) == (1.0, 0.0)
    assert recipe.parallel.precision == "fp16"
    assert (recipe.optim.name, recipe.optim.lr, recipe.optim.momentum, recipe.optim.weight_decay) == \
        ("sgd", 0.1, 0.9, 5e-4)
    assert (recipe.train.num_epochs, recipe.schedule.warmup_epochs) == (20, 0.0)
    assert recipe.data.batch_size == 128
    assert result(conversion, "interclass_filtering_threshold").origin.endswith("base.py")
    # The trap: recipes/base.yaml quotes lr for a global batch of 512; inherited as it is, 8 GPUs x 128 would train
    # with 0.2. The converted recipe sets reference_batch_size 0, so the lr is arcface_torch's at every batch.
    assert yaml.safe_load(BASE_YAML.read_text())["optim"]["reference_batch_size"] == 512
    for gpus in (1, 8, 64):
        assert scaled_lr(recipe.optim, build_run_shape(recipe, 5179510, gpus).global_batch_size) == 0.1
    assert scaled_lr(load_config(tmp_path / "ms1mv3_r100.yaml", ["optim.reference_batch_size=512"],
                                 expand_env=False).optim, 8 * 128) == 0.2
    # no warmup; linear decay to 0 (PolynomialLRWarmup's power 1): halfway, half the lr
    assert warmup_steps_of(recipe.schedule, 1000) == 0
    assert lr_factor(500, 1000, recipe.schedule) == pytest.approx(0.5)


def test_mbf_with_dali_its_own_output_and_a_momentum_that_arcface_torch_ignores(tmp_path):
    conversion, recipe = convert(tmp_path, "glint360k_mbf", MBF_GLINT)
    expected = "mobilefacenet_mbf" if "mobilefacenet_mbf" in list_backbones() else "mobilefacenet"
    assert recipe.model.backbone == expected
    if expected == "mobilefacenet":   # a FaceCL without arcface_torch's mbf: the nearest one, said so
        assert any("mbf" in text and "nearest" in text for text in conversion.differences)
    assert (recipe.head.margin_m1, recipe.head.margin_m2, recipe.head.margin_m3) == (1.0, 0.0, 0.4)
    assert recipe.head.sample_rate == 0.2
    assert recipe.optim.momentum == 0.9
    assert "0.9, not 0.8" in result(conversion, "momentum").note
    assert recipe.data.backend == "dali" and recipe.eval.sets == []
    assert (recipe.run.output_dir, recipe.run.name) == ("runs", "glint_mbf")
    assert (recipe.schedule.warmup_epochs, recipe.optim.lr, recipe.data.batch_size) == (2.0, 0.2, 256)


def test_sgd_with_accumulation_in_fp32(tmp_path):
    conversion, recipe = convert(tmp_path, "ms1mv2_r50_acc", R50_ACCUMULATED_FP32)
    assert (recipe.parallel.precision, recipe.parallel.grad_accum_steps) == ("fp32", 4)
    assert recipe.model.backbone == "iresnet50" and (recipe.head.margin_m2, recipe.head.margin_m3) == (0.5, 0.0)
    # summed (arcface_torch) vs averaged (FaceCL) micro-batch gradients: lr x 4, weight decay / 4, clip norm / 4
    assert recipe.optim.lr == pytest.approx(0.4) and recipe.optim.weight_decay == pytest.approx(1.25e-4)
    assert recipe.parallel.clip_grad_norm == pytest.approx(1.25)
    assert recipe.schedule.warmup_epochs == 1.5 and recipe.train.num_epochs == 25
    assert (recipe.data.batch_size, recipe.eval.every_steps, recipe.run.log_every) == (64, 500, 13)
    shape = build_run_shape(recipe, 5822653, world_size=8)
    assert shape.global_batch_size == 64 * 8 * 4
    assert scaled_lr(recipe.optim, shape.global_batch_size) == pytest.approx(0.4)   # no batch scaling on top
    # train_v2.py: warmup micro-steps = num_image // (batch x GPUs) x 1.5; FaceCL counts optimizer steps
    assert abs(warmup_steps_of(recipe.schedule, shape.steps_per_epoch) - 5822653 // (64 * 8) * 1.5 / 4) <= 1
    assert "sums the micro-batch gradients" in result(conversion, "gradient_acc").note


def test_adamw_with_accumulation_and_sample_rate_zero(tmp_path):
    conversion, recipe = convert(tmp_path, "wf42m_vit_t_acc", VIT_T_ACCUMULATED_ADAMW)
    assert (recipe.model.backbone, recipe.model.drop_path, recipe.model.mask_ratio) == ("vit_t", 0.05, 0.0)
    assert not recipe.model.activation_checkpointing
    assert recipe.parallel.grad_accum_steps == 12
    assert (recipe.optim.lr, recipe.optim.weight_decay) == (0.001, 0.1)       # AdamW: scale free but for eps
    assert recipe.optim.eps == pytest.approx(1e-8 / 12) and recipe.parallel.clip_grad_norm == pytest.approx(5 / 12)
    assert recipe.head.sample_rate == SMALLEST_SAMPLE_RATE
    assert any("sample_rate 0 keeps only the classes" in text for text in conversion.differences)
    assert (recipe.schedule.warmup_epochs, recipe.train.num_epochs) == (4.0, 40)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_converted_accumulation_updates_as_arcface_torch_does(name):
    """train_v2.py sums micro-batch gradients (no 1/gradient_acc) and clips the sum at 5; FaceCL averages them.
    With the converted lr / weight decay / eps / clip norm, a few optimizer steps land on the same weights."""
    accum, lr, decay = 4, 0.1 if name == "sgd" else 1e-3, 5e-4 if name == "sgd" else 0.1
    torch.manual_seed(0)
    start = torch.randn(64, dtype=torch.float64)
    micro_grads = [[torch.randn(64, dtype=torch.float64) * 3 for _ in range(accum)] for _ in range(4)]

    def train(summed: bool) -> torch.Tensor:
        param = torch.nn.Parameter(start.clone())
        if name == "sgd":
            opt = torch.optim.SGD([param], lr=lr if summed else lr * accum, momentum=0.9,
                                  weight_decay=decay if summed else decay / accum)
        else:
            opt = torch.optim.AdamW([param], lr=lr, weight_decay=decay, eps=1e-8 if summed else 1e-8 / accum)
        for step in micro_grads:
            param.grad = sum(step) if summed else sum(step) / accum
            torch.nn.utils.clip_grad_norm_([param], 5.0 if summed else 5.0 / accum)
            opt.step()
        return param.detach()

    # equal but for clip_grad_norm_'s max_norm / (norm + 1e-6): the 1e-6 weighs 4 times more on the mean's norm
    torch.testing.assert_close(train(summed=False), train(summed=True), rtol=1e-6, atol=1e-9)


def test_the_recipe_file_names_its_source_and_inherits_base_yaml(tmp_path):
    conversion, _ = convert(tmp_path, "ms1mv3_r100", R100_MS1MV3)
    text = (tmp_path / "ms1mv3_r100.yaml").read_text()
    assert text.startswith("# Converted from arcface_torch's configs/ms1mv3_r100.py (keys it leaves out: "
                           "configs/base.py)")
    assert f"\nbase: {BASE_YAML}\n" in text
    assert "  reference_batch_size: 0" in text and "wandb_key = <not shown>" in text
    assert "0123456789abcdef" not in text
    # every unmapped key is in the header with its reason; every mapped one names its recipe keys
    for k in conversion.unmapped:
        assert f"#   {k.key} = {k.value}: {k.note[:30]}" in text.replace("\n#     ", " ")
    assert result(conversion, "lr").targets == ("optim.lr", "optim.reference_batch_size")


def test_wandb_settings_become_trackers_and_environment(tmp_path):
    text = R100_MS1MV3 + 'config.using_wandb = True\nconfig.wandb_project = "faces"\nconfig.wandb_entity = "lab"\n'
    conversion, recipe = convert(tmp_path, "ms1mv3_r100_wandb", text)
    assert recipe.run.trackers == ["tensorboard", "wandb"] and recipe.run.tracker_project == "faces"
    assert "export WANDB_API_KEY" in result(conversion, "wandb_key").note
    assert any(line.startswith("export WANDB_ENTITY=lab") for line in conversion.todo)


def test_synthetic_rec_keeps_arcface_torch_steps(tmp_path):
    text = R100_MS1MV3.replace('"/train_tmp/ms1m-retinaface-t1"', '"synthetic"').replace(
        "config.num_classes = 93431", "config.num_classes = 30 * 10000").replace(
        "config.num_image = 5179510", "config.num_image = 100000").replace("config.warmup_epoch = 0",
                                                                           "config.warmup_epoch = 3")
    conversion, recipe = convert(tmp_path, "speed", text)
    assert recipe.data.backend == "synthetic" and recipe.eval.sets == []
    assert (recipe.data.synthetic.num_identities, recipe.data.synthetic.samples_per_identity) == (300000, 1)
    # 300000 synthetic images per epoch here, 100000 there: a third of the epochs, the same steps
    assert recipe.train.num_epochs == pytest.approx(20 / 3) and recipe.schedule.warmup_epochs == pytest.approx(1)
    assert not result(conversion, "val_targets").mapped


# ----- bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ("config.lr = get_lr()", "configs/bad.py line 20: config.lr = get_lr(): `get_lr()` is not a literal"),
    ("config.network = 'r1000'", "config.network = 'r1000' is not a network of arcface_torch's backbones.get_model"),
    ("config.batch_size = '128'", "config.batch_size = '128' must be int, got str"),
    ("config.margin_list = (1.35, 0.0, 0.0)", "CombinedMarginLoss trains only"),
    ("config.optimizer = 'lamb'", "'sgd' or 'adamw' only"),
    ("if True:\n    config.lr = 0.2", "configs/bad.py line 20: an `if` statement; only assignments"),
    ("config.num_epoch = config.epochs * 2", "reads config.epochs, which"),
])
def test_bad_values_are_one_line_errors(tmp_path, line, message):
    config = write_config(tmp_path, "bad", R100_MS1MV3 + line + "\n")
    with pytest.raises(ConfigError) as caught:
        convert_arcface_config(config)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_values_the_recipe_does_not_need_may_be_anything_and_unknown_keys_are_listed(tmp_path):
    text = "import os\n" + R100_MS1MV3 + ('config.wandb_key = os.environ["WANDB_KEY"]\nconfig.my_note = f"{1}"\n'
                                         "config.lr_schedule = 'cosine'\n")
    conversion, _ = convert(tmp_path, "extra", text)
    assert "is not a literal" in result(conversion, "wandb_key").note
    assert not result(conversion, "my_note").mapped and "is not a literal" in result(conversion, "my_note").note
    assert result(conversion, "lr_schedule").note == "arcface_torch's train_v2.py does not read it"


def test_the_command_writes_prints_and_refuses(tmp_path):
    command = load_convert_command()
    config = write_config(tmp_path, "wf42m_vit_b", VIT_B_WEBFACE42M)
    out = tmp_path / "out.yaml"
    status, stdout, stderr = run_command(command, "from-arcface", config, "--out", out, "--data-root", "/mnt/faces")
    assert status == 0 and stderr == "", stderr
    assert stdout.startswith(f"wrote {out}: configs/wf42m_vit_b.py (+ configs/base.py), ")
    assert "not mapped (" in stdout and "dali_aug = False [base.py]" in stdout
    assert "python launch/prepare_data.py recordio --rec /mnt/faces/WebFace42M/train.rec" in stdout
    recipe = load_config(out)
    assert recipe.data.manifest == "/mnt/faces/WebFace42M_shards/manifest.json"
    status, _, stderr = run_command(command, "from-arcface", config, "--out", out)
    assert status == 2 and stderr.strip() == f"error: output {out} already exists; pass --overwrite to replace it"
    bad = write_config(tmp_path, "bad", VIT_B_WEBFACE42M.replace('"vit_b_dp005_mask_005"', "NETWORK"))
    status, stdout, stderr = run_command(command, "from-arcface", bad, "--out", tmp_path / "bad.yaml")
    assert status == 2 and stdout == "" and not (tmp_path / "bad.yaml").exists()
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and "config.network = NETWORK" in stderr
