"""The README's commands are the CLI's: every `mmembed ...` it shows parses, and every flag it
documents is accepted by the command it is documented for."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest

from jobs.cli import build_parser

README = Path(__file__).parents[2] / "README.md"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def documented_commands() -> list[str]:
    """Every `mmembed ...` in a fenced code block line or an inline code span of the README."""
    text = README.read_text()
    fenced = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, re.S)
    lines = [line.strip() for block in fenced for line in block.splitlines()]
    inline = re.findall(r"`(mmembed [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = [line for line in lines if line.startswith("mmembed ")] + inline
    return [c.replace("\\|", "|") for c in commands]


def _command_parser(words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (sub)parser a command's leading words name, and the words after them."""
    parser, rest = build_parser(), words[1:]
    while rest and rest[0] in _subcommands(parser):
        parser, rest = _subcommands(parser)[rest[0]], rest[1:]
    assert parser.prog != "mmembed", f"{' '.join(words)!r}: no such command"
    return parser, rest


def test_the_readme_documents_every_command():
    documented = {tuple(_words(c)[1:2]) for c in documented_commands()}
    assert {(name,) for name in _subcommands(build_parser())} <= documented


def _words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


@pytest.mark.parametrize("command", documented_commands())
def test_documented_command_exists_and_its_flags_are_accepted(command):
    synopsis = any(ch in command for ch in "[]|…")  # a usage line: its flags are checked, not parsed
    parser, rest = _command_parser(command.split() if synopsis else _words(command))
    if synopsis:
        words = re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", command)
        known = {option for action in parser._actions for option in action.option_strings}
        unknown = [w for w in words if w not in known]
        assert not unknown, f"{command!r}: {parser.prog} does not accept {unknown}"
    else:
        try:
            parser.parse_args(rest)
        except SystemExit as e:
            assert e.code == 0, f"{command!r} does not parse"


def config_keys(cls=None, prefix: str = "") -> list[str]:
    """Every key a job config may hold, nested ones dotted: batch_size.image, ray.address, ..."""
    from jobs.config import JobConfig

    keys = []
    for f in dataclasses.fields(cls or JobConfig):
        nested = typing.get_type_hints(cls or JobConfig)[f.name]
        keys += config_keys(nested, f"{prefix}{f.name}.") if dataclasses.is_dataclass(nested) else [prefix + f.name]
    return keys


def test_the_config_reference_lists_every_key():
    section = README.read_text().split("## Config reference", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([a-z_.]+)`", section))
    documented |= {f"batch_size.{k}" for k in re.findall(r"`\.([a-z]+)`", section)}
    missing = [k for k in config_keys() if k not in documented]
    assert not missing, f"README's config reference does not document {missing}"
