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


// One row of the attention chain after the scores, in place over n values: s = r(s); s = r(s + mask);
// p = r(softmax(s)), the softmax as the op computes it (shift by a finite max, exp, divide by the pairwise
// sum). Returns one past the last non-zero probability.
int64_t softmax_row_portable(float* s, const float* mask, int64_t n, bool round16) {
  if (round16) round_f16(s, n, s);
  for (int64_t j = 0; j < n; ++j) s[j] = s[j] + mask[j];
  if (round16) round_f16(s, n, s);
  float m = s[0];
  for (int64_t j = 1; j < n; ++j) m = s[j] > m ? s[j] : m;
  if (!std::isfinite(m)) m = 0.f;
  for (int64_t j = 0; j < n; ++j) s[j] = std::exp(s[j] - m);
  const float total = pairwise_sum(s, n);
  for (int64_t j = 0; j < n; ++j) s[j] = s[j] / total;
  if (round16) round_f16(s, n, s);
  int64_t last = n;
  while (last > 0 && s[last - 1] == 0.f) --last;
  return last;
}

template <bool Round>
void silu_gate_portable(const float* a, const float* t, const float* b, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    float u = a[i] * (0.5f * (1.0f + t[i]));
    if (Round) u = r16(u);
    u = u * b[i];
    out[i] = Round ? r16(u) : u;
  }
}

// One row of ANEMLL's RMSNorm (see mirror_norm), buf holding 2h floats of scratch.
void mirror_row_portable(const float* xr, int64_t h, const float* gamma, const float* beta, float eps, float* buf,
                         float* orow) {
  const int64_t n = 2 * h;
  const float count = static_cast<float>(n);
  for (int64_t i = 0; i < h; ++i) {
    buf[i] = xr[i];
    buf[h + i] = -xr[i];
  }
  const float mean = pairwise_sum(buf, n) / count;
  for (int64_t i = 0; i < n; ++i) {
    const float d = buf[i] - mean;
    buf[i] = d * d;
  }
  const float var = pairwise_sum(buf, n) / count;
  const float denom = std::sqrt(var + eps);
  for (int64_t i = 0; i < h; ++i) {
    float y = (xr[i] - mean) / denom;
    if (gamma != nullptr) y = y * gamma[i];
    if (beta != nullptr) y = y + beta[i];
    orow[i] = y;
  }
}

// open_columns row by row: each row is read from its end down to the best column found so far.
int64_t open_columns_portable(const float* mask, int64_t rows, int64_t cols) {
  int64_t best = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* mr = mask + r * cols;
    for (int64_t c = cols; c > best; --c)
      if (!(mr[c - 1] == -INFINITY)) {  // NaN counts as open, as numpy's isneginf says
        best = c;
        break;
      }
  }
  return best;
}

// One [rows, cols] block of x + y^T (y stored [cols, rows]), unrounded.
void add_t_portable(const float* x, const float* y, int64_t rows, int64_t cols, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = x[r * cols + c] + y[c * rows + r];
}

void mirror_rows_portable(const float* x, int64_t rows, int64_t h, const float* gamma, const float* beta, float eps,
                          float* buf, float* out) {
  for (int64_t r = 0; r < rows; ++r) mirror_row_portable(x + r * h, h, gamma, beta, eps, buf, out + r * h);
}

// Rows [i0, i0 + nr) of the transpose of a [d, t] block (nr <= 8), as nr rows of d values.
void gather_rows_portable(const float* xt, int64_t t, int64_t d, int64_t i0, int64_t nr, float* rows) {
  for (int64_t k = 0; k < nr; ++k)
    for (int64_t j = 0; j < d; ++j) rows[k * d + j] = xt[j * t + i0 + k];
}

