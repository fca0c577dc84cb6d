"""Matrix ops on BLAS float32: matmul, linear, conv (1x1 as a plain matmul), attention."""
from __future__ import annotations

import math
from typing import Any, List, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from anemll_fast.mil.ops.reduction import softmax
from anemll_fast.mil.ops.registry import BuildContext, Kernel, register


# Batched products: the native kernels tile W · X with register blocks (AVX2/FMA or NEON), decoding
# the stored weight chunk by chunk into L1 and packing X once per call: faster than BLAS over a
# decoded copy (no second pack, no fp32 block that spills L2). Only a CPU without a vector path
# ("portable") decodes row blocks into a scratch and multiplies through BLAS instead, from this many
# positions on (where BLAS's GEMM beats the per-row kernel).
_BLAS_FROM = 8
_DECODE_ROWS = 256
try:  # packed weights exist only with the native extension; this asks which path it runs
    from anemll_fast._kernels import kernel_isa
    _NATIVE_GEMM = kernel_isa() != "portable"
except ImportError:  # pragma: no cover - a build without the extension
    _NATIVE_GEMM = False


def packed_times(pw: Any, x2: np.ndarray) -> np.ndarray:
    """W · x2 for a PackedWeight W [rows, cols] and x2 [cols, n] float32 -> [rows, n]."""
    n = x2.shape[1]
    if n < _BLAS_FROM or _NATIVE_GEMM:
        return pw.matmul(x2)
    x2 = np.ascontiguousarray(x2, dtype=np.float32)
    y = np.empty((pw.rows, n), np.float32)
    block = np.empty(min(_DECODE_ROWS, pw.rows) * pw.cols, np.float32)  # one scratch for every block
    for r0 in range(0, pw.rows, _DECODE_ROWS):
        r1 = min(r0 + _DECODE_ROWS, pw.rows)
        np.matmul(pw.decode(r0, r1, out=block), x2, out=y[r0:r1])
    return y


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2) if a.ndim >= 2 else a


@register("matmul")
def _matmul(ctx: BuildContext) -> Kernel:
    tx = bool(ctx.scalar("transpose_x", False))
    ty = bool(ctx.scalar("transpose_y", False))
    if ctx.is_const("y"):
        y = np.asarray(ctx.const("y"), dtype=np.float32)
        y = np.ascontiguousarray(_t(y) if ty else y)  # transposed once, at load
        if tx:
            return Kernel(lambda x: np.matmul(_t(x), y), [ctx.ref("x")])
        return Kernel(lambda x: np.matmul(x, y), [ctx.ref("x")])

    def run(x, y):
        return np.matmul(_t(x) if tx else x, _t(y) if ty else y)

    return Kernel(run, [ctx.ref("x"), ctx.ref("y")])


@register("linear")
def _linear(ctx: BuildContext) -> Kernel:
    bias = ctx.const("bias", None)
    bias = None if bias is None else np.asarray(bias, dtype=np.float32)
    st = ctx.stored("weight")
    pw = st.packed() if st is not None and len(st.shape) == 2 else None
    if pw is not None:
        def run_packed(x):
            x2 = x.reshape(-1, x.shape[-1])
            y = packed_times(pw, x2.T).T.reshape(x.shape[:-1] + (pw.rows,))
            return y + bias if bias is not None else y

        return Kernel(run_packed, [ctx.ref("x")])
    if ctx.is_const("weight"):
        wt = np.ascontiguousarray(np.asarray(ctx.const("weight"), dtype=np.float32).T)  # [Din, Dout]

        def run(x):
            y = np.matmul(x.reshape(-1, x.shape[-1]), wt).reshape(x.shape[:-1] + (wt.shape[1],))
            return y + bias if bias is not None else y

        return Kernel(run, [ctx.ref("x")])

    def run_dyn(x, w):
        y = np.matmul(x, _t(w))
        return y + bias if bias is not None else y

    return Kernel(run_dyn, [ctx.ref("x"), ctx.ref("weight")])


