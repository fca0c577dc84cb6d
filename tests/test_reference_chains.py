"""Fused op chains of the reference backend (mil/fusion.py, csrc/kernels/chain_kernels.*).

The native kernels are checked against numpy written as the MIL ops compute (bit for bit for the
element-wise chains, within float32 summation order for attention) on random shapes, on the vector
path this CPU runs, on the portable path (forced, in a subprocess) and on NEON under qemu where a
cross compiler is installed. The plan rewrites are checked on programs built with coremltools' MIL
builder: a fused plan gives the op-by-op plan's exact outputs, and near misses of each pattern are
left alone.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from neon import run_neon_driver

from anemll_fast._kernels import (add, attention, chain_isa, mirror_norm, open_columns, rotary, round_fp16,
                                  silu_gate)
from anemll_fast.mil.ops.reduction import softmax

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(11)


def r16(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def rand(shape, fp16=True, scale=2.0):
    a = (RNG.standard_normal(shape) * scale).astype(np.float32)
    return r16(a) if fp16 else a


# ---------------------------------------------------------------- numpy as the ops compute
def np_mirror_norm(x, gamma, beta, eps, fp16):
    """mul(x, -1) -> concat([x, .], -1) -> layer_norm(axes=[-1]) -> first half, as the ops do it."""
    rnd = r16 if fp16 else (lambda a: a)
    c = np.concatenate([x, x * np.float32(-1)], axis=-1)
    mean = np.mean(c, axis=-1, keepdims=True)
    d = c - mean
    var = np.mean(d * d, axis=-1, keepdims=True)
    y = d / np.sqrt(var + np.float32(eps))
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return rnd(y)[..., :x.shape[-1]]


def np_rotary(x, cos, sin, fp16):
    rnd = r16 if fp16 else (lambda a: a)
    h = x.shape[-1] // 2
    rot = np.concatenate([x[..., h:] * np.float32(-1), x[..., :h]], axis=-1)
    return rnd(rnd(x * cos) + rnd(rot * sin))


def np_attention(q, k, v, mask, n_keys, fp16):
    """The chain matmul -> add mask -> softmax -> matmul over the first n_keys keys; mask row r % Tm."""
    rnd = r16 if fp16 else (lambda a: a)
    rows, tm = q.shape[-2], mask.shape[-2]
    m = mask.reshape(tm, -1)[np.arange(rows) % tm][:, :n_keys]
    s = rnd(np.matmul(q, np.swapaxes(k[..., :n_keys, :], -1, -2)))
    s = rnd(s + m)
    p = rnd(softmax(s, -1))
    return rnd(np.matmul(p, v[..., :n_keys, :]))


# ---------------------------------------------------------------- kernels
def test_round_f16_is_numpy_round_to_nearest_even():
    special = np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.99, 65520.0, -70000.0, 1e-8, 2.0 ** -25,
                        2.0 ** -24 * 1.5, 2.0 ** -14 * 0.999, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11], np.float32)
    for n in (1, 7, 8, 9, 31, 1000):
        x = np.concatenate([special, (RNG.standard_normal(n) * 10.0 ** RNG.integers(-6, 5, n)).astype(np.float32)])
        with np.errstate(over="ignore"):  # values past the fp16 range become inf, as they should
            want = x.astype(np.float16).astype(np.float32)
        assert np.array_equal(round_fp16(x), want)
    assert np.isnan(round_fp16(np.array([np.nan], np.float32))).all()


@pytest.mark.parametrize("fp16", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 576), (1, 3, 7), (2, 5, 1), (1, 1, 9), (4, 129), (3, 64), (1, 2, 1000),
                                   (1, 64, 576), (1, 7, 300), (9, 65)])  # rows four at a time, and the rest
@pytest.mark.parametrize("affine", ["gamma", "none", "gamma+beta"])
def test_mirror_norm_matches_the_ops_bit_for_bit(shape, fp16, affine):
    h = shape[-1]
    x = rand(shape, fp16)
    gamma = rand((2 * h,), fp16) if "gamma" in affine else None
    beta = rand((2 * h,), fp16) if "beta" in affine else None
    eps = 1e-5 if fp16 else 1e-6
    got = mirror_norm(x, gamma, beta, eps, fp16)
    want = np_mirror_norm(x, gamma, beta, eps, fp16)
    assert got.shape == x.shape and np.array_equal(got, want)


@pytest.mark.parametrize("h", [576, 64, 72])
def test_mirror_norm_of_extreme_rows_matches_the_ops(h):
    """Rows with an inf, a NaN, a value whose square overflows, all zeros, a lone -0: the kernel's shortcut
    for halves split at h (mean exactly 0) must give way to the general computation there."""
    x = rand((14, h), False)  # rows go four at a time: one special row in each group, and a short group
    x[1, 3] = np.inf
    x[5, 5] = np.nan
    x[9, 7] = 3e19
    x[12] = 0.0
    x[12, 2] = -0.0
    x[13] *= 1e-30  # squares underflow toward subnormals
    g = rand((2 * h,))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        want = np_mirror_norm(x, g, None, 1e-5, False)
    got = mirror_norm(x, g, None, 1e-5, False)
    assert np.array_equal(got, want, equal_nan=True)
    num = ~np.isnan(want)
    assert np.array_equal(np.signbit(got[num]), np.signbit(want[num]))  # -0 stays -0 (a NaN's sign is no value)

def test_mirror_norm_reads_its_epsilon():
    x = rand((2, 16)) * np.float32(1e-3)  # small values: the epsilon matters
    a, b = mirror_norm(x, None, None, 1e-5, False), mirror_norm(x, None, None, 1e-3, False)
    assert not np.array_equal(a, b)
    assert np.array_equal(b, np_mirror_norm(x, None, None, 1e-3, False))


@pytest.mark.parametrize("fp16", [True, False])
@pytest.mark.parametrize("xshape,tshape", [
    ((1, 9, 1, 64), (1, 1, 1, 64)), ((1, 3, 8, 64), (1, 1, 8, 64)), ((2, 3, 5, 18), (1, 1, 5, 18)),
    ((1, 1, 1, 2), (1, 1, 1, 2)), ((4, 7, 34), (7, 34)), ((1, 2, 3, 130), (3, 130)), ((1, 1, 2, 16), (1, 2, 16)),
])
def test_rotary_matches_the_ops_bit_for_bit(xshape, tshape, fp16):
    x, c, s = rand(xshape, fp16), rand(tshape, fp16, 1.0), rand(tshape, fp16, 1.0)
    got = rotary(x, c, s, fp16)
    assert np.array_equal(got, np_rotary(x, c, s, fp16))


@pytest.mark.parametrize("xshape", [(1, 9, 64, 64), (1, 3, 13, 18), (2, 8, 6), (1, 1, 9, 70), (3, 5, 16)])
@pytest.mark.parametrize("fp16", [True, False])
def test_rotary_of_a_transposed_view_matches_the_ops_bit_for_bit(xshape, fp16):
    """x stored [..., d, t] and seen through swapped axes, as a projection's output reaches the rotary:
    rows gathered eight at a time (and the tails), the same bits as on contiguous rows."""
    base = rand(xshape[:-2] + (xshape[-1], xshape[-2]), fp16)
    x = np.swapaxes(base, -1, -2)
    c, s = rand(xshape[-2:], fp16, 1.0), rand(xshape[-2:], fp16, 1.0)
    got = rotary(x, c, s, fp16)
    assert got.flags.c_contiguous and np.array_equal(got, np_rotary(np.ascontiguousarray(x), c, s, fp16))
    with pytest.raises(ValueError, match="C-contiguous"):
        rotary(np.ascontiguousarray(x)[..., ::-1, :], c, s, fp16)  # another stride: refused

@pytest.mark.parametrize("fp16", [True, False])
@pytest.mark.parametrize("groups,rows,d,n,keys,tm", [
    (3, 3, 64, 512, 70, 1), (3, 192, 64, 96, 96, 64), (2, 4, 13, 20, 20, 2), (1, 1, 8, 9, 3, 1),
    (3, 6, 64, 128, 100, 3), (1, 5, 33, 17, 1, 5),
    # many query rows (the blocked products): row, key and head-dim tails, one mask row for all
    (2, 20, 13, 40, 37, 5), (1, 33, 24, 50, 50, 33), (2, 17, 64, 64, 64, 1), (3, 64, 8, 64, 64, 64),
])
def test_attention_matches_the_ops(groups, rows, d, n, keys, tm, fp16):
    q = rand((1, groups, rows, d), fp16, 0.5)
    k, v = rand((1, groups, n, d), fp16), rand((1, groups, n, d), fp16)
    mask = np.zeros((1, 1, tm, n), np.float32)
    mask[..., keys:] = -np.inf
    for t in range(tm):  # causal inside the visible span (each row sees at least one key)
        mask[0, 0, t, max(1, keys - (tm - 1 - t)):keys] = -np.inf
    got = attention(q, k, v, mask, keys, fp16)
    want = np_attention(q, k, v, mask, keys, fp16)
    # float32 dot products in another order than BLAS: a score may land one fp16 step away, which the
    # exp amplifies, so a few outputs move by a few steps; most are identical
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= (5e-3 if fp16 else 1e-5) * scale
    if fp16:
        assert np.mean(got != want) < 0.05
        assert np.array_equal(got, r16(got))  # every value on the fp16 grid


def test_attention_of_a_fully_masked_row_is_nan_like_the_chain():
    q, k, v = rand((1, 1, 2, 8)), rand((1, 1, 4, 8)), rand((1, 1, 4, 8))
    mask = np.full((1, 1, 2, 4), -np.inf, np.float32)
    mask[0, 0, 0, :2] = 0
    got = attention(q, k, v, mask, 4, True)
    with np.errstate(invalid="ignore"):  # 0 / 0 in the chain's softmax
        want = np_attention(q, k, v, mask, 4, True)
    assert np.isnan(got[0, 0, 1]).all() and np.isnan(want[0, 0, 1]).all()
    assert np.allclose(got[0, 0, 0], want[0, 0, 0], atol=2e-3)


def _causal(rows, n, keys):
    """A prefill mask: row t sees keys 0..t (of n columns, keys past `keys` closed)."""
    m = np.triu(np.full((rows, n), -np.inf, np.float32), 1)
    m[:, keys:] = -np.inf
    return m[None, None]


@pytest.mark.parametrize("rows", [3, 48])  # the dot-product and the blocked paths
def test_attention_skips_nothing_a_score_could_change(rows):
    """Scores behind the causal mask are skipped only when no score can reach fp16's infinity: a huge
    one there makes the chain's row NaN (inf - inf), and the kernel's too."""
    q, k, v = rand((1, 1, rows, 16), True, 0.5), rand((1, 1, rows, 16)), rand((1, 1, rows, 16))
    mask = _causal(rows, rows, rows)
    k[0, 0, rows - 1] = 250.0   # masked for every row but the last
    q[0, 0, 0] = 250.0          # row 0's score with it: 16 * 250^2 > 65504
    with np.errstate(invalid="ignore", over="ignore"):
        want = np_attention(q, k, v, mask, rows, True)
    got = attention(q, k, v, mask, rows, True)
    assert np.isnan(want[0, 0, 0]).all() and np.isnan(got[0, 0, 0]).all()
    ok = ~np.isnan(want)
    assert np.array_equal(np.isnan(got), ~ok)
    assert np.abs(got[ok] - want[ok]).max() <= 5e-3 * max(1.0, float(np.abs(want[ok]).max()))


@pytest.mark.parametrize("rows", [3, 48])
@pytest.mark.parametrize("where", ["k", "q"])
def test_attention_skips_nothing_past_a_nan(rows, where):
    """A NaN in a key that the mask hides from most rows still turns their scores into NaN in the chain
    (NaN + -inf): the kernel computes every score then, whichever row of q or k holds the NaN."""
    q, k, v = rand((1, 1, rows, 16), True, 0.5), rand((1, 1, rows, 16)), rand((1, 1, rows, 16))
    if where == "k":
        k[0, 0, rows - 2, 2] = np.nan  # seen by the last two rows only (not the last key read)
    else:
        q[0, 0, 1, 2] = np.nan
    mask = _causal(rows, rows, rows)
    with np.errstate(invalid="ignore"):
        want = np_attention(q, k, v, mask, rows, True)
    got = attention(q, k, v, mask, rows, True)
    assert np.array_equal(np.isnan(got), np.isnan(want))

@pytest.mark.parametrize("rows", [3, 48])
def test_attention_zero_probabilities_still_meet_an_infinite_value(rows):
    """0 * inf is NaN in the chain's product: rows that give an infinite v zero weight get NaN there."""
    q, k, v = rand((1, 1, rows, 16), True, 0.5), rand((1, 1, rows, 16)), rand((1, 1, rows, 16))
    v[0, 0, rows - 2, 3] = np.inf   # seen by the last two rows only
    mask = _causal(rows, rows, rows)
    with np.errstate(invalid="ignore"):
        want = np_attention(q, k, v, mask, rows, True)
    got = attention(q, k, v, mask, rows, True)
    assert np.isnan(want[0, 0, :rows - 2, 3]).all()
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(np.isinf(got), np.isinf(want))