bool all_finite_portable(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

// ---------------------------------------------------------------- portable
float dot_portable(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The attention kernel's two products, C[r, 0:n] = sum_{k < K_r} A[r, k] B[k, 0:n] for r < rows, with
// B row-major: the scores (A = q, B = k transposed) and the mixing (A = probabilities, B = v). K_r is
// klen[r] when klen is given (a row's probabilities are exact zeros past it), else k_all. The vector
// paths compute rows in blocks of four over the block's longest K_r (the extra terms are 0 * v = 0).
void gemm_portable(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                   int64_t n_all, const int64_t* nlen, const int64_t* klen, int64_t k_all) {
  for (int64_t r = 0; r < rows; ++r) {
    float* cr = c + r * ldc;
    const int64_t n = nlen != nullptr ? nlen[r] : n_all;
    for (int64_t j = 0; j < n; ++j) cr[j] = 0.f;
    const int64_t kk = klen != nullptr ? klen[r] : k_all;
    for (int64_t k = 0; k < kk; ++k) {
      const float av = a[r * lda + k];
      const float* bk = b + k * ldb;
      for (int64_t j = 0; j < n; ++j) cr[j] += av * bk[j];
    }
  }
}

inline int64_t block_k(const int64_t* klen, int64_t r, int nr, int64_t k_all) {
  if (klen == nullptr) return k_all;
  int64_t kk = 0;
  for (int i = 0; i < nr; ++i) kk = klen[r + i] > kk ? klen[r + i] : kk;
  return kk;
}

inline int64_t block_n(const int64_t* nlen, int64_t r, int nr, int64_t n_all, int64_t vec) {
  const int64_t nn = block_k(nlen, r, nr, n_all);
  const int64_t up = (nn + vec - 1) / vec * vec;
  return up < n_all ? up : n_all;
}

// Columns [j0, n) of NR rows of C = A B over kk terms, in scalar code (the vector paths' tails).
template <int NR>
void gemm_cols_scalar(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t j0,
                      int64_t n, int64_t kk) {
  for (int64_t j = j0; j < n; ++j)
    for (int i = 0; i < NR; ++i) {
      float acc = 0.f;
      for (int64_t k = 0; k < kk; ++k) acc += a[i * lda + k] * b[k * ldb + j];
      c[i * ldc + j] = acc;
    }
}

// NR rows of C over n columns and kk terms: a vector path's block kernel.
using GemmRowsFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t);

// A vector path's whole product: rows four at a time through Rows4 (each block over its longest
// extents, columns rounded up to whole 8-float vectors), the remaining rows one by one through Rows1.
template <GemmRowsFn Rows4, GemmRowsFn Rows1>
void gemm_blocks(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                 int64_t n_all, const int64_t* nlen, const int64_t* klen, int64_t k_all) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    Rows4(a + r * lda, lda, b, ldb, c + r * ldc, ldc, block_n(nlen, r, 4, n_all, 8), block_k(klen, r, 4, k_all));
  for (; r < rows; ++r)
    Rows1(a + r * lda, lda, b, ldb, c + r * ldc, ldc, block_n(nlen, r, 1, n_all, 8), block_k(klen, r, 1, k_all));
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

// NR rows of C = A B over kk terms: 16 columns at a time in 2 * NR accumulators, then 8, then scalars.
template <int NR>
AF_AVX2 void gemm_rows_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                            int64_t n, int64_t kk) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m256 acc0[NR], acc1[NR];
    for (int i = 0; i < NR; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kk; ++k) {
      const __m256 b0 = _mm256_loadu_ps(b + k * ldb + j), b1 = _mm256_loadu_ps(b + k * ldb + j + 8);
      for (int i = 0; i < NR; ++i) {
        const __m256 av = _mm256_broadcast_ss(a + i * lda + k);
        acc0[i] = _mm256_fmadd_ps(av, b0, acc0[i]);
        acc1[i] = _mm256_fmadd_ps(av, b1, acc1[i]);
      }
    }
    for (int i = 0; i < NR; ++i) {
      _mm256_storeu_ps(c + i * ldc + j, acc0[i]);
      _mm256_storeu_ps(c + i * ldc + j + 8, acc1[i]);
    }
  }
  for (; j + 8 <= n; j += 8) {
    __m256 acc[NR];
    for (int i = 0; i < NR; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kk; ++k) {
      const __m256 b0 = _mm256_loadu_ps(b + k * ldb + j);
      for (int i = 0; i < NR; ++i) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(a + i * lda + k), b0, acc[i]);
    }
    for (int i = 0; i < NR; ++i) _mm256_storeu_ps(c + i * ldc + j, acc[i]);
  }
  gemm_cols_scalar<NR>(a, lda, b, ldb, c, ldc, j, n, kk);
}


