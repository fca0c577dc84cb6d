"""random_* ops: numpy generators seeded when the plan is built.

A given seed (>= 0) makes the sequence of values over successive predictions reproducible from one
load to the next; seed -1 (the default) draws fresh entropy.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from anemll_fast.mil.ops.registry import BuildContext, Kernel, register


def _rng(ctx: BuildContext) -> np.random.Generator:
    seed = int(ctx.scalar("seed", -1))
    return np.random.default_rng(None if seed < 0 else seed)


def _shape(ctx: BuildContext, s: Any) -> tuple:
    shape = tuple(int(v) for v in np.asarray(s).reshape(-1))
    if any(v < 0 for v in shape):
        raise ValueError(f"{ctx.label}: negative dimension in shape {list(shape)}")
    return shape


@register("random_uniform")
def _random_uniform(ctx: BuildContext) -> Kernel:
    rng = _rng(ctx)
    low, high = float(ctx.scalar("low", 0.0)), float(ctx.scalar("high", 1.0))
    if not low < high:
        raise ctx.bad(f"low {low} must be below high {high}")
    return Kernel(lambda s: rng.uniform(low, high, _shape(ctx, s)).astype(np.float32), [ctx.ref("shape")], pure=False)


@register("random_normal")
def _random_normal(ctx: BuildContext) -> Kernel:
    rng = _rng(ctx)
    mean, std = float(ctx.scalar("mean", 0.0)), float(ctx.scalar("stddev", 1.0))
    if std < 0:
        raise ctx.bad(f"stddev {std} is negative")
    return Kernel(lambda s: rng.normal(mean, std, _shape(ctx, s)).astype(np.float32), [ctx.ref("shape")], pure=False)


@register("random_bernoulli")
def _random_bernoulli(ctx: BuildContext) -> Kernel:
    rng = _rng(ctx)
    p = float(ctx.scalar("prob", 0.5))
    if not 0.0 <= p <= 1.0:
        raise ctx.bad(f"prob {p} outside [0, 1]")
    return Kernel(lambda s: (rng.random(_shape(ctx, s)) < p).astype(np.float32), [ctx.ref("shape")], pure=False)


@register("random_categorical")
def _random_categorical(ctx: BuildContext) -> Kernel:
    rng = _rng(ctx)
    mode = str(ctx.scalar("mode", "logits")).lower()
    size = int(ctx.scalar("size", 1))
    if mode not in ("logits", "probs"):
        raise ctx.bad(f"mode {mode!r} (logits or probs)")
    if size < 1:
        raise ctx.bad(f"size {size} must be positive")

    def run(x):
        x = np.asarray(x, np.float64)
        logits = np.log(x) if mode == "probs" else x
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        cdf = np.cumsum(p, axis=-1)
        cdf /= cdf[..., -1:]
        u = rng.random(x.shape[:-1] + (size,))
        # inverse-CDF draw, with replacement, per distribution row
        flat_cdf = cdf.reshape(-1, x.shape[-1])
        flat_u = u.reshape(-1, size)
        idx = np.stack([np.searchsorted(flat_cdf[r], flat_u[r], side="right") for r in range(len(flat_cdf))])
        return np.minimum(idx, x.shape[-1] - 1).reshape(u.shape).astype(np.float32)

    return Kernel(run, [ctx.ref("x")], exact=True, pure=False)