@pytest.mark.parametrize("rows", [5, 64])
def test_attention_shifts_large_scores_by_their_max(rows):
    """Scores past exp's range (~88): only a softmax shifted by the row's max stays finite."""
    q, k, v = rand((1, 3, rows, 32), True, 3.0), rand((1, 3, rows, 32), True, 3.0), rand((1, 3, rows, 32))
    q = r16(q + k[:, :, :1] * 2)  # key 0, seen by every row, scores ~2 |k_0|^2
    mask = _causal(rows, rows, rows)
    assert (r16(np.matmul(q, np.swapaxes(k, -1, -2))) + mask).max() > 100  # exp would overflow unshifted
    want = np_attention(q, k, v, mask, rows, True)
    got = attention(q, k, v, mask, rows, True)
    assert np.isfinite(want).all() and np.isfinite(got).all()
    assert np.abs(got - want).max() <= 5e-3 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("rows", [2, 32])
def test_attention_exp_is_float32_accurate(rows):
    """In fp32 (no rounding to fp16 to hide it) the kernel's probabilities are numpy's to a few float32
    ulps: its exp is an accurate one. Exact scores (one non-zero term each) spread evenly over a range,
    and v the identity, so that the output is the probabilities themselves."""
    n = 200
    q = np.zeros((1, 1, rows, n), np.float32)
    q[..., 0] = np.linspace(0.5, 1.5, rows)
    k = np.zeros((1, 1, n, n), np.float32)
    k[0, 0, :, 0] = np.linspace(-9.0, 3.0, n)
    v = np.eye(n, dtype=np.float32)[None, None]
    mask = np.zeros((1, 1, 1, n), np.float32)
    got = attention(q, k, v, mask, n, False)
    want = np_attention(q, k, v, mask, n, False)
    assert np.all(np.abs(got - want) <= 1e-6 * want)