// exp of 8 floats to within ~1 ulp of float32 (Cephes' expf reduction and polynomial); lanes out of the
// polynomial's range (overflow, NaN, results near or below the smallest normal) go through std::exp,
// lanes below -105 (exp rounds to 0 there, -inf included) give 0.
AF_AVX2 inline __attribute__((always_inline)) __m256 exp_avx2(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.0f);  // exp(-87) is still a normal float (a subnormal product would trap to microcode)
  const __m256 zero_below = _mm256_set1_ps(-105.0f);
  const __m256 special = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(x, hi, _CMP_GT_OQ), _mm256_cmp_ps(x, x, _CMP_UNORD_Q)),
                                      _mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ),
                                                    _mm256_cmp_ps(x, zero_below, _CMP_GE_OQ)));
  const __m256 xc = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  y = _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);  // -inf (and the special lanes, redone below)
  if (_mm256_movemask_ps(special)) {
    alignas(32) float xs[8], ys[8];
    _mm256_store_ps(xs, x);
    _mm256_store_ps(ys, y);
    const int m = _mm256_movemask_ps(special);
    for (int i = 0; i < 8; ++i)
      if (m & (1 << i)) ys[i] = std::exp(xs[i]);
    y = _mm256_load_ps(ys);
  }
  return y;
}

AF_AVX2 float hmax_avx2(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// pairwise_sum with the eight accumulators in one register: the same additions in the same order.
AF_AVX2 float pairwise_sum_avx2(const float* a, int64_t n) {
  if (n < 8) return pairwise_sum(a, n);
  if (n <= 128) {
    __m256 r = _mm256_loadu_ps(a);
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8) r = _mm256_add_ps(r, _mm256_loadu_ps(a + i));
    alignas(32) float t[8];
    _mm256_store_ps(t, r);
    float res = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum_avx2(a, n2) + pairwise_sum_avx2(a + n2, n - n2);
}

AF_AVX2 int64_t softmax_row_avx2(float* s, const float* mask, int64_t n, bool round16) {
  __m256 mx = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_loadu_ps(s + j);
    if (round16) v = r16_avx(v);
    v = _mm256_add_ps(v, _mm256_loadu_ps(mask + j));
    if (round16) v = r16_avx(v);
    _mm256_storeu_ps(s + j, v);
    mx = _mm256_max_ps(mx, v);
  }
  float m = hmax_avx2(mx);
  for (; j < n; ++j) {
    float v = round16 ? r16(s[j]) : s[j];
    v = v + mask[j];
    s[j] = round16 ? r16(v) : v;
    m = s[j] > m ? s[j] : m;
  }
  if (!std::isfinite(m)) m = 0.f;
  const __m256 vm = _mm256_set1_ps(m);
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(s + j), vm);
    // eight masked-out scores (a causal mask's) are eight zeros
    const bool all_out = _mm256_movemask_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ)) == 0xFF;
    _mm256_storeu_ps(s + j, all_out ? _mm256_setzero_ps() : exp_avx2(x));
  }
  if (j < n) {  // the tail through the same vector exp
    alignas(32) float t[8];
    for (int i = 0; i < 8; ++i) t[i] = j + i < n ? s[j + i] - m : 0.f;
    _mm256_store_ps(t, exp_avx2(_mm256_load_ps(t)));
    for (int64_t i = 0; j + i < n; ++i) s[j + i] = t[i];
  }
  const float total = pairwise_sum_avx2(s, n);
  const __m256 vt = _mm256_set1_ps(total);
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 p = _mm256_div_ps(_mm256_loadu_ps(s + j), vt);
    _mm256_storeu_ps(s + j, round16 ? r16_avx(p) : p);
  }
  for (; j < n; ++j) s[j] = round16 ? r16(s[j] / total) : s[j] / total;
  int64_t last = n;
  while (last > 0 && last % 8 && s[last - 1] == 0.f) --last;
  while (last >= 8) {  // whole vectors of zeros, then the last non-zero lane of the first that is not
    const int nz = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + last - 8), _mm256_setzero_ps(), _CMP_NEQ_UQ));
    if (nz) return last - 8 + (32 - __builtin_clz(static_cast<unsigned>(nz)));
    last -= 8;
  }
  while (last > 0 && s[last - 1] == 0.f) --last;
  return last;
}

