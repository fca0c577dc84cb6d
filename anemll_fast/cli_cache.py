"""`anemll-fast cache`: where the caches live, how big they are, and clearing them."""
from __future__ import annotations

import argparse
from typing import Any


def run_cache(args: argparse.Namespace) -> int:
    from anemll_fast import program_cache
    from anemll_fast.default_model import NAME, cache_root

    folder = program_cache.cache_dir()
    if args.action == "clear":
        n = program_cache.clear()
        print(f"removed {n} loaded-program cache entr{'y' if n == 1 else 'ies'}"
              + (f" from {folder}" if folder is not None else " (the program cache is off)"))
        return 0
    entries = sorted(folder.glob("*.pkl")) if folder is not None and folder.is_dir() else []
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if entries else 0
    print(f"loaded-program cache: {folder if folder is not None else 'off (ANEMLL_FAST_PROGRAM_CACHE)'}"
          f" ({len(entries)} entries, {size / 1e6:.1f} MB"
          + (f" of at most {program_cache.max_size() / 1e6:.0f} MB)" if folder is not None else ")"))
    default = cache_root() / NAME
    print(f"embedded default model: {default} ({'converted' if (default / 'meta.yaml').is_file() else 'not converted yet'})")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("cache", help="show or clear the loaded-program cache",
                       description="Loaded model programs are cached on disk so that a second load skips "
                                   "parsing. `info` shows where and how big; `clear` removes the entries "
                                   "(the converted default model stays). Past 8 GiB "
                                   "(ANEMLL_FAST_PROGRAM_CACHE_MAX_SIZE, e.g. 20G) the least recently "
                                   "used entries are removed.")
    p.add_argument("action", choices=["info", "clear"], nargs="?", default="info")
    p.set_defaults(func=run_cache)
