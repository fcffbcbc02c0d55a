# Every strategy's full_state_dict equals the unwrapped model's state, and load_full_state_dict round-trips.
import pytest
import torch

from tests.conftest import SMOKE_RECIPE
from tests.distributed.conftest import DIST_OVERRIDES, ENGINES
from tests.export.conftest import probed_run

pytestmark = pytest.mark.slow  # real multi-process jobs (seconds to a minute each)


@pytest.fixture(scope="module")
def reference_state():
    """The backbone every rank builds from the recipe's seed, on one process, unwrapped."""
    from toolkit.config import load_config
    from toolkit.training.builders import build_model

    recipe = load_config(SMOKE_RECIPE, DIST_OVERRIDES)
    torch.manual_seed(recipe.run.seed)
    return {key: value.detach().clone() for key, value in build_model(recipe).state_dict().items()}


@pytest.fixture(scope="module")
def probed_runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("probed_runs")


@pytest.mark.parametrize("engine", list(ENGINES))
def test_full_state_dict_round_trips_on_two_ranks(engine, probed_runs_root, reference_state):
    # The 2-rank job of this engine that the export tests inspect too (tests/export/conftest.py, one per session).
    probe = torch.load(probed_run(engine, probed_runs_root).full_state, weights_only=True)
    assert sorted(probe["initial"]) == sorted(reference_state)   # the registry model's keys, no wrapper prefix
    for key, value in reference_state.items():
        assert torch.equal(probe["initial"][key], value), key
    for key, value in probe["target"].items():
        assert torch.equal(probe["loaded"][key], value), key
    assert any(not torch.equal(probe["target"][key], value) for key, value in reference_state.items())
