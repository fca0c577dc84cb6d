"""Every op the MIL interpreter registers, run once against numpy written from the op's MIL definition.

The definitions are coremltools' op docstrings (coremltools/converters/mil/mil/ops/defs/iOS1x). All cases go
into a few programs built with the MIL builder and converted with an empty pass pipeline, so that no op is
folded away; the test checks that each op is present in the saved program, then compares its outputs. An op
registered without a case here fails `test_every_registered_op_has_a_case`.

Tolerances are those of float32 arithmetic (the programs compute in fp32) and sit below the effect each case
is there to see (an epsilon, a rounding mode, a mask).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Function, Program, types  # noqa: E402

from anemll_fast.backends.reference import ReferenceBackend  # noqa: E402
from anemll_fast.mil.loader import op_histogram  # noqa: E402
from anemll_fast.mil.ops.constexpr import CONSTEXPR  # noqa: E402
from anemll_fast.mil.ops.registry import OPS  # noqa: E402

RNG = np.random.default_rng(11)
TOL = 2e-6  # relative and absolute, float32


def r(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def u(lo, hi, *shape):
    return RNG.uniform(lo, hi, shape).astype(np.float32)


@dataclass
class Case:
    """Inputs (fed at run time), a builder turning input vars into output vars, and the numpy expectation."""

    inputs: Dict[str, np.ndarray]
    build: Callable[..., Any]
    expect: Callable[..., Any]
    tol: float = TOL
    ops: Sequence[str] = field(default_factory=tuple)  # op types the case runs (default: its key)


CASES: Dict[str, Case] = {}


def case(name, inputs, build, expect, tol=TOL, ops=()):
    assert name not in CASES, name
    CASES[name] = Case(inputs, build, expect, tol, tuple(ops) or (name,))


# ------------------------------------------------------------------ elementwise binary (numpy broadcasting)
X34, Y31 = r(2, 3, 4), r(3, 1)
Y31[np.abs(Y31) < 0.3] = 0.7  # divisors away from zero
for name, fn in {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide, "maximum": np.maximum,
    "minimum": np.minimum,
}.items():
    case(name, {"x": X34, "y": Y31}, lambda x, y, n=name: getattr(mb, n)(x=x, y=y), fn, tol=1e-6)
# floor_div / mod: floor semantics (the result of mod takes the divisor's sign).
case("floor_div", {"x": X34 * 3, "y": Y31}, lambda x, y: mb.floor_div(x=x, y=y),
     lambda x, y: np.floor(x / y))
case("mod", {"x": X34 * 3, "y": Y31}, lambda x, y: mb.mod(x=x, y=y),
     lambda x, y: x - np.floor(x / y) * y, tol=1e-5)
case("pow", {"x": u(0.1, 3, 3, 4), "y": r(3, 4)}, lambda x, y: mb.pow(x=x, y=y), np.power, tol=1e-5)

CMP_X = np.array([[-1.0, 0.0, 2.0, 3.5], [1.0, 1.0, -2.0, 0.5]], np.float32)
CMP_Y = np.array([[-1.0, 0.5, 1.0, 3.5], [1.0, -1.0, -2.0, 0.25]], np.float32)


def _as_int(v):
    return mb.cast(x=v, dtype="int32")  # Core ML has no bool outputs


for name, fn in {"equal": np.equal, "not_equal": np.not_equal, "greater": np.greater,
                 "greater_equal": np.greater_equal, "less": np.less, "less_equal": np.less_equal}.items():
    case(name, {"x": CMP_X, "y": CMP_Y}, lambda x, y, n=name: _as_int(getattr(mb, n)(x=x, y=y)),
         lambda x, y, f=fn: f(x, y).astype(np.int32), ops=(name, "cast"))

BOOL_A = np.array([True, True, False, False])
BOOL_B = np.array([True, False, True, False])
for name, fn in {"logical_and": np.logical_and, "logical_or": np.logical_or,
                 "logical_xor": np.logical_xor}.items():
    case(name, {"a": BOOL_A, "b": BOOL_B}, lambda a, b, n=name: _as_int(getattr(mb, n)(x=a, y=b)),
         lambda a, b, f=fn: f(a, b).astype(np.int32), ops=(name, "cast"))
case("logical_not", {"a": BOOL_A}, lambda a: _as_int(mb.logical_not(x=a)),
     lambda a: np.logical_not(a).astype(np.int32), ops=("logical_not", "cast"))

# ------------------------------------------------------------------ elementwise unary
UNARY = {
    "abs": (r(3, 5), np.abs), "acos": (u(-0.95, 0.95, 3, 5), np.arccos), "asin": (u(-0.95, 0.95, 3, 5), np.arcsin),
    "atan": (r(3, 5, scale=3), np.arctan), "atanh": (u(-0.95, 0.95, 3, 5), np.arctanh),
    "ceil": (r(3, 5, scale=3), np.ceil), "floor": (r(3, 5, scale=3), np.floor),
    "cos": (r(3, 5, scale=3), np.cos), "sin": (r(3, 5, scale=3), np.sin), "tan": (u(-1.4, 1.4, 3, 5), np.tan),
    "cosh": (r(3, 5), np.cosh), "sinh": (r(3, 5), np.sinh), "tanh": (r(3, 5, scale=2), np.tanh),
    "exp": (r(3, 5, scale=2), np.exp), "exp2": (r(3, 5, scale=2), np.exp2),
    "sign": (np.array([-2.0, -0.0, 0.0, 0.5, 3.0], np.float32), np.sign),
    "sqrt": (u(0.0, 9.0, 3, 5), np.sqrt), "square": (r(3, 5), np.square),
    "relu": (r(3, 5), lambda x: np.maximum(x, 0)), "relu6": (r(3, 5, scale=5), lambda x: np.clip(x, 0, 6)),
    "sigmoid": (r(3, 5, scale=4), lambda x: 1 / (1 + np.exp(-x.astype(np.float64)))),
    "silu": (r(3, 5, scale=4), lambda x: x / (1 + np.exp(-x.astype(np.float64)))),
    "softsign": (r(3, 5, scale=4), lambda x: x / (1 + np.abs(x))),
    "softplus": (np.array([-30.0, -3.0, -0.5, 0.0, 0.7, 4.0, 30.0], np.float32),
                 lambda x: np.log1p(np.exp(x.astype(np.float64)))),
    "erf": (r(3, 5, scale=1.5), lambda x: np.vectorize(math.erf)(x.astype(np.float64))),
    # round: to nearest, ties (0.5) to even as the definition's value inference does.
    "round": (np.array([-2.7, -0.5, 0.5, 0.49, 1.2, 2.5, 3.51, -3.5], np.float32), np.round),
}
for name, (x, fn) in UNARY.items():
    case(name, {"x": x}, lambda x, n=name: getattr(mb, n)(x=x), fn, tol=1e-6 if name != "erf" else 5e-7)

# Ops with an epsilon: values chosen so that the epsilon changes the result far beyond the tolerance.
case("rsqrt", {"x": u(0.01, 2.0, 3, 4)}, lambda x: mb.rsqrt(x=x, epsilon=0.25),
     lambda x: 1 / np.sqrt(x + np.float32(0.25)))
case("inverse", {"x": u(0.05, 2.0, 3, 4)}, lambda x: mb.inverse(x=x, epsilon=0.125),
     lambda x: 1 / (x + np.float32(0.125)))
case("log", {"x": u(0.01, 5.0, 3, 4)}, lambda x: mb.log(x=x, epsilon=0.5), lambda x: np.log(x + np.float32(0.5)))
case("clip", {"x": r(3, 5, scale=2)}, lambda x: mb.clip(x=x, alpha=-0.5, beta=0.75),
     lambda x: np.clip(x, -0.5, 0.75))
case("threshold", {"x": r(3, 5)}, lambda x: mb.threshold(x=x, alpha=0.3), lambda x: np.maximum(x, 0.3))
case("leaky_relu", {"x": r(3, 5)}, lambda x: mb.leaky_relu(x=x, alpha=0.2), lambda x: np.where(x >= 0, x, 0.2 * x))
case("elu", {"x": r(3, 5, scale=2)}, lambda x: mb.elu(x=x, alpha=0.7),
     lambda x: np.where(x > 0, x, 0.7 * np.expm1(x.astype(np.float64))))
GX = r(4, 6, scale=2)
case("gelu", {"x": GX},
     lambda x: [mb.gelu(x=x, mode="EXACT"), mb.gelu(x=x, mode="TANH_APPROXIMATION"),
                mb.gelu(x=x, mode="SIGMOID_APPROXIMATION")],
     lambda x: [0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
                0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
                x / (1 + np.exp(-1.702 * x.astype(np.float64)))], tol=2e-6)
case("cast", {"x": np.array([-2.7, -0.5, 0.0, 1.9, 3.0], np.float32)},
     lambda x: [mb.cast(x=x, dtype="int32"), mb.cast(x=mb.cast(x=x, dtype="bool"), dtype="fp32")],
     lambda x: [np.trunc(x).astype(np.int32), (x != 0).astype(np.float32)])
case("select", {"c": np.array([[True, False, True], [False, False, True]]), "a": r(2, 3), "b": r(1, 3)},
     lambda c, a, b: mb.select(cond=c, a=a, b=b), lambda c, a, b: np.where(c, a, b))

# ------------------------------------------------------------------ reductions and normalizations
RX = r(2, 3, 4)
for name, fn in {
    "reduce_sum": lambda x, a: np.sum(x, a), "reduce_mean": lambda x, a: np.mean(x, a),
    "reduce_max": lambda x, a: np.max(x, a), "reduce_min": lambda x, a: np.min(x, a),
    "reduce_prod": lambda x, a: np.prod(x, a), "reduce_sum_square": lambda x, a: np.sum(x * x, a),
    "reduce_l1_norm": lambda x, a: np.sum(np.abs(x), a), "reduce_l2_norm": lambda x, a: np.sqrt(np.sum(x * x, a)),
    "reduce_log_sum_exp": lambda x, a: np.log(np.sum(np.exp(x.astype(np.float64)), a)),
}.items():
    case(name, {"x": RX},
         lambda x, n=name: [getattr(mb, n)(x=x, axes=[1]), getattr(mb, n)(x=x, axes=[0, -1], keep_dims=True),
                            getattr(mb, n)(x=x)],
         lambda x, f=fn: [f(x, 1), np.expand_dims(f(x, (0, 2)), (0, 2)), f(x, None)], tol=3e-6)
case("reduce_log_sum", {"x": u(0.1, 2.0, 2, 3, 4)}, lambda x: mb.reduce_log_sum(x=x, axes=[2]),
     lambda x: np.log(np.sum(x, 2)))
AX = np.array([[3.0, -1.0, 3.0, 0.5], [-2.0, -2.0, 1.0, -7.0]], np.float32)  # ties: the first index wins
case("reduce_argmax", {"x": AX}, lambda x: [mb.reduce_argmax(x=x, axis=1), mb.reduce_argmax(x=x, axis=0, keep_dims=True)],
     lambda x: [np.argmax(x, 1).astype(np.int32), np.argmax(x, 0)[None].astype(np.int32)])
case("reduce_argmin", {"x": AX}, lambda x: [mb.reduce_argmin(x=x, axis=1), mb.reduce_argmin(x=x, axis=-2)],
     lambda x: [np.argmin(x, 1).astype(np.int32), np.argmin(x, 0).astype(np.int32)])


def _softmax(x, axis):
    e = np.exp(x.astype(np.float64) - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


case("softmax", {"x": r(2, 3, 5, scale=3)}, lambda x: [mb.softmax(x=x, axis=-1), mb.softmax(x=x, axis=1)],
     lambda x: [_softmax(x, -1), _softmax(x, 1)])
LN_G, LN_B = r(5), r(5)
# Inputs of small variance: the epsilon (0.5) changes every output by far more than the tolerance.
case("layer_norm", {"x": r(2, 3, 5, scale=0.3)}, lambda x: mb.layer_norm(x=x, axes=[-1], gamma=LN_G, beta=LN_B, epsilon=0.5),
     lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 0.5) * LN_G + LN_B)
# l2_norm: x / sqrt(sum(x^2) + epsilon) over the last three dimensions; one slice has sum(x^2) < epsilon.
L2X = r(2, 2, 3, 4)
L2X[1] *= 0.05
case("l2_norm", {"x": L2X}, lambda x: mb.l2_norm(x=x, epsilon=0.5),
     lambda x: x / np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=(1, 2, 3), keepdims=True) + 0.5))
BN = dict(mean=r(3), variance=u(0.01, 0.2, 3), gamma=r(3), beta=r(3))
case("batch_norm", {"x": r(2, 3, 4, 2)}, lambda x: mb.batch_norm(x=x, epsilon=0.3, **BN),
     lambda x: ((x - BN["mean"][:, None, None]) / np.sqrt(BN["variance"][:, None, None] + 0.3)
                * BN["gamma"][:, None, None] + BN["beta"][:, None, None]))

# ------------------------------------------------------------------ tensor operations
TX = r(2, 3, 4)
case("identity", {"x": TX}, lambda x: mb.identity(x=x), lambda x: x)
case("reshape", {"x": TX}, lambda x: [mb.reshape(x=x, shape=[4, -1]), mb.reshape(x=x, shape=[2, 12])],
     lambda x: [x.reshape(4, 6), x.reshape(2, 12)])
case("transpose", {"x": TX}, lambda x: mb.transpose(x=x, perm=[2, 0, 1]), lambda x: x.transpose(2, 0, 1))
case("expand_dims", {"x": TX}, lambda x: mb.expand_dims(x=x, axes=[0, -1]), lambda x: x[None, ..., None])
case("squeeze", {"x": r(1, 3, 1, 2)}, lambda x: [mb.squeeze(x=x, axes=[2]), mb.squeeze(x=x)],
     lambda x: [x[:, :, 0], x.reshape(3, 2)])
case("slice_by_index", {"x": r(4, 6)},
     lambda x: [mb.slice_by_index(x=x, begin=[1, 0], end=[3, 6], stride=[1, 2]),
                mb.slice_by_index(x=x, begin=[0, 5], end=[4, 0], stride=[1, -2], end_mask=[False, True]),
                mb.slice_by_index(x=x, begin=[2, 0], end=[3, 6], squeeze_mask=[True, False])],
     lambda x: [x[1:3, ::2], x[:, 5::-2], x[2]])
case("slice_by_size", {"x": r(4, 6), "b": np.array([1, 2], np.int32)},
     lambda x, b: [mb.slice_by_size(x=x, begin=b, size=[2, 3]), mb.slice_by_size(x=x, begin=b, size=[-1, 2])],
     lambda x, b: [x[1:3, 2:5], x[1:, 2:4]])
SU = r(2, 2)
case("slice_update", {"x": r(4, 5)}, lambda x: mb.slice_update(x=x, update=SU, begin=[1, 2], end=[3, 4]),
     lambda x: np.concatenate([x[:1], np.concatenate([x[1:3, :2], SU, x[1:3, 4:]], 1), x[3:]], 0))
case("gather", {"x": r(5, 3), "i": np.array([4, 0, 2, 2], np.int32)},
     lambda x, i: [mb.gather(x=x, indices=i, axis=0), mb.gather(x=x, indices=np.array([2, 0], np.int32), axis=1)],
     lambda x, i: [x[i], x[:, [2, 0]]])
GI = np.array([[2, 0, 1], [1, 1, 0]], np.int32)
case("gather_along_axis", {"x": r(3, 3)},
     lambda x: mb.gather_along_axis(x=x, indices=GI, axis=0), lambda x: np.take_along_axis(x, GI, 0))
case("concat", {"a": r(2, 3), "b": r(2, 2)},
     lambda a, b: [mb.concat(values=[a, b], axis=1), mb.concat(values=[a, a], axis=0, interleave=True)],
     lambda a, b: [np.concatenate([a, b], 1), np.stack([a, a], 1).reshape(4, 3)])
case("stack", {"a": r(2, 3), "b": r(2, 3)}, lambda a, b: [mb.stack(values=[a, b], axis=1), mb.stack(values=[a, b], axis=-1)],
     lambda a, b: [np.stack([a, b], 1), np.stack([a, b], -1)])
case("split", {"x": r(2, 7)},
     lambda x: list(mb.split(x=x, split_sizes=[2, 5], axis=1)) + list(mb.split(x=x, num_splits=2, axis=0)),
     lambda x: [x[:, :2], x[:, 2:], x[:1], x[1:]])
case("tile", {"x": r(2, 3)}, lambda x: mb.tile(x=x, reps=[2, 3]), lambda x: np.tile(x, (2, 3)))
case("band_part", {"x": r(4, 5)},
     lambda x: [mb.band_part(x=x, lower=1, upper=0), mb.band_part(x=x, lower=-1, upper=2)],
     lambda x: [np.tril(np.triu(x, -1), 0), np.tril(x, 2)])
case("fill", {"s": np.array([2, 3], np.int32)}, lambda s: mb.fill(shape=s, value=2.5),
     lambda s: np.full((2, 3), 2.5, np.float32))
case("fill_like", {"x": r(3, 2)}, lambda x: mb.fill_like(ref_tensor=x, value=-1.5),
     lambda x: np.full((3, 2), -1.5, np.float32))
case("range_1d", {"e": np.array([7.0], np.float32), "s": np.array([1.0], np.float32)},
     lambda e, s: [mb.range_1d(end=mb.squeeze(x=e), start=mb.squeeze(x=s), step=np.float32(1.5)),
                   mb.range_1d(end=np.int32(-3), start=np.int32(5), step=np.int32(-3))],
     lambda e, s: [np.arange(1.0, 7.0, 1.5, dtype=np.float32), np.arange(5, -3, -3, dtype=np.int32)])
case("shape", {"x": r(2, 5, 3)}, lambda x: mb.shape(x=x), lambda x: np.array([2, 5, 3], np.int32))
case("pad", {"x": r(2, 3, 4)},
     lambda x: [mb.pad(x=x, pad=[1, 2], mode="constant", constant_val=9.0),
                mb.pad(x=x, pad=[1, 0, 2, 3], mode="reflect"), mb.pad(x=x, pad=[0, 1, 1, 2], mode="replicate")],
     lambda x: [np.pad(x, [(0, 0), (0, 0), (1, 2)], constant_values=9.0),
                np.pad(x, [(0, 0), (1, 0), (2, 3)], mode="reflect"),
                np.pad(x, [(0, 0), (0, 1), (1, 2)], mode="edge")])
TK = np.array([[0.5, 3.0, -1.0, 3.0, 2.0], [1.0, -4.0, 0.0, 8.0, -2.0]], np.float32)
case("topk", {"x": TK},
     lambda x: list(mb.topk(x=x, k=3, axis=-1)) + list(mb.topk(x=x, k=2, axis=1, ascending=True))
     + [mb.topk(x=x, k=1, axis=0, return_indices=False)],
     lambda x: [np.take_along_axis(x, np.argsort(-x, 1, kind="stable")[:, :3], 1),
                np.argsort(-x, 1, kind="stable")[:, :3].astype(np.int32),
                np.sort(x, 1)[:, :2], np.argsort(x, 1, kind="stable")[:, :2].astype(np.int32),
                x.max(0, keepdims=True)])
# cumsum: an exclusive sum must not be computed as inclusive minus x (1e-3 would vanish next to 1e4).
CS = np.array([[1e-3, 1e4, 2.0, -1e4], [1.0, 2.0, 3.0, 4.0]], np.float32)
case("cumsum", {"x": CS},
     lambda x: [mb.cumsum(x=x, axis=1), mb.cumsum(x=x, axis=1, exclusive=True),
                mb.cumsum(x=x, axis=1, reverse=True), mb.cumsum(x=x, axis=-1, exclusive=True, reverse=True),
                mb.cumsum(x=x, axis=0)],
     lambda x: [np.cumsum(x, 1), np.concatenate([np.zeros((2, 1)), np.cumsum(x, 1)[:, :-1]], 1),
                np.cumsum(x[:, ::-1], 1)[:, ::-1],
                np.concatenate([np.cumsum(x[:, ::-1], 1)[:, -2::-1], np.zeros((2, 1))], 1), np.cumsum(x, 0)],
     tol=1e-7)

# ------------------------------------------------------------------ linear algebra
LW, LB = r(6, 4), r(6)
case("matmul", {"a": r(2, 3, 4), "b": r(2, 5, 4), "c": r(2, 3, 5)},
     lambda a, b, c: [mb.matmul(x=a, y=b, transpose_y=True), mb.matmul(x=a, y=c, transpose_x=True),
                      mb.matmul(x=a, y=LW.T.copy())],
     lambda a, b, c: [a @ b.transpose(0, 2, 1), a.transpose(0, 2, 1) @ c, a @ LW.T], tol=1e-5)
case("linear", {"x": r(2, 3, 4)}, lambda x: mb.linear(x=x, weight=LW, bias=LB), lambda x: x @ LW.T + LB, tol=1e-5)
CW, CB = r(6, 2, 3, 3), r(6)


def _conv2d(x, w, b, strides, pads, dilations, groups):
    """Direct convolution (cross-correlation) of MIL's conv: weight [C_out, C_in / groups, kH, kW]."""
    o, cg, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (pads[0], pads[1]), (pads[2], pads[3])])
    (sh, sw), (dh, dw) = strides, dilations
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((x.shape[0], o, oh, ow))
    per = o // groups
    for oc in range(o):
        g = oc // per
        for i in range(oh):
            for j in range(ow):
                patch = xp[:, g * cg:(g + 1) * cg, i * sh:i * sh + dh * (kh - 1) + 1:dh,
                           j * sw:j * sw + dw * (kw - 1) + 1:dw]
                out[:, oc, i, j] = (patch * w[oc]).sum((1, 2, 3)) + b[oc]
    return out


