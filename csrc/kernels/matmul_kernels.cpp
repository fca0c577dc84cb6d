// See matmul_kernels.h. Each block of kRows weight rows is decoded to fp32 into a scratch buffer
// that stays in L1, then multiplied with X: the weight is read from memory once, in its stored
// (compressed) form, which is what bounds a decode step.
#include "kernels/matmul_kernels.h"

#include <cstdlib>
#include <cstring>
#include <vector>

#include "engine/fp16.h"

#include "kernels/cpu_isa.h"

namespace anemll {
namespace kernels {
namespace {

constexpr int kRows = 4;

// Batched products (n >= kGemmFrom positions): register tiles of kMR weight rows x kNR positions.
// The weight rows are decoded kKC columns at a time into an L1-resident fp32 scratch (row-major,
// read by broadcasts); X is packed once per call into panels of kNR positions ([cols][kNR], zero past
// n) that stay in L2 and are streamed by every row block.
constexpr int kMR = 6, kNR = 16, kNR8 = 8;  // kNR8: the last panel, when it has 8 positions or fewer
constexpr int64_t kKC = 256;
constexpr int64_t kGemmFrom = 2;

// ---------------------------------------------------------------- portable
void decode_f16_portable(const uint16_t* src, int64_t count, float* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = half_to_float(src[i]);
}

inline int64_t row_bytes(const Weight& w) { return w.nbits <= 4 ? (w.cols + 1) / 2 : w.cols; }

void round_f16_portable(const float* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(float_to_half(src[i]));
}

// Columns [k0, k1) of row r (k0 even: a 4-bit row is decoded from a byte boundary).
void decode_lut_portable(const Weight& w, int64_t r, int64_t k0, int64_t k1, float* dst) {
  const float* table = w.lut + (r / w.rows_per_group) * w.entries;
  const uint8_t* row = w.idx + r * row_bytes(w);
  if (w.nbits <= 4) {
    for (int64_t k = k0; k < k1; ++k) dst[k - k0] = table[(row[k >> 1] >> ((k & 1) * 4)) & 0xF];
  } else {
    for (int64_t k = k0; k < k1; ++k) dst[k - k0] = table[row[k]];
  }
}

void rows_times_x_portable(const float* wr, int nr, int64_t cols, const float* x, float* y) {
  for (int i = 0; i < nr; ++i) {
    const float* wi = wr + i * cols;
    float acc = 0.f;
    for (int64_t k = 0; k < cols; ++k) acc += wi[k] * x[k];
    y[i] = acc;
  }
}

// C[kMR, NR] (row stride ldc) = (accumulate ? C : 0) + A · B, A: kMR rows of kc fp32 (stride lda),
// B: a packed panel [kc][NR] (NR = kNR, or kNR8 for a narrow last panel).
template <int NR>
void micro_portable(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                    bool accumulate) {
  float acc[kMR][NR] = {};
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * NR;
    for (int i = 0; i < kMR; ++i) {
      const float av = a[i * lda + k];
      for (int t = 0; t < NR; ++t) acc[i][t] += av * bk[t];
    }
  }
  for (int i = 0; i < kMR; ++i) {
    for (int t = 0; t < NR; ++t) c[i * ldc + t] = accumulate ? c[i * ldc + t] + acc[i][t] : acc[i][t];
  }
}

#if AF_X86
// ---------------------------------------------------------------- AVX2 + FMA + F16C
AF_AVX2 void decode_f16_avx2(const uint16_t* src, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < count; ++i) dst[i] = half_to_float(src[i]);
}

AF_AVX2 void round_f16_avx2(const float* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = half_to_float(float_to_half(src[i]));
}

AF_AVX2 void decode_lut_avx2(const Weight& w, int64_t r, int64_t k0, int64_t k1, float* dst) {
  const float* table = w.lut + (r / w.rows_per_group) * w.entries;
  const uint8_t* row = w.idx + r * row_bytes(w) + (w.nbits <= 4 ? k0 / 2 : k0);
  const int64_t cols = k1 - k0;
  int64_t k = 0;
  if (w.nbits <= 4) {
    // 16-entry table in two registers: permute within each, pick by bit 3 of the index.
    float padded[16] = {0};
    std::memcpy(padded, table, static_cast<size_t>(w.entries) * sizeof(float));
    const __m256 lo = _mm256_loadu_ps(padded), hi = _mm256_loadu_ps(padded + 8);
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i nib = _mm256_set1_epi32(0xF), eight = _mm256_set1_epi32(7);
    for (; k + 8 <= cols; k += 8) {
      uint32_t word;
      std::memcpy(&word, row + (k >> 1), 4);
      const __m256i id = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts),
                                          nib);
      const __m256 a = _mm256_permutevar8x32_ps(lo, id), b = _mm256_permutevar8x32_ps(hi, id);
      const __m256 use_hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(id, eight));
      _mm256_storeu_ps(dst + k, _mm256_blendv_ps(a, b, use_hi));
    }
    for (; k < cols; ++k) dst[k] = table[(row[k >> 1] >> ((k & 1) * 4)) & 0xF];
  } else {
    for (; k + 8 <= cols; k += 8) {
      const __m256i id = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k)));
      _mm256_storeu_ps(dst + k, _mm256_i32gather_ps(table, id, 4));
    }
    for (; k < cols; ++k) dst[k] = table[row[k]];
  }
}

