# Tests of the memory plan: ZeRO formulas, the head plan against memory measured on CPU, launch/plan.py.
"""Three groups:

- backbone: the per-rank totals of the ZeRO paper (mixed-precision AdamW, K = 12) for DeepSpeed stages 0-3,
  FSDP2 = stage 3, DDP = replicated, optimizer offload; Psi is counted on a real (CPU) backbone;
- head: a real ShardedIdentityCenterHead (one process) runs forward + backward + optimizer step; the bytes
  of its centers, gradient and optimizer states, and the peak of its live N x S tensors, are measured
  without the plan's code and compared with the plan;
- launch/plan.py as a subprocess (about 3 s each).
"""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.kernels.conftest import allocator_peak_bytes, requires_kernels
from toolkit.config import load_config
from toolkit.distributed import DistributedContext
from toolkit.training.builders import build_backbone, build_head, build_head_optimizer
from toolkit.training.memory_plan import plan_memory

REPO_ROOT = Path(__file__).resolve().parents[2]
PLAN = REPO_ROOT / "launch" / "plan.py"
SMOKE_RECIPE = REPO_ROOT / "recipes" / "smoke_synthetic.yaml"
WEBFACE_RECIPE = REPO_ROOT / "recipes" / "webface42m_r100.yaml"
SUBPROCESS_TIMEOUT_S = 240  # plan.py traces activations on fake tensors (5-10 s, more on a loaded machine)


# ----- backbone: the ZeRO paper's numbers ------------------------------------------------------------

WORLD = 8


@pytest.fixture(scope="module")
def smoke_psi() -> int:
    """Psi of the smoke recipe's backbone (mobilefacenet, every parameter trainable), counted on CPU."""
    backbone = build_backbone(load_config(SMOKE_RECIPE))
    assert all(p.requires_grad for p in backbone.parameters())
    psi = sum(p.numel() for p in backbone.parameters())
    assert psi % WORLD == 0  # partitions are whole, so the paper's fractions are exact
    return psi


def backbone_plan(*overrides: str, world_size: int = WORLD):
    recipe = load_config(SMOKE_RECIPE, ["optim.name=adamw", *overrides])
    return plan_memory(recipe, world_size, num_classes=200)


# Bytes per rank = replicated x Psi + partitioned x Psi / N. Replicated and partitioned bytes per parameter:
# 2 fp16 parameters + 2 fp16 gradients + 12 optimizer side (4 fp32 master + 4 Adam m + 4 Adam v).
@pytest.mark.parametrize("stage, replicated, partitioned", [
    (0, 16, 0),    # 16 Psi
    (1, 4, 12),    # 4 Psi + 12 Psi / N: optimizer side partitioned
    (2, 2, 14),    # 2 Psi + 14 Psi / N: + gradients
    (3, 0, 16),    # 16 Psi / N: + parameters
])
def test_deepspeed_fp16_adamw_matches_zero_paper(smoke_psi, stage, replicated, partitioned):
    plan = backbone_plan("parallel.engine=deepspeed", "parallel.precision=fp16", f"parallel.zero_stage={stage}")
    assert plan.inputs.backbone_params == smoke_psi
    assert plan.backbone.gpu_bytes == replicated * smoke_psi + partitioned * smoke_psi // WORLD
    assert plan.backbone.cpu_bytes == 0


def test_optimizer_offload_moves_the_optimizer_side_to_cpu(smoke_psi):
    plan = backbone_plan("parallel.engine=deepspeed", "parallel.precision=fp16", "parallel.zero_stage=2",
                         "parallel.offload_optimizer=true")
    assert plan.backbone.gpu_bytes == 2 * smoke_psi + 2 * smoke_psi // WORLD
    assert plan.backbone.cpu_bytes == 12 * smoke_psi // WORLD
    assert plan.cpu_total == plan.backbone.cpu_bytes


def test_fsdp2_equals_stage_3_and_ddp_is_replicated(smoke_psi):
    # fp32 AdamW: 4 params + 4 grads + 8 states = 16 bytes per parameter, like mixed precision's total.
    stage3 = backbone_plan("parallel.engine=deepspeed", "parallel.precision=fp16", "parallel.zero_stage=3")
    fsdp = backbone_plan("parallel.engine=fsdp", "parallel.precision=bf16")
    assert fsdp.backbone.gpu_bytes == stage3.backbone.gpu_bytes == 16 * smoke_psi // WORLD
    ddp = backbone_plan("parallel.engine=ddp", "parallel.precision=bf16")
    single = backbone_plan("parallel.engine=single", world_size=1)
    assert ddp.backbone.gpu_bytes == single.backbone.gpu_bytes == 16 * smoke_psi
    sgd_ddp = backbone_plan("parallel.engine=ddp", "optim.name=sgd", "optim.momentum=0.9")
    assert sgd_ddp.backbone.gpu_bytes == 12 * smoke_psi  # one momentum buffer instead of two Adam states


