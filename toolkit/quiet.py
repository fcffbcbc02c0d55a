# Known-harmless third-party console messages, each silenced at its source with the reason: the one list of them.
"""Messages that libraries print on every run and that say nothing the user can or should act on. Each is
matched by its logger (or warning category and module) and the start of its text, never by a blanket level or
`ignore`: anything else those libraries say still reaches the console. `quiet_known_messages()` is called first
thing by the launch commands (launch/train.py, and every other command through toolkit.errors.command_main).

Not filterable here, because they come from processes the toolkit's code does not run in:
- `deepspeed` launcher (its runner and per-node launch process, before launch/train.py starts): "Unable to find
  hostfile, will proceed with training with local resources only" (a warning), on a machine without GPU "Setting
  accelerator to CPU" (twice, unless DS_ACCELERATOR=cpu), and INFO lines such as "Setting
  CUDA_VISIBLE_DEVICES=0,1", "WORLD INFO DICT", "process N spawned with command". `deepspeed --log_level warning`
  hides the INFO lines, `deepspeed --quiet` all of them (docs/distributed.md).
- DeepSpeed's CPU shared-memory all-reduce prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built
  successfully" with print(), not through a logger; only redirecting stdout would hide it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownLogMessage:
    logger: str     # the library's logger name
    starts_with: str
    reason: str


@dataclass(frozen=True)
class KnownWarning:
    category: type[Warning]
    message: str    # regular expression matched at the start of the warning's text
    module: str     # regular expression matched against the module the warning is attributed to
    reason: str


KNOWN_LOG_MESSAGES = (
    KnownLogMessage(
        "DeepSpeed", "**** You are using ZeRO with an untested optimizer",
        "DeepSpeed says this of every optimizer it did not write itself; the toolkit passes its own SGD/AdamW and "
        "tests them under ZeRO 1-3 against the other engines (tests/distributed/test_engines.py)"),
    KnownLogMessage(
        "DeepSpeed", "Setting accelerator to CPU. If you have GPU",
        "DeepSpeed found no GPU and uses its CPU accelerator; the run's first lines name the device it trains on"),
    KnownLogMessage(
        "torch.utils.cpp_extension", "No CUDA runtime is found",
        "DeepSpeed's op builders import torch.utils.cpp_extension, which looks for a CUDA toolkit at import; a CPU "
        "run compiles nothing for CUDA (the CPU all-reduce op it builds needs none)"),
)

KNOWN_WARNINGS = (
    KnownWarning(
        FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        r"torch\.distributed\.c10d_logger",
        "torch 2.14 renamed these collectives (all_gather_single, reduce_scatter_single) and DeepSpeed ZeRO still "
        "calls the old names on every multi-rank run; the toolkit's own collectives use the new names "
        "(toolkit/distributed/collectives.py). The warning's second line was the stray "
        "'return func(*args, **kwargs)', torch's wrapper that it points at"),
)


class _DropKnownMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_known_messages() -> None:
    """Install the filters (before the libraries are imported or after: loggers are looked up by name);
    calling it again adds nothing."""
    for logger_name in dict.fromkeys(known.logger for known in KNOWN_LOG_MESSAGES):
        logger = logging.getLogger(logger_name)
        if not any(isinstance(existing, _DropKnownMessages) for existing in logger.filters):
            logger.addFilter(_DropKnownMessages(tuple(known.starts_with for known in KNOWN_LOG_MESSAGES
                                                      if known.logger == logger_name)))
    for known in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=known.message, category=known.category, module=known.module)
