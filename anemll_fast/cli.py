"""The `anemll-fast` command line: one subcommand per module, registered here."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
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
    "anemll_fast.server.cli",
    "anemll_fast.cli_cache",
    "anemll_fast.bench.cli",
]


def version_text() -> str:
    """`anemll-fast --version`: the package version and what its native build contains."""
    from anemll_fast import __version__

    try:
        from anemll_fast import _native

        coreml = "with" if _native.build_info().get("coreml_backend") else "without"
        native = f"native engine {coreml} the Core ML backend"
    except ImportError:
        native = "native engine not built"
    return f"anemll-fast {__version__} ({native}; Python {platform.python_version()}, {platform.system()} {platform.machine()})"


class _VersionAction(argparse.Action):
    """--version, computed only when asked (it imports the native extension)."""

    def __init__(self, option_strings: List[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anemll-fast",
        description="Run, inspect and convert ANEMLL (Apple Neural Engine) models.",
    )
    parser.add_argument("--version", action=_VersionAction)
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
