"""The CLI's edge: a command runs the handler its parser set, the project's own errors (one base class) become one
line and exit status 1, and anything else keeps its traceback."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil

import pytest

import encoders
import jobs
import pipelines
import storage
from encoders.errors import MmembedError
from jobs import cli


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    children = _subparsers(parser)
    if not children:
        yield path, parser
    for name, child in children.items():
        yield from _leaves(child, (*path, name))


def test_every_command_runs_a_handler_of_its_own_module():
    for path, parser in _leaves(cli.build_parser()):
        handler = parser.get_default("handler")
        assert callable(handler), f"mmembed {' '.join(path)} has no handler"
        assert handler.__module__.startswith("jobs.commands."), (path, handler.__module__)


def test_a_project_error_is_one_line_and_exit_1(monkeypatch, capsys):
    def fail(args):
        raise MmembedError("the thing is wrong")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    _subparsers(parser)["sql"].set_defaults(handler=fail)
    assert cli.main(["sql", "ROOT", "SELECT 1"]) == 1
    assert capsys.readouterr().err == "mmembed: error: the thing is wrong\n"


def test_any_other_error_keeps_its_traceback(monkeypatch):
    def fail(args):
        raise OSError(5, "a bug, not a user's error")

    parser = cli.build_parser()
    _subparsers(parser)["sql"].set_defaults(handler=fail)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    with pytest.raises(OSError, match="a bug"):
        cli.main(["sql", "ROOT", "SELECT 1"])


def _project_modules():
    for package in (encoders, pipelines, storage, jobs):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if "sample_media" not in info.name and "bundled" not in info.name:
                yield importlib.import_module(info.name)


def test_every_error_the_project_defines_shares_the_one_base():
    errors = {
        f"{module.__name__}.{name}": cls
        for module in _project_modules()
        for name, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Exception) and cls.__module__ == module.__name__
    }
    assert len(errors) >= 15, sorted(errors)
    assert [name for name, cls in errors.items() if not issubclass(cls, MmembedError)] == []


def test_a_project_error_of_several_lines_is_still_one(monkeypatch, capsys):
    """What a library below puts in a message (Arrow's and DuckDB's run to several lines) stays on one."""

    def fail(args):
        raise MmembedError("cannot read x.parquet: Invalid: bad footer\nDetail: the magic bytes\n\n  are wrong")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    _subparsers(parser)["sql"].set_defaults(handler=fail)
    assert cli.main(["sql", "ROOT", "SELECT 1"]) == 1
    err = capsys.readouterr().err
    assert err == "mmembed: error: cannot read x.parquet: Invalid: bad footer Detail: the magic bytes are wrong\n"
