# insightface's arcface_torch as a peer: its own code, from a temporary copy, with the few patches CPU/gloo needs.
"""Where the insightface repository is found, a fresh copy of its recognition/arcface_torch, the textual patches
that copy needs to run here (each one listed, none applied where it is not needed), and arcface_torch's training
step (train_v2.py) around its own modules. bench_train.py --peer arcface_torch measures it against the toolkit's
Trainer; tests/arcface_torch_source.py gives the same copy to the tests that use insightface's code as a
reference. Nothing here is part of the toolkit package.

The repository: $FACECL_INSIGHTFACE_REPO (a checkout or a git directory), else the snapshot that a developer's
`fetch` leaves at /work/.mirror/deepinsight+insightface/repo. A plain folder holding recognition/arcface_torch
works too (e.g. on a machine without the snapshot); its commit is then read from a COMMIT file beside it:

    mkdir snapshot && git --git-dir=REPO archive HEAD recognition/arcface_torch | tar -x -C snapshot
    git --git-dir=REPO rev-parse HEAD > snapshot/COMMIT

train_v2.py is a script (it starts an NCCL process group when imported, reads a config and a data set), so its
step is restated here line by line (ArcfaceTorchStep) around their backbones.get_model, losses.CombinedMarginLoss,
partial_fc_v2.PartialFC_V2 and lr_scheduler.PolynomialLRWarmup, imported from the patched copy. What the
restatement does differently from train_v2.py is listed in `train_v2_deviations`.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_REPO = Path("/work/.mirror/deepinsight+insightface/repo")
SUBDIR = "recognition/arcface_torch"
REPO_VARIABLE = "FACECL_INSIGHTFACE_REPO"
# FaceCL backbone -> arcface_torch backbones.get_model name (the iresnets: same layers, same tensor names).
NETWORKS = {"iresnet18": "r18", "iresnet34": "r34", "iresnet50": "r50", "iresnet100": "r100", "iresnet200": "r200"}
# train_v2.py's fixed settings.
SGD_MOMENTUM = 0.9          # torch.optim.SGD(..., momentum=0.9, ...)
CLIP_NORM = 5.0             # torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
BUCKET_CAP_MB = 16          # DistributedDataParallel(..., bucket_cap_mb=16, ...)
GROWTH_INTERVAL = 100       # GradScaler(growth_interval=100)
# PolynomialLRWarmup is stepped every step as in train_v2.py; with no warmup and this many total steps the lr
# stays within 1e-8 of its peak over a benchmark (the toolkit side's schedule: constant).
SCHEDULE_TOTAL_STEPS = 10**9


# ----- the repository and the copy ------------------------------------------------------------------------
def insightface_repo() -> Path | None:
    """The insightface repository (git dir or checkout) or None."""
    given = os.environ.get(REPO_VARIABLE)
    path = Path(given) if given else DEFAULT_REPO
    return path if path.exists() else None


def missing_repo_message() -> str:
    given = os.environ.get(REPO_VARIABLE)
    where = f"{REPO_VARIABLE}={given} does not exist" if given else f"looked at {DEFAULT_REPO}"
    return (f"insightface's repository is not on this machine ({where}); set {REPO_VARIABLE} to a checkout or a "
            "git directory of https://github.com/deepinsight/insightface")


def extract_arcface_torch(into: Path) -> Path:
    """A fresh copy of recognition/arcface_torch under `into`; returns its folder."""
    repo = insightface_repo()
    if repo is None:
        raise FileNotFoundError(missing_repo_message())
    if (repo / SUBDIR).is_dir():  # a checkout
        shutil.copytree(repo / SUBDIR, into / "arcface_torch")
        return into / "arcface_torch"
    with tempfile.TemporaryFile() as archive:
        # stderr kept quiet: git names blobs of other folders that a partial snapshot lacks
        subprocess.run(["git", f"--git-dir={repo}", "archive", "HEAD", SUBDIR], stdout=archive,
                       stderr=subprocess.PIPE, check=True)
        archive.seek(0)
        with tarfile.open(fileobj=archive) as tar:
            tar.extractall(into, filter="data")
    shutil.move(into / SUBDIR, into / "arcface_torch")
    shutil.rmtree(into / "recognition")
    return into / "arcface_torch"


def repository_commit(repo: Path) -> str | None:
    """The commit the copy comes from (HEAD of the git directory or checkout, else a COMMIT file), or None."""
    if (repo / "COMMIT").is_file():
        return (repo / "COMMIT").read_text().strip() or None
    git_dir = ["--git-dir", str(repo)] if (repo / "HEAD").is_file() and (repo / "objects").is_dir() else \
        ["-C", str(repo)]
    try:
        proc = subprocess.run(["git", *git_dir, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


# ----- the patches ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    """Replace every `old` in `file` (relative to arcface_torch/) by `new`; `occurrences` of them must be there."""

    file: str
    old: str
    new: str
    occurrences: int
    why: str

    def line(self) -> str:
        times = f" ({self.occurrences}x)" if self.occurrences > 1 else ""
        return f"{self.file}: {self.old!r} -> {self.new!r}{times}: {self.why}"


def lr_scheduler_takes_verbose() -> bool:
    import torch

    return "verbose" in inspect.signature(torch.optim.lr_scheduler.LRScheduler.__init__).parameters


def patches_needed(device_type: str, precision: str, image_size: int) -> list[Patch]:
    """Only what this device, precision, image size and torch need; on a GPU at fp32 / fp16, 112x112, with a
    torch whose LRScheduler still takes `verbose`, none."""
    import torch

    patches = []
    if device_type != "cuda":
        patches.append(Patch(
            "partial_fc_v2.py", ".cuda()", ".to(self.weight.device)", 6,
            "CPU: the gathered-embedding / label buffers and the sampled class indices are made on the centers' "
            "device instead of the current CUDA device"))
    if precision == "bf16":
        patches.append(Patch(
            "backbones/iresnet.py", "torch.cuda.amp.autocast(self.fp16)",
            f"torch.autocast({device_type!r}, dtype=torch.bfloat16, enabled=self.fp16)", 1,
            "bf16: their backbone's fp16 autocast (CUDA only) runs as bf16 autocast on this device, the toolkit "
            "side's precision (the fc layer stays outside it in fp32, as theirs)"))
    if image_size != 112:
        patches.append(Patch(
            "backbones/iresnet.py", "fc_scale = 7 * 7", f"fc_scale = {image_size // 16} * {image_size // 16}", 1,
            f"{image_size}x{image_size} inputs: their fc layer is sized for 112x112 (7x7 after four stride-2 stages), "
            f"{image_size // 16}x{image_size // 16} here"))
    if not lr_scheduler_takes_verbose():
        patches.append(Patch(
            "lr_scheduler.py", "super().__init__(optimizer, last_epoch=last_epoch, verbose=verbose)",
            "super().__init__(optimizer, last_epoch=last_epoch)", 1,
            f"torch {torch.__version__}: LRScheduler.__init__ no longer takes `verbose` (TypeError otherwise)"))
    return patches


def apply_patches(root: Path, patches: list[Patch]) -> list[dict]:
    """Edit the copy at `root`; SystemExit naming the file when their code no longer has the text to patch."""
    applied = []
    for patch in patches:
        path = root / patch.file
        text = path.read_text()
        found = text.count(patch.old)
        if found != patch.occurrences:
            raise SystemExit(f"error: {SUBDIR}/{patch.file} has {found} occurrence(s) of {patch.old!r} where "
                             f"{patch.occurrences} were expected: insightface's code changed; update "
                             f"benchmarks/arcface_torch_peer.py")
        path.write_text(text.replace(patch.old, patch.new))
        applied.append(asdict(patch))
    return applied


def prepare_copy(into: Path, *, device_type: str, precision: str, image_size: int) -> tuple[Path, dict]:
    """Copy arcface_torch under `into` and patch it; (its folder, what the results file records about it)."""
    repo = insightface_repo()
    if repo is None:
        raise SystemExit(f"error: --peer arcface_torch: {missing_repo_message()}")
    root = extract_arcface_torch(into)
    applied = apply_patches(root, patches_needed(device_type, precision, image_size))
    return root, {"name": "arcface_torch", "repository": str(repo), "commit": repository_commit(repo),
                  "code": SUBDIR, "patches": applied,
                  "train_v2_deviations": train_v2_deviations(device_type, precision)}


def train_v2_deviations(device_type: str, precision: str) -> list[str]:
    """Where the restated step differs from train_v2.py (besides the patches to their files)."""
    notes = ["data: the same pre-made in-memory batches as the toolkit side (train_v2: its DataLoader / DALI)",
             f"lr schedule: PolynomialLRWarmup(warmup_iters=0, total_iters={SCHEDULE_TOTAL_STEPS:.0e}) stepped every "
             "step, i.e. a constant lr as the toolkit side's (train_v2: warmup and decay over its epochs)",
             "no logging, verification or checkpoint callbacks (the toolkit side runs none either)"]
    if device_type != "cuda":
        notes.insert(0, "process group: gloo on CPU (train_v2: nccl); DDP without device_ids (CPU module)")
    if precision == "bf16":
        notes.append("bf16: no GradScaler (train_v2 scales the loss only with fp16)")
    return notes


# ----- train_v2.py's step ---------------------------------------------------------------------------------
def import_from_copy(source: Path):
    """Their modules from the copy at `source` (its folder first on sys.path, as `python train_v2.py` has it)."""
    taken = [name for name in ("backbones", "losses", "partial_fc_v2", "lr_scheduler")
             if name in sys.modules and not str(getattr(sys.modules[name], "__file__", "")).startswith(str(source))]
    if taken:
        raise SystemExit(f"error: modules {taken} are already imported from elsewhere; cannot import arcface_torch's")
    sys.path.insert(0, str(source))
    from backbones import get_model
    from losses import CombinedMarginLoss
    from lr_scheduler import PolynomialLRWarmup
    from partial_fc_v2 import PartialFC_V2

    return get_model, CombinedMarginLoss, PartialFC_V2, PolynomialLRWarmup


class ArcfaceTorchStep:
    """arcface_torch's train_v2.py around its own modules: DDP backbone, PartialFC_V2 with CombinedMarginLoss,
    SGD over both, clip_grad_norm_(backbone, 5), PolynomialLRWarmup; fp16 with GradScaler as train_v2 does it.

    Needs torch.distributed initialised (PartialFC_V2 asserts it; train_v2 wraps even one GPU in DDP)."""

    def __init__(self, source: Path, *, backbone: str, embedding_size: int, num_classes: int, sample_rate: float,
                 scale: float, margins: tuple[float, float, float], interclass_filter: float, lr: float,
                 weight_decay: float, precision: str, device, seed: int):
        import torch
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

        if backbone not in NETWORKS:
            raise SystemExit(f"error: --peer arcface_torch: no arcface_torch network for {backbone!r}; "
                             f"use one of {', '.join(NETWORKS)}")
        get_model, CombinedMarginLoss, PartialFC_V2, PolynomialLRWarmup = import_from_copy(source)
        self.torch = torch
        self.device = device
        self.network = NETWORKS[backbone]
        fp16 = precision in ("fp16", "bf16")   # their cfg.fp16: the backbone under autocast (bf16: patched dtype)
        torch.manual_seed(seed)                # setup_seed(seed=cfg.seed): the same on every rank
        # backbone = get_model(cfg.network, dropout=0.0, fp16=cfg.fp16, num_features=cfg.embedding_size).cuda()
        module = get_model(self.network, dropout=0.0, fp16=fp16, num_features=embedding_size).to(device)
        self.backbone = torch.nn.parallel.DistributedDataParallel(
            module=module, broadcast_buffers=False, device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=BUCKET_CAP_MB, find_unused_parameters=True)
        self.backbone.register_comm_hook(None, fp16_compress_hook)
        self.backbone.train()
        self.backbone._set_static_graph()
        # margin_loss = CombinedMarginLoss(64, *cfg.margin_list, cfg.interclass_filtering_threshold)
        margin_loss = CombinedMarginLoss(scale, margins[0], margins[1], margins[2], interclass_filter)
        # PartialFC_V2(margin_loss, cfg.embedding_size, cfg.num_classes, cfg.sample_rate, False).train().cuda()
        self.partial_fc = PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate, False)
        self.partial_fc.train().to(device)
        self.optimizer = torch.optim.SGD(
            params=[{"params": self.backbone.parameters()}, {"params": self.partial_fc.parameters()}],
            lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
        self.lr_scheduler = PolynomialLRWarmup(optimizer=self.optimizer, warmup_iters=0,
                                               total_iters=SCHEDULE_TOTAL_STEPS)
        self.fp16_scaling = precision == "fp16"
        self.amp = torch.amp.GradScaler(device.type, growth_interval=GROWTH_INTERVAL, enabled=self.fp16_scaling)

    def write_initial_weights(self, folder: Path, rank: int) -> tuple[Path, Path]:
        """Their files, as arcface_torch writes them: rank 0 the backbone state dict (backbone.pth), every rank
        its Partial FC shard (rank_R_softmax_weight.pt); the toolkit side starts from them (train.init_from)."""
        softmax = folder / "softmax"
        softmax.mkdir(parents=True, exist_ok=True)
        backbone_file = folder / "backbone.pth"
        if rank == 0:
            self.torch.save(self.backbone.module.state_dict(), backbone_file)
        self.torch.save(self.partial_fc.weight.detach().cpu(), softmax / f"rank_{rank}_softmax_weight.pt")
        return backbone_file, softmax

    def centers_per_step(self) -> int:
        """Centers of this rank that the last step used."""
        if self.partial_fc.sample_rate < 1 and hasattr(self.partial_fc, "weight_index"):
            return int(self.partial_fc.weight_index.numel())
        return int(self.partial_fc.num_local)

    def count_parameters(self) -> dict:
        return {"backbone": sum(p.numel() for p in self.backbone.module.parameters()),
                "head": self.partial_fc.weight.numel()}

    def train_step(self, batches, clock):
        """One step of train_v2.py's loop (gradient_acc 1), timed like the toolkit side's phases; on a GPU with
        cuDNN autotuning on, as train_v2.py's __main__ sets it (and back to what it was for the other side)."""
        cudnn = self.torch.backends.cudnn
        autotune = cudnn.benchmark
        cudnn.benchmark = self.device.type == "cuda" or autotune
        try:
            return self._step(batches, clock)
        finally:
            cudnn.benchmark = autotune

    def _step(self, batches, clock):
        torch = self.torch
        img, local_labels = clock.timed("data", batches.next_batch)()
        local_embeddings = clock.timed("forward", self.backbone)(img)
        loss = clock.timed("head", self.partial_fc)(local_embeddings, local_labels)
        if self.fp16_scaling:
            clock.timed("backward", self.amp.scale(loss).backward)()

            def update():
                self.amp.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), CLIP_NORM)
                self.amp.step(self.optimizer)
                self.amp.update()
        else:
            clock.timed("backward", loss.backward)()

            def update():
                torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), CLIP_NORM)
                self.optimizer.step()
        clock.timed("optimizer", update)()
        self.optimizer.zero_grad()
        self.lr_scheduler.step()
        return loss.detach()


