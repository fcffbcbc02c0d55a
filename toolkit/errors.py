# User-facing error type: anything the user can fix (recipe, paths, names) raises FaceCLError.
"""Errors that the command-line entry points turn into one line on stderr and exit status 2."""


class FaceCLError(Exception):
    """A problem with the user's input (recipe, file, name, path); the message names the bad value."""


class ConfigError(FaceCLError):
    """A recipe that does not parse or does not match the schema."""


class CheckpointError(FaceCLError):
    """A file that is not a checkpoint of this toolkit, or one from an incompatible run."""
