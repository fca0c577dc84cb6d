"""Native compressed-weight kernels (anemll_fast._kernels) and their use by the reference backend.

The kernels are checked against numpy on random shapes (odd sizes, every vector tail), on the
vector path this CPU runs, on the portable path (forced in a subprocess) and, where an aarch64
cross compiler and qemu are installed, on the NEON path run under emulation.
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

from anemll_fast._kernels import PackedWeight, kernel_isa

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)


def _palette(rows, cols, groups, entries, fp16_tables=True):
    idx = RNG.integers(0, entries, (rows, cols))
    lut = RNG.standard_normal((groups, entries)).astype(np.float32)
    if fp16_tables:
        lut = lut.astype(np.float16).astype(np.float32)
    dense = lut[np.arange(rows) // (rows // groups)][np.arange(rows)[:, None], idx]
    return idx, lut, dense


# cols cover the vector bodies (8, 16, 32 columns per step) and every kind of tail after them
SHAPES = [(1, 1, 1), (4, 8, 1), (7, 13, 3), (33, 40, 1), (64, 47, 9), (130, 96, 1), (5, 17, 16),
          (3, 31, 1), (6, 32, 1), (5, 33, 1), (9, 63, 1), (2, 64, 1), (11, 95, 1), (4, 577, 1), (3, 1000, 2)]


@pytest.mark.parametrize("rows,cols,n", SHAPES)
def test_fp16_matmul_and_decode_match_numpy(rows, cols, n):
    w = RNG.standard_normal((rows, cols)).astype(np.float16)
    x = RNG.standard_normal((cols, n)).astype(np.float32)
    bias = RNG.standard_normal(rows).astype(np.float32)
    p = PackedWeight.from_f16(w)
    ref = w.astype(np.float64) @ x
    scale = np.abs(ref).max() + 1
    assert np.abs(p.matmul(x) - ref).max() / scale < 1e-5
    assert np.abs(p.matmul(x, bias=bias) - (ref + bias[:, None])).max() / scale < 1e-5
    assert np.array_equal(p.decode(), w.astype(np.float32))
    assert np.array_equal(p.decode(1, rows), w[1:].astype(np.float32))


@pytest.mark.parametrize("nbits,entries", [(1, 2), (2, 4), (3, 8), (4, 16), (4, 11), (5, 32), (6, 64), (6, 37),
                                           (8, 256)])
@pytest.mark.parametrize("rows,cols,n,groups", [(8, 33, 1, 2), (12, 64, 1, 3), (16, 31, 5, 16), (4, 16, 17, 1),
                                                (24, 96, 1, 8), (10, 127, 1, 5), (6, 160, 1, 6), (9, 45, 1, 9)])
def test_palette_matmul_and_decode_match_numpy(nbits, entries, rows, cols, n, groups):
    idx, lut, dense = _palette(rows, cols, groups, entries)
    x = RNG.standard_normal((cols, n)).astype(np.float32)
    p = PackedWeight.from_palette(idx, lut, nbits)
    ref = dense.astype(np.float64) @ x
    assert np.abs(p.matmul(x) - ref).max() / (np.abs(ref).max() + 1) < 1e-5
    assert np.array_equal(p.decode(), dense)
    # 4-bit indices are nibble-packed: half a byte per weight (plus the tables)
    if nbits <= 4:
        assert p.nbytes <= rows * ((cols + 1) // 2) + lut.nbytes + 48 * groups


# Batched products (n >= 2 positions) run the register-tiled kernel: 6-row x 16-position tiles (8 for a
# last panel of at most 8 positions) over column chunks of at most 256 (split evenly, even-sized), in
# blocks of at most 256 positions. rows cover full tiles and every partial one, cols one chunk, a chunk
# plus one, uneven chunks and odd lengths, n every kind of panel tail.
GEMM_ROWS = (1, 5, 6, 7, 13)
GEMM_COLS = (1, 7, 256, 257, 513)
# n: a narrow 8-wide panel alone (2, 7, 8), wide panels padded (15, 300) or exact (16, 64), followed
# by a narrow one (17, 24, 33, 130); 300: more than one block of 256 positions
GEMM_N = (2, 7, 8, 15, 16, 17, 24, 33, 64, 130, 300)


def _close(got, ref):
    return np.abs(got - ref).max() / (np.abs(ref).max() + 1) < 1e-5


@pytest.mark.parametrize("rows", GEMM_ROWS)
@pytest.mark.parametrize("cols", GEMM_COLS)
def test_fp16_batched_product_matches_numpy_at_every_tail(rows, cols):
    w = RNG.standard_normal((rows, cols)).astype(np.float16)
    p = PackedWeight.from_f16(w)
    bias = RNG.standard_normal(rows).astype(np.float32)
    for n in GEMM_N:
        x = RNG.standard_normal((cols, n)).astype(np.float32)
        ref = w.astype(np.float64) @ x
        assert _close(p.matmul(x), ref), n
        assert _close(p.matmul(x, bias=bias), ref + bias[:, None]), n


@pytest.mark.parametrize("nbits", range(1, 9))
@pytest.mark.parametrize("rows,cols,groups", [(7, 31, 7), (12, 257, 4), (13, 513, 1), (6, 64, 3)])
def test_palette_batched_product_matches_numpy(nbits, rows, cols, groups):
    entries = min(1 << nbits, 200)  # 8-bit: a table shorter than the index range
    idx, lut, dense = _palette(rows, cols, groups, entries)
    p = PackedWeight.from_palette(idx, lut, nbits)
    for n in (3, 8, 17, 130, 272):
        x = RNG.standard_normal((cols, n)).astype(np.float32)
        assert _close(p.matmul(x), dense.astype(np.float64) @ x), n


def test_batched_product_keeps_each_row_and_position_apart():
    """Exact integers: every output element is distinct, so a tile written to the wrong rows or
    positions, a panel read with the wrong stride or a chunk added twice shows as a mismatch."""
    rows, cols, n = 19, 300, 37
    w = (np.arange(rows * cols) % 7 - 3).reshape(rows, cols).astype(np.float16)
    x = ((np.arange(cols * n) * 5) % 11 - 5).reshape(cols, n).astype(np.float32)
    x[:, 0] += np.arange(cols) % 2
    assert np.array_equal(PackedWeight.from_f16(w).matmul(x), w.astype(np.float32) @ x)
    idx = np.arange(rows * cols).reshape(rows, cols) % 16
    lut = np.arange(16 * 1, dtype=np.float32).reshape(1, 16) - 8
    assert np.array_equal(PackedWeight.from_palette(idx, lut, 4).matmul(x), lut[0][idx] @ x)


@pytest.mark.parametrize("nbits", [4, 6])
def test_palette_rows_read_their_own_group_table(nbits):
    """Every group's table differs only in one entry's sign: a kernel reading the wrong group's
    table (or one group for all rows) gets those rows wrong."""
    rows, cols, groups = 16, 64, 8
    entries = 1 << nbits
    base = RNG.standard_normal(entries).astype(np.float16).astype(np.float32)
    lut = np.tile(base, (groups, 1))
    lut[np.arange(groups), np.arange(groups)] *= -1 - np.arange(groups)
    idx = np.tile(np.arange(cols) % entries, (rows, 1))
    dense = lut[np.arange(rows) // (rows // groups)][np.arange(rows)[:, None], idx]
    x = np.ones((cols, 1), np.float32)
    p = PackedWeight.from_palette(idx, lut, nbits)
    assert np.abs(p.matmul(x)[:, 0] - dense.sum(1)).max() < 1e-3


def test_round_fp16_matches_numpy():
    from anemll_fast._kernels import round_fp16

    h = np.arange(0, 1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    h = h[np.isfinite(h)].astype(np.float64)
    h.sort()
    ties = ((h[:-1] + h[1:]) / 2).astype(np.float32)  # halfway between neighbours: ties to even
    vals = np.concatenate([ties, RNG.standard_normal(1001).astype(np.float32) * 1e-6,
                           RNG.standard_normal(1003).astype(np.float32) * 3e4,
                           np.array([np.inf, -np.inf, np.nan, 65504, 65520, 65519.99, -0.0, 1e-9], np.float32)])
    with np.errstate(over="ignore"):
        ref = vals.astype(np.float16).astype(np.float32)
    for x in (vals, vals[:37], vals.reshape(-1, 1)[::3]):  # vector body, tail, strided input
        with np.errstate(over="ignore"):
            want = np.asarray(x).astype(np.float16).astype(np.float32)
        got = round_fp16(x)
        assert got.dtype == np.float32 and got.shape == np.shape(x)
        assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(round_fp16(vals), ref, equal_nan=True)
    assert round_fp16(1 / 3).shape == () and float(round_fp16(1 / 3)) == float(np.float16(1 / 3))
    # float64 rounds once, straight to fp16: 1 + 2^-11 + 2^-30 is above the tie between 1 and
    # 1 + 2^-10 (so rounds up), but via float32 it becomes the tie itself (and rounds to even, down)
    v = 1 + 2.0 ** -11 + 2.0 ** -30
    assert float(round_fp16(np.float64(v))) == float(np.float16(v)) == 1 + 2.0 ** -10
    with np.errstate(over="ignore"):
        assert round_fp16(np.array([1, 70000])).tolist() == [1.0, np.inf]
    assert round_fp16(np.zeros((0, 3))).shape == (0, 3)


def test_decode_into_a_scratch_buffer():
    w = RNG.standard_normal((10, 7)).astype(np.float16)
    p = PackedWeight.from_f16(w)
    scratch = np.full(80, 7.0, np.float32)
    out = p.decode(2, 9, out=scratch)
    assert out.shape == (7, 7) and np.shares_memory(out, scratch)
    assert np.array_equal(out, w[2:9].astype(np.float32))
    with pytest.raises(ValueError, match="at least 49"):
        p.decode(2, 9, out=np.empty(48, np.float32))


def _resident_kb(a):
    """Rss (kB) of the mapping holding `a`, from /proc/self/smaps (None where there is none)."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return None
    addr, inside = a.ctypes.data, False
    for line in text.splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    return None


