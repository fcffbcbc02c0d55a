# insightface arcface_torch config (configs/*.py) -> FaceCL recipe, read as source text: nothing is imported or run.
"""Convert an arcface_torch training config into a FaceCL recipe that trains the same thing.

arcface_torch (recognition/arcface_torch/utils/utils_config.py) imports configs/base.py, then the config, and
updates base's EasyDict with the config's: a key the config leaves out keeps base.py's value. Both files are
read here with `ast`; the only statements taken are assignments (`config.x = ...`, `config["x"] = ...`,
`x = ...`, `config.x += ...`) whose values are literals, or arithmetic on literals and on values the same file
assigned before (`config.warmup_epoch = config.num_epoch // 10`). Imports, `config = edict()` and docstrings
are skipped; any other statement is an error. A value that is not such an expression is an error where the
recipe needs it and an unmapped key (with that reason) where it does not.

What arcface_torch's train_v2.py does with each key is restated in `convert_arcface_config` (mapped keys) and
`_NO_COUNTERPART` (keys FaceCL has no setting for); the settings train_v2.py fixes in code (scale 64, clipping
at 5, momentum 0.9, linear decay, DDP) are written out too, so that a change of recipes/base.yaml does not
change what a converted recipe trains. docs/from-arcface-torch.md has the table.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from toolkit.config.loader import _RecipeYamlDumper
from toolkit.errors import ConfigError

BASE_FILE = "base.py"
DATA_ROOT_VARIABLE = "${DATA_ROOT}"
ARCFACE_SCALE = 64.0          # train_v2.py: CombinedMarginLoss(64, ...)
ARCFACE_CLIP_NORM = 5.0       # train_v2.py: clip_grad_norm_(backbone.parameters(), 5)
ARCFACE_SGD_MOMENTUM = 0.9    # train_v2.py: torch.optim.SGD(..., momentum=0.9, ...) whatever config.momentum says
ADAMW_EPS = 1e-8              # torch.optim.AdamW's default, which train_v2.py keeps
ADAMW_BETAS = (0.9, 0.999)
# Partial FC sample_rate 0 keeps only the batch's positive classes in arcface_torch; FaceCL needs a rate > 0 and
# keeps at least as many columns as gathered rows, so the smallest rate is as close as it gets.
SMALLEST_SAMPLE_RATE = 1e-6
# backbones/vit.py forward_features calls self.random_masking(x) without self.mask_ratio: whenever a ViT's
# mask_ratio is above 0 it masks the default of random_masking, 0.1 of the tokens, whatever its name says.
ARCFACE_VIT_MASK_RATIO = 0.1


@dataclass(frozen=True)
class Network:
    """What arcface_torch's backbones.get_model(name) builds, as FaceCL model settings."""

    backbone: str
    drop_path: float = 0.0
    mask_ratio: float = 0.0     # as get_model passes it (what trains: ARCFACE_VIT_MASK_RATIO when above 0)
    activation_checkpointing: bool = False   # arcface_torch's using_checkpoint (ViT-B/L/H) / checkpoint_sequential


# backbones/__init__.py get_model: every name it knows (ViT embed dims and depths are the same in FaceCL's vit_*).
NETWORKS: dict[str, Network] = {
    "r18": Network("iresnet18"), "r34": Network("iresnet34"), "r50": Network("iresnet50"),
    "r100": Network("iresnet100"), "r200": Network("iresnet200"),
    "r2060": Network("iresnet2060", activation_checkpointing=True),
    "mbf": Network("mobilefacenet_mbf"), "mbf_large": Network("mobilefacenet_large"),
    "vit_t": Network("vit_t", 0.1, 0.1), "vit_t_dp005_mask0": Network("vit_t", 0.05, 0.0),
    "vit_s": Network("vit_s", 0.1, 0.1), "vit_s_dp005_mask_0": Network("vit_s", 0.05, 0.0),
    "vit_b": Network("vit_b", 0.1, 0.1, True), "vit_b_dp005_mask_005": Network("vit_b", 0.05, 0.05, True),
    "vit_l_dp005_mask_005": Network("vit_l", 0.05, 0.05, True),
    "vit_h": Network("vit_h", 0.1, 0.0, True),
}
# Where FaceCL has no backbone registered under NETWORKS' name: the nearest one, and what differs.
NETWORK_FALLBACKS = {
    "mobilefacenet_mbf": ("mobilefacenet", "arcface_torch's mbf (scale 2, blocks (1, 4, 6, 2), 2.06M parameters) is "
                                           "not registered in this FaceCL; mobilefacenet (the paper layout, 1.20M "
                                           "parameters) is the nearest, a smaller network"),
}

