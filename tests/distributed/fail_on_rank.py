# Test helper: launch/train.py, except that rank FACECL_TEST_FAIL_RANK raises at step FACECL_TEST_FAIL_STEP.
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from toolkit.errors import FaceCLError  # noqa: E402
from toolkit.training.trainer import Trainer  # noqa: E402

_original_step = Trainer.train_step


def failing_step(self, *args, **kwargs):
    if self.ctx.rank == int(os.environ["FACECL_TEST_FAIL_RANK"]) and self.step + 1 == int(
            os.environ["FACECL_TEST_FAIL_STEP"]):
        # FACECL_TEST_FAIL_KIND=user: an error the toolkit recognises (as a full disk is), else a crash.
        kind = FaceCLError if os.environ.get("FACECL_TEST_FAIL_KIND") == "user" else RuntimeError
        raise kind(f"rank {self.ctx.rank} fails on purpose at step {self.step + 1}")
    return _original_step(self, *args, **kwargs)


Trainer.train_step = failing_step

if __name__ == "__main__":
    import runpy

    sys.argv[0] = str(Path(__file__).resolve().parents[2] / "launch" / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
