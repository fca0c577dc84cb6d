"""Reader and writer of Core ML's weight blob storage format (weights/weight.bin).

Layout (all little-endian, every record 64-byte aligned):
  storage header, 64 bytes: uint32 count, uint32 version (= 2), 7 x uint64 reserved
  per blob, at the offset a program references: 64-byte metadata
      uint32 sentinel 0xDEADBEEF, uint32 dtype code, uint64 size in bytes, uint64 data offset,
      uint64 padding size in bits (sub-byte dtypes), 4 x uint64 reserved
  followed (at `data offset`) by the raw data. Sub-byte elements are packed LSB-first.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Dict, Optional, Tuple

import numpy as np

from anemll_fast.mil.errors import WeightFileError
from anemll_fast.mil.program import NUMPY_DTYPES, SUB_BYTE_BITS

SENTINEL = 0xDEADBEEF
HEADER_SIZE = 64
METADATA_SIZE = 64
ALIGNMENT = 64

# blob dtype code -> MIL dtype name
BLOB_DTYPES: Dict[int, str] = {
    1: "fp16", 2: "fp32", 3: "uint8", 4: "int8", 5: "bf16", 6: "int16", 7: "uint16", 8: "int4",
    9: "uint1", 10: "uint2", 11: "uint4", 12: "uint3", 13: "uint6", 14: "int32", 15: "uint32",
}
BLOB_CODES: Dict[str, int] = {v: k for k, v in BLOB_DTYPES.items()}
_BYTE_WIDTH = {"fp16": 2, "fp32": 4, "uint8": 1, "int8": 1, "bf16": 2, "int16": 2, "uint16": 2,
               "int32": 4, "uint32": 4}
_RAW_NUMPY = {"fp16": "<f2", "fp32": "<f4", "uint8": "u1", "int8": "i1", "bf16": "<u2",
              "int16": "<i2", "uint16": "<u2", "int32": "<i4", "uint32": "<u4"}


def unpack_bits(raw: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Unpack `count` LSB-first packed `nbits`-wide unsigned values from a uint8 array."""
    bits = np.unpackbits(raw, bitorder="little")
    if bits.size < count * nbits:
        raise ValueError(f"{raw.size} bytes hold fewer than {count} {nbits}-bit values")
    bits = bits[: count * nbits].reshape(count, nbits).astype(np.uint8)
    weights = (1 << np.arange(nbits, dtype=np.uint16)).astype(np.uint16)
    return (bits @ weights).astype(np.uint8)


def pack_bits(values: np.ndarray, nbits: int) -> bytes:
    """Pack unsigned values (< 2**nbits) LSB-first, the inverse of unpack_bits."""
    v = np.asarray(values).astype(np.uint8).ravel()
    bits = ((v[:, None] >> np.arange(nbits, dtype=np.uint8)) & 1).astype(np.uint8).ravel()
    return np.packbits(bits, bitorder="little").tobytes()