_WANDB_SETS_UP = "W&B is set up through its own WANDB_* environment variables here"
# Keys FaceCL has no recipe setting for: the reason, shown with the key. (Some depend on the value; those are
# handled in convert_arcface_config.)
_NO_COUNTERPART = {
    "dali_aug": "FaceCL has no counterpart of arcface_torch's DALI augmentation (random resize, blur, HSV, "
                "grayscale); its margin-softmax batches are flipped only",
    "wandb_log_all": "FaceCL's trackers log from rank 0 only",
    "save_artifacts": "FaceCL uploads no model files to W&B: the checkpoints stay in the run folder "
                      "(launch/convert.py consolidate / export make the files to share)",
    "suffix_run_name": "the W&B run is named after run.name",
    "notes": "FaceCL passes no W&B notes",
}
# The order keys are reported in (arcface_torch's base.py order, then the keys configs add); others follow.
KEY_ORDER = ("margin_list", "network", "embedding_size", "sample_rate", "interclass_filtering_threshold", "fp16",
             "batch_size", "gradient_acc", "optimizer", "lr", "momentum", "weight_decay", "num_epoch",
             "warmup_epoch", "rec", "dali", "dali_aug", "num_classes", "num_image", "val_targets", "verbose",
             "frequent", "seed", "num_workers", "output", "resume", "save_all_states", "using_wandb", "wandb_key",
             "wandb_entity", "wandb_project", "wandb_log_all", "wandb_resume", "save_artifacts", "suffix_run_name",
             "notes")
SECRET_KEYS = ("wandb_key",)
SECTION_ORDER = ("run", "model", "head", "data", "optim", "schedule", "parallel", "train", "eval")


# ----- reading the Python source ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unevaluated:
    """A value the converter cannot know without running Python, and why."""

    reason: str


@dataclass(frozen=True)
class Assignment:
    """One `config.KEY = EXPRESSION` of an arcface_torch config file."""

    key: str
    value: Any            # the evaluated value, or an Unevaluated
    source: str           # the expression as written
    file: str             # the file's name for messages (configs/x.py)
    line: int

    @property
    def known(self) -> bool:
        return not isinstance(self.value, Unevaluated)

    def where(self) -> str:
        return f"{self.file} line {self.line}"

    def text(self) -> str:
        """`source`, with the value it gives when that is not what is written."""
        if self.key in SECRET_KEYS:
            return "<not shown>"
        if not self.known or _is_literal(self.source):
            return self.source
        return f"{self.source} (= {self.value!r})"


def _is_literal(source: str) -> bool:
    try:
        ast.literal_eval(source)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return True


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_NOT_RUN = "the converter reads the file and runs none of it"


class _FileReader:
    """The assignments of one config file, evaluated in order."""

    def __init__(self, text: str, name: str):
        self.name = name
        self.text = text
        self.keys: dict[str, Assignment] = {}
        self.names: dict[str, Any] = {}       # plain module-level variables (`x = 0.1`)

    def read(self) -> dict[str, Assignment]:
        try:
            tree = ast.parse(self.text, filename=self.name)
        except SyntaxError as exc:
            raise ConfigError(f"{self.name} line {exc.lineno}: not valid Python ({exc.msg})") from None
        for statement in tree.body:
            self.statement(statement)
        return self.keys

    def statement(self, node: ast.stmt) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.Pass)):
            return
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return   # a docstring
        if isinstance(node, ast.Assign):
            if (len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id == "config" and isinstance(node.value, ast.Call)):
                return   # config = edict()
            value = self.evaluate(node.value)
            for target in node.targets:
                self.assign(target, value, node)
            return
        if isinstance(node, ast.AugAssign) and type(node.op) in _BINARY:
            current = self.evaluate(node.target)
            value = self.combine(type(node.op), current, self.evaluate(node.value))
            self.assign(node.target, value, node)
            return
        kind = type(node).__name__.lower()
        article = "an" if kind[0] in "aeiou" else "a"
        raise ConfigError(f"{self.name} line {node.lineno}: {article} `{kind}` statement; only assignments "
                          f"(config.x = value) can be converted ({_NOT_RUN})")

    def assign(self, target: ast.expr, value: Any, node: ast.stmt) -> None:
        key = self.config_key(target)
        if key is not None:
            source = ast.get_source_segment(self.text, node.value) or "?"
            self.keys[key] = Assignment(key, value, source, self.name, node.lineno)
        elif isinstance(target, ast.Name):
            self.names[target.id] = value
        else:
            raise ConfigError(f"{self.name} line {node.lineno}: cannot convert an assignment to "
                              f"`{ast.get_source_segment(self.text, target)}` (only config.x = value)")

    @staticmethod
    def config_key(node: ast.expr) -> str | None:
        """KEY of `config.KEY` or `config["KEY"]`, else None."""
        if not (isinstance(node, (ast.Attribute, ast.Subscript)) and isinstance(node.value, ast.Name)
                and node.value.id == "config"):
            return None
        if isinstance(node, ast.Attribute):
            return node.attr
        index = node.slice
        return index.value if isinstance(index, ast.Constant) and isinstance(index.value, str) else None

    def evaluate(self, node: ast.expr) -> Any:
        source = ast.get_source_segment(self.text, node) or "?"
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
            return node.value
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [self.evaluate(item) for item in node.elts]
            bad = next((item for item in items if isinstance(item, Unevaluated)), None)
            return bad or (tuple(items) if isinstance(node, ast.Tuple) else items)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            operand = self.evaluate(node.operand)
            if isinstance(operand, Unevaluated):
                return operand
            if not isinstance(operand, (int, float)):
                return Unevaluated(f"`{source}` is not arithmetic on numbers")
            return _UNARY[type(node.op)](operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self.combine(type(node.op), self.evaluate(node.left), self.evaluate(node.right), source)
        key = self.config_key(node)
        if key is not None:
            if key not in self.keys:
                return Unevaluated(f"`{source}` reads config.{key}, which {self.name} has not set before this line "
                                   "(arcface_torch would stop with an AttributeError)")
            return self.keys[key].value
        if isinstance(node, ast.Name) and node.id in self.names:
            return self.names[node.id]
        return Unevaluated(f"`{source}` is not a literal nor arithmetic on literals and config values "
                           f"({_NOT_RUN})")

    @staticmethod
    def combine(op: type, left: Any, right: Any, source: str = "") -> Any:
        for operand in (left, right):
            if isinstance(operand, Unevaluated):
                return operand
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right))
        joined = op is ast.Add and type(left) is type(right) and isinstance(left, (str, list, tuple))
        if not (numbers or joined) or (op is ast.Pow and abs(right) > 64):
            return Unevaluated(f"`{source}` is not arithmetic on numbers")
        try:
            return _BINARY[op](left, right)
        except (ArithmeticError, ValueError) as exc:
            return Unevaluated(f"`{source}` fails in Python ({exc})")


