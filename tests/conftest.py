# Shared fixtures: repository paths and a fast variant of the smoke recipe.
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE_RECIPE = REPO / "recipes" / "smoke_synthetic.yaml"

# Small enough that a few steps take well under a second on 2 cores.
TINY_OVERRIDES = [
    "data.image_size=16", "data.batch_size=8", "data.num_workers=0",
    "data.synthetic.num_identities=12", "data.synthetic.samples_per_identity=4",
    "data.synthetic.num_val_identities=6", "data.synthetic.num_val_pairs=40",
    "model.embedding_size=32", "run.tensorboard=false", "run.log_every=1", "eval.batch_size=40",
    "train.num_epochs=3",  # 18 steps, as before the smoke recipe itself went from 3 epochs to 1
]


@pytest.fixture
def tiny_recipe(tmp_path):
    """load_config for the smoke recipe shrunk to a few-second run in tmp_path; extra overrides win."""
    from toolkit.config import load_config

    def make(*extra: str):
        return load_config(SMOKE_RECIPE, [*TINY_OVERRIDES, f"run.output_dir={tmp_path}", *extra])

    return make