def test_attention_keeps_each_kv_head_to_its_query_group():
    """GQA: query group g reads key / value group g only (moving another group's keys changes nothing)."""
    q, k, v = rand((1, 3, 24, 16), True, 0.5), rand((1, 3, 30, 16)), rand((1, 3, 30, 16))
    mask = _causal(24, 30, 24)
    got = attention(q, k, v, mask, 24, True)
    assert np.abs(got - np_attention(q, k, v, mask, 24, True)).max() <= 5e-3 * max(1.0, float(np.abs(got).max()))
    k2, v2 = k.copy(), v.copy()
    k2[0, 2], v2[0, 2] = rand((30, 16)), rand((30, 16))
    got2 = attention(q, k2, v2, mask, 24, True)
    assert np.array_equal(got2[0, :2], got[0, :2]) and not np.array_equal(got2[0, 2], got[0, 2])


@pytest.mark.parametrize("n", [1, 7, 8, 37, 1536 * 3])
@pytest.mark.parametrize("fp16", [True, False])
def test_silu_gate_is_the_silu_op_times_b_bit_for_bit(n, fp16):
    from anemll_fast.mil.ops.elementwise import _silu

    a, b = rand((n,), fp16, 4.0), rand((n,), fp16, 2.0)
    a[:3] = [0.0, -0.0, 30.0][:min(3, n)]
    rnd = r16 if fp16 else (lambda x: x)
    want = rnd(rnd(_silu(a)) * b)
    got = silu_gate(a, np.tanh(np.float32(0.5) * a), b, fp16)
    assert np.array_equal(got, want)


