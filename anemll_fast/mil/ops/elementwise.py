"""Elementwise ops: binary arithmetic and comparisons (numpy broadcasting), unary math, activations, cast."""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from anemll_fast.mil.ops.registry import BuildContext, Kernel, register
from anemll_fast.mil.program import NUMPY_DTYPES

_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "maximum": np.maximum,
    "minimum": np.minimum, "pow": np.power, "floor_div": np.floor_divide, "mod": np.mod,
    "equal": np.equal, "not_equal": np.not_equal, "greater": np.greater,
    "greater_equal": np.greater_equal, "less": np.less, "less_equal": np.less_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}
_EXACT_BINARY = {"maximum", "minimum", "equal", "not_equal", "greater", "greater_equal", "less",
                 "less_equal", "logical_and", "logical_or", "logical_xor"}


def _binary(ctx: BuildContext) -> Kernel:
    uf = _BINARY[ctx.op.type]
    return Kernel(uf, [ctx.ref("x"), ctx.ref("y")], exact=ctx.op.type in _EXACT_BINARY)


register(*_BINARY)(_binary)


@register("real_div")
def _real_div(ctx: BuildContext) -> Kernel:
    if ctx.out_dtype().startswith(("int", "uint")):
        # Integer real_div: the quotient is truncated toward zero when cast back to the int type.
        return Kernel(lambda x, y: np.trunc(np.true_divide(x, y)), [ctx.ref("x"), ctx.ref("y")])
    return Kernel(np.true_divide, [ctx.ref("x"), ctx.ref("y")])


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float32 (Abramowitz & Stegun 7.1.26 refined: |error| < 1.5e-7, below fp32 resolution)."""
    x = np.asarray(x, dtype=np.float64)
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
               + 0.254829592) * t * np.exp(-a * a)
    return (s * y).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # tanh form: never overflows, one vectorized pass.
    return (np.float32(0.5) * (np.float32(1.0) + np.tanh(np.float32(0.5) * x))).astype(np.float32, copy=False)


def _silu(x: np.ndarray) -> np.ndarray:
    return x * _sigmoid(x)


_UNARY: dict = {
    "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "atanh": np.arctanh,
    "ceil": np.ceil, "cos": np.cos, "cosh": np.cosh, "exp": np.exp, "exp2": np.exp2,
    "floor": np.floor, "round": np.round, "sign": np.sign, "sin": np.sin, "sinh": np.sinh,
    "sqrt": np.sqrt, "square": np.square, "tan": np.tan, "tanh": np.tanh, "erf": _erf,
    "logical_not": np.logical_not, "relu": lambda x: np.maximum(x, 0).astype(x.dtype, copy=False),
    "relu6": lambda x: np.clip(x, 0, 6), "sigmoid": _sigmoid, "silu": _silu,
    "softsign": lambda x: x / (1 + np.abs(x)),
    "softplus": lambda x: np.logaddexp(np.float32(0), x).astype(np.float32),
}
_EXACT_UNARY = {"abs", "ceil", "floor", "round", "sign", "logical_not", "relu", "relu6"}


def _unary(ctx: BuildContext) -> Kernel:
    return Kernel(_UNARY[ctx.op.type], [ctx.ref("x")], exact=ctx.op.type in _EXACT_UNARY)


register(*_UNARY)(_unary)


@register("rsqrt")
def _rsqrt(ctx: BuildContext) -> Kernel:
    eps = np.float32(ctx.scalar("epsilon", 1e-12))
    return Kernel(lambda x: 1.0 / np.sqrt(x + eps), [ctx.ref("x")])


@register("inverse")
def _inverse(ctx: BuildContext) -> Kernel:
    eps = np.float32(ctx.scalar("epsilon", 1e-4))
    return Kernel(lambda x: 1.0 / (x + eps), [ctx.ref("x")])


@register("log")
def _log(ctx: BuildContext) -> Kernel:
    eps = np.float32(ctx.scalar("epsilon", 1e-45))
    return Kernel(lambda x: np.log(x + eps), [ctx.ref("x")])


@register("clip")
def _clip(ctx: BuildContext) -> Kernel:
    lo, hi = np.float32(ctx.scalar("alpha")), np.float32(ctx.scalar("beta"))
    return Kernel(lambda x: np.minimum(np.maximum(x, lo), hi), [ctx.ref("x")], exact=True)


@register("threshold")
def _threshold(ctx: BuildContext) -> Kernel:
    a = np.float32(ctx.scalar("alpha"))
    return Kernel(lambda x: np.maximum(x, a), [ctx.ref("x")], exact=True)


@register("leaky_relu")
def _leaky_relu(ctx: BuildContext) -> Kernel:
    a = np.float32(ctx.scalar("alpha", 0.01))
    return Kernel(lambda x: np.where(x >= 0, x, a * x), [ctx.ref("x")])


@register("elu")
def _elu(ctx: BuildContext) -> Kernel:
    a = np.float32(ctx.scalar("alpha", 1.0))
    return Kernel(lambda x: np.where(x > 0, x, a * (np.exp(np.minimum(x, 0)) - 1)), [ctx.ref("x")])


@register("gelu")
def _gelu(ctx: BuildContext) -> Kernel:
    mode = ctx.scalar("mode", "EXACT")
    if mode == "EXACT":
        fn: Callable[[Any], Any] = lambda x: 0.5 * x * (1.0 + _erf(x * np.float32(1 / math.sqrt(2))))
    elif mode == "TANH_APPROXIMATION":
        c = np.float32(math.sqrt(2 / math.pi))
        fn = lambda x: 0.5 * x * (1.0 + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))
    elif mode == "SIGMOID_APPROXIMATION":
        fn = lambda x: x * _sigmoid(np.float32(1.702) * x)
    else:
        raise ctx.unsupported(f"gelu mode {mode!r}")
    return Kernel(fn, [ctx.ref("x")])


@register("cast")
def _cast(ctx: BuildContext) -> Kernel:
    dtype = ctx.scalar("dtype")
    if dtype not in NUMPY_DTYPES or dtype == "string":
        raise ctx.unsupported(f"cast to {dtype!r}")
    if dtype == "bool":
        return Kernel(lambda x: np.not_equal(x, 0), [ctx.ref("x")], exact=True)
    if dtype.startswith(("int", "uint")):
        # Float -> int truncates toward zero (what numpy's astype does); the plan converts the type.
        return Kernel(lambda x: np.trunc(x) if x.dtype.kind == "f" else x.copy(), [ctx.ref("x")],
                      exact=True)
    return Kernel(lambda x: np.array(x, dtype=np.float32), [ctx.ref("x")])


@register("select")
def _select(ctx: BuildContext) -> Kernel:
    return Kernel(np.where, [ctx.ref("cond"), ctx.ref("a"), ctx.ref("b")], exact=True)


def _per_channel(ctx: BuildContext, name: str) -> Callable[[np.ndarray], np.ndarray]:
    """A [C] parameter broadcast along axis 1 (the channel axis of prelu / softplus_parametric)."""
    v = np.asarray(ctx.const(name), dtype=np.float32).reshape(-1)

    def shaped(x: np.ndarray) -> np.ndarray:
        if x.ndim < 2 or v.size not in (1, x.shape[1]):
            raise ValueError(f"{ctx.label}: {name} has {v.size} values for {x.shape[1] if x.ndim > 1 else 0} "
                             f"channels")
        return v.reshape([1, -1] + [1] * (x.ndim - 2))

    return shaped


@register("clamped_relu")
def _clamped_relu(ctx: BuildContext) -> Kernel:
    a, b = np.float32(ctx.scalar("alpha")), np.float32(ctx.scalar("beta"))
    return Kernel(lambda x: np.minimum(np.where(x >= 0, x, a * x), b), [ctx.ref("x")])


@register("linear_activation")
def _linear_activation(ctx: BuildContext) -> Kernel:
    a, b = np.float32(ctx.scalar("alpha")), np.float32(ctx.scalar("beta"))
    return Kernel(lambda x: x * a + b, [ctx.ref("x")])


@register("scaled_tanh")
def _scaled_tanh(ctx: BuildContext) -> Kernel:
    a, b = np.float32(ctx.scalar("alpha")), np.float32(ctx.scalar("beta"))
    return Kernel(lambda x: a * np.tanh(b * x), [ctx.ref("x")])


@register("sigmoid_hard")
def _sigmoid_hard(ctx: BuildContext) -> Kernel:
    a, b = np.float32(ctx.scalar("alpha")), np.float32(ctx.scalar("beta"))
    return Kernel(lambda x: np.minimum(np.maximum(a * x + b, 0), 1), [ctx.ref("x")])


@register("thresholded_relu")
def _thresholded_relu(ctx: BuildContext) -> Kernel:
    a = np.float32(ctx.scalar("alpha", 1.0))
    return Kernel(lambda x: np.where(x >= a, x, 0).astype(np.float32), [ctx.ref("x")], exact=True)


@register("prelu")
def _prelu(ctx: BuildContext) -> Kernel:
    alpha = _per_channel(ctx, "alpha")
    return Kernel(lambda x: np.where(x > 0, x, alpha(x) * x), [ctx.ref("x")])


@register("softplus_parametric")
def _softplus_parametric(ctx: BuildContext) -> Kernel:
    alpha, beta = _per_channel(ctx, "alpha"), _per_channel(ctx, "beta")
    return Kernel(lambda x: alpha(x) * np.logaddexp(np.float32(0), beta(x) * x), [ctx.ref("x")])


def _affine_param(ctx: BuildContext, name: str, default: Any) -> Callable[[np.ndarray], np.ndarray]:
    """quantize/dequantize scale or zero point: a scalar, or a vector along `axis`."""
    v = ctx.const(name, None)
    v = np.asarray(default if v is None else v, dtype=np.float32)
    axis = ctx.scalar("axis", None)

    def shaped(x: np.ndarray) -> np.ndarray:
        if v.size == 1:
            return v.reshape(())
        if axis is None:
            raise ValueError(f"{ctx.label}: a vector {name} needs an axis")
        a = ctx.axis(int(axis), x.ndim)
        if v.size != x.shape[a]:
            raise ValueError(f"{ctx.label}: {name} has {v.size} values for axis {a} of size {x.shape[a]}")
        return v.reshape([-1 if i == a else 1 for i in range(x.ndim)])

    return shaped


@register("quantize")
def _quantize(ctx: BuildContext) -> Kernel:
    scale, zp = _affine_param(ctx, "scale", 1.0), _affine_param(ctx, "zero_point", 0.0)
    out = str(ctx.scalar("output_dtype"))
    bounds = {"int8": (-128, 127), "uint8": (0, 255)}
    if out not in bounds:
        raise ctx.bad(f"output_dtype {out!r} (int8 or uint8)")
    lo, hi = bounds[out]
    return Kernel(lambda x: np.clip(np.round(x / scale(x)) + zp(x), lo, hi), [ctx.ref("input")], exact=True)


@register("dequantize")
def _dequantize(ctx: BuildContext) -> Kernel:
    scale, zp = _affine_param(ctx, "scale", 1.0), _affine_param(ctx, "zero_point", 0.0)
    return Kernel(lambda x: scale(x) * (np.asarray(x, np.float32) - zp(x)), [ctx.ref("input")])