case("conv", {"x": r(1, 4, 7, 6)},
     lambda x: [mb.conv(x=x, weight=CW, bias=CB, strides=[2, 1], pad_type="custom", pad=[1, 0, 2, 1],
                        dilations=[1, 2], groups=2),
                mb.conv(x=x, weight=CW, bias=CB, pad_type="same", groups=2)],
     lambda x: [_conv2d(x, CW, CB, (2, 1), (1, 0, 2, 1), (1, 2), 2),
                _conv2d(x, CW, CB, (1, 1), (1, 1, 1, 1), (1, 1), 2)], tol=1e-5)


SDPA_MASK = np.triu(np.full((3, 5), -1e4, np.float32), 3)
case("scaled_dot_product_attention", {"q": r(1, 2, 3, 4), "k": r(1, 2, 5, 4), "v": r(1, 2, 5, 4)},
     lambda q, k, v: [mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=SDPA_MASK),
                      mb.scaled_dot_product_attention(query=q, key=k, value=v)],
     lambda q, k, v: [_softmax(q @ k.transpose(0, 1, 3, 2) / 2.0 + SDPA_MASK, -1) @ v,
                      _softmax(q @ k.transpose(0, 1, 3, 2) / 2.0, -1) @ v], tol=1e-5)

# State ops run in their own program (below); the table still names them so that coverage is checked.
STATE_OPS = ("read_state", "write_state", "coreml_update_state")


