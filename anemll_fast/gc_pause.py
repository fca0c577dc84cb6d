"""The cyclic garbage collector held off while a model's object graph is built.

Loading a model creates ~10^5 long-lived objects (the program IR read back
from the program cache, then every function's plan) and no reference cycles
worth collecting. With the collector running, each full pass walks the whole
growing heap: on SmolLM2-135M four such passes cost more CPU than the rest of
a cached load (measured: benchmarks/bench_load.py). The collector is restored
afterwards, as it was.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Disable the cyclic GC for the block (nesting is fine: the outermost restores it)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.freeze()  # what the block built is long-lived: no generation-0 pass over all of it
            gc.enable()