def test_mapped_index_pages_are_released_only_from_read_only_file_maps(tmp_path):
    """The one-byte palette indices of a read-only file map leave the resident set once packed;
    anonymous or writable memory is never touched (dropping its pages would lose data)."""
    import mmap

    from anemll_fast.mil.ops.registry import release_mapped_pages

    f = tmp_path / "w.bin"
    data = (np.arange(64 * mmap.PAGESIZE) % 251).astype(np.uint8)
    data.tofile(f)
    ro = np.memmap(f, dtype=np.uint8, mode="r")[100:100 + 60 * mmap.PAGESIZE].reshape(60, -1)
    assert ro.sum() > 0  # every page resident
    resident = _resident_kb(ro)
    assert resident is None or resident >= 60 * mmap.PAGESIZE // 1024
    assert release_mapped_pages(ro)
    after = _resident_kb(ro)
    assert after is None or after <= resident - 58 * mmap.PAGESIZE // 1024  # the pages inside ro went
    assert np.array_equal(np.asarray(ro).reshape(-1), data[100:100 + ro.size])  # comes back from the file
    anon = data.copy()
    assert not release_mapped_pages(anon) and np.array_equal(anon, data)
    plain = np.memmap(f, dtype=np.uint8, mode="r").view(np.ndarray)[:8 * mmap.PAGESIZE]  # as the cache maps
    assert type(plain) is np.ndarray and release_mapped_pages(plain)
    rw = np.memmap(f, dtype=np.uint8, mode="r+")
    assert not release_mapped_pages(rw)
    assert not release_mapped_pages(np.memmap(f, dtype=np.uint8, mode="r")[:10])  # less than a page


