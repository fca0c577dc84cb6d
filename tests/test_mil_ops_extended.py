"""The rest of MIL's op set (issue 18): each op against a numpy expectation written from its MIL doc.

Same harness as test_mil_ops: coremltools' builder, an empty pass pipeline, ReferenceBackend.
"""
from __future__ import annotations

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from anemll_fast.backends.reference import ReferenceBackend  # noqa: E402
from test_mil_ops import close as _close, run, spec  # noqa: E402

RNG = np.random.default_rng(18)
iOS18 = ct.target.iOS18
_FP16_TOL = [0.0]  # tolerance floor while an fp16-precision case runs


def r(*shape):
    """Random inputs that fp16 represents exactly, so fp32 and fp16 cases share expectations."""
    return RNG.standard_normal(shape).astype(np.float16).astype(np.float32)


def close(a, b, tol=1e-5):
    _close(a, b, max(tol, _FP16_TOL[0]))


@pytest.fixture(autouse=True)
def _precision(request):
    """Cases parametrized with fp16=True run the program in fp16 (Core ML's precision on the ANE):
    results are compared at fp16 resolution."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    _FP16_TOL[0] = 2e-2 if params.get("fp16") else 0.0
    yield
    _FP16_TOL[0] = 0.0


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_parametric_activations(tmp_path, fp16):
    a = np.array([0.1, -0.3, 0.7], np.float32)
    b = np.array([1.5, 0.5, 2.0], np.float32)

    @mb.program(input_specs=[spec((2, 3, 4))], opset_version=iOS18)
    def prog(x):
        return (mb.clamped_relu(x=x, alpha=0.3, beta=0.8, name="clamped"),
                mb.linear_activation(x=x, alpha=1.5, beta=-0.25, name="linear"),
                mb.scaled_tanh(x=x, alpha=2.0, beta=0.5, name="stanh"),
                mb.sigmoid_hard(x=x, alpha=0.3, beta=0.4, name="shard"),
                mb.thresholded_relu(x=x, alpha=0.2, name="trelu"),
                mb.prelu(x=mb.expand_dims(x=x, axes=[-1]), alpha=a, name="prelu"),
                mb.softplus_parametric(x=mb.expand_dims(x=x, axes=[-1]), alpha=a, beta=b, name="spp"))

    x = r(2, 3, 4)
    _, o = run(tmp_path, prog, {"x": x}, fp16=fp16)
    close(o["clamped"], np.where(x >= 0, np.minimum(x, 0.8), np.minimum(0.3 * x, 0.8)))
    close(o["linear"], 1.5 * x - 0.25)
    close(o["stanh"], 2 * np.tanh(0.5 * x))
    close(o["shard"], np.clip(0.3 * x + 0.4, 0, 1))
    close(o["trelu"], np.where(x >= 0.2, x, 0))
    close(o["prelu"], np.where(x > 0, x, a[None, :, None] * x)[..., None])
    close(o["spp"], (a[None, :, None] * np.log1p(np.exp(b[None, :, None] * x)))[..., None], 1e-5)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_scatter_family_and_gather_nd(tmp_path, fp16):
    data = r(4, 3)
    idx = np.array([2, 0, 2], np.int32)           # a duplicate index: modes must accumulate
    upd = r(3, 3)
    idx_axis = np.array([[1, 0, 3], [3, 3, 0]], np.int32)
    upd_axis = r(2, 3)
    nd_idx = np.array([[0, 1], [3, 2], [0, 1]], np.int32)
    nd_upd = r(3)

    @mb.program(input_specs=[spec((4, 3))], opset_version=iOS18)
    def prog(x):
        return (mb.scatter(data=x, indices=idx, updates=upd, mode="add", name="s_add"),
                mb.scatter(data=x, indices=idx, updates=upd, mode="update", name="s_upd"),
                mb.scatter(data=x, indices=np.array([1, 2], np.int32), updates=r(4, 2)[:, :] * 0 + 2,
                           axis=-1, mode="mul", name="s_mul"),
                mb.scatter_along_axis(data=x, indices=idx_axis, updates=upd_axis, axis=0, mode="max",
                                      name="sa_max"),
                mb.scatter_nd(data=x, indices=nd_idx, updates=nd_upd, mode="sub", name="snd"),
                mb.gather_nd(x=x, indices=np.array([[3, 1], [0, 2]], np.int32), name="gnd"),
                mb.gather_nd(x=x, indices=np.array([[2], [1]], np.int32), name="gnd_rows"))

    _, o = run(tmp_path, prog, {"x": data}, fp16=fp16)
    want = data.copy()
    for i, j in enumerate(idx):
        want[j] += upd[i]
    close(o["s_add"], want)
    want = data.copy()
    want[0], want[2] = upd[1], upd[2]  # last write wins
    close(o["s_upd"], want)
    want = data.copy()
    want[:, 1:3] *= 2
    close(o["s_mul"], want)
    want = data.copy()
    for i in range(2):
        for c in range(3):
            want[idx_axis[i, c], c] = max(want[idx_axis[i, c], c], upd_axis[i, c])
    close(o["sa_max"], want)
    want = data.copy()
    for k, (a, b) in enumerate(nd_idx):
        want[a, b] -= nd_upd[k]
    close(o["snd"], want)
    close(o["gnd"], [data[3, 1], data[0, 2]])
    close(o["gnd_rows"], data[[2, 1]])


def test_gather_nd_batch_dims(tmp_path):
    x = r(2, 3, 4)
    ind = np.array([[[1], [2]], [[0], [0]]], np.int32)  # [2, 2, 1]: per batch, rows of x[b]

    @mb.program(input_specs=[spec((2, 3, 4))], opset_version=iOS18)
    def prog(x):
        return mb.gather_nd(x=x, indices=ind, batch_dims=1, name="g")

    _, o = run(tmp_path, prog, {"x": x})
    close(o["g"], np.stack([x[0][[1, 2]], x[1][[0, 0]]]))


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_index_ops(tmp_path, fp16):
    @mb.program(input_specs=[spec((2, 5)), spec((3,), types.int32)], opset_version=iOS18)
    def prog(x, i):
        return (mb.one_hot(indices=i, one_hot_vector_size=4, axis=0, on_value=3.0, off_value=-1.0,
                           name="oh"),
                mb.argsort(x=x, axis=-1, ascending=True, name="asc"),
                mb.argsort(x=x, axis=0, name="desc"),
                mb.reverse(x=x, axes=[-1], name="rev"),
                mb.reverse(x=x, name="rev_all"),
                mb.reverse_sequence(x=x, lengths=np.array([3, 5], np.int32), seq_axis=1, batch_axis=0,
                                    name="revseq"),
                mb.sliding_windows(x=x, axis=1, size=2, stride=2, name="win"),
                mb.flatten2d(x=mb.reshape(x=x, shape=[2, 5, 1]), axis=-1, name="flat"),
                mb.cast(x=mb.non_zero(x=mb.relu(x=x)), dtype="fp32", name="nz"))

    x = r(2, 5)
    i = np.array([3, 0, 1], np.int32)
    _, o = run(tmp_path, prog, {"x": x, "i": i}, fp16=fp16)
    oh = np.full((4, 3), -1.0, np.float32)
    oh[i, np.arange(3)] = 3.0
    close(o["oh"], oh)
    assert np.array_equal(o["asc"], np.argsort(x, axis=-1))
    assert np.array_equal(o["desc"], np.argsort(-x, axis=0, kind="stable"))
    close(o["rev"], x[:, ::-1])
    close(o["rev_all"], x[::-1, ::-1])
    want = x.copy()
    want[0, :3] = x[0, 2::-1]
    want[1] = x[1, ::-1]
    close(o["revseq"], want)
    close(o["win"], np.stack([x[:, 0:2], x[:, 2:4]], axis=1))
    close(o["flat"], x.reshape(10, 1))
    close(o["nz"], np.argwhere(np.maximum(x, 0) != 0))


def test_reshape_like_tile_dynamic_and_einsum(tmp_path):
    a, b = r(2, 3, 4, 5), r(2, 5, 4, 6)

    @mb.program(input_specs=[spec((2, 3, 4, 5)), spec((2, 5, 4, 6)), spec((2,), types.int32)],
                opset_version=iOS18)
    def prog(x, y, reps):
        flat = mb.reshape(x=x, shape=[-1])
        return (mb.reshape_like(x=flat, ref_tensors=(y, x), begins=(0, 1), ends=(1, 0),
                                end_masks=(False, True), name="rl"),
                mb.tile(x=mb.slice_by_size(x=x, begin=[0, 0, 0, 0], size=[1, 1, 2, 3]),
                        reps=mb.concat(values=[np.array([1, 2], np.int32), reps], axis=0), name="tile"),
                mb.einsum(values=(x, y), equation="nchw,nwhu->nchu", name="ein"))

    _, o = run(tmp_path, prog, {"x": a, "y": b, "reps": np.array([3, 1], np.int32)})
    close(o["rl"], a)  # shape [2] from y[0:1] and [3, 4, 5] from x[1:]
    close(o["tile"], np.tile(a[:1, :1, :2, :3], (1, 2, 3, 1)))
    close(o["ein"], np.einsum("nchw,nwhu->nchu", a, b), 1e-4)


def _naive_d2s(x, b):
    n, c, h, w = x.shape
    cc = c // (b * b)
    out = np.zeros((n, cc, h * b, w * b), x.dtype)
    for i in range(b):
        for j in range(b):
            out[:, :, i::b, j::b] = x[:, (i * b + j) * cc:(i * b + j + 1) * cc]
    return out


def _naive_pixel_shuffle(x, f):
    n, c, h, w = x.shape
    out = np.zeros((n, c // (f * f), h * f, w * f), x.dtype)
    for cc in range(c // (f * f)):
        for i in range(f):
            for j in range(f):
                out[:, cc, i::f, j::f] = x[:, cc * f * f + i * f + j]
    return out


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_block_moves(tmp_path, fp16):
    x = r(2, 8, 2, 4)

    @mb.program(input_specs=[spec((2, 8, 2, 4))], opset_version=iOS18)
    def prog(x):
        return (mb.depth_to_space(x=x, block_size=2, name="d2s"),
                mb.space_to_depth(x=mb.depth_to_space(x=x, block_size=2), block_size=2, name="s2d"),
                mb.pixel_shuffle(x=x, upscale_factor=2, name="ps"),
                mb.pixel_unshuffle(x=mb.pixel_shuffle(x=x, upscale_factor=2), downscale_factor=np.uint32(2),
                                   name="pu"),
                mb.space_to_batch(x=x, block_shape=[2, 2], paddings=[[0, 2], [1, 1]], name="s2b"),
                mb.batch_to_space(x=mb.space_to_batch(x=x, block_shape=[2, 2], paddings=[[0, 2], [1, 1]]),
                                  block_shape=[2, 2], crops=[[0, 2], [1, 1]], name="b2s"))

    _, o = run(tmp_path, prog, {"x": x}, fp16=fp16)
    close(o["d2s"], _naive_d2s(x, 2))
    close(o["s2d"], x)
    close(o["ps"], _naive_pixel_shuffle(x, 2))
    close(o["pu"], x)
    padded = np.pad(x, [(0, 0), (0, 0), (0, 2), (1, 1)])
    want = np.zeros((8, 8, 2, 3), np.float32)
    for i in range(2):
        for j in range(2):
            want[(i * 2 + j) * 2:(i * 2 + j + 1) * 2] = padded[:, :, i::2, j::2]
    close(o["s2b"], want)
    close(o["b2s"], x)


def _naive_pool(x, k, s, pads, kind, exclude=False):
    xp = np.pad(x, [(0, 0), (0, 0)] + pads, constant_values=np.nan)
    oh = (xp.shape[2] - k[0]) // s[0] + 1
    ow = (xp.shape[3] - k[1]) // s[1] + 1
    out = np.zeros(x.shape[:2] + (oh, ow), np.float64)
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1]].reshape(x.shape[:2] + (-1,))
            if kind == "max":
                out[:, :, i, j] = np.nanmax(win, -1)
            elif kind == "l2":
                out[:, :, i, j] = np.sqrt(np.nansum(win * win, -1))
            else:
                out[:, :, i, j] = np.nansum(win, -1) / (np.sum(~np.isnan(win), -1) if exclude else k[0] * k[1])
    return out


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_pooling(tmp_path, fp16):
    x = r(1, 2, 5, 6)

    @mb.program(input_specs=[spec((1, 2, 5, 6))], opset_version=iOS18)
    def prog(x):
        return (mb.max_pool(x=x, kernel_sizes=[2, 3], strides=[2, 1], pad_type="valid", name="maxv"),
                mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[1, 2], pad_type="custom", pad=[1, 1, 0, 2],
                            exclude_padding_from_average=True, name="avg_ex"),
                mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[1, 2], pad_type="custom", pad=[1, 1, 0, 2],
                            name="avg_in"),
                mb.l2_pool(x=x, kernel_sizes=[2, 2], strides=[1, 1], pad_type="same", name="l2s"),
                mb.max_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid", ceil_mode=True,
                            name="maxceil"))

    _, o = run(tmp_path, prog, {"x": x}, fp16=fp16)
    close(o["maxv"], _naive_pool(x, (2, 3), (2, 1), [(0, 0), (0, 0)], "max"))
    close(o["avg_ex"], _naive_pool(x, (3, 3), (1, 2), [(1, 1), (0, 2)], "avg", exclude=True))
    close(o["avg_in"], _naive_pool(x, (3, 3), (1, 2), [(1, 1), (0, 2)], "avg"))
    close(o["l2s"], _naive_pool(x, (2, 2), (1, 1), [(0, 1), (0, 1)], "l2"))
    # ceil mode: 5x6 -> 3x3, the last row window covering only the input's last row
    close(o["maxceil"], _naive_pool(x, (2, 2), (2, 2), [(0, 1), (0, 0)], "max"))


# Grid points of a 2-pixel input [0, 1] resized to 5 and 6, as resize_bilinear's doc lists them.
DOC_GRIDS = {
    ("UNALIGN_CORNERS", 5): [0., 0.1, 0.5, 0.9, 1.], ("STRICT_ALIGN_CORNERS", 5): [0., 0.25, 0.5, 0.75, 1.],
    ("DEFAULT", 5): [0., 0.4, 0.8, 1., 1.], ("OFFSET_CORNERS", 5): [0.1, 0.3, 0.5, 0.7, 0.9],
    ("UNALIGN_CORNERS", 6): [0., 0., 1 / 3, 2 / 3, 1., 1.], ("ALIGN_CORNERS", 6): [0., .2, .4, .6, .8, 1.],
    ("DEFAULT", 6): [0., 1 / 3, 2 / 3, 1., 1., 1.],
    ("OFFSET_CORNERS", 6): [1 / 12, 0.25, 5 / 12, 7 / 12, 0.75, 11 / 12],
}


def test_resize_bilinear_sampling_modes_match_the_doc(tmp_path):
    outs = {}

    @mb.program(input_specs=[spec((1, 1, 2))], opset_version=iOS18)
    def prog(x):
        for i, (mode, n) in enumerate(DOC_GRIDS):
            outs[i] = mb.resize_bilinear(x=x, target_size_height=1, target_size_width=n, sampling_mode=mode,
                                         name=f"o{i}")
        return tuple(outs.values())

    _, o = run(tmp_path, prog, {"x": np.array([[[0.0, 1.0]]], np.float32)})
    for i, key in enumerate(DOC_GRIDS):
        close(o[f"o{i}"].reshape(-1), DOC_GRIDS[key], 1e-6)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_upsample_resize_and_crop(tmp_path, fp16):
    x = r(1, 2, 3, 4)

    @mb.program(input_specs=[spec((1, 2, 3, 4)), spec((2,), types.int32)], opset_version=iOS18)
    def prog(x, size):
        return (mb.upsample_nearest_neighbor(x=x, scale_factor_height=2.0, scale_factor_width=1.5, name="unn"),
                mb.upsample_bilinear(x=mb.slice_by_size(x=x, begin=[0, 0, 0, 0], size=[1, 1, 1, 2]),
                                     scale_factor_height=1.0, scale_factor_width=2.5, align_corners=False,
                                     name="ubl"),
                mb.upsample_bilinear(x=x, scale_factor_height=2, scale_factor_width=2, align_corners=True,
                                     name="ubl_ac"),
                mb.resize_nearest_neighbor(x=x, target_size_height=6, target_size_width=2, name="rnn"),
                mb.resize(x=x, shape=size, resized_dims=np.uint32(2), interpolation_mode="NEAREST_NEIGHBOR",
                          name="rs"),
                mb.crop(x=x, crop_height=[1, 0], crop_width=[1, 2], name="crop"))

    _, o = run(tmp_path, prog, {"x": x, "size": np.array([6, 2], np.int32)}, fp16=fp16)
    close(o["unn"], x[:, :, [0, 0, 1, 1, 2, 2]][..., [0, 0, 1, 2, 2, 3]])
    close(o["ubl"].reshape(-1), x[0, 0, 0, 0] + (x[0, 0, 0, 1] - x[0, 0, 0, 0]) * np.array(DOC_GRIDS[
        ("UNALIGN_CORNERS", 5)], np.float32), 1e-5)
    ys, xs = np.arange(6) * 2 / 5, np.arange(8) * 3 / 7
    want = np.zeros((1, 2, 6, 8), np.float32)
    for i, yy in enumerate(ys):
        for j, xx in enumerate(xs):
            y0, x0 = int(np.floor(yy)), int(np.floor(xx))
            y1, x1 = min(y0 + 1, 2), min(x0 + 1, 3)
            fy, fx = yy - y0, xx - x0
            want[..., i, j] = (x[..., y0, x0] * (1 - fy) * (1 - fx) + x[..., y0, x1] * (1 - fy) * fx
                               + x[..., y1, x0] * fy * (1 - fx) + x[..., y1, x1] * fy * fx)
    close(o["ubl_ac"], want, 1e-5)
    close(o["rnn"], x[:, :, [0, 0, 1, 1, 2, 2]][..., [0, 2]])
    close(o["rs"], o["rnn"])
    close(o["crop"], x[:, :, 1:, 1:2])


def test_crop_resize_align_corners(tmp_path):
    x = r(2, 3, 5, 6)
    boxes = np.array([[0.0, 1.0, 4.0, 3.0], [1.0, 0.5, 2.0, 5.0]], np.float32)
    box_idx = np.array([1, 0], np.int32)

    @mb.program(input_specs=[spec((2, 3, 5, 6))], opset_version=iOS18)
    def prog(x):
        return mb.crop_resize(x=x, boxes=boxes, box_indices=box_idx, target_height=3, target_width=4,
                              sampling_mode="STRICT_ALIGN_CORNERS", name="cr")

    _, o = run(tmp_path, prog, {"x": x})
    want = np.zeros((2, 3, 3, 4), np.float32)
    for k, (y0, x0, y1, x1) in enumerate(boxes):
        img = x[box_idx[k]]
        for i, yy in enumerate(np.linspace(y0, y1, 3)):
            for j, xx in enumerate(np.linspace(x0, x1, 4)):
                a, b = int(np.floor(yy)), int(np.floor(xx))
                fy, fx = yy - a, xx - b
                a1, b1 = min(a + 1, 4), min(b + 1, 5)
                want[k, :, i, j] = (img[:, a, b] * (1 - fy) * (1 - fx) + img[:, a, b1] * (1 - fy) * fx
                                    + img[:, a1, b] * fy * (1 - fx) + img[:, a1, b1] * fy * fx)
    close(o["cr"], want, 1e-5)


@pytest.mark.parametrize("mode,expected", [
    ("constant", [0, 0, 0, 1, 2, 3, 0, 0, 0]), ("border", [1, 1, 1, 1, 2, 3, 3, 3, 3]),
    ("reflection", [2, 3, 2, 1, 2, 3, 2, 1, 2]), ("symmetric", [3, 2, 1, 1, 2, 3, 3, 2, 1]),
])
def test_resample_padding_modes_match_the_doc(tmp_path, mode, expected):
    # the doc's 1-D example |1, 2, 3| sampled at pixels -3..5 (nearest, unnormalized coordinates)
    coords = np.stack([np.arange(-3, 6, dtype=np.float32), np.zeros(9, np.float32)], -1).reshape(1, 1, 9, 2)

    @mb.program(input_specs=[spec((1, 1, 1, 3))], opset_version=iOS18)
    def prog(x):
        return mb.resample(x=x, coordinates=coords, sampling_mode="nearest", padding_mode=mode,
                           padding_value=0.0, coordinates_mode="unnormalized", align_corners=True, name="o")

    _, o = run(tmp_path, prog, {"x": np.array([[[[1, 2, 3]]]], np.float32)}, name=mode)
    close(o["o"].reshape(-1), expected)


def test_resample_bilinear_and_affine(tmp_path):
    x = r(1, 2, 4, 5)
    coords = np.array([[[[-1, -1], [1, 1], [0, 0]], [[0.5, -0.25], [-0.2, 0.9], [2, 0]]]], np.float32)
    eye = np.array([[1, 0, 0, 0, 1, 0]], np.float32)

    @mb.program(input_specs=[spec((1, 2, 4, 5))], opset_version=iOS18)
    def prog(x):
        return (mb.resample(x=x, coordinates=coords, sampling_mode="bilinear", padding_mode="constant",
                            padding_value=0.0, coordinates_mode="normalized_minus_one_to_one",
                            align_corners=True, name="rs"),
                mb.affine(x=x, transform_matrix=eye, output_height=4, output_width=5, sampling_mode="bilinear",
                          padding_mode="constant", padding_value=0.0,
                          coordinates_mode="normalized_minus_one_to_one", align_corners=True, name="aff"))

    _, o = run(tmp_path, prog, {"x": x})
    want = np.zeros((1, 2, 2, 3), np.float32)
    for i in range(2):
        for j in range(3):
            px, py = (coords[0, i, j, 0] + 1) / 2 * 4, (coords[0, i, j, 1] + 1) / 2 * 3
            x0, y0 = int(np.floor(px)), int(np.floor(py))
            acc = np.zeros(2, np.float32)
            for dy in (0, 1):
                for dx in (0, 1):
                    yy, xx = y0 + dy, x0 + dx
                    wgt = (1 - abs(px - xx)) * (1 - abs(py - yy))
                    if 0 <= yy < 4 and 0 <= xx < 5:
                        acc += wgt * x[0, :, yy, xx]
            want[0, :, i, j] = acc
    close(o["rs"], want, 1e-5)
    close(o["aff"], x, 1e-5)  # the identity transform gives the image back


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_instance_and_local_response_norm(tmp_path, fp16):
    g, b = r(3), r(3)

    @mb.program(input_specs=[spec((2, 3, 4, 5))], opset_version=iOS18)
    def prog(x):
        return (mb.instance_norm(x=x, gamma=g, beta=b, epsilon=1e-2, name="inorm"),
                mb.local_response_norm(x=x, size=2, alpha=0.5, beta=0.6, k=1.5, name="lrn"))

    x = r(2, 3, 4, 5)
    _, o = run(tmp_path, prog, {"x": x}, fp16=fp16)
    m = x.mean(axis=(2, 3), keepdims=True)
    v = x.var(axis=(2, 3), keepdims=True)
    close(o["inorm"], (x - m) / np.sqrt(v + 1e-2) * g[:, None, None] + b[:, None, None], 1e-4)
    want = np.zeros_like(x)
    for c in range(3):
        lo, hi = max(c - 0, 0), min(c + 1, 2)  # size 2: the channel and the next one
        s = (x[:, lo:hi + 1] ** 2).sum(axis=1)
        want[:, c] = x[:, c] / (1.5 + 0.5 / 2 * s) ** 0.6
    close(o["lrn"], want, 1e-4)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_conv_transpose(tmp_path, fp16):
    w = r(4, 3, 3, 2)  # [Cin, Cout/groups, kh, kw], groups 2 -> Cout 6
    bias = r(6)

    @mb.program(input_specs=[spec((1, 4, 3, 4))], opset_version=iOS18)
    def prog(x):
        return (mb.conv_transpose(x=x, weight=w, bias=bias, strides=[2, 1], dilations=[1, 2], groups=2,
                                  pad_type="custom", pad=[1, 0, 0, 1], name="ct"),
                mb.conv_transpose(x=x, weight=w[:, :, :2], strides=[2, 2], groups=2, pad_type="same",
                                  name="ct_same"))

    x = r(1, 4, 3, 4)
    _, o = run(tmp_path, prog, {"x": x}, fp16=fp16)

    def naive(x, w, s, d, groups):
        cin, og, kh, kw = w.shape
        cg = cin // groups
        H = (x.shape[2] - 1) * s[0] + (kh - 1) * d[0] + 1
        W = (x.shape[3] - 1) * s[1] + (kw - 1) * d[1] + 1
        y = np.zeros((1, og * groups, H, W))
        for ci in range(cin):
            g = ci // cg
            for i in range(x.shape[2]):
                for j in range(x.shape[3]):
                    for a in range(kh):
                        for b2 in range(kw):
                            y[0, g * og:(g + 1) * og, i * s[0] + a * d[0], j * s[1] + b2 * d[1]] += \
                                x[0, ci, i, j] * w[ci, :, a, b2]
        return y

    full = naive(x, w, (2, 1), (1, 2), 2)
    close(o["ct"], full[:, :, 1:, :-1] + bias[None, :, None, None], 1e-4)
    full2 = naive(x, w[:, :, :2], (2, 2), (1, 1), 2)  # 6x8 exactly: "same" keeps it
    close(o["ct_same"], full2, 1e-4)


def _sig(v):
    return 1 / (1 + np.exp(-v))


def test_rnn_gru_lstm(tmp_path):
    S, B, I, H = 4, 2, 3, 5
    x, h0, c0 = r(S, B, I), r(B, H), r(B, H)
    rw_i, rw_h, rb = r(H, I), r(H, H), r(H)
    gw_i, gw_h, gb, gib = r(3 * H, I), r(3 * H, H), r(3 * H), r(3 * H)
    lw_i, lw_h, lb, peep = r(4 * H, I), r(4 * H, H), r(4 * H), r(3 * H)

    @mb.program(input_specs=[spec((S, B, I)), spec((B, H)), spec((B, H))], opset_version=iOS18)
    def prog(x, h0, c0):
        rnn = mb.rnn(x=x, initial_h=h0, weight_ih=rw_i, weight_hh=rw_h, bias=rb, direction="reverse",
                     output_sequence=True, activation="tanh")
        gru = mb.gru(x=x, initial_h=h0, weight_ih=gw_i, weight_hh=gw_h, bias=gb, input_bias=gib,
                     output_sequence=True, reset_after=True)
        gru0 = mb.gru(x=x, initial_h=h0, weight_ih=gw_i, weight_hh=gw_h, bias=gb)
        lstm = mb.lstm(x=x, initial_h=h0, initial_c=c0, weight_ih=lw_i, weight_hh=lw_h, bias=lb,
                       peephole=peep, output_sequence=True, clip=2.0)
        return (mb.identity(x=rnn[0], name="rnn_y"), mb.identity(x=gru[0], name="gru_y"),
                mb.identity(x=gru0[1], name="gru0_h"), mb.identity(x=lstm[0], name="lstm_y"),
                mb.identity(x=lstm[2], name="lstm_c"))

    _, o = run(tmp_path, prog, {"x": x, "h0": h0, "c0": c0})
    h, ys = h0.astype(np.float64), []
    for t in reversed(range(S)):
        h = np.tanh(x[t] @ rw_i.T + h @ rw_h.T + rb)
        ys.append(h)
    close(o["rnn_y"], np.stack(ys), 1e-4)

    def gru_ref(reset_after, ib):
        h, ys = h0.astype(np.float64), []
        Wr, Wo, Wz = np.split(gw_i, 3)
        Rr, Ro, Rz = np.split(gw_h, 3)
        br, bo, bz = np.split(gb, 3)
        ir, io, iz = np.split(ib, 3)
        for t in range(S):
            rg = _sig(x[t] @ Wr.T + ir + h @ Rr.T + br)
            zg = _sig(x[t] @ Wz.T + iz + h @ Rz.T + bz)
            og = np.tanh(x[t] @ Wo.T + io + (rg * (h @ Ro.T + bo) if reset_after else (rg * h) @ Ro.T + bo))
            h = (1 - zg) * og + zg * h
            ys.append(h)
        return np.stack(ys), h

    close(o["gru_y"], gru_ref(True, gib)[0], 1e-4)
    close(o["gru0_h"], gru_ref(False, np.zeros_like(gib))[1], 1e-4)
    h, c, ys = h0.astype(np.float64), c0.astype(np.float64), []
    Wi, Wf, Wo, Wz = np.split(lw_i, 4)
    Ri, Rf, Ro, Rz = np.split(lw_h, 4)
    bi, bf, bo, bz = np.split(lb, 4)
    pi, pf, po = np.split(peep, 3)
    for t in range(S):
        ig = _sig(x[t] @ Wi.T + h @ Ri.T + bi + c * pi)
        fg = _sig(x[t] @ Wf.T + h @ Rf.T + bf + c * pf)
        c = np.clip(fg * c + ig * np.tanh(x[t] @ Wz.T + h @ Rz.T + bz), -2, 2)
        og = _sig(x[t] @ Wo.T + h @ Ro.T + bo + c * po)
        h = og * np.tanh(c)
        ys.append(h)
    close(o["lstm_y"], np.stack(ys), 1e-4)
    close(o["lstm_c"], c, 1e-4)


def test_random_ops_are_seeded_and_distributed(tmp_path):
    logits = np.log(np.array([[0.1, 0.6, 0.3]], np.float32))

    @mb.program(input_specs=[spec((1, 3))], opset_version=iOS18)
    def prog(x):
        return (mb.random_uniform(shape=np.array([4000], np.int32), low=-1.0, high=3.0, seed=7, name="u"),
                mb.random_normal(shape=np.array([4000], np.int32), mean=2.0, stddev=0.5, seed=7, name="n"),
                mb.random_bernoulli(shape=np.array([4000], np.int32), prob=0.25, seed=7, name="b"),
                mb.random_categorical(x=x, size=4000, seed=7, name="c"))

    m, o = run(tmp_path, prog, {"x": logits})
    assert -1 <= o["u"].min() and o["u"].max() < 3 and abs(o["u"].mean() - 1.0) < 0.1
    assert abs(o["n"].mean() - 2.0) < 0.05 and abs(o["n"].std() - 0.5) < 0.05
    assert abs(o["b"].mean() - 0.25) < 0.03 and set(np.unique(o["b"])) <= {0.0, 1.0}
    freq = np.bincount(o["c"].astype(int).reshape(-1), minlength=3) / 4000
    assert np.abs(freq - [0.1, 0.6, 0.3]).max() < 0.03
    # the same seed reproduces the sequence from a fresh load; the next call draws new values
    again = ReferenceBackend.load(str(tmp_path / "m.mlpackage")).predict({"x": logits})
    assert np.array_equal(again["u"], o["u"]) and np.array_equal(again["c"], o["c"])
    assert not np.array_equal(m.predict({"x": logits})["u"], o["u"])


def test_quantize_dequantize(tmp_path):
    scale = np.array([0.1, 0.2, 0.05], np.float32)
    zp = np.array([3, -2, 0], np.int8)

    @mb.program(input_specs=[spec((2, 3))], opset_version=iOS18)
    def prog(x):
        q = mb.quantize(input=x, scale=scale, zero_point=zp, axis=1, output_dtype="int8", name="q")
        return q, mb.dequantize(input=q, scale=scale, zero_point=zp, axis=1, name="dq")

    x = np.array([[0.33, -0.41, 9.0], [-20.0, 0.07, 0.026]], np.float32)
    _, o = run(tmp_path, prog, {"x": x})
    want = np.clip(np.round(x / scale) + zp, -128, 127)
    assert np.array_equal(o["q"], want.astype(np.int8))
    close(o["dq"], scale * (want - zp), 1e-6)


def test_cond_and_while_loop(tmp_path):
    @mb.program(input_specs=[spec((2,)), spec((1,), types.int32)], opset_version=iOS18)
    def prog(x, n):
        p = mb.greater(x=mb.reduce_sum(x=x), y=0.0)
        c = mb.cond(pred=p, _true_fn=lambda: mb.add(x=x, y=1.0), _false_fn=lambda: mb.mul(x=x, y=2.0))

        def cf(i, acc):
            return mb.less(x=i, y=mb.squeeze(x=n))

        def body(i, acc):
            return mb.add(x=i, y=1), mb.add(x=mb.mul(x=acc, y=1.5), y=x)

        w = mb.while_loop(_cond=cf, _body=body, loop_vars=(np.int32(0), c))
        passthrough = mb.cond(pred=p, _true_fn=lambda: mb.identity(x=x), _false_fn=lambda: mb.identity(x=x))
        return mb.identity(x=w[1], name="loop"), mb.identity(x=w[0], name="iters"), \
            mb.identity(x=c, name="branch"), mb.identity(x=passthrough, name="pass")

    m, o = run(tmp_path, prog, {"x": np.array([1.0, 2.0], np.float32), "n": np.array([3], np.int32)})

    def expect(x, n):
        acc = x + 1 if x.sum() > 0 else x * 2
        for _ in range(n):
            acc = acc * 1.5 + x
        return acc

    close(o["branch"], [2.0, 3.0])
    close(o["loop"], expect(np.array([1.0, 2.0]), 3))
    assert int(o["iters"]) == 3
    x = np.array([-3.0, 1.0], np.float32)
    o = m.predict({"x": x, "n": np.array([0], np.int32)})
    close(o["branch"], x * 2)
    close(o["loop"], x * 2)  # zero iterations: the initial value
    close(o["pass"], x)


def test_list_ops_in_a_loop(tmp_path):
    # a TensorArray-style accumulation: write x * i at index i, then gather everything back
    @mb.program(input_specs=[spec((3,))], opset_version=iOS18)
    def prog(x):
        ls = mb.make_list(init_length=1, dynamic_length=True, elem_shape=(3,), dtype="fp32")

        def cf(i, lst):
            return mb.less(x=i, y=4)

        def body(i, lst):
            val = mb.mul(x=x, y=mb.cast(x=i, dtype="fp32"))
            return mb.add(x=i, y=1), mb.list_write(ls=lst, index=i, value=val)

        i, out = mb.while_loop(_cond=cf, _body=body, loop_vars=(np.int32(0), ls))
        g = mb.list_gather(ls=out, indices=np.array([3, 0, 2], np.int32), name="gathered")
        r = mb.list_read(ls=out, index=1, name="read")
        n = mb.list_length(ls=out)
        sc = mb.list_scatter(ls=out, indices=np.array([1, 5], np.int32), value=mb.stack(values=[x, x], axis=0))
        return g, r, mb.cast(x=n, dtype="fp32", name="length"), \
            mb.list_gather(ls=sc, indices=np.array([1, 4, 5], np.int32), name="scattered")

    x = np.array([1.0, -2.0, 0.5], np.float32)
    _, o = run(tmp_path, prog, {"x": x})
    close(o["gathered"], np.stack([x * 3, x * 0, x * 2]))
    close(o["read"], x * 1)
    assert float(o["length"]) == 4
    close(o["scattered"], np.stack([x, np.zeros(3), x]))  # index 4 never written: zeros


def test_non_maximum_suppression(tmp_path):
    boxes = np.array([[[0, 0, 2, 2], [0.1, 0, 2, 2], [5, 5, 1, 1], [5.2, 5, 1, 1], [9, 9, 1, 1]]], np.float32)
    scores = np.array([[[0.9, 0.1], [0.8, 0.7], [0.3, 0.6], [0.5, 0.2], [0.05, 0.01]]], np.float32)

    @mb.program(input_specs=[spec((1, 5, 4)), spec((1, 5, 2))], opset_version=ct.target.iOS16)
    def prog(b, s):
        out = mb.non_maximum_suppression(boxes=b, scores=s, iou_threshold=0.5, score_threshold=0.2,
                                         max_boxes=4)
        return (mb.identity(x=out[0], name="boxes"), mb.identity(x=out[1], name="scores"),
                mb.identity(x=out[2], name="idx"), mb.identity(x=out[3], name="count"))

    @mb.program(input_specs=[spec((1, 4, 5)), spec((1, 2, 5))], opset_version=iOS18)
    def prog17(b, s):  # iOS17 form: box axis last, no score threshold, no count
        out = mb.non_maximum_suppression(boxes=b, scores=s, iou_threshold=0.5, max_boxes=4)
        return (mb.identity(x=out[0], name="boxes"), mb.identity(x=out[2], name="idx"))

    _, o17 = run(tmp_path, prog17, {"b": boxes.transpose(0, 2, 1), "s": scores.transpose(0, 2, 1)}, name="m17")
    assert o17["idx"].tolist() == [[0, 2, 4, -1]]  # no threshold: box 4 survives
    close(o17["boxes"][0, :, :3], boxes[0, [0, 2, 4]].T)
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
                       skip_model_load=True)
    model.save(str(tmp_path / "m16.mlpackage"))
    o = ReferenceBackend.load(str(tmp_path / "m16.mlpackage")).predict({"b": boxes, "s": scores})
    # by max score: 0 (0.9), 1 (0.8, overlaps 0 heavily: dropped), 2 (0.6), 3 (0.5, overlaps 2: IoU ~0.67),
    # 4 below the score threshold
    assert o["idx"].tolist() == [[0, 2, -1, -1]] and o["count"].tolist() == [2]
    close(o["boxes"][0, :2], boxes[0, [0, 2]])
    close(o["scores"][0, :2], scores[0, [0, 2]])
    close(o["boxes"][0, 2:], np.zeros((2, 4)))


def test_conv_quantized_linear_and_lut(tmp_path):
    wq = RNG.integers(0, 16, (4, 3, 1, 2)).astype(np.uint8)
    scale, qb = np.float32(0.25), np.float32(-1.0)
    lut = RNG.standard_normal(16).astype(np.float32)

    @mb.program(input_specs=[spec((1, 3, 2, 5))], opset_version=ct.target.iOS15)
    def prog(x):
        return (mb.conv_quantized(x=x, weight=wq, quantization_type="linear", nbits=8, quant_scale=scale,
                                  quant_bias=qb, name="lin"),
                mb.conv_quantized(x=x, weight=wq, quantization_type="lut", nbits=4, quant_scale=lut,
                                  quant_bias=np.float32(0), name="lut"))

    x = r(1, 3, 2, 5)
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS15,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
                       skip_model_load=True)
    model.save(str(tmp_path / "q.mlpackage"))
    o = ReferenceBackend.load(str(tmp_path / "q.mlpackage")).predict({"x": x})

    def conv(w):
        out = np.zeros((1, 4, 2, 4))
        for j in range(4):
            out[0, :, :, j] = np.einsum("ocw,chw->oh", w[:, :, 0], x[0, :, :, j:j + 2])
        return out

    close(o["lin"], conv(wq * scale + qb), 1e-4)
    close(o["lut"], conv(lut[wq]), 1e-4)


def test_sparse_constexprs_joint_with_palettes_and_quantization(tmp_path):
    """iOS18 joint compression: sparse + palettized and sparse + quantized weights, decoded densely."""
    from coremltools.converters.mil.mil.types.type_mapping import np_uint1_dtype

    mask = (RNG.random((4, 6)) < 0.5).astype(np_uint1_dtype)
    nnz = int(mask.sum())
    idx = RNG.integers(0, 4, nnz).astype(types.np_uint2_dtype)
    lut = RNG.standard_normal((2, 1, 4, 1)).astype(np.float32)  # a palette per 2 rows
    qdata = RNG.integers(-8, 8, nnz).astype(np.int8)
    scale = np.abs(RNG.standard_normal((1, 3))).astype(np.float32)  # a scale per 2 columns
    offset = RNG.integers(-2, 2, (1, 3)).astype(np.int8)

    @mb.program(input_specs=[spec((4, 6))], opset_version=iOS18)
    def prog(x):
        m1, nz1 = mb.constexpr_lut_to_sparse(indices_mask=mask, indices_nonzero_data=idx, lut=lut)
        w1 = mb.constexpr_sparse_to_dense(nonzero_data=nz1, mask=m1)
        m2, nz2 = mb.constexpr_sparse_blockwise_shift_scale(data_mask=mask, nonzero_data=qdata, scale=scale,
                                                           offset=offset)
        w2 = mb.constexpr_sparse_to_dense(nonzero_data=nz2, mask=m2)
        return mb.add(x=x, y=w1, name="lut"), mb.add(x=x, y=w2, name="quant")

    x = np.zeros((4, 6), np.float32)
    _, o = run(tmp_path, prog, {"x": x})
    rows, cols = np.nonzero(mask)
    want1 = np.zeros((4, 6), np.float32)
    want1[rows, cols] = lut[rows // 2, 0, idx.astype(int), 0]
    want2 = np.zeros((4, 6), np.float32)
    want2[rows, cols] = (qdata - offset[0, cols // 2]) * scale[0, cols // 2]
    close(o["lut"], want1)
    close(o["quant"], want2, 1e-6)


# Ops whose cases live in this file (tests/test_mil_op_table.py counts them as covered).
COVERED_HERE = {
    "clamped_relu", "linear_activation", "scaled_tanh", "sigmoid_hard", "thresholded_relu", "prelu",
    "softplus_parametric", "scatter", "scatter_along_axis", "scatter_nd", "gather_nd", "one_hot", "argsort",
    "reverse", "reverse_sequence", "sliding_windows", "flatten2d", "non_zero", "reshape_like", "einsum",
    "depth_to_space", "space_to_depth", "pixel_shuffle", "pixel_unshuffle", "space_to_batch", "batch_to_space",
    "max_pool", "avg_pool", "l2_pool", "resize_bilinear", "upsample_nearest_neighbor", "upsample_bilinear",
    "resize_nearest_neighbor", "resize", "crop", "crop_resize", "resample", "affine", "instance_norm",
    "local_response_norm", "conv_transpose", "rnn", "gru", "lstm", "random_uniform", "random_normal",
    "random_bernoulli", "random_categorical", "quantize", "dequantize", "make_list", "list_write", "list_read",
    "list_gather", "list_scatter", "list_length", "non_maximum_suppression", "conv_quantized",
    "constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale", "cond", "while_loop",
}
