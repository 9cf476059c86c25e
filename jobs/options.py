"""What the commands share: the parser with one-line errors, the flags several commands take, each list of choices
from its one source (encoders.options), and the shape of a command's help."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from encoders.options import AUDIO_MODES, DEVICES, DTYPES, MODALITIES

Handler = Callable[[argparse.Namespace], int | None]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `mmembed: error: ...` and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


Subparsers = argparse._SubParsersAction  # what add_subparsers returns; argparse names no public type for it


def command(
    sub: Subparsers,
    name: str,
    handler: Handler,
    help: str,
    example: str,
    description: str | None = None,
    parents: tuple[Parser, ...] = (),
) -> Parser:
    """A subcommand whose parse result runs `handler(args)`; its help ends with an example."""
    parser = sub.add_parser(
        name,
        parents=list(parents),
        help=help,
        description=description or help[0].upper() + help[1:] + ".",
        epilog="example:\n  " + example,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def _flags(*add: Callable[[Parser], object]) -> Parser:
    parser = Parser(add_help=False)
    for a in add:
        a(parser)
    return parser


JSON = _flags(lambda p: p.add_argument("--json", action="store_true", help="print JSON on stdout instead of a table"))
RUNTIME = _flags(
    lambda p: p.add_argument("--dtype", choices=DTYPES, help="encoder compute dtype"),
    lambda p: p.add_argument("--device", choices=DEVICES, help="encoder device (default: cuda when present)"),
)


def address(parser: Parser) -> None:
    parser.add_argument(
        "--address", metavar="ADDR", help="run on an existing Ray cluster (HOST:PORT, ray://..., or auto)"
    )


def verbose(parser: Parser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own lines on stderr (by default they go to the log file the job record names, ray_log)",
    )


def wait_lock(parser: Parser) -> None:
    parser.add_argument(
        "--wait-lock", action="store_true", help="wait for another job on ROOT to finish instead of exiting"
    )


def modality(parser: Parser, help: str, default: str | None = None) -> None:
    parser.add_argument("--modality", choices=MODALITIES, default=default, help=help)


def audio_mode(parser: Parser, flag: str, help: str, default: str | None = None) -> None:
    parser.add_argument(flag, choices=AUDIO_MODES, default=default, help=help)


def where(parser: Parser, help: str) -> None:
    parser.add_argument("--where", metavar="PREDICATE", help=help)


def param(parser: Parser) -> None:
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        type=_param,
        metavar="NAME=VALUE",
        help="a value for the placeholder $NAME (repeatable; a string, cast where the statement needs)",
    )


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not _NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE, NAME a placeholder's name ($NAME)")
    return name, value


def params(pairs: list[tuple[str, str]]) -> dict[str, str] | None:
    """--param pairs -> the named values a statement binds (None when there are none: `?` placeholders stay usable)."""
    return dict(pairs) or None


def at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `least`, refused at parse time with the flag named."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
        return value

    parse.__name__ = f"integer >= {least}"
    return parse
