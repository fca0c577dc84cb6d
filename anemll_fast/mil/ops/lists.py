"""List ops (make_list, list_read/write/gather/scatter/length): MIL's auto-resizing tensor arrays.

A list is an SSA value, so every write returns a new ListValue (a shallow copy: elements are shared).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np

from anemll_fast.mil.ops.registry import BuildContext, Kernel, register


class ListValue:
    __slots__ = ("elems", "elem_shape", "dtype", "dynamic")

    def __init__(self, elems: List[Optional[np.ndarray]], elem_shape: Optional[Sequence[int]], dtype: Any,
                 dynamic: bool):
        self.elems = elems
        self.elem_shape = None if elem_shape is None else tuple(int(d) for d in elem_shape)
        self.dtype = dtype
        self.dynamic = dynamic

    def copy(self) -> "ListValue":
        return ListValue(list(self.elems), self.elem_shape, self.dtype, self.dynamic)

    def read(self, i: int, where: str) -> np.ndarray:
        if not 0 <= i < len(self.elems):
            raise IndexError(f"{where}: index {i} outside a list of length {len(self.elems)}")
        e = self.elems[i]
        if e is None:  # never written: zeros of the element shape
            if self.elem_shape is None:
                raise ValueError(f"{where}: element {i} was never written and the list has no element shape")
            return np.zeros(self.elem_shape, self.dtype)
        return e

    def write(self, i: int, value: Any, where: str) -> None:
        if i < 0:
            raise IndexError(f"{where}: negative list index {i}")
        if i >= len(self.elems):
            if not self.dynamic:
                raise IndexError(f"{where}: index {i} outside a fixed-length list of {len(self.elems)}")
            self.elems.extend([None] * (i + 1 - len(self.elems)))
        v = np.asarray(value)
        if self.elem_shape is not None and tuple(v.shape) != self.elem_shape:
            raise ValueError(f"{where}: element of shape {list(v.shape)} for a list of {list(self.elem_shape)}")
        self.elems[i] = v


def _index(i: Any) -> int:
    return int(np.asarray(i).reshape(-1)[0])


@register("make_list")
def _make_list(ctx: BuildContext) -> Kernel:
    dynamic = bool(ctx.scalar("dynamic_length", True))
    shape: Optional[List[int]] = None
    if ctx.has("elem_shape"):
        dims = ctx.const_tuple("elem_shape")
        if all(np.asarray(d).dtype.kind in "iu" for d in dims):
            shape = [int(np.asarray(d).reshape(())) for d in dims]
    dtype = {"fp16": np.float32, "fp32": np.float32, "int32": np.int32, "bool": np.bool_}.get(
        str(ctx.scalar("dtype", "fp32")), np.float32)
    if ctx.is_const("init_length") or not ctx.has("init_length"):
        n = int(ctx.scalar("init_length", 1))
        return Kernel(lambda: ListValue([None] * n, shape, dtype, dynamic), [], exact=True, pure=False)
    return Kernel(lambda n: ListValue([None] * _index(n), shape, dtype, dynamic), [ctx.ref("init_length")],
                  exact=True, pure=False)


@register("list_length")
def _list_length(ctx: BuildContext) -> Kernel:
    return Kernel(lambda ls: np.int32(len(ls.elems)), [ctx.ref("ls")], exact=True)


@register("list_read")
def _list_read(ctx: BuildContext) -> Kernel:
    return Kernel(lambda ls, i: ls.read(_index(i), ctx.label), [ctx.ref("ls"), ctx.ref("index")], exact=True)


@register("list_write")
def _list_write(ctx: BuildContext) -> Kernel:
    def run(ls, i, v):
        out = ls.copy()
        out.write(_index(i), v, ctx.label)
        return out

    return Kernel(run, [ctx.ref("ls"), ctx.ref("index"), ctx.ref("value")], exact=True)


@register("list_gather")
def _list_gather(ctx: BuildContext) -> Kernel:
    def run(ls, idx):
        items = [ls.read(int(i), ctx.label) for i in np.asarray(idx).reshape(-1)]
        if not items:
            return np.zeros((0,) + (ls.elem_shape or ()), ls.dtype)
        return np.stack(items)

    return Kernel(run, [ctx.ref("ls"), ctx.ref("indices")], exact=True)


@register("list_scatter")
def _list_scatter(ctx: BuildContext) -> Kernel:
    def run(ls, idx, value):
        out = ls.copy()
        idx = np.asarray(idx).reshape(-1)
        value = np.asarray(value)
        if value.shape[:1] != (idx.size,):
            raise ValueError(f"{ctx.label}: {idx.size} indices for values of shape {list(value.shape)}")
        for k, i in enumerate(idx):
            out.write(int(i), value[k], ctx.label)
        return out

    return Kernel(run, [ctx.ref("ls"), ctx.ref("indices"), ctx.ref("value")], exact=True)
