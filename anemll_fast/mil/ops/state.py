"""State ops: read_state, write_state and coreml_update_state over caller-owned state buffers.

A state buffer holds its tensor in compute form (float32 holding fp16-exact values for fp16 states)
so that reads are free; writes rebind or, when the plan proved it safe, were already done in place.
"""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from anemll_fast.mil.ops.registry import BuildContext, Kernel, register


class StateBuffer:
    """One named state tensor of a state object."""

    __slots__ = ("name", "dtype", "shape", "array")

    def __init__(self, name: str, dtype: str, shape: Tuple[int, ...], array: np.ndarray):
        self.name = name
        self.dtype = dtype
        self.shape = tuple(shape)
        self.array = array

    def assign(self, data: Any) -> None:
        if data is self.array:
            return  # updated in place already
        data = np.asarray(data)
        if data.shape != self.shape:
            raise ValueError(f"state {self.name!r}: written value has shape {list(data.shape)}, "
                             f"the state is {list(self.shape)}")
        self.array = np.array(data, dtype=self.array.dtype, copy=True)


@register("read_state")
def _read_state(ctx: BuildContext) -> Kernel:
    return Kernel(lambda s: s.array, [ctx.ref("input")], exact=True)


@register("write_state")
def _write_state(ctx: BuildContext) -> Kernel:
    def run(s, data):
        s.assign(data)
        return ()

    return Kernel(run, [ctx.ref("input"), ctx.ref("data")], exact=True)


@register("coreml_update_state")
def _coreml_update_state(ctx: BuildContext) -> Kernel:
    def run(s, value):
        s.assign(value)
        return value

    return Kernel(run, [ctx.ref("state"), ctx.ref("value")], exact=True)