def test_palette_with_fp32_tables_is_exact_too():
    idx, lut, dense = _palette(8, 48, 2, 16, fp16_tables=False)  # not fp16-representable
    x = RNG.standard_normal((48, 1)).astype(np.float32)
    p = PackedWeight.from_palette(idx, lut, 4)
    assert np.abs(p.matmul(x) - dense.astype(np.float64) @ x).max() < 1e-4


@pytest.mark.parametrize("make,match", [
    (lambda: PackedWeight.from_f16(np.zeros((3,), np.float16)), "non-empty matrix"),
    (lambda: PackedWeight.from_f16(np.zeros((0, 4), np.float16)), "non-empty matrix"),
    (lambda: PackedWeight.from_palette(np.zeros((4, 4), int), np.zeros((3, 16), np.float32), 4), "divisible"),
    (lambda: PackedWeight.from_palette(np.full((4, 4), 16), np.zeros((1, 16), np.float32), 4), "index 16"),
    (lambda: PackedWeight.from_palette(np.full((4, 4), -1), np.zeros((1, 16), np.float32), 4), "outside"),
    (lambda: PackedWeight.from_palette(np.zeros((4, 4), int), np.zeros((1, 32), np.float32), 4), "32 palette"),
    (lambda: PackedWeight.from_palette(np.zeros((4, 4), int), np.zeros((1, 2), np.float32), 9), "9-bit"),
])
def test_bad_weights_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_operands_are_refused():
    p = PackedWeight.from_f16(np.ones((3, 4), np.float16))
    with pytest.raises(ValueError, match="4 columns"):
        p.matmul(np.ones((5, 1), np.float32))
    with pytest.raises(ValueError, match="bias of 2"):
        p.matmul(np.ones((4, 1), np.float32), bias=np.ones(2))
    with pytest.raises(ValueError, match="out must be"):
        p.matmul(np.ones((4, 2), np.float32), out=np.empty((3, 1), np.float32))
    with pytest.raises(ValueError, match="outside"):
        p.decode(2, 5)


