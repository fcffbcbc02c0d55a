# The Checkpointer on its own: save and restore parts without a trainer, identity checks, retention of own entries only.
import pytest
import torch

from toolkit.checkpoint import Checkpointer, StateAdapter, load_checkpoint
from toolkit.config.schema import ParallelConfig
from toolkit.distributed import DistributedContext
from toolkit.errors import CheckpointError
from toolkit.parallel.single import SingleProcess


def make_engine(seed: int = 0) -> SingleProcess:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return SingleProcess(ParallelConfig(engine="single"), model, optimizer, DistributedContext(), grad_accum_steps=1)


def train_a_little(engine: SingleProcess, steps: int) -> None:
    for _ in range(steps):
        loss = engine.forward(torch.ones(2, 4)).square().mean()
        engine.backward(loss, is_last_micro=True)
        engine.step()
        engine.zero_grad()


class Counter:
    def __init__(self):
        self.value = 0

    def state(self) -> StateAdapter:
        return StateAdapter(lambda: {"value": self.value}, lambda saved: setattr(self, "value", saved["value"]))


def make_checkpointer(folder, engine, counter, *, keep_last=0, model="linear"):
    return Checkpointer(folder, DistributedContext(), engine=engine, states={"counter": counter.state()},
                        identity=lambda resuming: {"model": model, **engine.checkpoint_identity(resuming)},
                        keep_last=keep_last, say=lambda line: None)


def test_a_restored_engine_and_state_continue_exactly(tmp_path):
    engine, counter = make_engine(0), Counter()
    train_a_little(engine, 3)
    counter.value = 7
    path = make_checkpointer(tmp_path, engine, counter).save(3)
    assert path == tmp_path / "step_00000003.pt"
    expected = [p.detach().clone() for p in engine.module.parameters()]
    momentum = [engine.optimizer.state[p]["momentum_buffer"].clone() for p in engine.module.parameters()]

    fresh, fresh_counter = make_engine(1), Counter()       # other initial weights, no optimizer state
    restored = make_checkpointer(tmp_path, fresh, fresh_counter).load(tmp_path)
    assert (restored.step, restored.world_size, restored.source) == (3, 1, path)
    assert fresh_counter.value == 7
    for got, want in zip(fresh.module.parameters(), expected):
        assert torch.equal(got, want)
    for param, want in zip(fresh.module.parameters(), momentum):
        assert torch.equal(fresh.optimizer.state[param]["momentum_buffer"], want)
    # And the next step is the same as the uninterrupted engine's.
    train_a_little(engine, 1)
    train_a_little(fresh, 1)
    for got, want in zip(fresh.module.parameters(), engine.module.parameters()):
        assert torch.equal(got, want)


def test_a_checkpoint_of_another_identity_is_refused(tmp_path):
    engine, counter = make_engine(), Counter()
    make_checkpointer(tmp_path, engine, counter, model="linear").save(1)
    with pytest.raises(CheckpointError, match="model='linear'; this run has model='mlp'"):
        make_checkpointer(tmp_path, make_engine(), Counter(), model="mlp").load(tmp_path)


def test_retention_prunes_only_this_runs_entries_and_never_overwrites_another_runs(tmp_path):
    engine, counter = make_engine(), Counter()
    other = make_checkpointer(tmp_path, engine, counter)
    other.save(2)
    other.save(9)
    foreign = sorted(p.name for p in tmp_path.glob("step_*"))
    mine = make_checkpointer(tmp_path, engine, counter, keep_last=2)
    assert mine.run_id != other.run_id
    for step in (3, 4, 5):
        mine.save(step)
    names = sorted(p.name for p in tmp_path.glob("step_*"))
    assert names == sorted([*foreign, "step_00000004.pt", "step_00000005.pt"])   # step 3 pruned, 2 and 9 kept
    assert (tmp_path / "latest").read_text().strip() == "step_00000005.pt"
    before = (tmp_path / "step_00000009.pt").read_bytes()
    with pytest.raises(CheckpointError, match="written by another run"):
        mine.save(9)
    assert (tmp_path / "step_00000009.pt").read_bytes() == before
    # Resuming into a folder that also holds another run's entries would mix the two runs: refused.
    with pytest.raises(CheckpointError, match="holds 2 checkpoint.s. of another run .e.g. step_00000009.pt.*mix two runs"):
        make_checkpointer(tmp_path, engine, counter).load(tmp_path / "step_00000005.pt")
    # Without them, a resumed run owns its own earlier entries (same run id): it may prune them.
    for name in foreign:
        (tmp_path / name).unlink()
    resumed = make_checkpointer(tmp_path, engine, counter, keep_last=1)
    resumed.load(tmp_path / "step_00000005.pt")
    assert resumed.run_id == mine.run_id
    resumed.save(6)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000006.pt"]
    assert load_checkpoint(tmp_path)["run_id"] == mine.run_id


def test_non_finite_weights_are_never_saved(tmp_path):
    engine, counter = make_engine(), Counter()
    with torch.no_grad():
        next(engine.module.parameters())[0, 0] = float("nan")
    lines = []
    checkpointer = Checkpointer(tmp_path, DistributedContext(), engine=engine, states={}, identity=lambda r: {},
                                say=lines.append)
    assert checkpointer.save(1) is None
    assert not list(tmp_path.glob("step_*")) and "weights are not finite" in lines[0]