# What the two steps do differently, each as its own code does it (a results file lists these with the figures).
STEP_DIFFERENCES = [
    "margin gradient: arcface_torch applies the ArcFace margin under no_grad (the target logit's gradient is taken "
    "as that of s*cos(theta)); the toolkit differentiates s*cos(theta+m2). The same loss, other gradients: the "
    "losses agree at the first step only",
    "clipping: the toolkit clips the backbone and the identity centers, each to norm 5 (parallel.clip_grad_norm); "
    "arcface_torch the backbone only",
    "weight decay: the toolkit exempts normalisation weights and biases; arcface_torch decays every parameter",
    "DDP: arcface_torch buckets of 16 MB, find_unused_parameters with a static graph, fp16_compress_hook (gradients "
    "all-reduced in fp16), no buffer broadcast; the toolkit torch's defaults (25 MB buckets, fp32 all-reduce, buffers "
    "broadcast at every forward); in one process the toolkit runs no DDP, arcface_torch DDP over one rank",
    "cuDNN autotuning (GPU): train_v2.py sets torch.backends.cudnn.benchmark, and its step runs with it here too; "
    "the toolkit leaves torch's default (off)",
    "checks: the toolkit checks the loss and gradients for inf/nan every step (one all-reduce of flags, one host "
    "sync) and keeps a copy of the batch-norm buffers to restore on a skipped step; arcface_torch checks nothing "
    "(with fp16 its GradScaler skips overflowing steps)",
    "loss: arcface_torch clamps each sample's target probability at 1e-30 (a sample's loss at most 69.08), the "
    "toolkit does not; the first-step losses differ where a sample's loss is above that (not with 512-d embeddings "
    "from a random start, whose cosines are small)",
    "Partial FC sampling (r < 1): both keep every positive of the gathered batch and random negatives up to "
    "int(r x classes per rank) centers per rank (the toolkit at least one per gathered row); the random draws "
    "differ, so at r < 1 the losses differ from the first step",
]