AF_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

AF_AVX2 void rows_times_x_avx2(const float* wr, int nr, int64_t cols, const float* x, float* y) {
  __m256 acc[kRows];
  for (int i = 0; i < nr; ++i) acc[i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= cols; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int i = 0; i < nr; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i * cols + k), xv, acc[i]);
  }
  for (int i = 0; i < nr; ++i) {
    float s = hsum(acc[i]);
    for (int64_t kk = k; kk < cols; ++kk) s += wr[i * cols + kk] * x[kk];
    y[i] = s;
  }
}

// Decode steps (n == 1) fuse the decode into the dot product: no scratch round trip. One row at a
// time, front to back: a single sequential stream is what the hardware prefetcher follows best
// (measured with benchmarks/bench_kernels.py: blocks of 2-8 interleaved row streams, or software
// prefetch, ran at 1.5-2.5x the time of streaming the bytes; one stream runs at about 1x).
AF_AVX2 void matvec_f16_avx2(const Weight& w, const float* x, float* y) {
  const int64_t cols = w.cols;
  for (int64_t r = 0; r < w.rows; ++r) {
    const uint16_t* wr = w.f16 + r * cols;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  // four chains hide the FMA latency
    int64_t k = 0;
    for (; k + 32 <= cols; k += 32) {
      const __m128i* h = reinterpret_cast<const __m128i*>(wr + k);
      a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(h)), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(h + 1)), _mm256_loadu_ps(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(h + 2)), _mm256_loadu_ps(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(h + 3)), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= cols; k += 8) {
      a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k))),
                           _mm256_loadu_ps(x + k), a0);
    }
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < cols; ++k) s += half_to_float(wr[k]) * x[k];
    y[r] = s;
  }
}

// The palette paths look up 16-entry tables with pshufb, the same table in both 128-bit lanes. The
// lookups leave the weights of a block in a fixed lane order; rather than shuffling every row back,
// x is permuted once per call into that order (xp), so the rows' FMAs read xp contiguously.
//
// 4-bit, 64-column blocks (32 bytes): the low nibbles (even columns) and the high nibbles (odd
// columns) each index three byte planes of the fp32 table (byte 0 is zero for fp16 values), and two
// byte interleaves rebuild the fp32 weights, no conversion instruction needed. Lane l of a lookup
// covers bytes 16l..16l+15 of the block; the four results hold bytes j = 0-3, 4-7, 8-11, 12-15 of
// each lane.
inline int64_t lut4_xp_column(int64_t p) {
  const int64_t nibble = p >> 5, m = p & 31, lane = (m & 7) >> 2, j = (m >> 3) * 4 + (m & 3);
  return 2 * (lane * 16 + j) + nibble;
}
// 5-6 bit, 32-column blocks (one index byte per column), fp16 tables split in low and high bytes:
// lane 0 holds columns 0-15, lane 1 columns 16-31; after the byte interleave and F16C the groups of
// 8 weights are columns 0-7, 16-23, 8-15, 24-31.
inline int64_t lut6_xp_column(int64_t i) {
  static const int64_t base[4] = {0, 16, 8, 24};
  return base[i >> 3] + (i & 7);
}

AF_AVX2 inline __m256i broadcast_table(const uint8_t* t) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
}

// lo/hi: table bytes looked up for 32 weights -> 4 x 8 fp32 weights, FMA'd with xp (32 floats).
AF_AVX2 inline void fma_halves(__m256i vl, __m256i vh, const float* xp, __m256& a0, __m256& a1) {
  const __m256i h0 = _mm256_unpacklo_epi8(vl, vh), h1 = _mm256_unpackhi_epi8(vl, vh);
  a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h0)), _mm256_loadu_ps(xp), a0);
  a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h0, 1)), _mm256_loadu_ps(xp + 8), a1);
  a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h1)), _mm256_loadu_ps(xp + 16), a0);
  a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h1, 1)), _mm256_loadu_ps(xp + 24), a1);
}