def test_open_columns_reads_the_mask():
    m = np.full((1, 1, 3, 8), -np.inf, np.float32)
    m[0, 0, 0, :2] = 0
    m[0, 0, 2, :5] = 0
    assert open_columns(m) == 5
    m[0, 0, 1, 7] = -1e4
    assert open_columns(m) == 8
    assert open_columns(np.full((2, 4), -np.inf, np.float32)) == 0



def test_open_columns_matches_numpy_on_random_masks():
    """Row by row from the end, whole vectors at a time: every row length, NaN counted as open."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        r, c = int(rng.integers(1, 6)), int(rng.integers(1, 40))
        m = np.where(rng.random((r, c)) < 0.85, -np.inf, rng.standard_normal((r, c))).astype(np.float32)
        if rng.random() < 0.2:
            m[rng.integers(r), rng.integers(c)] = np.nan
        cols = np.flatnonzero(~np.isneginf(m).all(axis=0))
        assert open_columns(m) == (int(cols[-1]) + 1 if cols.size else 0)

@pytest.mark.parametrize("call,match", [
    (lambda: mirror_norm(np.zeros((2, 4), np.float64), None, None, 1e-5, True), "float32"),
    (lambda: mirror_norm(np.zeros((4, 2), np.float32).T, None, None, 1e-5, True), "C-contiguous"),
    (lambda: mirror_norm(np.zeros((2, 4), np.float32), np.ones(4, np.float32), None, 1e-5, True), "gamma of 4"),
    (lambda: rotary(np.zeros((1, 2, 4), np.float32), np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float32),
                    True), "do not fit"),
    (lambda: rotary(np.zeros((1, 2, 5), np.float32), np.zeros((2, 5), np.float32), np.zeros((2, 5), np.float32),
                    True), "do not fit"),
    (lambda: attention(np.zeros((1, 2, 3, 4), np.float32), np.zeros((1, 2, 5, 4), np.float32),
                       np.zeros((1, 2, 5, 4), np.float32), np.zeros((1, 1, 2, 5), np.float32), 5, True), "do not fit"),
    (lambda: attention(np.zeros((1, 2, 3, 4), np.float32), np.zeros((1, 2, 5, 4), np.float32),
                       np.zeros((1, 2, 5, 4), np.float32), np.zeros((1, 1, 1, 5), np.float32), 6, True), "do not fit"),
])
def test_operands_that_do_not_fit_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_portable_path_gives_the_same_bits_in_a_subprocess(tmp_path):
    assert chain_isa() in ("avx2+fma+f16c", "neon", "portable")
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from anemll_fast._kernels import add, attention, chain_isa, mirror_norm, rotary, round_fp16, silu_gate
        assert chain_isa() == "portable", chain_isa()
        d = dict(np.load(sys.argv[1]))
        out = {"round": round_fp16(d["x"]), "norm": mirror_norm(d["n"], d["g"], None, 1e-5, True),
               "rot": rotary(d["q"], d["c"], d["s"], True), "rot32": rotary(d["q"], d["c"], d["s"], False),
               "att": attention(d["aq"], d["ak"], d["av"], d["am"], 13, True),
               "attb": attention(d["bq"], d["bk"], d["bv"], d["bm"], 40, True),
               "rott": rotary(np.swapaxes(d["qt"], -1, -2), d["c"], d["s"], True),
               "addt": add(d["n"][None], np.swapaxes(d["nt"], -1, -2)[None], True),
               "silu": silu_gate(d["n"], np.tanh(np.float32(0.5) * d["n"]), d["n"] * 2, True)}
        np.savez(sys.argv[2], **out)
    """)
    data = {"x": rand((1003,), False, 100.0), "n": rand((3, 37)), "nt": rand((37, 3)), "g": rand((74,)), "q": rand((2, 3, 5, 26)), "qt": rand((2, 3, 26, 5)),
            "c": rand((5, 26)), "s": rand((5, 26)), "aq": rand((1, 2, 3, 20)), "ak": rand((1, 2, 17, 20)),
            "av": rand((1, 2, 17, 20)), "am": np.zeros((1, 1, 1, 17), np.float32),
            "bq": rand((1, 2, 40, 20), True, 0.5), "bk": rand((1, 2, 45, 20)), "bv": rand((1, 2, 45, 20)),
            "bm": np.triu(np.full((40, 45), -np.inf, np.float32), 1)[None, None]}
    np.savez(tmp_path / "in.npz", **data)
    env = dict(os.environ, ANEMLL_FAST_KERNELS="portable")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "out.npz")
    assert np.array_equal(got["round"], round_fp16(data["x"]))
    assert np.array_equal(got["norm"], mirror_norm(data["n"], data["g"], None, 1e-5, True))
    assert np.array_equal(got["rot"], rotary(data["q"], data["c"], data["s"], True))
    assert np.array_equal(got["rot32"], rotary(data["q"], data["c"], data["s"], False))
    att = attention(data["aq"], data["ak"], data["av"], data["am"], 13, True)
    assert np.all(np.abs(got["att"] - att) <= 2.0 ** -9 * np.maximum(np.abs(att), 2.0 ** -6))
    attb = attention(data["bq"], data["bk"], data["bv"], data["bm"], 40, True)
    assert np.abs(got["attb"] - attb).max() <= 2e-3 * max(1.0, float(np.abs(attb).max()))
    assert np.mean(got["attb"] != attb) < 0.05
    assert np.array_equal(got["rott"], rotary(np.ascontiguousarray(np.swapaxes(data["qt"], -1, -2)), data["c"],
                                              data["s"], True))
    assert np.array_equal(got["addt"], add(data["n"][None], np.swapaxes(data["nt"], -1, -2)[None], True))
    assert np.array_equal(got["silu"], silu_gate(data["n"], np.tanh(np.float32(0.5) * data["n"]), data["n"] * 2, True))


