# User-facing error type: anything the user can fix (recipe, paths, names) raises FaceCLError.
"""Errors that the command-line entry points turn into one line on stderr and exit status 2 (3 for a run
that diverged: TrainingDivergedError)."""

import sys
from typing import Callable

EXIT_USER_ERROR = 2


class FaceCLError(Exception):
    """A problem with the user's input (recipe, file, name, path); the message names the bad value."""


class ConfigError(FaceCLError):
    """A recipe that does not parse or does not match the schema."""


class CheckpointError(FaceCLError):
    """A file that is not a checkpoint of this toolkit, or one from an incompatible run."""


class RunFolderError(FaceCLError):
    """The run folder cannot be used as asked (another live run holds it, or it holds checkpoints and the run
    did not say to resume them); decided by rank 0 for the whole job."""


class TrainingDivergedError(FaceCLError):
    """The loss or gradients stayed non-finite for train.max_nonfinite_steps consecutive steps."""

    exit_status = 3


def _print_error(exc: FaceCLError) -> None:
    print(f"error: {exc}", file=sys.stderr, flush=True)


def run_reporting_user_errors(run: Callable[[], int], *, debug: bool = False,
                              report: Callable[[FaceCLError], None] = _print_error) -> int:
    """run() for an entry point: a FaceCLError becomes one reported line and EXIT_USER_ERROR (2), unless
    `debug`, which lets the traceback through."""
    try:
        return run()
    except FaceCLError as exc:
        if debug:
            raise
        report(exc)
        return getattr(exc, "exit_status", EXIT_USER_ERROR)


def command_main(parse_args: Callable[[list[str] | None], object], run: Callable[[object], int],
                 argv: list[str] | None = None) -> int:
    """main() of a launch/ command: parse the arguments, run; a FaceCLError is one line and status 2 (with
    `--debug`, its traceback). Known-harmless library messages are silenced first (toolkit/quiet.py)."""
    from toolkit.quiet import quiet_known_messages

    quiet_known_messages()
    args = parse_args(argv)
    return run_reporting_user_errors(lambda: run(args), debug=bool(getattr(args, "debug", False)))
