"""The ``sdi`` command-line tool.

Each subcommand lives in its own module with a ``register(subparsers)``
function that adds its parser and sets ``func``; this file only dispatches.
Subcommands that need a framework find its backend by name in the
``sdi.backends`` registry (:mod:`sdi_core.app.backends`) and import it when
they run, never at ``import sdi_core``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..factors import SDIError

# Modules providing subcommands, in the order `sdi --help` lists them.
COMMAND_MODULES: list[str] = ["sdi_core.app.cli_demo", "sdi_core.app.cli_validate", "sdi_core.app.cli_store"]


def build_parser() -> argparse.ArgumentParser:
    from .backends import describe_backends

    parser = argparse.ArgumentParser(
        prog="sdi",
        description="Step-Decomposed Influence: which training examples shaped a looped model's "
        "prediction, and at which loop step.",
        epilog=describe_backends(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"sdi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SDIError as exc:
        print(f"sdi {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