// Row r of a 4-bit palette: the 64-column body through pshufb, the tail scalar.
AF_AVX2 inline void lut4_row(const Weight& w, int64_t r, int64_t rb, int64_t body, const float* xp,
                             const float* x, float* y) {
  const __m256i nib = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  const uint8_t* t = w.lut32_planes + (r / w.rows_per_group) * 48;
  const __m256i t1 = broadcast_table(t), t2 = broadcast_table(t + 16), t3 = broadcast_table(t + 32);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const uint8_t* row = w.idx + r * rb;
  for (int64_t k = 0; k < body; k += 64) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (k >> 1)));
    const __m256i ids[2] = {_mm256_and_si256(b, nib), _mm256_and_si256(_mm256_srli_epi16(b, 4), nib)};
    for (int q = 0; q < 2; ++q) {
      const __m256i v1 = _mm256_shuffle_epi8(t1, ids[q]), v2 = _mm256_shuffle_epi8(t2, ids[q]),
                    v3 = _mm256_shuffle_epi8(t3, ids[q]);
      const __m256i lo01 = _mm256_unpacklo_epi8(zero, v1), hi01 = _mm256_unpackhi_epi8(zero, v1);
      const __m256i lo23 = _mm256_unpacklo_epi8(v2, v3), hi23 = _mm256_unpackhi_epi8(v2, v3);
      const float* xq = xp + k + 32 * q;
      acc[0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23)), _mm256_loadu_ps(xq), acc[0]);
      acc[1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23)), _mm256_loadu_ps(xq + 8),
                               acc[1]);
      acc[2] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23)), _mm256_loadu_ps(xq + 16),
                               acc[2]);
      acc[3] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23)), _mm256_loadu_ps(xq + 24),
                               acc[3]);
    }
  }
  float s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  const float* table = w.lut + (r / w.rows_per_group) * w.entries;
  for (int64_t k = body; k < w.cols; ++k) s += table[(row[k >> 1] >> ((k & 1) * 4)) & 0xF] * x[k];
  y[r] = s;
}

// The sub-tables of row r's group for the 5-6 bit lookups: low bytes in t[0..3], high bytes in t[4..7].
AF_AVX2 inline void lut6_tables(const Weight& w, int64_t r, __m256i* t) {
  const uint8_t* tb = w.lut16_bytes + (r / w.rows_per_group) * 128;
  for (int s = 0; s < 4; ++s) {
    t[s] = broadcast_table(tb + 32 * s);
    t[4 + s] = broadcast_table(tb + 32 * s + 16);
  }
}

// 32 indices of 5-6 bits -> the low (vl) and high (vh) bytes of their fp16 weights. The index's bits
// 0-3 pick the entry within a 16-entry sub-table (pshufb ignores bits 4-6); bits 4 and 5, shifted up
// to bit 7, pick the sub-table by byte blends.
AF_AVX2 inline void lut6_lookup(const __m256i* t, __m256i id, __m256i& vl, __m256i& vh) {
  const __m256i b4 = _mm256_slli_epi16(id, 3), b5 = _mm256_slli_epi16(id, 2);
  const __m256i l01 = _mm256_blendv_epi8(_mm256_shuffle_epi8(t[0], id), _mm256_shuffle_epi8(t[1], id), b4);
  const __m256i l23 = _mm256_blendv_epi8(_mm256_shuffle_epi8(t[2], id), _mm256_shuffle_epi8(t[3], id), b4);
  const __m256i h01 = _mm256_blendv_epi8(_mm256_shuffle_epi8(t[4], id), _mm256_shuffle_epi8(t[5], id), b4);
  const __m256i h23 = _mm256_blendv_epi8(_mm256_shuffle_epi8(t[6], id), _mm256_shuffle_epi8(t[7], id), b4);
  vl = _mm256_blendv_epi8(l01, l23, b5);
  vh = _mm256_blendv_epi8(h01, h23, b5);
}

// Row r of a 5-6 bit palette.
AF_AVX2 inline void lut6_row(const Weight& w, int64_t r, int64_t body, const float* xp, const float* x,
                             float* y) {
  __m256i t[8];
  lut6_tables(w, r, t);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  const uint8_t* row = w.idx + r * w.cols;
  for (int64_t k = 0; k < body; k += 32) {
    __m256i vl, vh;
    lut6_lookup(t, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)), vl, vh);
    fma_halves(vl, vh, xp + k, a0, a1);
  }
  float s = hsum(_mm256_add_ps(a0, a1));
  const float* table = w.lut + (r / w.rows_per_group) * w.entries;
  for (int64_t k = body; k < w.cols; ++k) s += table[row[k]] * x[k];
  y[r] = s;
}