def read_arcface_config(path: str | os.PathLike, name: str | None = None) -> dict[str, Assignment]:
    """KEY -> Assignment for every `config.KEY = ...` of one arcface_torch config file, without running it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or exc})") from None
    return _FileReader(text, name or str(path)).read()


# ----- the conversion ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyResult:
    """What became of one arcface_torch key: the recipe keys it set (mapped) or why it has none (unmapped)."""

    key: str
    value: str                    # as written, e.g. "config.num_epoch // 10 (= 4)"
    origin: str                   # the file that set it
    targets: tuple[str, ...]      # recipe keys it set; empty = unmapped
    note: str                     # the reason (unmapped) or what to know about the mapping

    @property
    def mapped(self) -> bool:
        return bool(self.targets)


@dataclass(frozen=True)
class Conversion:
    """A converted config: recipe values (dotted key -> (value, comment)), what happened to each key, the steps the
    user must take before training and the differences no recipe setting removes."""

    config: str
    base: str
    name: str
    values: dict[str, tuple[Any, str]]
    keys: list[KeyResult]
    todo: list[str]
    differences: list[str]

    @property
    def mapped(self) -> list[KeyResult]:
        return [k for k in self.keys if k.mapped]

    @property
    def unmapped(self) -> list[KeyResult]:
        return [k for k in self.keys if not k.mapped]

    def recipe_yaml(self, base_recipe: str | None = None, path: str = "RECIPE.yaml") -> str:
        """The recipe file (to be written at `path`): a header of notes, `base: base_recipe` when given, then the
        values by section."""
        lines = [f"# Converted from arcface_torch's {self.config} (keys it leaves out: {self.base}) by",
                 "# `python launch/convert.py from-arcface`: it trains what arcface_torch's train_v2.py trains.",
                 "# data.batch_size is per GPU, as arcface_torch's batch_size: run it on as many GPUs as the",
                 "# arcface_torch run, e.g. on one node of 8 (several nodes: docs/distributed.md):",
                 f"#   torchrun --nproc_per_node 8 launch/train.py --recipe {path}",
                 "# optim.lr is used as given (optim.reference_batch_size 0), as arcface_torch does."]
        if self.todo:
            lines.append("# Before the first run:")
            lines.extend(f"#   {line}" for line in self.todo)
        noted = [k for k in self.mapped if k.note]
        if noted:
            lines.append("# Notes on mapped keys:")
            lines.extend(_wrap(f"{k.key} = {k.value}: {k.note}", "#   ", "#     ") for k in noted)
        if self.differences:
            lines.append("# Not the same as arcface_torch (no recipe setting for it):")
            lines.extend(_wrap(f"- {text}", "#   ", "#     ") for text in self.differences)
        lines.append("# arcface_torch keys without a FaceCL setting:")
        lines.extend(_wrap(f"{k.key} = {k.value}: {k.note}", "#   ", "#     ") for k in self.unmapped)
        if base_recipe:
            lines.append(f"base: {_scalar(base_recipe)}")
        tree: dict = {}
        for dotted, (value, comment) in self.values.items():
            node = tree
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = _Leaf(value, comment)
        for section in sorted(tree, key=lambda s: SECTION_ORDER.index(s) if s in SECTION_ORDER else len(SECTION_ORDER)):
            lines.extend(_render(section, tree[section], 0))
        return "\n".join(lines) + "\n"

    def report(self) -> str:
        """Every key: mapped (to which recipe keys) or not (why); then the steps before training."""
        width = min(44, max(len(f"{k.key} = {k.value}") for k in self.keys) + 2)
        origin = {self.config: "", self.base: f" [{Path(self.base).name}]"}

        def line(k: KeyResult, text: str) -> str:
            head = f"{k.key} = {k.value}{origin.get(k.origin, '')}"
            return _wrap(f"{head.ljust(width)} {text}", "  ", "      ")

        out = [f"mapped ({len(self.mapped)} keys):"]
        out += [line(k, "-> " + ", ".join(k.targets) + (f" ({k.note})" if k.note else "")) for k in self.mapped]
        out.append(f"not mapped ({len(self.unmapped)} keys):")
        out += [line(k, f": {k.note}") for k in self.unmapped]
        if self.differences:
            out.append("not the same as arcface_torch (no recipe setting for it):")
            out += [_wrap(f"- {text}", "  ", "    ") for text in self.differences]
        if self.todo:
            out.append("before the first run:")
            out += [f"  {text}" for text in self.todo]
        return "\n".join(out)


@dataclass
class _Leaf:
    value: Any
    comment: str


class _Converter:
    """Walks the merged config once; records recipe values and one KeyResult per key."""

    def __init__(self, config_path: Path, base_path: Path, data_root: str, registered: set[str] | None):
        self.config_name = _display(config_path)
        self.base_name = _display(base_path)
        base = read_arcface_config(base_path, self.base_name)
        own = read_arcface_config(config_path, self.config_name)
        self.merged: dict[str, Assignment] = {**base, **own}
        self.stem = config_path.stem
        self.data_root = data_root.rstrip("/") or "/"
        self.registered = registered
        self.values: dict[str, tuple[Any, str]] = {}
        self.results: dict[str, KeyResult] = {}
        self.todo: list[str] = []
        self.differences: list[str] = []
        self.epoch_scale = 1.0   # synthetic data: FaceCL epochs per arcface_torch epoch (same number of steps)

    # -- recording
    def put(self, dotted: str, value: Any, comment: str = "") -> str:
        self.values[dotted] = (value, comment)
        return dotted

    def mapped(self, key: str, targets: list[str], note: str = "") -> None:
        if key in self.merged:
            a = self.merged[key]
            self.results[key] = KeyResult(key, a.text(), a.file, tuple(targets), note)

    def unmapped(self, key: str, reason: str) -> None:
        if key in self.merged:
            a = self.merged[key]
            if not a.known:
                reason += f" (and its value is not known: {a.value.reason})"
            self.results[key] = KeyResult(key, a.text(), a.file, (), reason)

    # -- reading values
    def get(self, key: str, kind: type | tuple, default: Any = dataclasses.MISSING) -> Any:
        """The value of a key the recipe needs (checked against `kind`), or `default` when neither file sets it."""
        if key not in self.merged:
            if default is dataclasses.MISSING:
                raise ConfigError(f"neither {self.config_name} nor {self.base_name} sets config.{key}, which "
                                  "arcface_torch's train_v2.py reads")
            return default
        a = self.merged[key]
        if not a.known:
            raise ConfigError(f"{a.where()}: config.{key} = {a.source}: {a.value.reason}; the recipe needs this value")
        value = a.value
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = any(isinstance(value, k) and not (isinstance(value, bool) and k in (int, float)) for k in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            expected = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            raise ConfigError(f"{a.where()}: config.{key} = {a.source} must be {expected}, got {type(value).__name__}")
        return value

    def positive(self, key: str, kind: type, default: Any = dataclasses.MISSING) -> Any:
        value = self.get(key, kind, default)
        if value is not None and value <= 0:
            raise ConfigError(f"{self.merged[key].where()}: config.{key} = {value!r} must be positive")
        return value

    # -- the keys
    def convert(self) -> Conversion:
        accum = self.positive("gradient_acc", int, 1)
        self.margins()
        self.network()
        embedding = self.positive("embedding_size", int)
        self.mapped("embedding_size", [self.put("model.embedding_size", embedding, "embedding_size")])
        self.put("model.dropout", 0.0, "train_v2.py: get_model(..., dropout=0.0)")
        self.put("head.scale", ARCFACE_SCALE, "train_v2.py: CombinedMarginLoss(64, ...)")
        self.partial_fc()
        precision = "fp16" if self.get("fp16", bool) else "fp32"
        self.mapped("fp16", [self.put("parallel.precision", precision, "fp16")])
        self.batch(accum)
        self.optimizer(accum)
        self.data()
        self.schedule()
        self.cadence(accum)
        self.run_folder()
        self.trackers()
        for key in self.merged:
            if key not in self.results:
                self.unmapped(key, _NO_COUNTERPART.get(key) or "arcface_torch's train_v2.py does not read it")
        order = {key: i for i, key in enumerate(KEY_ORDER)}
        keys = sorted(self.results.values(), key=lambda k: (order.get(k.key, len(order)), k.key))
        name = self.values["run.name"][0]
        return Conversion(self.config_name, self.base_name, name, dict(self.values), keys, self.todo,
                          self.differences)

    def margins(self) -> None:
        margins = self.get("margin_list", (tuple, list))
        a = self.merged["margin_list"]
        if len(margins) != 3 or not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in margins):
            raise ConfigError(f"{a.where()}: config.margin_list = {a.source} must be three numbers (m1, m2, m3)")
        m1, m2, m3 = (float(m) for m in margins)
        # losses.py CombinedMarginLoss: ArcFace when m1 == 1 and m3 == 0, CosFace (m3 alone) when m3 > 0, else raise
        if m3 > 0:
            note = "CosFace: arcface_torch applies m3 alone when m3 > 0" if (m1, m2) != (1.0, 0.0) else ""
            m1, m2 = 1.0, 0.0
        elif m1 == 1.0 and m3 == 0.0:
            note = ""
        else:
            raise ConfigError(f"{a.where()}: config.margin_list = {a.source}: arcface_torch's CombinedMarginLoss "
                              "trains only (1.0, m2, 0.0) (ArcFace) or m3 > 0 (CosFace) and raises for this one")
        targets = [self.put("head.margin_m1", m1, "margin_list[0]"), self.put("head.margin_m2", m2, "margin_list[1]"),
                   self.put("head.margin_m3", m3, "margin_list[2]")]
        self.mapped("margin_list", targets, note)

    def network(self) -> None:
        name = self.get("network", str)
        if name not in NETWORKS:
            a = self.merged["network"]
            raise ConfigError(f"{a.where()}: config.network = {name!r} is not a network of arcface_torch's "
                              f"backbones.get_model; known: {', '.join(NETWORKS)}")
        net = NETWORKS[name]
        backbone, note = net.backbone, ""
        if self.registered is not None and backbone not in self.registered and backbone in NETWORK_FALLBACKS:
            backbone, note = NETWORK_FALLBACKS[net.backbone]
            self.differences.append(note)
        targets = [self.put("model.backbone", backbone, f"network {name}")]
        if backbone.startswith("vit_"):
            targets.append(self.put("model.drop_path", net.drop_path, f"{name}: drop_path_rate"))
            masked = ARCFACE_VIT_MASK_RATIO if net.mask_ratio > 0 else 0.0
            targets.append(self.put("model.mask_ratio", masked, f"{name}: mask_ratio {net.mask_ratio:g}"
                                    + (f", which masks {masked:g} there" if masked != net.mask_ratio else "")))
            if masked != net.mask_ratio:
                note = (f"mask ratio {masked:g}, not the {net.mask_ratio:g} of its name: arcface_torch's ViT calls "
                        f"random_masking(x) without its mask_ratio, whose default {masked:g} is what trains")
        targets.append(self.put("model.activation_checkpointing", net.activation_checkpointing,
                                f"{name}: " + ("recomputed in backward, as there" if net.activation_checkpointing
                                               else "no checkpointing there")))
        self.mapped("network", targets, note)

    def partial_fc(self) -> None:
        rate = self.get("sample_rate", float)
        num_classes = self.merged.get("num_classes")
        classes = num_classes.value if num_classes and num_classes.known and isinstance(num_classes.value, int) \
            else None
        batch = self.get("batch_size", int)
        note = ""
        if rate >= 1.0:
            value = 1.0
        elif rate <= 0.0:
            value = SMALLEST_SAMPLE_RATE
            note = f"0 is not a FaceCL rate; {SMALLEST_SAMPLE_RATE:g} is the smallest"
            self.differences.append(
                "Partial FC: arcface_torch's sample_rate 0 keeps only the classes of the batch's labels; FaceCL keeps "
                "those plus random negatives up to one column per gathered batch row (batch_size x GPUs)")
        else:
            value = rate
            rule = ("Partial FC: on each GPU FaceCL keeps max(int(sample_rate x classes per GPU), batch_size x GPUs) "
                    "centers per step, arcface_torch int(sample_rate x classes per GPU)")
            if classes:
                same_up_to = max((w for w in range(1, 4097) if int(rate * (classes // w)) >= batch * w), default=0)
                rule += (f": with {classes} classes and {batch} per GPU the same up to {same_up_to} GPUs, more "
                         "negatives on more" if same_up_to else f": with {classes} classes and {batch} per GPU, "
                         "more negatives on any number of GPUs")
            self.differences.append(rule)
        self.mapped("sample_rate", [self.put("head.sample_rate", value, "sample_rate")], note)
        threshold = self.get("interclass_filtering_threshold", float, 0.0)
        if threshold >= 1.0:
            a = self.merged["interclass_filtering_threshold"]
            raise ConfigError(f"{a.where()}: config.interclass_filtering_threshold = {threshold!r} filters every "
                              "negative cosine (FaceCL takes [0, 1))")
        self.mapped("interclass_filtering_threshold",
                    [self.put("head.interclass_filter", max(0.0, threshold), "interclass_filtering_threshold")],
                    "" if threshold >= 0 else "a negative threshold is off, as 0")

    def batch(self, accum: int) -> None:
        batch = self.positive("batch_size", int)
        self.mapped("batch_size", [self.put("data.batch_size", batch, "batch_size: per GPU and micro-step"),
                                   self.put("data.global_batch_size", 0, "0: derived as batch_size x GPUs x "
                                                                          "grad_accum_steps")])
        self.mapped("gradient_acc", [self.put("parallel.grad_accum_steps", accum, "gradient_acc")],
                    "" if accum == 1 else
                    "arcface_torch sums the micro-batch gradients, FaceCL averages them: lr, weight decay, eps and "
                    "the clipping norm are rescaled so that every update is the same")
        self.put("parallel.engine", "ddp", "arcface_torch trains with DistributedDataParallel")
        clip = ARCFACE_CLIP_NORM / accum
        self.put("parallel.clip_grad_norm", clip, "train_v2.py: clip_grad_norm_(backbone, 5)"
                 + (f" / gradient_acc {accum}" if accum > 1 else ""))
        self.differences.append("gradient clipping: FaceCL clips the backbone and the identity centers, each by its "
                                "own norm; arcface_torch clips the backbone only")

    def optimizer(self, accum: int) -> None:
        name = self.get("optimizer", str)
        a = self.merged["optimizer"]
        if name not in ("sgd", "adamw"):
            raise ConfigError(f"{a.where()}: config.optimizer = {name!r}: arcface_torch's train_v2.py trains with "
                              "'sgd' or 'adamw' only (and raises for anything else)")
        lr = self.positive("lr", float)
        decay = self.get("weight_decay", float)
        self.mapped("optimizer", [self.put("optim.name", name, "optimizer")])
        if name == "sgd" and accum > 1:
            # summed gradients: update = lr * (sum g + wd p) = (lr * accum) * (mean g + wd / accum * p), exactly
            self.mapped("lr", [self.put("optim.lr", lr * accum, f"lr {lr:g} x gradient_acc {accum}"),
                               self.put("optim.reference_batch_size", 0, "0: the lr is used as given")],
                        f"x {accum}: FaceCL averages the {accum} micro-batch gradients that arcface_torch sums")
            self.mapped("weight_decay", [self.put("optim.weight_decay", decay / accum,
                                                  f"weight_decay {decay:g} / gradient_acc {accum}")],
                        f"/ {accum}, with the lr x {accum}: the same decay per step")
        else:
            self.mapped("lr", [self.put("optim.lr", lr, "lr, used as given"),
                               self.put("optim.reference_batch_size", 0, "0: no linear scaling of the lr")])
            self.mapped("weight_decay", [self.put("optim.weight_decay", decay, "weight_decay")])
        if name == "sgd":
            momentum = self.merged.get("momentum")
            given = momentum.value if momentum is not None else ARCFACE_SGD_MOMENTUM
            self.put("optim.momentum", ARCFACE_SGD_MOMENTUM, "train_v2.py: SGD(momentum=0.9)")
            self.put("optim.nesterov", False)
            self.mapped("momentum", ["optim.momentum"],
                        "" if given == ARCFACE_SGD_MOMENTUM else
                        f"0.9, not {momentum.source}: train_v2.py passes momentum=0.9 to SGD whatever config.momentum "
                        "says")
        else:
            self.put("optim.betas", list(ADAMW_BETAS), "torch.optim.AdamW's default, as train_v2.py")
            eps = ADAMW_EPS / accum
            self.put("optim.eps", eps, "AdamW's default" + (f" / gradient_acc {accum} (averaged, not summed "
                                                            "gradients)" if accum > 1 else ""))
            self.unmapped("momentum", "arcface_torch's AdamW takes no momentum (its betas are PyTorch's "
                                      "(0.9, 0.999), as optim.betas here)")
        self.differences.append("weight decay: FaceCL exempts normalisation weights and biases; arcface_torch "
                                "decays every parameter")

    def schedule(self) -> None:
        epochs = self.positive("num_epoch", (int, float))
        warmup = self.get("warmup_epoch", (int, float))
        scale = self.epoch_scale
        times = f" x {scale:g}" if scale != 1.0 else ""
        same_steps = (f"x {scale:g}: a synthetic epoch here is not num_image images; this keeps arcface_torch's "
                      "number of steps") if scale != 1.0 else ""
        self.mapped("num_epoch", [self.put("train.num_epochs", epochs * scale, f"num_epoch{times}")], same_steps)
        if warmup < 0:
            note = "a negative warmup is none (arcface_torch's PolynomialLRWarmup never warms up with it)"
        else:
            note = same_steps if warmup > 0 else ""
        targets = [self.put("schedule.warmup_epochs", max(0, warmup) * scale,
                            f"warmup_epoch{times} (0 = no warmup)"),
                   self.put("schedule.warmup_steps", 0, "0: the warmup is given in epochs")]
        self.mapped("warmup_epoch", targets, note)
        self.put("schedule.decay", "poly", "PolynomialLRWarmup: linear warmup, then polynomial decay")
        self.put("schedule.poly_power", 1.0, "its default power 1: linear to 0")
        self.put("schedule.min_lr_ratio", 0.0)

    def data(self) -> None:
        rec = self.get("rec", str)
        self.put("data.image_size", 112, "arcface_torch trains on 112x112 faces")
        self.put("data.flip", True, "RandomHorizontalFlip / DALI mirror")
        self.put("data.samples_per_label", 1, "plain shuffling")
        workers = self.get("num_workers", int, None)
        if workers is not None:
            if workers < 0:
                raise ConfigError(f"{self.merged['num_workers'].where()}: config.num_workers = {workers} must be >= 0")
            self.mapped("num_workers", [self.put("data.num_workers", workers, "num_workers")])
        dali = self.get("dali", bool, False)
        if rec == "synthetic":
            self.synthetic(dali)
            return
        folder = os.path.basename(os.path.normpath(rec))
        root = self.data_root
        shards = f"{root}/{folder}_shards"
        backend = "dali" if dali else "webdataset"
        self.mapped("rec", [self.put("data.backend", backend, "dali" if dali else "rec: shards of its images"),
                            self.put("data.manifest", f"{shards}/manifest.json",
                                     f"rec {rec}: written by launch/prepare_data.py")],
                    f"FaceCL trains from WebDataset shards of {rec}: convert them once (below)")
        self.mapped("dali", ["data.backend"], "the DALI pipeline on the same shards (pip install .[dali])" if dali
                    else "")
        shell_root = "$DATA_ROOT" if root == DATA_ROOT_VARIABLE else root
        if root == DATA_ROOT_VARIABLE:
            parent = os.path.dirname(os.path.normpath(rec)) or "."
            self.todo.append(f"export DATA_ROOT={parent}   # the folder that holds {folder}/ (arcface_torch's "
                             f"rec is {rec})")
        self.todo.append(f"python launch/prepare_data.py recordio --rec {shell_root}/{folder}/train.rec "
                         f"--out {shell_root}/{folder}_shards   # {folder} holds train.rec and train.idx")
        self.todo.append(f"python launch/prepare_data.py folder --root {shell_root}/{folder} "
                         f"--out {shell_root}/{folder}_shards   # or: {folder} is one sub-folder per identity")
        for key, what, field_name in (("num_classes", "class", "num_classes"), ("num_image", "image", "num_samples")):
            a = self.merged.get(key)
            if a is None:
                continue
            expect = f"; its manifest.json should say {field_name} {a.value}" if a.known else ""
            self.unmapped(key, f"FaceCL reads the {what} count from the shards' manifest.json{expect}")
        targets = self.get("val_targets", (list, tuple), [])
        if not all(isinstance(t, str) for t in targets):
            raise ConfigError(f"{self.merged['val_targets'].where()}: config.val_targets must be names of .bin "
                              f"files, got {targets!r}")
        sets = [f"{root}/{folder}/{target}.bin" for target in targets]
        self.mapped("val_targets", [self.put("eval.sets", sets, f"val_targets: {rec}/NAME.bin")])

    def synthetic(self, dali: bool) -> None:
        classes = self.positive("num_classes", int)
        images = self.positive("num_image", int)
        per_identity = max(1, _round_half_up(images / classes))
        self.epoch_scale = images / (classes * per_identity)
        self.mapped("rec", [self.put("data.backend", "synthetic", "rec 'synthetic'")],
                    "arcface_torch repeats one random image (label 1) for speed tests; FaceCL's synthetic faces "
                    "are identities of their own")
        self.mapped("num_classes", [self.put("data.synthetic.num_identities", classes, "num_classes")])
        self.mapped("num_image", [self.put("data.synthetic.samples_per_identity", per_identity,
                                           "num_image / num_classes, at least 1")],
                    f"{classes} x {per_identity} = {classes * per_identity} images per epoch"
                    + (f"; train.num_epochs scaled by {self.epoch_scale:g} to keep the steps of num_image per epoch"
                       if self.epoch_scale != 1.0 else ""))
        self.unmapped("dali", "rec 'synthetic' turns DALI off in arcface_torch too" if dali else
                      "off, and rec 'synthetic' needs no reader")
        self.put("eval.sets", [], "the synthetic held-out pairs")
        self.unmapped("val_targets", "rec 'synthetic' has no .bin files; FaceCL verifies on held-out synthetic "
                                     "identities")

    def cadence(self, accum: int) -> None:
        per_step = f" micro-steps / gradient_acc {accum}" if accum > 1 else ""
        verbose = self.get("verbose", int, None)
        if verbose is not None:
            every = max(1, _round_half_up(verbose / accum)) if verbose > 0 else 0
            self.mapped("verbose", [self.put("eval.every_steps", every, f"verbose{per_step}")],
                        "arcface_torch counts micro-steps, FaceCL optimizer steps" if accum > 1 else "")
        frequent = self.get("frequent", int, None)
        if frequent is not None:
            self.mapped("frequent", [self.put("run.log_every", max(1, _round_half_up(frequent / accum)),
                                              f"frequent{per_step}")])

    def run_folder(self) -> None:
        output = self.get("output", (str, type(None)), None)
        if output is None:   # utils_config.get_config: work_dirs/<config name>
            folder, name = "work_dirs", self.stem
            note = "arcface_torch writes to work_dirs/<config name>"
        else:
            path = os.path.normpath(output)
            folder, name = os.path.dirname(path) or ".", os.path.basename(path)
            note = ""
        targets = [self.put("run.output_dir", folder, "output"), self.put("run.name", name, "output")]
        self.mapped("output", targets, note)
        seed = self.get("seed", int, None)
        if seed is not None:
            self.mapped("seed", [self.put("run.seed", seed, "seed")])
        resume = self.get("resume", bool, False)
        self.unmapped("resume", "FaceCL resumes from the command line (train.py --resume auto|PATH), not the recipe"
                      + ("; arcface_torch's checkpoint_gpu_*.pt are no FaceCL checkpoints: start from their "
                         "weights with train.init_from (backbone .pth) and train.init_from_softmax" if resume else ""))
        self.unmapped("save_all_states", "FaceCL always writes complete, resumable checkpoints "
                                         "(checkpoint.every_steps, inherited); once per epoch is every "
                                         "num_image // global batch steps")

    def trackers(self) -> None:
        wandb = self.get("using_wandb", bool, False)
        self.mapped("using_wandb", [self.put("run.trackers", ["tensorboard", "wandb"] if wandb else ["tensorboard"],
                                             "arcface_torch writes TensorBoard" + (" and W&B" if wandb else ""))])
        off = "W&B is off (using_wandb False)"
        project = self.merged.get("wandb_project")
        if wandb and project is not None and project.known and isinstance(project.value, str):
            self.mapped("wandb_project", [self.put("run.tracker_project", project.value, "wandb_project")])
        else:
            self.unmapped("wandb_project", "run.tracker_project takes a project name" if wandb else off)
        self.unmapped("wandb_key", f"{_WANDB_SETS_UP}: export WANDB_API_KEY (never written into a recipe)"
                      if wandb else off)
        entity = self.merged.get("wandb_entity")
        if wandb and entity is not None and entity.known:
            self.unmapped("wandb_entity", f"{_WANDB_SETS_UP}: export WANDB_ENTITY={entity.value}")
            self.todo.append(f"export WANDB_ENTITY={entity.value} WANDB_API_KEY=...   # W&B, as using_wandb")
        else:
            self.unmapped("wandb_entity", off if not wandb else _WANDB_SETS_UP + " (WANDB_ENTITY)")
        self.unmapped("wandb_resume", "a resumed FaceCL run goes on in the same W&B run by itself" if wandb else off)


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _display(path: Path) -> str:
    """configs/x.py for a file in a configs/ folder (as arcface_torch names it), else the path as given."""
    return f"configs/{path.name}" if path.resolve().parent.name == "configs" else str(path)


def convert_arcface_config(config: str | os.PathLike, *, base: str | os.PathLike | None = None,
                           data_root: str = DATA_ROOT_VARIABLE, registered_backbones=None) -> Conversion:
    """Convert one arcface_torch config (with `base`, default: base.py next to it) into recipe values.

    `data_root` replaces the folder that holds the config's `rec` folder (default: ${DATA_ROOT}, set by the user).
    `registered_backbones` (names): where a network's FaceCL backbone is not among them, its nearest one is used
    and named among the differences; None takes every name as registered. Raises ConfigError (one line)."""
    config = Path(config)
    base_path = Path(base) if base is not None else config.parent / BASE_FILE
    if not config.is_file():
        raise ConfigError(f"arcface_torch config not found: {config}")
    if not base_path.is_file():
        raise ConfigError(f"{base_path} not found: arcface_torch reads configs/base.py first for the keys a config "
                          "leaves out; pass --base PATH")
    if config.resolve() == base_path.resolve():
        raise ConfigError(f"{config} is arcface_torch's base.py (defaults); convert a config that builds on it")
    registered = set(registered_backbones) if registered_backbones is not None else None
    return _Converter(config, base_path, data_root, registered).convert()


# ----- YAML text -----------------------------------------------------------------------------------------------

def _scalar(value: Any) -> str:
    """One value in YAML flow style, as the recipe loader reads it back (floats that look like strings quoted)."""
    text = yaml.dump(value, Dumper=_RecipeYamlDumper, default_flow_style=True, width=math.inf)
    return text.removesuffix("...\n").strip()


def _render(key: str, node: Any, depth: int) -> list[str]:
    pad = "  " * depth
    if isinstance(node, dict):
        lines = [f"{pad}{key}:"]
        for child, value in node.items():
            lines.extend(_render(child, value, depth + 1))
        return lines
    comment = f"# {node.comment}" if node.comment else ""
    if isinstance(node.value, list) and node.value and all(isinstance(v, str) for v in node.value):
        lines = [_with_comment(f"{pad}{key}:", comment)]
        return lines + [f"{pad}  - {_scalar(item)}" for item in node.value]
    return [_with_comment(f"{pad}{key}: {_scalar(node.value)}", comment)]


def _with_comment(text: str, comment: str) -> str:
    return f"{text.ljust(30)} {comment}".rstrip() if comment else text


def _wrap(text: str, first: str, rest: str, width: int = 116) -> str:
    """`text` in lines of at most `width` characters: the first behind `first`, the others behind `rest`."""
    words, lines, line = text.split(" "), [], first
    for word in words:
        if len(line) + len(word) + 1 > width and line.strip() not in ("", "#"):
            lines.append(line.rstrip())
            line = rest
        line += ("" if line in (first, rest) else " ") + word
    lines.append(line.rstrip())
    return "\n".join(lines)


__all__ = ["Assignment", "Conversion", "KeyResult", "NETWORKS", "Network", "Unevaluated", "convert_arcface_config",
           "read_arcface_config"]
