"""Reductions, softmax and normalizations (axes may be negative; axes=None reduces everything)."""
from __future__ import annotations

from typing import Any

import numpy as np

from anemll_fast.mil.ops.registry import BuildContext, Kernel, register


def _axes(ctx: BuildContext):
    axes = ctx.ints("axes", None)
    return None if axes is None else tuple(axes)


def _logsumexp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    s = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return s if keepdims else np.squeeze(s, axis=axis if axis is not None else tuple(range(x.ndim)))


_REDUCE = {
    "reduce_sum": lambda x, a, k: np.sum(x, axis=a, keepdims=k),
    "reduce_mean": lambda x, a, k: np.mean(x, axis=a, keepdims=k),
    "reduce_max": lambda x, a, k: np.max(x, axis=a, keepdims=k),
    "reduce_min": lambda x, a, k: np.min(x, axis=a, keepdims=k),
    "reduce_prod": lambda x, a, k: np.prod(x, axis=a, keepdims=k),
    "reduce_sum_square": lambda x, a, k: np.sum(x * x, axis=a, keepdims=k),
    "reduce_l1_norm": lambda x, a, k: np.sum(np.abs(x), axis=a, keepdims=k),
    "reduce_l2_norm": lambda x, a, k: np.sqrt(np.sum(x * x, axis=a, keepdims=k)),
    "reduce_log_sum": lambda x, a, k: np.log(np.sum(x, axis=a, keepdims=k)),
    "reduce_log_sum_exp": _logsumexp,
}


def _reduce(ctx: BuildContext) -> Kernel:
    f = _REDUCE[ctx.op.type]
    axes = _axes(ctx)
    keep = bool(ctx.scalar("keep_dims", False))
    exact = ctx.op.type in ("reduce_max", "reduce_min")
    return Kernel(lambda x: np.asarray(f(x, axes, keep)), [ctx.ref("x")], exact=exact)


register(*_REDUCE)(_reduce)


def _arg(ctx: BuildContext, fn) -> Kernel:
    axis = int(ctx.scalar("axis", -1))
    keep = bool(ctx.scalar("keep_dims", False))

    def run(x):
        r = fn(x, axis=axis)
        return np.expand_dims(r, axis) if keep else np.asarray(r)

    return Kernel(run, [ctx.ref("x")], exact=True)


@register("reduce_argmax")
def _argmax(ctx: BuildContext) -> Kernel:
    return _arg(ctx, np.argmax)


@register("reduce_argmin")
def _argmin(ctx: BuildContext) -> Kernel:
    return _arg(ctx, np.argmin)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, np.float32(0))  # a row of all -inf stays finite-safe
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


@register("softmax")
def _softmax(ctx: BuildContext) -> Kernel:
    axis = int(ctx.scalar("axis", -1))
    return Kernel(lambda x: softmax(x, axis), [ctx.ref("x")])


@register("layer_norm")
def _layer_norm(ctx: BuildContext) -> Kernel:
    axes = _axes(ctx)
    eps = np.float32(ctx.scalar("epsilon", 1e-5))
    gamma = ctx.const("gamma", None)
    beta = ctx.const("beta", None)

    def run(x):
        ax = tuple(range(x.ndim)) if axes is None else tuple(a % x.ndim for a in axes)
        mean = np.mean(x, axis=ax, keepdims=True)
        d = x - mean
        var = np.mean(d * d, axis=ax, keepdims=True)
        y = d / np.sqrt(var + eps)
        if gamma is not None or beta is not None:
            # gamma/beta have the shape of the normalized (trailing) axes.
            shape = [x.shape[i] if i in ax else 1 for i in range(x.ndim)]
            if gamma is not None:
                y = y * np.reshape(gamma, shape)
            if beta is not None:
                y = y + np.reshape(beta, shape)
        return y

    return Kernel(run, [ctx.ref("x")])


@register("l2_norm")
def _l2_norm(ctx: BuildContext) -> Kernel:
    axes = _axes(ctx)
    eps = np.float32(ctx.scalar("epsilon", 1e-6))

    def run(x):
        ax = axes if axes is not None else tuple(range(max(x.ndim - 3, 0), x.ndim))
        # MIL's definition: x / sqrt(sum(x^2) + epsilon) (not a floor at epsilon).
        return x / np.sqrt(np.sum(x * x, axis=ax, keepdims=True) + eps)

    return Kernel(run, [ctx.ref("x")])


@register("batch_norm")
def _batch_norm(ctx: BuildContext) -> Kernel:
    mean, var = ctx.const("mean"), ctx.const("variance")
    gamma, beta = ctx.const("gamma", None), ctx.const("beta", None)
    eps = np.float32(ctx.scalar("epsilon", 1e-5))

    def run(x):
        shape = [1, -1] + [1] * (x.ndim - 2)
        y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
        if gamma is not None:
            y = y * gamma.reshape(shape)
        if beta is not None:
            y = y + beta.reshape(shape)
        return y

    return Kernel(run, [ctx.ref("x")])


def _channel_param(v: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float32).reshape([1, -1] + [1] * (x.ndim - 2))


@register("instance_norm")
def _instance_norm(ctx: BuildContext) -> Kernel:
    gamma, beta = ctx.const("gamma", None), ctx.const("beta", None)
    eps = np.float32(ctx.scalar("epsilon", 1e-5))

    def run(x):
        ax = tuple(range(2, x.ndim))  # per sample and channel, over the spatial dims
        mean = np.mean(x, axis=ax, keepdims=True)
        d = x - mean
        y = d / np.sqrt(np.mean(d * d, axis=ax, keepdims=True) + eps)
        if gamma is not None:
            y = y * _channel_param(gamma, x)
        if beta is not None:
            y = y + _channel_param(beta, x)
        return y

    return Kernel(run, [ctx.ref("x")])


@register("local_response_norm")
def _local_response_norm(ctx: BuildContext) -> Kernel:
    size = int(ctx.scalar("size"))
    alpha = np.float32(ctx.scalar("alpha", 1e-4))
    beta = np.float32(ctx.scalar("beta", 0.75))
    k = np.float32(ctx.scalar("k", 1.0))
    if size < 1:
        raise ctx.bad(f"size {size} must be positive")

    def run(x):
        # sum of squares over a window of `size` channels centred on each channel (zero-padded)
        sq = np.pad(x * x, [(0, 0), ((size - 1) // 2, size // 2)] + [(0, 0)] * (x.ndim - 2))
        c = np.cumsum(sq, axis=1, dtype=np.float64)
        c = np.concatenate([np.zeros_like(c[:, :1]), c], axis=1)
        window = (c[:, size:] - c[:, :-size]).astype(np.float32)
        return x / (k + alpha / size * window) ** beta

    return Kernel(run, [ctx.ref("x")])
