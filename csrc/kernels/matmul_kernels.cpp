// See matmul_kernels.h. Each block of kRows weight rows is decoded to fp32 into a scratch buffer
// that stays in L1, then multiplied with X: the weight is read from memory once, in its stored
// (compressed) form, which is what bounds a decode step.
#include "kernels/matmul_kernels.h"

#include <cstdlib>
#include <cstring>
#include <vector>

#include "engine/fp16.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define AF_X86 1
#define AF_AVX2 __attribute__((target("avx2,fma,f16c")))
#elif defined(__aarch64__)
#include <arm_neon.h>
#define AF_NEON 1
#endif

namespace anemll {
namespace kernels {
namespace {

constexpr int kRows = 4;

// ---------------------------------------------------------------- portable
void decode_f16_portable(const uint16_t* src, int64_t count, float* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = half_to_float(src[i]);
}

inline int64_t row_bytes(const Weight& w) { return w.nbits <= 4 ? (w.cols + 1) / 2 : w.cols; }

void decode_lut_portable(const Weight& w, int64_t r, float* dst) {
  const float* table = w.lut + (r / w.rows_per_group) * w.entries;
  const uint8_t* row = w.idx + r * row_bytes(w);
  if (w.nbits <= 4) {
    for (int64_t k = 0; k < w.cols; ++k) dst[k] = table[(row[k >> 1] >> ((k & 1) * 4)) & 0xF];
  } else {
    for (int64_t k = 0; k < w.cols; ++k) dst[k] = table[row[k]];
  }
}

void rows_times_x_portable(const float* wr, int nr, int64_t cols, const float* x, int64_t n, float* y,
                           int64_t ldy) {
  for (int i = 0; i < nr; ++i) {
    float* yi = y + i * ldy;
    const float* wi = wr + i * cols;
    if (n == 1) {
      float acc = 0.f;
      for (int64_t k = 0; k < cols; ++k) acc += wi[k] * x[k];
      yi[0] = acc;
      continue;
    }
    for (int64_t j = 0; j < n; ++j) yi[j] = 0.f;
    for (int64_t k = 0; k < cols; ++k) {
      const float a = wi[k];
      const float* xk = x + k * n;
      for (int64_t j = 0; j < n; ++j) yi[j] += a * xk[j];
    }
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

AF_AVX2 void decode_lut_avx2(const Weight& w, int64_t r, float* dst) {
  const float* table = w.lut + (r / w.rows_per_group) * w.entries;
  const uint8_t* row = w.idx + r * row_bytes(w);
  int64_t k = 0;
  if (w.nbits <= 4) {
    // 16-entry table in two registers: permute within each, pick by bit 3 of the index.
    float padded[16] = {0};
    std::memcpy(padded, table, static_cast<size_t>(w.entries) * sizeof(float));
    const __m256 lo = _mm256_loadu_ps(padded), hi = _mm256_loadu_ps(padded + 8);
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i nib = _mm256_set1_epi32(0xF), eight = _mm256_set1_epi32(7);
    for (; k + 8 <= w.cols; k += 8) {
      uint32_t word;
      std::memcpy(&word, row + (k >> 1), 4);
      const __m256i id = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts),
                                          nib);
      const __m256 a = _mm256_permutevar8x32_ps(lo, id), b = _mm256_permutevar8x32_ps(hi, id);
      const __m256 use_hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(id, eight));
      _mm256_storeu_ps(dst + k, _mm256_blendv_ps(a, b, use_hi));
    }
    for (; k < w.cols; ++k) dst[k] = table[(row[k >> 1] >> ((k & 1) * 4)) & 0xF];
  } else {
    for (; k + 8 <= w.cols; k += 8) {
      const __m256i id = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k)));
      _mm256_storeu_ps(dst + k, _mm256_i32gather_ps(table, id, 4));
    }
    for (; k < w.cols; ++k) dst[k] = table[row[k]];
  }
}

AF_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

AF_AVX2 void rows_times_x_avx2(const float* wr, int nr, int64_t cols, const float* x, int64_t n, float* y,
                               int64_t ldy) {
  if (n == 1) {
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
      y[i * ldy] = s;
    }
    return;
  }
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 acc[kRows];
    for (int i = 0; i < nr; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < cols; ++k) {
      const __m256 xv = _mm256_loadu_ps(x + k * n + j);
      for (int i = 0; i < nr; ++i) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(wr[i * cols + k]), xv, acc[i]);
    }
    for (int i = 0; i < nr; ++i) _mm256_storeu_ps(y + i * ldy + j, acc[i]);
  }
  for (; j < n; ++j) {
    for (int i = 0; i < nr; ++i) {
      float s = 0.f;
      for (int64_t k = 0; k < cols; ++k) s += wr[i * cols + k] * x[k * n + j];
      y[i * ldy + j] = s;
    }
  }
}

