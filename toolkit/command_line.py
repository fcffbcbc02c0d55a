# The argument parser every command and benchmark builds on: its --help shows each option's default.
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; every option's help ends with "(default: X)" unless it already names
    its default. Options whose default is None or a flag's False say in their own words what happens without them."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # identity, not `in`: 0 == False, and an option whose default is 0 should still show it
        unstated = action.default is None or action.default is False or action.default == []
        if unstated or "default" in (action.help or "").lower():
            return action.help or ""
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with HelpFormatter; sub-commands made by add_subparsers() are CommandParsers too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
