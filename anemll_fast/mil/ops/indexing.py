"""Index-driven ops: scatter family, gather_nd, one_hot, non_zero, argsort, reverse, windows."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from anemll_fast.mil.ops.registry import BuildContext, Kernel, register

# Scatter modes: how an update combines with what is there (applied one index at a time, so that
# duplicate indices accumulate, and for "update" the last one wins).
_SCATTER: Dict[str, Callable[[np.ndarray, Any], np.ndarray]] = {
    "update": lambda old, new: new,
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide,
    "max": np.maximum, "min": np.minimum,
}


def _scatter_mode(ctx: BuildContext) -> Callable[[np.ndarray, Any], np.ndarray]:
    mode = str(ctx.scalar("mode", "add")).lower()
    if mode not in _SCATTER:
        raise ctx.bad(f"scatter mode {mode!r} (one of {', '.join(_SCATTER)})")
    return _SCATTER[mode]


def scatter_into(data: np.ndarray, targets: np.ndarray, updates: np.ndarray,
                 op: Callable[[np.ndarray, Any], np.ndarray]) -> np.ndarray:
    """A copy of data with updates[k] combined into data[targets[k]] in order (targets: [K, depth])."""
    out = np.array(data, copy=True)
    for k, t in enumerate(map(tuple, targets)):
        out[t] = op(out[t], updates[k])
    return out


def checked_indices(ctx: BuildContext, idx: Any, dims: Sequence[int]) -> np.ndarray:
    """Indices as intp with negatives wrapped; the last axis of `idx` indexes `dims` one each.

    Out-of-range indices are undefined behaviour in Core ML; the reference refuses them by name
    rather than writing somewhere arbitrary.
    """
    idx = np.asarray(idx).astype(np.intp)
    bound = np.asarray(dims, dtype=np.intp)
    if idx.size and (np.any(idx < -bound) or np.any(idx >= bound)):
        raise IndexError(f"{ctx.label}: index out of range for dimensions {list(dims)}")
    return np.where(idx < 0, idx + bound, idx)


@register("scatter")
def _scatter(ctx: BuildContext) -> Kernel:
    op = _scatter_mode(ctx)
    axis_param = int(ctx.scalar("axis", 0))

    def run(data, indices, updates):
        axis = ctx.axis(axis_param, data.ndim)
        idx = checked_indices(ctx, np.asarray(indices).reshape(-1), [data.shape[axis]])
        out = np.moveaxis(np.array(data, copy=True), axis, 0)
        upd = np.moveaxis(np.asarray(updates).reshape(
            data.shape[:axis] + (idx.size,) + data.shape[axis + 1:]), axis, 0)
        for i, j in enumerate(idx):
            out[j] = op(out[j], upd[i])
        return np.moveaxis(out, 0, axis)

    return Kernel(run, [ctx.ref("data"), ctx.ref("indices"), ctx.ref("updates")])


@register("scatter_along_axis")
def _scatter_along_axis(ctx: BuildContext) -> Kernel:
    op = _scatter_mode(ctx)
    axis_param = int(ctx.scalar("axis", 0))

    def run(data, indices, updates):
        axis = ctx.axis(axis_param, data.ndim)
        updates = np.asarray(updates)
        idx = checked_indices(ctx, indices, [data.shape[axis]])
        if idx.shape != updates.shape:
            raise ValueError(f"{ctx.label}: indices {list(idx.shape)} and updates {list(updates.shape)} differ")
        grid = list(np.indices(idx.shape, sparse=True))
        grid[axis] = idx
        targets = np.stack([np.broadcast_to(g, idx.shape).reshape(-1) for g in grid], axis=-1)
        return scatter_into(data, targets, updates.reshape(-1), op)

    return Kernel(run, [ctx.ref("data"), ctx.ref("indices"), ctx.ref("updates")])


@register("scatter_nd")
def _scatter_nd(ctx: BuildContext) -> Kernel:
    op = _scatter_mode(ctx)

    def run(data, indices, updates):
        indices = np.asarray(indices)
        depth = indices.shape[-1]
        idx = checked_indices(ctx, indices, data.shape[:depth]).reshape(-1, depth)
        upd = np.asarray(updates).reshape((idx.shape[0],) + data.shape[depth:])
        return scatter_into(data, idx, upd, op)

    return Kernel(run, [ctx.ref("data"), ctx.ref("indices"), ctx.ref("updates")])


@register("gather_nd")
def _gather_nd(ctx: BuildContext) -> Kernel:
    batch_dims = int(ctx.scalar("batch_dims", 0))

    def run(x, indices):
        indices = np.asarray(indices)
        depth = indices.shape[-1]
        lead = x.shape[:batch_dims]
        if tuple(indices.shape[:batch_dims]) != tuple(lead):
            raise IndexError(f"{ctx.label}: batch dims of x {list(lead)} and indices "
                             f"{list(indices.shape[:batch_dims])} differ")
        idx = checked_indices(ctx, indices, x.shape[batch_dims:batch_dims + depth])
        nb = int(np.prod(lead, dtype=np.int64))
        xb = x.reshape((nb,) + x.shape[batch_dims:])
        ib = idx.reshape((nb, -1, depth))
        parts = [xb[b][tuple(ib[b].T)] for b in range(nb)]
        out = np.stack(parts) if parts else np.zeros((0,) + x.shape[batch_dims + depth:], x.dtype)
        return out.reshape(indices.shape[:-1] + x.shape[batch_dims + depth:])

    return Kernel(run, [ctx.ref("x"), ctx.ref("indices")], exact=True)


@register("one_hot")
def _one_hot(ctx: BuildContext) -> Kernel:
    axis_param = int(ctx.scalar("axis", -1))
    on = ctx.scalar("on_value", 1)
    off = ctx.scalar("off_value", 0)
    dtype = ctx.out_numpy()

    def run(indices, size):
        indices = np.asarray(indices).astype(np.intp)
        n = int(np.asarray(size).reshape(()))
        if n < 0:
            raise ValueError(f"{ctx.label}: one_hot_vector_size {n} is negative")
        out = np.where(indices[..., None] == np.arange(n), on, off).astype(dtype)
        axis = ctx.axis(axis_param, indices.ndim + 1)
        return np.moveaxis(out, -1, axis)

    size = ctx.ref("one_hot_vector_size")
    return Kernel(run, [ctx.ref("indices"), size], exact=True)


@register("non_zero")
def _non_zero(ctx: BuildContext) -> Kernel:
    return Kernel(lambda x: np.argwhere(np.asarray(x) != 0).astype(np.int32), [ctx.ref("x")], exact=True)


@register("argsort")
def _argsort(ctx: BuildContext) -> Kernel:
    axis = int(ctx.scalar("axis", -1))
    ascending = bool(ctx.scalar("ascending", False))

    def run(x):
        # stable, so that ties keep their input order in both directions
        key = x if ascending else -np.asarray(x, dtype=np.float64)
        return np.argsort(key, axis=axis, kind="stable").astype(np.int32)

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("reverse")
def _reverse(ctx: BuildContext) -> Kernel:
    axes = ctx.ints("axes", None)

    def run(x):
        return np.flip(x, axis=None if axes is None else tuple(a % x.ndim for a in axes))

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("reverse_sequence")
def _reverse_sequence(ctx: BuildContext) -> Kernel:
    seq_param = int(ctx.scalar("seq_axis", 0))
    batch_param = int(ctx.scalar("batch_axis", 0))

    def run(x, lengths):
        seq, batch = ctx.axis(seq_param, x.ndim), ctx.axis(batch_param, x.ndim)
        lengths = np.asarray(lengths).astype(np.intp).reshape(-1)
        if lengths.size != x.shape[batch] or np.any(lengths < 0) or np.any(lengths > x.shape[seq]):
            raise ValueError(f"{ctx.label}: lengths {lengths.tolist()} do not fit batch axis of "
                             f"{x.shape[batch]} and sequence axis of {x.shape[seq]}")
        out = np.array(x, copy=True)
        for b, n in enumerate(lengths):
            src = [slice(None)] * x.ndim
            src[batch] = b
            src[seq] = slice(0, n)
            out[tuple(src)] = np.flip(x[tuple(src)], axis=seq - (batch < seq))
        return out

    return Kernel(run, [ctx.ref("x"), ctx.ref("lengths")], exact=True)


@register("sliding_windows")
def _sliding_windows(ctx: BuildContext) -> Kernel:
    axis_param = int(ctx.scalar("axis"))
    size = int(ctx.scalar("size"))
    stride = int(ctx.scalar("stride", 1))
    if size < 1 or stride < 1:
        raise ctx.bad(f"size {size} and stride {stride} must be positive")

    def run(x):
        axis = ctx.axis(axis_param, x.ndim)
        count = (x.shape[axis] - size) // stride + 1
        if count < 1:
            raise ValueError(f"{ctx.label}: window of {size} longer than axis {axis} ({x.shape[axis]})")
        starts = np.arange(count) * stride
        take = (starts[:, None] + np.arange(size)[None, :]).reshape(-1)
        win = np.take(x, take, axis=axis)
        return win.reshape(x.shape[:axis] + (count, size) + x.shape[axis + 1:])

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("flatten2d")
def _flatten2d(ctx: BuildContext) -> Kernel:
    axis_param = int(ctx.scalar("axis", 1))

    def run(x):
        axis = axis_param + x.ndim if axis_param < 0 else axis_param
        if not 0 <= axis <= x.ndim:
            raise ValueError(f"{ctx.label}: axis {axis_param} out of range for rank {x.ndim}")
        lead = int(np.prod(x.shape[:axis], dtype=np.int64))
        return x.reshape(lead, -1) if x.size else x.reshape(lead, int(np.prod(x.shape[axis:])))

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("reshape_like")
def _reshape_like(ctx: BuildContext) -> Kernel:
    begins = [int(np.asarray(b).reshape(())) for b in ctx.const_tuple("begins")]
    ends = [int(np.asarray(e).reshape(())) for e in ctx.const_tuple("ends")]
    masks = [bool(np.asarray(m).reshape(())) for m in ctx.const_tuple("end_masks")]
    refs = ctx.refs("ref_tensors")
    if not len(refs) == len(begins) == len(ends) == len(masks):
        raise ctx.bad(f"{len(refs)} ref_tensors for {len(begins)} begins, {len(ends)} ends, "
                      f"{len(masks)} end_masks")

    def run(x, *ref_vals):
        shape: List[int] = []
        for r, b, e, m in zip(ref_vals, begins, ends, masks):
            dims = np.shape(r)
            shape.extend(dims[b:] if m else dims[b:e])
        return np.reshape(x, shape)

    return Kernel(run, [ctx.ref("x")] + refs, exact=True)
