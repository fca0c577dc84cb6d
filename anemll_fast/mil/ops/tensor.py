"""Shape and data-movement ops: reshape, transpose, slicing, gather, concat/split, tile, band_part..."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np

from anemll_fast.mil.ops.registry import BuildContext, Kernel, register


@register("identity")
def _identity(ctx: BuildContext) -> Kernel:
    return Kernel(lambda x: x, [ctx.ref("x")], exact=True)


def reshape_target(in_shape: Sequence[int], shape: Sequence[int]) -> List[int]:
    """MIL reshape: -1 is inferred, 0 copies the input dim aligned from the right (1 if none)."""
    out = list(int(s) for s in shape)
    r_in, r_out = len(in_shape), len(out)
    for i, s in enumerate(out):
        if s == 0:
            j = r_in - (r_out - i)
            out[i] = int(in_shape[j]) if 0 <= j < r_in else 1
    return out


@register("reshape")
def _reshape(ctx: BuildContext) -> Kernel:
    if ctx.is_const("shape"):
        shape = ctx.ints("shape")
        if 0 in shape:
            return Kernel(lambda x: np.reshape(x, reshape_target(x.shape, shape)), [ctx.ref("x")], exact=True)
        tshape = tuple(shape)
        return Kernel(lambda x: np.reshape(x, tshape), [ctx.ref("x")], exact=True)
    return Kernel(lambda x, s: np.reshape(x, reshape_target(x.shape, np.asarray(s).tolist())),
                  [ctx.ref("x"), ctx.ref("shape")], exact=True)


@register("transpose")
def _transpose(ctx: BuildContext) -> Kernel:
    perm = tuple(ctx.ints("perm"))
    return Kernel(lambda x: np.transpose(x, perm), [ctx.ref("x")], exact=True)


@register("expand_dims")
def _expand_dims(ctx: BuildContext) -> Kernel:
    axes = ctx.ints("axes")

    def run(x):
        r = x.ndim + len(axes)
        norm = sorted(a % r for a in axes)
        return np.reshape(x, _insert_ones(x.shape, norm))

    return Kernel(run, [ctx.ref("x")], exact=True)


def _insert_ones(shape: Sequence[int], axes: Sequence[int]) -> List[int]:
    out = list(shape)
    for a in axes:
        out.insert(a, 1)
    return out


@register("squeeze")
def _squeeze(ctx: BuildContext) -> Kernel:
    axes = ctx.ints("axes", None)

    def run(x):
        if axes is None:
            return np.reshape(x, [d for d in x.shape if d != 1])
        return np.squeeze(x, axis=tuple(a % x.ndim for a in axes))

    return Kernel(run, [ctx.ref("x")], exact=True)


def slice_index(shape: Sequence[int], begin: Sequence[int], end: Sequence[int],
                stride: Optional[Sequence[int]], begin_mask: Optional[Sequence[bool]],
                end_mask: Optional[Sequence[bool]], squeeze_mask: Optional[Sequence[bool]]) -> tuple:
    """Numpy index for MIL slice_by_index / slice_update (python slice semantics per axis)."""
    rank = len(shape)
    if len(begin) != rank or len(end) != rank:
        raise IndexError(f"begin/end have {len(begin)}/{len(end)} entries for a rank-{rank} tensor")
    idx: List[Any] = []
    for i in range(rank):
        s = int(stride[i]) if stride is not None else 1
        if squeeze_mask is not None and squeeze_mask[i]:
            b = int(begin[i])
            if not -shape[i] <= b < shape[i]:
                raise IndexError(f"squeezed index {b} out of range for axis {i} of size {shape[i]}")
            idx.append(b)
            continue
        b = None if (begin_mask is not None and begin_mask[i]) else int(begin[i])
        e = None if (end_mask is not None and end_mask[i]) else int(end[i])
        idx.append(slice(b, e, s))
    return tuple(idx)


def _mask(ctx: BuildContext, name: str) -> Optional[List[bool]]:
    v = ctx.const(name, None)
    return None if v is None else [bool(b) for b in np.asarray(v).reshape(-1)]


def _slice_params(ctx: BuildContext):
    stride = ctx.ints("stride", None)
    masks = (_mask(ctx, "begin_mask"), _mask(ctx, "end_mask"), _mask(ctx, "squeeze_mask"))
    return stride, masks


@register("slice_by_index")
def _slice_by_index(ctx: BuildContext) -> Kernel:
    stride, (bm, em, sm) = _slice_params(ctx)
    if ctx.is_const("begin") and ctx.is_const("end"):
        begin, end = ctx.ints("begin"), ctx.ints("end")
        cache: dict = {}

        def run(x):
            idx = cache.get(x.shape)
            if idx is None:
                idx = cache[x.shape] = slice_index(x.shape, begin, end, stride, bm, em, sm)
            return x[idx]

        return Kernel(run, [ctx.ref("x")], exact=True)

    def run_dyn(x, b, e):
        return x[slice_index(x.shape, np.asarray(b).reshape(-1).tolist(),
                             np.asarray(e).reshape(-1).tolist(), stride, bm, em, sm)]

    return Kernel(run_dyn, [ctx.ref("x"), ctx.ref("begin"), ctx.ref("end")], exact=True)


@register("slice_by_size")
def _slice_by_size(ctx: BuildContext) -> Kernel:
    def run(x, b, s):
        idx = []
        for i, (bi, si) in enumerate(zip(np.asarray(b).reshape(-1), np.asarray(s).reshape(-1))):
            bi = int(bi) % x.shape[i] if x.shape[i] else 0
            idx.append(slice(bi, None if si == -1 else bi + int(si)))
        return x[tuple(idx)]

    return Kernel(run, [ctx.ref("x"), ctx.ref("begin"), ctx.ref("size")], exact=True)


@register("slice_update")
def _slice_update(ctx: BuildContext) -> Kernel:
    stride, (bm, em, sm) = _slice_params(ctx)
    static = ctx.is_const("begin") and ctx.is_const("end")
    begin = ctx.ints("begin") if static else None
    end = ctx.ints("end") if static else None

    def run(x, update, *be, inplace=False):
        if static:
            b, e = begin, end
        else:
            b, e = np.asarray(be[0]).reshape(-1).tolist(), np.asarray(be[1]).reshape(-1).tolist()
        idx = slice_index(x.shape, b, e, stride, bm, em, sm)
        out = x if inplace else x.copy()
        target = out[idx]
        if np.shape(update) != np.shape(target):
            if np.size(update) != np.size(target):
                raise ValueError(f"update of shape {list(np.shape(update))} does not fit the slice "
                                 f"of shape {list(np.shape(target))}")
            update = np.reshape(update, np.shape(target))
        out[idx] = update
        return out

    args = [ctx.ref("x"), ctx.ref("update")]
    if not static:
        args += [ctx.ref("begin"), ctx.ref("end")]
    return Kernel(run, args, exact=True, inplace_arg=0)


def gather(x: np.ndarray, indices: np.ndarray, axis: int, batch_dims: int) -> np.ndarray:
    axis %= x.ndim
    if batch_dims == 0:
        return np.take(x, indices, axis=axis)
    lead = x.shape[:batch_dims]
    if tuple(indices.shape[:batch_dims]) != tuple(lead):
        raise IndexError(f"batch dims of x {list(lead)} and indices {list(indices.shape[:batch_dims])} differ")
    xb = x.reshape((-1,) + x.shape[batch_dims:])
    ib = indices.reshape((-1,) + indices.shape[batch_dims:])
    parts = [np.take(xb[i], ib[i], axis=axis - batch_dims) for i in range(xb.shape[0])]
    out = np.stack(parts, axis=0)
    return out.reshape(tuple(lead) + out.shape[1:])


@register("gather")
def _gather(ctx: BuildContext) -> Kernel:
    axis = int(ctx.scalar("axis", 0))
    bd = int(ctx.scalar("batch_dims", 0))
    st = ctx.stored("x")
    if st is not None and bd == 0 and axis % len(st.shape) == 0:
        # Row lookups (embeddings) straight from the stored table: only the rows used are decoded.
        rows = st.shape[0]

        def run_rows(i):
            idx = np.asarray(i).astype(np.intp, copy=False)
            if idx.size and (idx.min() < -rows or idx.max() >= rows):
                raise IndexError(f"index out of range for {rows} rows")
            idx = np.where(idx < 0, idx + rows, idx)
            if st.storage[0] == "fp16":
                return np.take(st.storage[1], idx, axis=0).astype(np.float32)
            pw = st.packed()
            flat = [pw.decode(int(j), int(j) + 1) for j in idx.reshape(-1)]
            out = np.concatenate(flat) if flat else np.zeros((0, pw.cols), np.float32)
            return out.reshape(idx.shape + tuple(st.shape[1:]))

        return Kernel(run_rows, [ctx.ref("indices")], exact=True)
    return Kernel(lambda x, i: gather(x, np.asarray(i).astype(np.intp, copy=False), axis, bd),
                  [ctx.ref("x"), ctx.ref("indices")], exact=True)


@register("gather_along_axis")
def _gather_along_axis(ctx: BuildContext) -> Kernel:
    axis = int(ctx.scalar("axis", 0))

    def run(x, i):
        i = np.asarray(i).astype(np.intp)
        n = x.shape[axis]
        if i.size and (i.min() < -n or i.max() >= n):
            raise IndexError(f"index out of range [-{n}, {n}) along axis {axis}")
        return np.take_along_axis(x, np.where(i < 0, i + n, i), axis=axis)

    return Kernel(run, [ctx.ref("x"), ctx.ref("indices")], exact=True)


@register("concat")
def _concat(ctx: BuildContext) -> Kernel:
    axis = int(ctx.scalar("axis"))
    interleave = bool(ctx.scalar("interleave", False))

    def run(*vals):
        if not interleave:
            return np.concatenate(vals, axis=axis)
        # interleave: v0[0], v1[0], ..., v0[1], v1[1], ... along the axis
        ax = axis % vals[0].ndim
        st = np.stack(vals, axis=ax + 1)
        shape = list(vals[0].shape)
        shape[ax] *= len(vals)
        return st.reshape(shape)

    return Kernel(run, ctx.refs("values"), exact=True)


@register("stack")
def _stack(ctx: BuildContext) -> Kernel:
    axis = int(ctx.scalar("axis"))
    return Kernel(lambda *v: np.stack(v, axis=axis), ctx.refs("values"), exact=True)


@register("split")
def _split(ctx: BuildContext) -> Kernel:
    axis = int(ctx.scalar("axis"))
    sizes = ctx.ints("split_sizes", None)
    n = int(ctx.scalar("num_splits", len(ctx.op.outputs)))

    def run(x):
        if sizes is not None:
            cuts = np.cumsum(sizes)[:-1]
            return tuple(np.split(x, cuts, axis=axis))
        return tuple(np.split(x, n, axis=axis))

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("tile")
def _tile(ctx: BuildContext) -> Kernel:
    if ctx.is_const("reps"):
        reps = tuple(ctx.ints("reps"))
        return Kernel(lambda x: np.tile(x, reps), [ctx.ref("x")], exact=True)

    def run(x, r):
        reps = [int(v) for v in np.asarray(r).reshape(-1)]
        if len(reps) != x.ndim or min(reps, default=1) < 0:
            raise ValueError(f"{ctx.label}: reps {reps} for an input of rank {x.ndim}")
        return np.tile(x, reps)

    return Kernel(run, [ctx.ref("x"), ctx.ref("reps")], exact=True)


@register("band_part")
def _band_part(ctx: BuildContext) -> Kernel:
    lower = int(ctx.scalar("lower", -1))
    upper = int(ctx.scalar("upper", -1))

    def run(x):
        m, n = x.shape[-2], x.shape[-1]
        d = np.arange(m)[:, None] - np.arange(n)[None, :]  # row - col
        keep = np.ones((m, n), dtype=bool)
        if lower >= 0:
            keep &= d <= lower
        if upper >= 0:
            keep &= -d <= upper
        return np.where(keep, x, np.zeros((), dtype=x.dtype))

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("fill")
def _fill(ctx: BuildContext) -> Kernel:
    value = ctx.scalar("value", 0.0)
    return Kernel(lambda s: np.full(np.asarray(s).reshape(-1).tolist(), value), [ctx.ref("shape")])


@register("fill_like")
def _fill_like(ctx: BuildContext) -> Kernel:
    value = ctx.scalar("value", 0.0)
    return Kernel(lambda r: np.full(np.shape(r), value), [ctx.ref("ref_tensor")])


@register("range_1d")
def _range_1d(ctx: BuildContext) -> Kernel:
    return Kernel(lambda e, s, st: np.arange(np.asarray(s).item(), np.asarray(e).item(), np.asarray(st).item()),
                  [ctx.ref("end"), ctx.ref("start"), ctx.ref("step")])


@register("shape")
def _shape(ctx: BuildContext) -> Kernel:
    return Kernel(lambda x: np.asarray(x.shape, dtype=np.int32), [ctx.ref("x")], exact=True)


@register("pad")
def _pad(ctx: BuildContext) -> Kernel:
    pad = ctx.ints("pad")
    mode = str(ctx.scalar("mode", "constant"))
    cval = ctx.scalar("constant_val", 0.0)
    modes = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}
    if mode not in modes:
        raise ctx.unsupported(f"pad mode {mode!r}")

    def run(x):
        k = len(pad) // 2
        widths = [(0, 0)] * (x.ndim - k) + [(pad[2 * i], pad[2 * i + 1]) for i in range(k)]
        if mode == "constant":
            return np.pad(x, widths, mode="constant", constant_values=cval)
        return np.pad(x, widths, mode=modes[mode])

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("topk")
def _topk(ctx: BuildContext) -> Kernel:
    k = int(ctx.scalar("k", 1))
    axis = int(ctx.scalar("axis", -1))
    ascending = bool(ctx.scalar("ascending", False))
    # iOS16+: return_indices=False makes the op return the values only (one output).
    with_indices = bool(ctx.scalar("return_indices", True))

    def run(x):
        order = np.argsort(x if ascending else -x, axis=axis, kind="stable")
        idx = np.take(order, np.arange(k), axis=axis)
        values = np.take_along_axis(x, idx, axis=axis)
        return (values, idx.astype(np.int32)) if with_indices else values

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("cumsum")
def _cumsum(ctx: BuildContext) -> Kernel:
    axis = int(ctx.scalar("axis", 0))
    exclusive = bool(ctx.scalar("exclusive", False))
    reverse = bool(ctx.scalar("reverse", False))

    def run(x):
        y = np.flip(x, axis) if reverse else x
        c = np.cumsum(y, axis=axis)
        if exclusive:
            # Shifted by one, not c - y: a small term next to a large one would be lost to cancellation.
            c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)),
                                np.take(c, np.arange(c.shape[axis] - 1), axis=axis)], axis=axis)
        return np.flip(c, axis) if reverse else c

    return Kernel(run, [ctx.ref("x")])