# ------------------------------------------------------------------ running the table
def _spec(a: np.ndarray):
    dt = {np.dtype(np.float32): types.fp32, np.dtype(np.int32): types.int32, np.dtype(np.bool_): types.bool}[a.dtype]
    return mb.placeholder(shape=a.shape, dtype=dt)


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    """Build one program holding every case, run it once: {case: ([outputs], [expected])}, op histogram."""
    placeholders, feeds = {}, {}
    for cname, c in CASES.items():
        for iname, arr in c.inputs.items():
            key = f"{cname}__{iname}"
            placeholders[key] = _spec(arr)
            # Core ML has no bool inputs either: the converter makes them fp32 and casts them back.
            feeds[key] = arr.astype(np.float32) if arr.dtype == np.bool_ else arr
    outputs, names = [], {}
    with Function(placeholders, opset_version=ct.target.iOS18) as fn:
        for cname, c in CASES.items():
            args = [fn.inputs[f"{cname}__{i}"] for i in c.inputs]
            outs = _as_list(c.build(*args))
            names[cname] = []
            for j, v in enumerate(outs):
                name = f"{cname}__out{j}"
                outputs.append(mb.identity(x=v, name=name))
                names[cname].append(name)
        fn.set_outputs(outputs)
    prog = Program()
    prog.add_function("main", fn)
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
                       skip_model_load=True)
    path = str(tmp_path_factory.mktemp("optable") / "ops.mlpackage")
    model.save(path)
    out = ReferenceBackend.load(path).predict(feeds)
    results = {cname: ([out[n] for n in names[cname]], _as_list(c.expect(*c.inputs.values())))
               for cname, c in CASES.items()}
    return results, op_histogram(path)["main"]