template <bool Round>
AF_AVX2 void silu_gate_avx2(const float* a, const float* t, const float* b, int64_t n, float* out) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 u = _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_mul_ps(half, _mm256_add_ps(one, _mm256_loadu_ps(t + i))));
    if (Round) u = r16_avx(u);
    u = _mm256_mul_ps(u, _mm256_loadu_ps(b + i));
    _mm256_storeu_ps(out + i, Round ? r16_avx(u) : u);
  }
  silu_gate_portable<Round>(a + i, t + i, b + i, n - i, out + i);
}

// pairwise_sum_avx2 of four arrays at once: each array's additions in its own (the same) order, the four
// dependency chains in flight together (one sum alone waits on its adds' latency).
AF_AVX2 void pairwise_sum4_avx2(const float* const* a, int64_t n, float* out) {
  if (n < 8) {
    for (int k = 0; k < 4; ++k) out[k] = pairwise_sum(a[k], n);
    return;
  }
  if (n <= 128) {
    __m256 r[4];
    for (int k = 0; k < 4; ++k) r[k] = _mm256_loadu_ps(a[k]);
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int k = 0; k < 4; ++k) r[k] = _mm256_add_ps(r[k], _mm256_loadu_ps(a[k] + i));
    for (int k = 0; k < 4; ++k) {
      alignas(32) float t[8];
      _mm256_store_ps(t, r[k]);
      float res = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
      for (int64_t j = i; j < n; ++j) res += a[k][j];
      out[k] = res;
    }
    return;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  float lo[4], hi[4];
  pairwise_sum4_avx2(a, n2, lo);
  const float* b[4] = {a[0] + n2, a[1] + n2, a[2] + n2, a[3] + n2};
  pairwise_sum4_avx2(b, n - n2, hi);
  for (int k = 0; k < 4; ++k) out[k] = lo[k] + hi[k];
}

