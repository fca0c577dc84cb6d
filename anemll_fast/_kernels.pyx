# cython: language_level=3
"""Thin typed skin over csrc/kernels: compressed-weight matmuls for the reference backend.

Weights stay in their stored form (fp16 bits, or palette indices with per-row-group tables); each
call decodes a few rows at a time into L1 and multiplies, with the GIL released.
"""
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint64_t

import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef extern from "kernels/matmul_kernels.h" namespace "anemll::kernels" nogil:
    cdef cppclass Weight:
        int64_t rows
        int64_t cols
        const uint16_t* f16
        const uint8_t* idx
        int nbits
        const float* lut
        int64_t entries
        int64_t rows_per_group
        const uint8_t* lut16_bytes
        const uint8_t* lut32_planes
    int matmul(const Weight& w, const float* x, int64_t n, const float* bias, float* y)
    int decode_rows(const Weight& w, int64_t r0, int64_t r1, float* out)
    const char* isa()
    uint64_t stream_read(const uint8_t* p, int64_t n)
    void round_f16(const float* src, int64_t n, float* dst)


def kernel_isa() -> str:
    """Which vector path runs on this CPU ("avx2+fma+f16c", "neon" or "portable")."""
    return isa().decode()


def round_fp16(r, out=None):
    """r rounded to fp16 precision (round to nearest even) as float32: numpy's float16 round trip in one
    vectorized pass (F16C / NEON), for the outputs of fp16-typed ops. Into a new array, or into `out`
    (a C-contiguous float32 array of r's size; r itself rounds in place)."""
    a = np.asarray(r)
    if a.dtype != np.float32:  # float64 straight to fp16 (via fp32 would round twice), ints, bools
        a = a.astype(np.float16).astype(np.float32)
        if out is None:
            return a
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    if out is None:
        out = np.empty(a.shape, np.float32)
    elif type(out) is not np.ndarray or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 array")
    elif out.size != a.size:
        raise ValueError(f"out of {out.size} values for {a.size}")
    cdef int64_t n = a.size
    if n == 0:
        return out
    cdef const float[::1] src = a.reshape(-1)
    cdef float[::1] dst = out.reshape(-1)
    with nogil:
        round_f16(&src[0], n, &dst[0])
    return out


def stream_read_bytes(buf) -> int:
    """Read every byte of a contiguous buffer once (the bandwidth floor, for benchmarks); a checksum."""
    cdef const uint8_t[::1] b = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    cdef uint64_t s = 0
    cdef int64_t n = b.shape[0]
    if n == 0:
        return 0
    with nogil:
        s = stream_read(&b[0], n)
    return s