def test_portable_path_matches_in_a_subprocess():
    code = textwrap.dedent("""
        import numpy as np
        from anemll_fast._kernels import PackedWeight, kernel_isa
        assert kernel_isa() == "portable", kernel_isa()
        rng = np.random.default_rng(3)
        w = rng.standard_normal((37, 29)).astype(np.float16)
        x = rng.standard_normal((29, 3)).astype(np.float32)
        p = PackedWeight.from_f16(w)
        assert np.abs(p.matmul(x) - w.astype(np.float64) @ x).max() < 1e-4
        assert np.abs(p.matmul(x[:, :1]) - w.astype(np.float64) @ x[:, :1]).max() < 1e-4
        for n in (8, 17, 33):  # the tiled batched path: partial row tiles and panel tails
            xb = rng.standard_normal((29, n)).astype(np.float32)
            assert np.abs(p.matmul(xb) - w.astype(np.float64) @ xb).max() < 1e-4
        idx = rng.integers(0, 16, (8, 29)); lut = rng.standard_normal((2, 16)).astype(np.float32)
        dense = lut[np.arange(8) // 4][np.arange(8)[:, None], idx]
        q = PackedWeight.from_palette(idx, lut, 4)
        assert np.abs(q.matmul(x) - dense @ x).max() < 1e-4 and np.array_equal(q.decode(), dense)
        xb = rng.standard_normal((29, 20)).astype(np.float32)
        assert np.abs(q.matmul(xb) - dense @ xb).max() < 1e-4
        # more columns than one chunk: chunks decoded from their own offset, accumulated
        w2 = rng.standard_normal((13, 601)).astype(np.float16)
        x2 = rng.standard_normal((601, 17)).astype(np.float32)
        assert np.abs(PackedWeight.from_f16(w2).matmul(x2) - w2.astype(np.float64) @ x2).max() < 1e-3
        for bits in (4, 6):
            i2 = rng.integers(0, 1 << bits, (12, 601)); l2 = rng.standard_normal((3, 1 << bits)).astype(np.float32)
            d2 = l2[np.arange(12) // 4][np.arange(12)[:, None], i2]
            assert np.abs(PackedWeight.from_palette(i2, l2, bits).matmul(x2) - d2 @ x2).max() < 1e-3
        idx6 = rng.integers(0, 64, (8, 29)); lut6 = rng.standard_normal((4, 64)).astype(np.float16).astype(np.float32)
        dense6 = lut6[np.arange(8) // 2][np.arange(8)[:, None], idx6]
        assert np.abs(PackedWeight.from_palette(idx6, lut6, 6).matmul(x[:, :1]) - dense6 @ x[:, :1]).max() < 1e-4
        from anemll_fast._kernels import round_fp16
        v = (rng.standard_normal(37) * 1000).astype(np.float32)
        assert np.array_equal(round_fp16(v), v.astype(np.float16).astype(np.float32))
        print("ok")
    """)
    env = dict(os.environ, ANEMLL_FAST_KERNELS="portable")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                       cwd=str(REPO))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_this_cpu_runs_a_vector_path():
    # x86-64 CI machines have AVX2/F16C; anything else must at least say what it runs
    assert kernel_isa() in ("avx2+fma+f16c", "neon", "portable")


