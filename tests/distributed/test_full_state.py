# Every strategy's full_state_dict equals the unwrapped model's state, and load_full_state_dict round-trips.
import pytest
import torch

from tests.conftest import SMOKE_RECIPE
from tests.distributed.conftest import DIST_OVERRIDES, ENGINES, check_ok, free_port, run_job, torchrun, train_args

pytestmark = pytest.mark.slow  # real multi-process jobs (seconds to a minute each)


@pytest.fixture(scope="module")
def reference_state():
    """The backbone every rank builds from the recipe's seed, on one process, unwrapped."""
    from toolkit.config import load_config
    from toolkit.training.builders import build_model

    recipe = load_config(SMOKE_RECIPE, DIST_OVERRIDES)
    torch.manual_seed(recipe.run.seed)
    return {key: value.detach().clone() for key, value in build_model(recipe).state_dict().items()}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_full_state_dict_round_trips_on_two_ranks(engine, tmp_path, reference_state):
    out = tmp_path / "state.pt"
    port = free_port()
    args = [*train_args(tmp_path, engine, *ENGINES[engine]), "--out", str(out)]
    check_ok(run_job(torchrun(2, port), args, port=port, script="tests/distributed/full_state_probe.py"))
    probe = torch.load(out, weights_only=True)
    assert sorted(probe["initial"]) == sorted(reference_state)   # the registry model's keys, no wrapper prefix
    for key, value in reference_state.items():
        assert torch.equal(probe["initial"][key], value), key
    for key, value in probe["target"].items():
        assert torch.equal(probe["loaded"][key], value), key