def test_plan_builds_the_backbone_on_the_meta_device():
    """No real tensor larger than 1 MiB is created while planning iresnet100 (260 MB of fp32 weights)."""

    class LargestRealTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                    self.largest = max(self.largest, tensor.numel() * tensor.element_size())
            return out

    recipe = load_config(WEBFACE_RECIPE, expand_env=False)
    with LargestRealTensor() as watcher:
        plan = plan_memory(recipe, 8, 2_059_906)
    assert plan.inputs.backbone_params > 60_000_000
    assert watcher.largest < 2**20


# ----- head: plan against memory measured on CPU ------------------------------------------------------

class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensors of one shape, and their peak, while the mode is active.

    Every aten op (forward, and backward: the CPU autograd engine runs on this thread with the same mode)
    passes through __torch_dispatch__. Each output of the watched shape whose storage is new is added with
    its storage's nbytes; `weakref.finalize` on the storage subtracts it when the storage is freed (PyTorch
    keeps a storage's Python object alive as long as the C++ storage lives, so the finalizer fires at the
    real free, including tensors held only by autograd's saved variables). In-place results share an
    already counted storage and add nothing. The peak is taken after every op, which is when allocations
    happen; frees between ops only lower the count.
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)
        self.live: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def _freed(self, key: int) -> None:
        self.live_bytes -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == self.shape:
                storage = tensor.untyped_storage()
                key = storage._cdata  # address of the C++ storage: one entry per allocation
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.live_bytes += storage.nbytes()
                    weakref.finalize(storage, self._freed, key)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


def test_live_tensor_counter_sees_allocations_and_frees():
    with LiveTensorBytes((8, 5)) as counter:
        a_85 = torch.zeros(8, 5)
        b_85 = a_85 + 1.0          # new storage
        b_85.mul_(2.0)             # in place: same storage
        view_58 = b_85.t()         # a view of another shape: not counted
        del a_85
        c_85 = torch.exp(b_85)     # reuses freed memory, counted again
        assert counter.live_bytes == 2 * 8 * 5 * 4
        del b_85, c_85
        assert counter.live_bytes == 8 * 5 * 4  # b's storage is still held by the view
        del view_58
    assert counter.live_bytes == 0
    assert counter.peak_bytes == 2 * 8 * 5 * 4


def storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