NEON_DRIVER = r"""
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>
#include "kernels/matmul_kernels.h"
#include "engine/fp16.h"
using namespace anemll;
int main() {
  if (std::string(kernels::isa()) != "neon") { std::printf("isa %s\n", kernels::isa()); return 2; }
  unsigned seed = 1;
  auto rnd = [&]() { seed = seed * 1103515245u + 12345u; return ((seed >> 8) % 2000) / 1000.0f - 1.0f; };
  for (int64_t rows : {1, 5, 9, 13}) for (int64_t cols : {3, 8, 13, 300}) for (int64_t n : {1, 3, 6, 8, 17, 33, 270}) {
    std::vector<uint16_t> w(rows * cols); std::vector<float> wf(rows * cols), x(cols * n), y(rows * n);
    for (size_t i = 0; i < w.size(); ++i) { w[i] = float_to_half(rnd()); wf[i] = half_to_float(w[i]); }
    for (auto& v : x) v = rnd();
    kernels::Weight kw; kw.rows = rows; kw.cols = cols; kw.f16 = w.data();
    if (kernels::matmul(kw, x.data(), n, nullptr, y.data()) != 0) return 3;
    for (int64_t r = 0; r < rows; ++r) for (int64_t j = 0; j < n; ++j) {
      double s = 0; for (int64_t k = 0; k < cols; ++k) s += wf[r * cols + k] * x[k * n + j];
      if (std::fabs(s - y[r * n + j]) > 1e-4) { std::printf("mismatch %lld %lld\n", (long long)r, (long long)j); return 4; }
    }
  }
  // palettes (4-bit nibbles and one byte per index) and fp16 rounding
  for (int nbits : {4, 6}) {
    const int64_t rows = 6, cols = 37, groups = 3, entries = 1 << nbits, rb = nbits <= 4 ? (cols + 1) / 2 : cols;
    std::vector<uint8_t> idx(rows * rb, 0); std::vector<int> full(rows * cols);
    std::vector<float> lut(groups * entries), x(cols);
    for (auto& v : lut) v = rnd();
    for (auto& v : x) v = rnd();
    for (int64_t r = 0; r < rows; ++r) for (int64_t k = 0; k < cols; ++k) {
      const int v = static_cast<int>((seed = seed * 1103515245u + 12345u) >> 16) % entries;
      full[r * cols + k] = v;
      if (nbits <= 4) idx[r * rb + k / 2] |= static_cast<uint8_t>(v << ((k & 1) * 4)); else idx[r * rb + k] = v;
    }
    kernels::Weight kw; kw.rows = rows; kw.cols = cols; kw.idx = idx.data(); kw.nbits = nbits; kw.lut = lut.data();
    kw.entries = entries; kw.rows_per_group = rows / groups;
    for (int64_t n : {1, 9, 20}) {  // one position, and batches through the tiled kernel
      std::vector<float> xb(cols * n), yb(rows * n);
      for (auto& v : xb) v = rnd();
      if (kernels::matmul(kw, xb.data(), n, nullptr, yb.data()) != 0) return 5;
      for (int64_t r = 0; r < rows; ++r) for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t k = 0; k < cols; ++k) s += lut[(r / 2) * entries + full[r * cols + k]] * xb[k * n + j];
        if (std::fabs(s - yb[r * n + j]) > 1e-4) { std::printf("palette mismatch %d %lld\n", nbits, (long long)r); return 6; }
      }
    }
  }
  std::vector<float> v(21), out(21);
  for (auto& e : v) e = rnd() * 3000.0f;
  kernels::round_f16(v.data(), 21, out.data());
  for (int i = 0; i < 21; ++i) if (out[i] != half_to_float(float_to_half(v[i]))) { std::printf("round %d\n", i); return 7; }
  std::printf("ok\n");
  return 0;
}
"""


