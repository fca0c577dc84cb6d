"""Progress bars (tqdm) for whatever takes more than a moment: parsing and
reading model parts, converting the default model, prefilling long prompts.

Bars go to stderr and only when stderr is a terminal: piped or logged output
never holds bars or escape codes. `quiet()` (the CLI's --quiet) or
ANEMLL_FAST_QUIET=1 silences them everywhere.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional

_quiet = False


def set_quiet(quiet: bool = True) -> None:
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet or os.environ.get("ANEMLL_FAST_QUIET", "").strip().lower() in ("1", "true", "yes")


def interactive() -> bool:
    """Bars may be drawn: not quiet, and stderr is a terminal."""
    if is_quiet():
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def bar(total: Optional[float] = None, desc: str = "", unit: str = "it", *, enabled: bool = True,
        **kwargs: Any) -> Any:
    """A tqdm bar on stderr; a no-op one when bars may not be drawn."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not (enabled and interactive()),
                leave=kwargs.pop("leave", False), dynamic_ncols=True, **kwargs)


def note(message: str) -> None:
    """A one-line status message on stderr (kept even when not a terminal: no escape codes)."""
    if not is_quiet():
        print(message, file=sys.stderr, flush=True)