IMPLEMENTATIONS = [pytest.param("reference", id="reference"),
                   pytest.param("fused", id="fused", marks=requires_kernels),
                   pytest.param("fused_linear", id="fused_linear", marks=requires_kernels)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("sample_rate, optimizer_name, interclass_filter", [
    (0.3, "sgd", 0.0),
    (1.0, "sgd", 0.0),
    (0.3, "adamw", 0.2),
    (0.01, "sgd", 0.0),    # int(0.01 x 1000) = 10 < 32 distinct positives: all 32 are kept
])
def test_head_plan_matches_measured_memory(sample_rate, optimizer_name, interclass_filter, implementation):
    num_classes, embedding_size, batch = 1000, 64, 32
    recipe = load_config(SMOKE_RECIPE, [
        f"model.embedding_size={embedding_size}", f"data.batch_size={batch}", f"head.sample_rate={sample_rate}",
        f"head.interclass_filter={interclass_filter}", f"optim.name={optimizer_name}",
        f"head.implementation={implementation}"])
    plan = plan_memory(recipe, 1, num_classes)

    torch.manual_seed(0)
    head = build_head(recipe, num_classes, DistributedContext())  # world_size 1, group None
    optimizer = build_head_optimizer(recipe, head, peak_lr=0.1)
    emb_BD = torch.randn(batch, embedding_size, requires_grad=True)  # stands in for the backbone's output
    labels_B = torch.randperm(num_classes)[:batch]  # distinct labels: 32 positives, all in the one shard
    # Columns kept: every class at rate 1, else int(rate x classes) sampled but never fewer than the positives.
    num_columns = num_classes if sample_rate == 1.0 else max(int(sample_rate * num_classes), batch)

    with LiveTensorBytes((batch, num_columns)) as counter:
        loss = head(emb_BD, labels_B)
        loss.backward()
    assert head.last_sampled_classes.numel() == num_columns
    optimizer.step()

    # (a) model states of the shard: exact.
    centers = head.centers_CD
    assert storage_bytes([centers]) == plan.head.center_weights
    assert storage_bytes([centers.grad]) == plan.head.center_grad
    # Per-element states (momentum_buffer; exp_avg, exp_avg_sq). AdamW's `step` is a 0-d counter, not
    # a per-element state, and is left out, as in the plan.
    states = [value for value in optimizer.state[centers].values()
              if isinstance(value, torch.Tensor) and value.shape == centers.shape]
    assert len(states) == (1 if optimizer_name == "sgd" else 2)  # head.optimizer is 'same' as optim.name
    assert storage_bytes(states) == plan.head.optimizer_states

    # (b) the N x S logits buffers at their peak during forward + backward: within 10% of the plan.
    measured = counter.peak_bytes
    print(f"\nhead N x S peak: measured {measured} B = {measured / (batch * num_columns * 4):.2f} fp32 buffers; "
          f"plan {plan.logits.total} B")
    assert counter.live_bytes == 0  # everything freed after backward
    assert plan.logits.implementation == implementation
    assert abs(plan.logits.fp32_buffers + plan.logits.filter_mask - measured) <= 0.10 * measured


@requires_kernels
@pytest.mark.parametrize("batch, embedding_size, sample_rate", [(32, 64, 1.0), (96, 64, 1.0), (32, 64, 0.3), (32, 256, 0.6)],
                         ids=["N<=D", "N>D", "sampled", "sampled-blocks"])
def test_fused_linear_plan_matches_the_allocator_peak(batch, embedding_size, sample_rate):
    """fused_linear allocates inside its kernels, where no dispatch mode sees it: the CPU allocator's peak
    over forward + backward (torch.profiler memory events) must equal the plan's center gradient plus its
    block temporaries, within 10% (the rest: N x D embeddings and their gradients)."""
    num_classes = 30_000
    recipe = load_config(SMOKE_RECIPE, [f"model.embedding_size={embedding_size}", f"data.batch_size={batch}",
                                        "head.implementation=fused_linear", f"head.sample_rate={sample_rate}"])
    plan = plan_memory(recipe, 1, num_classes)
    assert plan.logits.fp32_buffers == 0 and plan.logits.block_buffers > 0
    torch.manual_seed(0)
    head = build_head(recipe, num_classes, DistributedContext())
    emb_BD = torch.randn(batch, embedding_size, requires_grad=True)
    labels_B = torch.randint(0, num_classes, (batch,))
    peak = allocator_peak_bytes(lambda: head(emb_BD, labels_B).backward())
    planned = plan.head.center_grad + plan.logits.total
    print(f"\nfused_linear peak: measured {peak} B, plan {planned} B")
    assert abs(planned - peak) <= 0.10 * peak


# ----- launch/plan.py ---------------------------------------------------------------------------------

def run_plan(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(PLAN), *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S)


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_plan_cli_prints_the_webface42m_plan():
    proc = run_plan("--recipe", str(WEBFACE_RECIPE), "--world-size", "8", "--num-classes", "2059906")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any("C = 2,059,906" in line for line in lines), proc.stdout
    assert any(line.strip().startswith("center shard weights (257,489 x 512") for line in lines), proc.stdout
    assert any("logits N x S = 2,048 gathered rows x 51,497 sampled columns (head.implementation fused_linear "
               "keeps no N x S buffer" in line for line in lines), proc.stdout
    # one total (model states + the recipe's activations), no empty CPU section, no row of nothing
    totals = [line for line in lines if "total" in line and "per rank" in line]
    assert len(totals) == 1 and totals[0].split()[:4] == ["total", "GPU", "per", "rank"], proc.stdout
    assert "CPU memory" not in proc.stdout and not any(line.rstrip().endswith(" 0") for line in lines), proc.stdout
    gpu_rows = [line.strip() for line in lines[lines.index("  GPU memory per rank") + 1:]
                if line.strip().endswith(("MiB", "GiB"))]
    sizes = {row.rsplit("  ", 1)[0].strip(): float(row.split()[-2]) * {"MiB": 2**20, "GiB": 2**30}[row.split()[-1]]
             for row in gpu_rows}
    total = sizes.pop("total GPU per rank")
    assert total == pytest.approx(sum(sizes.values()), rel=2e-3), sizes
    assert any(name.startswith("backbone activations (256 samples, bf16, not checkpointed)") for name in sizes)


@pytest.mark.parametrize("args, needle", [
    (["--world-size", "0"], "--world-size"),
    (["--world-size", "8", "--set", "parallel.zero_stage=5"], "zero_stage"),
])
@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_plan_cli_user_errors_are_one_line(args, needle):
    proc = run_plan("--recipe", str(WEBFACE_RECIPE), "--num-classes", "2059906", *args)
    report = f"exit {proc.returncode}\n--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}"
    assert proc.returncode == 2, report
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], report
    assert "Traceback" not in proc.stderr, report


def test_a_contrastive_only_recipe_plans_no_center_shard():
    recipe = load_config(SMOKE_RECIPE, ["parallel.engine=ddp", "head.weight=0.0", "contrastive.weight=1.0"])
    with_head = plan_memory(load_config(SMOKE_RECIPE, ["parallel.engine=ddp"]), 4, 1000)
    plan = plan_memory(recipe, 4, 1000)
    assert with_head.head.total > 0 and with_head.logits.total > 0
    assert plan.head.total == 0 and plan.logits.total == 0
    assert plan.gpu_total == plan.backbone.gpu_bytes
