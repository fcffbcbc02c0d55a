# Test helper: launch/train.py, except that rank FACECL_TEST_STALL_RANK freezes itself (SIGSTOP) at step FACECL_TEST_STALL_STEP.
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from toolkit.training.trainer import Trainer  # noqa: E402

_original_step = Trainer.train_step


def stalling_step(self, *args, **kwargs):
    if self.ctx.rank == int(os.environ["FACECL_TEST_STALL_RANK"]) and self.step + 1 == int(
            os.environ["FACECL_TEST_STALL_STEP"]):
        print(f"rank {self.ctx.rank} freezes at step {self.step + 1} (pid {os.getpid()})", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)   # frozen, not dead: the launcher sees nothing
    return _original_step(self, *args, **kwargs)


Trainer.train_step = stalling_step

if __name__ == "__main__":
    import runpy

    sys.argv[0] = str(Path(__file__).resolve().parents[2] / "launch" / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