// Columns [k0, k1) of a 5-6 bit row with fp16 tables, decoded to fp32 by the same lookups (instead of
// a gather per 8 weights). The four groups of 8 that the byte interleave yields are columns 0-7,
// 16-23, 8-15 and 24-31 of each block of 32: stored straight to their places.
AF_AVX2 void decode_lut6_avx2(const Weight& w, int64_t r, int64_t k0, int64_t k1, float* dst) {
  __m256i t[8];
  lut6_tables(w, r, t);
  const uint8_t* row = w.idx + r * w.cols;
  int64_t k = k0;
  for (; k + 32 <= k1; k += 32) {
    __m256i vl, vh;
    lut6_lookup(t, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)), vl, vh);
    const __m256i h0 = _mm256_unpacklo_epi8(vl, vh), h1 = _mm256_unpackhi_epi8(vl, vh);
    float* o = dst + (k - k0);
    _mm256_storeu_ps(o, _mm256_cvtph_ps(_mm256_castsi256_si128(h0)));
    _mm256_storeu_ps(o + 16, _mm256_cvtph_ps(_mm256_extracti128_si256(h0, 1)));
    _mm256_storeu_ps(o + 8, _mm256_cvtph_ps(_mm256_castsi256_si128(h1)));
    _mm256_storeu_ps(o + 24, _mm256_cvtph_ps(_mm256_extracti128_si256(h1, 1)));
  }
  const float* table = w.lut + (r / w.rows_per_group) * w.entries;
  for (; k < k1; ++k) dst[k - k0] = table[row[k]];
}

AF_AVX2 void decode_lut_any_avx2(const Weight& w, int64_t r, int64_t k0, int64_t k1, float* dst) {
  if (w.nbits > 4 && w.nbits <= 6 && w.lut16_bytes != nullptr) {
    decode_lut6_avx2(w, r, k0, k1, dst);
  } else {
    decode_lut_avx2(w, r, k0, k1, dst);
  }
}

// x permuted into the lookups' lane order, for the body (whole blocks of `block` columns) of a row.
template <int64_t block, int64_t (*column)(int64_t)>
const float* permuted_x(const float* x, int64_t body) {
  thread_local std::vector<float> xp;  // reused: no allocation per call once grown
  if (static_cast<int64_t>(xp.size()) < body) xp.resize(static_cast<size_t>(body));
  for (int64_t k = 0; k < body; k += block) {
    for (int64_t i = 0; i < block; ++i) xp[static_cast<size_t>(k + i)] = x[k + column(i)];
  }
  return xp.data();
}

// One row at a time, as for fp16 (one memory stream).
template <bool six>
AF_AVX2 void matvec_lut_avx2(const Weight& w, const float* x, float* y) {
  if (six) {
    const int64_t body = w.cols & ~int64_t{31};
    const float* xp = permuted_x<32, lut6_xp_column>(x, body);
    for (int64_t r = 0; r < w.rows; ++r) lut6_row(w, r, body, xp, x, y);
  } else {
    const int64_t body = w.cols & ~int64_t{63}, rb = row_bytes(w);
    const float* xp = permuted_x<64, lut4_xp_column>(x, body);
    for (int64_t r = 0; r < w.rows; ++r) lut4_row(w, r, rb, body, xp, x, y);
  }
}

AF_AVX2 void matvec_lut4_avx2(const Weight& w, const float* x, float* y) { matvec_lut_avx2<false>(w, x, y); }
AF_AVX2 void matvec_lut6_avx2(const Weight& w, const float* x, float* y) { matvec_lut_avx2<true>(w, x, y); }