NEON_DRIVER = r"""
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>
#include "kernels/chain_kernels.h"
#include "kernels/matmul_kernels.h"
#include "engine/fp16.h"
using namespace anemll;
static float r16(float v) { return half_to_float(float_to_half(v)); }
int main() {
  if (std::string(kernels::chain_isa()) != "neon") { std::printf("isa %s\n", kernels::chain_isa()); return 2; }
  unsigned seed = 5;
  auto rnd = [&]() { seed = seed * 1103515245u + 12345u; return r16(((seed >> 8) % 4000) / 1000.0f - 2.0f); };
  for (int64_t n : {1, 3, 4, 5, 8, 13}) {  // rounding, every tail length
    std::vector<float> x(n), y(n);
    for (auto& v : x) v = rnd() * 1.37f;
    kernels::round_f16(x.data(), n, y.data());
    for (int64_t i = 0; i < n; ++i) if (y[i] != r16(x[i])) { std::printf("round %lld\n", (long long)n); return 3; }
  }
  for (int64_t d : {2, 6, 8, 10, 18, 64}) for (int round : {0, 1}) {  // rotary, against the chain in scalar
    const int64_t t = 3, g = 2, h = d / 2;
    std::vector<float> x(g * t * d), c(t * d), s(t * d), y(g * t * d);
    for (auto& v : x) v = rnd();
    for (auto& v : c) v = rnd();
    for (auto& v : s) v = rnd();
    if (kernels::rotary(x.data(), g, t, d, c.data(), s.data(), round, y.data()) != 0) return 4;
    auto R = [&](float v) { return round ? r16(v) : v; };
    for (int64_t b = 0; b < g * t; ++b) for (int64_t j = 0; j < d; ++j) {
      const float* xr = x.data() + b * d; const int64_t ti = b % t;
      const float rot = j < h ? -xr[j + h] : xr[j - h];
      const float want = R(R(xr[j] * c[ti * d + j]) + R(rot * s[ti * d + j]));
      if (y[b * d + j] != want) { std::printf("rotary d=%lld j=%lld\n", (long long)d, (long long)j); return 5; }
    }
  }
  {  // attention against a double-precision chain
    const int64_t rows = 3, d = 13, n = 11, keys = 7;
    std::vector<float> q(rows * d), k(n * d), v(n * d), m(n, 0.f), o(rows * d);
    for (auto& a : q) a = rnd() * 0.5f;
    for (auto& a : k) a = rnd();
    for (auto& a : v) a = rnd();
    if (kernels::attention(q.data(), 1, rows, d, k.data(), v.data(), n * d, keys, m.data(), 1, n, true, o.data()) != 0)
      return 6;
    for (int64_t r = 0; r < rows; ++r) {
      double sc[16], mx = -1e30, tot = 0;
      for (int64_t j = 0; j < keys; ++j) { double a = 0; for (int64_t c = 0; c < d; ++c) a += q[r * d + c] * k[j * d + c];
        sc[j] = a; mx = a > mx ? a : mx; }
      for (int64_t j = 0; j < keys; ++j) { sc[j] = std::exp(sc[j] - mx); tot += sc[j]; }
      for (int64_t c = 0; c < d; ++c) { double a = 0; for (int64_t j = 0; j < keys; ++j) a += sc[j] / tot * v[j * d + c];
        if (std::fabs(a - o[r * d + c]) > 0.02 * (1 + std::fabs(a))) { std::printf("attention\n"); return 7; } }
    }
  }
  {  // attention with many query rows (the blocked products) and a causal mask, against double precision
    const int64_t rows = 21, d = 13, n = 25, keys = 23;
    std::vector<float> q(rows * d), k(n * d), v(n * d), m(rows * n), o(rows * d);
    for (auto& a : q) a = rnd() * 0.5f;
    for (auto& a : k) a = rnd();
    for (auto& a : v) a = rnd();
    for (int64_t r = 0; r < rows; ++r) for (int64_t j = 0; j < n; ++j) m[r * n + j] = j <= r ? 0.f : -INFINITY;
    if (kernels::attention(q.data(), 1, rows, d, k.data(), v.data(), n * d, keys, m.data(), rows, n, true, o.data()) != 0)
      return 8;
    for (int64_t r = 0; r < rows; ++r) {
      double sc[32], mx = -1e30, tot = 0;
      const int64_t seen = r + 1 < keys ? r + 1 : keys;
      for (int64_t j = 0; j < seen; ++j) { double a = 0; for (int64_t c = 0; c < d; ++c) a += q[r * d + c] * k[j * d + c];
        sc[j] = a; mx = a > mx ? a : mx; }
      for (int64_t j = 0; j < seen; ++j) { sc[j] = std::exp(sc[j] - mx); tot += sc[j]; }
      for (int64_t c = 0; c < d; ++c) { double a = 0; for (int64_t j = 0; j < seen; ++j) a += sc[j] / tot * v[j * d + c];
        if (std::fabs(a - o[r * d + c]) > 0.02 * (1 + std::fabs(a))) { std::printf("attention rows\n"); return 9; } }
    }
  }
  for (int64_t n : {1, 5, 8, 21}) {  // the SiLU-gated product's arithmetic, against the scalar formula
    std::vector<float> a(n), t(n), b(n), y(n);
    for (int64_t i = 0; i < n; ++i) { a[i] = rnd(); t[i] = std::tanh(0.5f * a[i]); b[i] = rnd(); }
    if (kernels::silu_gate(a.data(), t.data(), b.data(), n, true, y.data()) != 0) return 10;
    for (int64_t i = 0; i < n; ++i)
      if (y[i] != r16(r16(a[i] * (0.5f * (1.0f + t[i]))) * b[i])) { std::printf("silu_gate\n"); return 11; }
  }
  std::printf("ok\n");
  return 0;
}
"""


