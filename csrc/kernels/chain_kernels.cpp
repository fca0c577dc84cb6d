// See chain_kernels.h. The vector paths only change how many values one instruction handles:
// every value goes through the same float32 operations in the same order as on the portable path,
// and fp16 rounding is IEEE round-to-nearest-even everywhere (F16C / NEON conversions, or
// float_to_half), so all paths give identical bits.
#include "kernels/chain_kernels.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "engine/fp16.h"
#include "kernels/matmul_kernels.h"  // round_f16: one fp16 rounder for every kernel

// The chains these kernels replace round every product before it is added: a compiler must not
// contract a*b + c into one fused multiply-add (GCC does by default wherever FMA is available).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "kernels/cpu_isa.h"

namespace anemll {
namespace kernels {
namespace {

inline float r16(float v) { return half_to_float(float_to_half(v)); }

// ---------------------------------------------------------------- portable
float dot_portable(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy_portable(float a, const float* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}


// Rotary outputs [from, h) of each half of one row of d = 2h values, in scalar code: the portable
// path's whole row and the vector paths' tails.
template <bool Round>
void rotary_tail(const float* x, const float* c, const float* s, int64_t h, int64_t from, float* out) {
  for (int64_t j = from; j < h; ++j) {
    float a = x[j] * c[j], b = (-x[j + h]) * s[j];
    if (Round) a = r16(a), b = r16(b);
    out[j] = Round ? r16(a + b) : a + b;
    a = x[j + h] * c[j + h];
    b = x[j] * s[j + h];
    if (Round) a = r16(a), b = r16(b);
    out[j + h] = Round ? r16(a + b) : a + b;
  }
}

template <bool Round>
void rotary_row_portable(const float* x, const float* c, const float* s, int64_t h, float* out) {
  rotary_tail<Round>(x, c, s, h, 0, out);
}

#if AF_X86
// ---------------------------------------------------------------- AVX2 + F16C
AF_AVX2 inline __m256 r16_avx(__m256 v) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}


template <bool Round>
AF_AVX2 void rotary_row_avx2(const float* x, const float* c, const float* s, int64_t h, float* out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t j = 0;
  for (; j + 8 <= h; j += 8) {
    const __m256 lo = _mm256_loadu_ps(x + j), hi = _mm256_loadu_ps(x + j + h);
    // no FMA: the chain rounds each product before the add
    __m256 a = _mm256_mul_ps(lo, _mm256_loadu_ps(c + j));
    __m256 b = _mm256_mul_ps(_mm256_xor_ps(hi, sign), _mm256_loadu_ps(s + j));
    if (Round) a = r16_avx(a), b = r16_avx(b);
    __m256 y = _mm256_add_ps(a, b);
    _mm256_storeu_ps(out + j, Round ? r16_avx(y) : y);
    a = _mm256_mul_ps(hi, _mm256_loadu_ps(c + j + h));
    b = _mm256_mul_ps(lo, _mm256_loadu_ps(s + j + h));
    if (Round) a = r16_avx(a), b = r16_avx(b);
    y = _mm256_add_ps(a, b);
    _mm256_storeu_ps(out + j + h, Round ? r16_avx(y) : y);
  }
  rotary_tail<Round>(x, c, s, h, j, out);  // the tail of each half
}

AF_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float s = _mm_cvtss_f32(h);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

AF_AVX2 void axpy_avx2(float a, const float* x, int64_t n, float* y) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

#endif

#if AF_NEON
// ---------------------------------------------------------------- NEON
inline float32x4_t r16_neon(float32x4_t v) { return vcvt_f32_f16(vcvt_f16_f32(v)); }


float dot_neon(const float* a, const float* b, int64_t n) {
  float32x4_t acc = vdupq_n_f32(0.f);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) acc = vfmaq_f32(acc, vld1q_f32(a + i), vld1q_f32(b + i));
  float s = vaddvq_f32(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy_neon(float a, const float* x, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
  for (; i < n; ++i) y[i] += a * x[i];
}

template <bool Round>
void rotary_row_neon(const float* x, const float* c, const float* s, int64_t h, float* out) {
  int64_t j = 0;
  for (; j + 4 <= h; j += 4) {
    const float32x4_t lo = vld1q_f32(x + j), hi = vld1q_f32(x + j + h);
    float32x4_t a = vmulq_f32(lo, vld1q_f32(c + j));
    float32x4_t b = vmulq_f32(vnegq_f32(hi), vld1q_f32(s + j));
    if (Round) a = r16_neon(a), b = r16_neon(b);
    float32x4_t y = vaddq_f32(a, b);
    vst1q_f32(out + j, Round ? r16_neon(y) : y);
    a = vmulq_f32(hi, vld1q_f32(c + j + h));
    b = vmulq_f32(lo, vld1q_f32(s + j + h));
    if (Round) a = r16_neon(a), b = r16_neon(b);
    y = vaddq_f32(a, b);
    vst1q_f32(out + j + h, Round ? r16_neon(y) : y);
  }
  rotary_tail<Round>(x, c, s, h, j, out);
}
#endif

using RotaryRowFn = void (*)(const float*, const float*, const float*, int64_t, float*);
using DotFn = float (*)(const float*, const float*, int64_t);
using AxpyFn = void (*)(float, const float*, int64_t, float*);

struct Dispatch {
  RotaryRowFn rotary_row[2];  // [round16]
  DotFn dot;
  AxpyFn axpy;
  const char* name;
};

Dispatch pick() {
  const char* force = std::getenv("ANEMLL_FAST_KERNELS");
  const Dispatch portable = {{rotary_row_portable<false>, rotary_row_portable<true>},
                             dot_portable, axpy_portable, "portable"};
  if (force != nullptr && std::strcmp(force, "portable") == 0) return portable;
#if AF_X86
  if (cpu_has_avx2())
    return {{rotary_row_avx2<false>, rotary_row_avx2<true>}, dot_avx2, axpy_avx2, "avx2+fma+f16c"};
#elif AF_NEON
  return {{rotary_row_neon<false>, rotary_row_neon<true>}, dot_neon, axpy_neon, "neon"};
#endif
  return portable;
}

const Dispatch& dispatch() {
  static const Dispatch d = pick();
  return d;
}

// numpy's pairwise summation of float32 (its add.reduce over a contiguous axis): blocks of at most
// 128 values summed with eight interleaved accumulators, longer runs split in two at a multiple of 8.
// Kept to the letter so that the fused norm equals numpy's mean bit for bit.
float pairwise_sum(const float* a, int64_t n) {
  if (n < 8) {
    float res = 0.f;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    float r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

}  // namespace


int mirror_norm(const float* x, int64_t rows, int64_t h, const float* gamma, const float* beta, float eps,
                bool round16, float* out) {
  if (rows < 0 || h <= 0 || x == nullptr || out == nullptr) return -1;
  const int64_t n = 2 * h;
  std::vector<float> buf(static_cast<size_t>(n));
  const float count = static_cast<float>(n);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * h;
    float* orow = out + r * h;
    for (int64_t i = 0; i < h; ++i) {
      buf[i] = xr[i];
      buf[h + i] = -xr[i];
    }
    const float mean = pairwise_sum(buf.data(), n) / count;
    for (int64_t i = 0; i < n; ++i) {
      const float d = buf[i] - mean;
      buf[i] = d * d;
    }
    const float var = pairwise_sum(buf.data(), n) / count;
    const float denom = std::sqrt(var + eps);
    for (int64_t i = 0; i < h; ++i) {
      float y = (xr[i] - mean) / denom;
      if (gamma != nullptr) y = y * gamma[i];
      if (beta != nullptr) y = y + beta[i];
      orow[i] = y;
    }
  }
  if (round16) round_f16(out, rows * h, out);
  return 0;
}

int rotary(const float* x, int64_t groups, int64_t t, int64_t d, const float* cos, const float* sin,
           bool round16, float* out) {
  if (groups < 0 || t < 0 || d <= 0 || d % 2 || x == nullptr || cos == nullptr || sin == nullptr ||
      out == nullptr)
    return -1;
  const RotaryRowFn row = dispatch().rotary_row[round16 ? 1 : 0];
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < t; ++i) {
      const int64_t off = (g * t + i) * d;
      row(x + off, cos + i * d, sin + i * d, d / 2, out + off);
    }
  return 0;
}

int attention(const float* q, int64_t groups, int64_t rows, int64_t d, const float* k, const float* v,
              int64_t kv_group_stride, int64_t n_keys, const float* mask, int64_t mask_rows, int64_t mask_stride,
              bool round16, float* out) {
  if (groups < 0 || rows < 0 || d <= 0 || n_keys <= 0 || mask_rows <= 0 || mask_stride < n_keys || q == nullptr ||
      k == nullptr || v == nullptr || mask == nullptr || out == nullptr)
    return -1;
  const Dispatch& dp = dispatch();
  std::vector<float> s(static_cast<size_t>(n_keys)), e(static_cast<size_t>(n_keys));
  for (int64_t g = 0; g < groups; ++g) {
    const float* kg = k + g * kv_group_stride;
    const float* vg = v + g * kv_group_stride;
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + (g * rows + r) * d;
      const float* mr = mask + (r % mask_rows) * mask_stride;
      for (int64_t j = 0; j < n_keys; ++j) s[j] = dp.dot(qr, kg + j * d, d);
      if (round16) round_f16(s.data(), n_keys, s.data());
      for (int64_t j = 0; j < n_keys; ++j) s[j] = s[j] + mr[j];
      if (round16) round_f16(s.data(), n_keys, s.data());
      // softmax as the op computes it: shift by a finite max, exp, divide by the (pairwise) sum
      float m = s[0];
      for (int64_t j = 1; j < n_keys; ++j) m = s[j] > m ? s[j] : m;
      if (!std::isfinite(m)) m = 0.f;
      for (int64_t j = 0; j < n_keys; ++j) e[j] = std::exp(s[j] - m);
      const float total = pairwise_sum(e.data(), n_keys);
      for (int64_t j = 0; j < n_keys; ++j) s[j] = e[j] / total;
      if (round16) round_f16(s.data(), n_keys, s.data());
      float* o = out + (g * rows + r) * d;
      for (int64_t c = 0; c < d; ++c) o[c] = 0.f;
      for (int64_t j = 0; j < n_keys; ++j) dp.axpy(s[j], vg + j * d, d, o);
      if (round16) round_f16(o, d, o);
    }
  }
  return 0;
}

int64_t open_columns(const float* mask, int64_t rows, int64_t cols) {
  const float ninf = -INFINITY;
  for (int64_t c = cols - 1; c >= 0; --c)
    for (int64_t r = 0; r < rows; ++r)
      if (!(mask[r * cols + c] == ninf)) return c + 1;  // NaN counts as open, as numpy's isneginf says
  return 0;
}

const char* chain_isa() { return dispatch().name; }

}  // namespace kernels
}  // namespace anemll