def test_neon_path_runs_under_qemu(tmp_path):
    run_neon_driver(tmp_path, NEON_DRIVER, "matmul_kernels.cpp")


@pytest.mark.parametrize("lut", [None, 4, 6])
def test_backend_keeps_projection_weights_packed(tmp_path, lut):
    """Projections run from fp16 / palette storage and are never expanded to float32; the greedy
    tokens still equal the numpy reference (test_reference_backend_models covers the logits)."""
    tiny = pytest.importorskip("anemll_fast.testing.tiny")
    from anemll_fast.backends.reference import ReferenceBackend
    from anemll_fast.config import ModelConfig
    from anemll_fast.mil.ops.registry import Stored
    from anemll_fast.testing.pipeline import PythonPipeline

    m = tiny.build_tiny_model(tmp_path / "m", "llama", lut_ffn=lut, context_length=32, batch_size=8)
    pipe = PythonPipeline(ModelConfig.from_anemll_dir(m.path), ReferenceBackend)
    prompt = [5, 17, 300, 42, 7, 99, 123, 250, 11, 3]
    out = pipe.greedy(prompt, 8)
    models = [pipe.embed, pipe.head] + pipe.prefill_fns + pipe.infer_fns
    stored = [st for mdl in models for st in mdl.stored_constants() if isinstance(st, Stored)]
    kinds = {st.storage[0] for st in stored if st.storage is not None}
    assert ("palette" if lut else "fp16") in kinds
    packed = [st for st in stored if st.storage is not None and st._packed is not None]
    assert packed, "no projection ran from a packed weight"
    # negative control: a weight that ran packed was never materialized as float32
    assert all(st._cf is None for st in packed)
    if lut is None:
        assert out == m.reference().greedy(prompt, 8)


def test_valid_keys_reads_the_mask():
    from anemll_fast.mil.attention import valid_keys

    m = np.full((1, 1, 3, 8), -np.inf, np.float32)
    m[0, 0, 0, :2] = 0
    m[0, 0, 2, :5] = 0
    assert valid_keys(m) == 5
    m[0, 0, 1, 7] = -1e4  # finite: a visible (if tiny) weight, so nothing may be cut
    assert valid_keys(m) == 8
    assert valid_keys(np.full((1, 4), -np.inf)) == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_attention_over_valid_keys_is_bit_exact(tmp_path, monkeypatch, arch):
    """The fused attention (keys sliced to the mask's visible span) gives bit-identical outputs to
    the op-by-op chain over the whole context, through prefill and decode (numpy computing both: the
    native kernel's own summation order is tested in test_reference_chains)."""
    tiny = pytest.importorskip("anemll_fast.testing.tiny")
    monkeypatch.setenv("ANEMLL_FAST_FUSION", "0")
    from anemll_fast.backends.reference import ReferenceBackend
    from anemll_fast.config import ModelConfig
    from anemll_fast.mil import plan as plan_mod
    from anemll_fast.testing.pipeline import PythonPipeline

    m = tiny.build_tiny_model(tmp_path / "m", arch, context_length=48, batch_size=8, num_chunks=2)
    prompt = [5, 17, 300, 42, 7, 99, 123, 250, 11, 3, 8]

    def run():
        pipe = PythonPipeline(ModelConfig.from_anemll_dir(m.path), ReferenceBackend)
        toks, logits = pipe.greedy_with_logits(prompt, 12)
        fused = sum(f._plan.fused_attention for f in pipe.prefill_fns + pipe.infer_fns)
        return toks, logits, fused

    toks, logits, fused = run()
    assert fused > 0, "no attention chain was fused"
    monkeypatch.setattr(plan_mod, "fuse_attention", lambda steps, outs, consts, *native: (steps, 0))
    toks0, logits0, fused0 = run()
    assert fused0 == 0
    assert toks == toks0
    for a, b in zip(logits, logits0):
        assert np.array_equal(a, b)