// mirror_row_portable eight values at a time and four rows at a time: the same operations on every
// value, the sums in the same (pairwise) order. buf holds 4 * 2h floats.
AF_AVX2 void mirror_rows_avx2(const float* x, int64_t rows, int64_t h, const float* gamma, const float* beta,
                              float eps, float* buf, float* out) {
  const int64_t n = 2 * h;
  const float count = static_cast<float>(n);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  // When the pairwise sum of the 2h values splits them exactly at h (2h > 128 and h a multiple of 8),
  // its two halves are sum(x) and sum(-x) = -sum(x), bit for bit (rounding is symmetric): the mean is
  // exactly +0 when sum(x) is finite, the deviations are x and -x themselves, and the sum of their
  // squares is sum(x^2) doubled (exact). So only sum(x^2) over h values is needed; when it is not
  // finite (an inf or NaN, or an overflow), the row takes the general path below.
  const bool halves = n > 128 && h % 8 == 0;
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const int nr = rows - r0 < 4 ? static_cast<int>(rows - r0) : 4;
    const float* b[4];
    float mean[4], var[4];
    if (halves) {
      for (int k = 0; k < nr; ++k) {
        const float* xr = x + (r0 + k) * h;
        float* bk = buf + k * n;
        b[k] = bk;
        for (int64_t i = 0; i < h; i += 8) {
          const __m256 v = _mm256_loadu_ps(xr + i);
          _mm256_storeu_ps(bk + i, _mm256_mul_ps(v, v));
        }
      }
      if (nr == 4) {
        pairwise_sum4_avx2(b, h, var);
      } else {
        for (int k = 0; k < nr; ++k) var[k] = pairwise_sum_avx2(b[k], h);
      }
      bool finite = true;
      for (int k = 0; k < nr; ++k) finite = finite && std::isfinite(var[k]);
      if (finite) {
        for (int k = 0; k < nr; ++k) {
          const float* xr = x + (r0 + k) * h;
          float* orow = out + (r0 + k) * h;
          const float denom = std::sqrt((var[k] + var[k]) / count + eps);
          const __m256 vden = _mm256_set1_ps(denom);
          for (int64_t i = 0; i < h; i += 8) {
            __m256 y = _mm256_div_ps(_mm256_loadu_ps(xr + i), vden);  // x - (+0) is x
            if (gamma != nullptr) y = _mm256_mul_ps(y, _mm256_loadu_ps(gamma + i));
            if (beta != nullptr) y = _mm256_add_ps(y, _mm256_loadu_ps(beta + i));
            _mm256_storeu_ps(orow + i, y);
          }
        }
        continue;
      }
    }
    for (int k = 0; k < nr; ++k) {
      const float* xr = x + (r0 + k) * h;
      float* bk = buf + k * n;
      b[k] = bk;
      int64_t i = 0;
      for (; i + 8 <= h; i += 8) {
        const __m256 v = _mm256_loadu_ps(xr + i);
        _mm256_storeu_ps(bk + i, v);
        _mm256_storeu_ps(bk + h + i, _mm256_xor_ps(v, sign));
      }
      for (; i < h; ++i) {
        bk[i] = xr[i];
        bk[h + i] = -xr[i];
      }
    }
    if (nr == 4) {
      pairwise_sum4_avx2(b, n, mean);
    } else {
      for (int k = 0; k < nr; ++k) mean[k] = pairwise_sum_avx2(b[k], n);
    }
    for (int k = 0; k < nr; ++k) {
      mean[k] = mean[k] / count;
      float* bk = buf + k * n;
      const __m256 vmean = _mm256_set1_ps(mean[k]);
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(bk + i), vmean);
        _mm256_storeu_ps(bk + i, _mm256_mul_ps(d, d));
      }
      for (; i < n; ++i) {
        const float d = bk[i] - mean[k];
        bk[i] = d * d;
      }
    }
    if (nr == 4) {
      pairwise_sum4_avx2(b, n, var);
    } else {
      for (int k = 0; k < nr; ++k) var[k] = pairwise_sum_avx2(b[k], n);
    }
    for (int k = 0; k < nr; ++k) {
      const float* xr = x + (r0 + k) * h;
      float* orow = out + (r0 + k) * h;
      const float m = mean[k], denom = std::sqrt(var[k] / count + eps);
      const __m256 vmean = _mm256_set1_ps(m), vden = _mm256_set1_ps(denom);
      int64_t i = 0;
      for (; i + 8 <= h; i += 8) {
        __m256 y = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), vmean), vden);
        if (gamma != nullptr) y = _mm256_mul_ps(y, _mm256_loadu_ps(gamma + i));
        if (beta != nullptr) y = _mm256_add_ps(y, _mm256_loadu_ps(beta + i));
        _mm256_storeu_ps(orow + i, y);
      }
      for (; i < h; ++i) {
        float y = (xr[i] - m) / denom;
        if (gamma != nullptr) y = y * gamma[i];
        if (beta != nullptr) y = y + beta[i];
        orow[i] = y;
      }
    }
  }
}

AF_AVX2 int64_t open_columns_avx2(const float* mask, int64_t rows, int64_t cols) {
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  int64_t best = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* mr = mask + r * cols;
    int64_t c = cols;
    for (; c - 8 >= best; c -= 8) {
      const int open = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(mr + c - 8), ninf, _CMP_NEQ_UQ));
      if (open) {
        best = c - 8 + (32 - __builtin_clz(static_cast<unsigned>(open)));
        break;
      }
    }
    if (c - 8 >= best) continue;  // found in a whole vector
    for (; c > best; --c)
      if (!(mr[c - 1] == -INFINITY)) {
        best = c;
        break;
      }
  }
  return best;
}

// Eight rows of eight floats transposed in registers.
AF_AVX2 inline __attribute__((always_inline)) void transpose8_avx2(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

AF_AVX2 void add_t_avx2(const float* x, const float* y, int64_t rows, int64_t cols, float* out) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      __m256 b[8];
      for (int i = 0; i < 8; ++i) b[i] = _mm256_loadu_ps(y + (c + i) * rows + r);  // y^T rows c.., columns r..
      transpose8_avx2(b);
      for (int i = 0; i < 8; ++i)
        _mm256_storeu_ps(out + (r + i) * cols + c, _mm256_add_ps(_mm256_loadu_ps(x + (r + i) * cols + c), b[i]));
    }
    for (int64_t i = r; i < r + 8; ++i)
      for (int64_t cc = c; cc < cols; ++cc) out[i * cols + cc] = x[i * cols + cc] + y[cc * rows + i];
  }
  for (; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = x[r * cols + c] + y[c * rows + r];
}