// The 6 x 16 tile: 12 accumulators, two B vectors and one broadcast (15 of the 16 ymm registers);
// per column of A, 12 FMAs against 8 loads, so the two FMA pipes set the pace.
AF_AVX2 void micro_avx2(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                        bool accumulate) {
  // Named accumulators, not arrays: GCC keeps arrays of vectors on the stack inside the loop.
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
  for (int64_t k = 0; k < kc; ++k, b += kNR) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
// One row of the tile: broadcast A[i][k], two FMAs into that row's accumulators.
#define AF_TILE_ROW(i)                                   \
  {                                                      \
    const __m256 av = _mm256_broadcast_ss(a##i + k);     \
    c##i##0 = _mm256_fmadd_ps(av, b0, c##i##0);          \
    c##i##1 = _mm256_fmadd_ps(av, b1, c##i##1);          \
  }
    AF_TILE_ROW(0) AF_TILE_ROW(1) AF_TILE_ROW(2) AF_TILE_ROW(3) AF_TILE_ROW(4) AF_TILE_ROW(5)
#undef AF_TILE_ROW
  }
  const __m256 out[kMR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int i = 0; i < kMR; ++i) {
    float* ci = c + i * ldc;
    __m256 v0 = out[i][0], v1 = out[i][1];
    if (accumulate) {
      v0 = _mm256_add_ps(_mm256_loadu_ps(ci), v0);
      v1 = _mm256_add_ps(_mm256_loadu_ps(ci + 8), v1);
    }
    _mm256_storeu_ps(ci, v0);
    _mm256_storeu_ps(ci + 8, v1);
  }
}

// The narrow 6 x 8 tile (a last panel of at most 8 positions): half the padding work of a 6 x 16 one.
AF_AVX2 void micro8_avx2(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                         bool accumulate) {
  __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
  for (int64_t k = 0; k < kc; ++k, b += kNR8) {
    const __m256 b0 = _mm256_loadu_ps(b);
    c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(a0 + k), b0, c0);
    c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(a1 + k), b0, c1);
    c2 = _mm256_fmadd_ps(_mm256_broadcast_ss(a2 + k), b0, c2);
    c3 = _mm256_fmadd_ps(_mm256_broadcast_ss(a3 + k), b0, c3);
    c4 = _mm256_fmadd_ps(_mm256_broadcast_ss(a4 + k), b0, c4);
    c5 = _mm256_fmadd_ps(_mm256_broadcast_ss(a5 + k), b0, c5);
  }
  const __m256 out[kMR] = {c0, c1, c2, c3, c4, c5};
  for (int i = 0; i < kMR; ++i) {
    float* ci = c + i * ldc;
    _mm256_storeu_ps(ci, accumulate ? _mm256_add_ps(_mm256_loadu_ps(ci), out[i]) : out[i]);
  }
}