def _conv_pads(pad_type: str, pad: List[int], spatial: Tuple[int, ...], kernel: Tuple[int, ...],
               strides: List[int], dilations: List[int]) -> List[Tuple[int, int]]:
    n = len(spatial)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    out = []
    for i in range(n):
        eff = (kernel[i] - 1) * dilations[i] + 1
        o = -(-spatial[i] // strides[i])
        total = max((o - 1) * strides[i] + eff - spatial[i], 0)
        small, big = total // 2, total - total // 2
        out.append((small, big) if pad_type == "same" else (big, small))
    return out


def conv_nd(x: np.ndarray, w: np.ndarray, bias: Any, strides: List[int], pads: List[Tuple[int, int]],
            dilations: List[int], groups: int) -> np.ndarray:
    """Grouped N-d convolution by im2col + matmul. x [N, Cin, *S], w [Cout, Cin/groups, *K]."""
    n_sp = x.ndim - 2
    k = w.shape[2:]
    if any(p for pr in pads for p in pr):
        x = np.pad(x, [(0, 0), (0, 0)] + list(pads))
    eff = tuple((k[i] - 1) * dilations[i] + 1 for i in range(n_sp))
    win = sliding_window_view(x, eff, axis=tuple(range(2, x.ndim)))  # [N, Cin, *O_full, *eff]
    sl = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(
        slice(None, None, d) for d in dilations)
    win = win[sl]  # [N, Cin, *O, *K]
    n, cin = x.shape[:2]
    out_sp = win.shape[2:2 + n_sp]
    cout = w.shape[0]
    cg, og = cin // groups, cout // groups
    outs = []
    for g in range(groups):
        cols = win[:, g * cg:(g + 1) * cg]
        # -> [N, *O, cg, *K] -> [N*prod(O), cg*prod(K)]
        perm = (0,) + tuple(range(2, 2 + n_sp)) + (1,) + tuple(range(2 + n_sp, 2 + 2 * n_sp))
        cols = cols.transpose(perm).reshape(n * int(np.prod(out_sp)), -1)
        wg = w[g * og:(g + 1) * og].reshape(og, -1)
        outs.append(cols @ wg.T)
    y = np.concatenate(outs, axis=1) if groups > 1 else outs[0]  # [N*O, Cout]
    y = y.reshape((n,) + tuple(out_sp) + (cout,))
    y = np.moveaxis(y, -1, 1)
    if bias is not None:
        y = y + bias.reshape((1, cout) + (1,) * n_sp)
    return np.ascontiguousarray(y)


@register("conv")
def _conv(ctx: BuildContext) -> Kernel:
    bias = ctx.const("bias", None)
    bias = None if bias is None else np.asarray(bias, dtype=np.float32)
    groups = int(ctx.scalar("groups", 1))
    pad_type = str(ctx.scalar("pad_type", "valid"))
    if pad_type not in ("valid", "same", "same_lower", "custom"):
        raise ctx.unsupported(f"pad_type {pad_type!r}")
    wconst = ctx.is_const("weight")
    st = ctx.stored("weight")
    n_sp_st = len(st.shape) - 2 if st is not None else -1
    strides0 = ctx.ints("strides", None) or [1] * max(n_sp_st, 0)
    pad0 = ctx.ints("pad", None) or [0] * (2 * max(n_sp_st, 0))
    if st is not None and groups == 1 and n_sp_st >= 0 and all(k == 1 for k in st.shape[2:]) and \
            all(v == 1 for v in strides0) and (pad_type != "custom" or not any(pad0)) and \
            st.packed() is not None:
        # 1x1 conv from the stored (fp16 or palettized) weight: never expanded to float32.
        pw = st.packed()
        b2 = None if bias is None else bias.reshape(-1, 1)

        def run_packed(x):
            n = x.shape[0]
            if n == 1:  # every step of a decoder: no per-item list, no stack
                y = packed_times(pw, x.reshape(x.shape[1], -1))
            else:
                xs = x.reshape(n, x.shape[1], -1)
                y = np.stack([packed_times(pw, xs[i]) for i in range(n)])
            if b2 is not None:
                y += b2
            return y.reshape((n, pw.rows) + x.shape[2:])

        return Kernel(run_packed, [ctx.ref("x")])
    w = np.asarray(ctx.const("weight"), dtype=np.float32) if wconst else None
    rank = w.ndim if w is not None else ctx.in_rank("weight")
    if rank is None:
        raise ctx.unsupported("a weight of unknown rank")
    n_sp = rank - 2
    strides = ctx.ints("strides", None) or [1] * n_sp
    dilations = ctx.ints("dilations", None) or [1] * n_sp
    pad = ctx.ints("pad", None) or [0] * (2 * n_sp)

    pointwise = (w is not None and groups == 1 and all(s == 1 for s in w.shape[2:])
                 and all(s == 1 for s in strides) and (pad_type != "custom" or not any(pad)))
    if pointwise:
        # 1x1 conv = W[Cout, Cin] @ X[Cin, positions]: one BLAS call per batch item.
        w2 = np.ascontiguousarray(w.reshape(w.shape[0], w.shape[1]))
        b2 = None if bias is None else bias.reshape(-1, 1)

        def run_pw(x):
            n = x.shape[0]
            xs = x.reshape(n, x.shape[1], -1)
            y = np.matmul(w2, xs[0])[None] if n == 1 else np.matmul(w2, xs)
            if b2 is not None:
                y += b2
            return y.reshape((n, w2.shape[0]) + x.shape[2:])

        return Kernel(run_pw, [ctx.ref("x")])

    def run(x, *wdyn):
        ww = w if w is not None else np.asarray(wdyn[0], dtype=np.float32)
        pads = _conv_pads(pad_type, pad, x.shape[2:], ww.shape[2:], strides, dilations)
        return conv_nd(x, ww, bias, strides, pads, dilations, groups)

    args = [ctx.ref("x")] + ([] if wconst else [ctx.ref("weight")])
    return Kernel(run, args)


@register("conv_quantized")
def _conv_quantized(ctx: BuildContext) -> Kernel:
    """conv over a weight given quantized: linear (W * scale + bias) or lut (W indexes quant_scale)."""
    kind = str(ctx.scalar("quantization_type"))
    wq = np.asarray(ctx.const("weight"))
    scale = np.asarray(ctx.const("quant_scale"), np.float32)
    qbias = np.asarray(ctx.const("quant_bias"), np.float32)
    if kind == "linear":
        shape = [-1] + [1] * (wq.ndim - 1) if scale.size > 1 else [1] * wq.ndim
        w = wq.astype(np.float32) * scale.reshape(shape) + qbias.reshape(shape if qbias.size > 1 else [1] * wq.ndim)
    elif kind == "lut":
        w = scale.reshape(-1)[wq.astype(np.intp)]
    else:
        raise ctx.bad(f"quantization_type {kind!r} (linear or lut)")
    bias = ctx.const("bias", None)
    bias = None if bias is None else np.asarray(bias, dtype=np.float32)
    groups = int(ctx.scalar("groups", 1))
    pad_type = str(ctx.scalar("pad_type", "valid"))
    n_sp = w.ndim - 2
    strides = ctx.ints("strides", None) or [1] * n_sp
    dilations = ctx.ints("dilations", None) or [1] * n_sp
    pad = ctx.ints("pad", None) or [0] * (2 * n_sp)

    def run(x):
        pads = _conv_pads(pad_type, pad, x.shape[2:], w.shape[2:], strides, dilations)
        return conv_nd(x, w, bias, strides, pads, dilations, groups)

    return Kernel(run, [ctx.ref("x")])


@register("scaled_dot_product_attention")
def _sdpa(ctx: BuildContext) -> Kernel:
    has_mask = ctx.has("attn_mask")
    mask_bool = has_mask and ctx.in_dtype("attn_mask") == "bool"
    scale_given = ctx.has("scale")
    scale_c = float(ctx.scalar("scale")) if scale_given else None

    def run(q, k, v, *m):
        scale = scale_c if scale_c is not None else 1.0 / math.sqrt(q.shape[-1])
        s = np.matmul(q, np.swapaxes(k, -1, -2)) * np.float32(scale)
        if m:
            mask = m[0]
            s = np.where(mask, s, -np.inf) if mask_bool else s + mask
        return np.matmul(softmax(s, -1), v)

    args = [ctx.ref("query"), ctx.ref("key"), ctx.ref("value")]
    if has_mask:
        args.append(ctx.ref("attn_mask"))
    return Kernel(run, args)


@register("einsum")
def _einsum(ctx: BuildContext) -> Kernel:
    eq = str(ctx.scalar("equation")).replace(" ", "")
    refs = ctx.refs("values")
    if len(refs) != 2 or "->" not in eq:
        raise ctx.bad(f"einsum takes two values and an explicit equation (got {len(refs)}, {eq!r})")
    try:
        np.einsum(eq, *[np.zeros([1] * len(t)) for t in eq.split("->")[0].split(",")])
    except ValueError as e:
        raise ctx.bad(f"equation {eq!r}: {e}") from None
    return Kernel(lambda a, b: np.einsum(eq, a, b, optimize=True), refs)


@register("conv_transpose")
def _conv_transpose(ctx: BuildContext) -> Kernel:
    w = np.asarray(ctx.const("weight"), dtype=np.float32)  # [Cin, Cout/groups, *K]
    bias = ctx.const("bias", None)
    bias = None if bias is None else np.asarray(bias, dtype=np.float32)
    groups = int(ctx.scalar("groups", 1))
    n_sp = w.ndim - 2
    strides = ctx.ints("strides", None) or [1] * n_sp
    dilations = ctx.ints("dilations", None) or [1] * n_sp
    pad = ctx.ints("pad", None) or [0] * (2 * n_sp)
    pad_type = str(ctx.scalar("pad_type", "valid"))
    out_shape = ctx.ints("output_shape", None)
    if pad_type not in ("valid", "same", "custom"):
        raise ctx.unsupported(f"pad_type {pad_type!r}")
    if w.shape[0] % groups:
        raise ctx.bad(f"{w.shape[0]} input channels are not divisible by groups {groups}")
    k = w.shape[2:]

    def run(x):
        if x.ndim != n_sp + 2 or x.shape[1] != w.shape[0]:
            raise ValueError(f"{ctx.label}: input {list(x.shape)} for weight {list(w.shape)}")
        n, cin = x.shape[:2]
        sp = x.shape[2:]
        full = [(sp[i] - 1) * strides[i] + (k[i] - 1) * dilations[i] + 1 for i in range(n_sp)]
        cg, og = cin // groups, w.shape[1]
        y = np.zeros((n, og * groups) + tuple(full), np.float32)
        # every input position scatters its kernel into the output: one matmul per kernel tap
        for tap in np.ndindex(*k):
            dst = tuple(slice(tap[i] * dilations[i], tap[i] * dilations[i] + (sp[i] - 1) * strides[i] + 1,
                              strides[i]) for i in range(n_sp))
            for g in range(groups):
                wg = w[(slice(g * cg, (g + 1) * cg), slice(None)) + tap]  # [cg, og]
                contrib = np.einsum("nc...,co->no...", x[:, g * cg:(g + 1) * cg], wg)
                y[(slice(None), slice(g * og, (g + 1) * og)) + dst] += contrib
        sl = []
        for i in range(n_sp):
            if out_shape is not None:
                size = out_shape[2 + i] if len(out_shape) == n_sp + 2 else out_shape[i]
                before = pad[2 * i] if pad_type == "custom" else max(full[i] - size, 0) // 2
            elif pad_type == "custom":
                before, size = pad[2 * i], full[i] - pad[2 * i] - pad[2 * i + 1]
            elif pad_type == "same":
                size = sp[i] * strides[i]
                before = max(full[i] - size, 0) // 2
            else:
                before, size = 0, full[i]
            if before + size > full[i]:  # output_shape asks for more than the kernel covers
                y = np.pad(y, [(0, 0)] * (2 + i) + [(0, before + size - full[i])] + [(0, 0)] * (n_sp - 1 - i))
            sl.append(slice(before, before + size))
        y = y[(slice(None), slice(None)) + tuple(sl)]
        if bias is not None:
            y = y + bias.reshape((1, -1) + (1,) * n_sp)
        return np.ascontiguousarray(y)

    return Kernel(run, [ctx.ref("x")])