AF_AVX2 void gather_rows_avx2(const float* xt, int64_t t, int64_t d, int64_t i0, int64_t nr, float* rows) {
  if (nr < 8) return gather_rows_portable(xt, t, d, i0, nr, rows);
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    __m256 b[8];
    for (int m = 0; m < 8; ++m) b[m] = _mm256_loadu_ps(xt + (j + m) * t + i0);  // t-values of column j + m
    transpose8_avx2(b);
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(rows + k * d + j, b[k]);
  }
  for (; j < d; ++j)
    for (int k = 0; k < 8; ++k) rows[k * d + j] = xt[j * t + i0 + k];
}

AF_AVX2 bool all_finite_avx2(const float* x, int64_t n) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)  // x * 0 is 0 exactly when x is finite (NaN for inf and NaN)
    ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), zero), zero, _CMP_EQ_OQ));
  if (_mm256_movemask_ps(ok) != 0xFF) return false;
  return all_finite_portable(x + i, n - i);
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

template <int NR>
void gemm_rows_neon(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t n,
                    int64_t kk) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    float32x4_t acc0[NR], acc1[NR];
    for (int i = 0; i < NR; ++i) acc0[i] = acc1[i] = vdupq_n_f32(0.f);
    for (int64_t k = 0; k < kk; ++k) {
      const float32x4_t b0 = vld1q_f32(b + k * ldb + j), b1 = vld1q_f32(b + k * ldb + j + 4);
      for (int i = 0; i < NR; ++i) {
        const float av = a[i * lda + k];
        acc0[i] = vfmaq_n_f32(acc0[i], b0, av);
        acc1[i] = vfmaq_n_f32(acc1[i], b1, av);
      }
    }
    for (int i = 0; i < NR; ++i) {
      vst1q_f32(c + i * ldc + j, acc0[i]);
      vst1q_f32(c + i * ldc + j + 4, acc1[i]);
    }
  }
  gemm_cols_scalar<NR>(a, lda, b, ldb, c, ldc, j, n, kk);
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
using GemmFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t,
                        const int64_t*, const int64_t*, int64_t);
using SoftmaxRowFn = int64_t (*)(float*, const float*, int64_t, bool);
using SumFn = float (*)(const float*, int64_t);
using GatherRowsFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, float*);
using AddTFn = void (*)(const float*, const float*, int64_t, int64_t, float*);
using OpenColumnsFn = int64_t (*)(const float*, int64_t, int64_t);
using MirrorRowsFn = void (*)(const float*, int64_t, int64_t, const float*, const float*, float, float*, float*);
using SiluGateFn = void (*)(const float*, const float*, const float*, int64_t, float*);
using FiniteFn = bool (*)(const float*, int64_t);

struct Dispatch {
  RotaryRowFn rotary_row[2];  // [round16]
  DotFn dot;
  GemmFn gemm;
  SoftmaxRowFn softmax_row;
  SumFn sum;          // numpy's pairwise summation
  FiniteFn all_finite;
  SiluGateFn silu_gate[2];  // [round16]
  MirrorRowsFn mirror_rows;
  OpenColumnsFn open_columns;
  AddTFn add_t;
  GatherRowsFn gather_rows;
  const char* name;
};