def bf16_to_fp32(raw_u16: np.ndarray) -> np.ndarray:
    return (raw_u16.astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16 bit patterns (uint16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


class BlobReader:
    """Memory-maps one weight file and decodes blobs by their metadata offset."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as e:
            raise WeightFileError(f"cannot open weight file {path}: {e}") from e
        self.size = size
        if size < HEADER_SIZE:
            raise WeightFileError(
                f"weight file {path} is truncated: {size} bytes, smaller than its {HEADER_SIZE}-byte header"
            )
        count, version = struct.unpack_from("<II", self._buf, 0)
        if version != 2:
            raise WeightFileError(f"weight file {path}: unsupported storage version {version} (expected 2)")
        self.count = count

    def metadata(self, offset: int) -> Tuple[str, int, int, int]:
        """(dtype, size in bytes, data offset, padding bits) of the blob whose metadata is at `offset`."""
        where = f"weight file {self.path}, blob at offset {offset}"
        if offset < HEADER_SIZE or offset + METADATA_SIZE > self.size:
            raise WeightFileError(f"{where}: offset is outside the file ({self.size} bytes)")
        sentinel, code, nbytes, data_off, pad_bits = struct.unpack_from("<IIQQQ", self._buf, offset)
        if sentinel != SENTINEL:
            raise WeightFileError(f"{where}: wrong sentinel 0x{sentinel:08X} (expected 0xDEADBEEF)")
        if code not in BLOB_DTYPES:
            raise WeightFileError(f"{where}: unknown blob dtype code {code}")
        if data_off < offset + METADATA_SIZE or data_off + nbytes > self.size:
            raise WeightFileError(
                f"{where}: data [{data_off}, {data_off + nbytes}) lies outside the file ({self.size} bytes)"
            )
        return BLOB_DTYPES[code], nbytes, data_off, pad_bits

    def read(self, offset: int, dtype: str, shape: Tuple[int, ...], name: str = "") -> np.ndarray:
        """Decode the blob at `offset` as a tensor<dtype, shape> (a fresh, writable array)."""
        blob_dtype, nbytes, data_off, _pad = self.metadata(offset)
        where = f"weight file {self.path}, blob at offset {offset}" + (f" (tensor {name})" if name else "")
        if blob_dtype != dtype:
            raise WeightFileError(f"{where}: blob holds {blob_dtype} but the program declares {dtype}")
        count = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        if dtype in SUB_BYTE_BITS:
            raw = np.frombuffer(self._buf[data_off:data_off + nbytes], dtype=np.uint8)
            nbits = SUB_BYTE_BITS[dtype]
            if nbytes * 8 < count * nbits:
                raise WeightFileError(f"{where}: {nbytes} bytes cannot hold {count} {dtype} values")
            vals = unpack_bits(raw, nbits, count)
            if dtype == "int4":  # two's complement nibble
                vals = ((vals.astype(np.int16) ^ 8) - 8).astype(np.int8)
            return vals.reshape(shape)
        width = _BYTE_WIDTH[dtype]
        if nbytes != count * width:
            raise WeightFileError(
                f"{where}: blob has {nbytes} bytes but tensor<{dtype}, {list(shape)}> needs {count * width}"
            )
        # A view of the mapping, copied at once (one pass over the bytes) and
        # dropped before returning, so that close() never finds it exported.
        view = np.frombuffer(self._buf, dtype=_RAW_NUMPY[dtype], count=count, offset=data_off)
        try:
            if dtype == "bf16":
                return bf16_to_fp32(view).reshape(shape)
            return view.astype(NUMPY_DTYPES[dtype], copy=True).reshape(shape)
        finally:
            del view

    def close(self) -> None:
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()


class BlobWriter:
    """Builds a weight file in memory; `add` returns the metadata offset a program references."""

    def __init__(self) -> None:
        self._data = bytearray(HEADER_SIZE)
        self.count = 0

    def add(self, array: np.ndarray, dtype: str) -> int:
        if dtype not in BLOB_CODES:
            raise WeightFileError(f"cannot store dtype {dtype} in a weight blob")
        if dtype in SUB_BYTE_BITS:
            vals = np.asarray(array).ravel()
            if dtype == "int4":
                vals = vals.astype(np.int16) & 0xF
            nbits = SUB_BYTE_BITS[dtype]
            payload = pack_bits(vals, nbits)
            pad_bits = len(payload) * 8 - vals.size * nbits
        elif dtype == "bf16":
            payload = fp32_to_bf16_bits(np.asarray(array)).tobytes()
            pad_bits = 0
        else:
            payload = np.ascontiguousarray(array, dtype=_RAW_NUMPY[dtype]).tobytes()
            pad_bits = 0
        self._align()
        meta_off = len(self._data)
        data_off = meta_off + METADATA_SIZE
        self._data += struct.pack("<IIQQQ", SENTINEL, BLOB_CODES[dtype], len(payload), data_off, pad_bits)
        self._data += bytes(METADATA_SIZE - 32)
        self._data += payload
        self.count += 1
        return meta_off

    def _align(self) -> None:
        pad = (-len(self._data)) % ALIGNMENT
        self._data += bytes(pad)

    def to_bytes(self) -> bytes:
        self._align()
        struct.pack_into("<II", self._data, 0, self.count, 2)
        return bytes(self._data)

    def write(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.to_bytes())


class BlobCache:
    """One reader per weight file path, shared by all constants of a program."""

    def __init__(self) -> None:
        self._readers: Dict[str, BlobReader] = {}

    def reader(self, path: str) -> BlobReader:
        key = os.path.realpath(path)
        if key not in self._readers:
            self._readers[key] = BlobReader(path)
        return self._readers[key]

    def read(self, ref: "BlobRef", name: str = "") -> np.ndarray:
        return self.reader(ref.path).read(ref.offset, ref.dtype, ref.shape, name=name)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def resolve_blob_path(ref: str, model_path_dir: str, source: Optional[str] = None) -> str:
    """Map a BLOBFILE path ("@model_path/weights/weight.bin") to a file under model_path_dir."""
    rel = ref
    if rel.startswith("@model_path/"):
        rel = rel[len("@model_path/"):]
    elif rel.startswith("@model_path"):
        rel = rel[len("@model_path"):].lstrip("/")
    full = os.path.abspath(os.path.join(model_path_dir, rel))
    base = os.path.abspath(model_path_dir)
    if not (full == base or full.startswith(base + os.sep)):
        raise WeightFileError(f"{source or model_path_dir}: weight path {ref!r} points outside the model")
    return full


class BlobRef:
    """Where a weight tensor lives (file, metadata offset, dtype, shape), unread.

    A program loaded without weights holds these instead of arrays: its
    structure can be cached and its weights read later (`BlobCache.read`)."""

    __slots__ = ("path", "offset", "dtype", "shape")

    def __init__(self, path: str, offset: int, dtype: str, shape: Tuple[int, ...]):
        self.path, self.offset, self.dtype, self.shape = path, int(offset), dtype, tuple(shape)

    def __getstate__(self) -> Tuple[str, int, str, Tuple[int, ...]]:
        return (self.path, self.offset, self.dtype, self.shape)

    def __setstate__(self, state: Tuple[str, int, str, Tuple[int, ...]]) -> None:
        self.path, self.offset, self.dtype, self.shape = state

    def __repr__(self) -> str:
        return f"BlobRef({self.path!r}, offset={self.offset}, {self.dtype}{list(self.shape)})"
