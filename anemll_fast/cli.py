"""The `anemll-fast` command line: one subcommand per module, registered here."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

from anemll_fast.errors import AnemllError

# Each module defines `register(subparsers)`, which adds its subcommand and sets
# `func(args) -> int` on it. Kept as names so that a slow import (coremltools)
# is paid only by the subcommand that needs it.
_SUBCOMMANDS = [
    "anemll_fast.cli_generate",
    "anemll_fast.inspect",
    "anemll_fast.convert.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anemll-fast",
        description="Run, inspect and convert ANEMLL (Apple Neural Engine) models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):  # not part of this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (AnemllError, ValueError) as exc:
        # Bad input of every kind is reported as one line; ANEMLL_FAST_DEBUG=1 shows where.
        if os.environ.get("ANEMLL_FAST_DEBUG"):
            raise
        print(f"anemll-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