AF_AVX2 uint64_t stream_read_avx2(const uint8_t* p, int64_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    a0 = _mm256_xor_si256(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_xor_si256(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_xor_si256(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_xor_si256(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  const __m256i a = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
  uint64_t s = static_cast<uint64_t>(_mm256_extract_epi64(a, 0) ^ _mm256_extract_epi64(a, 1) ^
                                     _mm256_extract_epi64(a, 2) ^ _mm256_extract_epi64(a, 3));
  for (; i < n; ++i) s ^= p[i];
  return s;
}

#endif

#if AF_NEON
// ---------------------------------------------------------------- NEON (Apple silicon CPU fallback)
void decode_f16_neon(const uint16_t* src, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    const float16x4_t h = vreinterpret_f16_u16(vld1_u16(src + i));
    vst1q_f32(dst + i, vcvt_f32_f16(h));
  }
  for (; i < count; ++i) dst[i] = half_to_float(src[i]);
}

void round_f16_neon(const float* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vcvt_f32_f16(vcvt_f16_f32(vld1q_f32(src + i))));
  for (; i < n; ++i) dst[i] = half_to_float(float_to_half(src[i]));
}

void rows_times_x_neon(const float* wr, int nr, int64_t cols, const float* x, float* y) {
  for (int i = 0; i < nr; ++i) {
    float32x4_t acc = vdupq_n_f32(0.f);
    int64_t k = 0;
    for (; k + 4 <= cols; k += 4) acc = vfmaq_f32(acc, vld1q_f32(wr + i * cols + k), vld1q_f32(x + k));
    float s = vaddvq_f32(acc);
    for (; k < cols; ++k) s += wr[i * cols + k] * x[k];
    y[i] = s;
  }
}
#endif

#if AF_NEON
// The 6 x 16 tile in 24 of the 32 q registers (Q = 4), or the narrow 6 x 8 one (Q = 2).
template <int Q>
void micro_neon(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc, bool accumulate) {
  float32x4_t acc[kMR][Q];
  for (int i = 0; i < kMR; ++i) {
    for (int q = 0; q < Q; ++q) acc[i][q] = vdupq_n_f32(0.f);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * 4 * Q;
    float32x4_t bv[Q];
    for (int q = 0; q < Q; ++q) bv[q] = vld1q_f32(bk + 4 * q);
    for (int i = 0; i < kMR; ++i) {
      const float av = a[i * lda + k];
      for (int q = 0; q < Q; ++q) acc[i][q] = vfmaq_n_f32(acc[i][q], bv[q], av);
    }
  }
  for (int i = 0; i < kMR; ++i) {
    for (int q = 0; q < Q; ++q) {
      float* cq = c + i * ldc + 4 * q;
      vst1q_f32(cq, accumulate ? vaddq_f32(vld1q_f32(cq), acc[i][q]) : acc[i][q]);
    }
  }
}
#endif

using Micro = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t, bool);

struct Dispatch {
  void (*matvec_f16)(const Weight&, const float*, float*);   // optional fused n == 1 paths
  void (*matvec_lut4)(const Weight&, const float*, float*);
  void (*matvec_lut6)(const Weight&, const float*, float*);
  void (*decode_f16)(const uint16_t*, int64_t, float*);
  void (*decode_lut)(const Weight&, int64_t, int64_t, int64_t, float*);
  void (*rows_times_x)(const float*, int, int64_t, const float*, float*);  // one position (n == 1)
  void (*round_f16)(const float*, int64_t, float*);
  Micro micro, micro8;  // kMR x kNR and kMR x kNR8 tiles
  const char* name;
};

Dispatch pick() {
  // ANEMLL_FAST_KERNELS=portable forces the scalar path (to test it on a vector-capable CPU).
  const char* force = std::getenv("ANEMLL_FAST_KERNELS");
  if (force != nullptr && std::strcmp(force, "portable") == 0) {
    return {nullptr, nullptr, nullptr, decode_f16_portable, decode_lut_portable, rows_times_x_portable, round_f16_portable,
            micro_portable<kNR>, micro_portable<kNR8>, "portable"};
  }
#if AF_X86
  if (cpu_has_avx2()) {
    return {matvec_f16_avx2, matvec_lut4_avx2, matvec_lut6_avx2, decode_f16_avx2, decode_lut_any_avx2, rows_times_x_avx2,
            round_f16_avx2, micro_avx2, micro8_avx2, "avx2+fma+f16c"};
  }
#elif AF_NEON
  return {nullptr, nullptr, nullptr, decode_f16_neon, decode_lut_portable, rows_times_x_neon, round_f16_neon,
          micro_neon<4>, micro_neon<2>, "neon"};
#endif
  return {nullptr, nullptr, nullptr, decode_f16_portable, decode_lut_portable, rows_times_x_portable, round_f16_portable,
            micro_portable<kNR>, micro_portable<kNR8>, "portable"};
}

const Dispatch& dispatch() {
  static const Dispatch d = pick();  // CPU features are checked once, at first use
  return d;
}

bool valid(const Weight& w) {
  if (w.rows <= 0 || w.cols <= 0) return false;
  if ((w.f16 == nullptr) == (w.idx == nullptr)) return false;
  if (w.idx != nullptr) {
    if (w.lut == nullptr || w.nbits < 1 || w.nbits > 8 || w.entries < 1 || w.entries > 256) return false;
    if (w.nbits <= 4 && w.entries > 16) return false;
    if (w.rows_per_group <= 0 || w.rows % w.rows_per_group) return false;
  }
  return true;
}

// Row r, columns [k0, k0 + len), of the stored weight (fp16 or palette) as float32.
void decode_row(const Dispatch& d, const Weight& w, int64_t r, int64_t k0, int64_t len, float* out) {
  if (w.f16 != nullptr) {
    d.decode_f16(w.f16 + r * w.cols + k0, len, out);
  } else {
    d.decode_lut(w, r, k0, k0 + len, out);
  }
}

void decode_block(const Dispatch& d, const Weight& w, int64_t r0, int nr, float* out) {
  for (int i = 0; i < nr; ++i) decode_row(d, w, r0 + i, 0, w.cols, out + i * w.cols);
}

// How positions [0, n) split into panels: `wide` panels of kNR (the last one zero-padded), then,
// when the remainder is kNR8 or fewer, one narrow panel of kNR8; `npad` positions in all.
struct Panels {
  int64_t wide, narrow, npad;
  explicit Panels(int64_t n) {
    const int64_t rem = n % kNR;
    narrow = rem > 0 && rem <= kNR8 ? 1 : 0;
    wide = narrow ? n / kNR : (n + kNR - 1) / kNR;
    npad = wide * kNR + narrow * kNR8;
  }
};

// Positions [0, n) of X [cols, ldx] -> the panels: wide panel p at xp + p * cols * kNR ([cols][kNR]),
// the narrow one after them ([cols][kNR8]); zero past n.
void pack_x(const float* x, int64_t cols, int64_t ldx, int64_t n, float* xp) {
  const Panels pn(n);
  for (int64_t p = 0; p < pn.wide + pn.narrow; ++p) {
    const int64_t j0 = p * kNR, nr = p < pn.wide ? kNR : kNR8;
    const int64_t width = n - j0 < nr ? n - j0 : nr;
    float* dst = xp + p * cols * kNR;
    for (int64_t k = 0; k < cols; ++k) {
      std::memcpy(dst + k * nr, x + k * ldx + j0, static_cast<size_t>(width) * sizeof(float));
      if (width < nr) std::memset(dst + k * nr + width, 0, static_cast<size_t>(nr - width) * sizeof(float));
    }
  }
}

template <typename T>
T* grown(std::vector<T>& v, int64_t size) {
  if (static_cast<int64_t>(v.size()) < size) v.resize(static_cast<size_t>(size));
  return v.data();
}

// Software prefetch of the weight's stored bytes, kPrefetchBlocks row blocks ahead, spread evenly over
// the current block's tile products. Measured (benchmarks/bench_kernels.py --batch 64, weights from
// DRAM): without it a cold fp16 product ran 13-20% slower than the same product with the weight in
// cache; one prefetch burst per block (or per row) recovered only half of that, and the hardware
// prefetcher alone did nothing for this access pattern.
constexpr int64_t kPrefetchBlocks = 2;

class Prefetcher {
 public:
  explicit Prefetcher(const Weight& w) : w_(w), row_bytes_(w.f16 != nullptr ? w.cols * 2 : row_bytes(w)) {}

  // Start on the rows of block `r0` (rows are contiguous: one byte range), to be covered in `steps`.
  void start(int64_t r0, int64_t steps) {
    const int64_t r1 = r0 + kMR < w_.rows ? r0 + kMR : w_.rows;
    base_ = (w_.f16 != nullptr ? reinterpret_cast<const char*>(w_.f16) : reinterpret_cast<const char*>(w_.idx)) +
            r0 * row_bytes_;
    len_ = r0 < w_.rows ? (r1 - r0) * row_bytes_ : 0;
    done_ = 0;
    steps_ = steps;
  }

  // The share of the range up to step `i` (of 0 .. steps - 1).
  void step(int64_t i) {
    const int64_t upto = len_ * (i + 1) / steps_;
    for (; done_ < upto; done_ += 64) __builtin_prefetch(base_ + done_);
    // GCC (12, -O1 and up) drops prefetch-only code as having no effect: a volatile asm keeps it.
    asm volatile("");
  }

 private:
  const Weight& w_;
  const int64_t row_bytes_;
  const char* base_ = nullptr;
  int64_t len_ = 0, done_ = 0, steps_ = 1;
};

// Y = W · X for n >= kGemmFrom, at most kNC positions at a time (so that the packed X stays in L2 and
// the scratch kept per thread stays small). Per block of positions, row block by row block (kMR rows):
// the block's rows are decoded front to back into an fp32 scratch laid out by column chunk
// ([chunk][kMR][kc], chunks of at most kKC, equal, even-sized: 4-bit rows decode from a byte), then one
// tile product per (chunk, panel of X), accumulated in an L1 tile [kMR][positions padded to panels].
// Each weight is decoded once per kNC positions; the tile's rows and positions past the weight's and
// n are computed and dropped.
constexpr int64_t kNC = 256;

void gemm(const Dispatch& d, const Weight& w, const float* x, int64_t n, const float* bias, float* y) {
  const int64_t cols = w.cols, chunks = (cols + kKC - 1) / kKC;
  int64_t kc = (cols + chunks - 1) / chunks;
  kc += kc & 1;
  const int64_t npad = Panels(n < kNC ? n : kNC).npad;  // a shorter last block needs no more
  thread_local std::vector<float> xp_buf, a_buf, tile_buf;  // reused across calls, sized by the largest
  float* xp = grown(xp_buf, npad * cols);
  float* a = grown(a_buf, kMR * kc * chunks);
  float* tile = grown(tile_buf, kMR * npad);
  for (int64_t j0 = 0; j0 < n; j0 += kNC) {
    const int64_t nc = n - j0 < kNC ? n - j0 : kNC;
    const Panels pn(nc);
    const int64_t panels = pn.wide + pn.narrow;
    pack_x(x + j0, cols, n, nc, xp);
    Prefetcher ahead(w);
    for (int64_t b = 1; b < kPrefetchBlocks; ++b) {  // the first blocks, before anything hides them
      ahead.start(b * kMR, 1);
      ahead.step(0);
    }
    for (int64_t r0 = 0; r0 < w.rows; r0 += kMR) {
      const int mr = static_cast<int>(w.rows - r0 < kMR ? w.rows - r0 : kMR);
      if (mr < kMR) std::memset(a, 0, static_cast<size_t>(kMR * kc * chunks) * sizeof(float));
      for (int i = 0; i < mr; ++i) {
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t k0 = c * kc, len = cols - k0 < kc ? cols - k0 : kc;
          decode_row(d, w, r0 + i, k0, len, a + (c * kMR + i) * kc);
        }
      }
      ahead.start(r0 + kPrefetchBlocks * kMR, chunks * panels);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t k0 = c * kc, len = cols - k0 < kc ? cols - k0 : kc;
        for (int64_t p = 0; p < panels; ++p) {
          ahead.step(c * panels + p);
          if (p < pn.wide) {
            d.micro(len, a + c * kMR * kc, kc, xp + (p * cols + k0) * kNR, tile + p * kNR, npad, k0 > 0);
          } else {
            d.micro8(len, a + c * kMR * kc, kc, xp + p * cols * kNR + k0 * kNR8, tile + p * kNR, npad, k0 > 0);
          }
        }
      }
      for (int i = 0; i < mr; ++i) {
        float* yr = y + (r0 + i) * n + j0;
        const float* tr = tile + i * npad;
        if (bias == nullptr) {
          std::memcpy(yr, tr, static_cast<size_t>(nc) * sizeof(float));
        } else {
          for (int64_t j = 0; j < nc; ++j) yr[j] = tr[j] + bias[r0 + i];
        }
      }
    }
  }
}

}  // namespace