def _pack_nibbles(const uint8_t[:, ::1] u):
    """[rows, cols] values < 16 -> [rows, ceil(cols / 2)] bytes, low nibble first, written in one
    pass (no temporaries the size of the matrix: the indices may be a few hundred MB)."""
    cdef int64_t rows = u.shape[0], cols = u.shape[1], r, k
    out = np.empty((rows, (cols + 1) // 2), np.uint8)
    cdef uint8_t[:, ::1] o = out
    with nogil:
        for r in range(rows):
            for k in range(0, cols - 1, 2):
                o[r, k >> 1] = u[r, k] | (u[r, k + 1] << 4)
            if cols % 2:
                o[r, cols >> 1] = u[r, cols - 1]
    return out


cdef class PackedWeight:
    """A [rows, cols] weight kept compressed; `matmul(x)` computes W · x for x of shape [cols, n]."""

    cdef Weight w
    cdef object _keep   # the arrays the pointers refer to
    cdef readonly int64_t rows, cols
    cdef readonly str kind
    cdef readonly int nbits

    def __cinit__(self):
        self._keep = ()

    @staticmethod
    def from_f16(weight):
        """weight: float16 array [rows, cols] (C-contiguous copy taken if needed)."""
        cdef PackedWeight p = PackedWeight()
        a = np.ascontiguousarray(weight, dtype=np.float16)
        if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"an fp16 weight must be a non-empty matrix, got shape {list(a.shape)}")
        cdef const uint16_t[:, ::1] bits = a.view(np.uint16)
        p.w.rows, p.w.cols = a.shape[0], a.shape[1]
        p.w.f16 = &bits[0, 0]
        p._keep = (a,)
        p.rows, p.cols, p.kind, p.nbits = a.shape[0], a.shape[1], "fp16", 16
        return p

    @staticmethod
    def from_palette(indices, lut, int nbits):
        """indices: integer array [rows, cols] (values < lut entries); lut: [groups, entries] floats,
        one table per block of rows / groups consecutive rows. Indices of <= 4 bits are nibble-packed."""
        cdef PackedWeight p = PackedWeight()
        idx = np.asarray(indices)
        table = np.ascontiguousarray(lut, dtype=np.float32)
        if idx.ndim != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
            raise ValueError(f"palette indices must be a non-empty matrix, got shape {list(idx.shape)}")
        if table.ndim != 2 or table.shape[0] == 0 or idx.shape[0] % table.shape[0]:
            raise ValueError(f"lut of shape {list(table.shape)} for {idx.shape[0]} rows "
                             f"(needs [groups, entries] with rows divisible by groups)")
        if not 1 <= nbits <= 8 or table.shape[1] > (1 << nbits):
            raise ValueError(f"{table.shape[1]} palette entries do not fit {nbits}-bit indices")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= table.shape[1]):
            raise ValueError(f"palette index {int(idx.max())} outside a {table.shape[1]}-entry table")
        rows, cols = idx.shape
        if nbits <= 4:
            packed = _pack_nibbles(np.ascontiguousarray(idx, dtype=np.uint8))
        else:
            packed = np.ascontiguousarray(idx, dtype=np.uint8)
        cdef const uint8_t[:, ::1] pk = packed
        cdef const float[:, ::1] tb = table
        cdef const uint8_t[:, ::1] t16
        keep = (packed, table)
        cdef const uint8_t[:, ::1] planes
        if nbits <= 4 and not (table.view(np.uint32) & 0xFF).any():
            # bytes 1-3 of the fp32 entries, one 16-byte plane each, for the 4-bit pshufb path
            raw = np.zeros((table.shape[0], 16, 4), np.uint8)
            raw[:, :table.shape[1]] = table.view(np.uint8).reshape(table.shape[0], -1, 4)
            split3 = np.ascontiguousarray(raw[:, :, 1:].transpose(0, 2, 1).reshape(table.shape[0], 48))
            planes = split3
            p.w.lut32_planes = &planes[0, 0]
            keep = keep + (split3,)
        half = table.astype(np.float16)
        if 4 < nbits <= 6 and np.array_equal(half.astype(np.float32), table):
            # byte-split fp16 sub-tables for the pshufb paths (exact: the tables are fp16 values)
            bits = np.zeros((table.shape[0], 4, 16), np.uint16)
            bits.reshape(table.shape[0], -1)[:, :table.shape[1]] = half.view(np.uint16)
            split = np.ascontiguousarray(np.concatenate([(bits & 0xFF).astype(np.uint8),
                                                         (bits >> 8).astype(np.uint8)], axis=2)
                                         .reshape(table.shape[0], -1))
            t16 = split
            p.w.lut16_bytes = &t16[0, 0]
            keep = keep + (split,)
        p.w.rows, p.w.cols = rows, cols
        p.w.idx = &pk[0, 0]
        p.w.nbits = nbits
        p.w.lut = &tb[0, 0]
        p.w.entries = table.shape[1]
        p.w.rows_per_group = rows // table.shape[0]
        p._keep = keep
        p.rows, p.cols, p.kind, p.nbits = rows, cols, "palette", nbits
        return p

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._keep)

    def matmul(self, x, bias=None, out=None):
        """W · x for x [cols, n] float32 (n = 1 for a decode step); returns [rows, n] float32."""
        xa = np.ascontiguousarray(x, dtype=np.float32)
        if xa.ndim == 1:
            xa = xa.reshape(-1, 1)
        if xa.ndim != 2 or xa.shape[0] != self.cols:
            raise ValueError(f"input of shape {list(np.shape(x))} for a weight of {self.cols} columns")
        cdef int64_t n = xa.shape[1]
        if out is None:
            out = np.empty((self.rows, n), np.float32)
        elif out.shape != (self.rows, n) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError("out must be a C-contiguous float32 array of shape [rows, n]")
        cdef const float[:, ::1] xv = xa
        cdef float[:, ::1] yv = out
        cdef const float* bp = NULL
        cdef const float[::1] bv
        if bias is not None:
            bv = np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
            if bv.shape[0] != self.rows:
                raise ValueError(f"bias of {bv.shape[0]} values for {self.rows} rows")
            bp = &bv[0]
        cdef int rc
        if n == 0:
            return out
        with nogil:
            rc = matmul(self.w, &xv[0, 0], n, bp, &yv[0, 0])
        if rc != 0:
            raise ValueError("invalid packed weight")
        return out

    def decode(self, int64_t r0=0, r1=None, out=None):
        """Rows [r0, r1) as a float32 array (for large batches driven through BLAS, and for tests);
        `out`, when given, is a C-contiguous float32 array of at least that many elements whose
        leading part receives them (a scratch buffer reused across row blocks)."""
        cdef int64_t end = self.rows if r1 is None else r1
        if not 0 <= r0 <= end <= self.rows:
            raise ValueError(f"rows [{r0}, {end}) outside [0, {self.rows})")
        if out is None:
            out = np.empty((end - r0, self.cols), np.float32)
        else:
            if out.dtype != np.float32 or not out.flags.c_contiguous or out.size < (end - r0) * self.cols:
                raise ValueError(f"out must be a C-contiguous float32 array of at least {(end - r0) * self.cols} "
                                 f"elements")
            out = out.reshape(-1)[:(end - r0) * self.cols].reshape(end - r0, self.cols)
        if end == r0:
            return out
        cdef float[:, ::1] ov = out
        cdef int rc
        with nogil:
            rc = decode_rows(self.w, r0, end, &ov[0, 0])
        if rc != 0:
            raise ValueError("invalid packed weight")
        return out


include "_kernels_chains.pxi"
