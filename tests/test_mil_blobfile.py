"""Weight blob storage: our reader against coremltools' own writer, and every corruption we can name."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from anemll_fast.mil.blobfile import BlobReader, BlobWriter, pack_bits, unpack_bits
from anemll_fast.mil.errors import WeightFileError

RNG = np.random.default_rng(0)


def test_reads_coremltools_writer_every_dtype(tmp_path):
    storage = pytest.importorskip("coremltools.libmilstoragepython")
    path = str(tmp_path / "w.bin")
    w = storage._BlobStorageWriter(path)
    f16 = RNG.standard_normal(7).astype(np.float16)
    f32 = RNG.standard_normal(5).astype(np.float32)
    u8 = RNG.integers(0, 255, 9).astype(np.uint8)
    i8 = RNG.integers(-128, 127, 9).astype(np.int8)
    u4 = RNG.integers(0, 16, 13).astype(np.uint8)
    u6 = RNG.integers(0, 64, 11).astype(np.uint8)
    u2 = RNG.integers(0, 4, 9).astype(np.uint8)
    u3 = RNG.integers(0, 8, 10).astype(np.uint8)
    i4 = RNG.integers(-8, 8, 7).astype(np.int8)
    i32 = RNG.integers(-1000, 1000, 4).astype(np.int32)
    offs = {
        "fp16": (w.write_fp16_data(f16.view(np.uint16)), f16), "fp32": (w.write_float_data(f32), f32),
        "uint8": (w.write_uint8_data(u8), u8), "int8": (w.write_int8_data(i8), i8),
        "uint4": (w.write_uint4_data(u4), u4), "uint6": (w.write_uint6_data(u6), u6),
        "uint2": (w.write_uint2_data(u2), u2), "uint3": (w.write_uint3_data(u3), u3),
        "int4": (w.write_int4_data(i4), i4), "int32": (w.write_int32_data(i32), i32),
    }
    del w
    r = BlobReader(path)
    for dtype, (off, want) in offs.items():
        got = r.read(off, dtype, want.shape)
        np.testing.assert_array_equal(got, want, err_msg=dtype)


def test_writer_roundtrip_and_lsb_first_packing(tmp_path):
    vals = np.array([1, 0, 3, 1, 0, 1, 1], np.uint8)
    assert pack_bits(vals, 4) == bytes([0x01, 0x13, 0x10, 0x01])  # low nibble first
    for bits in (1, 2, 3, 4, 6, 8):
        v = RNG.integers(0, 2 ** bits, 37).astype(np.uint8)
        np.testing.assert_array_equal(unpack_bits(np.frombuffer(pack_bits(v, bits), np.uint8), bits, 37), v)
    bw = BlobWriter()
    a = RNG.standard_normal((3, 5)).astype(np.float16)
    b = RNG.integers(0, 64, (4, 3)).astype(np.uint8)
    oa, ob = bw.add(a, "fp16"), bw.add(b, "uint6")
    assert oa % 64 == 0 and ob % 64 == 0
    p = tmp_path / "w.bin"
    p.write_bytes(bw.to_bytes())
    r = BlobReader(str(p))
    assert r.count == 2
    np.testing.assert_array_equal(r.read(oa, "fp16", (3, 5)), a)
    np.testing.assert_array_equal(r.read(ob, "uint6", (4, 3)), b)


def _file(tmp_path, data: bytes):
    p = tmp_path / "weight.bin"
    p.write_bytes(data)
    return str(p)


def _good():
    bw = BlobWriter()
    off = bw.add(np.arange(8, dtype=np.float16), "fp16")
    return bytearray(bw.to_bytes()), off


def test_truncated_header(tmp_path):
    with pytest.raises(WeightFileError, match="truncated.*weight.bin|weight.bin.*truncated"):
        BlobReader(_file(tmp_path, b"\x01\x00\x00\x00\x02"))


def test_truncated_data(tmp_path):
    data, off = _good()
    r = BlobReader(_file(tmp_path, bytes(data[:off + 64 + 10])))  # cut inside the 16 data bytes
    with pytest.raises(WeightFileError, match=r"outside the file"):
        r.read(off, "fp16", (8,))


def test_offset_past_end(tmp_path):
    data, _ = _good()
    r = BlobReader(_file(tmp_path, bytes(data)))
    with pytest.raises(WeightFileError, match=r"offset 4096.*outside|outside.*"):
        r.read(4096, "fp16", (8,))


def test_wrong_sentinel(tmp_path):
    data, off = _good()
    struct.pack_into("<I", data, off, 0xCAFEBABE)
    r = BlobReader(_file(tmp_path, bytes(data)))
    with pytest.raises(WeightFileError, match="sentinel 0xCAFEBABE"):
        r.read(off, "fp16", (8,))


def test_dtype_and_size_mismatch(tmp_path):
    data, off = _good()
    r = BlobReader(_file(tmp_path, bytes(data)))
    with pytest.raises(WeightFileError, match="holds fp16 but the program declares fp32"):
        r.read(off, "fp32", (4,))
    with pytest.raises(WeightFileError, match="16 bytes but"):
        r.read(off, "fp16", (9,))


def test_bad_version_and_unknown_dtype(tmp_path):
    data, off = _good()
    bad = bytearray(data)
    struct.pack_into("<I", bad, 4, 7)
    with pytest.raises(WeightFileError, match="version 7"):
        BlobReader(_file(tmp_path, bytes(bad)))
    struct.pack_into("<I", data, off + 4, 99)
    r = BlobReader(_file(tmp_path, bytes(data)))
    with pytest.raises(WeightFileError, match="dtype code 99"):
        r.read(off, "fp16", (8,))
