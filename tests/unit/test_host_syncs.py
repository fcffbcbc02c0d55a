# Host synchronisations of one training step, counted on CPU: the skip decision is the only one.
"""On a GPU, an op whose output size or value the host must know (`.item()`, `bool(t)`, `nonzero`, `unique`,
`masked_select`, boolean indexing) makes the host wait for the device. A TorchDispatchMode sees every aten op
of the step on CPU too (forward, and backward: the CPU autograd engine runs on this thread), so it counts
those ops by name. The step has exactly one by design: the all-ranks decision to skip a non-finite step
(Trainer.train_step), which fp16 loss scaling needs anyway.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.kernels.conftest import requires_kernels
from toolkit.heads import Margin, ShardedIdentityCenterHead
from toolkit.training.run_files import prepare_run_folder
from toolkit.training.trainer import Trainer

# aten ops that copy a value or a data-dependent size to the host.
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "_unique", "_unique2", "unique_dim",
               "unique_consecutive", "masked_select", "is_nonzero", "equal", "item"}


class HostSyncCounter(TorchDispatchMode):
    """Names of the syncing aten ops run while active."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            self.calls.append(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1] if index is not None):
            self.calls.append(f"{name} with a boolean mask")  # the mask's nonzero runs inside the op
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_item_nonzero_unique_and_boolean_indexing():
    values = torch.tensor([3.0, 0.0, 3.0, 1.0])
    with HostSyncCounter() as counter:
        values.sum().item()
        torch.nonzero(values)
        torch.unique(values)
        values[values > 0]
        values * 2 + 1  # no sync
    assert len(counter.calls) == 4 and "_local_scalar_dense" in counter.calls, counter.calls


@requires_kernels
@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_sampling_head_forward_and_backward_do_not_sync(sample_rate):
    head = ShardedIdentityCenterHead(40, 8, Margin(), sample_rate=sample_rate)  # auto: fused_linear
    emb_BD = torch.randn(6, 8, requires_grad=True)
    labels_B = torch.tensor([0, 5, 5, 39, -1, 17])
    with HostSyncCounter() as counter:
        head(emb_BD, labels_B).backward()
    assert counter.calls == []
    kept = head.last_sampled_classes
    assert kept.numel() == head.num_kept_columns(6) == (40 if sample_rate == 1.0 else 20)
    assert {0, 5, 17, 39} <= set(kept.tolist())  # every positive kept


@requires_kernels
@pytest.mark.parametrize("overrides", [
    pytest.param(("head.sample_rate=0.5",), id="margin-softmax"),
    pytest.param(("head.sample_rate=0.5", "contrastive.weight=1.0", "contrastive.queue_size=32",
                  "contrastive.projection_dim=16", "data.samples_per_label=2"), id="unimoco+margin-softmax"),
])
def test_one_training_step_has_exactly_one_host_sync(tiny_recipe, overrides):
    recipe = tiny_recipe(*overrides, "run.name=syncs")
    trainer = Trainer(recipe, prepare_run_folder(recipe), verbose=False)
    trainer.train_step()  # first step: lazy state (optimizer buffers, queue) is created
    # The batch is made on the host by the data pipeline (loader workers in a real run): drawn before counting.
    batches = [trainer.stream.next_batch() for _ in range(trainer.shape.grad_accum_steps)]
    trainer.stream.next_batch = lambda: batches.pop(0)
    with HostSyncCounter() as counter:
        trainer.train_step()
    assert counter.calls == ["_local_scalar_dense"], counter.calls
