"""Image-style ops over [N, C, *spatial]: pooling, resizing, cropping, resampling, block moves."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from anemll_fast.mil.ops.registry import BuildContext, Kernel, register


def _rank4(ctx: BuildContext, x: np.ndarray) -> None:
    if x.ndim != 4:
        raise ValueError(f"{ctx.label}: input must have rank 4 (got shape {list(x.shape)})")


# -- block moves between depth, space and batch (NCHW)

@register("depth_to_space")
def _depth_to_space(ctx: BuildContext) -> Kernel:
    b = int(ctx.scalar("block_size"))

    def run(x):
        _rank4(ctx, x)
        n, c, h, w = x.shape
        if c % (b * b):
            raise ValueError(f"{ctx.label}: {c} channels are not divisible by block_size^2 = {b * b}")
        # DCR order (TensorFlow's): the block offset is the outer part of the channel index.
        y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
        return y.reshape(n, c // (b * b), h * b, w * b)

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("space_to_depth")
def _space_to_depth(ctx: BuildContext) -> Kernel:
    b = int(ctx.scalar("block_size"))

    def run(x):
        _rank4(ctx, x)
        n, c, h, w = x.shape
        if h % b or w % b:
            raise ValueError(f"{ctx.label}: spatial size {h}x{w} is not divisible by block_size {b}")
        y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * b * b, h // b, w // b)

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("pixel_shuffle")
def _pixel_shuffle(ctx: BuildContext) -> Kernel:
    f = int(ctx.scalar("upscale_factor"))

    def run(x):
        _rank4(ctx, x)
        n, c, h, w = x.shape
        if c % (f * f):
            raise ValueError(f"{ctx.label}: {c} channels are not divisible by upscale_factor^2 = {f * f}")
        # CRD order (PyTorch's): the block offset is the inner part of the channel index.
        y = x.reshape(n, c // (f * f), f, f, h, w).transpose(0, 1, 4, 2, 5, 3)
        return y.reshape(n, c // (f * f), h * f, w * f)

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("pixel_unshuffle")
def _pixel_unshuffle(ctx: BuildContext) -> Kernel:
    f = int(ctx.scalar("downscale_factor"))

    def run(x):
        _rank4(ctx, x)
        n, c, h, w = x.shape
        if h % f or w % f:
            raise ValueError(f"{ctx.label}: spatial size {h}x{w} is not divisible by downscale_factor {f}")
        y = x.reshape(n, c, h // f, f, w // f, f).transpose(0, 1, 3, 5, 2, 4)
        return y.reshape(n, c * f * f, h // f, w // f)

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("space_to_batch")
def _space_to_batch(ctx: BuildContext) -> Kernel:
    bh, bw = ctx.ints("block_shape")
    (pt, pb), (pl, pr) = np.asarray(ctx.const("paddings")).astype(int).reshape(2, 2).tolist()

    def run(x):
        _rank4(ctx, x)
        xp = np.pad(x, [(0, 0), (0, 0), (pt, pb), (pl, pr)])
        n, c, h, w = xp.shape
        if h % bh or w % bw:
            raise ValueError(f"{ctx.label}: padded size {h}x{w} is not divisible by block {bh}x{bw}")
        # TensorFlow's order: the block offset is the outer part of the new batch index.
        y = xp.reshape(n, c, h // bh, bh, w // bw, bw).transpose(3, 5, 0, 1, 2, 4)
        return y.reshape(bh * bw * n, c, h // bh, w // bw)

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("batch_to_space")
def _batch_to_space(ctx: BuildContext) -> Kernel:
    bh, bw = ctx.ints("block_shape")
    (ct, cb), (cl, cr) = np.asarray(ctx.const("crops")).astype(int).reshape(2, 2).tolist()

    def run(x):
        _rank4(ctx, x)
        nb, c, h, w = x.shape
        if nb % (bh * bw):
            raise ValueError(f"{ctx.label}: batch {nb} is not divisible by block {bh}x{bw}")
        n = nb // (bh * bw)
        y = x.reshape(bh, bw, n, c, h, w).transpose(2, 3, 4, 0, 5, 1).reshape(n, c, h * bh, w * bw)
        return y[:, :, ct:h * bh - cb, cl:w * bw - cr]

    return Kernel(run, [ctx.ref("x")], exact=True)


# -- pooling

def _pool_pads(ctx: BuildContext, spatial: Sequence[int], kernel: Sequence[int],
               strides: Sequence[int], pad_type: str, pad: Sequence[int],
               ceil_mode: bool) -> Tuple[List[Tuple[int, int]], List[int]]:
    """(padding per spatial dim, output size per spatial dim) as the MIL pooling docs define them."""
    n = len(spatial)
    if pad_type == "valid":
        pads = [(0, 0)] * n
    elif pad_type == "custom":
        pads = [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    elif pad_type in ("same", "same_lower"):
        pads = []
        for i in range(n):
            out = -(-spatial[i] // strides[i])
            total = max((out - 1) * strides[i] + kernel[i] - spatial[i], 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if pad_type == "same" else (big, small))
    else:
        raise ctx.bad(f"pad_type {pad_type!r}")
    outs = []
    for i in range(n):
        span = spatial[i] + pads[i][0] + pads[i][1] - kernel[i]
        if span < 0:
            raise ValueError(f"{ctx.label}: kernel {kernel[i]} larger than padded input {span + kernel[i]}")
        if ceil_mode and pad_type in ("valid", "custom"):
            o = -(-span // strides[i]) + 1
            if (o - 1) * strides[i] >= spatial[i] + pads[i][0] and pads[i][0] + pads[i][1] > 0:
                o -= 1
        else:
            o = span // strides[i] + 1
        outs.append(o)
    return pads, outs


def _pool(ctx: BuildContext, kind: str) -> Kernel:
    kernel = ctx.ints("kernel_sizes")
    n_sp = len(kernel)
    strides = ctx.ints("strides", None) or [1] * n_sp
    pad_type = str(ctx.scalar("pad_type", "valid")).lower()
    pad = ctx.ints("pad", None) or [0] * (2 * n_sp)
    ceil_mode = bool(ctx.scalar("ceil_mode", False))
    exclude = bool(ctx.scalar("exclude_padding_from_average", False))

    def run(x):
        if x.ndim != n_sp + 2:
            raise ValueError(f"{ctx.label}: {n_sp} kernel sizes for an input of rank {x.ndim}")
        pads, outs = _pool_pads(ctx, x.shape[2:], kernel, strides, pad_type, pad, ceil_mode)
        # room for ceil_mode's last partial window, treated as padding
        extra = [max((outs[i] - 1) * strides[i] + kernel[i] - (x.shape[2 + i] + sum(pads[i])), 0)
                 for i in range(n_sp)]
        widths = [(0, 0), (0, 0)] + [(pads[i][0], pads[i][1] + extra[i]) for i in range(n_sp)]
        fill = -np.inf if kind == "max" else 0.0
        xp = np.pad(x, widths, constant_values=fill)
        axes = tuple(range(2, 2 + n_sp))
        win = sliding_window_view(xp, kernel, axis=axes)
        win = win[(slice(None), slice(None)) + tuple(slice(0, outs[i] * strides[i], strides[i])
                                                     for i in range(n_sp))]
        red = tuple(range(2 + n_sp, 2 + 2 * n_sp))
        if kind == "max":
            return win.max(axis=red)
        if kind == "l2":
            return np.sqrt((win * win).sum(axis=red))
        total = win.sum(axis=red)
        if not exclude:
            return total / np.float32(np.prod(kernel))
        ones = np.pad(np.ones(x.shape[2:], np.float32), widths[2:])
        cwin = sliding_window_view(ones, kernel)
        counts = cwin[tuple(slice(0, outs[i] * strides[i], strides[i]) for i in range(n_sp))].sum(
            axis=tuple(range(n_sp, 2 * n_sp)))
        return total / counts

    return Kernel(run, [ctx.ref("x")])


@register("avg_pool")
def _avg_pool(ctx: BuildContext) -> Kernel:
    return _pool(ctx, "avg")


@register("max_pool")
def _max_pool(ctx: BuildContext) -> Kernel:
    return _pool(ctx, "max")


@register("l2_pool")
def _l2_pool(ctx: BuildContext) -> Kernel:
    return _pool(ctx, "l2")


# -- resizing: a source coordinate per output index, then nearest or linear sampling

def grid(mode: str, n_in: int, n_out: int) -> np.ndarray:
    """Source coordinates of each output index, per resize_bilinear's sampling modes."""
    i = np.arange(n_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if n_out == 1:
            pts = np.full(1, (n_in - 1) / 2.0 if mode == "ALIGN_CORNERS" else 0.0)
        else:
            pts = i * (n_in - 1) / (n_out - 1)
    elif mode == "DEFAULT":
        pts = i * ((n_in - n_in / n_out) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        pts = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        s = n_in / n_out
        pts = i * s + 0.5 * s - 0.5
    else:
        raise ValueError(f"sampling_mode {mode!r}")
    return np.clip(pts, 0, n_in - 1)


def _linear_along(x: np.ndarray, axis: int, pts: np.ndarray) -> np.ndarray:
    lo = np.floor(pts).astype(np.intp)
    hi = np.minimum(lo + 1, x.shape[axis] - 1)
    frac = (pts - lo).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = -1
    frac = frac.reshape(shape)
    return np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac


def bilinear(x: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    return _linear_along(_linear_along(x, x.ndim - 2, ys), x.ndim - 1, xs)


def _at_least_rank3(ctx: BuildContext, x: np.ndarray) -> None:
    if x.ndim < 3:
        raise ValueError(f"{ctx.label}: input must have rank >= 3 (got shape {list(x.shape)})")


@register("upsample_nearest_neighbor")
def _upsample_nn(ctx: BuildContext) -> Kernel:
    sh = float(ctx.scalar("scale_factor_height", 1))
    sw = float(ctx.scalar("scale_factor_width", 1))

    def run(x):
        _at_least_rank3(ctx, x)
        h, w = x.shape[-2:]
        ho, wo = int(np.floor(h * sh)), int(np.floor(w * sw))
        ys = np.minimum(np.floor(np.arange(ho) / sh).astype(np.intp), h - 1)
        xs = np.minimum(np.floor(np.arange(wo) / sw).astype(np.intp), w - 1)
        return np.take(np.take(x, ys, axis=-2), xs, axis=-1)

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("upsample_bilinear")
def _upsample_bilinear(ctx: BuildContext) -> Kernel:
    sh = float(ctx.scalar("scale_factor_height", 1))
    sw = float(ctx.scalar("scale_factor_width", 1))
    align = bool(ctx.scalar("align_corners", True))
    half = bool(ctx.scalar("half_pixel_centers", not align))
    if align and half:
        raise ctx.bad("align_corners and half_pixel_centers cannot both be true")
    # align_corners: STRICT_ALIGN_CORNERS grid; half pixel centers: UNALIGN_CORNERS; neither:
    # TensorFlow's legacy (asymmetric) grid, i * in / out.
    mode = "STRICT_ALIGN_CORNERS" if align else ("UNALIGN_CORNERS" if half else None)

    def pts(n_in, n_out):
        if mode is None:
            return np.clip(np.arange(n_out) * (n_in / n_out), 0, n_in - 1)
        return grid(mode, n_in, n_out)

    def run(x):
        _at_least_rank3(ctx, x)
        h, w = x.shape[-2:]
        ho, wo = int(np.floor(h * sh)), int(np.floor(w * sw))
        return bilinear(x, pts(h, ho), pts(w, wo))

    return Kernel(run, [ctx.ref("x")])


@register("resize_bilinear")
def _resize_bilinear(ctx: BuildContext) -> Kernel:
    ho = int(ctx.scalar("target_size_height", 1))
    wo = int(ctx.scalar("target_size_width", 1))
    mode = str(ctx.scalar("sampling_mode", "DEFAULT")).upper()
    try:
        grid(mode, 2, 2)
    except ValueError as e:
        raise ctx.bad(str(e)) from None

    def run(x):
        _at_least_rank3(ctx, x)
        h, w = x.shape[-2:]
        return bilinear(x, grid(mode, h, ho), grid(mode, w, wo))

    return Kernel(run, [ctx.ref("x")])


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(np.floor(np.arange(n_out) * (n_in / n_out)).astype(np.intp), n_in - 1)


@register("resize_nearest_neighbor")
def _resize_nn(ctx: BuildContext) -> Kernel:
    ho = int(ctx.scalar("target_size_height"))
    wo = int(ctx.scalar("target_size_width"))

    def run(x):
        _at_least_rank3(ctx, x)
        h, w = x.shape[-2:]
        return np.take(np.take(x, _nearest_index(h, ho), axis=-2), _nearest_index(w, wo), axis=-1)

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("resize")
def _resize(ctx: BuildContext) -> Kernel:
    dims = int(ctx.scalar("resized_dims"))
    method = str(ctx.scalar("interpolation_mode", "LINEAR")).upper()
    mode = str(ctx.scalar("sampling_mode", "DEFAULT")).upper()
    if method not in ("LINEAR", "NEAREST_NEIGHBOR"):
        raise ctx.bad(f"interpolation_mode {method!r}")
    if dims not in (1, 2):
        raise ctx.unsupported(f"resized_dims {dims}")

    def run(x, shape):
        shape = [int(s) for s in np.asarray(shape).reshape(-1)]
        if len(shape) > x.ndim or dims > len(shape):
            raise ValueError(f"{ctx.label}: shape {shape} for an input of rank {x.ndim} and "
                             f"resized_dims {dims}")
        target = [s if s > 0 else x.shape[x.ndim - len(shape) + i] for i, s in enumerate(shape)][-dims:]
        y = x
        for k, n_out in enumerate(target):
            axis = x.ndim - dims + k
            n_in = x.shape[axis]
            if method == "NEAREST_NEIGHBOR":
                y = np.take(y, _nearest_index(n_in, n_out), axis=axis)
            else:
                y = _linear_along(y, axis, grid(mode, n_in, n_out))
        return y

    return Kernel(run, [ctx.ref("x"), ctx.ref("shape")])


@register("crop")
def _crop(ctx: BuildContext) -> Kernel:
    ch = ctx.ints("crop_height")
    cw = ctx.ints("crop_width")

    def run(x):
        _at_least_rank3(ctx, x)
        h, w = x.shape[-2:]
        if ch[0] + ch[1] > h or cw[0] + cw[1] > w:
            raise ValueError(f"{ctx.label}: crops {ch}, {cw} exceed the input's {h}x{w}")
        return x[..., ch[0]:h - ch[1], cw[0]:w - cw[1]]

    return Kernel(run, [ctx.ref("x")], exact=True)


def _boxes_hw(boxes: np.ndarray, mode: str) -> np.ndarray:
    """Boxes as [h_start, w_start, h_end, w_end] from any box_coordinate_mode."""
    b = boxes.astype(np.float64)
    if mode == "CORNERS_HEIGHT_FIRST":
        return b
    if mode == "CORNERS_WIDTH_FIRST":
        return b[:, [1, 0, 3, 2]]
    if mode in ("CENTER_SIZE_HEIGHT_FIRST", "CENTER_SIZE_WIDTH_FIRST"):
        if mode == "CENTER_SIZE_WIDTH_FIRST":
            b = b[:, [1, 0, 3, 2]]
        ch, cw, bh, bw = b.T
        return np.stack([ch - bh / 2, cw - bw / 2, ch + bh / 2, cw + bw / 2], axis=1)
    raise ValueError(f"box_coordinate_mode {mode!r}")


@register("crop_resize")
def _crop_resize(ctx: BuildContext) -> Kernel:
    th = int(ctx.scalar("target_height", 1))
    tw = int(ctx.scalar("target_width", 1))
    normalized = bool(ctx.scalar("normalized_coordinates", False))
    scale = float(ctx.scalar("spatial_scale", 1.0))
    box_mode = str(ctx.scalar("box_coordinate_mode", "CORNERS_HEIGHT_FIRST")).upper()
    mode = str(ctx.scalar("sampling_mode", "DEFAULT")).upper()
    pad_value = np.float32(ctx.scalar("pad_value", 0.0))
    iOS17 = ctx.has("boxes")  # iOS17 form: boxes [N, 4] + box_indices, output [N, C, th, tw]

    def sample(img: np.ndarray, box: np.ndarray) -> np.ndarray:
        h, w = img.shape[-2:]
        y0, x0, y1, x1 = box * scale
        if normalized:
            y0, y1, x0, x1 = y0 * (h - 1), y1 * (h - 1), x0 * (w - 1), x1 * (w - 1)
        ys = y0 + _span(mode, y0, y1, th)
        xs = x0 + _span(mode, x0, x1, tw)
        inside_y = (ys >= 0) & (ys <= h - 1)
        inside_x = (xs >= 0) & (xs <= w - 1)
        out = bilinear(img, np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1))
        keep = inside_y[:, None] & inside_x[None, :]
        return np.where(keep, out, pad_value)

    def run(x, boxes, *idx):
        _rank4(ctx, x)
        if iOS17:
            b = _boxes_hw(np.asarray(boxes).reshape(-1, 4), box_mode)
            ind = (np.asarray(idx[0]).astype(np.intp).reshape(-1) if idx else np.arange(b.shape[0]))
            if np.any(ind < 0) or np.any(ind >= x.shape[0]):
                raise IndexError(f"{ctx.label}: box index out of range for batch {x.shape[0]}")
            return np.stack([sample(x[i], b[k]) for k, i in enumerate(ind)]) if len(ind) else \
                np.zeros((0, x.shape[1], th, tw), np.float32)
        roi = np.asarray(boxes).reshape(np.shape(boxes)[0], -1)
        if roi.shape[1] == 5:
            ind = roi[:, 0].astype(np.intp)
            b = _boxes_hw(roi[:, 1:], box_mode)
            return np.stack([sample(x[i], b[k]) for k, i in enumerate(ind)])[:, None]
        b = _boxes_hw(roi, box_mode)
        return np.stack([np.stack([sample(x[i], b[k]) for i in range(x.shape[0])]) for k in range(len(b))])

    args = [ctx.ref("x"), ctx.ref("boxes" if iOS17 else "roi")]
    if iOS17 and ctx.has("box_indices"):
        args.append(ctx.ref("box_indices"))
    return Kernel(run, args)


def _span(mode: str, a: float, b: float, n: int) -> np.ndarray:
    """Offsets from a box's start of n samples across [a, b], per resize_bilinear's sampling modes."""
    i = np.arange(n, dtype=np.float64)
    length = b - a
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if n == 1:
            return np.full(1, length / 2 if mode == "ALIGN_CORNERS" else 0.0)
        return i * length / (n - 1)
    if mode == "DEFAULT":
        return i * length / n
    if mode == "OFFSET_CORNERS":
        return (i + 0.5) * length / n
    if mode == "UNALIGN_CORNERS":
        return (i + 0.5) * (length + 1) / n - 0.5
    raise ValueError(f"sampling_mode {mode!r}")


# -- resample and affine: sample an image at arbitrary (x, y) points

def _unnormalize(c: np.ndarray, n: int, coordinates_mode: str, align: bool) -> np.ndarray:
    if coordinates_mode == "unnormalized":
        return c
    if coordinates_mode == "normalized_zero_to_one":
        c = c * 2 - 1
    elif coordinates_mode != "normalized_minus_one_to_one":
        raise ValueError(f"coordinates_mode {coordinates_mode!r}")
    if align:
        return (c + 1) / 2 * (n - 1)
    return ((c + 1) * n - 1) / 2


def _pad_index(i: np.ndarray, n: int, padding_mode: str) -> Tuple[np.ndarray, np.ndarray]:
    """(index inside [0, n), in-image flag) for integer positions, per resample's padding modes."""
    if padding_mode == "constant":
        return np.clip(i, 0, n - 1), (i >= 0) & (i < n)
    if padding_mode == "border":
        return np.clip(i, 0, n - 1), np.ones(i.shape, bool)
    if padding_mode == "reflection":  # mirror without repeating the edge
        if n == 1:
            return np.zeros_like(i), np.ones(i.shape, bool)
        p = 2 * (n - 1)
        m = np.mod(i, p)
        return np.where(m >= n, p - m, m), np.ones(i.shape, bool)
    if padding_mode == "symmetric":  # mirror repeating the edge
        p = 2 * n
        m = np.mod(i, p)
        return np.where(m >= n, p - 1 - m, m), np.ones(i.shape, bool)
    raise ValueError(f"padding_mode {padding_mode!r}")


def sample_image(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, sampling: str, padding: str,
                 pad_value: float) -> np.ndarray:
    """img [C, H, W] sampled at pixel coordinates xs, ys (same shape) -> [C, *xs.shape]."""
    h, w = img.shape[-2:]

    def tap(yi, xi):
        yy, oky = _pad_index(yi, h, padding)
        xx, okx = _pad_index(xi, w, padding)
        v = img[:, yy, xx]
        return np.where(oky & okx, v, np.float32(pad_value))

    if sampling == "nearest":
        return tap(np.floor(ys + 0.5).astype(np.intp), np.floor(xs + 0.5).astype(np.intp))
    if sampling != "bilinear":
        raise ValueError(f"sampling_mode {sampling!r}")
    x0, y0 = np.floor(xs).astype(np.intp), np.floor(ys).astype(np.intp)
    fx, fy = (xs - x0).astype(np.float32), (ys - y0).astype(np.float32)
    return (tap(y0, x0) * (1 - fx) * (1 - fy) + tap(y0, x0 + 1) * fx * (1 - fy)
            + tap(y0 + 1, x0) * (1 - fx) * fy + tap(y0 + 1, x0 + 1) * fx * fy)


def _sampling_params(ctx: BuildContext) -> Tuple[str, str, float, str, bool]:
    sampling = str(ctx.scalar("sampling_mode", "bilinear")).lower()
    padding = str(ctx.scalar("padding_mode", "constant")).lower()
    pad_value = float(ctx.scalar("padding_value", 0.0))
    cmode = str(ctx.scalar("coordinates_mode", "normalized_minus_one_to_one")).lower()
    align = bool(ctx.scalar("align_corners", True))
    if sampling not in ("bilinear", "nearest"):
        raise ctx.bad(f"sampling_mode {sampling!r}")
    if padding not in ("constant", "border", "reflection", "symmetric"):
        raise ctx.bad(f"padding_mode {padding!r}")
    if cmode not in ("unnormalized", "normalized_minus_one_to_one", "normalized_zero_to_one"):
        raise ctx.bad(f"coordinates_mode {cmode!r}")
    return sampling, padding, pad_value, cmode, align


@register("resample")
def _resample(ctx: BuildContext) -> Kernel:
    sampling, padding, pad_value, cmode, align = _sampling_params(ctx)

    def run(x, coords):
        _rank4(ctx, x)
        coords = np.asarray(coords, dtype=np.float64)
        if coords.ndim != 4 or coords.shape[0] != x.shape[0] or coords.shape[-1] != 2:
            raise ValueError(f"{ctx.label}: coordinates of shape {list(coords.shape)} for input "
                             f"{list(x.shape)} (expected [B, H2, W2, 2])")
        h, w = x.shape[-2:]
        out = []
        for b in range(x.shape[0]):
            xs = _unnormalize(coords[b, ..., 0], w, cmode, align)
            ys = _unnormalize(coords[b, ..., 1], h, cmode, align)
            out.append(sample_image(x[b], xs, ys, sampling, padding, pad_value))
        return np.stack(out)

    return Kernel(run, [ctx.ref("x"), ctx.ref("coordinates")])


@register("affine")
def _affine(ctx: BuildContext) -> Kernel:
    sampling, padding, pad_value, cmode, align = _sampling_params(ctx)
    ho = int(ctx.scalar("output_height"))
    wo = int(ctx.scalar("output_width"))

    def run(x, m):
        _rank4(ctx, x)
        m = np.asarray(m, dtype=np.float64).reshape(-1, 6)
        if m.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"{ctx.label}: {m.shape[0]} transforms for a batch of {x.shape[0]}")
        h, w = x.shape[-2:]
        # the output grid in the same coordinate convention as the input's
        gy = _normalized_grid(ho, cmode, align)
        gx = _normalized_grid(wo, cmode, align)
        X, Y = np.meshgrid(gx, gy)
        out = []
        for b in range(x.shape[0]):
            a0, a1, a2, b0, b1, b2 = m[b if m.shape[0] > 1 else 0]
            xs = _unnormalize(a0 * X + a1 * Y + a2, w, cmode, align)
            ys = _unnormalize(b0 * X + b1 * Y + b2, h, cmode, align)
            out.append(sample_image(x[b], xs, ys, sampling, padding, pad_value))
        return np.stack(out)

    return Kernel(run, [ctx.ref("x"), ctx.ref("transform_matrix")])


def _normalized_grid(n: int, cmode: str, align: bool) -> np.ndarray:
    """Output pixel centres expressed in the coordinate mode (the inverse of _unnormalize)."""
    i = np.arange(n, dtype=np.float64)
    if cmode == "unnormalized":
        return i
    if align:
        c = i / max(n - 1, 1) * 2 - 1
    else:
        c = (2 * i + 1) / n - 1
    return (c + 1) / 2 if cmode == "normalized_zero_to_one" else c



# -- non-maximum suppression

def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one center-size box a [4] with boxes b [M, 4] (x, y, width, height)."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    inter = iw * ih
    union = a[2] * a[3] + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@register("non_maximum_suppression")
def _nms(ctx: BuildContext) -> Kernel:
    iou_thr = float(ctx.scalar("iou_threshold"))
    # iOS17 dropped the score threshold and the count output and put the box axis last
    ios17 = not ctx.has("score_threshold")
    score_thr = -np.inf if ios17 else float(ctx.scalar("score_threshold"))
    max_boxes = int(ctx.scalar("max_boxes"))
    per_class = bool(ctx.scalar("per_class_suppression", False))

    def select(boxes: np.ndarray, scores: np.ndarray) -> List[int]:
        """Indices kept, highest score first."""
        if per_class:
            cands = []
            for k in range(scores.shape[1]):
                cands += [(scores[i, k], i) for i in _greedy(boxes, scores[:, k])]
            cands.sort(key=lambda t: (-t[0], t[1]))
            out: List[int] = []
            for _s, i in cands:  # a box kept for several classes is reported once
                if i not in out:
                    out.append(i)
            return out[:max_boxes]
        return _greedy(boxes, scores.max(axis=1))[:max_boxes]

    def _greedy(boxes: np.ndarray, s: np.ndarray) -> List[int]:
        order = [int(i) for i in np.argsort(-s, kind="stable") if s[i] >= score_thr]
        kept: List[int] = []
        for i in order:
            if not kept or np.all(_iou(boxes[i], boxes[kept]) <= iou_thr):
                kept.append(i)
        return kept

    def run(boxes, scores):
        boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores, np.float64)
        if ios17:
            boxes, scores = np.swapaxes(boxes, 1, 2), np.swapaxes(scores, 1, 2)
        if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.shape[:2] != boxes.shape[:2]:
            raise ValueError(f"{ctx.label}: boxes {list(boxes.shape)} and scores {list(scores.shape)} "
                             f"(expected [n, B, 4] and [n, B, K])")
        n, _b, k = scores.shape
        ob = np.zeros((n, max_boxes, 4), np.float32)
        os_ = np.zeros((n, max_boxes, k), np.float32)
        oi = np.full((n, max_boxes), -1, np.int32)  # padding: index -1
        oc = np.zeros(n, np.int32)
        for b in range(n):
            keep = select(boxes[b], scores[b])
            oc[b] = len(keep)
            ob[b, :len(keep)] = boxes[b, keep]
            os_[b, :len(keep)] = scores[b, keep]
            oi[b, :len(keep)] = keep
        if ios17:
            return np.swapaxes(ob, 1, 2), np.swapaxes(os_, 1, 2), oi
        return ob, os_, oi, oc

    return Kernel(run, [ctx.ref("boxes"), ctx.ref("scores")], exact=True)
