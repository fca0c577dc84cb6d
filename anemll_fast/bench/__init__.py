"""`anemll-fast bench`: the benchmark suite (see anemll_fast.bench.cli).

stats (repetitions, min/median/max, noise) -> suites (what is measured, timed in the native extension)
-> report (table and JSON) / plots (matplotlib, the `[bench]` extra) / compare (ratios to an earlier run).
"""
from __future__ import annotations

from anemll_fast.errors import AnemllError


class BenchError(AnemllError, ValueError):
    """A bad option or input file of `anemll-fast bench` (the message names it)."""


__all__ = ["BenchError"]