int matmul(const Weight& w, const float* x, int64_t n, const float* bias, float* y) {
  if (!valid(w) || x == nullptr || y == nullptr || n <= 0) return -1;
  const Dispatch& d = dispatch();
  if (n == 1 && bias == nullptr) {
    if (w.f16 != nullptr && d.matvec_f16 != nullptr) {
      d.matvec_f16(w, x, y);
      return 0;
    }
    if (w.idx != nullptr && w.nbits <= 4 && w.lut32_planes != nullptr && d.matvec_lut4 != nullptr) {
      d.matvec_lut4(w, x, y);
      return 0;
    }
    if (w.idx != nullptr && w.nbits > 4 && w.nbits <= 6 && w.lut16_bytes != nullptr && d.matvec_lut6 != nullptr) {
      d.matvec_lut6(w, x, y);
      return 0;
    }
  }
  if (n >= kGemmFrom) {
    gemm(d, w, x, n, bias, y);
    return 0;
  }
  // One position without a fused path (a bias, 7-8 bit palettes, the portable and NEON paths): rows
  // decoded a block at a time into one scratch reused for the whole call (a few KB: stays in L1).
  std::vector<float> block(static_cast<size_t>(kRows * w.cols));
  for (int64_t r = 0; r < w.rows; r += kRows) {
    const int nr = static_cast<int>(w.rows - r < kRows ? w.rows - r : kRows);
    decode_block(d, w, r, nr, block.data());
    d.rows_times_x(block.data(), nr, w.cols, x, y + r);
    if (bias != nullptr) {
      for (int i = 0; i < nr; ++i) y[r + i] += bias[r + i];
    }
  }
  return 0;
}

int decode_rows(const Weight& w, int64_t r0, int64_t r1, float* out) {
  if (!valid(w) || r0 < 0 || r1 > w.rows || r0 > r1 || out == nullptr) return -1;
  const Dispatch& d = dispatch();
  for (int64_t r = r0; r < r1; r += kRows) {
    const int nr = static_cast<int>(r1 - r < kRows ? r1 - r : kRows);
    decode_block(d, w, r, nr, out + (r - r0) * w.cols);
  }
  return 0;
}

void round_f16(const float* src, int64_t n, float* dst) { dispatch().round_f16(src, n, dst); }

uint64_t stream_read(const uint8_t* p, int64_t n) {
  int64_t i = 0;
  uint64_t s = 0;
#if AF_X86
  if (cpu_has_avx2()) return stream_read_avx2(p, n);
#endif
  for (; i + 8 <= n; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    s ^= v;
  }
  for (; i < n; ++i) s ^= p[i];
  return s;
}

const char* isa() { return dispatch().name; }

}  // namespace kernels
}  // namespace anemll