Dispatch pick() {
  const char* force = std::getenv("ANEMLL_FAST_KERNELS");
  const Dispatch portable = {{rotary_row_portable<false>, rotary_row_portable<true>},
                             dot_portable, gemm_portable, softmax_row_portable, pairwise_sum, all_finite_portable,
                             {silu_gate_portable<false>, silu_gate_portable<true>}, mirror_rows_portable, open_columns_portable,
                             add_t_portable, gather_rows_portable,
                             "portable"};
  if (force != nullptr && std::strcmp(force, "portable") == 0) return portable;
#if AF_X86
  if (cpu_has_avx2())
    return {{rotary_row_avx2<false>, rotary_row_avx2<true>}, dot_avx2, gemm_blocks<gemm_rows_avx2<4>, gemm_rows_avx2<1>>, softmax_row_avx2, pairwise_sum_avx2, all_finite_avx2,
            {silu_gate_avx2<false>, silu_gate_avx2<true>}, mirror_rows_avx2, open_columns_avx2, add_t_avx2,
            gather_rows_avx2, "avx2+fma+f16c"};
#elif AF_NEON
  return {{rotary_row_neon<false>, rotary_row_neon<true>}, dot_neon, gemm_blocks<gemm_rows_neon<4>, gemm_rows_neon<1>>, softmax_row_portable, pairwise_sum,
          all_finite_portable, {silu_gate_portable<false>, silu_gate_portable<true>}, mirror_rows_portable,
          open_columns_portable, add_t_portable,
          gather_rows_portable, "neon"};
#endif
  return portable;
}

const Dispatch& dispatch() {
  static const Dispatch d = pick();
  return d;
}

}  // namespace


int mirror_norm(const float* x, int64_t rows, int64_t h, const float* gamma, const float* beta, float eps,
                bool round16, float* out) {
  if (rows < 0 || h <= 0 || x == nullptr || out == nullptr) return -1;
  std::vector<float> buf(static_cast<size_t>(4 * 2 * h));
  dispatch().mirror_rows(x, rows, h, gamma, beta, eps, buf.data(), out);
  if (round16) round_f16(out, rows * h, out);
  return 0;
}

int rotary(const float* x, int64_t groups, int64_t t, int64_t d, const float* cos, const float* sin,
           bool round16, float* out, bool x_transposed) {
  if (groups < 0 || t < 0 || d <= 0 || d % 2 || x == nullptr || cos == nullptr || sin == nullptr ||
      out == nullptr)
    return -1;
  const Dispatch& dp = dispatch();
  const RotaryRowFn row = dp.rotary_row[round16 ? 1 : 0];
  if (!x_transposed) {
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t i = 0; i < t; ++i) {
        const int64_t off = (g * t + i) * d;
        row(x + off, cos + i * d, sin + i * d, d / 2, out + off);
      }
    return 0;
  }
  // x's blocks stored [d, t]: eight rows at a time gathered into rows of d values, then as above
  std::vector<float> rows8(static_cast<size_t>(8 * d));
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + g * t * d;
    for (int64_t i0 = 0; i0 < t; i0 += 8) {
      const int64_t nr = t - i0 < 8 ? t - i0 : 8;
      dp.gather_rows(xg, t, d, i0, nr, rows8.data());
      for (int64_t k = 0; k < nr; ++k) {
        const int64_t i = i0 + k;
        row(rows8.data() + k * d, cos + i * d, sin + i * d, d / 2, out + (g * t + i) * d);
      }
    }
  }
  return 0;
}

namespace {
// Largest squared Euclidean norm of `rows` rows of d values (inf or NaN when a value is).
float max_sq_norm(const float* x, int64_t rows, int64_t d, DotFn dot) {
  float m = 0.f;
  for (int64_t r = 0; r < rows; ++r) {
    const float n2 = dot(x + r * d, x + r * d, d);
    if (std::isnan(n2)) return n2;  // a NaN anywhere must fail the bound
    if (n2 > m) m = n2;
  }
  return m;
}
}  // namespace