def test_neon_path_runs_under_qemu(tmp_path):
    run_neon_driver(tmp_path, NEON_DRIVER, "chain_kernels.cpp", "matmul_kernels.cpp")


# ---------------------------------------------------------------- plan rewrites
def _plans(tmp_path, prog, name="m"):
    """(fused plan, op-by-op plan) of a program built with coremltools' MIL builder (nothing folded)."""
    ct = pytest.importorskip("coremltools")
    from anemll_fast.mil import load_program
    from anemll_fast.mil.plan import Plan

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
                       skip_model_load=True)
    path = str(tmp_path / f"{name}.mlpackage")
    model.save(path)
    program = load_program(path)
    return Plan(program, None, fuse=True), Plan(program, None, fuse=False)


def _same_outputs(fused, plain, inputs):
    a, b = fused.run(inputs, []), plain.run(inputs, [])
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and np.array_equal(x, y, equal_nan=True)
    return a


def _mirror_norm_program(h, neg=-1.0, x_first=True, first_half=True, extra_output=False, fp16=True,
                         eps=1e-5, gamma=True):
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    dt, npt = (types.fp16, np.float16) if fp16 else (types.fp32, np.float32)
    g = rand((2 * h,)).astype(npt) if gamma else None

    @mb.program(input_specs=[mb.TensorSpec((1, 3, h), dtype=dt)], opset_version=ct.target.iOS18)
    def prog(x):
        m = mb.mul(x=x, y=npt(neg))
        c = mb.concat(values=[x, m] if x_first else [m, x], axis=-1)
        ln = mb.layer_norm(x=c, axes=[-1], gamma=g, epsilon=npt(eps)) if gamma else \
            mb.layer_norm(x=c, axes=[-1], epsilon=npt(eps))
        begin, end = ([0, 0, 0], [1, 3, h]) if first_half else ([0, 0, h], [1, 3, 2 * h])
        out = mb.slice_by_index(x=ln, begin=begin, end=end)
        return (out, c) if extra_output else out

    return prog


@pytest.mark.parametrize("h,fp16,gamma", [(576, True, True), (9, True, True), (64, False, True), (13, True, False)])
def test_anemll_rmsnorm_is_fused_and_exact(tmp_path, h, fp16, gamma):
    fused, plain = _plans(tmp_path, _mirror_norm_program(h, fp16=fp16, gamma=gamma))
    assert fused.fused.get("rms_norm") == 1 and not plain.fused
    assert len(fused.steps) == 1 and len(plain.steps) == 4
    x = rand((1, 3, h), fp16)
    _same_outputs(fused, plain, [x])
    assert np.isfinite(fused.run([x], [])[0]).all()


@pytest.mark.parametrize("near_miss", [
    dict(neg=1.0), dict(neg=-2.0), dict(x_first=False), dict(first_half=False), dict(extra_output=True),
])
def test_rmsnorm_near_misses_are_not_fused(tmp_path, near_miss):
    fused, plain = _plans(tmp_path, _mirror_norm_program(16, **near_miss))
    assert "rms_norm" not in fused.fused
    _same_outputs(fused, plain, [rand((1, 3, 16))])