// Decode steps (n == 1) fuse the decode into the dot product: no scratch round trip.
AF_AVX2 void matvec_f16_avx2(const Weight& w, const float* x, float* y) {
  const int64_t cols = w.cols;
  int64_t r = 0;
  for (; r < w.rows; r += kRows) {
    const int nr = static_cast<int>(w.rows - r < kRows ? w.rows - r : kRows);
    __m256 a0[kRows], a1[kRows];
    for (int i = 0; i < kRows; ++i) a0[i] = a1[i] = _mm256_setzero_ps();
    const uint16_t* base = w.f16 + r * cols;
    int64_t k = 0;
    for (; k + 16 <= cols; k += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      for (int i = 0; i < nr; ++i) {
        const uint16_t* wr = base + i * cols + k;
        a0[i] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr))), x0, a0[i]);
        a1[i] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + 8))), x1,
                                a1[i]);
      }
    }
    for (int i = 0; i < nr; ++i) {
      float s = hsum(_mm256_add_ps(a0[i], a1[i]));
      for (int64_t kk = k; kk < cols; ++kk) s += half_to_float(base[i * cols + kk]) * x[kk];
      y[r + i] = s;
    }
  }
}

// 4-bit palettes with fp16 tables: pshufb looks up the low and the high byte of 16 halves at
// once, so 16 weights cost about a dozen instructions.
AF_AVX2 void matvec_lut4_avx2(const Weight& w, const float* x, float* y) {
  const int64_t cols = w.cols, rb = row_bytes(w);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t r = 0; r < w.rows; r += kRows) {
    const int nr = static_cast<int>(w.rows - r < kRows ? w.rows - r : kRows);
    __m128i tlo[kRows], thi[kRows];
    __m256 a0[kRows], a1[kRows];
    for (int i = 0; i < nr; ++i) {
      const uint8_t* t = w.lut16_bytes + ((r + i) / w.rows_per_group) * 32;
      tlo[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(t));
      thi[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16));
      a0[i] = a1[i] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 16 <= cols; k += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      for (int i = 0; i < nr; ++i) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.idx + (r + i) * rb + (k >> 1)));
        const __m128i id = _mm_unpacklo_epi8(_mm_and_si128(b, low4), _mm_and_si128(_mm_srli_epi16(b, 4), low4));
        const __m128i vl = _mm_shuffle_epi8(tlo[i], id), vh = _mm_shuffle_epi8(thi[i], id);
        a0[i] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_unpacklo_epi8(vl, vh)), x0, a0[i]);
        a1[i] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_unpackhi_epi8(vl, vh)), x1, a1[i]);
      }
    }
    for (int i = 0; i < nr; ++i) {
      float s = hsum(_mm256_add_ps(a0[i], a1[i]));
      const float* table = w.lut + ((r + i) / w.rows_per_group) * w.entries;
      const uint8_t* row = w.idx + (r + i) * rb;
      for (int64_t kk = k; kk < cols; ++kk) s += table[(row[kk >> 1] >> ((kk & 1) * 4)) & 0xF] * x[kk];
      y[r + i] = s;
    }
  }
}

// 5- and 6-bit palettes (one uint8 index per weight): four 16-entry sub-tables per byte plane,
// looked up with pshufb and chosen by the index's top two bits.
AF_AVX2 void matvec_lut6_avx2(const Weight& w, const float* x, float* y) {
  const int64_t cols = w.cols;
  const __m128i low4 = _mm_set1_epi8(0x0F), one = _mm_set1_epi8(1), two = _mm_set1_epi8(2),
                three = _mm_set1_epi8(3);
  for (int64_t r = 0; r < w.rows; ++r) {
    const uint8_t* t = w.lut16_bytes + (r / w.rows_per_group) * 128;
    __m128i lo[4], hi[4];
    for (int k = 0; k < 4; ++k) {
      lo[k] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 32 * k));
      hi[k] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 32 * k + 16));
    }
    const uint8_t* row = w.idx + r * cols;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= cols; k += 16) {
      const __m128i id = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k));
      const __m128i sub = _mm_and_si128(id, low4);
      const __m128i sel = _mm_and_si128(_mm_srli_epi16(id, 4), low4);
      const __m128i m1 = _mm_cmpeq_epi8(sel, one), m2 = _mm_cmpeq_epi8(sel, two), m3 = _mm_cmpeq_epi8(sel, three);
      __m128i vl = _mm_shuffle_epi8(lo[0], sub), vh = _mm_shuffle_epi8(hi[0], sub);
      vl = _mm_blendv_epi8(vl, _mm_shuffle_epi8(lo[1], sub), m1);
      vh = _mm_blendv_epi8(vh, _mm_shuffle_epi8(hi[1], sub), m1);
      vl = _mm_blendv_epi8(vl, _mm_shuffle_epi8(lo[2], sub), m2);
      vh = _mm_blendv_epi8(vh, _mm_shuffle_epi8(hi[2], sub), m2);
      vl = _mm_blendv_epi8(vl, _mm_shuffle_epi8(lo[3], sub), m3);
      vh = _mm_blendv_epi8(vh, _mm_shuffle_epi8(hi[3], sub), m3);
      a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_unpacklo_epi8(vl, vh)), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_unpackhi_epi8(vl, vh)), _mm256_loadu_ps(x + k + 8), a1);
    }
    float s = hsum(_mm256_add_ps(a0, a1));
    const float* table = w.lut + (r / w.rows_per_group) * w.entries;
    for (; k < cols; ++k) s += table[row[k]] * x[k];
    y[r] = s;
  }
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
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

