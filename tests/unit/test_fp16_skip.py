# fp16 policy: when either part's gradients overflow, the backbone and the head skip their step together.
import torch

from toolkit.parallel.single import SingleProcess

def make_engine(tiny_recipe):
    recipe = tiny_recipe("run.name=fp16")
    backbone = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1)
    from toolkit.distributed import DistributedContext

    engine = SingleProcess(recipe.parallel, backbone, optimizer, DistributedContext(), grad_accum_steps=1)
    # fp16 is refused on CPU at the recipe level; the scaler mechanism itself runs on CPU.
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    return engine, backbone


def test_head_overflow_makes_the_engine_skip_too(tiny_recipe):
    engine, backbone = make_engine(tiny_recipe)
    before = backbone.weight.detach().clone()
    loss = backbone(torch.ones(2, 4)).sum()
    engine.backward(loss, is_last_micro=True)
    engine.unscale_()
    assert float(engine.found_nonfinite()) == 0.0  # the backbone alone is fine
    assert engine.step(skip=True) is False         # ... but the head overflowed
    assert torch.equal(backbone.weight, before)
    assert engine.loss_scale() == 512.0      # the scale backs off, as for any overflow


def test_finite_gradients_step_and_report_it(tiny_recipe):
    engine, backbone = make_engine(tiny_recipe)
    before = backbone.weight.detach().clone()
    engine.backward(backbone(torch.ones(2, 4)).sum(), is_last_micro=True)
    engine.unscale_()
    assert engine.step() is True
    # Unscaled gradient of sum(W x) w.r.t. W is 2 (two rows of ones): the step is lr * 2.
    torch.testing.assert_close(backbone.weight, before - 0.1 * 2.0)