def _rotary_program(xshape, tshape, swap=False, neg=-1.0, fp16=True, mixed=False, transposed=False):
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    dt, npt = (types.fp16, np.float16) if fp16 else (types.fp32, np.float32)
    d = xshape[-1]
    zeros = [0] * len(xshape)

    given = tuple(xshape[:-2]) + (xshape[-1], xshape[-2]) if transposed else tuple(xshape)

    @mb.program(input_specs=[mb.TensorSpec(given, dtype=dt), mb.TensorSpec(tshape, dtype=dt),
                             mb.TensorSpec(tshape, dtype=dt)], opset_version=ct.target.iOS18)
    def prog(x, cos, sin):
        if transposed:  # as ANEMLL's q / k arrive: a transposed view of the projection's output
            perm = list(range(len(xshape)))
            perm[-2:] = perm[-1], perm[-2]
            x = mb.transpose(x=x, perm=perm)
        x1 = mb.slice_by_index(x=x, begin=zeros, end=list(xshape[:-1]) + [d // 2])
        x2 = mb.slice_by_index(x=x, begin=zeros[:-1] + [d // 2], end=list(xshape))
        lo, hi = (x2, x1) if swap else (x1, x2)
        rot = mb.concat(values=[mb.mul(x=hi, y=npt(neg)), lo], axis=-1)
        a = mb.mul(x=x, y=cos)
        if mixed:  # the product kept in fp32: not the chain the kernel computes
            a = mb.cast(x=mb.cast(x=a, dtype="fp32"), dtype="fp16")
        return mb.add(x=a, y=mb.mul(x=rot, y=sin))

    return prog


@pytest.mark.parametrize("xshape,tshape,fp16", [
    ((1, 9, 1, 64), (1, 1, 1, 64), True), ((1, 3, 5, 18), (1, 1, 5, 18), True), ((2, 4, 10), (4, 10), False),
])
def test_rotary_is_fused_and_exact(tmp_path, xshape, tshape, fp16):
    fused, plain = _plans(tmp_path, _rotary_program(xshape, tshape, fp16=fp16))
    assert fused.fused.get("rotary") == 1 and len(fused.steps) == 1
    _same_outputs(fused, plain, [rand(xshape, fp16), rand(tshape, fp16, 1.0), rand(tshape, fp16, 1.0)])


def test_rotary_of_a_transposed_view_runs_the_kernel(tmp_path, monkeypatch):
    """ANEMLL's q / k reach the rotary as a transposed view: the kernel runs on the view itself (no copy, no
    fallback to the chain's ops) and gives their exact bits."""
    from anemll_fast.mil import fusion

    xshape, tshape = (1, 9, 64, 64), (1, 1, 64, 64)
    fused, plain = _plans(tmp_path, _rotary_program(xshape, tshape, transposed=True))
    assert fused.fused.get("rotary") == 1
    calls = []
    real = fusion.native.rotary
    monkeypatch.setattr(fusion.native, "rotary", lambda x, *a: calls.append(x.flags.c_contiguous) or real(x, *a),
                        raising=False)
    _same_outputs(fused, plain, [rand((1, 9, 64, 64)), rand(tshape, True, 1.0), rand(tshape, True, 1.0)])
    assert calls == [False]


@pytest.mark.parametrize("near_miss", [dict(swap=True), dict(neg=-0.5), dict(tshape=(1, 3, 2, 8)), dict(mixed=True)])
def test_rotary_near_misses_are_not_fused(tmp_path, near_miss):
    tshape = near_miss.pop("tshape", (1, 1, 2, 8))
    fused, plain = _plans(tmp_path, _rotary_program((1, 3, 2, 8), tshape, **near_miss))
    assert "rotary" not in fused.fused
    _same_outputs(fused, plain, [rand((1, 3, 2, 8)), rand(tshape, True, 1.0), rand(tshape, True, 1.0)])


@pytest.mark.parametrize("fp16", [True, False])
def test_silu_gated_product_is_fused_and_exact(tmp_path, fp16):
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    dt = types.fp16 if fp16 else types.fp32

    @mb.program(input_specs=[mb.TensorSpec((1, 37, 1, 1), dtype=dt), mb.TensorSpec((1, 37, 1, 1), dtype=dt),
                             mb.TensorSpec((1, 1, 1, 1), dtype=dt)], opset_version=ct.target.iOS18)
    def prog(a, b, c):
        gated = mb.mul(x=mb.silu(x=a), y=b)
        kept = mb.silu(x=b)                              # its silu is also an output: not fused
        broadcast = mb.mul(x=mb.silu(x=mb.add(x=a, y=b)), y=c)  # another shape: not fused
        return gated, mb.mul(x=kept, y=a), kept, broadcast

    fused, plain = _plans(tmp_path, prog)
    assert fused.fused.get("silu_mul") == 1
    _same_outputs(fused, plain, [rand((1, 37, 1, 1), fp16, 4.0), rand((1, 37, 1, 1), fp16, 4.0),
                                 rand((1, 1, 1, 1), fp16)])



@pytest.mark.parametrize("fp16", [True, False])
def test_add_of_a_transposed_view_is_fused_and_exact(tmp_path, monkeypatch, fp16):
    """The residual add: a sum of two runtime operands of one shape, one of them a transposed view, is one
    native pass; a broadcasting add and an add of a constant are left to the op."""
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from anemll_fast.mil import fusion

    dt, npt = (types.fp16, np.float16) if fp16 else (types.fp32, np.float32)

    @mb.program(input_specs=[mb.TensorSpec((1, 13, 20), dtype=dt), mb.TensorSpec((1, 20, 13), dtype=dt),
                             mb.TensorSpec((1, 1, 20), dtype=dt)], opset_version=ct.target.iOS18)
    def prog(h, p, b):
        s = mb.add(x=h, y=mb.transpose(x=p, perm=[0, 2, 1]))
        return s, mb.add(x=s, y=b), mb.add(x=h, y=npt(0.25))

    fused, plain = _plans(tmp_path, prog)
    assert fused.fused.get("add") == 1
    calls = []
    real = fusion.native.add
    monkeypatch.setattr(fusion.native, "add", lambda x, y, r: calls.append(1) or real(x, y, r), raising=False)
    _same_outputs(fused, plain, [rand((1, 13, 20), fp16), rand((1, 20, 13), fp16), rand((1, 1, 20), fp16)])
    assert calls == [1]


@pytest.mark.parametrize("shape", [(1, 64, 576), (2, 9, 13, 27), (3, 5), (1, 1, 7), (16, 8)])
@pytest.mark.parametrize("fp16", [True, False])
def test_add_kernel_matches_numpy_bit_for_bit(shape, fp16):
    x = rand(shape, fp16)
    base = rand(shape[:-2] + (shape[-1], shape[-2]), fp16)
    y = np.swapaxes(base, -1, -2)  # a transposed view, as a projection's output arrives
    rnd = r16 if fp16 else (lambda a: a)
    want = rnd(np.add(x, y))
    for a, b in ((x, y), (y, x), (x, np.ascontiguousarray(y))):
        assert np.array_equal(add(a, b, fp16), want)
    with pytest.raises(ValueError, match="layout"):
        add(x, np.asfortranarray(rand(shape))[..., ::-1] if len(shape) > 2 else rand(shape)[:, ::-1], fp16)
    with pytest.raises(ValueError, match="one shape"):
        add(x, x[..., :1], fp16)

def test_view_runs_become_one_reshape_or_one_step(tmp_path):
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec((1, 1, 12), dtype=types.fp32)], opset_version=ct.target.iOS18)
    def prog(x):
        renamed = mb.expand_dims(x=mb.transpose(x=x, perm=[0, 2, 1]), axes=[-1])   # only moves 1-axes
        moved = mb.transpose(x=mb.reshape(x=mb.add(x=x, y=np.float32(1)), shape=[1, 3, 4]), perm=[0, 2, 1])
        return renamed, mb.squeeze(x=moved, axes=[0])

    fused, plain = _plans(tmp_path, prog)
    assert fused.fused.get("reshape_run") == 1 and fused.fused.get("folded_views") == 1
    assert len(fused.steps) < len(plain.steps)
    x = rand((1, 1, 12), False)
    out = _same_outputs(fused, plain, [x])
    assert np.array_equal(out[1], (x + 1).reshape(3, 4).T)


def test_fusion_switch_reads_the_environment(tmp_path, monkeypatch):
    from anemll_fast.mil import fusion

    monkeypatch.setenv("ANEMLL_FAST_FUSION", "0")
    assert not fusion.enabled() and fusion.enabled(True)
    monkeypatch.setenv("ANEMLL_FAST_FUSION", "1")
    assert fusion.enabled() and not fusion.enabled(False)


def test_fusion_code_key_covers_the_interpreter_the_kernels_and_the_cpu_path(tmp_path):
    """A fusion record is replayed only under the code key it was made with: any change to a module of
    anemll_fast.mil, to the native binary or to the instruction-set path changes the key."""
    import shutil

    from anemll_fast.mil import fusion

    src = Path(fusion.__file__).resolve().parent
    mil = tmp_path / "mil"
    shutil.copytree(src, mil, ignore=shutil.ignore_patterns("__pycache__"))
    binary = tmp_path / "kernels.so"
    shutil.copyfile(fusion.native.__file__, binary)
    base = fusion._digest(mil, binary, "avx2")
    assert fusion._digest(mil, binary, "avx2") == base
    op_file = mil / "ops" / "elementwise.py"
    op_file.write_text(op_file.read_text() + "\n# changed\n")
    assert fusion._digest(mil, binary, "avx2") != base
    shutil.copyfile(src / "ops" / "elementwise.py", op_file)
    assert fusion._digest(mil, binary, "avx2") == base
    binary.write_bytes(binary.read_bytes() + b"\0")
    assert fusion._digest(mil, binary, "avx2") != base
    shutil.copyfile(fusion.native.__file__, binary)
    assert fusion._digest(mil, binary, "portable") != base
    # the key of a process whose kernels take the portable path differs from this one's
    code = "from anemll_fast.mil import fusion; print(fusion.code_key())"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("ANEMLL_FAST_KERNELS", None)
    here = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    portable = subprocess.run([sys.executable, "-c", code], env=dict(env, ANEMLL_FAST_KERNELS="portable"),
                              capture_output=True, text=True, check=True)
    assert portable.stdout.strip() != here.stdout.strip()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_model_fused_equals_op_by_op(tmp_path, monkeypatch, arch):
    """Every rewrite on a converted model: the same greedy tokens, logits within the native attention's
    summation-order differences; and the patterns ANEMLL writes are actually found."""
    tiny = pytest.importorskip("anemll_fast.testing.tiny")
    from anemll_fast.backends.reference import ReferenceBackend
    from anemll_fast.config import ModelConfig
    from anemll_fast.testing.pipeline import PythonPipeline

    m = tiny.build_tiny_model(tmp_path / "m", arch, context_length=48, batch_size=8, num_chunks=1)
    prompt = [5, 17, 300, 42, 7, 99, 123, 250, 11, 3, 8]

    def run(flag):
        monkeypatch.setenv("ANEMLL_FAST_FUSION", flag)
        pipe = PythonPipeline(ModelConfig.from_anemll_dir(m.path), ReferenceBackend)
        toks, logits = pipe.greedy_with_logits(prompt, 12)
        fused = {}
        for f in pipe.prefill_fns + pipe.infer_fns:
            for k, v in f._plan.fused.items():
                fused[k] = fused.get(k, 0) + v
        return toks, logits, fused, sum(len(f._plan.steps) for f in pipe.infer_fns)

    toks, logits, fused, n_steps = run("1")
    toks0, logits0, fused0, n_steps0 = run("0")
    assert not fused0 and n_steps < 0.7 * n_steps0
    assert fused.get("rms_norm", 0) > 0 and fused.get("rotary", 0) > 0 and fused.get("reshape_run", 0) > 0
    assert toks == toks0
    for a, b in zip(logits, logits0):
        a, b = a.astype(np.float32), b.astype(np.float32)
        assert np.abs(a - b).max() <= 0.01 * max(1.0, float(np.abs(b).max()))
