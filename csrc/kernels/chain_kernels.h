// Fused op chains for the reference backend: the chains that ANEMLL's decode graphs spell out op by
// op (RMSNorm as a layer_norm over [x, -x], rotary embedding, masked attention), each computed in
// one pass over float32 data holding fp16-exact values.
//
// Fidelity: each kernel rounds to fp16 (round to nearest even, as the op-by-op path's finisher does)
// exactly where the MIL chain it replaces has an fp16 output, and nowhere else; with round16 false
// (fp32 programs) it does not round at all. The element-wise chains (norm, rotary) do the chain's
// float32 arithmetic in its order, so they are bit-identical to the op-by-op path (the norm's sums
// follow numpy's pairwise summation order for that reason). Attention's dot products and exp are
// float32 in an order of their own, as any BLAS's are (the exp a polynomial within ~1 ulp): they may
// differ from numpy's in the last fp32 bit, so a rounded fp16 score or output is occasionally one fp16
// step apart; the rounding points are the chain's. Single-threaded; the caller releases the GIL.
#pragma once

#include <cstdint>

namespace anemll {
namespace kernels {

// ANEMLL's RMSNorm: for each of `rows` rows of h values, layer_norm over the 2h values [x, -x]
// (mean, then the mean of squared deviations, in numpy's pairwise order), times gamma[0:h]
// (+ beta[0:h] when not null), keeping the first h outputs. Returns 0, or -1 on bad arguments.
int mirror_norm(const float* x, int64_t rows, int64_t h, const float* gamma, const float* beta, float eps,
                bool round16, float* out);

// Rotary embedding of `groups` blocks of [t, d] values (d even) with one [t, d] table each of cos
// and sin shared by every block: out = r(r(x * cos) + r(rot(x) * sin)), rot(x) = [-x[d/2:], x[:d/2]]
// per row, r() the fp16 rounding (identity when round16 is false). With x_transposed each block of x is
// stored [d, t] (a transposed view, as ANEMLL's q / k leave their projection); out is [t, d] rows
// either way. Returns 0, or -1 on bad arguments.
int rotary(const float* x, int64_t groups, int64_t t, int64_t d, const float* cos, const float* sin,
           bool round16, float* out, bool x_transposed = false);

// Masked attention over the first n_keys keys, for `groups` independent (batch x kv-head) groups of
// `rows` query rows of d values: for query row r of group g,
//   s_j = r(q . k_j); s_j = r(s_j + mask_row[j]); p = r(softmax(s)); out = r(sum_j p_j v_j)
// (r() rounds to fp16 when round16). q and out are [groups, rows, d]; k and v hold rows of d values,
// group g's key j at k + g * kv_group_stride + j * d; the mask row of query row r is
// mask + (r % mask_rows) * mask_stride (mask_rows = 1: one row for all). Returns 0, or -1 on bad
// arguments.
// For 16 or more rows a group is two blocked matrix products (Q K^T, then P V) around a vectorized
// softmax row; for fewer, each score is one dot product. Work that cannot change a bit of the result
// is skipped: scores past a mask row's last open column (they are -inf after the add, provided the
// score is finite, which a Cauchy-Schwarz bound |q||k| < 2^15 guarantees per group, else nothing is
// skipped), and a row's product terms past its last non-zero probability (0 * v = 0, provided every v
// of the group is finite, else nothing is skipped).
int attention(const float* q, int64_t groups, int64_t rows, int64_t d, const float* k, const float* v,
              int64_t kv_group_stride, int64_t n_keys, const float* mask, int64_t mask_rows, int64_t mask_stride,
              bool round16, float* out);

// The SiLU-gated product's arithmetic after the tanh, element-wise over n values: with t = tanh(a / 2)
// (numpy's, computed by the caller), out = r(r(a * (0.5 * (1 + t))) * b), the silu op's
// x * 0.5 * (1 + tanh(0.5 x)) in its order, then the mul. out may be t. Returns 0, or -1 on bad arguments.
int silu_gate(const float* a, const float* t, const float* b, int64_t n, bool round16, float* out);

// out = r(x + y) for `batch` blocks of [rows, cols] values: x and out row-major; y row-major too when
// y_transposed is false, else each block of y is stored [cols, rows] (y is a transposed view, as a
// projection's output reaches a residual add). Returns 0, or -1 on bad arguments.
int add(const float* x, const float* y, int64_t batch, int64_t rows, int64_t cols, bool y_transposed, bool round16,
        float* out);

// One past the last of `cols` columns of a [rows, cols] mask holding a value other than -inf (0 when
// every value is -inf): how many keys an attention mask lets any query see.
int64_t open_columns(const float* mask, int64_t rows, int64_t cols);

// Which vector path the element-wise kernels run ("avx2+fma+f16c", "neon" or "portable"); the same
// ANEMLL_FAST_KERNELS=portable override as the matrix kernels applies.
const char* chain_isa();

}  // namespace kernels
}  // namespace anemll