int attention(const float* q, int64_t groups, int64_t rows, int64_t d, const float* k, const float* v,
              int64_t kv_group_stride, int64_t n_keys, const float* mask, int64_t mask_rows, int64_t mask_stride,
              bool round16, float* out) {
  if (groups < 0 || rows < 0 || d <= 0 || n_keys <= 0 || mask_rows <= 0 || mask_stride < n_keys || q == nullptr ||
      k == nullptr || v == nullptr || mask == nullptr || out == nullptr)
    return -1;
  const Dispatch& dp = dispatch();
  // Per group, two matrix products around a row-wise softmax: S = Q K^T ([rows, L], padded to lp
  // columns so that the products run on whole vectors), then O = P V. For many query rows K is
  // transposed once per group into kt [d, lp] (zero columns past L) and S is a product of row blocks;
  // for a few (decode) each score is one dot product.
  const int64_t L = n_keys, lp = (L + 7) / 8 * 8;
  const bool blocked = rows >= 16;
  thread_local std::vector<float> kt, sc;
  thread_local std::vector<int64_t> klen, nlen, open;
  if (blocked) kt.resize(static_cast<size_t>(d * lp));
  sc.resize(static_cast<size_t>(rows * lp));
  klen.resize(static_cast<size_t>(rows));
  nlen.resize(static_cast<size_t>(rows));
  // The columns a mask row leaves open: past its last value other than -inf, the score plus the mask
  // is -inf whatever the (finite) score, so those scores need not be computed (see the bound below).
  open.resize(static_cast<size_t>(mask_rows));
  for (int64_t t = 0; t < mask_rows; ++t) {
    const float* mr = mask + t * mask_stride;
    int64_t j = L;
    while (j > 0 && mr[j - 1] == -INFINITY) --j;
    open[t] = j;
  }
  for (int64_t r = 0; r < rows; ++r) nlen[r] = open[r % mask_rows];
  for (int64_t g = 0; g < groups; ++g) {
    const float* kg = k + g * kv_group_stride;
    const float* vg = v + g * kv_group_stride;
    const float* qg = q + g * rows * d;
    float* og = out + g * rows * d;
    // A skipped score must be finite: by Cauchy-Schwarz |q . k| <= |q| |k|, and below 2^15 a score
    // cannot reach fp16's infinity (nor is any value inf or NaN: the norms would be too).
    const bool skip = max_sq_norm(qg, rows, d, dp.dot) * max_sq_norm(kg, L, d, dp.dot) < 1073741824.f;
    const int64_t* cols = skip ? nlen.data() : nullptr;
    if (blocked) {
      for (int64_t c = 0; c < d; ++c) {
        float* ktc = kt.data() + c * lp;
        for (int64_t j = 0; j < L; ++j) ktc[j] = kg[j * d + c];
        for (int64_t j = L; j < lp; ++j) ktc[j] = 0.f;
      }
      dp.gemm(qg, d, kt.data(), lp, sc.data(), lp, rows, lp, cols, nullptr, d);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0, n = skip ? nlen[r] : L; j < n; ++j) sc[r * lp + j] = dp.dot(qg + r * d, kg + j * d, d);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = sc.data() + r * lp;
      if (skip)
        for (int64_t j = nlen[r]; j < L; ++j) sr[j] = -INFINITY;
      klen[r] = dp.softmax_row(sr, mask + (r % mask_rows) * mask_stride, L, round16);
    }
    // A row's product may stop at its last non-zero probability (a causal mask's zeros: 0 * v adds
    // nothing), unless some v is inf or NaN, where 0 * v is NaN as in the full product.
    const bool finite = dp.all_finite(vg, L * d);
    dp.gemm(sc.data(), lp, vg, d, og, d, rows, d, nullptr, finite ? klen.data() : nullptr, L);
    if (round16) round_f16(og, rows * d, og);
  }
  return 0;
}

int silu_gate(const float* a, const float* t, const float* b, int64_t n, bool round16, float* out) {
  if (n < 0 || a == nullptr || t == nullptr || b == nullptr || out == nullptr) return -1;
  dispatch().silu_gate[round16 ? 1 : 0](a, t, b, n, out);
  return 0;
}

int add(const float* x, const float* y, int64_t batch, int64_t rows, int64_t cols, bool y_transposed, bool round16,
        float* out) {
  if (batch < 0 || rows < 0 || cols < 0 || x == nullptr || y == nullptr || out == nullptr) return -1;
  const int64_t block = rows * cols;
  if (!y_transposed) {
    for (int64_t i = 0; i < batch * block; ++i) out[i] = x[i] + y[i];
  } else {
    const AddTFn add_t = dispatch().add_t;
    for (int64_t b = 0; b < batch; ++b) add_t(x + b * block, y + b * block, rows, cols, out + b * block);
  }
  if (round16) round_f16(out, batch * block, out);
  return 0;
}

int64_t open_columns(const float* mask, int64_t rows, int64_t cols) {
  return dispatch().open_columns(mask, rows, cols);
}

const char* chain_isa() { return dispatch().name; }

}  // namespace kernels
}  // namespace anemll
