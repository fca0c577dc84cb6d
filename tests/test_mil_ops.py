"""Op semantics of the reference backend against numpy expectations written from the MIL op docs.

Programs are built with coremltools' MIL builder and converted with an empty pass pipeline (so the
ops under test are not folded away), saved as .mlpackage and run through ReferenceBackend.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from anemll_fast.backends.reference import ReferenceBackend  # noqa: E402

RNG = np.random.default_rng(0)


def run(tmp_path, prog, inputs, fp16=False, name="m"):
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
                       pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    path = str(tmp_path / f"{name}.mlpackage")
    model.save(path)
    m = ReferenceBackend.load(path)
    return m, m.predict(inputs, m.make_state() if m.state_specs else None)


def spec(shape, dtype=types.fp32):
    return mb.TensorSpec(shape, dtype=dtype)


def r(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


def test_binary_broadcasting_and_comparisons(tmp_path):
    y = r(3, 1)

    @mb.program(input_specs=[spec((2, 3, 4))], opset_version=ct.target.iOS18)
    def prog(x):
        return (mb.add(x=x, y=y, name="add"), mb.sub(x=y, y=x, name="sub"), mb.mul(x=x, y=y, name="mul"),
                mb.real_div(x=x, y=y, name="div"), mb.pow(x=mb.abs(x=x), y=np.float32(1.5), name="pow"),
                mb.maximum(x=x, y=y, name="max"), mb.minimum(x=x, y=y, name="min"),
                mb.greater_equal(x=x, y=y, name="ge"), mb.less(x=x, y=y, name="lt"),
                mb.floor_div(x=x, y=np.float32(0.7), name="fdiv"), mb.mod(x=x, y=np.float32(0.7), name="mod"))

    x = r(2, 3, 4)
    _, o = run(tmp_path, prog, {"x": x})
    close(o["add"], x + y)
    close(o["sub"], y - x)
    close(o["mul"], x * y)
    close(o["div"], x / y, 1e-4)
    close(o["pow"], np.abs(x) ** 1.5, 1e-4)
    close(o["max"], np.maximum(x, y))
    close(o["min"], np.minimum(x, y))
    # Core ML has no bool outputs: the converter appends a cast to fp32
    assert np.array_equal(o["ge"], (x >= y).astype(np.float32))
    assert np.array_equal(o["lt"], (x < y).astype(np.float32))
    close(o["fdiv"], np.floor(x / np.float32(0.7)))
    close(o["mod"], x - np.floor(x / np.float32(0.7)) * np.float32(0.7), 1e-5)


def test_unary_and_activations(tmp_path):
    @mb.program(input_specs=[spec((3, 5))], opset_version=ct.target.iOS18)
    def prog(x):
        return (mb.exp(x=x, name="exp"), mb.tanh(x=x, name="tanh"), mb.sigmoid(x=x, name="sig"),
                mb.silu(x=x, name="silu"), mb.rsqrt(x=mb.abs(x=x), epsilon=0.5, name="rsqrt"),
                mb.sqrt(x=mb.abs(x=x), name="sqrt"), mb.gelu(x=x, mode="EXACT", name="gelu_e"),
                mb.gelu(x=x, mode="TANH_APPROXIMATION", name="gelu_t"),
                mb.gelu(x=x, mode="SIGMOID_APPROXIMATION", name="gelu_s"),
                mb.softmax(x=x, axis=-2, name="softmax"), mb.relu(x=x, name="relu"),
                mb.clip(x=x, alpha=-0.5, beta=0.5, name="clip"))

    x = r(3, 5) * 3
    _, o = run(tmp_path, prog, {"x": x})
    sig = 1 / (1 + np.exp(-x))
    close(o["exp"], np.exp(x), 1e-5)
    close(o["tanh"], np.tanh(x))
    close(o["sig"], sig)
    close(o["silu"], x * sig)
    close(o["rsqrt"], 1 / np.sqrt(np.abs(x) + 0.5))
    close(o["sqrt"], np.sqrt(np.abs(x)))
    close(o["gelu_e"], 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))), 1e-5)
    close(o["gelu_t"], 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))))
    close(o["gelu_s"], x / (1 + np.exp(-1.702 * x)))
    e = np.exp(x - x.max(axis=0, keepdims=True))
    close(o["softmax"], e / e.sum(axis=0, keepdims=True))
    close(o["relu"], np.maximum(x, 0))
    close(o["clip"], np.clip(x, -0.5, 0.5))


def test_reductions_negative_axes(tmp_path):
    @mb.program(input_specs=[spec((2, 3, 4))], opset_version=ct.target.iOS18)
    def prog(x):
        return (mb.reduce_sum(x=x, axes=[-1, 0], keep_dims=False, name="sum"),
                mb.reduce_mean(x=x, axes=[1], keep_dims=True, name="mean"),
                mb.reduce_max(x=x, axes=[-2], name="max"),
                mb.reduce_argmax(x=x, axis=-2, keep_dims=True, name="argmax"),
                mb.reduce_min(x=x, name="min_all"))

    x = r(2, 3, 4)
    _, o = run(tmp_path, prog, {"x": x})
    close(o["sum"], x.sum(axis=(2, 0)))
    close(o["mean"], x.mean(axis=1, keepdims=True))
    close(o["max"], x.max(axis=1))
    assert o["argmax"].dtype == np.int32 and np.array_equal(o["argmax"], np.argmax(x, axis=1)[:, None, :])
    close(o["min_all"], x.min())


def test_layer_norm(tmp_path):
    g, b = r(6), r(6)

    @mb.program(input_specs=[spec((2, 3, 6))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.layer_norm(x=x, axes=[-1], gamma=g, beta=b, epsilon=1e-5, name="ln")

    x = r(2, 3, 6)
    _, o = run(tmp_path, prog, {"x": x})
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    close(o["ln"], (x - mu) / np.sqrt(var + 1e-5) * g + b, 1e-4)


def naive_conv(x, w, b, stride, pads, dil, groups):
    """Direct-loop N=1 2-D convolution (independent of the im2col implementation)."""
    _, cin, H, W = x.shape
    cout, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), pads[0], pads[1]))
    oh = (xp.shape[2] - (kh - 1) * dil[0] - 1) // stride[0] + 1
    ow = (xp.shape[3] - (kw - 1) * dil[1] - 1) // stride[1] + 1
    out = np.zeros((1, cout, oh, ow), np.float64)
    og = cout // groups
    for o_ in range(cout):
        g = o_ // og
        for i in range(oh):
            for j in range(ow):
                acc = 0.0
                for c in range(cg):
                    for u in range(kh):
                        for v in range(kw):
                            acc += xp[0, g * cg + c, i * stride[0] + u * dil[0], j * stride[1] + v * dil[1]] * w[o_, c, u, v]
                out[0, o_, i, j] = acc + (b[o_] if b is not None else 0)
    return out


def test_matmul_linear_conv(tmp_path):
    wl, bl = r(5, 4), r(5)
    w1 = r(6, 4, 1, 1)
    w2, b2 = r(4, 2, 3, 2), r(4)
    w3 = r(3, 4, 3)

    @mb.program(input_specs=[spec((2, 3, 4)), spec((2, 5, 4)), spec((1, 4, 5, 6))], opset_version=ct.target.iOS18)
    def prog(x, y, img):
        return (mb.matmul(x=x, y=y, transpose_y=True, name="mm"),
                mb.matmul(x=y, y=y, transpose_x=True, name="mm_tx"),
                mb.linear(x=x, weight=wl, bias=bl, name="lin"),
                mb.conv(x=img, weight=w1, name="pw"),
                mb.conv(x=img, weight=w2, bias=b2, strides=[2, 1], dilations=[1, 2], groups=2,
                        pad_type="custom", pad=[1, 0, 2, 1], name="grouped"),
                mb.conv(x=mb.reshape(x=img, shape=[1, 4, 30]), weight=w3, pad_type="same", name="conv1d"))

    x, y, img = r(2, 3, 4), r(2, 5, 4), r(1, 4, 5, 6)
    _, o = run(tmp_path, prog, {"x": x, "y": y, "img": img})
    close(o["mm"], x @ np.swapaxes(y, -1, -2), 1e-4)
    close(o["mm_tx"], np.swapaxes(y, -1, -2) @ y, 1e-4)
    close(o["lin"], x @ wl.T + bl, 1e-4)
    close(o["pw"], np.einsum("oc,nchw->nohw", w1[:, :, 0, 0], img), 1e-4)
    close(o["grouped"], naive_conv(img, w2, b2, (2, 1), ((1, 0), (2, 1)), (1, 2), 2), 1e-4)
    seq = img.reshape(1, 4, 30)
    exp1d = naive_conv(seq[:, :, None, :], w3[:, :, None, :], None, (1, 1), ((0, 0), (1, 1)), (1, 1), 1)[:, :, 0]
    close(o["conv1d"], exp1d, 1e-4)


def test_slice_by_index_masks_and_negative(tmp_path):
    @mb.program(input_specs=[spec((4, 5, 6))], opset_version=ct.target.iOS18)
    def prog(x):
        return (mb.slice_by_index(x=x, begin=[1, -4, 0], end=[3, -1, 6], name="neg"),
                mb.slice_by_index(x=x, begin=[9, 1, 2], end=[0, 9, 5], begin_mask=[True, False, False],
                                  end_mask=[True, True, False], name="masks"),
                mb.slice_by_index(x=x, begin=[2, 0, 1], end=[3, 5, 6], stride=[1, 2, 2],
                                  squeeze_mask=[True, False, False], name="squeeze"),
                mb.slice_by_index(x=x, begin=[0, 0, -1], end=[4, 5, 0], squeeze_mask=[False, False, True],
                                  name="last"))

    x = r(4, 5, 6)
    _, o = run(tmp_path, prog, {"x": x})
    close(o["neg"], x[1:3, -4:-1, 0:6])
    close(o["masks"], x[:, 1:, 2:5])
    close(o["squeeze"], x[2, 0:5:2, 1:6:2])
    close(o["last"], x[:, :, -1])


def test_slice_update_dynamic_begin(tmp_path):
    @mb.program(input_specs=[spec((2, 6, 4)), spec((2, 1, 4)), spec((1,), types.int32)],
                opset_version=ct.target.iOS18)
    def prog(x, u, pos):
        zero = np.array([0], np.int32)
        begin = mb.concat(values=[zero, pos, zero], axis=0)
        end = mb.concat(values=[np.array([2], np.int32), mb.add(x=pos, y=np.int32(1)), np.array([4], np.int32)], axis=0)
        upd = mb.slice_update(x=x, update=u, begin=begin, end=end, name="upd")
        # the original x is still read after the update: it must not have been overwritten
        return upd, mb.add(x=x, y=np.float32(0.0), name="orig")

    x, u = r(2, 6, 4), r(2, 1, 4)
    _, o = run(tmp_path, prog, {"x": x, "u": u, "pos": np.array([3], np.int32)})
    want = x.copy()
    want[:, 3:4, :] = u
    close(o["upd"], want)
    close(o["orig"], x)


def test_gather_family(tmp_path):
    table = r(7, 3)

    @mb.program(input_specs=[spec((2, 5, 3)), spec((2, 2), types.int32), spec((2, 4, 3), types.int32)],
                opset_version=ct.target.iOS18)
    def prog(x, idx, idx3):
        return (mb.gather(x=table, indices=idx, axis=0, name="emb"),
                mb.gather(x=x, indices=idx, axis=-2, name="neg_axis"),
                mb.gather(x=x, indices=idx, axis=1, batch_dims=1, name="batched"),
                mb.gather_along_axis(x=x, indices=idx3, axis=-2, name="along"))

    x = r(2, 5, 3)
    idx = np.array([[0, -1], [4, 2]], np.int32)
    idx3 = RNG.integers(-5, 5, size=(2, 4, 3)).astype(np.int32)
    _, o = run(tmp_path, prog, {"x": x, "idx": idx, "idx3": idx3})
    close(o["emb"], table[idx])
    close(o["neg_axis"], np.take(x, idx, axis=1))
    close(o["batched"], np.stack([x[b][idx[b]] for b in range(2)]))
    close(o["along"], np.take_along_axis(x, np.where(idx3 < 0, idx3 + 5, idx3), axis=1))


def test_shape_ops(tmp_path):
    @mb.program(input_specs=[spec((2, 3, 4)), spec((3, 1))], opset_version=ct.target.iOS18)
    def prog(x, y):
        parts = mb.split(x=x, split_sizes=[1, 3], axis=-1, name="split")
        return (mb.concat(values=[x, x], axis=-2, name="cat"),
                mb.concat(values=[x, 2 * np.ones((2, 3, 4), np.float32)], axis=1, interleave=True, name="inter"),
                parts[0], parts[1],
                mb.reshape(x=x, shape=[0, -1], name="reshape"),
                mb.transpose(x=x, perm=[2, 0, 1], name="tr"),
                mb.expand_dims(x=x, axes=[-1, 0], name="exp"),
                mb.squeeze(x=mb.expand_dims(x=x, axes=[1]), axes=[-3], name="sq"),
                mb.tile(x=y, reps=[2, 3], name="tile"),
                mb.select(cond=mb.greater(x=x, y=np.float32(0)), a=x, b=y, name="sel"),
                mb.band_part(x=x, lower=1, upper=0, name="band"),
                mb.cast(x=mb.mul(x=x, y=np.float32(3)), dtype="int32", name="toint"),
                mb.identity(x=x, name="ident"))

    x, y = r(2, 3, 4), r(3, 1)
    _, o = run(tmp_path, prog, {"x": x, "y": y})
    close(o["cat"], np.concatenate([x, x], axis=1))
    inter = np.stack([x, 2 * np.ones_like(x)], axis=2).reshape(2, 6, 4)
    close(o["inter"], inter)
    outs = list(o)
    close(o[outs[2]], x[..., :1])  # split parts come third and fourth, in order
    close(o[outs[3]], x[..., 1:])
    # iOS17+ reshape aligns 0s from the right: [0, -1] on [2, 3, 4] copies dim 1 (3), not dim 0
    close(o["reshape"], x.reshape(3, -1))
    close(o["tr"], x.transpose(2, 0, 1))
    assert o["exp"].shape == (1, 2, 3, 4, 1)
    close(o["sq"], x)
    close(o["tile"], np.tile(y, (2, 3)))
    close(o["sel"], np.where(x > 0, x, y))
    m, n = np.arange(3)[:, None], np.arange(4)[None, :]
    close(o["band"], np.where((m - n <= 1) & (n - m <= 0), x, 0))
    assert o["toint"].dtype == np.int32 and np.array_equal(o["toint"], np.trunc(x * 3).astype(np.int32))
    close(o["ident"], x)


def test_scaled_dot_product_attention(tmp_path):
    mask_f = np.triu(np.full((4, 6), -np.inf, np.float32), 3)
    mask_b = np.tril(np.ones((4, 6), bool), 2)

    @mb.program(input_specs=[spec((1, 2, 4, 8)), spec((1, 2, 6, 8)), spec((1, 2, 6, 8))],
                opset_version=ct.target.iOS18)
    def prog(q, k, v):
        return (mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask_f, name="f"),
                mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask_b, name="b"),
                mb.scaled_dot_product_attention(query=q, key=k, value=v, name="n"))

    q, k, v = r(1, 2, 4, 8), r(1, 2, 6, 8), r(1, 2, 6, 8)
    _, o = run(tmp_path, prog, {"q": q, "k": k, "v": v})

    def sdpa(mask):
        s = q @ np.swapaxes(k, -1, -2) / math.sqrt(8) + mask
        e = np.exp(s - s.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True)) @ v

    close(o["f"], sdpa(mask_f), 1e-4)
    close(o["b"], sdpa(np.where(mask_b, 0, -np.inf)), 1e-4)
    close(o["n"], sdpa(0), 1e-4)


def _sub_byte(values, dtype):
    return values.astype(dtype)


def test_constexpr_lut_uint4_grouped_uint6_vector(tmp_path):
    # uint4, per grouped channel: 8 output channels in 2 groups, each with its own 16-entry table
    idx4 = RNG.integers(0, 16, size=(8, 6)).astype(np.uint8)
    lut4 = r(2, 1, 16, 1).astype(np.float16)
    # uint6 per-tensor table
    idx6 = RNG.integers(0, 64, size=(4, 5)).astype(np.uint8)
    lut6 = r(1, 1, 64, 1).astype(np.float16)
    # vector palettization: VECTOR_SIZE 2 along axis 1
    idx2 = RNG.integers(0, 4, size=(3, 2)).astype(np.uint8)
    lutv = r(1, 1, 4, 2).astype(np.float16)

    @mb.program(input_specs=[spec((1, 6), types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        w4 = mb.constexpr_lut_to_dense(indices=_sub_byte(idx4, types.np_uint4_dtype), lut=lut4, name="w4")
        w6 = mb.constexpr_lut_to_dense(indices=_sub_byte(idx6, types.np_uint6_dtype), lut=lut6, name="w6")
        wv = mb.constexpr_lut_to_dense(indices=_sub_byte(idx2, types.np_uint2_dtype), lut=lutv,
                                       vector_axis=1, name="wv")
        return (mb.add(x=w4, y=np.float16(0), name="o4"), mb.add(x=w6, y=np.float16(0), name="o6"),
                mb.add(x=wv, y=np.float16(0), name="ov"))

    _, o = run(tmp_path, prog, {"x": np.zeros((1, 6), np.float16)}, fp16=True)
    group = np.arange(8)[:, None] // 4
    np.testing.assert_array_equal(o["o4"], lut4[group, 0, idx4, 0])
    np.testing.assert_array_equal(o["o6"], lut6[0, 0, idx6, 0])
    want_v = np.zeros((3, 4), np.float16)
    for i in range(3):
        for j in range(2):
            want_v[i, 2 * j:2 * j + 2] = lutv[0, 0, idx2[i, j]]
    np.testing.assert_array_equal(o["ov"], want_v)


def test_constexpr_quantized(tmp_path):
    q8 = RNG.integers(-128, 127, size=(4, 6)).astype(np.int8)
    scale = (RNG.random(4) + 0.5).astype(np.float16)
    zp = RNG.integers(-3, 3, size=4).astype(np.int8)
    data = RNG.integers(0, 16, size=(4, 6)).astype(np.uint8)
    bscale = (RNG.random((2, 3)) + 0.5).astype(np.float32)
    boff = RNG.integers(0, 16, size=(2, 3)).astype(np.uint8)

    @mb.program(input_specs=[spec((1,))], opset_version=ct.target.iOS18)
    def prog(x):
        a = mb.constexpr_blockwise_shift_scale(data=q8, scale=scale.reshape(4, 1), offset=zp.reshape(4, 1), name="a")
        b = mb.constexpr_blockwise_shift_scale(data=_sub_byte(data, types.np_uint4_dtype), scale=bscale,
                                               offset=_sub_byte(boff, types.np_uint4_dtype), name="b")
        return mb.add(x=mb.cast(x=a, dtype="fp32"), y=np.float32(0), name="oa"), mb.add(x=b, y=x, name="ob")

    _, o = run(tmp_path, prog, {"x": np.zeros(1, np.float32)})
    want_a = ((q8.astype(np.float32) - zp[:, None]) * scale[:, None].astype(np.float32)).astype(np.float16)
    close(o["oa"], want_a, 1e-3)
    rep = lambda a: np.repeat(np.repeat(a, 2, 0), 2, 1)  # noqa: E731
    close(o["ob"], (data.astype(np.float32) - rep(boff)) * rep(bscale))


def test_fp16_outputs_rounded_per_op(tmp_path):
    """compute_precision fp16: every intermediate is rounded to fp16, as on the device."""
    c = np.float16(1.0009765625)  # 1 + 2**-10

    @mb.program(input_specs=[spec((4,), types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        a = mb.mul(x=x, y=c, name="a")
        return mb.sub(x=a, y=x, name="d")

    x = np.array([1.0, 3.0, 1000.0, 0.1], np.float16)
    _, o = run(tmp_path, prog, {"x": x}, fp16=True)
    a = (x.astype(np.float32) * np.float32(c)).astype(np.float16)
    want = (a.astype(np.float32) - x.astype(np.float32)).astype(np.float16)
    assert o["d"].dtype == np.float16
    np.testing.assert_array_equal(o["d"], want)


def test_state_update_shared_across_functions_and_files(tmp_path):
    def build(name, delta):
        @mb.program(input_specs=[spec((1, 4), types.fp16), mb.StateTensorSpec((3, 4), dtype=types.fp16),
                                 spec((1,), types.int32)], opset_version=ct.target.iOS18)
        def prog(x, cache, pos):
            before = mb.read_state(input=cache)
            begin = mb.concat(values=[pos, np.array([0], np.int32)], axis=0)
            end = mb.concat(values=[mb.add(x=pos, y=np.int32(1)), np.array([4], np.int32)], axis=0)
            upd = mb.slice_update(x=before, update=mb.add(x=x, y=np.float16(delta)), begin=begin, end=end)
            mb.coreml_update_state(state=cache, value=upd)
            after = mb.read_state(input=cache)
            # `before` is read again after the update: must still hold the old contents
            return mb.reduce_sum(x=before, axes=[0, 1], name="old_sum"), mb.identity(x=after, name="now")

        model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                           pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
        path = str(tmp_path / f"{name}.mlpackage")
        model.save(path)
        return ReferenceBackend.load(path)

    a, b = build("a", 0.0), build("b", 10.0)
    state = a.make_state()
    x = np.ones((1, 4), np.float16)
    o = a.predict({"x": x, "pos": np.array([0], np.int32)}, state)
    assert float(o["old_sum"]) == 0.0
    o = b.predict({"x": x, "pos": np.array([2], np.int32)}, state)  # another file, same state spec
    assert float(o["old_sum"]) == 4.0
    want = np.zeros((3, 4), np.float16)
    want[0] = 1
    want[2] = 11
    np.testing.assert_array_equal(o["now"], want)
    np.testing.assert_array_equal(state.read("cache"), want)


def test_ios16_constexpr_affine_dequantize_and_packed_lut(tmp_path):
    q = RNG.integers(0, 255, size=(3, 4)).astype(np.uint8)
    zp = RNG.integers(100, 150, size=3).astype(np.uint8)
    scale = (RNG.random(3) + 0.5).astype(np.float32)
    lut = r(4)  # 2-bit palette
    idx = RNG.integers(0, 4, size=10).astype(np.uint8)
    packed = np.packbits(((idx[:, None] >> np.arange(2)) & 1).astype(np.uint8).ravel(), bitorder="little")

    @mb.program(input_specs=[spec((1,))], opset_version=ct.target.iOS16)
    def prog(x):
        a = mb.constexpr_affine_dequantize(quantized_data=q, zero_point=zp, scale=scale, axis=0, name="a")
        b = mb.constexpr_lut_to_dense(lut=lut, indices=packed, shape=np.array([2, 5], np.uint32), name="b")
        return mb.add(x=a, y=x, name="oa"), mb.add(x=b, y=x, name="ob")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
                       skip_model_load=True)
    path = str(tmp_path / "q.mlpackage")
    model.save(path)
    o = ReferenceBackend.load(path).predict({"x": np.zeros(1, np.float32)})
    close(o["oa"], (q.astype(np.float32) - zp[:, None]) * scale[:, None])
    close(o["ob"], lut[idx].reshape(2, 5))
