# Every option of every command and benchmark has help, and --help shows its default (or says it in words).
from __future__ import annotations

import argparse
import importlib.util
import sys

import pytest

from tests.conftest import REPO
from toolkit.command_line import CommandParser, HelpFormatter

SCRIPTS = sorted([*(path for path in REPO.glob("launch/*.py") if path.name != "__init__.py"),
                  *REPO.glob("benchmarks/bench_*.py")])


class Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(script, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script builds, caught at parse_args before the script does any work."""
    def catch(self, *_args, **_kwargs):
        raise Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.syspath_prepend(str(script.parent))
    spec = importlib.util.spec_from_file_location(f"_help_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entry = getattr(module, "parse_args", None) or module.main
    with pytest.raises(Parsed) as caught:
        entry()
    return caught.value.parser


def every_parser(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from every_parser(sub)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_option_has_help_and_shows_its_default(script, monkeypatch):
    problems = []
    for parser in every_parser(parser_of(script, monkeypatch)):
        if not isinstance(parser, CommandParser):
            problems.append(f"{parser.prog}: not a CommandParser (its --help would not show defaults)")
        one_required = {a for group in parser._mutually_exclusive_groups if group.required for a in group._group_actions}
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
                continue
            name = "/".join(action.option_strings) or action.dest
            if not action.help:
                problems.append(f"{parser.prog} {name}: no help")
            elif action.default is None and action.nargs != 0 and action.option_strings and not action.required \
                    and action not in one_required \
                    and "default" not in action.help.lower():
                problems.append(f"{parser.prog} {name}: no default, and the help does not say what happens without it")
    assert not problems, "\n".join(problems)


def test_help_shows_defaults_but_not_none_or_false():
    parser = CommandParser(prog="x")
    parser.add_argument("--steps", type=int, default=10, help="measured steps")
    parser.add_argument("--out", default=None, help="output (default: a new file)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes")
    parser.add_argument("--threads", type=int, default=0, help="threads, 0 = torch's choice")
    text = " ".join(parser.format_help().split())
    assert "0 = torch's choice (default: 0)" in text   # 0 == False must not hide it
    assert "measured steps (default: 10)" in text and "(default: None)" not in text and "(default: False)" not in text
    assert parser.formatter_class is HelpFormatter
