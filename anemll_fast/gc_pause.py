"""The cyclic garbage collector held off while a model's object graph is built.

Loading a model creates ~10^5 long-lived objects (the program IR read back
from the program cache, then every function's plan) and no reference cycles
worth collecting. With the collector running, each full pass walks the whole
growing heap: on SmolLM2-135M four such passes cost more CPU than the rest of
a cached load (measured: benchmarks/bench_load.py). The collector is restored
afterwards, as it was.

Re-enabling it alone is not enough: the objects allocated meanwhile all count
as generation 0, so the first allocation after the block would start a pass
over every one of them (0.2 s after a load of SmolLM2-135M). With
`freeze=True` they are moved to the permanent generation first (gc.freeze):
no collection walks them again. They are still freed by reference counting
(a loaded model holds no reference cycles: tests check that a closed model is
freed without a collection); what cyclic garbage existed when the block ended
stays uncollected, which a load, creating none, keeps to what the caller had.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def gc_paused(freeze: bool = False) -> Iterator[None]:
    """Disable the cyclic GC for the block (nesting is fine: the outermost restores it), and with
    `freeze` move what exists at its end to the permanent generation (see the module docstring)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            if freeze:
                gc.freeze()
            gc.enable()
