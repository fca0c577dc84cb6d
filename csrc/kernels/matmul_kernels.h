// Matrix kernels for the reference backend: Y = W · X with W stored compressed (fp16, or a
// palette with per-row-group lookup tables), decoded a few rows at a time into L1-resident fp32,
// never expanded whole. Single-threaded; the caller releases the GIL.
//
// Layouts: W is [rows, cols] row-major; X is [cols, n] row-major (n positions contiguous per input
// channel, which is how a Core ML 1x1 conv sees [1, C, 1, S]); Y is [rows, n] row-major.
#pragma once

#include <cstdint>

namespace anemll {
namespace kernels {

// A compressed weight matrix. Exactly one of f16 / idx is set.
struct Weight {
  int64_t rows = 0;
  int64_t cols = 0;
  const uint16_t* f16 = nullptr;  // [rows, cols] IEEE half bits
  // Palettized: idx holds one uint8 index per weight (nbits > 4) or two per byte (nbits <= 4,
  // low nibble first, each row starting on a byte boundary, so a row holds ceil(cols/2) bytes).
  const uint8_t* idx = nullptr;
  int nbits = 0;
  const float* lut = nullptr;     // [rows / rows_per_group, entries] fp32
  int64_t entries = 0;
  int64_t rows_per_group = 0;
  // Optional, for 5-6 bit indices when the tables are exactly fp16: per group, for each of the four
  // 16-entry sub-tables, 32 bytes: the low bytes of its 16 halves, then their high bytes (entries
  // past `entries` are zero).
  const uint8_t* lut16_bytes = nullptr;
  // Optional, for nbits <= 4 when every table entry's fp32 bits have a zero low byte (true of fp16
  // values): per group, 48 bytes, the entries' bytes 1, 2 and 3 (16 each, zero past `entries`).
  const uint8_t* lut32_planes = nullptr;
};

// Y[rows, n] = W · X (+ bias[rows] when bias is not null). Returns 0, or -1 on bad arguments.
int matmul(const Weight& w, const float* x, int64_t n, const float* bias, float* y);

// Rows [r0, r1) of W decoded to fp32 into out ([r1 - r0, cols]).
int decode_rows(const Weight& w, int64_t r0, int64_t r1, float* out);

// dst[i] = src[i] rounded to the nearest IEEE half (ties to even), back in fp32: what storing a
// value into an fp16 tensor does. dst may be src.
void round_f16(const float* src, int64_t n, float* dst);

// Reads n bytes once, as fast as one thread can stream them (a bandwidth probe for benchmarks: the
// floor a matvec over the same bytes could reach). Returns a checksum so the reads are not elided.
uint64_t stream_read(const uint8_t* p, int64_t n);

// "avx2+fma+f16c" when the vector path runs on this CPU, else "portable" (or "neon" on arm64).
const char* isa();

}  // namespace kernels
}  // namespace anemll