def test_every_registered_op_has_a_case():
    from test_mil_ops_extended import COVERED_HERE  # the rest of MIL's op set, tested there

    covered = {op for c in CASES.values() for op in c.ops} | set(STATE_OPS) | COVERED_HERE
    missing = sorted(set(OPS) - covered)
    assert not missing, f"ops registered without a case in tests/test_mil_op_table.py: {missing}"
    missing = sorted(set(CONSTEXPR) - CONSTEXPR_COVERED - COVERED_HERE)
    assert not missing, f"constexpr ops registered without a case: {missing}"


# constexpr ops are decoded at load: tests/test_mil_ops.py runs the quantization ones, the test below the rest.
CONSTEXPR_COVERED = {"constexpr_lut_to_dense", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale",
                     "constexpr_cast", "constexpr_sparse_to_dense"}


def test_constexpr_cast_and_sparse_to_dense(tmp_path):
    src = r(2, 3).astype(np.float16)
    dense = np.array([[0.0, 1.5, 0.0, -2.0, 0.0], [3.25, 0.0, 0.0, 0.5, 7.0]], np.float32)
    bits = (dense.reshape(-1) != 0).astype(np.uint8)
    mask = np.packbits(bits, bitorder="little")  # least significant bit first, row-major

    @mb.program(input_specs=[mb.TensorSpec((1,), dtype=types.fp32)], opset_version=ct.target.iOS16)
    def prog(x):
        a = mb.constexpr_cast(source_val=src, output_dtype="fp32")
        b = mb.constexpr_sparse_to_dense(nonzero_data=dense[dense != 0], mask=mask,
                                         shape=np.array(dense.shape, np.uint32))
        return mb.add(x=a, y=x, name="a"), mb.add(x=b, y=x, name="b")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
                       skip_model_load=True)
    path = str(tmp_path / "c.mlpackage")
    model.save(path)
    assert {"constexpr_cast", "constexpr_sparse_to_dense"} <= set(op_histogram(path)["main"])
    o = ReferenceBackend.load(path).predict({"x": np.zeros(1, np.float32)})
    np.testing.assert_array_equal(o["a"], src.astype(np.float32))
    np.testing.assert_array_equal(o["b"], dense)


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_against_its_definition(table_run, name):
    results, histogram = table_run
    for op in CASES[name].ops:
        assert histogram.get(op, 0) > 0, f"{op} is not in the saved program (folded or lowered?)"
    got, want = results[name]
    assert len(got) == len(want)
    tol = CASES[name].tol
    for i, (g, w) in enumerate(zip(got, want)):
        w = np.asarray(w)
        assert np.shape(g) == w.shape, (name, i, np.shape(g), w.shape)
        if w.dtype.kind in "iub":
            np.testing.assert_array_equal(g, w, err_msg=f"{name} output {i}")
        else:
            np.testing.assert_allclose(np.asarray(g, np.float64), w.astype(np.float64), rtol=tol, atol=tol,
                                       err_msg=f"{name} output {i}")