void rows_times_x_neon(const float* wr, int nr, int64_t cols, const float* x, int64_t n, float* y,
                       int64_t ldy) {
  if (n == 1) {
    for (int i = 0; i < nr; ++i) {
      float32x4_t acc = vdupq_n_f32(0.f);
      int64_t k = 0;
      for (; k + 4 <= cols; k += 4) acc = vfmaq_f32(acc, vld1q_f32(wr + i * cols + k), vld1q_f32(x + k));
      float s = vaddvq_f32(acc);
      for (; k < cols; ++k) s += wr[i * cols + k] * x[k];
      y[i * ldy] = s;
    }
    return;
  }
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    for (int i = 0; i < nr; ++i) {
      float32x4_t acc = vdupq_n_f32(0.f);
      for (int64_t k = 0; k < cols; ++k) acc = vfmaq_n_f32(acc, vld1q_f32(x + k * n + j), wr[i * cols + k]);
      vst1q_f32(y + i * ldy + j, acc);
    }
  }
  for (; j < n; ++j) {
    for (int i = 0; i < nr; ++i) {
      float s = 0.f;
      for (int64_t k = 0; k < cols; ++k) s += wr[i * cols + k] * x[k * n + j];
      y[i * ldy + j] = s;
    }
  }
}
#endif

struct Dispatch {
  void (*matvec_f16)(const Weight&, const float*, float*);   // optional fused n == 1 paths
  void (*matvec_lut4)(const Weight&, const float*, float*);
  void (*matvec_lut6)(const Weight&, const float*, float*);
  void (*decode_f16)(const uint16_t*, int64_t, float*);
  void (*decode_lut)(const Weight&, int64_t, float*);
  void (*rows_times_x)(const float*, int, int64_t, const float*, int64_t, float*, int64_t);
  const char* name;
};

Dispatch pick() {
  // ANEMLL_FAST_KERNELS=portable forces the scalar path (to test it on a vector-capable CPU).
  const char* force = std::getenv("ANEMLL_FAST_KERNELS");
  if (force != nullptr && std::strcmp(force, "portable") == 0) {
    return {nullptr, nullptr, nullptr, decode_f16_portable, decode_lut_portable, rows_times_x_portable, "portable"};
  }
#if AF_X86
  if (cpu_has_avx2()) {
    return {matvec_f16_avx2, matvec_lut4_avx2, matvec_lut6_avx2, decode_f16_avx2, decode_lut_avx2, rows_times_x_avx2,
            "avx2+fma+f16c"};
  }
#elif AF_NEON
  return {nullptr, nullptr, nullptr, decode_f16_neon, decode_lut_portable, rows_times_x_neon, "neon"};
#endif
  return {nullptr, nullptr, nullptr, decode_f16_portable, decode_lut_portable, rows_times_x_portable, "portable"};
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

void decode_block(const Dispatch& d, const Weight& w, int64_t r0, int nr, float* out) {
  for (int i = 0; i < nr; ++i) {
    if (w.f16 != nullptr) {
      d.decode_f16(w.f16 + (r0 + i) * w.cols, w.cols, out + i * w.cols);
    } else {
      d.decode_lut(w, r0 + i, out + i * w.cols);
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
    if (w.idx != nullptr && w.nbits <= 4 && w.lut16_bytes != nullptr && d.matvec_lut4 != nullptr) {
      d.matvec_lut4(w, x, y);
      return 0;
    }
    if (w.idx != nullptr && w.nbits > 4 && w.nbits <= 6 && w.lut16_bytes != nullptr && d.matvec_lut6 != nullptr) {
      d.matvec_lut6(w, x, y);
      return 0;
    }
  }
  // One block of decoded rows, reused for the whole call (a few KB: stays in L1).
  std::vector<float> block(static_cast<size_t>(kRows * w.cols));
  for (int64_t r = 0; r < w.rows; r += kRows) {
    const int nr = static_cast<int>(w.rows - r < kRows ? w.rows - r : kRows);
    decode_block(d, w, r, nr, block.data());
    d.rows_times_x(block.data(), nr, w.cols, x, n, y + r * n, n);
    if (bias != nullptr) {
      for (int i = 0; i < nr; ++i) {
        for (int64_t j = 0; j < n; ++j) y[(r + i) * n + j] += bias[r + i];
      }
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

const char* isa() { return dispatch().name; }

}  // namespace kernels
}  // namespace anemll