def test_state_ops_read_write_and_coreml_update_state(tmp_path):
    """read_state / write_state as the protobuf stores an update, coreml_update_state as compiled model.mil
    text spells it: the state accumulates across predictions, and a value read before the update keeps the
    old contents."""
    from anemll_fast.mil.loader import load_program
    from anemll_fast.mil.text_writer import write_mlmodelc

    @mb.program(input_specs=[mb.TensorSpec((2, 3), dtype=types.fp16), mb.StateTensorSpec((2, 3), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(x, s):
        old = mb.read_state(input=s)
        new = mb.coreml_update_state(state=s, value=mb.add(x=old, y=x))
        return mb.mul(x=new, y=x, name="out"), mb.identity(x=old, name="before")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    pkg = str(tmp_path / "s.mlpackage")
    model.save(pkg)
    assert {"read_state", "write_state"} <= set(op_histogram(pkg)["main"])
    text_dir = str(tmp_path / "s.mlmodelc")
    write_mlmodelc(load_program(pkg), text_dir)
    mil = (tmp_path / "s.mlmodelc" / "model.mil").read_text()
    lines = mil.splitlines()
    w = next(i for i, line in enumerate(lines) if "write_state(" in line)
    # The write_state + read_state pair back into the one op compiled models hold.
    assert "read_state(input = s)" in lines[w + 1] and "coreml_update_state_0 =" in lines[w + 1]
    value = re.search(r"data = (\w+)", lines[w]).group(1)  # argument order varies
    lines[w:w + 2] = [f'        tensor<fp16, [2, 3]> coreml_update_state_0 = coreml_update_state(state = s, '
                      f'value = {value})[name = string("coreml_update_state_0")];']
    (tmp_path / "s.mlmodelc" / "model.mil").write_text("\n".join(lines) + "\n")
    assert op_histogram(text_dir)["main"].get("coreml_update_state") == 1

    x1 = r(2, 3).astype(np.float16)
    x2 = r(2, 3).astype(np.float16)
    f16 = lambda a: np.asarray(a, np.float16)  # noqa: E731
    for path in (pkg, text_dir):
        m = ReferenceBackend.load(path)
        state = m.make_state()
        o = m.predict({"x": x1}, state)
        np.testing.assert_array_equal(o["before"], np.zeros((2, 3), np.float16))
        np.testing.assert_array_equal(o["out"], f16(x1.astype(np.float32) * x1))
        o = m.predict({"x": x2}, state)
        acc = f16(x1.astype(np.float32) + x2)
        np.testing.assert_array_equal(o["before"], x1)
        np.testing.assert_array_equal(o["out"], f16(acc.astype(np.float32) * x2))
        np.testing.assert_array_equal(state.read("s"), acc)
